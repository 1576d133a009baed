// grpo_loss on CUDA: grpo_loss_fwd, grpo_loss_bwd (schemas in csrc/ops.cpp; contract:
// docs/ops.md#grpo_loss).
//
// Deterministic, no float atomics:
//   grpo_loss_fwd: kernel 1, one block per row; thread i takes tokens i, i + blockDim, ... and the
//   block reduces its six sums (pg, kl, mask, clip-high hits, dual-clip hits, old - logp) with a
//   fixed shared-memory tree into partials[6][B]. Kernel 2, one block: the same fixed pattern over
//   rows (in double), then the aggregation (loss_agg), the metrics and each row's gradient weight.
//   grpo_loss_bwd: elementwise, grid-stride, dlogp = g * row_weight[b] * mask * d(pg + c kl)/dlogp.
// Per-token math (and the autograd conventions at clamp bounds and ties): csrc/grpo_math.h, the
// same functions the C++ kernel's scalar path calls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grpo_math.h"

#include <cmath>
#include <optional>
#include <type_traits>

namespace {

constexpr int kThreads = 256;
using namespace engine_grpo;  // kNumSums, Params, check_inputs, token_terms, token_grad (csrc/grpo_math.h)

template <typename T>
__device__ __forceinline__ void block_sum(T (&v)[kNumSums], T (*sh)[kThreads]) {
  // fixed tree: the same additions in the same order on every run
  const int tid = threadIdx.x;
  for (int k = 0; k < kNumSums; ++k) sh[k][tid] = v[k];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s)
      for (int k = 0; k < kNumSums; ++k) sh[k][tid] += sh[k][tid + s];
    __syncthreads();
  }
}

template <typename scalar_t, typename mask_t>
__global__ void grpo_loss_fwd_rows_kernel(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ old,
                                          const scalar_t* __restrict__ ref, const float* __restrict__ adv,
                                          bool adv_per_token, const mask_t* __restrict__ mask, int64_t B, int64_t T,
                                          Params p, float* __restrict__ part) {
  __shared__ float sh[kNumSums][kThreads];
  const int64_t b = blockIdx.x;
  if (b >= B) return;
  const int64_t row = b * T;
  float s[kNumSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    const float l = static_cast<float>(logp[row + t]);
    const float o = p.has_old ? static_cast<float>(old[row + t]) : l;
    const float r = p.has_ref ? static_cast<float>(ref[row + t]) : l;
    const float a = adv_per_token ? adv[row + t] : adv[b];
    const float m = static_cast<float>(mask[row + t]);
    if (m == 0.f) continue;  // a masked-out token adds exactly 0, even where its terms are NaN/inf
    const TokenTerms tt = token_terms(l, o, r, a, p);
    s[0] += tt.pg * m;
    s[1] += tt.kl * m;
    s[2] += m;
    s[3] += tt.high * m;
    s[4] += tt.low * m;
    s[5] += tt.ppo * m;  // 0 without old_logp (old = logp)
  }
  block_sum<float>(s, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < kNumSums; ++k) part[k * B + b] = sh[k][0];
}

__global__ void grpo_loss_finalize_kernel(const float* __restrict__ part, int64_t B, int64_t T, double kl_coef, int agg,
                                          float* __restrict__ loss, float* __restrict__ metrics,
                                          float* __restrict__ row_w) {
  __shared__ double sh[kNumSums][kThreads];
  // slots: 0 pg, 1 kl, 2 mask, 3 high, 4 low, 5 ppo; for seq modes slot 0 holds sum of w*(pg + c kl)
  double s[kNumSums] = {0, 0, 0, 0, 0, 0};
  const double Bd = static_cast<double>(B);
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    const double pg = part[b], kl = part[B + b], n = part[2 * B + b];
    if (agg != kTokenMean) {
      double w;
      if (agg == kSeqMeanTokenMean)
        w = n > 0 ? 1.0 / (n * Bd) : 0.0;  // an empty row gives 0 and still counts in B
      else if (agg == kSeqMeanTokenSum)
        w = 1.0 / Bd;
      else
        w = T > 0 ? 1.0 / (static_cast<double>(T) * Bd) : 0.0;
      row_w[b] = static_cast<float>(w);
      s[0] += w * (pg + kl_coef * kl);
    } else {
      s[0] += pg;
    }
    s[1] += kl;
    s[2] += n;
    s[3] += part[3 * B + b];
    s[4] += part[4 * B + b];
    s[5] += part[5 * B + b];
  }
  block_sum<double>(s, sh);
  const double n = sh[2][0];
  const double inv = n > 0 ? 1.0 / n : 0.0;
  if (agg == kTokenMean)
    for (int64_t b = threadIdx.x; b < B; b += kThreads) row_w[b] = static_cast<float>(inv);
  if (threadIdx.x == 0) {
    loss[0] = static_cast<float>(agg == kTokenMean ? sh[0][0] * inv + kl_coef * (sh[1][0] * inv) : sh[0][0]);
    metrics[0] = static_cast<float>(sh[3][0] * inv);
    metrics[1] = static_cast<float>(sh[4][0] * inv);
    metrics[2] = static_cast<float>(sh[5][0] * inv);
    metrics[3] = static_cast<float>(sh[1][0] * inv);
  }
}

