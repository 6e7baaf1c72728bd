// The CPU rank-order sum that every fixed_order all-reduce on the host is built from (thread
// and MPI backends; the NCCL backend's device twin is comm/nccl/ordered_sum.h, tested equal).
//
//   out[i] = ((sources[0][i] + sources[1][i]) + sources[2][i]) + ...   in fp32, in that order
//
// Partial sums accumulate in an L1-resident tile (4 KiB) so each pass is a plain vectorisable
// a[i] += b[i] over non-aliasing arrays; vectorising across i never changes any element's order.
// Destinations may be sources (same index range): a tile is read from every source before it
// is written anywhere. Chunk boundaries are multiples of 64 bytes so owners never share a line.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace keel::comm {

inline constexpr size_t kChunkAlignElems = 64 / sizeof(float);
inline constexpr size_t kRankOrderTileElems = 1024;

inline size_t round_up(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Elements per chunk when `count` elements are split into `num_chunks` 64-byte-aligned chunks.
inline size_t aligned_chunk_elems(size_t count, size_t num_chunks) {
  return round_up((count + num_chunks - 1) / num_chunks, kChunkAlignElems);
}

// Writes the rank-order sum of `num_sources` (>= 2) arrays of `n` floats to each of the
// `num_destinations` arrays.
inline void sum_in_rank_order(const float* const* sources, int num_sources,
                              float* const* destinations, int num_destinations, size_t n) {
  alignas(64) float tile[kRankOrderTileElems];
  for (size_t done = 0; done < n; done += kRankOrderTileElems) {
    const size_t len = std::min(kRankOrderTileElems, n - done);
    const float* __restrict first = sources[0] + done;
    const float* __restrict second = sources[1] + done;
    for (size_t i = 0; i < len; ++i) tile[i] = first[i] + second[i];
    for (int k = 2; k < num_sources; ++k) {
      const float* __restrict addend = sources[k] + done;
      for (size_t i = 0; i < len; ++i) tile[i] += addend[i];
    }
    for (int k = 0; k < num_destinations; ++k)
      std::memcpy(destinations[k] + done, tile, len * sizeof(float));
  }
}

}  // namespace keel::comm
