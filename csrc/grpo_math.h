// GRPO, written once for the C++ and the CUDA kernels of group_advantages and grpo_loss:
//   1. the option names and their integer codes (the order is engine/grpo_options.py's; the Triton
//      launchers keep their own copy; tests/test_grpo_options.py checks that all three agree),
//   2. the argument checks, so both backends accept and reject exactly the same inputs,
//   3. the per-token math of grpo_loss (policy-gradient terms, the KL variants, their derivatives)
//      as inline host/device functions: csrc/cpu/grpo_loss.cpp's scalar path and
//      csrc/cuda/grpo_loss.cu call the same code,
//   4. the same per-token math for at::vec::Vectorized<float> (host only), which the C++ kernel's
//      vector builds (csrc/cpu/grpo_loss_kernel.h: AVX-512, AVX2, NEON/SVE or plain C++) call.
// Semantics: docs/ops.md#grpo_loss and docs/ops.md#group_advantages.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__ __forceinline__
#else
#define GRPO_HD inline
#endif

// float32, bfloat16, float16 (the engine's float dtypes; no double kernels)
#define GRPO_DISPATCH_FLOAT(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace engine_grpo {

// ---------------------------------------------------------------- 1. option names and codes
// Each name list is in code order: kKlTypeNames[kMse] == "mse". Change engine/grpo_options.py and
// the Triton copies together with these.

enum KlType { kLowVarKl = 0, kK1 = 1, kAbs = 2, kMse = 3 };
constexpr const char* kKlTypeNames[] = {"low_var_kl", "kl", "abs", "mse"};

enum LossAgg { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };
constexpr const char* kLossAggNames[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"};

enum AdvantageScale { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };
constexpr const char* kAdvantageScaleNames[] = {"group", "batch", "none"};

// The code of `s` in `names`; a ValueError naming `arg` (and listing the names) when it is none of them.
template <size_t N>
inline int parse_option(const char* arg, const char* const (&names)[N], c10::string_view s) {
  for (size_t i = 0; i < N; ++i)
    if (s == names[i]) return static_cast<int>(i);
  std::ostringstream all;
  for (size_t i = 0; i < N; ++i) all << (i ? ", " : "") << names[i];
  TORCH_CHECK_VALUE(false, arg, " must be one of ", all.str(), ", got '", std::string(s), "'");
  return -1;
}

inline int parse_kl_type(c10::string_view s) { return parse_option("kl_type", kKlTypeNames, s); }
inline int parse_loss_agg(c10::string_view s) { return parse_option("loss_agg", kLossAggNames, s); }
inline int parse_scale(c10::string_view s) { return parse_option("scale", kAdvantageScaleNames, s); }

// ---------------------------------------------------------------- 2. argument checks (host only)

constexpr int kNumSums = 6;  // per-row masked sums: pg, kl, mask, clip-high hits, dual-clip hits, old - logp

struct Params {
  float lo, hi, dual, kl_coef;  // lo = 1 - clip_low, hi = 1 + clip_high
  bool has_dual, has_old, has_ref;
  int kl_type;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// grpo_loss_fwd / grpo_loss_bwd: every failure is a ValueError naming the argument.
inline void check_inputs(const at::Tensor& logp, const at::Tensor& adv, const at::Tensor& mask,
                         const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref, double clip_low,
                         double clip_high, std::optional<double> dual_clip) {
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must be [B, T], got ", logp.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(logp.scalar_type()), "logp must be float32/bfloat16/float16, got ", logp.scalar_type());
  TORCH_CHECK_VALUE(logp.is_contiguous(), "logp must be contiguous");
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK_VALUE(adv.scalar_type() == at::kFloat, "advantages must be float32, got ", adv.scalar_type());
  TORCH_CHECK_VALUE((adv.dim() == 1 && adv.size(0) == B) || (adv.dim() == 2 && adv.size(0) == B && adv.size(1) == T),
                    "advantages must be [B] or [B, T] with B, T = ", B, ", ", T, ", got ", adv.sizes());
  TORCH_CHECK_VALUE(adv.is_contiguous(), "advantages must be contiguous");
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T, "mask must be [B, T] like logp, got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat,
                    "mask must be bool or float32, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK_VALUE(adv.device() == logp.device(), "advantages must be on logp's device");
  TORCH_CHECK_VALUE(mask.device() == logp.device(), "mask must be on logp's device");
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"old_logp", &old},
                                {"ref_logp", &ref}}) {
    if (!t->has_value()) continue;
    const at::Tensor& x = t->value();
    TORCH_CHECK_VALUE(x.sizes() == logp.sizes(), name, " must be [B, T] like logp, got ", x.sizes());
    TORCH_CHECK_VALUE(x.scalar_type() == logp.scalar_type(), name, " must have logp's dtype ", logp.scalar_type(),
                      ", got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE(x.device() == logp.device(), name, " must be on logp's device");
  }
  TORCH_CHECK_VALUE(clip_low >= 0.0 && clip_low < 1.0, "clip_low must lie in [0, 1), got ", clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0.0 && std::isfinite(clip_high), "clip_high must be finite and >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || (*dual_clip > 1.0 && std::isfinite(*dual_clip)),
                    "dual_clip must be finite and > 1, or None");
}

