// CUDA kernel of engine.ops.patchify (same contract as csrc/cpu/patchify.cpp): writes the image
// processor's fp32 pixel_values with one thread per output value (bandwidth-bound: the writes dominate).
#include "cuda/patch_rows.cuh"
#include "patch_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {
using namespace engine_patch;
using at::Tensor;

template <typename src_t>
__global__ void patchify_kernel(const src_t* __restrict__ img, float* __restrict__ out, int64_t rows, int64_t T, Geometry g,
                                ChannelConsts mean, ChannelConsts std, double rescale) {
  const int64_t PP = g.P * g.P, F = g.C * T * PP;
  const int64_t total = rows * F;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / F, f = i % F;
    const int64_t c = f / (T * PP), pq = f % PP;
    const int64_t off = patch_origin(r, g) + c * g.H * g.W + (pq / g.P) * g.W + pq % g.P;
    // the processor rescales in float64 and rounds once to float32, then normalizes in float32;
    // __fdiv_rn: setup.py builds with --use_fast_math, under which `/` is the approximate (2-ulp) divide
    const float x = static_cast<float>(static_cast<double>(img[off]) * rescale);
    out[i] = __fdiv_rn(x - mean.v[c], std.v[c]);
  }
}

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

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  m.impl("patchify_fwd", &patchify_fwd_cuda);
}
