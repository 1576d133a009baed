// Item kernels of grpo_loss, compiled once per CPU capability.
//
// Included (no include guard, on purpose) by grpo_loss.cpp (default build flags: plain C++ lanes on
// x86, NEON on aarch64) and by grpo_loss_avx2.cpp / grpo_loss_avx512.cpp (after `#pragma GCC target`
// and CPU_CAPABILITY). ATen's vec headers put Vectorized<float> in an inline namespace named by
// CPU_CAPABILITY, and the functions below live in a namespace named by GRPO_NS, so the copies never
// collide (ODR-safe). Only plain types cross this boundary (grpo_loss_rows.h).
//
// The per-token math is engine_grpo::token_terms_vec / token_grad_vec (csrc/grpo_math.h, beside the
// scalar functions they mirror); this file only moves data. Per item (row b, up to kGrpoChunk
// tokens), blocks of kBlock tokens: bf16/fp16 inputs and bool masks are widened into L1 float
// buffers (fp32 inputs are read in place), then Vec::size() tokens per step; the tail step loads
// zeros past the end (finite terms times mask 0 add nothing). Forward sums per lane in fp32 over one
// block (kBlock / Vec::size() adds), then adds each block's lane sums, reduced in a fixed tree, in
// double: the order depends on the build's vector width, never on the thread count.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/grpo_loss_rows.h"
#include "grpo_math.h"

namespace engine {
namespace GRPO_NS {

using Vec = at::vec::Vectorized<float>;
using engine_grpo::kNumSums;
using engine_grpo::Params;
constexpr int64_t kBlock = 512;  // tokens per block: 4 float buffers of 2 KiB stay in L1
static_assert(kGrpoChunk % kBlock == 0, "blocks tile an item");

// Vec::size() (or `count` < Vec::size(), zeros after) floats at p.
inline Vec load(const float* p, int64_t count) { return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count); }

// src[0:n] as floats: src itself for fp32, else dst[0:n] = float(src[0:n]).
template <typename T>
inline const float* widen(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else if constexpr (std::is_same_v<T, bool>) {
    // as bytes (a bool tensor holds 0 or 1): the compiler vectorizes uint8 -> float, not bool -> float
    const auto* bytes = reinterpret_cast<const uint8_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(bytes[i]);
    return dst;
  } else {
    using RVec = at::vec::Vectorized<T>;
    for (int64_t i = 0; i < n; i += RVec::size()) {
      const int64_t c = std::min<int64_t>(RVec::size(), n - i);
      const auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(src + i, c));
      lo.store(dst + i, std::min<int64_t>(c, Vec::size()));
      if (c > Vec::size()) hi.store(dst + i + Vec::size(), c - Vec::size());
    }
    return dst;
  }
}

// dst[0:n] = T(src[0:n]) (round to nearest even, as c10's conversions).
template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  using RVec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += RVec::size()) {
    const int64_t c = std::min<int64_t>(RVec::size(), n - i);
    const Vec lo = load(src + i, std::min<int64_t>(c, Vec::size()));
    const Vec hi = c > Vec::size() ? load(src + i + Vec::size(), c - Vec::size()) : Vec(0.f);
    at::vec::convert_from_float<T>(lo, hi).store(dst + i, c);
  }
}

inline double reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// The inputs of one block as float pointers (widened into `buf` where needed).
struct Block {
  const float *lp, *old, *ref, *adv, *mask;
  Vec adv_row;  // advantages[b] in every lane when they are per row
};

// Token lanes [i, i + c) of a block; old/ref are logp's lanes when absent (no second load).
struct Tokens {
  Vec l, o, r, m, adv;
};

inline Tokens load_tokens(const Block& k, const Params& p, int64_t i, int64_t c) {
  Tokens t;
  t.l = load(k.lp + i, c);
  t.o = p.has_old ? load(k.old + i, c) : t.l;
  t.r = p.has_ref ? load(k.ref + i, c) : t.l;
  t.m = load(k.mask + i, c);
  t.adv = k.adv ? load(k.adv + i, c) : k.adv_row;
  return t;
}

template <typename scalar_t, typename mask_t>
inline Block load_block(const GrpoArgs& a, int64_t b, int64_t off, int64_t n, float (*buf)[kBlock]) {
  const scalar_t* lp = static_cast<const scalar_t*>(a.logp) + off;
  Block k;
  k.lp = widen(lp, n, buf[0]);
  k.old = a.p.has_old ? widen(static_cast<const scalar_t*>(a.old) + off, n, buf[1]) : k.lp;
  k.ref = a.p.has_ref ? widen(static_cast<const scalar_t*>(a.ref) + off, n, buf[2]) : k.lp;
  k.mask = widen(static_cast<const mask_t*>(a.mask) + off, n, buf[3]);
  k.adv = a.adv_per_token ? a.adv + off : nullptr;
  k.adv_row = Vec(a.adv_per_token ? 0.f : a.adv[b]);
  return k;
}

