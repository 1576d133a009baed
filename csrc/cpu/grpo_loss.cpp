// grpo_loss on CPU: grpo_loss_fwd, grpo_loss_bwd (schemas in csrc/ops.cpp; contract:
// docs/ops.md#grpo_loss). Argument checks, the CPU path, threads, the final reduction.
//
// grpo_loss_fwd: one pass over the tokens. Work items are (row, chunk of kGrpoChunk tokens); each
// item writes its six masked sums (pg, kl, mask, clip-high hits, dual-clip hits, old - logp) to a
// buffer, then one thread sums the buffer in a fixed order (chunks, then rows, in double). No item
// depends on how items are spread over threads, so results are bitwise identical for any thread count.
// grpo_loss_bwd: one elementwise pass, dlogp = g * row_weight[b] * mask * (dpg + kl_coef * dkl),
// recomputing the per-token terms (cheaper than writing and re-reading them).
//
// CPU paths (per-token math: csrc/grpo_math.h, shared with csrc/cuda/grpo_loss.cu):
//   avx512, avx2  grpo_loss_kernel.h built with at::vec::Vectorized<float> for that ISA
//                 (grpo_loss_avx512.cpp, grpo_loss_avx2.cpp; x86-64 GCC, chosen by a CPU check),
//   default       the same kernel built here with the default flags (NEON on aarch64, plain C++
//                 lanes elsewhere), calling grpo_math.h's token_terms_vec / token_grad_vec,
//   scalar        one token at a time through grpo_math.h's token_terms / token_grad (the code the
//                 CUDA kernel runs), for tests and as the plainest reference.
// The best path the CPU supports runs; ATEN_CPU_CAPABILITY=default|avx2 caps it, as it does
// ATen's kernels (read once), and ENGINE_GRPO_CPU=scalar|default|avx2|avx512 (read per call, for
// tests and benchmarks; never above what the CPU supports) picks one.
// torch.ops.engine.grpo_loss_cpu_path() names the path the next call takes.
#include "cpu/cpu_isa.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "grpo_math.h"

