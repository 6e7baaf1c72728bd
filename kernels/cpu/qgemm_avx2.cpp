// AVX2 path of the quantized GEMM (qgemm.h): the canonical reduction of gemm.h with two __m256
// per output element (canonical lanes 0..7 and 8..15), the weights decoded from the packed
// codes 16 at a time in registers, bit-identical to the scalar decoders of quant_math.h.
//
// Decoding one chunk of 16 weights (k = 16c .. 16c+15) of one weight row:
//  - 4-bit formats (NVFP4, MXFP4, int4 with group % 16 == 0): the 8 code bytes are widened to
//    words w and w | w << 4 puts nibble j into the low 4 bits of byte j; bytes widen to dword
//    indices. Each scale group has a 16-entry table of its decoded weights, computed with the
//    scalar definition's own operations whenever the group changes:
//      NVFP4  table[i] = e2m1(i) * (e4m3(scale) * row_scale)   (block scale: one scalar multiply)
//      MXFP4  table[i] = e2m1(i) * e8m0(scale)
//      int4   table[i] = float(i - zero) * scale
//    so a weight is one table lookup: for int4 two vpermps (entries 0..7 and 8..15, which use
//    index bits 0..2) and a blend on index bit 3 (shifted to the sign bit); for the E2M1 formats
//    one vpermps of the magnitude entries with the code's sign bit xor-ed in (NaN scales give
//    NaN either way; only a NaN's sign bit may differ from the scalar product's).
//  - FP8 block: 16 E4M3 codes widened to dwords; normal codes by bits ((code & 0x7f) << 20 plus
//    the exponent rebias), subnormals as float(mantissa) * 2^-9, 0x7f as NaN, then the sign; the
//    product with the block's fp32 scale as in the definition.
//  - int4 with act order or a group size that is not a multiple of 16: each weight decoded by
//    itself into a 16-float stack tile (slow but exact).
// Lanes at or past K are set to +0 after decoding (so a NaN scale cannot leak into the tail)
// and meet zero-filled x: fma(0, 0, acc) as the definition says.
//
// Blocking (speed only, never order): a register tile of kRows rows of x times kCols weight rows
// decodes each weight chunk once per kRows outputs; weight rows are taken in groups of about
// kWeightGroupBytes (codes + scales) kept in L2 while every row tile of x sweeps them, and the
// next group's codes and scales are prefetched into L2 meanwhile, as in gemm_avx2.cpp.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/qgemm_internal.h"

namespace keel::cpu::detail {

namespace {

using math::WeightFormat;

constexpr int kLanes = kCanonicalLanes;
constexpr int kHalfLanes = 8;
static_assert(kLanes == 2 * kHalfLanes, "two ymm registers hold the 16 canonical lanes");

constexpr int kMaxTileRows = 4;
constexpr int cols_for_rows(int rows) {
  return rows == 1 ? 2 : 1;  // more spills the accumulators (16 ymm registers in all)
}
constexpr int64_t kGroupRowMultiple = 2;
constexpr int64_t kCacheLineBytes = 64;
constexpr int64_t kGemvMaxRows = 1;

// Requests `bytes` from `begin` into L2 in `num_steps` roughly equal installments.
class L2Prefetcher {
 public:
  L2Prefetcher(const char* begin, int64_t bytes, int64_t num_steps)
      : begin_(begin),
        bytes_(num_steps > 0 && begin != nullptr ? bytes : 0),
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

// 16 canonical lanes: lo = lanes 0..7, hi = lanes 8..15.
struct Vec16 {
  __m256 lo;
  __m256 hi;
};

// A 16-entry fp32 table (entries 0..7 and 8..15).
struct Table16 {
  __m256 lo;
  __m256 hi;
};

// For the E2M1 formats the table is sign-symmetric (entry 8 + i is -entry i: IEEE products are
// sign-symmetric), so one vpermps on the magnitude entries and the code's sign bit suffice.
inline __m256 lookup_signed(const Table16& table, __m256i indices) {
  const __m256i sign =
      _mm256_and_si256(_mm256_slli_epi32(indices, 28), _mm256_set1_epi32(INT32_MIN));
  return _mm256_xor_ps(_mm256_permutevar8x32_ps(table.lo, indices), _mm256_castsi256_ps(sign));
}

inline __m256 lookup(const Table16& table, __m256i indices) {
  const __m256 low = _mm256_permutevar8x32_ps(table.lo, indices);
  const __m256 high = _mm256_permutevar8x32_ps(table.hi, indices);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(indices, 28)));
}

// Dword j of (lo, hi) holds nibble j of the 8 bytes at `codes` in bits 0..3 (bits 4..7 hold
// the other nibble of the byte; every user looks at bits 0..3 only).
inline void nibble_indices(const uint8_t* codes, __m256i& lo, __m256i& hi) {
  __m128i words = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  words = _mm_or_si128(words, _mm_slli_epi16(words, 4));
  lo = _mm256_cvtepu8_epi32(words);
  hi = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(words, words));
}