template <typename scalar_t, typename mask_t>
void fwd_impl(const GrpoArgs& a, int64_t begin, int64_t end, double* partials) {
  alignas(64) float buf[4][kBlock];
  const Vec zero(0.f);
  const int64_t nchunk = (a.T + kGrpoChunk - 1) / kGrpoChunk;
  const Params& p = a.p;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / nchunk, t0 = (item % nchunk) * kGrpoChunk, n_item = std::min(kGrpoChunk, a.T - t0);
    double s[kNumSums] = {0, 0, 0, 0, 0, 0};
    for (int64_t j0 = 0; j0 < n_item; j0 += kBlock) {
      const int64_t n = std::min(kBlock, n_item - j0);
      const Block k = load_block<scalar_t, mask_t>(a, b, b * a.T + t0 + j0, n, buf);
      Vec s_pg(0.f), s_kl(0.f), s_m(0.f), s_hi(0.f), s_lo(0.f), s_ppo(0.f);
      auto step = [&](int64_t i, int64_t c) {
        const Tokens x = load_tokens(k, p, i, c);
        const Vec m = x.m;
        const auto t = engine_grpo::token_terms_vec(x.l, x.o, x.r, x.adv, p);
        // a masked-out token adds exactly 0, even where its terms are NaN/inf (select, not 0 * x)
        const Vec on = m != zero;
        s_pg = s_pg + Vec::blendv(zero, t.pg * m, on);
        s_kl = s_kl + Vec::blendv(zero, t.kl * m, on);
        s_m = s_m + m;
        s_hi = s_hi + Vec::blendv(zero, t.high * m, on);
        s_lo = s_lo + Vec::blendv(zero, t.low * m, on);
        s_ppo = s_ppo + Vec::blendv(zero, t.ppo * m, on);
      };
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) step(i, Vec::size());
      if (i < n) step(i, n - i);
      s[0] += reduce_sum(s_pg);
      s[1] += reduce_sum(s_kl);
      s[2] += reduce_sum(s_m);
      s[3] += reduce_sum(s_hi);
      s[4] += reduce_sum(s_lo);
      s[5] += reduce_sum(s_ppo);
    }
    for (int j = 0; j < kNumSums; ++j) partials[item * kNumSums + j] = s[j];
  }
}

template <typename scalar_t, typename mask_t>
void bwd_impl(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end) {
  alignas(64) float buf[4][kBlock];
  alignas(64) float out[kBlock];
  const Vec zero(0.f);
  const int64_t nchunk = (a.T + kGrpoChunk - 1) / kGrpoChunk;
  const Params& p = a.p;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / nchunk, t0 = (item % nchunk) * kGrpoChunk, n_item = std::min(kGrpoChunk, a.T - t0);
    const Vec c_row(grad_loss * row_weight[b]);
    for (int64_t j0 = 0; j0 < n_item; j0 += kBlock) {
      const int64_t n = std::min(kBlock, n_item - j0), off = b * a.T + t0 + j0;
      const Block k = load_block<scalar_t, mask_t>(a, b, off, n, buf);
      // fp32 gradients go straight to dlogp, others through `out` and one narrowing pass
      float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dlogp) + off : out;
      auto step = [&](int64_t i, int64_t c) {
        const Tokens x = load_tokens(k, p, i, c);
        // a masked-out token gets exactly 0, even where its terms are NaN/inf (select, not 0 * x)
        Vec::blendv(zero, c_row * x.m * engine_grpo::token_grad_vec(x.l, x.o, x.r, x.adv, p), x.m != zero).store(dst + i, c);
      };
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) step(i, Vec::size());
      if (i < n) step(i, n - i);
      if constexpr (!std::is_same_v<scalar_t, float>) narrow(out, static_cast<scalar_t*>(dlogp) + off, n);
    }
  }
}

// f(scalar_t* tag, mask_t* tag) for the dtype and mask kind of `a` (null pointers: types only).
template <typename scalar_t, typename F>
inline void with_mask(const GrpoArgs& a, F&& f) {
  if (a.mask_bool)
    f(static_cast<scalar_t*>(nullptr), static_cast<bool*>(nullptr));
  else
    f(static_cast<scalar_t*>(nullptr), static_cast<float*>(nullptr));
}

template <typename F>
inline void dispatch(const GrpoArgs& a, F&& f) {
  switch (a.dtype) {
    case GrpoDtype::kFloat: return with_mask<float>(a, f);
    case GrpoDtype::kBFloat16: return with_mask<c10::BFloat16>(a, f);
    case GrpoDtype::kHalf: return with_mask<c10::Half>(a, f);
  }
}

void fwd_items(const GrpoArgs& a, int64_t begin, int64_t end, double* partials) {
  dispatch(a, [&](auto* s, auto* m) {
    fwd_impl<std::remove_pointer_t<decltype(s)>, std::remove_pointer_t<decltype(m)>>(a, begin, end, partials);
  });
}

void bwd_items(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end) {
  dispatch(a, [&](auto* s, auto* m) {
    bwd_impl<std::remove_pointer_t<decltype(s)>, std::remove_pointer_t<decltype(m)>>(a, grad_loss, row_weight, dlogp,
                                                                                      begin, end);
  });
}

}  // namespace GRPO_NS
}  // namespace engine
