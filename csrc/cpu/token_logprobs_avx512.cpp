// The token_logprobs row kernels built for AVX-512. Called only after token_logprobs.cpp has
// checked __builtin_cpu_supports("avx512f/bw/vl/dq"), so the build needs no -march flag.
// The target pragma and CPU_CAPABILITY must come before any header: they select ATen's 512-bit
// Vectorized<float> and put it in its own inline namespace (at::vec::AVX512). The rest (feature
// macros, the kernels, the fallback off x86-64 GCC) is token_logprobs_isa.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif

#define TLP_NS tlp_avx512
#include "cpu/token_logprobs_isa.h"
