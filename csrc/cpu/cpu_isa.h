// Which per-ISA build of a CPU kernel to run (token_logprobs.cpp; any op with *_avx2.cpp /
// *_avx512.cpp variants): the best this CPU supports, capped by ATEN_CPU_CAPABILITY=default|avx2
// as ATen caps its own kernels. Read once per process. The variants are built only on x86-64 GCC
// (clang ignores the target pragma); elsewhere this is always kDefault.
#pragma once

#include <cstdlib>
#include <cstring>

namespace engine_cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa best_isa() {
  static const Isa best = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    const bool cap_default = forced && std::strcmp(forced, "default") == 0;
    const bool cap_avx2 = forced && std::strcmp(forced, "avx2") == 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // where the variants are built
    __builtin_cpu_init();
    // f16c too: the AVX2 builds' target pragma enables it (fp16 loads)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    const bool avx2 = false, avx512 = false;
#endif
    if (cap_default || !avx2) return Isa::kDefault;
    return avx512 && !cap_avx2 ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return best;
}

}  // namespace engine_cpu
