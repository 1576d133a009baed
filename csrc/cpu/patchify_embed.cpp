// CPU kernels of engine.ops.patchify_embed: raw pixels -> patch embeddings, pixel_values never written.
//
// Where the time goes: patch embedding is 2*N*K*D FLOPs on N*K inputs, so it is the GEMM; the
// processor's fp32 [N, 1176] tensor and its normalization are pure overhead. The forward gathers the
// raw pixels of a chunk of merge-block rows (about 256 patches, cpu/patch_chunks.h) into a small
// per-thread buffer (centred, in the GEMM dtype, ~300 KB: stays in L2) and calls one GEMM per chunk
// into its slice of the output, OpenMP over chunks. With the normalization and the Tp repeat folded
// into the weight (patch_common.h) that GEMM has K = C*P*P, half of the Conv3d's.
#include "cpu/patch_chunks.h"
#include "patch_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {
using namespace engine_patch;
using at::Tensor;

// Per-channel value of each of the 256 uint8 pixels: a table lookup replaces the int -> float -> dst
// conversion chain (which gcc does not vectorize for bf16), the gather's only arithmetic.
template <typename dst_t>
struct ByteTable {
  std::vector<dst_t> v;  // [C][256]
};

// Patch rows of merge rows [bh0, bh1) of one image [C, H, W], in the processor's order
// (block row, block col, row in block, col in block), features (c, ph, pw) of (x - z[c]).
// Reads each image line once, contiguously. `table`: [C][256] values for uint8 images, else null.
template <typename src_t, typename dst_t>
void gather_centered(const src_t* img, int64_t C, int64_t H, int64_t W, int64_t P, int64_t M, int64_t bh0, int64_t bh1,
                     const float* z, const dst_t* table, dst_t* dst, int64_t ld) {
  // Output-row order: each patch row is written once, front to back (streaming writes); the pixels
  // it reads (one band of P*M image lines) stay in L1/L2.
  const int64_t Wb = W / P / M;
  int64_t n = 0;
  for (int64_t bh = bh0; bh < bh1; ++bh)
    for (int64_t bw = 0; bw < Wb; ++bw)
      for (int64_t mh = 0; mh < M; ++mh)
        for (int64_t mw = 0; mw < M; ++mw, ++n) {
          const src_t* origin = img + (bh * M + mh) * P * W + (bw * M + mw) * P;
          dst_t* d = dst + n * ld;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t ph = 0; ph < P; ++ph, d += P) {
              const src_t* s = origin + (c * H + ph) * W;
              if constexpr (std::is_same_v<src_t, uint8_t>) {
                const dst_t* t = table + c * 256;
                for (int64_t pw = 0; pw < P; ++pw) d[pw] = t[s[pw]];
              } else {
                const float zc = z[c];
                for (int64_t pw = 0; pw < P; ++pw) d[pw] = static_cast<dst_t>(static_cast<float>(s[pw]) - zc);
              }
            }
        }
}

template <typename dst_t>
std::vector<dst_t> byte_table(const Norm& n) {
  std::vector<dst_t> t(n.z.size() * 256);
  for (size_t c = 0; c < n.z.size(); ++c)
    for (int v = 0; v < 256; ++v) t[c * 256 + v] = static_cast<dst_t>(static_cast<float>(v) - n.z[c]);
  return t;
}

template <typename dst_t>
void gather_chunk(const Tensor& image, const Chunk& ch, const ImageSet& s, const Norm& n, const std::vector<dst_t>& table, dst_t* dst,
                  int64_t ld) {
  const int64_t C = image.size(1), H = image.size(2), W = image.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, image.scalar_type(), "patchify_embed_gather", [&] {
    const scalar_t* img = image.data_ptr<scalar_t>() + ch.b * C * H * W;
    gather_centered<scalar_t, dst_t>(img, C, H, W, s.P, s.M, ch.bh0, ch.bh1, n.z.data(), table.data(), dst, ld);
  });
}

