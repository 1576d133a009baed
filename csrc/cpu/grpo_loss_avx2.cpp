// The grpo_loss item kernels built for AVX2 + FMA, for CPUs without AVX-512. Called only after
// grpo_loss.cpp has checked __builtin_cpu_supports("avx2") and ("fma"), so the build needs no
// -march flag. The target pragma and CPU_CAPABILITY come before any header: they select ATen's
// 256-bit Vectorized<float> and put it in its own inline namespace (at::vec::AVX2). The rest
// (feature macros, the kernels, the fallback off x86-64 GCC) is grpo_loss_isa.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#define GRPO_NS grpo_avx2
#include "cpu/grpo_loss_isa.h"
