// AVX-512 GEMM path: the canonical reduction of gemm.h with one __m512 per output element.
//
// Algorithm: the 16 lanes of a zmm register are the 16 canonical lanes, so one
// _mm512_fmadd_ps per 16 values of k is exactly "lane j += x[k] * w[k] for k = j mod 16"; the K
// tail uses zero-masked loads (missing lanes get fma(0, 0, acc), as the definition says) and
// the fold is the fixed tree 8/4/2/1 done with extract + add. Because every output element
// owns its accumulator from k = 0 to K, the bits cannot depend on M, N or the tiling.
//
// Blocking (speed only, never order): a register tile of kRows rows of x times kCols rows of w
// (4x6 = 24 accumulators for prefill, 1x8 for decode) loads each x vector once per kCols
// outputs and each converted weight vector once per kRows outputs. Weight rows are taken in
// groups of about kWeightGroupBytes that stay in L2 while every row tile of x sweeps over them,
// so for large M the weights come from DRAM once and x comes from L2/L3; meanwhile the next
// group is prefetched into L2 (see L2Prefetcher).
//
// Memory layout: x [M, K] fp32, w [N, K] in storage dtype (bf16 widened by a 16-bit shift, f16
// through F16C, f32 as is), y [M, N] fp32; all row-major with the strides of GemmArgs.

// GCC 12 warns about the self-initialised "undefined" vectors inside its own AVX-512 intrinsics
// once they are inlined (GCC bug 105593, fixed in later releases); the warning points into the
// header, so silencing it for the header's lines leaves our own code fully checked.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/gemm_internal.h"

namespace keel::cpu::detail {

namespace {

constexpr int kLanes = kCanonicalLanes;
static_assert(kLanes == 16, "one zmm register holds the 16 canonical lanes");

// Register tile widths: kRows x kCols accumulators plus kRows x vectors and a weight vector
// must fit in the 32 zmm registers without spilling.
constexpr int kMaxTileRows = 4;
constexpr int cols_for_rows(int rows) {
  return rows == 4 ? 6 : 8;
}
// Weight groups are rounded to a multiple of every tile width so that only the last group of
// a matrix has a narrow edge tile.
constexpr int64_t kGroupRowMultiple = 24;

// Weight prefetching: while a group of weight rows is being used, the next group is requested
// into L2, spread evenly over the group's tile calls. This keeps DRAM busy during every pass
// of x over the group (not only the first), and for decode it is a steady stream one group
// ahead. (Prefetching into L1 a fixed distance ahead on each row measured slower: it ties up
// L1 miss buffers that the hardware prefetcher uses better.)
constexpr int64_t kCacheLineBytes = 64;

// Requests `bytes` from `begin` into L2 in `num_steps` roughly equal installments.
class L2Prefetcher {
 public:
  L2Prefetcher(const char* begin, int64_t bytes, int64_t num_steps)
      : begin_(begin),
        bytes_(num_steps > 0 ? bytes : 0),
        bytes_per_step_(num_steps > 0 ? (bytes + num_steps - 1) / num_steps : 0) {}

  inline void step() {
    requested_goal_ = std::min(requested_goal_ + bytes_per_step_, bytes_);
    for (; requested_ < requested_goal_; requested_ += kCacheLineBytes) {
      _mm_prefetch(begin_ + requested_, _MM_HINT_T1);
    }
  }

 private:
  const char* begin_;
  int64_t bytes_;
  int64_t bytes_per_step_;
  int64_t requested_ = 0;
  int64_t requested_goal_ = 0;
};

template <DType kDtype>
struct WeightStorage {
  using Type = uint16_t;
};
template <>
struct WeightStorage<DType::kF32> {
  using Type = float;
};
template <DType kDtype>
using Weight = typename WeightStorage<kDtype>::Type;

// 16 consecutive weights widened to fp32, lane j holding weight j (exact for every dtype).
template <DType kDtype>
inline __m512 load_weights(const Weight<kDtype>* w) {
  if constexpr (kDtype == DType::kF32) {
    return _mm512_loadu_ps(w);
  } else {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    if constexpr (kDtype == DType::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(raw);
    }
  }
}

// As load_weights, but only the lanes in `mask` are read; the others are +0.0f.
template <DType kDtype>
inline __m512 load_weights_masked(const Weight<kDtype>* w, __mmask16 mask) {
  if constexpr (kDtype == DType::kF32) {
    return _mm512_maskz_loadu_ps(mask, w);
  } else {
    __m256i raw = _mm256_maskz_loadu_epi16(mask, w);
    if constexpr (kDtype == DType::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(raw);
    }
  }
}

// The fixed folding tree of gemm.h: lane i += lane i+8, i += i+4, i += i+2, then 0 + 1.
inline float fold_lanes(__m512 lanes) {
  __m256 sum8 = _mm256_add_ps(_mm512_castps512_ps256(lanes), _mm512_extractf32x8_ps(lanes, 1));
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum2, _mm_movehdup_ps(sum2)));
}

// One register tile: rows [0, rows) of x against rows [0, cols) of w, over the whole of k.
struct TileArgs {
  const float* x;
  int64_t ldx;
  const void* w;
  int64_t ldw;
  float* y;
  int64_t ldy;
  int64_t k;
  const char* prefetch_begin;  // this call's share of the next weight group (L2Prefetcher)
  int64_t prefetch_bytes;
};

