// Row kernels of token_logprobs, compiled once per CPU capability.
//
// Included (no include guard, on purpose) by token_logprobs.cpp (default build flags) and by
// token_logprobs_avx512.cpp / token_logprobs_avx2.cpp (after `#pragma GCC target` and
// CPU_CAPABILITY). ATen's vec headers put Vectorized<float> in an inline namespace named by
// CPU_CAPABILITY, and the functions below live in a namespace named by TLP_NS, so the copies
// never collide (ODR-safe).
// Only plain types cross this boundary: the caller (token_logprobs.cpp) owns tensors, checks
// and at::parallel_for, and calls [begin, end) row ranges.
//
// Per row (z = logits / temperature): online logsumexp over blocks of kBlock entries, each block read
// from memory once into an L1 buffer (converted to fp32), then its max, then exp sums.
// Running state: m (max so far), S = sum exp(z - m), T = sum exp(z - m) * (z - m), kept per SIMD
// lane and rescaled when m grows. lse = m + log S; entropy = log S - T / S (no cancellation
// against the logits' offset, unlike lse - sum p*z). m and log S are returned apart (stats)
// so that backward rounds z - lse as log_softmax does.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/token_logprobs_rows.h"

namespace engine {
namespace TLP_NS {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: stays in L1 between the two sweeps of a block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// dst[0:n] = float(src[0:n]) / temperature; dst[n:round_up(n, Vec::size())] = -inf (neutral
// padding). A true division, not a multiply by 1/temperature: that would round twice and differ
// from logits / temperature by an ulp; at temperature 1 the division is skipped.
template <typename scalar_t>
inline int64_t load_block(const scalar_t* src, float* dst, int64_t n, float temperature) {
  const bool scale = temperature != 1.f;
  const Vec vt(temperature);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (scale) {
      for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) / vt).store(dst + i);
    } else {
      for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(src + i).store(dst + i);
    }
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
      if (scale) {
        lo = lo / vt;
        hi = hi / vt;
      }
      lo.store(dst + i);
      hi.store(dst + i + Vec::size());
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) / temperature;
  const int64_t padded = (n + Vec::size() - 1) / Vec::size() * Vec::size();
  for (; i < padded; ++i) dst[i] = kNegInf;
  return padded;
}

// dst[0:n] = scalar_t(src[0:n]).
template <typename scalar_t>
inline void store_block(const float* src, scalar_t* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(src + i).store(dst + i);
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size())).store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

template <typename scalar_t, bool kEntropy>
void fwd_rows_impl(const TlpFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  const Vec zero(0.f);
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = logits + r * a.row_stride;
    float m = kNegInf;
    Vec vS(0.f), vT(0.f);
    for (int64_t j0 = 0; j0 < a.V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, a.V - j0);
      const int64_t padded = load_block(row + j0, buf, n, a.temperature);
      Vec vmax(kNegInf);
      for (int64_t i = 0; i < padded; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(buf + i));
      const float bm = reduce_max(vmax);
      const float new_m = std::isnan(bm) ? bm : std::max(m, bm);
      if (new_m == kNegInf) continue;  // everything so far is masked: S = T = 0 stays exact
      if (new_m != m && m != kNegInf) {
        // rescale the running sums to the new max: S' = S e^(m-m'), T' = e^(m-m') (T + (m-m') S)
        const Vec scale(std::exp(m - new_m)), shift(m - new_m);
        if constexpr (kEntropy) vT = scale * (vT + shift * vS);
        vS = vS * scale;
      }
      m = new_m;
      const Vec vm(m);
      for (int64_t i = 0; i < padded; i += Vec::size()) {
        const Vec d = Vec::loadu(buf + i) - vm;
        const Vec e = d.exp_u20();
        vS = vS + e;
        if constexpr (kEntropy) {
          // masked entries (d = -inf, e = 0) add 0, not 0 * -inf = NaN
          vT = vT + Vec::blendv(zero, e * d, e != zero);
        }
      }
    }
    const float S = reduce_sum(vS);
    const float logS = std::log(S);
    // a NaN anywhere in the row makes m NaN: the whole row's outputs are NaN, no other row.
    // logp = (z_id - m) - log S, rounded as log_softmax rounds it (not z_id - (m + log S)).
    const int64_t id = a.ids[r];
    a.stats[2 * r] = m;
    a.stats[2 * r + 1] = logS;
    a.logp[r] = (static_cast<float>(row[id]) / a.temperature - m) - logS;
    if constexpr (kEntropy) a.entropy[r] = std::isnan(m) ? m : logS - reduce_sum(vT) / S;
  }
}

