// The token_logprobs row kernels built for AVX2 + FMA, for CPUs without AVX-512. Called only after
// token_logprobs.cpp has checked __builtin_cpu_supports("avx2") and ("fma"), so the build needs no
// -march flag. The target pragma and CPU_CAPABILITY come before any header: they select ATen's
// 256-bit Vectorized<float> and put it in its own inline namespace (at::vec::AVX2).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// The pragma enables the instructions but not the feature macros that headers (sleef.h, ATen's
// vec256) test; define the ones -mavx2 -mfma -mf16c would.
#ifndef __AVX2__
#define __AVX2__ 1
#define __AVX__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif

#define TLP_NS tlp_avx2
#include "cpu/token_logprobs_kernel.h"
#undef TLP_NS

#else
// Not x86-64 GCC (e.g. aarch64, or clang, which ignores the target pragma): never selected at run
// time (token_logprobs.cpp picks the default build there), defined so that the library links.
#include "cpu/token_logprobs_rows.h"

namespace engine::tlp_avx2 {
void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end) { tlp_default::fwd_rows(a, begin, end); }
void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end) { tlp_default::bwd_rows(a, begin, end); }
}  // namespace engine::tlp_avx2
#endif
