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

}  // namespace keel::cuda::detail