// Lanes j < valid keep their value, the rest become +0.
alignas(32) constexpr int32_t kLaneMasks[2 * kLanes] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                        -1, -1, -1, -1, -1, 0,  0,  0,  0,  0,  0,
                                                        0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
inline Vec16 keep_lanes_below(Vec16 value, int valid) {
  const int32_t* mask = kLaneMasks + kLanes - valid;
  value.lo = _mm256_and_ps(value.lo, _mm256_loadu_ps(reinterpret_cast<const float*>(mask)));
  value.hi =
      _mm256_and_ps(value.hi, _mm256_loadu_ps(reinterpret_cast<const float*>(mask + kHalfLanes)));
  return value;
}

// ---- decoders: one weight row, chunks requested in increasing order from 0 ----
// full(c): the 16 weights of chunk c (all below K); tail(c, valid): the last chunk, of which
// only `valid` weights exist (the rest are +0).

// NVFP4, MXFP4 and int4 with group % 16 == 0: a table per scale group.
template <WeightFormat kFormat>
class Nibble4Decoder {
 public:
  Nibble4Decoder() = default;
  Nibble4Decoder(const math::WeightView& view, int64_t n, const CodeTables& tables)
      : codes_(static_cast<const uint8_t*>(view.data) + n * view.ld), tables_(&tables) {
    if constexpr (kFormat == WeightFormat::kInt4) {
      scales_f32_ = static_cast<const float*>(view.scales) + n * view.scale_ld;
      zeros_ = view.zeros + n * view.scale_ld;
      chunks_per_group_ = view.group_size / kLanes;
    } else {
      scales_u8_ = static_cast<const uint8_t*>(view.scales) + n * view.scale_ld;
      if constexpr (kFormat == WeightFormat::kNvfp4) {
        row_scale_ = view.row_scales[n];
        chunks_per_group_ = math::kNvfp4Group / kLanes;
      } else {
        chunks_per_group_ = math::kMxfp4Group / kLanes;
      }
    }
  }

  inline Vec16 full(int64_t chunk) { return decode(codes_ + chunk * (kLanes / 2), chunk); }

  inline Vec16 tail(int64_t chunk, int valid) {
    alignas(16) uint8_t bytes[kLanes / 2] = {};
    std::memcpy(bytes, codes_ + chunk * (kLanes / 2), static_cast<size_t>((valid + 1) / 2));
    return keep_lanes_below(decode(bytes, chunk), valid);
  }

 private:
  inline Vec16 decode(const uint8_t* bytes, int64_t chunk) {
    if (chunk == next_group_chunk_) {
      load_table(group_++);
      next_group_chunk_ = chunk + chunks_per_group_;
    }
    __m256i lo;
    __m256i hi;
    nibble_indices(bytes, lo, hi);
    if constexpr (kFormat == WeightFormat::kInt4) {
      return Vec16{lookup(table_, lo), lookup(table_, hi)};
    } else {
      return Vec16{lookup_signed(table_, lo), lookup_signed(table_, hi)};
    }
  }