template <typename scalar_t>
void bwd_rows_impl(const TlpBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  auto* grad = static_cast<scalar_t*>(a.grad);
  const Vec zero(0.f);
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = logits + r * a.row_stride;
    scalar_t* grow = grad + r * a.grad_row_stride;
    const float m = a.stats[2 * r], logS = a.stats[2 * r + 1];
    const float g_logp = a.grad_logp ? a.grad_logp[r] : 0.f;
    const float g_ent = a.grad_entropy ? a.grad_entropy[r] : 0.f;
    const float ent = a.grad_entropy ? a.entropy[r] : 0.f;
    // With d = z - m and p = e^(d - log S) (the softmax, rounded as torch rounds it):
    // dz_j = p_j (base - g_ent d_j) + [j == id] g_logp, base = -g_logp + g_ent (log S - entropy),
    // i.e. g_logp (onehot - p) + g_ent p (lse - entropy - z). dlogits = dz / temperature
    // (divided, as autograd does, not multiplied by 1/temperature).
    const float base = -g_logp + g_ent * (logS - ent);
    // a NaN row (m NaN), or one with no finite logit (m = +-inf), has NaN gradients, as in the
    // reference, whatever exp_u20 makes of NaN inputs
    const float poison = !std::isfinite(m) || std::isnan(logS) || std::isnan(base) ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    const Vec vm(m), vlogS(logS), vbase(base), vgent(g_ent), vt(a.temperature), vpoison(poison);
    const int64_t id = a.ids[r];
    // read the id's logit before the row is overwritten (grad may alias logits)
    const float d_id = static_cast<float>(row[id]) / a.temperature - m;
    for (int64_t j0 = 0; j0 < a.V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, a.V - j0);
      const int64_t padded = load_block(row + j0, buf, n, a.temperature);
      for (int64_t i = 0; i < padded; i += Vec::size()) {
        const Vec d = Vec::loadu(buf + i) - vm;
        const Vec p = (d - vlogS).exp();
        // masked entries (p = 0, d = -inf) get 0, not 0 * inf
        const Vec dz = Vec::blendv(zero, p * (vbase - vgent * d), p != zero);
        ((dz + vpoison) / vt).store(buf + i);
      }
      if (id >= j0 && id < j0 + n) {
        const float p_id = std::exp(d_id - logS);
        const float dz_id = (p_id > 0.f ? p_id * (base - g_ent * d_id) : 0.f) + g_logp + poison;
        buf[id - j0] = dz_id / a.temperature;
      }
      store_block(buf, grow + j0, n);
    }
  }
}

void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
#define TLP_CASE(code, T)                                                   \
  case code:                                                                \
    if (a.entropy) fwd_rows_impl<T, true>(a, begin, end);                   \
    else fwd_rows_impl<T, false>(a, begin, end);                            \
    break;
    TLP_CASE(TlpDtype::kFloat, float)
    TLP_CASE(TlpDtype::kBFloat16, c10::BFloat16)
    TLP_CASE(TlpDtype::kHalf, c10::Half)
#undef TLP_CASE
  }
}

void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case TlpDtype::kFloat: bwd_rows_impl<float>(a, begin, end); break;
    case TlpDtype::kBFloat16: bwd_rows_impl<c10::BFloat16>(a, begin, end); break;
    case TlpDtype::kHalf: bwd_rows_impl<c10::Half>(a, begin, end); break;
  }
}

}  // namespace TLP_NS
}  // namespace engine
