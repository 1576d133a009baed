// CUDA kernels of the Qwen-VL vision front end (same ops and algebra as csrc/cpu/vision.cpp).
//
// patch_embed is a GEMM: it goes to cuBLAS through at::addmm / at::mm (nothing hand-written beats
// it for these shapes). patchify writes the processor's layout with one thread per output value.
// patchify_embed gathers the raw, centred pixels of a chunk of patches (at most ~8 MB: stays in the
// 50 MB L2 of an H100 between the gather and the GEMM) into a reused buffer and calls one cuBLAS GEMM
// per chunk into its slice of the output, so pixel_values is never written; K = C*P*P, half the
// Conv3d's (normalization and the Tp repeat folded into the weight, see vision_common.h).
#include "cpu/vision_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace {
using namespace engine_vision;
using at::Tensor;

constexpr int kMaxChannels = 8;
constexpr int kThreads = 256;

struct ChannelConsts {
  float v[kMaxChannels];
};

ChannelConsts to_consts(const std::vector<float>& x) {
  ChannelConsts c{};
  for (size_t i = 0; i < x.size() && i < (size_t)kMaxChannels; ++i) c.v[i] = x[i];
  return c;
}

struct Geometry {
  int64_t C, H, W, gh, gw, P, M;
};

// Pixel offset (within the [B, C, H, W] tensor) of the top-left corner of patch row `n`, in the
// processor's merge-block order.
__device__ __forceinline__ int64_t patch_origin(int64_t n, const Geometry& g) {
  const int64_t per_image = g.gh * g.gw;
  const int64_t b = n / per_image, r = n % per_image;
  const int64_t blk = r / (g.M * g.M), within = r % (g.M * g.M);
  const int64_t Wb = g.gw / g.M;
  const int64_t y = ((blk / Wb) * g.M + within / g.M) * g.P;
  const int64_t x = ((blk % Wb) * g.M + within % g.M) * g.P;
  return b * g.C * g.H * g.W + y * g.W + x;
}

// dst[r, k] for r in [0, rows), k in [0, ld): k < K: pixel - z[c] of patch row0 + r; k = K, K+1: 1
// (the bias_eff columns); beyond: 0.
template <typename src_t, typename dst_t>
__global__ void gather_centered_kernel(const src_t* __restrict__ img, dst_t* __restrict__ dst, int64_t row0, int64_t rows, int64_t ld,
                                       int64_t K, Geometry g, ChannelConsts z, bool ones_columns) {
  const int64_t total = rows * ld;
  const int64_t PP = g.P * g.P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / ld, k = i % ld;
    float v = 0.f;
    if (k < K) {
      const int64_t c = k / PP, pq = k % PP;
      const int64_t off = patch_origin(row0 + r, g) + c * g.H * g.W + (pq / g.P) * g.W + pq % g.P;
      v = static_cast<float>(img[off]) - z.v[c];
    } else if (ones_columns && k < K + 2) {
      v = 1.f;
    }
    dst[i] = static_cast<dst_t>(v);
  }
}

template <typename src_t>
__global__ void patchify_kernel(const src_t* __restrict__ img, float* __restrict__ out, int64_t rows, int64_t T, Geometry g,
                                ChannelConsts mean, ChannelConsts std, double rescale) {
  const int64_t PP = g.P * g.P, F = g.C * T * PP;
  const int64_t total = rows * F;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / F, f = i % F;
    const int64_t c = f / (T * PP), pq = f % PP;
    const int64_t off = patch_origin(r, g) + c * g.H * g.W + (pq / g.P) * g.W + pq % g.P;
    // the processor rescales in float64 and rounds once to float32, then normalizes in float32
    const float x = static_cast<float>(static_cast<double>(img[off]) * rescale);
    out[i] = (x - mean.v[c]) / std.v[c];
  }
}

int blocks_for(int64_t n) { return (int)std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 4); }

Geometry geometry(const Tensor& img, int64_t P, int64_t M) {
  return Geometry{img.size(1), img.size(2), img.size(3), img.size(2) / P, img.size(3) / P, P, M};
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ", t.device());
}

