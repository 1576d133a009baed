// GRPO loss: option codes, kernel parameters and argument checks shared by csrc/cpu/grpo.cpp and
// csrc/cuda/grpo.cu, so both backends accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

namespace engine_grpo {

constexpr int kNumSums = 6;       // pg, kl, mask, clip-high hits, dual-clip hits, old - logp

enum KlType { kLowVarKl = 0, kK1 = 1, kAbs = 2, kMse = 3 };
enum LossAgg { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

inline int parse_kl_type(c10::string_view s) {
  if (s == "low_var_kl") return kLowVarKl;
  if (s == "kl") return kK1;
  if (s == "abs") return kAbs;
  if (s == "mse") return kMse;
  TORCH_CHECK_VALUE(false, "kl_type must be one of low_var_kl, kl, abs, mse, got '", std::string(s), "'");
  return -1;
}

inline int parse_loss_agg(c10::string_view s) {
  if (s == "token-mean") return kTokenMean;
  if (s == "seq-mean-token-mean") return kSeqMeanTokenMean;
  if (s == "seq-mean-token-sum") return kSeqMeanTokenSum;
  if (s == "seq-mean-token-sum-norm") return kSeqMeanTokenSumNorm;
  TORCH_CHECK_VALUE(false, "loss_agg must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum, ",
                    "seq-mean-token-sum-norm, got '", std::string(s), "'");
  return -1;
}

struct Params {
  float lo, hi, dual, kl_coef;
  bool has_dual, has_old, has_ref;
  int kl_type;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks shared by forward and backward; every failure is a ValueError naming the argument.
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

inline Params make_params(double clip_low, double clip_high, std::optional<double> dual_clip, double kl_coef, int kl_type,
                   bool has_old, bool has_ref) {
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

}  // namespace engine_grpo
