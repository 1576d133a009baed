// token_logprobs on CUDA: one block per row, fp32 accumulation, warp-shuffle reductions.
// Rows are read (and the backward's grad written) in 16-byte vectors (float4-sized: 4 fp32 or
// 8 bf16/fp16 per load) where the row pointer is 16-byte aligned, with scalar loops for the
// unaligned head and the tail (split_row): an LM-head row of V = 151936 bf16 is 18992 vector loads.
//
// Forward: each thread keeps an online (m, S = sum e^(z-m), T = sum e^(z-m) (z-m)) over its strided
// share of the row; the block merges the triples (warp shuffles, then one warp over the warps).
// Outputs per row: logp = (z[id] - m) - log S, entropy = log S - T / S, stats = (m, log S).
// Backward: each element recomputes p = e^((z - m) - log S) and writes
// dz = p (base - g_ent (z - m)) + [j == id] g_logp, base = -g_logp + g_ent (log S - entropy),
// divided by the temperature; grad may alias logits (each element is read before it is written).
// A NaN in a row makes that row NaN (counted, not left to fmaxf, which drops NaN); -inf entries
// (masked vocabulary) add nothing and get a zero gradient.
// setup.py builds with --use_fast_math: divisions use __fdiv_rn (IEEE, as torch's logits / T; an
// approximate divide would move z by ulps) and the per-row log runs in double. expf becomes
// __expf there, whose error (a few ulp near 0) stays far below the fp32 rounding of the sums.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "token_logprobs_checks.h"

namespace engine {
namespace {

constexpr int kWarp = 32;

struct Online {
  float m;  // running max (-inf: nothing finite yet)
  float s;  // sum e^(z - m)
  float t;  // sum e^(z - m) (z - m)
};

__device__ __forceinline__ Online merge(Online a, Online b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};
  Online r{m, 0.f, 0.f};
  if (a.m != -INFINITY) {
    const float sh = a.m - m, sc = expf(sh);
    r.s += a.s * sc;
    r.t += sc * (a.t + sh * a.s);
  }
  if (b.m != -INFINITY) {
    const float sh = b.m - m, sc = expf(sh);
    r.s += b.s * sc;
    r.t += sc * (b.t + sh * b.s);
  }
  return r;
}

__device__ __forceinline__ Online push(Online a, float z) {
  if (z == -INFINITY) return a;  // masked entry: adds 0
  if (z > a.m) {
    const float sh = a.m - z;  // -inf when a is empty: its sums are 0 and stay 0
    const float sc = a.m == -INFINITY ? 0.f : expf(sh);
    const float t = a.m == -INFINITY ? 0.f : sc * (a.t + sh * a.s);
    return {z, a.s * sc + 1.f, t};  // the new max adds e^0 = 1 and (z - m) = 0
  }
  const float d = z - a.m, e = expf(d);
  return {a.m, a.s + e, a.t + e * d};
}

__device__ __forceinline__ Online warp_merge(Online v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Online o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
             __shfl_xor_sync(0xffffffffu, v.t, off)};
    v = merge(v, o);
  }
  return v;
}

// 16-byte vectors: 4 x fp32, 8 x bf16/fp16 (2 x fp64), loaded with one 128-bit instruction.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

// How a row splits into a scalar head (up to the first 16-byte boundary), a body of whole
// Vec16s, and a scalar tail. A row whose pointer is 16-byte aligned and whose length is a multiple
// of the vector width (the LM-head chunk buffer at V = 151936) is all body. `other` is the
// pointer that is written alongside (the backward's grad): when it sits at a different offset
// within 16 bytes, nothing can be vectorized for both and the whole row is head.
struct RowSplit {
  int64_t head, n_vec;  // body: n_vec vectors from element `head`; tail from head + n_vec * kN
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const void* row, const void* other, int64_t V) {
  constexpr int kN = Vec16<scalar_t>::kN;
  const uintptr_t a = reinterpret_cast<uintptr_t>(row), b = reinterpret_cast<uintptr_t>(other);
  if (a % sizeof(scalar_t) != 0 || a % 16 != b % 16) return {V, 0};
  const int64_t head = a % 16 == 0 ? 0 : static_cast<int64_t>((16 - a % 16) / sizeof(scalar_t));
  if (head >= V) return {V, 0};
  return {head, (V - head) / kN};
}

