// One per-ISA build of the token_logprobs row kernels (token_logprobs_kernel.h) in namespace
// engine::TLP_NS, for token_logprobs_avx2.cpp and token_logprobs_avx512.cpp. The including file
// defines TLP_NS and, on x86-64 GCC, puts `#pragma GCC target(...)` and CPU_CAPABILITY(_<ISA>)
// before any header (they select ATen's Vectorized<float> width and its inline namespace).
// Elsewhere (aarch64, or clang, which ignores the target pragma) the variant is never selected at
// run time (token_logprobs.cpp picks the default build there): it forwards to tlp_default so that
// the library links.
#ifndef TLP_NS
#error "define TLP_NS (the variant's namespace) before including token_logprobs_isa.h"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "cpu/isa_features.h"
#include "cpu/token_logprobs_kernel.h"

#else
#include "cpu/token_logprobs_rows.h"

namespace engine::TLP_NS {
void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end) { tlp_default::fwd_rows(a, begin, end); }
void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end) { tlp_default::bwd_rows(a, begin, end); }
}  // namespace engine::TLP_NS
#endif

#undef TLP_NS