template <DType kDtype, int kRows, int kCols>
void compute_tile(const TileArgs& tile) {
  const float* x = tile.x;
  const int64_t ldx = tile.ldx;
  const auto* w = static_cast<const Weight<kDtype>*>(tile.w);
  const int64_t ldw = tile.ldw;
  const int64_t k = tile.k;
  const int64_t k_full = k - k % kLanes;
  L2Prefetcher prefetch(tile.prefetch_begin, tile.prefetch_bytes, k_full / kLanes);

  __m512 acc[kRows][kCols];
#pragma GCC unroll 8
  for (int row = 0; row < kRows; ++row) {
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) acc[row][col] = _mm512_setzero_ps();
  }

  for (int64_t k_idx = 0; k_idx < k_full; k_idx += kLanes) {
    prefetch.step();
    __m512 x_chunk[kRows];
#pragma GCC unroll 8
    for (int row = 0; row < kRows; ++row) x_chunk[row] = _mm512_loadu_ps(x + row * ldx + k_idx);
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      __m512 w_values = load_weights<kDtype>(w + col * ldw + k_idx);
#pragma GCC unroll 8
      for (int row = 0; row < kRows; ++row) {
        acc[row][col] = _mm512_fmadd_ps(x_chunk[row], w_values, acc[row][col]);
      }
    }
  }
  if (k_full < k) {
    const auto tail_mask = static_cast<__mmask16>((1u << (k - k_full)) - 1u);
    __m512 x_chunk[kRows];
#pragma GCC unroll 8
    for (int row = 0; row < kRows; ++row) {
      x_chunk[row] = _mm512_maskz_loadu_ps(tail_mask, x + row * ldx + k_full);
    }
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      __m512 w_values = load_weights_masked<kDtype>(w + col * ldw + k_full, tail_mask);
#pragma GCC unroll 8
      for (int row = 0; row < kRows; ++row) {
        acc[row][col] = _mm512_fmadd_ps(x_chunk[row], w_values, acc[row][col]);
      }
    }
  }

#pragma GCC unroll 8
  for (int row = 0; row < kRows; ++row) {
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) tile.y[row * tile.ldy + col] = fold_lanes(acc[row][col]);
  }
}

// Calls compute_tile<kDtype, kRows, cols> for a run-time cols in [1, kCols].
template <DType kDtype, int kRows, int kCols>
void compute_tile_cols(int cols, const TileArgs& tile) {
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      compute_tile_cols<kDtype, kRows, kCols - 1>(cols, tile);
      return;
    }
  }
  compute_tile<kDtype, kRows, kCols>(tile);
}

template <DType kDtype>
void compute_tile_any(int rows, int cols, const TileArgs& tile) {
  switch (rows) {
    case 1:
      compute_tile_cols<kDtype, 1, cols_for_rows(1)>(cols, tile);
      break;
    case 2:
      compute_tile_cols<kDtype, 2, cols_for_rows(2)>(cols, tile);
      break;
    case 3:
      compute_tile_cols<kDtype, 3, cols_for_rows(3)>(cols, tile);
      break;
    default:
      compute_tile_cols<kDtype, 4, cols_for_rows(4)>(cols, tile);
      break;
  }
}

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

template <DType kDtype>
void gemm_typed(const GemmArgs& args) {
  const auto* w_bytes = static_cast<const char*>(args.w);
  const int64_t element_bytes = static_cast<int64_t>(sizeof(Weight<kDtype>));
  const int64_t w_row_bytes = args.ldw * element_bytes;
  const int64_t group_rows =
      std::max<int64_t>(kGroupRowMultiple, kWeightGroupBytes / (args.k * element_bytes) /
                                               kGroupRowMultiple * kGroupRowMultiple);

  for (int64_t group_start = 0; group_start < args.n; group_start += group_rows) {
    const int64_t group_end = std::min(args.n, group_start + group_rows);
    const int64_t group_cols = group_end - group_start;
    // The next group's rows, to be requested into L2 in equal shares by this group's tiles.
    const int64_t next_group_rows = std::min(args.n, group_end + group_rows) - group_end;
    const char* next_group = next_group_rows > 0 ? w_bytes + group_end * w_row_bytes : nullptr;
    const int64_t next_group_bytes = next_group_rows * w_row_bytes;
    int64_t num_tile_calls = 0;
    for (int64_t row_start = 0; row_start < args.m; row_start += kMaxTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxTileRows, args.m - row_start));
      num_tile_calls += ceil_div(group_cols, cols_for_rows(rows));
    }

    int64_t tile_call = 0;
    for (int64_t row_start = 0; row_start < args.m; row_start += kMaxTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxTileRows, args.m - row_start));
      const int tile_cols = cols_for_rows(rows);
      for (int64_t col_start = group_start; col_start < group_end; col_start += tile_cols) {
        const int cols = static_cast<int>(std::min<int64_t>(tile_cols, group_end - col_start));
        const int64_t share_begin = next_group_bytes * tile_call / num_tile_calls;
        const int64_t share_end = next_group_bytes * (tile_call + 1) / num_tile_calls;
        ++tile_call;
        TileArgs tile{args.x + row_start * args.ldx,
                      args.ldx,
                      w_bytes + col_start * w_row_bytes,
                      args.ldw,
                      args.y + row_start * args.ldy + col_start,
                      args.ldy,
                      args.k,
                      next_group != nullptr ? next_group + share_begin : nullptr,
                      share_end - share_begin};
        compute_tile_any<kDtype>(rows, cols, tile);
      }
    }
  }
}

}  // namespace

void gemm_avx512(const GemmArgs& args) {
  switch (args.w_dtype) {
    case DType::kBF16:
      gemm_typed<DType::kBF16>(args);
      break;
    case DType::kF16:
      gemm_typed<DType::kF16>(args);
      break;
    case DType::kF32:
      gemm_typed<DType::kF32>(args);
      break;
  }
}

}  // namespace keel::cpu::detail