template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    const scalar_t* __restrict__ logits, int64_t row_stride, int64_t V, const int64_t* __restrict__ ids,
    float temperature, float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ stats) {
  constexpr int kN = Vec16<scalar_t>::kN;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  Online acc{-INFINITY, 0.f, 0.f};
  int has_nan = 0;
  auto take = [&](scalar_t raw) {
    const float z = __fdiv_rn(static_cast<float>(raw), temperature);
    has_nan |= isnan(z);
    if (!isnan(z)) acc = push(acc, z);
  };
  const RowSplit sp = split_row<scalar_t>(x, x, V);
  const int64_t body_end = sp.head + sp.n_vec * kN;
  for (int64_t j = threadIdx.x; j < sp.head; j += kThreads) take(x[j]);
  const Vec16<scalar_t>* xv = reinterpret_cast<const Vec16<scalar_t>*>(x + sp.head);
  for (int64_t k = threadIdx.x; k < sp.n_vec; k += kThreads) {
    const Vec16<scalar_t> v = xv[k];  // one 16-byte load
#pragma unroll
    for (int i = 0; i < kN; ++i) take(v.v[i]);
  }
  for (int64_t j = body_end + threadIdx.x; j < V; j += kThreads) take(x[j]);
  __shared__ float sm[kThreads / kWarp], ss[kThreads / kWarp], st[kThreads / kWarp];
  acc = warp_merge(acc);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    sm[warp] = acc.m;
    ss[warp] = acc.s;
    st[warp] = acc.t;
  }
  has_nan = __syncthreads_or(has_nan);
  if (warp == 0) {
    acc = lane < kThreads / kWarp ? Online{sm[lane], ss[lane], st[lane]} : Online{-INFINITY, 0.f, 0.f};
    acc = warp_merge(acc);
    if (lane == 0) {
      const float m = has_nan ? NAN : acc.m;
      const float log_s = static_cast<float>(log(static_cast<double>(acc.s)));
      const int64_t id = ids[row];
      const float z_id = (id >= 0 && id < V) ? __fdiv_rn(static_cast<float>(x[id]), temperature) : NAN;
      logp[row] = (z_id - m) - log_s;  // rounded as log_softmax rounds it
      stats[2 * row] = m;
      stats[2 * row + 1] = log_s;
      if (entropy != nullptr) entropy[row] = has_nan ? NAN : log_s - __fdiv_rn(acc.t, acc.s);
    }
  }
}

template <typename scalar_t, int kThreads>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    const scalar_t* logits, int64_t row_stride, scalar_t* grad, int64_t grad_row_stride, int64_t V,
    const int64_t* __restrict__ ids, float temperature, const float* __restrict__ stats,
    const float* __restrict__ entropy, const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  scalar_t* g = grad + row * grad_row_stride;
  const float m = stats[2 * row], log_s = stats[2 * row + 1];
  const float g_logp = grad_logp != nullptr ? grad_logp[row] : 0.f;
  const float g_ent = grad_entropy != nullptr ? grad_entropy[row] : 0.f;
  const float ent = grad_entropy != nullptr ? entropy[row] : 0.f;
  const float base = -g_logp + g_ent * (log_s - ent);
  // no finite max (a NaN row, or no finite logit): the whole row's gradient is NaN, as in the reference
  const float poison = (!isfinite(m) || isnan(log_s) || isnan(base)) ? NAN : 0.f;
  const int64_t id = ids[row];
  auto grad_of = [&](scalar_t raw, int64_t j) {
    const float d = __fdiv_rn(static_cast<float>(raw), temperature) - m;
    const float p = expf(d - log_s);
    float dz = p > 0.f ? p * (base - g_ent * d) : 0.f;  // masked entries: 0, not 0 * inf
    if (j == id) dz += g_logp;
    return static_cast<scalar_t>(__fdiv_rn(dz + poison, temperature));
  };
  constexpr int kN = Vec16<scalar_t>::kN;
  const RowSplit sp = split_row<scalar_t>(x, g, V);  // g at the same offset mod 16 (in place: g == x)
  const int64_t body_end = sp.head + sp.n_vec * kN;
  for (int64_t j = threadIdx.x; j < sp.head; j += kThreads) g[j] = grad_of(x[j], j);
  const Vec16<scalar_t>* xv = reinterpret_cast<const Vec16<scalar_t>*>(x + sp.head);
  Vec16<scalar_t>* gv = reinterpret_cast<Vec16<scalar_t>*>(g + sp.head);
  for (int64_t k = threadIdx.x; k < sp.n_vec; k += kThreads) {
    const Vec16<scalar_t> v = xv[k];  // read whole before written: safe in place
    Vec16<scalar_t> out;
    const int64_t j0 = sp.head + k * kN;
#pragma unroll
    for (int i = 0; i < kN; ++i) out.v[i] = grad_of(v.v[i], j0 + i);
    gv[k] = out;  // one 16-byte store
  }
  for (int64_t j = body_end + threadIdx.x; j < V; j += kThreads) g[j] = grad_of(x[j], j);
}