  void load_table(int64_t group) {
    if constexpr (kFormat == WeightFormat::kInt4) {
      const __m256i zero = _mm256_set1_epi32(zeros_[group]);
      const __m256 scale = _mm256_set1_ps(scales_f32_[group]);
      const __m256i codes_lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i codes_hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
      table_.lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes_lo, zero)), scale);
      table_.hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes_hi, zero)), scale);
    } else {
      float scale;
      if constexpr (kFormat == WeightFormat::kNvfp4) {
        scale = tables_->e4m3[scales_u8_[group]] * row_scale_;
      } else {
        scale = tables_->e8m0[scales_u8_[group]];
      }
      const __m256 scale_vec = _mm256_set1_ps(scale);
      table_.lo = _mm256_mul_ps(_mm256_load_ps(tables_->e2m1), scale_vec);
      table_.hi = _mm256_mul_ps(_mm256_load_ps(tables_->e2m1 + kHalfLanes), scale_vec);
    }
  }

  const uint8_t* codes_ = nullptr;
  const CodeTables* tables_ = nullptr;
  const uint8_t* scales_u8_ = nullptr;
  const float* scales_f32_ = nullptr;
  const uint8_t* zeros_ = nullptr;
  float row_scale_ = 0.0f;
  int64_t chunks_per_group_ = 1;
  int64_t next_group_chunk_ = 0;
  int64_t group_ = 0;
  Table16 table_{};
};

// E4M3 codes (dwords, bits 0..7) to fp32, exactly as math::e4m3_to_f32.
inline __m256 e4m3_to_f32(__m256i codes) {
  const __m256i magnitude = _mm256_and_si256(codes, _mm256_set1_epi32(0x7f));
  const __m256 normal = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 subnormal =
      _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(0.001953125f));
  const __m256i is_subnormal = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude);
  const __m256i is_nan = _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7f));
  __m256 value = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(is_subnormal));
  value = _mm256_blendv_ps(value, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                           _mm256_castsi256_ps(is_nan));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(0x80)), 24);
  return _mm256_or_ps(value, _mm256_castsi256_ps(sign));
}

class Fp8BlockDecoder {
 public:
  Fp8BlockDecoder() = default;
  Fp8BlockDecoder(const math::WeightView& view, int64_t n, const CodeTables& /*tables*/)
      : codes_(static_cast<const uint8_t*>(view.data) + n * view.ld),
        scales_(static_cast<const float*>(view.scales) + n * view.scale_ld) {}

  inline Vec16 full(int64_t chunk) { return decode(codes_ + chunk * kLanes, chunk); }

  inline Vec16 tail(int64_t chunk, int valid) {
    alignas(16) uint8_t bytes[kLanes] = {};
    std::memcpy(bytes, codes_ + chunk * kLanes, static_cast<size_t>(valid));
    return keep_lanes_below(decode(bytes, chunk), valid);
  }

 private:
  static constexpr int64_t kChunksPerGroup = math::kFp8BlockGroup / kLanes;

  inline Vec16 decode(const uint8_t* bytes, int64_t chunk) {
    if (chunk == next_group_chunk_) {
      scale_ = _mm256_set1_ps(scales_[group_++]);
      next_group_chunk_ = chunk + kChunksPerGroup;
    }
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m256 lo = e4m3_to_f32(_mm256_cvtepu8_epi32(raw));
    const __m256 hi = e4m3_to_f32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(raw, raw)));
    return Vec16{_mm256_mul_ps(lo, scale_), _mm256_mul_ps(hi, scale_)};
  }

  const uint8_t* codes_ = nullptr;
  const float* scales_ = nullptr;
  int64_t next_group_chunk_ = 0;
  int64_t group_ = 0;
  __m256 scale_ = _mm256_setzero_ps();
};

// int4 with act order or a group size that is not a multiple of 16: weight by weight.
class Int4AnyGroupDecoder {
 public:
  Int4AnyGroupDecoder() = default;
  Int4AnyGroupDecoder(const math::WeightView& view, int64_t n, const CodeTables& /*tables*/)
      : codes_(static_cast<const uint8_t*>(view.data) + n * view.ld),
        zeros_(view.zeros + n * view.scale_ld),
        scales_(static_cast<const float*>(view.scales) + n * view.scale_ld),
        group_of_k_(view.group_of_k),
        group_size_(view.group_size) {}

  inline Vec16 full(int64_t chunk) { return tail(chunk, kLanes); }

  inline Vec16 tail(int64_t chunk, int valid) {
    alignas(32) float weights[kLanes] = {};
    for (int lane = 0; lane < valid; ++lane) {
      const int64_t k = chunk * kLanes + lane;
      const int64_t group = group_of_k_ != nullptr ? group_of_k_[k] : k / group_size_;
      const uint8_t byte = codes_[k >> 1];
      const int32_t code = (k & 1) ? byte >> 4 : byte & 0xf;
      weights[lane] = static_cast<float>(code - zeros_[group]) * scales_[group];
    }
    return Vec16{_mm256_load_ps(weights), _mm256_load_ps(weights + kHalfLanes)};
  }

