// grpo_loss on CPU: grpo_loss_fwd, grpo_loss_bwd (schemas in csrc/ops.cpp; contract:
// docs/ops.md#grpo_loss).
//
// grpo_loss_fwd: one pass over the tokens. Work items are (row, chunk of kChunk tokens); each item
// writes its six masked sums (pg, kl, mask, clip-high hits, dual-clip hits, old - logp) to a buffer,
// then one thread sums the buffer in a fixed order (chunks, then rows, in double). No item depends
// on how items are spread over threads, so results are bitwise identical for any thread count.
// grpo_loss_bwd: one elementwise pass, dlogp = g * row_weight[b] * mask * (dpg + kl_coef * dkl),
// recomputing the per-token terms (cheaper than writing and re-reading them).
//
// Per-token math: csrc/grpo_math.h (shared with csrc/cuda/grpo_loss.cu), used as is by the scalar
// path. Inner loops: AVX-512 intrinsics (16 tokens per step, masked loads for the tail, a
// Cephes-style exp accurate to about 1 ulp) in functions compiled for AVX-512 with a target
// attribute and taken only after a runtime CPU check; elsewhere the scalar loop. The extension is
// built without -march flags, so both paths live in this one portable file (about 400 lines: the
// vector path is most of it and belongs beside the scalar one it must agree with).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "grpo_math.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace {

constexpr int64_t kChunk = 2048;  // tokens per work item (a multiple of 16)
using namespace engine_grpo;  // kNumSums, Params, check_inputs, token_terms, token_grad (csrc/grpo_math.h)

// ---------------------------------------------------------------- scalar path (any CPU)

template <typename scalar_t, typename mask_t>
void fwd_item_scalar(const scalar_t* lp, const scalar_t* old, const scalar_t* ref, const float* adv, int64_t adv_step,
                     const mask_t* mask, int64_t n, const Params& p, float* out) {
  double s[kNumSums] = {0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    const float l = static_cast<float>(lp[i]);
    const float o = p.has_old ? static_cast<float>(old[i]) : l;
    const float r = p.has_ref ? static_cast<float>(ref[i]) : l;
    const float m = static_cast<float>(mask[i]);
    const TokenTerms t = token_terms(l, o, r, adv[i * adv_step], p);
    s[0] += t.pg * m;
    s[1] += t.kl * m;
    s[2] += m;
    s[3] += t.high * m;
    s[4] += t.low * m;
    s[5] += t.ppo * m;
  }
  for (int k = 0; k < kNumSums; ++k) out[k] = static_cast<float>(s[k]);
}

template <typename scalar_t, typename mask_t>
void bwd_item_scalar(const scalar_t* lp, const scalar_t* old, const scalar_t* ref, const float* adv, int64_t adv_step,
                     const mask_t* mask, int64_t n, const Params& p, float c, scalar_t* dlp) {
  for (int64_t i = 0; i < n; ++i) {
    const float l = static_cast<float>(lp[i]);
    const float o = p.has_old ? static_cast<float>(old[i]) : l;
    const float r = p.has_ref ? static_cast<float>(ref[i]) : l;
    const float m = static_cast<float>(mask[i]);
    dlp[i] = static_cast<scalar_t>(c * m * token_grad(l, o, r, adv[i * adv_step], p));
  }
}

// ---------------------------------------------------------------- AVX-512 path

#if defined(__x86_64__) && defined(__GNUC__)
#define GRPO_HAVE_AVX512 1
#define GRPO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  // ENGINE_GRPO_SCALAR=1 takes the portable scalar path (read per call, so tests can test both)
  const char* force_scalar = std::getenv("ENGINE_GRPO_SCALAR");
  return ok && !(force_scalar != nullptr && force_scalar[0] == '1');
}

// exp(x) for x in [-88, 88]: x = n ln2 + r, |r| <= ln2/2, Cephes expf polynomial, 2^n by scalef.
GRPO_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