// The shared checks (token_logprobs_checks.h), and rows that fit one grid.
void check_inputs(const at::Tensor& logits, const at::Tensor& ids, double temperature) {
  engine_tlp::check_inputs(logits, ids, temperature);
  TORCH_CHECK_VALUE(logits.size(0) <= 2147483647LL, "logits has too many rows for one grid: ", logits.size(0));
}

// Large rows get more threads per block: enough loads in flight to stream the row.
template <typename F>
void with_threads(int64_t V, F&& launch) {
  if (V >= 8192) launch(std::integral_constant<int, 512>{});
  else launch(std::integral_constant<int, 256>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cuda(
    const at::Tensor& logits_in, const at::Tensor& ids, double temperature, bool return_entropy) {
  check_inputs(logits_in, ids, temperature);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = engine_tlp::unit_stride_rows(logits_in);
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const engine_tlp::FwdOutputs out = engine_tlp::empty_fwd_outputs(logits, return_entropy);
  if (N == 0) return out.tuple();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd_cuda", [&] {
    with_threads(V, [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      token_logprobs_fwd_kernel<scalar_t, kThreads><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), logits.stride(0), V, ids64.const_data_ptr<int64_t>(),
          static_cast<float>(temperature), out.logp.data_ptr<float>(), return_entropy ? out.entropy.data_ptr<float>() : nullptr,
          out.stats.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.tuple();
}

// grad = d/dlogits from the checked row inputs (engine_tlp::bwd_inputs); grad may be logits itself.
void bwd_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& ids, const engine_tlp::BwdInputs& in,
              double temperature) {
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  const at::Tensor ids64 = ids.to(at::kLong).contiguous();
  using engine_tlp::data;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd_cuda", [&] {
    with_threads(V, [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      token_logprobs_bwd_kernel<scalar_t, kThreads><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), logits.stride(0), grad.data_ptr<scalar_t>(), grad.stride(0), V,
          ids64.const_data_ptr<int64_t>(), static_cast<float>(temperature), data(in.stats), data(in.entropy),
          data(in.grad_logp), data(in.grad_entropy));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor token_logprobs_bwd_cuda(const at::Tensor& logits_in, const at::Tensor& ids, const at::Tensor& stats,
                                   const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                   const std::optional<at::Tensor>& grad_entropy, double temperature) {
  check_inputs(logits_in, ids, temperature);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = engine_tlp::unit_stride_rows(logits_in);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  bwd_into(logits, grad, ids, engine_tlp::bwd_inputs(logits, stats, entropy, grad_logp, grad_entropy), temperature);
  return grad;
}

void token_logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& stats,
                                     const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                     const std::optional<at::Tensor>& grad_entropy, double temperature) {
  check_inputs(logits, ids, temperature);
  engine_tlp::check_inplace(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  bwd_into(logits, logits, ids, engine_tlp::bwd_inputs(logits, stats, entropy, grad_logp, grad_entropy), temperature);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CUDA, m) {
  engine_tlp::register_kernels(m, &token_logprobs_fwd_cuda, &token_logprobs_bwd_cuda, &token_logprobs_bwd_inplace_cuda);
}

}  // namespace engine