// group_advantages_fwd; returns the scale's code.
inline int check_advantage_inputs(const at::Tensor& rewards, int64_t group_size, c10::string_view scale, double eps) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards must be [B], got ", rewards.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(rewards.scalar_type()), "rewards must be float32/bfloat16/float16, got ",
                    rewards.scalar_type());
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(rewards.size(0) % group_size == 0, "group_size ", group_size, " does not divide the batch of ",
                    rewards.size(0), " rewards");
  const int code = parse_scale(scale);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  return code;
}

inline Params make_params(double clip_low, double clip_high, std::optional<double> dual_clip, double kl_coef,
                          int kl_type, bool has_old, bool has_ref) {
  Params p;
  p.lo = static_cast<float>(1.0 - clip_low);
  p.hi = static_cast<float>(1.0 + clip_high);
  p.has_dual = dual_clip.has_value();
  p.dual = p.has_dual ? static_cast<float>(*dual_clip) : 0.f;
  p.kl_coef = static_cast<float>(kl_coef);
  p.has_old = has_old;
  p.has_ref = has_ref;
  p.kl_type = kl_type;
  return p;
}

// ---------------------------------------------------------------- 3. per-token math (host and device)
// Step by step as engine/reference.py::grpo_loss, in fp32. Derivatives follow autograd's
// conventions, so kernels and reference agree exactly at the edges: clamp passes the gradient at its
// bounds, max/min split it evenly on ties, abs has gradient 0 at 0. fminf/fmaxf, not std::min/max:
// both exist in host and device code.

GRPO_HD float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

struct TokenTerms {
  float pg;    // policy-gradient term after the dual clip
  float kl;    // KL estimate (0 without ref_logp)
  float high;  // 1 where the ratio clip is active (pg1 < pg2)
  float low;   // 1 where the dual clip is active (A < 0 and pg > -A * dual_clip)
  float ppo;   // old - logp
};

// The KL estimate of kl_type for one token (EasyR1 `compute_kl`).
GRPO_HD float kl_value(float lp, float ref, int kl_type) {
  if (kl_type == kLowVarKl) {  // k3, clamped for stability
    const float d = clampf(ref - lp, -20.f, 20.f);
    return clampf(expf(d) - d - 1.f, -10.f, 10.f);
  }
  const float diff = lp - ref;
  if (kl_type == kK1) return diff;
  if (kl_type == kAbs) return fabsf(diff);
  return 0.5f * (diff * diff);  // kMse
}

// d kl_value / d lp.
GRPO_HD float kl_grad(float lp, float ref, int kl_type) {
  if (kl_type == kLowVarKl) {
    const float draw = ref - lp;
    const float d = clampf(draw, -20.f, 20.f);
    const float e = expf(d);
    const float k = e - d - 1.f;
    // d/dlp of (e^d - d - 1) is 1 - e^d; zero where either clamp is saturated
    return (draw >= -20.f && draw <= 20.f && k >= -10.f && k <= 10.f) ? 1.f - e : 0.f;
  }
  const float diff = lp - ref;
  if (kl_type == kK1) return 1.f;
  if (kl_type == kAbs) return diff > 0.f ? 1.f : (diff < 0.f ? -1.f : 0.f);
  return diff;  // kMse
}

