// The feature macros of one per-ISA translation unit (token_logprobs_isa.h; the same block serves
// any kernel built per ISA). Included after `#pragma GCC target(...)` and CPU_CAPABILITY(_<ISA>),
// before any ATen header: the pragma enables the instructions but not the feature macros that
// headers (sleef.h, ATen's vec256 / vec512) test; this defines the ones -mavx512f -mavx512bw
// -mavx512vl -mavx512dq (CPU_CAPABILITY_AVX512 only) and -mavx2 -mfma -mf16c would.
// No include guard: each translation unit includes it once, on purpose.
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define __AVX__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
