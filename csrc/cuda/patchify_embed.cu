// CUDA kernels of engine.ops.patchify_embed (same contract and algebra as csrc/cpu/patchify_embed.cpp).
//
// The forward gathers the raw, centred pixels of a chunk of patches (at most ~8 MB: stays in the
// 50 MB L2 of an H100 between the gather and the GEMM) into a reused buffer and calls one cuBLAS GEMM
// per chunk into its slice of the output, so pixel_values is never written; K = C*P*P, half the
// Conv3d's (normalization and the Tp repeat folded into the weight, see patch_common.h).
#include "cuda/patch_rows.cuh"
#include "patch_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace {
using namespace engine_patch;
using at::Tensor;

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

// ---- forward and backward ----

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
  check_embed_grad(grad, s, D);
  const Norm n = make_norm(mean, std, rescale, C);
  const std::vector<Tensor> imgs = contiguous_all(images);
  // one fp32 GEMM grad^T [D, N] @ (x - z) [N, C*P*P] on the centred pixels, gathered once
  Tensor xc = at::empty({s.total_patches, K}, weight.options().dtype(at::kFloat));
  for (size_t i = 0; i < imgs.size(); ++i) {
    const Geometry g = geometry(imgs[i], P, merge_size);
    const int64_t rows = imgs[i].size(0) * g.gh * g.gw;
    gather_rows(imgs[i], xc.narrow(0, s.first_patch[i], rows), 0, rows, K, g, n, /*ones=*/false);
  }
  return embed_weight_grads(grad, xc, weight, n);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  m.impl("patchify_embed_fwd", &patchify_embed_fwd_cuda);
  m.impl("patchify_embed_bwd", &patchify_embed_bwd_cuda);
}
