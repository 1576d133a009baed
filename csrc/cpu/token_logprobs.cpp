// token_logprobs on CPU: argument checks, dtype/capability dispatch, threads over rows.
// The row kernels are in token_logprobs_kernel.h, built here with the default flags and in
// token_logprobs_avx512.cpp / token_logprobs_avx2.cpp for those instruction sets, chosen at run
// time; ATEN_CPU_CAPABILITY=default|avx2 caps the choice, as it does for ATen.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#define TLP_NS tlp_default
#include "cpu/token_logprobs_kernel.h"
#undef TLP_NS

namespace engine {
namespace {

enum class Capability { kDefault, kAvx2, kAvx512 };

Capability capability() {
  static const Capability cap = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    const bool cap_default = forced && std::strcmp(forced, "default") == 0;
    const bool cap_avx2 = forced && std::strcmp(forced, "avx2") == 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // where the variants are built
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    const bool avx2 = false, avx512 = false;
#endif
    if (cap_default || !avx2) return Capability::kDefault;
    return avx512 && !cap_avx2 ? Capability::kAvx512 : Capability::kAvx2;
  }();
  return cap;
}

void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end) {
  switch (capability()) {
    case Capability::kAvx512: return tlp_avx512::fwd_rows(a, begin, end);
    case Capability::kAvx2: return tlp_avx2::fwd_rows(a, begin, end);
    default: return tlp_default::fwd_rows(a, begin, end);
  }
}

void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end) {
  switch (capability()) {
    case Capability::kAvx512: return tlp_avx512::bwd_rows(a, begin, end);
    case Capability::kAvx2: return tlp_avx2::bwd_rows(a, begin, end);
    default: return tlp_default::bwd_rows(a, begin, end);
  }
}

TlpDtype dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return TlpDtype::kFloat;
    case at::kBFloat16: return TlpDtype::kBFloat16;
    case at::kHalf: return TlpDtype::kHalf;
    default: TORCH_CHECK_VALUE(false, "logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return TlpDtype::kFloat;
}

// A fresh [N, V] gradient is mostly page faults: at 4096 x 32000 fp32, touching its 128K small
// pages cost more than the kernel itself. Asking for transparent huge pages on the untouched
// buffer (the 2 MiB-aligned interior) cuts that ~4x where THP is in "madvise" mode; elsewhere
// it is a no-op.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t nbytes = t.nbytes();
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: ignore failure
#endif
}

// Rows per task: enough work (~64K entries) to amortize a task, at least one row.
int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Checks logits [N, V] / ids [N] and returns ids as contiguous int64 after a range check.
at::Tensor check_inputs(const at::Tensor& logits, const at::Tensor& ids, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "logits must be a float tensor, got ", logits.scalar_type());
  dtype_code(logits);
  TORCH_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D [N], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                    "ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(0) == logits.size(0), "ids must have shape [", logits.size(0),
                    "] (one id per row of logits), got ", ids.sizes());
  TORCH_CHECK_VALUE(ids.device() == logits.device(), "ids is on ", ids.device(), " but logits is on ", logits.device());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have a non-empty vocabulary dim, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be positive and finite, got ", temperature);
  at::Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t V = logits.size(1);
  const int64_t* p = ids64.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = ids64.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "ids holds ", p[i], " at row ", i, ", outside the vocabulary [0, ", V, ")");
  }
  return ids64;
}

// Upstream grad of a per-row output as a contiguous fp32 [N] (or nullopt).
std::optional<at::Tensor> row_grad(const std::optional<at::Tensor>& g, int64_t N, const char* name) {
  if (!g.has_value() || !g->defined()) return std::nullopt;
  TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == N, name, " must have shape [", N, "], got ", g->sizes());
  return g->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(
    const at::Tensor& logits_in, const at::Tensor& ids, double temperature, bool return_entropy) {
  at::Tensor ids64 = check_inputs(logits_in, ids, temperature);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  at::Tensor entropy = at::empty({return_entropy ? N : 0}, opts);
  TlpFwdArgs a{dtype_code(logits), logits.const_data_ptr(), logits.stride(0), V, ids64.const_data_ptr<int64_t>(),
               static_cast<float>(temperature), logp.data_ptr<float>(), stats.data_ptr<float>(),
               return_entropy ? entropy.data_ptr<float>() : nullptr};
  at::parallel_for(0, N, grain(V), [&](int64_t b, int64_t e) { fwd_rows(a, b, e); });
  return {logp, entropy, stats};
}

void bwd_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& ids64, const at::Tensor& stats,
              const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
              const std::optional<at::Tensor>& grad_entropy, double temperature) {
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 2 && stats.scalar_type() == at::kFloat,
                    "stats must be float32 [", N, ", 2] (from token_logprobs_fwd), got ", stats.scalar_type(), " ",
                    stats.sizes());
  auto g_logp = row_grad(grad_logp, N, "grad_logp");
  auto g_ent = row_grad(grad_entropy, N, "grad_entropy");
  if (g_ent) {
    TORCH_CHECK_VALUE(entropy.dim() == 1 && entropy.size(0) == N && entropy.scalar_type() == at::kFloat,
                      "entropy must be float32 [", N, "] when grad_entropy is given, got ", entropy.sizes());
  }
  at::Tensor stats_c = stats.contiguous();
  at::Tensor ent_c = g_ent ? entropy.contiguous() : at::Tensor();
  TlpBwdArgs a{dtype_code(logits), logits.const_data_ptr(), logits.stride(0), grad.data_ptr(), grad.stride(0), V,
               ids64.const_data_ptr<int64_t>(), static_cast<float>(temperature), stats_c.const_data_ptr<float>(),
               g_ent ? ent_c.const_data_ptr<float>() : nullptr, g_logp ? g_logp->const_data_ptr<float>() : nullptr,
               g_ent ? g_ent->const_data_ptr<float>() : nullptr};
  at::parallel_for(0, N, grain(V), [&](int64_t b, int64_t e) { bwd_rows(a, b, e); });
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& ids, const at::Tensor& stats,
                                  const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                  const std::optional<at::Tensor>& grad_entropy, double temperature) {
  at::Tensor ids64 = check_inputs(logits_in, ids, temperature);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(grad);
  bwd_into(logits, grad, ids64, stats, entropy, grad_logp, grad_entropy, temperature);
  return grad;
}

// Overwrites logits with their gradient: the fused LM head's backward reuses its chunk buffer.
void token_logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& stats,
                                    const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, double temperature) {
  at::Tensor ids64 = check_inputs(logits, ids, temperature);
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "logits must have a contiguous last dim for the in-place backward");
  bwd_into(logits, logits, ids64, stats, entropy, grad_logp, grad_entropy, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
  m.impl("token_logprobs_bwd_inplace", &token_logprobs_bwd_inplace_cpu);
}

}  // namespace engine