GRPO_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
GRPO_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
GRPO_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
GRPO_AVX512 inline __m512 load16(const bool* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

GRPO_AVX512 inline void store16(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
GRPO_AVX512 inline void store16(c10::Half* p, __mmask16 k, __m512 v) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
GRPO_AVX512 inline void store16(c10::BFloat16* p, __mmask16 k, __m512 v) {
  // round to nearest even, as c10::BFloat16(float); NaN stays a quiet NaN
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}

GRPO_AVX512 inline __m512 clamp16(__m512 x, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}

// Per-token policy terms for 16 tokens: pg (after the dual clip), the clip masks, and the gradient.
struct Pg16 {
  __m512 pg;
  __mmask16 high, low;
};

GRPO_AVX512 inline Pg16 pg16(__m512 lr, __m512 a, const Params& p, __m512* grad) {
  const __m512 ratio = exp16(clamp16(lr, -20.f, 20.f));
  const __m512 na = _mm512_sub_ps(_mm512_setzero_ps(), a);
  const __m512 pg1 = _mm512_mul_ps(na, ratio);
  const __m512 pg2 = _mm512_mul_ps(na, clamp16(ratio, p.lo, p.hi));
  Pg16 out;
  out.pg = _mm512_max_ps(pg1, pg2);
  out.high = _mm512_cmp_ps_mask(pg1, pg2, _CMP_LT_OQ);
  out.low = 0;
  __m512 g = _mm512_setzero_ps();
  if (grad != nullptr) {
    const __mmask16 lr_in = _mm512_cmp_ps_mask(lr, _mm512_set1_ps(-20.f), _CMP_GE_OQ) &
                            _mm512_cmp_ps_mask(lr, _mm512_set1_ps(20.f), _CMP_LE_OQ);
    const __m512 g1 = _mm512_maskz_mov_ps(lr_in, _mm512_mul_ps(na, ratio));
    const __mmask16 r_in = _mm512_cmp_ps_mask(ratio, _mm512_set1_ps(p.lo), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(ratio, _mm512_set1_ps(p.hi), _CMP_LE_OQ);
    const __m512 g2 = _mm512_maskz_mov_ps(r_in, g1);
    const __mmask16 gt = _mm512_cmp_ps_mask(pg1, pg2, _CMP_GT_OQ);
    const __mmask16 eq = _mm512_cmp_ps_mask(pg1, pg2, _CMP_EQ_OQ);
    g = _mm512_mask_mov_ps(g2, gt, g1);
    g = _mm512_mask_mov_ps(g, eq, _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(g1, g2)));
  }
  if (p.has_dual) {
    const __mmask16 neg = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 pg3 = _mm512_mul_ps(na, _mm512_set1_ps(p.dual));
    out.low = neg & _mm512_cmp_ps_mask(out.pg, pg3, _CMP_GT_OQ);
    if (grad != nullptr) {
      const __mmask16 tie = neg & _mm512_cmp_ps_mask(out.pg, pg3, _CMP_EQ_OQ);
      g = _mm512_mask_mov_ps(g, tie, _mm512_mul_ps(_mm512_set1_ps(0.5f), g));
      g = _mm512_mask_mov_ps(g, out.low, _mm512_setzero_ps());
    }
    out.pg = _mm512_mask_mov_ps(out.pg, neg, _mm512_min_ps(out.pg, pg3));
  }
  if (grad != nullptr) *grad = g;
  return out;
}

// The KL term (value, and d/d logp into *grad when given) for 16 tokens.
GRPO_AVX512 inline __m512 kl16(__m512 lp, __m512 ref, int kl_type, __m512* grad) {
  if (kl_type == kLowVarKl) {
    const __m512 draw = _mm512_sub_ps(ref, lp);
    const __m512 d = clamp16(draw, -20.f, 20.f);
    const __m512 e = exp16(d);
    const __m512 k = _mm512_sub_ps(_mm512_sub_ps(e, d), _mm512_set1_ps(1.f));
    if (grad != nullptr) {
      const __mmask16 in = _mm512_cmp_ps_mask(draw, _mm512_set1_ps(-20.f), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(draw, _mm512_set1_ps(20.f), _CMP_LE_OQ) &
                           _mm512_cmp_ps_mask(k, _mm512_set1_ps(-10.f), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(k, _mm512_set1_ps(10.f), _CMP_LE_OQ);
      *grad = _mm512_maskz_mov_ps(in, _mm512_sub_ps(_mm512_set1_ps(1.f), e));
    }
    return clamp16(k, -10.f, 10.f);
  }
  const __m512 diff = _mm512_sub_ps(lp, ref);
  if (kl_type == kK1) {
    if (grad != nullptr) *grad = _mm512_set1_ps(1.f);
    return diff;
  }
  if (kl_type == kAbs) {
    if (grad != nullptr) {
      const __mmask16 pos = _mm512_cmp_ps_mask(diff, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __mmask16 neg = _mm512_cmp_ps_mask(diff, _mm512_setzero_ps(), _CMP_LT_OQ);
      *grad = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(pos, _mm512_set1_ps(1.f)), neg, _mm512_set1_ps(-1.f));
    }
    return _mm512_abs_ps(diff);
  }
  if (grad != nullptr) *grad = diff;
  return _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_mul_ps(diff, diff));
}

GRPO_AVX512 inline __m512 load_adv(const float* adv, int64_t adv_step, int64_t i, __mmask16 k) {
  return adv_step == 0 ? _mm512_set1_ps(adv[0]) : _mm512_maskz_loadu_ps(k, adv + i);
}

template <typename scalar_t, typename mask_t>
GRPO_AVX512 void fwd_item_avx512(const scalar_t* lp, const scalar_t* old, const scalar_t* ref, const float* adv,
                                 int64_t adv_step, const mask_t* mask, int64_t n, const Params& p, float* out) {
  __m512 s_pg = _mm512_setzero_ps(), s_kl = s_pg, s_m = s_pg, s_hi = s_pg, s_lo = s_pg, s_ppo = s_pg;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    // padding lanes load zeros: finite terms times mask 0 add nothing
    const __m512 l = load16(lp + i, k);
    const __m512 m = load16(mask + i, k);
    const __m512 o = p.has_old ? load16(old + i, k) : l;
    const Pg16 t = pg16(_mm512_sub_ps(l, o), load_adv(adv, adv_step, i, k), p, nullptr);
    s_pg = _mm512_fmadd_ps(t.pg, m, s_pg);
    s_m = _mm512_add_ps(s_m, m);
    s_hi = _mm512_mask_add_ps(s_hi, t.high, s_hi, m);
    s_lo = _mm512_mask_add_ps(s_lo, t.low, s_lo, m);
    if (p.has_old) s_ppo = _mm512_fmadd_ps(_mm512_sub_ps(o, l), m, s_ppo);
    if (p.has_ref) s_kl = _mm512_fmadd_ps(kl16(l, load16(ref + i, k), p.kl_type, nullptr), m, s_kl);
  }
  out[0] = _mm512_reduce_add_ps(s_pg);
  out[1] = _mm512_reduce_add_ps(s_kl);
  out[2] = _mm512_reduce_add_ps(s_m);
  out[3] = _mm512_reduce_add_ps(s_hi);
  out[4] = _mm512_reduce_add_ps(s_lo);
  out[5] = _mm512_reduce_add_ps(s_ppo);
}

template <typename scalar_t, typename mask_t>
GRPO_AVX512 void bwd_item_avx512(const scalar_t* lp, const scalar_t* old, const scalar_t* ref, const float* adv,
                                 int64_t adv_step, const mask_t* mask, int64_t n, const Params& p, float c,
                                 scalar_t* dlp) {
  const __m512 cv = _mm512_set1_ps(c), kc = _mm512_set1_ps(p.kl_coef);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 l = load16(lp + i, k);
    const __m512 m = load16(mask + i, k);
    const __m512 o = p.has_old ? load16(old + i, k) : l;
    __m512 g;
    pg16(_mm512_sub_ps(l, o), load_adv(adv, adv_step, i, k), p, &g);
    if (p.has_ref) {
      __m512 dkl;
      kl16(l, load16(ref + i, k), p.kl_type, &dkl);
      g = _mm512_add_ps(g, _mm512_mul_ps(kc, dkl));
    }
    store16(dlp + i, k, _mm512_mul_ps(_mm512_mul_ps(cv, m), g));
  }
}
#else
bool cpu_has_avx512() { return false; }
#endif

// ---------------------------------------------------------------- drivers

template <typename scalar_t, typename mask_t>
void fwd_all(const at::Tensor& logp, const at::Tensor& adv, const at::Tensor& mask, const at::Tensor* old,
             const at::Tensor* ref, const Params& p, float* partials) {
  const int64_t B = logp.size(0), T = logp.size(1);
  const int64_t nchunk = (T + kChunk - 1) / kChunk;
  const scalar_t* lp = logp.const_data_ptr<scalar_t>();
  const scalar_t* op = old ? old->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = ref ? ref->const_data_ptr<scalar_t>() : nullptr;
  const float* ap = adv.const_data_ptr<float>();
  const mask_t* mp = mask.const_data_ptr<mask_t>();
  const bool per_token = adv.dim() == 2;
  const bool vec = cpu_has_avx512();
  // each thread gets at least ~8k tokens: below that, waking threads costs more than it saves
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, std::min(T, kChunk)));
  at::parallel_for(0, B * nchunk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk, t0 = (item % nchunk) * kChunk, n = std::min(kChunk, T - t0);
      const int64_t off = b * T + t0;
      const float* a = per_token ? ap + off : ap + b;
      const int64_t step = per_token ? 1 : 0;
      float* out = partials + item * kNumSums;
#ifdef GRPO_HAVE_AVX512
      if (vec) {
        fwd_item_avx512<scalar_t, mask_t>(lp + off, op ? op + off : nullptr, rp ? rp + off : nullptr, a, step, mp + off,
                                          n, p, out);
        continue;
      }
#endif
      fwd_item_scalar<scalar_t, mask_t>(lp + off, op ? op + off : nullptr, rp ? rp + off : nullptr, a, step, mp + off, n,
                                        p, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, std::optional<double> dual_clip,
    double kl_coef, c10::string_view kl_type, c10::string_view loss_agg) {
  check_inputs(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip);
  const int kl = parse_kl_type(kl_type);
  const int agg = parse_loss_agg(loss_agg);
  const Params p = make_params(clip_low, clip_high, dual_clip, kl_coef, kl, old_logp.has_value(), ref_logp.has_value());
  const int64_t B = logp.size(0), T = logp.size(1);
  const int64_t nchunk = (T + kChunk - 1) / kChunk;
  const auto f32 = logp.options().dtype(at::kFloat);
  std::vector<float> partials(static_cast<size_t>(B * nchunk * kNumSums), 0.f);
  const at::Tensor* old = old_logp.has_value() ? &old_logp.value() : nullptr;
  const at::Tensor* ref = ref_logp.has_value() ? &ref_logp.value() : nullptr;
  if (B * T > 0) {
    GRPO_DISPATCH_FLOAT(logp.scalar_type(), "grpo_loss_fwd", [&] {
      if (mask.scalar_type() == at::kBool)
        fwd_all<scalar_t, bool>(logp, advantages, mask, old, ref, p, partials.data());
      else
        fwd_all<scalar_t, float>(logp, advantages, mask, old, ref, p, partials.data());
    });
  }
  // Fixed-order reduction: chunks within a row, then rows, in double.
  std::vector<double> row(static_cast<size_t>(B * kNumSums), 0.0);
  double tot[kNumSums] = {0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < nchunk; ++c)
      for (int k = 0; k < kNumSums; ++k) row[b * kNumSums + k] += partials[(b * nchunk + c) * kNumSums + k];
    for (int k = 0; k < kNumSums; ++k) tot[k] += row[b * kNumSums + k];
  }
  at::Tensor row_weight = at::empty({B}, f32);
  float* rw = row_weight.data_ptr<float>();
  const double kc = p.has_ref ? kl_coef : 0.0;
  double loss = 0.0;
  if (agg == kTokenMean) {
    const double n = tot[2];
    loss = n > 0 ? tot[0] / n + kc * (tot[1] / n) : 0.0;
    for (int64_t b = 0; b < B; ++b) rw[b] = n > 0 ? static_cast<float>(1.0 / n) : 0.f;
  } else {
    for (int64_t b = 0; b < B; ++b) {
      const double pg = row[b * kNumSums + 0], klv = row[b * kNumSums + 1], n = row[b * kNumSums + 2];
      double w;  // d loss / d (this row's masked sum)
      if (agg == kSeqMeanTokenMean)
        w = n > 0 ? 1.0 / (n * static_cast<double>(B)) : 0.0;
      else if (agg == kSeqMeanTokenSum)
        w = 1.0 / static_cast<double>(B);
      else
        w = T > 0 ? 1.0 / (static_cast<double>(T) * static_cast<double>(B)) : 0.0;
      loss += w * (pg + kc * klv);
      rw[b] = static_cast<float>(w);
    }
  }
  at::Tensor loss_t = at::empty({}, f32);
  loss_t.data_ptr<float>()[0] = static_cast<float>(loss);
  at::Tensor metrics = at::empty({4}, f32);
  float* mt = metrics.data_ptr<float>();
  const double n = tot[2];
  mt[0] = n > 0 ? static_cast<float>(tot[3] / n) : 0.f;
  mt[1] = n > 0 ? static_cast<float>(tot[4] / n) : 0.f;
  mt[2] = n > 0 ? static_cast<float>(tot[5] / n) : 0.f;
  mt[3] = n > 0 ? static_cast<float>(tot[1] / n) : 0.f;
  return {loss_t, metrics, row_weight};
}

