// Shared by the patch ops' kernels (csrc/cpu/{patch_embed,patchify,patchify_embed}.cpp and
// csrc/cuda/{patch_embed,patchify,patchify_embed}.cu): argument checks, the normalization constants,
// and the algebra that lets patchify_embed run a GEMM on raw pixels.
//
// Why the fused op is cheaper than patchify + GEMM, not just equal to it:
//   x_norm[c] = x[c] * rescale / std[c] - mean[c] / std[c] = a[c] * (x[c] - z[c]) + k[c],
//   with z[c] = round(mean[c] / rescale) (an integer: uint8 pixels minus z stay exact in bf16, and
//   centred terms keep the bf16 rounding error near the reference's) and k[c] = a[c] z[c] - mean[c] / std[c].
// The Tp frames of an image are one frame repeated, so
//   out[n, d] = sum_{c,p} Weff[d, c, p] * (x[n, c, p] - z[c]) + bias_eff[d],
//   Weff[d, c, p] = a[c] * sum_t W[d, c, t, p],   bias_eff[d] = bias[d] + sum_c k[c] * sum_{t,p} W[d, c, t, p].
// K drops from C*Tp*P*P (1176) to C*P*P (588): half the FLOPs of the Conv3d, on pixels read once.
// bias_eff joins the GEMM as two extra K columns (hi + lo parts in the GEMM dtype, times 1) so that
// it is added in fp32 accumulation even when the GEMM runs in bf16.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace engine_patch {

struct Norm {
  std::vector<float> a, z, k;  // per channel, see above
  std::vector<float> mean, std_;  // as given, for patchify
  double rescale = 1.0;
};

inline Norm make_norm(c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale, int64_t C) {
  TORCH_CHECK_VALUE((int64_t)mean.size() == C, "mean must have one value per channel (", C, "), got ", mean.size());
  TORCH_CHECK_VALUE((int64_t)std.size() == C, "std must have one value per channel (", C, "), got ", std.size());
  TORCH_CHECK_VALUE(std::isfinite(rescale), "rescale must be finite, got ", rescale);
  Norm n;
  n.rescale = rescale;
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK_VALUE(std[c] != 0.0 && std::isfinite(std[c]), "std must be finite and nonzero, got ", std[c]);
    const double a = rescale / std[c];
    const double z = rescale != 0.0 ? std::nearbyint(mean[c] / rescale) : 0.0;
    n.a.push_back((float)a);
    n.z.push_back((float)z);
    n.k.push_back((float)(a * z - mean[c] / std[c]));
    n.mean.push_back((float)mean[c]);
    n.std_.push_back((float)std[c]);
  }
  return n;
}

// Shapes of one call: every image [B_i, C, H_i, W_i] with H_i, W_i multiples of P*M.
struct ImageSet {
  int64_t C = 0, P = 0, M = 0, total_patches = 0;
  std::vector<int64_t> first_patch;  // per image tensor: index of its first patch row
};

inline ImageSet check_images(at::TensorList images, int64_t C, int64_t P, int64_t M, c10::Device device) {
  TORCH_CHECK_VALUE(P > 0, "patch_size must be positive, got ", P);
  TORCH_CHECK_VALUE(M > 0, "merge_size must be positive, got ", M);
  ImageSet s;
  s.C = C;
  s.P = P;
  s.M = M;
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& t = images[i];
    TORCH_CHECK_VALUE(t.dim() == 4, "images[", i, "] must be [B, C, H, W], got ", t.sizes());
    const auto dt = t.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kByte || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                      "images[", i, "] must be uint8 or float, got ", dt);
    TORCH_CHECK_VALUE(t.device() == device, "images[", i, "] is on ", t.device(), " but weight is on ", device);
    TORCH_CHECK_VALUE(t.size(1) == C, "images[", i, "] must have ", C, " channels, got ", t.size(1));
    TORCH_CHECK_VALUE(t.size(2) % (P * M) == 0 && t.size(3) % (P * M) == 0 && t.size(2) > 0 && t.size(3) > 0,
                      "images[", i, "] height and width must be positive multiples of patch_size*merge_size (", P * M,
                      "), got ", t.size(2), "x", t.size(3));
    s.first_patch.push_back(s.total_patches);
    s.total_patches += t.size(0) * (t.size(2) / P) * (t.size(3) / P);
  }
  return s;
}