#define GRPO_NS grpo_default
#include "cpu/grpo_loss_kernel.h"
#undef GRPO_NS

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace engine {
namespace {

using namespace engine_grpo;  // kNumSums, Params, check_inputs, token_terms, token_grad (csrc/grpo_math.h)

// ---------------------------------------------------------------- the CPU path

enum class Path { kScalar = 0, kDefault = 1, kAvx2 = 2, kAvx512 = 3 };
constexpr const char* kPathNames[] = {"scalar", "default", "avx2", "avx512"};

// The best path this CPU runs, capped by ATEN_CPU_CAPABILITY (csrc/cpu/cpu_isa.h, shared with token_logprobs).
Path best_path() {
  switch (engine_cpu::best_isa()) {
    case engine_cpu::Isa::kAvx512: return Path::kAvx512;
    case engine_cpu::Isa::kAvx2: return Path::kAvx2;
    default: return Path::kDefault;
  }
}

// ENGINE_GRPO_CPU (read per call) where set, never above best_path(); else best_path().
Path path() {
  const Path best = best_path();
  const char* want = std::getenv("ENGINE_GRPO_CPU");
  if (want == nullptr || want[0] == '\0') return best;
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(want, kPathNames[i]) == 0) return static_cast<Path>(std::min(i, static_cast<int>(best)));
  TORCH_CHECK_VALUE(false, "ENGINE_GRPO_CPU must be one of scalar, default, avx2, avx512, got '", want, "'");
  return best;
}

std::string grpo_loss_cpu_path() { return kPathNames[static_cast<int>(path())]; }

// ---------------------------------------------------------------- the scalar path

// One work item's tokens (row b, tokens [t0, t0 + n)) as floats: old/ref read as logp when absent,
// the advantage per token or per row. Shared by the scalar forward and backward.
template <typename scalar_t, typename mask_t>
struct ScalarItem {
  const GrpoArgs& a;
  int64_t b, off, n;
  const scalar_t *lp, *old, *ref;
  const mask_t* mask;

  ScalarItem(const GrpoArgs& args, int64_t item) : a(args) {
    const int64_t nchunk = (a.T + kGrpoChunk - 1) / kGrpoChunk, t0 = (item % nchunk) * kGrpoChunk;
    b = item / nchunk;
    n = std::min(kGrpoChunk, a.T - t0);
    off = b * a.T + t0;
    lp = static_cast<const scalar_t*>(a.logp) + off;
    old = a.p.has_old ? static_cast<const scalar_t*>(a.old) + off : nullptr;
    ref = a.p.has_ref ? static_cast<const scalar_t*>(a.ref) + off : nullptr;
    mask = static_cast<const mask_t*>(a.mask) + off;
  }
  float logp(int64_t i) const { return static_cast<float>(lp[i]); }
  float old_logp(int64_t i) const { return a.p.has_old ? static_cast<float>(old[i]) : logp(i); }
  float ref_logp(int64_t i) const { return a.p.has_ref ? static_cast<float>(ref[i]) : logp(i); }
  float weight(int64_t i) const { return static_cast<float>(mask[i]); }
  float adv(int64_t i) const { return a.adv_per_token ? a.adv[off + i] : a.adv[b]; }
};

template <typename scalar_t, typename mask_t>
void fwd_items_scalar(const GrpoArgs& a, int64_t begin, int64_t end, double* partials) {
  for (int64_t item = begin; item < end; ++item) {
    const ScalarItem<scalar_t, mask_t> x(a, item);
    double s[kNumSums] = {0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < x.n; ++i) {
      const float m = x.weight(i);
      if (m == 0.f) continue;  // a masked-out token adds exactly 0, even where its terms are NaN/inf
      const TokenTerms t = token_terms(x.logp(i), x.old_logp(i), x.ref_logp(i), x.adv(i), a.p);
      s[0] += t.pg * m;
      s[1] += t.kl * m;
      s[2] += m;
      s[3] += t.high * m;
      s[4] += t.low * m;
      s[5] += t.ppo * m;
    }
    for (int k = 0; k < kNumSums; ++k) partials[item * kNumSums + k] = s[k];
  }
}

template <typename scalar_t, typename mask_t>
void bwd_items_scalar(const GrpoArgs& a, float grad_loss, const float* row_weight, void* dlogp, int64_t begin,
                      int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const ScalarItem<scalar_t, mask_t> x(a, item);
    scalar_t* dlp = static_cast<scalar_t*>(dlogp) + x.off;
    const float c = grad_loss * row_weight[x.b];
    for (int64_t i = 0; i < x.n; ++i) {
      const float m = x.weight(i);
      // a masked-out token gets exactly 0, even where its terms are NaN/inf (select, not 0 * x)
      dlp[i] = static_cast<scalar_t>(m == 0.f ? 0.f : c * m * token_grad(x.logp(i), x.old_logp(i), x.ref_logp(i), x.adv(i), a.p));
    }
  }
}

// ---------------------------------------------------------------- dispatch and threads

void fwd_items(Path path, const GrpoArgs& a, int64_t begin, int64_t end, double* partials) {
  switch (path) {
    case Path::kAvx512: return grpo_avx512::fwd_items(a, begin, end, partials);
    case Path::kAvx2: return grpo_avx2::fwd_items(a, begin, end, partials);
    case Path::kDefault: return grpo_default::fwd_items(a, begin, end, partials);
    case Path::kScalar:
      return grpo_default::dispatch(a, [&](auto* s, auto* m) {
        fwd_items_scalar<std::remove_pointer_t<decltype(s)>, std::remove_pointer_t<decltype(m)>>(a, begin, end,
                                                                                                 partials);
      });
  }
}

