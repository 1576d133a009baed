// The plain-type interface between token_logprobs.cpp (tensors, checks, threads) and the row
// kernels compiled once per CPU capability (token_logprobs_kernel.h).
#pragma once
#include <cstdint>

namespace engine {

enum class TlpDtype { kFloat, kBFloat16, kHalf };

// logits: [N, V] rows `row_stride` apart; ids: [N] int64 in [0, V) (checked by the caller).
// stats: [N, 2] (row max m of z, log sum exp(z - m)); entropy == nullptr: not computed.
struct TlpFwdArgs {
  TlpDtype dtype;
  const void* logits;
  int64_t row_stride;
  int64_t V;
  const int64_t* ids;
  float temperature;
  float* logp;
  float* stats;
  float* entropy;
};

// grad may alias logits (the row is read before it is written). Null upstream grads count as 0;
// entropy is read only when grad_entropy is given.
struct TlpBwdArgs {
  TlpDtype dtype;
  const void* logits;
  int64_t row_stride;
  void* grad;
  int64_t grad_row_stride;
  int64_t V;
  const int64_t* ids;
  float temperature;
  const float* stats;
  const float* entropy;
  const float* grad_logp;
  const float* grad_entropy;
};

namespace tlp_default {
void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end);
void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end);
}  // namespace tlp_default

namespace tlp_avx2 {
void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end);
void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end);
}  // namespace tlp_avx2

namespace tlp_avx512 {
void fwd_rows(const TlpFwdArgs& a, int64_t begin, int64_t end);
void bwd_rows(const TlpBwdArgs& a, int64_t begin, int64_t end);
}  // namespace tlp_avx512

}  // namespace engine
