// CPU kernel of engine.ops.patchify: images -> the image processor's fp32 pixel_values [N, C*Tp*P*P].
//
// Bandwidth-bound: it writes 4*Tp bytes per pixel read. OpenMP over chunks of merge-block rows
// (cpu/patch_chunks.h); each output row is written once, front to back, and each frame is normalized
// once and copied Tp - 1 times. uint8 pixels go through a [C][256] table of normalized values.
#include "cpu/patch_chunks.h"
#include "patch_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {
using namespace engine_patch;
using at::Tensor;

// `table`: [C][256] normalized values for uint8 images (exactly the formula below, precomputed), else null.
template <typename src_t>
void patchify_image(const src_t* img, int64_t C, int64_t H, int64_t W, int64_t P, int64_t Tp, int64_t M, int64_t bh0, int64_t bh1,
                    const Norm& n, const float* table, float* dst) {
  // Output-row order (streaming writes, as in gather_centered); each frame is written once and copied Tp-1 times.
  const int64_t Wb = W / P / M, PP = P * P;
  float* d = dst;
  for (int64_t bh = bh0; bh < bh1; ++bh)
    for (int64_t bw = 0; bw < Wb; ++bw)
      for (int64_t mh = 0; mh < M; ++mh)
        for (int64_t mw = 0; mw < M; ++mw) {
          const src_t* origin = img + (bh * M + mh) * P * W + (bw * M + mw) * P;
          for (int64_t c = 0; c < C; ++c, d += Tp * PP) {
            const float m = n.mean[c], sd = n.std_[c];
            for (int64_t ph = 0; ph < P; ++ph) {
              const src_t* s = origin + (c * H + ph) * W;
              float* f = d + ph * P;
              if constexpr (std::is_same_v<src_t, uint8_t>) {
                const float* t = table + c * 256;
                for (int64_t pw = 0; pw < P; ++pw) f[pw] = t[s[pw]];
              } else {
                // the processor rescales in float64 and rounds once to float32, then normalizes in float32
                for (int64_t pw = 0; pw < P; ++pw) f[pw] = (static_cast<float>(static_cast<double>(s[pw]) * n.rescale) - m) / sd;
              }
            }
            for (int64_t t = 1; t < Tp; ++t) std::memcpy(d + t * PP, d, PP * sizeof(float));  // the frame, repeated
          }
        }
}

std::vector<float> normalized_byte_table(const Norm& n) {
  std::vector<float> t(n.mean.size() * 256);
  for (size_t c = 0; c < n.mean.size(); ++c)
    for (int v = 0; v < 256; ++v) t[c * 256 + v] = (static_cast<float>(static_cast<double>(v) * n.rescale) - n.mean[c]) / n.std_[c];
  return t;
}

Tensor patchify_fwd_cpu(at::TensorList images, int64_t patch_size, int64_t temporal_patch_size, int64_t merge_size, c10::ArrayRef<double> mean,
                        c10::ArrayRef<double> std, double rescale) {
  TORCH_CHECK_VALUE(images.size() > 0, "images must hold at least one image");
  TORCH_CHECK_VALUE(temporal_patch_size > 0, "temporal_patch_size must be positive, got ", temporal_patch_size);
  const int64_t C = images[0].dim() == 4 ? images[0].size(1) : 0;
  const ImageSet s = check_images(images, C, patch_size, merge_size, images[0].device());
  TORCH_CHECK_VALUE(images[0].device().is_cpu(), "images must be CPU tensors for the cpp backend");
  const Norm n = make_norm(mean, std, rescale, C);
  const int64_t Tp = temporal_patch_size, P = patch_size, ld = C * Tp * P * P;
  const std::vector<Tensor> imgs = contiguous_all(images);
  int64_t max_rows = 0;
  const std::vector<Chunk> chunks = make_chunks(imgs, s, 64, &max_rows);
  Tensor out = at::empty({s.total_patches, ld}, imgs[0].options().dtype(at::kFloat));
  float* out_p = out.data_ptr<float>();
  const std::vector<float> table = normalized_byte_table(n);
  at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Chunk& ch = chunks[i];
      const Tensor& image = imgs[ch.img];
      const int64_t H = image.size(2), W = image.size(3);
      AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, image.scalar_type(), "patchify", [&] {
        const scalar_t* img = image.data_ptr<scalar_t>() + ch.b * C * H * W;
        patchify_image<scalar_t>(img, C, H, W, P, Tp, s.M, ch.bh0, ch.bh1, n, table.data(), out_p + ch.row0 * ld);
      });
    }
  });
  return out;
}

}  // namespace

#include "engine_namespace.h"  // ENGINE_NAMESPACE: `engine`, or the CMake build's own
TORCH_LIBRARY_IMPL(ENGINE_NAMESPACE, CPU, m) {
  m.impl("patchify_fwd", &patchify_fwd_cpu);
}
