// The argument checks of token_logprobs, written once for csrc/cpu/token_logprobs.cpp and
// csrc/cuda/token_logprobs.cu, so both backends accept and reject exactly the same inputs with the
// same messages (as csrc/grpo_math.h does for the GRPO ops). Each backend adds only what is its
// own: the C++ kernel range-checks ids on the host, the CUDA one caps the rows at one grid.
// The same goes for what their entry points do alike: the forward's outputs (FwdOutputs), the
// backward's checked row inputs (BwdInputs) and the three kernel names they register (register_kernels).
// Semantics: docs/ops.md#token_logprobs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace engine_tlp {

// logits [N, V] float32/bfloat16/float16 with V > 0, ids [N] int64/int32 on the device of logits,
// temperature positive and finite.
inline void check_inputs(const at::Tensor& logits, const at::Tensor& ids, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "logits must be a float tensor, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                        logits.scalar_type() == at::kHalf,
                    "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D [N], got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                    "ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(0) == logits.size(0), "ids must have shape [", logits.size(0),
                    "] (one id per row of logits), got ", ids.sizes());
  TORCH_CHECK_VALUE(ids.device() == logits.device(), "ids is on ", ids.device(), " but logits is on ", logits.device());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have a non-empty vocabulary dim, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be positive and finite, got ", temperature);
}

// logits as the row kernels read them: rows of contiguous entries (a copy only where the last dim is strided).
inline at::Tensor unit_stride_rows(const at::Tensor& logits) { return logits.stride(1) == 1 ? logits : logits.contiguous(); }

// The in-place backward writes grad_logits over logits, so it cannot copy them to contiguous rows.
inline void check_inplace(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "logits must have a contiguous last dim for the in-place backward");
}

// The forward's fp32 outputs for logits [N, V], uninitialized: logp [N], entropy [N] (or [0] without
// return_entropy), stats [N, 2] (row max of z, log sum exp(z - max)).
struct FwdOutputs {
  at::Tensor logp, entropy, stats;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {logp, entropy, stats}; }
};

inline FwdOutputs empty_fwd_outputs(const at::Tensor& logits, bool return_entropy) {
  const int64_t N = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  return {at::empty({N}, opts), at::empty({return_entropy ? N : 0}, opts), at::empty({N, 2}, opts)};
}

// Upstream grad of a per-row output as a contiguous fp32 [N] on the device of logits (or nullopt).
inline std::optional<at::Tensor> row_grad(const std::optional<at::Tensor>& g, const at::Tensor& logits,
                                          const char* name) {
  if (!g.has_value() || !g->defined()) return std::nullopt;
  const int64_t N = logits.size(0);
  TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == N, name, " must have shape [", N, "], got ", g->sizes());
  TORCH_CHECK_VALUE(g->device() == logits.device(), name, " is on ", g->device(), " but logits is on ", logits.device());
  return g->to(at::kFloat).contiguous();
}

// The forward's saved outputs, as the backward reads them: stats fp32 [N, 2] always, entropy fp32
// [N] when grad_entropy is given; both on the device of logits.
inline void check_saved(const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& entropy,
                        bool has_grad_entropy) {
  const int64_t N = logits.size(0);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 2 && stats.scalar_type() == at::kFloat &&
                        stats.device() == logits.device(),
                    "stats must be float32 [", N, ", 2] on the device of logits (from token_logprobs_fwd), got ",
                    stats.scalar_type(), " ", stats.sizes());
  if (has_grad_entropy) {
    TORCH_CHECK_VALUE(entropy.dim() == 1 && entropy.size(0) == N && entropy.scalar_type() == at::kFloat &&
                          entropy.device() == logits.device(),
                      "entropy must be float32 [", N, "] on the device of logits when grad_entropy is given, got ",
                      entropy.sizes());
  }
}

// The backward's fp32 row inputs, checked and contiguous on the device of logits: stats [N, 2]
// always; grad_logp [N] where given; grad_entropy [N] and the saved entropy [N] where grad_entropy is
// given. The others stay undefined, and `data(t)` is then nullptr: the row kernels skip that term.
struct BwdInputs {
  at::Tensor stats, entropy, grad_logp, grad_entropy;
};

inline BwdInputs bwd_inputs(const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& entropy,
                            const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_entropy) {
  check_saved(logits, stats, entropy, grad_entropy.has_value() && grad_entropy->defined());
  BwdInputs in;
  if (auto g = row_grad(grad_logp, logits, "grad_logp")) in.grad_logp = *g;
  if (auto g = row_grad(grad_entropy, logits, "grad_entropy")) {
    in.grad_entropy = *g;
    in.entropy = entropy.contiguous();
  }
  in.stats = stats.contiguous();
  return in;
}

inline const float* data(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// A backend's three kernels under the schemas of csrc/ops.cpp (inside its TORCH_LIBRARY_IMPL).
template <typename Fwd, typename Bwd, typename BwdInplace>
void register_kernels(torch::Library& m, Fwd* fwd, Bwd* bwd, BwdInplace* bwd_inplace) {
  m.impl("token_logprobs_fwd", fwd);
  m.impl("token_logprobs_bwd", bwd);
  m.impl("token_logprobs_bwd_inplace", bwd_inplace);
}

}  // namespace engine_tlp