 private:
  const uint8_t* codes_ = nullptr;
  const uint8_t* zeros_ = nullptr;
  const float* scales_ = nullptr;
  const int32_t* group_of_k_ = nullptr;
  int64_t group_size_ = 1;
};

// The fixed folding tree of gemm.h: lane i += lane i+8, i += i+4, i += i+2, then 0 + 1.
inline float fold_lanes(__m256 low_lanes, __m256 high_lanes) {
  __m256 sum8 = _mm256_add_ps(low_lanes, high_lanes);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum2, _mm_movehdup_ps(sum2)));
}

struct TileArgs {
  const float* x;
  int64_t ldx;
  const math::WeightView* view;
  int64_t first_weight_row;
  const CodeTables* tables;
  float* y;
  int64_t ldy;
  const char* prefetch_codes;  // this call's share of the next group's codes and scales
  int64_t prefetch_codes_bytes;
  const char* prefetch_scales;
  int64_t prefetch_scales_bytes;
};

template <typename Decoder, int kRows, int kCols>
void compute_tile(const TileArgs& tile) {
  const float* x = tile.x;
  const int64_t ldx = tile.ldx;
  const int64_t k = tile.view->cols;
  const int64_t num_full_chunks = k / kLanes;
  L2Prefetcher prefetch_codes(tile.prefetch_codes, tile.prefetch_codes_bytes, num_full_chunks);
  L2Prefetcher prefetch_scales(tile.prefetch_scales, tile.prefetch_scales_bytes, num_full_chunks);

  Decoder decoders[kCols];
#pragma GCC unroll 8
  for (int col = 0; col < kCols; ++col) {
    decoders[col] = Decoder(*tile.view, tile.first_weight_row + col, *tile.tables);
  }
  __m256 acc[kRows][kCols][2];
#pragma GCC unroll 8
  for (int row = 0; row < kRows; ++row) {
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      acc[row][col][0] = _mm256_setzero_ps();
      acc[row][col][1] = _mm256_setzero_ps();
    }
  }

  for (int64_t chunk = 0; chunk < num_full_chunks; ++chunk) {
    prefetch_codes.step();
    prefetch_scales.step();
    const float* x_chunk = x + chunk * kLanes;
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      const Vec16 w = decoders[col].full(chunk);
#pragma GCC unroll 8
      for (int row = 0; row < kRows; ++row) {
        acc[row][col][0] =
            _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk + row * ldx), w.lo, acc[row][col][0]);
        acc[row][col][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk + row * ldx + kHalfLanes), w.hi,
                                           acc[row][col][1]);
      }
    }
  }
  if (num_full_chunks * kLanes < k) {
    // Zero-padded copies of the last values of each x row: never reads past a row.
    const int valid = static_cast<int>(k - num_full_chunks * kLanes);
    alignas(32) float x_tail[kRows][kLanes] = {};
    for (int row = 0; row < kRows; ++row) {
      std::memcpy(x_tail[row], x + row * ldx + num_full_chunks * kLanes,
                  static_cast<size_t>(valid) * sizeof(float));
    }
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      const Vec16 w = decoders[col].tail(num_full_chunks, valid);
#pragma GCC unroll 8
      for (int row = 0; row < kRows; ++row) {
        acc[row][col][0] = _mm256_fmadd_ps(_mm256_load_ps(x_tail[row]), w.lo, acc[row][col][0]);
        acc[row][col][1] =
            _mm256_fmadd_ps(_mm256_load_ps(x_tail[row] + kHalfLanes), w.hi, acc[row][col][1]);
      }
    }
  }

#pragma GCC unroll 8
  for (int row = 0; row < kRows; ++row) {
#pragma GCC unroll 8
    for (int col = 0; col < kCols; ++col) {
      tile.y[row * tile.ldy + col] = fold_lanes(acc[row][col][0], acc[row][col][1]);
    }
  }
}

template <typename Decoder, int kRows, int kCols>
void compute_tile_cols(int cols, const TileArgs& tile) {
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      compute_tile_cols<Decoder, kRows, kCols - 1>(cols, tile);
      return;
    }
  }
  compute_tile<Decoder, kRows, kCols>(tile);
}

