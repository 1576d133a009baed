// CUDA kernels of engine.ops.patch_embed (same contract as csrc/cpu/patch_embed.cpp): a GEMM, so it goes
// to cuBLAS through at::addmm / at::mm (nothing hand-written beats it for these shapes).
#include "cuda/patch_rows.cuh"
#include "patch_embed_gemm.h"

#include <torch/library.h>

namespace {
using namespace engine_patch;
using at::Tensor;

Tensor patch_embed_fwd_cuda(const Tensor& pixel_values, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_weight(weight, bias);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  return patch_embed_forward(pixel_values, weight, bias);
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cuda(const Tensor& grad, const Tensor& pixel_values, const Tensor& weight) {
  check_weight(weight, c10::nullopt);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  return patch_embed_backward(grad, pixel_values, weight);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cuda);
}
