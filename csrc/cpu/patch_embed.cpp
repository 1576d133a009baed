// CPU kernels of engine.ops.patch_embed: Qwen-VL's PatchEmbed Conv3d (kernel == stride) is exactly a
// GEMM, pixel_values [N, K] @ weight.view(D, K)^T; ATen's GEMM (oneDNN/MKL) is as fast as it gets for
// these shapes, so this file only checks arguments and calls it.
#include "patch_embed_gemm.h"

#include <torch/library.h>

namespace {
using namespace engine_patch;
using at::Tensor;

Tensor patch_embed_fwd_cpu(const Tensor& pixel_values, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_weight(weight, bias);
  return patch_embed_forward(pixel_values, weight, bias);
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cpu(const Tensor& grad, const Tensor& pixel_values, const Tensor& weight) {
  check_weight(weight, c10::nullopt);
  return patch_embed_backward(grad, pixel_values, weight);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cpu);
}
