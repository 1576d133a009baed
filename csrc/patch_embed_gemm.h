// engine.ops.patch_embed on either device: Qwen-VL's PatchEmbed Conv3d (kernel == stride) is exactly
// the GEMM pixel_values [N, K] @ weight.view(D, K)^T, so both the CPU and the CUDA kernels run these
// ATen calls (oneDNN/MKL on the CPU, cuBLAS on the GPU: nothing hand-written beats them for these
// shapes); csrc/cpu/patch_embed.cpp and csrc/cuda/patch_embed.cu add only their device's checks.
#pragma once

#include "patch_common.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <tuple>

namespace engine_patch {

// pixel_values [N, K] (weight's dtype), weight [D, C, Tp, P, P], bias [D] or none -> [N, D].
inline at::Tensor patch_embed_forward(const at::Tensor& pixel_values, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias) {
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(pixel_values.dim() == 2 && pixel_values.size(1) == K, "pixel_values must be [N, C*Tp*P*P] = [N, ", K, "], got ",
                    pixel_values.sizes());
  TORCH_CHECK_VALUE(pixel_values.scalar_type() == weight.scalar_type(), "pixel_values must have weight's dtype ", weight.scalar_type(),
                    ", got ", pixel_values.scalar_type());
  const at::Tensor w2 = weight.reshape({D, K});
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, pixel_values, w2.t());
  return at::mm(pixel_values, w2.t());
}

// grad [N, D] -> (d pixel_values [N, K], d weight like weight, d bias [D]; bias summed in fp32).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_backward(const at::Tensor& grad, const at::Tensor& pixel_values,
                                                                           const at::Tensor& weight) {
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(1) == D && grad.size(0) == pixel_values.size(0), "grad must be [N, D], got ", grad.sizes());
  const at::Tensor g = grad.to(weight.scalar_type());
  const at::Tensor w2 = weight.reshape({D, K});
  at::Tensor gx = at::mm(g, w2);
  at::Tensor gw = at::mm(g.t(), pixel_values.to(weight.scalar_type())).reshape(weight.sizes());
  at::Tensor gb = at::sum(grad, {0}, false, at::kFloat).to(weight.scalar_type());
  return {gx.to(pixel_values.scalar_type()), gw, gb};
}

}  // namespace engine_patch