// fold_weight (patch_common.h) in one pass over the weight: the ATen version's dozen small strided
// ops cost ~3 ms at D = 1280, a fifth of the bf16 GEMM.
Tensor fold_weight_cpu(const Tensor& weight_in, const c10::optional<Tensor>& bias_in, const Norm& n, int64_t Kpad) {
  const Tensor weight = weight_in.contiguous();
  const int64_t D = weight.size(0), C = weight.size(1), Tp = weight.size(2), PP = weight.size(3) * weight.size(4), K = C * PP;
  Tensor out = at::empty({D, Kpad}, weight.options());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const Tensor bias = has_bias ? bias_in->to(at::kFloat).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fold_weight_cpu", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
    at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
      std::vector<float> ws(K);
      for (int64_t d = d0; d < d1; ++d) {
        const scalar_t* wd = w + d * C * Tp * PP;
        double bias_eff = b ? b[d] : 0.0;
        for (int64_t c = 0; c < C; ++c) {
          float* acc = ws.data() + c * PP;
          for (int64_t p = 0; p < PP; ++p) acc[p] = 0.f;
          for (int64_t t = 0; t < Tp; ++t)
            for (int64_t p = 0; p < PP; ++p) acc[p] += static_cast<float>(wd[(c * Tp + t) * PP + p]);
          double sum_c = 0.0;
          for (int64_t p = 0; p < PP; ++p) sum_c += acc[p];
          bias_eff += n.k[c] * sum_c;
          for (int64_t p = 0; p < PP; ++p) o[d * Kpad + c * PP + p] = static_cast<scalar_t>(n.a[c] * acc[p]);
        }
        const scalar_t hi = static_cast<scalar_t>(static_cast<float>(bias_eff));
        o[d * Kpad + K] = hi;
        o[d * Kpad + K + 1] = static_cast<scalar_t>(static_cast<float>(bias_eff - static_cast<double>(static_cast<float>(hi))));
        for (int64_t k = K + 2; k < Kpad; ++k) o[d * Kpad + k] = static_cast<scalar_t>(0.f);
      }
    });
  });
  return out;
}

void check_cpu(const Tensor& weight) {
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "weight must be a CPU tensor for the cpp backend, got ", weight.device());
}

// ---- forward and backward ----

Tensor patchify_embed_fwd_cpu(at::TensorList images, const Tensor& weight, const c10::optional<Tensor>& bias, int64_t merge_size,
                              c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale) {
  check_weight(weight, bias);
  check_cpu(weight);
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(3), K = C * P * P;
  const ImageSet s = check_images(images, C, P, merge_size, weight.device());
  const Norm n = make_norm(mean, std, rescale, C);
  const int64_t Kpad = round_up(K + 2, 16);
  const Tensor rhs = fold_weight_cpu(weight, bias, n, Kpad).t();  // [Kpad, D]
  const std::vector<Tensor> imgs = contiguous_all(images);
  int64_t max_rows = 0;
  Tensor out = at::empty({s.total_patches, D}, weight.options());
  // ~256 patch rows per GEMM: big enough for full-speed AMX/AVX-512 tiles, small enough that the
  // gathered block (256 x 592 bf16 = 300 KB) stays in L2 between the gather and the GEMM. One parallel
  // region: each thread gathers and multiplies its own chunks (the GEMMs inside run single-threaded).
  const std::vector<Chunk> chunks = make_chunks(imgs, s, 256, &max_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "patchify_embed_fwd", [&] {
    const std::vector<scalar_t> table = byte_table<scalar_t>(n);
    at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
      Tensor buf = at::empty({max_rows, Kpad}, weight.options());
      buf.narrow(1, K, Kpad - K).zero_();
      buf.narrow(1, K, 2).fill_(1);  // the bias_eff columns
      for (int64_t i = lo; i < hi; ++i) {
        const Chunk& ch = chunks[i];
        gather_chunk<scalar_t>(imgs[ch.img], ch, s, n, table, buf.data_ptr<scalar_t>(), Kpad);
        Tensor dst = out.narrow(0, ch.row0, ch.rows);
        at::mm_out(dst, buf.narrow(0, 0, ch.rows), rhs);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> patchify_embed_bwd_cpu(const Tensor& grad, at::TensorList images, const Tensor& weight, int64_t merge_size,
                                                  c10::ArrayRef<double> mean, c10::ArrayRef<double> std, double rescale) {
  check_weight(weight, c10::nullopt);
  check_cpu(weight);
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(3), K = C * P * P;
  const ImageSet s = check_images(images, C, P, merge_size, weight.device());
  check_embed_grad(grad, s, D);
  const Norm n = make_norm(mean, std, rescale, C);
  const std::vector<Tensor> imgs = contiguous_all(images);
  int64_t max_rows = 0;
  const std::vector<Chunk> chunks = make_chunks(imgs, s, 256, &max_rows);
  // Backward is one fp32 GEMM grad^T [D, N] @ (x - z) [N, C*P*P]: the centred pixels (half of
  // pixel_values, no Tp repeat) are gathered once for it.
  Tensor xc = at::empty({s.total_patches, K}, weight.options().dtype(at::kFloat));
  float* xc_p = xc.data_ptr<float>();
  at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
    const std::vector<float> table = byte_table<float>(n);
    for (int64_t i = lo; i < hi; ++i) gather_chunk<float>(imgs[chunks[i].img], chunks[i], s, n, table, xc_p + chunks[i].row0 * K, K);
  });
  return embed_weight_grads(grad, xc, weight, n);
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  m.impl("patchify_embed_fwd", &patchify_embed_fwd_cpu);
  m.impl("patchify_embed_bwd", &patchify_embed_bwd_cpu);
}