// One token's loss terms; `old` = lp and `ref` = lp when the tensor is absent.
GRPO_HD TokenTerms token_terms(float lp, float old, float ref, float a, const Params& p) {
  const float ratio = expf(clampf(lp - old, -20.f, 20.f));
  const float pg1 = -a * ratio;
  const float pg2 = -a * clampf(ratio, p.lo, p.hi);
  TokenTerms t{fmaxf(pg1, pg2), 0.f, pg1 < pg2 ? 1.f : 0.f, 0.f, old - lp};
  if (p.has_dual && a < 0.f) {
    const float pg3 = -a * p.dual;
    t.low = t.pg > pg3 ? 1.f : 0.f;
    t.pg = fminf(t.pg, pg3);
  }
  if (p.has_ref) t.kl = kl_value(lp, ref, p.kl_type);
  return t;
}

// d(pg + kl_coef * kl) / d lp for one token.
GRPO_HD float token_grad(float lp, float old, float ref, float a, const Params& p) {
  const float lr = lp - old;
  const float ratio = expf(clampf(lr, -20.f, 20.f));
  const float pg1 = -a * ratio;
  const float pg2 = -a * clampf(ratio, p.lo, p.hi);
  const float g1 = (lr >= -20.f && lr <= 20.f) ? -a * ratio : 0.f;  // d pg1
  const float g2 = (ratio >= p.lo && ratio <= p.hi) ? g1 : 0.f;      // d pg2
  float g = pg1 > pg2 ? g1 : (pg1 < pg2 ? g2 : 0.5f * g1 + 0.5f * g2);
  if (p.has_dual && a < 0.f) {
    const float pg = fmaxf(pg1, pg2), pg3 = -a * p.dual;  // pg3 is a constant: gradient 0
    g = pg > pg3 ? 0.f : (pg < pg3 ? g : 0.5f * g);
  }
  if (p.has_ref) g = g + p.kl_coef * kl_grad(lp, ref, p.kl_type);
  return g;
}

