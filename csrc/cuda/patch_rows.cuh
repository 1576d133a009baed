// Shared by the CUDA patch kernels (csrc/cuda/{patch_embed,patchify,patchify_embed}.cu): where patch
// row n of an image lies (the image processor's merge-block order), per-channel constants passed by
// value, launch sizes and the device checks.
#pragma once

#include "patch_common.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace engine_patch {

constexpr int kMaxChannels = 8;
constexpr int kThreads = 256;

struct ChannelConsts {
  float v[kMaxChannels];
};

inline ChannelConsts to_consts(const std::vector<float>& x) {
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

inline int blocks_for(int64_t n) { return (int)std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 4); }

inline Geometry geometry(const at::Tensor& img, int64_t P, int64_t M) {
  return Geometry{img.size(1), img.size(2), img.size(3), img.size(2) / P, img.size(3) / P, P, M};
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ", t.device());
}

// Kernels and the current stream follow the tensors' device, not whichever device is current.
#define ENGINE_DEVICE_GUARD(t) const c10::DeviceGuard device_guard_((t).device())

}  // namespace engine_patch
