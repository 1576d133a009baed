// group_advantages on CUDA: group_advantages_fwd (schema in csrc/ops.cpp; contract:
// docs/ops.md#group_advantages).
//
// One thread per group walks its members in order (groups are small: n = 8 responses), in double,
// as the C++ kernel does. scale="batch" first runs a one-block fixed-tree reduction for the batch
// std. Deterministic: no atomics, the same additions in the same order on every run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grpo_math.h"

#include <cmath>

namespace {

constexpr int kThreads = 256;
using namespace engine_grpo;  // check_advantage_inputs, kScaleGroup, ... (csrc/grpo_math.h)

// Sum of v over the block by a fixed tree; every thread gets the result.
__device__ double block_sum(double v, double* sh) {
  const int tid = threadIdx.x;
  sh[tid] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sh[tid] += sh[tid + s];
    __syncthreads();
  }
  const double total = sh[0];
  __syncthreads();  // sh is reused by the next call
  return total;
}

// The unbiased std of all B rewards (0 for B = 1), shifted by r[0] as the groups are.
__global__ void batch_std_kernel(const float* __restrict__ r, int64_t B, double* __restrict__ std_out) {
  __shared__ double sh[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) s += double(r[i]) - double(r[0]);
  const double mean = block_sum(s, sh) / double(B);
  double q = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) {
    const double c = (double(r[i]) - double(r[0])) - mean;
    q += c * c;
  }
  const double ss = block_sum(q, sh);
  if (threadIdx.x == 0) std_out[0] = sqrt(ss / double(B > 1 ? B - 1 : 1));
}

__global__ void group_advantages_kernel(const float* __restrict__ r, int64_t num_groups, int64_t G, int scale, double eps,
                                        const double* __restrict__ batch_std, float* __restrict__ out) {
  const int64_t grp = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (grp >= num_groups) return;
  const float* x = r + grp * G;
  // shift by the group's first reward: a group of equal rewards gives exactly 0
  double s = 0.0;
  for (int64_t i = 0; i < G; ++i) s += double(x[i]) - double(x[0]);
  const double mean = s / double(G);
  double ss = 0.0;
  for (int64_t i = 0; i < G; ++i) {
    const double c = (double(x[i]) - double(x[0])) - mean;
    ss += c * c;
  }
  const double std_g = sqrt(ss / double(G > 1 ? G - 1 : 1));
  const double den = scale == kScaleNone ? 1.0 : (scale == kScaleGroup ? std_g : batch_std[0]) + eps;
  for (int64_t i = 0; i < G; ++i) {
    const double c = (double(x[i]) - double(x[0])) - mean;
    out[grp * G + i] = static_cast<float>(den > 0 ? c / den : 0.0);  // eps = 0 and a flat group: 0, not NaN
  }
}

at::Tensor group_advantages_fwd_cuda(const at::Tensor& rewards, int64_t group_size, c10::string_view scale, double eps) {
  const int sc = check_advantage_inputs(rewards, group_size, scale, eps);
  TORCH_CHECK_VALUE(rewards.is_cuda(), "rewards must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0);
  const at::Tensor r = rewards.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B}, r.options());
  if (B == 0) return out;
  at::Tensor batch_std = at::zeros({1}, r.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (sc == kScaleBatch)
    batch_std_kernel<<<1, kThreads, 0, stream>>>(r.const_data_ptr<float>(), B, batch_std.data_ptr<double>());
  const int64_t groups = B / group_size;
  group_advantages_kernel<<<(groups + 127) / 128, 128, 0, stream>>>(r.const_data_ptr<float>(), groups, group_size, sc,
                                                                     eps, batch_std.const_data_ptr<double>(),
                                                                     out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  m.impl("group_advantages_fwd", &group_advantages_fwd_cuda);
}
