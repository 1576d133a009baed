// The plain-type interface between grpo_loss.cpp (tensors, checks, threads, the final reduction)
// and the grpo_loss item kernels compiled once per CPU capability (grpo_loss_kernel.h).
#pragma once
#include <cstdint>

#include "grpo_math.h"  // Params, kNumSums

namespace engine {

enum class GrpoDtype { kFloat, kBFloat16, kHalf };

constexpr int64_t kGrpoChunk = 2048;  // tokens per work item: items are (row b, tokens [c kGrpoChunk, ...))

// logp / old / ref: [B, T] of `dtype` (old, ref null when absent); adv: fp32 [B, T] (adv_per_token)
// or [B]; mask: [B, T] bool (mask_bool) or fp32. All contiguous, checked by the caller.
struct GrpoArgs {
  GrpoDtype dtype;
  const void* logp;
  const void* old;
  const void* ref;
  const float* adv;
  bool adv_per_token;
  const void* mask;
  bool mask_bool;
  int64_t T;
  engine_grpo::Params p;
};

// Forward: for each item in [begin, end), its kNumSums masked sums (engine_grpo::TokenTerms order:
// pg, kl, mask, high, low, ppo) into partials[item * kNumSums + k].
// Backward: for each item, dlogp = (grad_loss * row_weight[b]) * mask * token_grad, in logp's dtype.
namespace grpo_default {
void fwd_items(const GrpoArgs& a, int64_t begin, int64_t end, double* partials);
void bwd_items(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end);
}  // namespace grpo_default

namespace grpo_avx2 {
void fwd_items(const GrpoArgs& a, int64_t begin, int64_t end, double* partials);
void bwd_items(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end);
}  // namespace grpo_avx2

namespace grpo_avx512 {
void fwd_items(const GrpoArgs& a, int64_t begin, int64_t end, double* partials);
void bwd_items(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin, int64_t end);
}  // namespace grpo_avx512

}  // namespace engine
