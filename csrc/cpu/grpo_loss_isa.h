// One per-ISA build of the grpo_loss item kernels (grpo_loss_kernel.h) in namespace engine::GRPO_NS,
// for grpo_loss_avx2.cpp and grpo_loss_avx512.cpp. The including file defines GRPO_NS and, on
// x86-64 GCC, puts `#pragma GCC target(...)` and CPU_CAPABILITY(_<ISA>) before any header (they
// select ATen's Vectorized<float> width and its inline namespace). Elsewhere (aarch64, or clang,
// which ignores the target pragma) the variant is never selected at run time (grpo_loss.cpp picks
// the default build there, which is NEON on aarch64): it forwards to grpo_default so that the
// library links. (The same scheme as token_logprobs_isa.h.)
#ifndef GRPO_NS
#error "define GRPO_NS (the variant's namespace) before including grpo_loss_isa.h"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "cpu/isa_features.h"

#include "cpu/grpo_loss_kernel.h"

#else
#include "cpu/grpo_loss_rows.h"

namespace engine::GRPO_NS {
void fwd_items(const GrpoArgs& a, int64_t begin, int64_t end, double* partials) {
  grpo_default::fwd_items(a, begin, end, partials);
}
void bwd_items(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end) {
  grpo_default::bwd_items(a, grad_loss, row_weight, dlogp, begin, end);
}
}  // namespace engine::GRPO_NS
#endif

#undef GRPO_NS
