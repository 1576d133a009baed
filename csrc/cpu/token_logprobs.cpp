// token_logprobs on CPU: argument checks, dtype/capability dispatch, threads over rows.
// The row kernels are in token_logprobs_kernel.h, built here with the default flags and in
// token_logprobs_avx512.cpp / token_logprobs_avx2.cpp for those instruction sets, chosen at run
// time (cpu/cpu_isa.h); ATEN_CPU_CAPABILITY=default|avx2 caps the choice, as it does for ATen.
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
#include "cpu/cpu_isa.h"
#include "token_logprobs_checks.h"

namespace engine {
namespace {

using engine_cpu::Isa;

void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end) {
  switch (engine_cpu::best_isa()) {
    case Isa::kAvx512: return tlp_avx512::fwd_rows(a, begin, end);
    case Isa::kAvx2: return tlp_avx2::fwd_rows(a, begin, end);
    default: return tlp_default::fwd_rows(a, begin, end);
  }
}

void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end) {
  switch (engine_cpu::best_isa()) {
    case Isa::kAvx512: return tlp_avx512::bwd_rows(a, begin, end);
    case Isa::kAvx2: return tlp_avx2::bwd_rows(a, begin, end);
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

// The shared checks (token_logprobs_checks.h), then ids as contiguous int64 after a range check.
at::Tensor check_inputs(const at::Tensor& logits, const at::Tensor& ids, double temperature) {
  engine_tlp::check_inputs(logits, ids, temperature);
  at::Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t V = logits.size(1);
  const int64_t* p = ids64.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = ids64.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < V, "ids holds ", p[i], " at row ", i, ", outside the vocabulary [0, ", V, ")");
  }
  return ids64;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(
    const at::Tensor& logits_in, const at::Tensor& ids, double temperature, bool return_entropy) {
  at::Tensor ids64 = check_inputs(logits_in, ids, temperature);
  const at::Tensor logits = engine_tlp::unit_stride_rows(logits_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const engine_tlp::FwdOutputs out = engine_tlp::empty_fwd_outputs(logits, return_entropy);
  TlpFwdArgs a{dtype_code(logits), logits.const_data_ptr(), logits.stride(0), V, ids64.const_data_ptr<int64_t>(),
               static_cast<float>(temperature), out.logp.data_ptr<float>(), out.stats.data_ptr<float>(),
               return_entropy ? out.entropy.data_ptr<float>() : nullptr};
  at::parallel_for(0, N, grain(V), [&](int64_t b, int64_t e) { fwd_rows(a, b, e); });
  return out.tuple();
}

// grad = d/dlogits from the checked row inputs (engine_tlp::bwd_inputs); grad may be logits itself.
void bwd_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& ids64, const engine_tlp::BwdInputs& in,
              double temperature) {
  const int64_t N = logits.size(0), V = logits.size(1);
  using engine_tlp::data;
  TlpBwdArgs a{dtype_code(logits), logits.const_data_ptr(), logits.stride(0), grad.data_ptr(), grad.stride(0), V,
               ids64.const_data_ptr<int64_t>(), static_cast<float>(temperature), data(in.stats), data(in.entropy),
               data(in.grad_logp), data(in.grad_entropy)};
  at::parallel_for(0, N, grain(V), [&](int64_t b, int64_t e) { bwd_rows(a, b, e); });
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& ids, const at::Tensor& stats,
                                  const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                  const std::optional<at::Tensor>& grad_entropy, double temperature) {
  at::Tensor ids64 = check_inputs(logits_in, ids, temperature);
  const at::Tensor logits = engine_tlp::unit_stride_rows(logits_in);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(grad);
  bwd_into(logits, grad, ids64, engine_tlp::bwd_inputs(logits, stats, entropy, grad_logp, grad_entropy), temperature);
  return grad;
}

// Overwrites logits with their gradient: the fused LM head's backward reuses its chunk buffer.
void token_logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& stats,
                                    const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, double temperature) {
  at::Tensor ids64 = check_inputs(logits, ids, temperature);
  engine_tlp::check_inplace(logits);
  bwd_into(logits, logits, ids64, engine_tlp::bwd_inputs(logits, stats, entropy, grad_logp, grad_entropy), temperature);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  engine_tlp::register_kernels(m, &token_logprobs_fwd_cpu, &token_logprobs_bwd_cpu, &token_logprobs_bwd_inplace_cpu);
}

}  // namespace engine
