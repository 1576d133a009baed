// group_advantages on CPU: group_advantages_fwd (schema in csrc/ops.cpp; contract:
// docs/ops.md#group_advantages).
//
// adv = (r - mean_g) / (std_g + eps), std unbiased over each group of `group_size` consecutive
// rewards; scale "batch" divides by the batch's std, "none" only centres. B is small (prompts x n),
// so one thread walks the groups in order with double accumulation: deterministic, and exact to
// the final fp32 rounding for any realistic B.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "grpo_math.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace engine_grpo;  // check_advantage_inputs, kScaleGroup, ... (csrc/grpo_math.h)

// Mean and unbiased std (0 for one value) of x[0..n) shifted by x[0]: the shift makes a run of
// equal rewards centre to exactly 0 instead of to rounding noise that eps would then amplify.
struct Moments {
  double mean, std;  // of x[i] - x[0]
};

Moments shifted_moments(const float* x, int64_t n) {
  double s = 0.0, ss = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) - double(x[0]);
  const double mean = s / double(n);
  for (int64_t i = 0; i < n; ++i) {
    const double c = (double(x[i]) - double(x[0])) - mean;
    ss += c * c;
  }
  return {mean, std::sqrt(ss / double(std::max<int64_t>(n - 1, 1)))};
}

at::Tensor group_advantages_fwd_cpu(const at::Tensor& rewards, int64_t group_size, c10::string_view scale, double eps) {
  const int sc = check_advantage_inputs(rewards, group_size, scale, eps);
  const int64_t B = rewards.size(0);
  const at::Tensor r32 = rewards.to(at::kFloat).contiguous();
  at::Tensor adv = at::empty({B}, rewards.options().dtype(at::kFloat));
  if (B == 0) return adv;
  const float* r = r32.const_data_ptr<float>();
  float* out = adv.data_ptr<float>();
  // one semantics for every backend (docs/ops.md#group_advantages): a NaN/inf reward is refused.
  // In double no intermediate overflows for finite fp32 rewards (|r| < 3.5e38: squares < 1e78).
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK_VALUE(std::isfinite(r[i]), "rewards must be finite (in fp32, the kernels' precision): entry ", i,
                      " is ", r[i]);
  const double batch_std = sc == kScaleBatch ? shifted_moments(r, B).std : 0.0;
  for (int64_t g0 = 0; g0 < B; g0 += group_size) {
    const Moments g = shifted_moments(r + g0, group_size);
    const double denom = sc == kScaleNone ? 1.0 : (sc == kScaleGroup ? g.std : batch_std) + eps;
    for (int64_t i = g0; i < g0 + group_size; ++i) {
      const double x = double(r[i]) - double(r[g0]);  // this reward, shifted as the mean was
      const double c = x - g.mean;
      out[i] = static_cast<float>(denom > 0 ? c / denom : 0.0);  // eps = 0 and a flat group: 0, not NaN
    }
  }
  return adv;
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  m.impl("group_advantages_fwd", &group_advantages_fwd_cpu);
}