// patchify_embed's upstream grad: [N, D], N = the patch rows of every image.
inline void check_embed_grad(const at::Tensor& grad, const ImageSet& s, int64_t D) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.total_patches && grad.size(1) == D, "grad must be [N, D] = [", s.total_patches,
                    ", ", D, "], got ", grad.sizes());
}

inline void check_weight(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 5, "weight must be [D, C, Tp, P, P], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(3) == weight.size(4), "weight must be [D, C, Tp, P, P] with square patches, got ", weight.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "weight must be float32, bfloat16 or float16, got ", dt);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [D] = [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == dt, "bias must have weight's dtype ", dt, ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == weight.device(), "bias is on ", bias->device(), " but weight is on ", weight.device());
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The kernels index images as dense [B, C, H, W]: a strided view is copied once here.
inline std::vector<at::Tensor> contiguous_all(at::TensorList images) {
  std::vector<at::Tensor> out;
  for (const auto& t : images) out.push_back(t.contiguous());
  return out;
}

// The GEMM's right-hand side [D, Kpad] in weight's dtype: columns [0, K) = Weff, K = hi(bias_eff),
// K+1 = lo(bias_eff), the rest 0 (Kpad a multiple of 16: AMX/tensor-core friendly rows).
inline at::Tensor fold_weight(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const Norm& n, int64_t Kpad) {
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(3), K = C * P * P;
  at::Tensor ws = weight.to(at::kFloat).sum(2);  // [D, C, P, P]: the Tp frames see the same pixels
  at::Tensor bias_eff = at::zeros({D}, weight.options().dtype(at::kFloat));
  if (bias.has_value() && bias->defined()) bias_eff.add_(bias->to(at::kFloat));
  for (int64_t c = 0; c < C; ++c) {
    at::Tensor wc = ws.select(1, c);
    bias_eff.add_(wc.sum({1, 2}), n.k[c]);
    wc.mul_(n.a[c]);
  }
  at::Tensor out = at::zeros({D, Kpad}, weight.options());
  out.narrow(1, 0, K).copy_(ws.reshape({D, K}));
  at::Tensor hi = bias_eff.to(weight.scalar_type());
  out.select(1, K).copy_(hi);
  out.select(1, K + 1).copy_(bias_eff.sub(hi.to(at::kFloat)));
  return out;
}

// grad_weight [D, C, Tp, P, P] (weight's dtype) from gWeff = grad^T (x - z) [D, K] fp32 and gsum = grad.sum(0) [D] fp32:
// dL/dW[d, c, t, p] = sum_n g[n, d] x_norm[n, c, p] = a[c] gWeff[d, c, p] + k[c] gsum[d], the same for every t.
inline at::Tensor unfold_weight_grad(const at::Tensor& gweff, const at::Tensor& gsum, const at::Tensor& weight, const Norm& n) {
  const int64_t D = weight.size(0), C = weight.size(1), Tp = weight.size(2), P = weight.size(3);
  at::Tensor g = gweff.reshape({D, C, P, P}).clone();
  at::Tensor gs = gsum.reshape({D, 1, 1});
  for (int64_t c = 0; c < C; ++c) {
    at::Tensor gc = g.select(1, c);
    gc.mul_(n.a[c]).add_(gs, n.k[c]);
  }
  return g.unsqueeze(2).expand({D, C, Tp, P, P}).to(weight.scalar_type()).contiguous();
}

// patchify_embed's backward after the device kernel has gathered the centred pixels xc = x - z
// [N, C*P*P] fp32: one fp32 GEMM gWeff = grad^T xc, then (grad_weight, grad_bias) in weight's dtype.
inline std::tuple<at::Tensor, at::Tensor> embed_weight_grads(const at::Tensor& grad, const at::Tensor& xc, const at::Tensor& weight,
                                                             const Norm& n) {
  const at::Tensor g = grad.to(at::kFloat);
  const at::Tensor gweff = at::mm(g.t(), xc);
  const at::Tensor gsum = at::sum(g, {0});
  return {unfold_weight_grad(gweff, gsum, weight, n), gsum.to(weight.scalar_type())};
}

}  // namespace engine_patch
