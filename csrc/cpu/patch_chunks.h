// Work split of the CPU patch kernels (csrc/cpu/patchify.cpp, csrc/cpu/patchify_embed.cpp): a chunk is
// a run of merge-block rows of one image, whose patches are consecutive output rows, so each OpenMP
// task writes its own slice of the output.
#pragma once

#include "patch_common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace engine_patch {

// Merge rows [bh0, bh1) of image `b` of images[img]; its patches are output rows [row0, row0 + rows).
struct Chunk {
  int64_t img, b, bh0, bh1, row0, rows;
};

inline std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& images, const ImageSet& s, int64_t target_rows, int64_t* max_rows) {
  std::vector<Chunk> chunks;
  *max_rows = 0;
  for (size_t i = 0; i < images.size(); ++i) {
    const int64_t B = images[i].size(0), gh = images[i].size(2) / s.P, gw = images[i].size(3) / s.P;
    const int64_t per_row = gw * s.M, n_brows = gh / s.M;
    const int64_t step = std::max<int64_t>(1, target_rows / per_row);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t bh = 0; bh < n_brows; bh += step) {
        const int64_t bh1 = std::min(n_brows, bh + step);
        Chunk c{(int64_t)i, b, bh, bh1, s.first_patch[i] + b * gh * gw + bh * per_row, (bh1 - bh) * per_row};
        *max_rows = std::max(*max_rows, c.rows);
        chunks.push_back(c);
      }
    }
  }
  return chunks;
}

}  // namespace engine_patch