// ---------------------------------------------------------------- 4. the same math, Vec::size() tokens at a time (host)
// token_terms / token_grad / kl_value / kl_grad for at::vec::Vectorized<float>, whichever build of
// it the caller compiles (AVX-512, AVX2, NEON/SVE, or the plain C++ one): csrc/cpu/grpo_loss_kernel.h
// instantiates them once per CPU capability. Each mirrors its scalar twin above statement by
// statement (change them together; tests/test_grpo_loss.py compares every build with fp64 and with
// the scalar functions). Comparisons give all-ones lanes, Vec::blendv(a, b, c) is c ? b : a, and
// `c & one` turns a comparison into the 1.f / 0.f of the scalar code. One difference:
// at::vec::minimum/maximum/clamp propagate NaN (as the PyTorch reference does), unlike fminf/fmaxf.
// The vec header's width is the including file's: a per-ISA build defines CPU_CAPABILITY (and its
// `#pragma GCC target`) before including anything.
#if !defined(__CUDACC__)
}  // namespace engine_grpo
#include <ATen/cpu/vec/vec.h>
namespace engine_grpo {

// e^x for x in [-87, 88] (the callers clamp to [-20, 20]) to about 1 ulp; NaN stays NaN.
// AVX2 / AVX-512 builds: inline, as Vec::exp() calls libtorch's Sleef out of line there, spilling
// every live vector (the kernel ran 1.7x slower): x = n ln2 + r with |r| <= ln2/2 (ln2 split in two
// for an exact n ln2), Cephes' expf polynomial for e^r, and 2^n written into the exponent bits.
// Other builds: Vec::exp() (Sleef's NEON/SVE expf where ATen has it, else std::exp per lane; the
// generic Vectorized has no vector round or int conversion to build the inline one from).
template <typename Vec>
inline Vec exp_vec(const Vec& x) {
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  return x.exp();
#else
  using at::vec::fmadd;
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  Vec r = fmadd(n, Vec(-0.693359375f), x);
  r = fmadd(n, Vec(2.12194440e-4f), r);
  Vec y(1.9875691500e-4f);
  y = fmadd(y, r, Vec(1.3981999507e-3f));
  y = fmadd(y, r, Vec(8.3334519073e-3f));
  y = fmadd(y, r, Vec(4.1665795894e-2f));
  y = fmadd(y, r, Vec(1.6666665459e-1f));
  y = fmadd(y, r, Vec(5.0000001201e-1f));
  y = fmadd(y, r * r, r + Vec(1.f));
  const auto ni = at::vec::convert_to_int_of_same_size(n);
  using IVec = std::decay_t<decltype(ni)>;
  return y * at::vec::cast<float>((ni + IVec(127)) << IVec(23));
#endif
}

template <typename Vec>
struct TokenTermsVec {
  Vec pg, kl, high, low, ppo;  // as TokenTerms: high, low are 1.f / 0.f per lane
};

template <typename Vec>
inline Vec kl_value_vec(const Vec& lp, const Vec& ref, int kl_type) {
  if (kl_type == kLowVarKl) {
    const Vec d = clamp(ref - lp, Vec(-20.f), Vec(20.f));
    return clamp(exp_vec(d) - d - Vec(1.f), Vec(-10.f), Vec(10.f));
  }
  const Vec diff = lp - ref;
  if (kl_type == kK1) return diff;
  if (kl_type == kAbs) return diff.abs();
  return Vec(0.5f) * (diff * diff);  // kMse
}

template <typename Vec>
inline Vec kl_grad_vec(const Vec& lp, const Vec& ref, int kl_type) {
  const Vec zero(0.f), one(1.f);
  if (kl_type == kLowVarKl) {
    const Vec draw = ref - lp;
    const Vec d = clamp(draw, Vec(-20.f), Vec(20.f));
    const Vec e = exp_vec(d);
    const Vec k = e - d - one;
    const Vec in = (draw >= Vec(-20.f)) & (draw <= Vec(20.f)) & (k >= Vec(-10.f)) & (k <= Vec(10.f));
    return Vec::blendv(zero, one - e, in);
  }
  const Vec diff = lp - ref;
  if (kl_type == kK1) return one;
  if (kl_type == kAbs) return Vec::blendv(Vec::blendv(zero, Vec(-1.f), diff < zero), one, diff > zero);
  return diff;  // kMse
}

template <typename Vec>
inline TokenTermsVec<Vec> token_terms_vec(const Vec& lp, const Vec& old, const Vec& ref, const Vec& a, const Params& p) {
  const Vec zero(0.f), one(1.f), na = a.neg();
  const Vec ratio = exp_vec(clamp(lp - old, Vec(-20.f), Vec(20.f)));
  const Vec pg1 = na * ratio;
  const Vec pg2 = na * clamp(ratio, Vec(p.lo), Vec(p.hi));
  TokenTermsVec<Vec> t{maximum(pg1, pg2), zero, (pg1 < pg2) & one, zero, old - lp};
  if (p.has_dual) {
    const Vec neg = a < zero, pg3 = na * Vec(p.dual);
    t.low = neg & (t.pg > pg3) & one;
    t.pg = Vec::blendv(t.pg, minimum(t.pg, pg3), neg);
  }
  if (p.has_ref) t.kl = kl_value_vec(lp, ref, p.kl_type);
  return t;
}

template <typename Vec>
inline Vec token_grad_vec(const Vec& lp, const Vec& old, const Vec& ref, const Vec& a, const Params& p) {
  const Vec zero(0.f), half(0.5f), na = a.neg();
  const Vec lr = lp - old;
  const Vec ratio = exp_vec(clamp(lr, Vec(-20.f), Vec(20.f)));
  const Vec pg1 = na * ratio;
  const Vec pg2 = na * clamp(ratio, Vec(p.lo), Vec(p.hi));
  const Vec g1 = Vec::blendv(zero, na * ratio, (lr >= Vec(-20.f)) & (lr <= Vec(20.f)));  // d pg1
  const Vec g2 = Vec::blendv(zero, g1, (ratio >= Vec(p.lo)) & (ratio <= Vec(p.hi)));   // d pg2
  Vec g = Vec::blendv(Vec::blendv(half * g1 + half * g2, g2, pg1 < pg2), g1, pg1 > pg2);
  if (p.has_dual) {
    const Vec pg = maximum(pg1, pg2), pg3 = na * Vec(p.dual);  // pg3 is a constant: gradient 0
    const Vec gd = Vec::blendv(Vec::blendv(half * g, g, pg < pg3), zero, pg > pg3);
    g = Vec::blendv(g, gd, a < zero);
  }
  if (p.has_ref) g = g + Vec(p.kl_coef) * kl_grad_vec(lp, ref, p.kl_type);
  return g;
}
#endif  // !__CUDACC__

}  // namespace engine_grpo