at::Tensor grpo_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& advantages,
                             const at::Tensor& mask, const std::optional<at::Tensor>& old_logp,
                             const std::optional<at::Tensor>& ref_logp, const at::Tensor& row_weight, double clip_low,
                             double clip_high, std::optional<double> dual_clip, double kl_coef, c10::string_view kl_type) {
  check_inputs(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip);
  const int kl = parse_kl_type(kl_type);
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat, "grad_loss must be one float32 value");
  TORCH_CHECK_VALUE(row_weight.dim() == 1 && row_weight.size(0) == B && row_weight.scalar_type() == at::kFloat &&
                        row_weight.is_contiguous(),
                    "row_weight must be a contiguous float32 [B]");
  const Params p = make_params(clip_low, clip_high, dual_clip, kl_coef, kl, old_logp.has_value(), ref_logp.has_value());
  at::Tensor dlogp = at::empty_like(logp);
  if (B * T == 0) return dlogp;
  const float g = grad_loss.item<float>();
  const float* rw = row_weight.const_data_ptr<float>();
  const int64_t nchunk = (T + kChunk - 1) / kChunk;
  const bool per_token = advantages.dim() == 2;
  const bool vec = cpu_has_avx512();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, std::min(T, kChunk)));
  GRPO_DISPATCH_FLOAT(logp.scalar_type(), "grpo_loss_bwd", [&] {
    const scalar_t* lp = logp.const_data_ptr<scalar_t>();
    const scalar_t* op = old_logp.has_value() ? old_logp->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = ref_logp.has_value() ? ref_logp->const_data_ptr<scalar_t>() : nullptr;
    const float* ap = advantages.const_data_ptr<float>();
    scalar_t* dp = dlogp.data_ptr<scalar_t>();
    auto run = [&](auto* mp) {
      using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(mp)>>;
      at::parallel_for(0, B * nchunk, grain, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / nchunk, t0 = (item % nchunk) * kChunk, n = std::min(kChunk, T - t0);
          const int64_t off = b * T + t0;
          const float* a = per_token ? ap + off : ap + b;
          const int64_t step = per_token ? 1 : 0;
          const float c = g * rw[b];
#ifdef GRPO_HAVE_AVX512
          if (vec) {
            bwd_item_avx512<scalar_t, mask_t>(lp + off, op ? op + off : nullptr, rp ? rp + off : nullptr, a, step,
                                              mp + off, n, p, c, dp + off);
            continue;
          }
#endif
          bwd_item_scalar<scalar_t, mask_t>(lp + off, op ? op + off : nullptr, rp ? rp + off : nullptr, a, step, mp + off,
                                            n, p, c, dp + off);
        }
      });
    };
    if (mask.scalar_type() == at::kBool)
      run(mask.const_data_ptr<bool>());
    else
      run(mask.const_data_ptr<float>());
  });
  return dlogp;
}

}  // namespace

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("grpo_loss_fwd", &grpo_loss_fwd_cpu);
  m.impl("grpo_loss_bwd", &grpo_loss_bwd_cpu);
}
