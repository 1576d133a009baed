// CPU kernels of engine.ops.patch_embed: Qwen-VL's PatchEmbed Conv3d (kernel == stride) is exactly a
// GEMM, pixel_values [N, K] @ weight.view(D, K)^T; ATen's GEMM (oneDNN/MKL) is as fast as it gets for
// these shapes, so this file only checks arguments and calls it.
#include "patch_common.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>

namespace {
using namespace engine_patch;
using at::Tensor;

Tensor patch_embed_fwd_cpu(const Tensor& pixel_values, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_weight(weight, bias);
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(pixel_values.dim() == 2 && pixel_values.size(1) == K, "pixel_values must be [N, C*Tp*P*P] = [N, ", K, "], got ",
                    pixel_values.sizes());
  TORCH_CHECK_VALUE(pixel_values.scalar_type() == weight.scalar_type(), "pixel_values must have weight's dtype ", weight.scalar_type(),
                    ", got ", pixel_values.scalar_type());
  const Tensor w2 = weight.reshape({D, K});
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, pixel_values, w2.t());
  return at::mm(pixel_values, w2.t());
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cpu(const Tensor& grad, const Tensor& pixel_values, const Tensor& weight) {
  check_weight(weight, c10::nullopt);
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(1) == D && grad.size(0) == pixel_values.size(0), "grad must be [N, D], got ", grad.sizes());
  const Tensor g = grad.to(weight.scalar_type());
  const Tensor w2 = weight.reshape({D, K});
  Tensor gx = at::mm(g, w2);
  Tensor gw = at::mm(g.t(), pixel_values.to(weight.scalar_type())).reshape(weight.sizes());
  Tensor gb = at::sum(grad, {0}, false, at::kFloat).to(weight.scalar_type());
  return {gx.to(pixel_values.scalar_type()), gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cpu);
}