template <typename scalar_t, typename mask_t>
__global__ void grpo_loss_bwd_kernel(const float* __restrict__ grad_loss, const scalar_t* __restrict__ logp,
                                     const scalar_t* __restrict__ old, const scalar_t* __restrict__ ref,
                                     const float* __restrict__ adv, bool adv_per_token, const mask_t* __restrict__ mask,
                                     const float* __restrict__ row_w, int64_t B, int64_t T, Params p,
                                     scalar_t* __restrict__ dlogp) {
  const float g_up = grad_loss[0];
  const int64_t n = B * T;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / T;
    const float l = static_cast<float>(logp[i]);
    const float o = p.has_old ? static_cast<float>(old[i]) : l;
    const float r = p.has_ref ? static_cast<float>(ref[i]) : l;
    const float a = adv_per_token ? adv[i] : adv[b];
    const float m = static_cast<float>(mask[i]);
    // a masked-out token gets exactly 0, even where its terms are NaN/inf (select, not 0 * x)
    dlogp[i] = static_cast<scalar_t>(m == 0.f ? 0.f : (g_up * row_w[b]) * m * token_grad(l, o, r, a, p));
  }
}

// The per-token inputs as both launchers pass them: old and ref point at logp where absent (their
// terms are then skipped by p.has_old / p.has_ref).
template <typename scalar_t>
struct TokenInputs {
  const scalar_t *logp, *old, *ref;
  const float* adv;
  bool adv_per_token;
};

// launch(TokenInputs<scalar_t>, mask pointer) for logp's float type and mask's type (bool or float
// weights): the kernel templates are instantiated for each pair. (The dtypes are checked before, so
// the dispatch's own error, which would name "grpo_loss_cuda", never fires.)
template <typename F>
void dispatch_tokens(const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask,
                     const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp, F&& launch) {
  GRPO_DISPATCH_FLOAT(logp.scalar_type(), "grpo_loss_cuda", [&] {
    const scalar_t* lp = logp.const_data_ptr<scalar_t>();
    const TokenInputs<scalar_t> in{lp, old_logp.has_value() ? old_logp->const_data_ptr<scalar_t>() : lp,
                                   ref_logp.has_value() ? ref_logp->const_data_ptr<scalar_t>() : lp,
                                   advantages.const_data_ptr<float>(), advantages.dim() == 2};
    if (mask.scalar_type() == at::kBool)
      launch(in, mask.const_data_ptr<bool>());
    else
      launch(in, mask.const_data_ptr<float>());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_cuda(
    const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, std::optional<double> dual_clip,
    double kl_coef, c10::string_view kl_type, c10::string_view loss_agg) {
  check_inputs(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip);
  TORCH_CHECK_VALUE(logp.is_cuda(), "logp must be a CUDA tensor");
  const Params p = make_params(clip_low, clip_high, dual_clip, kl_coef, parse_kl_type(kl_type), old_logp.has_value(),
                               ref_logp.has_value());
  const int agg = parse_loss_agg(loss_agg);
  const c10::cuda::CUDAGuard guard(logp.device());
  const int64_t B = logp.size(0), T = logp.size(1);
  const auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor part = at::empty({kNumSums, std::max<int64_t>(B, 1)}, f32);
  at::Tensor loss = at::empty({}, f32), metrics = at::empty({4}, f32), row_w = at::empty({B}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (B > 0) {
    dispatch_tokens(logp, advantages, mask, old_logp, ref_logp, [&](auto in, auto m) {
      grpo_loss_fwd_rows_kernel<<<B, kThreads, 0, stream>>>(
          in.logp, in.old, in.ref, in.adv, in.adv_per_token, m, B, T, p, part.data_ptr<float>());
    });
  }
  grpo_loss_finalize_kernel<<<1, kThreads, 0, stream>>>(part.const_data_ptr<float>(), B, T,
                                                         ref_logp.has_value() ? kl_coef : 0.0, agg, loss.data_ptr<float>(),
                                                         metrics.data_ptr<float>(), row_w.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, metrics, row_w};
}

at::Tensor grpo_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& advantages,
                              const at::Tensor& mask, const std::optional<at::Tensor>& old_logp,
                              const std::optional<at::Tensor>& ref_logp, const at::Tensor& row_weight, double clip_low,
                              double clip_high, std::optional<double> dual_clip, double kl_coef,
                              c10::string_view kl_type) {
  check_inputs(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip);
  TORCH_CHECK_VALUE(logp.is_cuda(), "logp must be a CUDA tensor");
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat && grad_loss.device() == logp.device(),
                    "grad_loss must be one float32 value on logp's device");
  TORCH_CHECK_VALUE(row_weight.dim() == 1 && row_weight.size(0) == B && row_weight.scalar_type() == at::kFloat &&
                        row_weight.is_contiguous() && row_weight.device() == logp.device(),
                    "row_weight must be a contiguous float32 [B] on logp's device");
  const Params p = make_params(clip_low, clip_high, dual_clip, kl_coef, parse_kl_type(kl_type), old_logp.has_value(),
                               ref_logp.has_value());
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor dlogp = at::empty_like(logp);
  if (B * T == 0) return dlogp;
  const at::Tensor g = grad_loss.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((B * T + kThreads - 1) / kThreads, 65535);
  dispatch_tokens(logp, advantages, mask, old_logp, ref_logp, [&](auto in, auto m) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(in.logp)>>;
    grpo_loss_bwd_kernel<<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<float>(), in.logp, in.old, in.ref, in.adv, in.adv_per_token, m, row_weight.const_data_ptr<float>(),
        B, T, p, dlogp.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dlogp;
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  m.impl("grpo_loss_fwd", &grpo_loss_fwd_cuda);
  m.impl("grpo_loss_bwd", &grpo_loss_bwd_cuda);
}
