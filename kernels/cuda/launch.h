// Private to kernels/cuda/*.cu: launch geometry and argument checks shared by the launchers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "kernels/base/check.h"
#include "kernels/cuda/cuda_check.h"

namespace keel::cuda::detail {

inline constexpr int kThreadsPerBlock = 256;
// Grid-stride kernels never need more blocks than this to fill a GPU.
inline constexpr int64_t kMaxGridBlocks = 65535;

// Blocks for a grid-stride loop over `count` elements.
inline unsigned grid_for(int64_t count, int threads = kThreadsPerBlock) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((count + threads - 1) / threads, 1, kMaxGridBlocks));
}

// Argument checks at the launcher boundary throw keel::Error (the caller passed bad shapes).
template <typename... Args>
void require(bool condition, Args&&... message) {
  if (!condition) throw_error(std::forward<Args>(message)...);
}

// One-dimensional grids over rows: the x dimension allows 2^31 - 1 blocks.
inline unsigned grid_for_rows(int64_t rows, const char* what) {
  require(rows <= int64_t{0x7fffffff}, what, ": ", rows, " rows exceed one grid dimension");
  return static_cast<unsigned>(rows);
}

// Grid of the grouped canonical GEMMs (gemm_canonical_grouped, qgemm_grouped): n / tile column
// tiles, one z slice per group, and row tiles per group for an even spread of the row bound
// (a hot group's blocks stride over its tiles). Needs dim3: include after cuda_runtime.
template <typename Dim3>
Dim3 grouped_gemm_grid(int64_t n, int64_t num_groups, int64_t max_group_rows,
                       int64_t total_rows_bound, int64_t tile) {
  const int64_t max_tiles = (max_group_rows + tile - 1) / tile;
  const int64_t mean_tiles = (total_rows_bound + num_groups * tile - 1) / (num_groups * tile);
  const int64_t row_tiles = std::clamp<int64_t>(mean_tiles, 1, std::min<int64_t>(max_tiles, 65535));
  return Dim3(static_cast<unsigned>((n + tile - 1) / tile), static_cast<unsigned>(row_tiles),
              static_cast<unsigned>(num_groups));
}

}  // namespace keel::cuda::detail