template <typename Decoder>
void compute_tile_any(int rows, int cols, const TileArgs& tile) {
  switch (rows) {
    case 1:
      compute_tile_cols<Decoder, 1, cols_for_rows(1)>(cols, tile);
      break;
    case 2:
      compute_tile_cols<Decoder, 2, cols_for_rows(2)>(cols, tile);
      break;
    case 3:
      compute_tile_cols<Decoder, 3, cols_for_rows(3)>(cols, tile);
      break;
    default:
      compute_tile_cols<Decoder, 4, cols_for_rows(4)>(cols, tile);
      break;
  }
}

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

template <typename Decoder>
void qgemm_typed(const QGemmArgs& args) {
  const math::WeightView& view = args.w;
  const CodeTables& tables = code_tables();
  const int64_t n = view.rows;
  const auto* codes = static_cast<const char*>(view.data);
  const auto* scales = static_cast<const char*>(view.scales);
  const int64_t scale_bytes =
      view.format == WeightFormat::kFp8Block || view.format == WeightFormat::kInt4
          ? static_cast<int64_t>(sizeof(float))
          : 1;
  const int64_t scale_row_bytes = view.scale_ld * scale_bytes;
  const int64_t packed_row_bytes = view.ld + scale_row_bytes;
  const int64_t group_rows =
      std::max<int64_t>(kGroupRowMultiple, kWeightGroupBytes / packed_row_bytes /
                                               kGroupRowMultiple * kGroupRowMultiple);

  for (int64_t group_start = 0; group_start < n; group_start += group_rows) {
    const int64_t group_end = std::min(n, group_start + group_rows);
    const int64_t group_cols = group_end - group_start;
    const int64_t next_group_rows = std::min(n, group_end + group_rows) - group_end;
    const char* next_codes = next_group_rows > 0 ? codes + group_end * view.ld : nullptr;
    const char* next_scales = next_group_rows > 0 ? scales + group_end * scale_row_bytes : nullptr;
    const int64_t next_codes_bytes = next_group_rows * view.ld;
    const int64_t next_scales_bytes = next_group_rows * scale_row_bytes;
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
        const int64_t codes_begin = next_codes_bytes * tile_call / num_tile_calls;
        const int64_t codes_end = next_codes_bytes * (tile_call + 1) / num_tile_calls;
        const int64_t scales_begin = next_scales_bytes * tile_call / num_tile_calls;
        const int64_t scales_end = next_scales_bytes * (tile_call + 1) / num_tile_calls;
        ++tile_call;
        TileArgs tile{args.x + row_start * args.ldx,
                      args.ldx,
                      &view,
                      col_start,
                      &tables,
                      args.y + row_start * args.ldy + col_start,
                      args.ldy,
                      next_codes != nullptr ? next_codes + codes_begin : nullptr,
                      codes_end - codes_begin,
                      next_scales != nullptr ? next_scales + scales_begin : nullptr,
                      scales_end - scales_begin};
        compute_tile_any<Decoder>(rows, cols, tile);
      }
    }
  }
}

}  // namespace

void qgemm_avx2(const QGemmArgs& args) {
  // One row of x: the matrix-vector path decodes fewer instructions per weight than the tile
  // below (which shares each decoded chunk among up to 4 rows of x).
  if (args.m <= kGemvMaxRows && qgemv_avx2_handles(args.w)) {
    qgemv_avx2(args);
    return;
  }
  switch (args.w.format) {
    case WeightFormat::kNvfp4:
      qgemm_typed<Nibble4Decoder<WeightFormat::kNvfp4>>(args);
      return;
    case WeightFormat::kMxfp4:
      qgemm_typed<Nibble4Decoder<WeightFormat::kMxfp4>>(args);
      return;
    case WeightFormat::kFp8Block:
      qgemm_typed<Fp8BlockDecoder>(args);
      return;
    case WeightFormat::kInt4:
      if (args.w.group_of_k == nullptr && args.w.group_size % kLanes == 0) {
        qgemm_typed<Nibble4Decoder<WeightFormat::kInt4>>(args);
      } else {
        qgemm_typed<Int4AnyGroupDecoder>(args);
      }
      return;
    case WeightFormat::kDense:
      break;
  }
  qgemm_scalar(args);
}

}  // namespace keel::cpu::detail
