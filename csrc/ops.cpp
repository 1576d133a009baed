// Schemas of every C++/CUDA kernel of the engine. Kernels live in csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m)) and csrc/cuda/<op>.cu (the same, CUDA).
// Python wraps them as autograd-aware custom ops in engine/<op>.py; the `torch` backend is
// engine/reference.py. Every kernel takes fp32/bf16/fp16 inputs, accumulates in fp32, and checks
// its arguments with TORCH_CHECK_VALUE (a Python ValueError naming the argument).
// The namespace is ENGINE_NAMESPACE (csrc/engine_namespace.h): `engine` here, `engine_standalone`
// in the CMake build, so both libraries can be loaded into one process.
#include <torch/library.h>

#include "engine_namespace.h"

#ifdef ENGINE_PYTHON_MODULE
#include <Python.h>
// `import engine._C` loads the library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(ENGINE_NAMESPACE, m) {
  // ---- token_logprobs (csrc/cpu/token_logprobs.cpp, csrc/cuda/token_logprobs.cu) ----
  // logits [N, V] (fp32/bf16/fp16), ids [N] int64/int32 -> logp [N] fp32; entropy [N] fp32 ([0] when not asked
  // for); stats [N, 2] fp32 = (row max m of z, log sum exp(z - m)), so lse = m + log S, kept apart for backward's
  // precision. z = logits / temperature; one pass per row (online logsumexp), no [N, V] fp32 temporaries.
  m.def("token_logprobs_fwd(Tensor logits, Tensor ids, float temperature, bool return_entropy) -> (Tensor logp, Tensor entropy, Tensor stats)");
  // grad_logits [N, V] in the logits dtype: (g_logp (onehot - p) + g_ent p (lse - entropy - z)) / temperature.
  // An absent upstream grad counts as 0; entropy is read only with grad_entropy.
  m.def("token_logprobs_bwd(Tensor logits, Tensor ids, Tensor stats, Tensor entropy, Tensor? grad_logp, Tensor? grad_entropy, float temperature) -> Tensor");
  // The same, overwriting logits with grad_logits (the fused LM head reuses its chunk buffer).
  m.def("token_logprobs_bwd_inplace(Tensor(a!) logits, Tensor ids, Tensor stats, Tensor entropy, Tensor? grad_logp, Tensor? grad_entropy, float temperature) -> ()");

  // ---- group_advantages (csrc/cpu/group_advantages.cpp, csrc/cuda/group_advantages.cu) ----
  // rewards [B] -> adv [B] fp32 (no autograd: advantages are constants). Option names and codes of
  // this op and grpo_loss: csrc/grpo_math.h (the order of engine/grpo_options.py).
  m.def("group_advantages_fwd(Tensor rewards, int group_size, str scale, float eps) -> Tensor");

  // ---- grpo_loss (csrc/cpu/grpo_loss.cpp, csrc/cuda/grpo_loss.cu; per-token math: csrc/grpo_math.h) ----
  // logp/old_logp/ref_logp [B, T] one float dtype, advantages fp32 [B] or [B, T], mask bool/fp32 [B, T]
  // -> (loss [] fp32, metrics [4] fp32: clipfrac_high, clipfrac_low, ppo_kl, kl; row_weight [B] fp32)
  m.def("grpo_loss_fwd(Tensor logp, Tensor advantages, Tensor mask, Tensor? old_logp, Tensor? ref_logp, "
        "float clip_low, float clip_high, float? dual_clip, float kl_coef, str kl_type, str loss_agg) "
        "-> (Tensor, Tensor, Tensor)");
  // -> dlogp [B, T] in logp's dtype = grad_loss * row_weight[b] * mask * d(pg + kl_coef * kl)/dlogp
  m.def("grpo_loss_bwd(Tensor grad_loss, Tensor logp, Tensor advantages, Tensor mask, Tensor? old_logp, "
        "Tensor? ref_logp, Tensor row_weight, float clip_low, float clip_high, float? dual_clip, float kl_coef, "
        "str kl_type) -> Tensor");

  // ---- patch_embed (csrc/cpu/patch_embed.cpp, csrc/cuda/patch_embed.cu) ----
  // Qwen-VL patch embedding (Conv3d with kernel == stride) as a GEMM: pixel_values [N, C*Tp*P*P] in weight's
  // dtype, weight [D, C, Tp, P, P], bias [D] -> [N, D]. Backward: (grad_pixel_values, grad_weight, grad_bias [D]);
  // the Python side drops grad_bias when there is no bias.
  m.def("patch_embed_fwd(Tensor pixel_values, Tensor weight, Tensor? bias) -> Tensor");
  m.def("patch_embed_bwd(Tensor grad, Tensor pixel_values, Tensor weight) -> (Tensor, Tensor, Tensor)");

  // ---- patchify (csrc/cpu/patchify.cpp, csrc/cuda/patchify.cu) ----
  // images: each [B_i, C, H_i, W_i] uint8/float -> the image processor's pixel_values [N, C*Tp*P*P] fp32;
  // mean/std/rescale: its normalization (x * rescale - mean) / std. No backward: pixels are data.
  m.def("patchify_fwd(Tensor[] images, int patch_size, int temporal_patch_size, int merge_size, float[] mean, float[] std, float rescale) -> Tensor");

  // ---- patchify_embed (csrc/cpu/patchify_embed.cpp, csrc/cuda/patchify_embed.cu) ----
  // patch_embed(patchify(images)) without writing pixel_values: images as in patchify, weight [D, C, Tp, P, P]
  // (Tp and P come from it) -> [N, D] in weight's dtype. Backward: (grad_weight, grad_bias [D]).
  m.def("patchify_embed_fwd(Tensor[] images, Tensor weight, Tensor? bias, int merge_size, float[] mean, float[] std, float rescale) -> Tensor");
  m.def("patchify_embed_bwd(Tensor grad, Tensor[] images, Tensor weight, int merge_size, float[] mean, float[] std, float rescale) -> (Tensor, Tensor)");
}