void bwd_items(Path path, const GrpoArgs& a, float g, const float* rw, void* dlogp, int64_t begin, int64_t end) {
  switch (path) {
    case Path::kAvx512: return grpo_avx512::bwd_items(a, g, rw, dlogp, begin, end);
    case Path::kAvx2: return grpo_avx2::bwd_items(a, g, rw, dlogp, begin, end);
    case Path::kDefault: return grpo_default::bwd_items(a, g, rw, dlogp, begin, end);
    case Path::kScalar:
      return grpo_default::dispatch(a, [&](auto* s, auto* m) {
        bwd_items_scalar<std::remove_pointer_t<decltype(s)>, std::remove_pointer_t<decltype(m)>>(a, g, rw, dlogp,
                                                                                                 begin, end);
      });
  }
}

GrpoArgs make_args(const at::Tensor& logp, const at::Tensor& adv, const at::Tensor& mask,
                   const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref, const Params& p) {
  const at::ScalarType t = logp.scalar_type();
  return GrpoArgs{t == at::kFloat ? GrpoDtype::kFloat : (t == at::kBFloat16 ? GrpoDtype::kBFloat16 : GrpoDtype::kHalf),
                  logp.const_data_ptr(),
                  old.has_value() ? old->const_data_ptr() : nullptr,
                  ref.has_value() ? ref->const_data_ptr() : nullptr,
                  adv.const_data_ptr<float>(),
                  adv.dim() == 2,
                  mask.const_data_ptr(),
                  mask.scalar_type() == at::kBool,
                  logp.size(1),
                  p};
}

// Items per task: each thread gets at least ~8k tokens (below that, waking threads costs more than
// it saves).
int64_t grain(int64_t T) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, std::min(T, kGrpoChunk))); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& ref_logp, double clip_low, double clip_high, std::optional<double> dual_clip,
    double kl_coef, c10::string_view kl_type, c10::string_view loss_agg) {
  check_inputs(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip);
  const int kl = parse_kl_type(kl_type);
  const int agg = parse_loss_agg(loss_agg);
  const Params p = make_params(clip_low, clip_high, dual_clip, kl_coef, kl, old_logp.has_value(), ref_logp.has_value());
  const int64_t B = logp.size(0), T = logp.size(1);
  const int64_t nchunk = (T + kGrpoChunk - 1) / kGrpoChunk;
  const auto f32 = logp.options().dtype(at::kFloat);
  std::vector<double> partials(static_cast<size_t>(B * nchunk * kNumSums), 0.0);
  if (B * T > 0) {
    const GrpoArgs a = make_args(logp, advantages, mask, old_logp, ref_logp, p);
    const Path cpu = path();
    at::parallel_for(0, B * nchunk, grain(T),
                     [&](int64_t begin, int64_t end) { fwd_items(cpu, a, begin, end, partials.data()); });
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
  const int64_t nchunk = (T + kGrpoChunk - 1) / kGrpoChunk;
  const GrpoArgs a = make_args(logp, advantages, mask, old_logp, ref_logp, p);
  const Path cpu = path();
  void* dp = dlogp.data_ptr();
  at::parallel_for(0, B * nchunk, grain(T),
                   [&](int64_t begin, int64_t end) { bwd_items(cpu, a, g, rw, dp, begin, end); });
  return dlogp;
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  m.impl("grpo_loss_fwd", &grpo_loss_fwd_cpu);
  m.impl("grpo_loss_bwd", &grpo_loss_bwd_cpu);
}

// A query, not a kernel (hence not in csrc/ops.cpp's list): the CPU path the next grpo_loss call
// takes ("scalar", "default", "avx2", "avx512"), for tests and benchmarks.
TORCH_LIBRARY_FRAGMENT(ENGINE_NAMESPACE, m) { m.def("grpo_loss_cpu_path() -> str", &grpo_loss_cpu_path); }

}  // namespace engine