// Kernels and the current stream follow the tensors' device, not whichever device is current.
#define ENGINE_DEVICE_GUARD(t) const c10::DeviceGuard device_guard_((t).device())

// Gathers patch rows [row0, row0 + rows) of one image tensor into dst [rows, ld] (dst's dtype).
void gather_rows(const Tensor& img, const Tensor& dst, int64_t row0, int64_t rows, int64_t K, const Geometry& g, const Norm& n, bool ones) {
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t ld = dst.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, img.scalar_type(), "gather_centered", [&] {
    using src_t = scalar_t;
    const src_t* src = img.data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "gather_centered_dst", [&] {
      gather_centered_kernel<src_t, scalar_t><<<blocks_for(rows * ld), kThreads, 0, stream>>>(
          src, dst.data_ptr<scalar_t>(), row0, rows, ld, K, g, to_consts(n.z), ones);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<Tensor> contiguous_all(at::TensorList images) {
  std::vector<Tensor> out;
  for (const auto& t : images) out.push_back(t.contiguous());
  return out;
}

// ---- patch_embed ----

Tensor patch_embed_fwd_cuda(const Tensor& pixel_values, const Tensor& weight, const c10::optional<Tensor>& bias) {
  check_weight(weight, bias);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(pixel_values.dim() == 2 && pixel_values.size(1) == K, "pixel_values must be [N, C*Tp*P*P] = [N, ", K, "], got ",
                    pixel_values.sizes());
  TORCH_CHECK_VALUE(pixel_values.scalar_type() == weight.scalar_type(), "pixel_values must have weight's dtype ", weight.scalar_type(),
                    ", got ", pixel_values.scalar_type());
  const Tensor w2 = weight.reshape({D, K});
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, pixel_values, w2.t());
  return at::mm(pixel_values, w2.t());
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cuda(const Tensor& grad, const Tensor& pixel_values, const Tensor& weight) {
  check_weight(weight, c10::nullopt);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  const int64_t D = weight.size(0), K = weight.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(1) == D && grad.size(0) == pixel_values.size(0), "grad must be [N, D], got ", grad.sizes());
  const Tensor g = grad.to(weight.scalar_type());
  const Tensor w2 = weight.reshape({D, K});
  Tensor gx = at::mm(g, w2);
  Tensor gw = at::mm(g.t(), pixel_values.to(weight.scalar_type())).reshape(weight.sizes());
  Tensor gb = at::sum(grad, {0}, false, at::kFloat).to(weight.scalar_type());
  return {gx.to(pixel_values.scalar_type()), gw, gb};
}

// ---- patchify ----

Tensor patchify_fwd_cuda(at::TensorList images, int64_t patch_size, int64_t temporal_patch_size, int64_t merge_size,
                         c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale) {
  TORCH_CHECK_VALUE(images.size() > 0, "images must hold at least one image");
  TORCH_CHECK_VALUE(temporal_patch_size > 0, "temporal_patch_size must be positive, got ", temporal_patch_size);
  check_cuda(images[0], "images");
  ENGINE_DEVICE_GUARD(images[0]);
  const int64_t C = images[0].dim() == 4 ? images[0].size(1) : 0;
  TORCH_CHECK_VALUE(C <= kMaxChannels, "images must have at most ", kMaxChannels, " channels on CUDA, got ", C);
  const ImageSet s = check_images(images, C, patch_size, merge_size, images[0].device());
  const Norm n = make_norm(mean, std, rescale, C);
  const int64_t P = patch_size, T = temporal_patch_size, F = C * T * P * P;
  const std::vector<Tensor> imgs = contiguous_all(images);
  Tensor out = at::empty({s.total_patches, F}, imgs[0].options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < imgs.size(); ++i) {
    const Geometry g = geometry(imgs[i], P, merge_size);
    const int64_t rows = imgs[i].size(0) * g.gh * g.gw;
    if (rows == 0) continue;
    float* dst = out.data_ptr<float>() + s.first_patch[i] * F;
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, imgs[i].scalar_type(), "patchify_cuda", [&] {
      patchify_kernel<scalar_t><<<blocks_for(rows * F), kThreads, 0, stream>>>(imgs[i].data_ptr<scalar_t>(), dst, rows, T, g,
                                                                                to_consts(n.mean), to_consts(n.std_), rescale);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ---- patchify_embed ----

Tensor patchify_embed_fwd_cuda(at::TensorList images, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t merge_size,
                               c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale) {
  check_weight(weight, bias);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(3), K = C * P * P;
  TORCH_CHECK_VALUE(C <= kMaxChannels, "weight must have at most ", kMaxChannels, " channels on CUDA, got ", C);
  const ImageSet s = check_images(images, C, P, merge_size, weight.device());
  const Norm n = make_norm(mean, std, rescale, C);
  const int64_t Kpad = round_up(K + 2, 16);
  const Tensor rhs = fold_weight(weight, bias, n, Kpad).t();  // [Kpad, D]
  const std::vector<Tensor> imgs = contiguous_all(images);
  Tensor out = at::empty({s.total_patches, D}, weight.options());
  // chunk of at most ~8 MB of gathered pixels, reused: stream order serializes gather -> GEMM -> next gather
  const int64_t chunk = std::max<int64_t>(256, (int64_t(8) << 20) / (Kpad * (int64_t)weight.element_size()));
  Tensor buf = at::empty({std::min(chunk, std::max<int64_t>(s.total_patches, 1)), Kpad}, weight.options());
  for (size_t i = 0; i < imgs.size(); ++i) {
    const Geometry g = geometry(imgs[i], P, merge_size);
    const int64_t rows = imgs[i].size(0) * g.gh * g.gw;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t nr = std::min(chunk, rows - r0);
      Tensor b = buf.narrow(0, 0, nr);
      gather_rows(imgs[i], b, r0, nr, K, g, n, /*ones=*/true);
      Tensor dst = out.narrow(0, s.first_patch[i] + r0, nr);
      at::mm_out(dst, b, rhs);
    }
  }
  return out;
}

std::tuple<Tensor, Tensor> patchify_embed_bwd_cuda(const Tensor& grad, at::TensorList images, const Tensor& weight, int64_t merge_size,
                                                   c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale) {
  check_weight(weight, c10::nullopt);
  check_cuda(weight, "weight");
  ENGINE_DEVICE_GUARD(weight);
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(3), K = C * P * P;
  TORCH_CHECK_VALUE(C <= kMaxChannels, "weight must have at most ", kMaxChannels, " channels on CUDA, got ", C);
  const ImageSet s = check_images(images, C, P, merge_size, weight.device());
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == s.total_patches && grad.size(1) == D, "grad must be [N, D] = [", s.total_patches,
                    ", ", D, "], got ", grad.sizes());
  const Norm n = make_norm(mean, std, rescale, C);
  const std::vector<Tensor> imgs = contiguous_all(images);
  // one fp32 GEMM grad^T [D, N] @ (x - z) [N, C*P*P] on the centred pixels, gathered once
  Tensor xc = at::empty({s.total_patches, K}, weight.options().dtype(at::kFloat));
  for (size_t i = 0; i < imgs.size(); ++i) {
    const Geometry g = geometry(imgs[i], P, merge_size);
    const int64_t rows = imgs[i].size(0) * g.gh * g.gw;
    gather_rows(imgs[i], xc.narrow(0, s.first_patch[i], rows), 0, rows, K, g, n, /*ones=*/false);
  }
  const Tensor gf = grad.to(at::kFloat);
  const Tensor gweff = at::mm(gf.t(), xc);
  const Tensor gsum = at::sum(gf, {0});
  return {unfold_weight_grad(gweff, gsum, weight, n), gsum.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cuda);
  m.impl("patchify_fwd", &patchify_fwd_cuda);
  m.impl("patchify_embed_fwd", &patchify_embed_fwd_cuda);
  m.impl("patchify_embed_bwd", &patchify_embed_bwd_cuda);
}
