// AVX2 matrix-vector path of the quantized GEMM (qgemm.h) for one row of x: the decode step's
// shape, where the weights are read once and the decoding, not the multiply, sets the speed.
// Bits are those of the canonical reduction (lane j sums k = j, j + 16, ... in increasing k,
// then the fixed fold), exactly as the tile path and the scalar definition.
//
// Layout trick: within a chunk of 16 weights (8 code bytes) the low nibbles are the even k and
// the high nibbles the odd k. So each output keeps its 16 canonical lanes as an "even" register
// (lanes 0, 2, .., 14) and an "odd" one (1, 3, .., 15), and x is copied once per call into the
// same order per chunk (xs[16c + i] = x[16c + 2i], xs[16c + 8 + i] = x[16c + 2i + 1]); before the
// fold the two registers are interleaved back into canonical lanes 0..7 and 8..15. Every lane
// still sees its k in increasing order, so nothing about the sum changes.
//
// Decoding a chunk: the 8 code bytes and the same bytes shifted right by 4 form 16 nibbles
// [even | odd]; one pshufb turns them into small integers t, then int8 -> int32 -> fp32 (exact):
//   NVFP4 / MXFP4  t = 2 * e2m1(code) in {0, +-1, +-2, +-3, +-4, +-6, +-8, +-12}, and the weight is
//                  t * (s / 2) with s the group's block scale (e4m3(scale) * row_scale, or
//                  e8m0(scale)) computed by the definition's own operations. t * (s / 2) is the
//                  rounding of the same real number as e2m1(code) * s, hence the same float,
//                  whenever s / 2 is exact; a group whose s / 2 is not exact (s below 2^-125
//                  with its last bit set) is decoded weight by weight by the scalar definition.
//                  Code 8 (-0) gives +0: the product's sign of zero never reaches the sum (the
//                  accumulator starts at +0 and cannot become -0), and NaN/inf scales give NaN/inf
//                  either way.
//   int4           t = code - zero in [-16, 15] (a byte subtraction), the weight float(t) * scale:
//                  the definition itself.
//   FP8 block      no reordering (one code byte per weight, lanes in k order): E4M3 -> FP16 by
//                  integer shifts, vcvtph2ps, times 256 * scale (see fp8_chunk).
// The last, partial chunk (K % 16 weights) is added lane by lane with the scalar decoders after
// the vector loop, which is the same sum: lanes at or past K add fma(0, 0, acc) = acc.
// Two weight rows run at once (more independent work per x load); scales are broadcast from
// small per-row arrays filled once per block of 16 chunks.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/qgemm_internal.h"
#include "kernels/math/gemm_math.h"

namespace keel::cpu::detail {

namespace {

using math::WeightFormat;

constexpr int kLanes = kCanonicalLanes;
static_assert(kLanes == 16, "8 code bytes per chunk of canonical lanes");
constexpr int64_t kBlockChunks = 16;  // chunks whose scales are prepared at once
constexpr int kRowsAtOnce = 2;

// The fixed folding tree of gemm.h over canonical lanes 0..7 (lo) and 8..15 (hi).
inline float fold_lanes(__m256 lo, __m256 hi) {
  __m256 sum8 = _mm256_add_ps(lo, hi);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum2, _mm_movehdup_ps(sum2)));
}

// Canonical lanes 0..7 (lo) and 8..15 (hi) of output n, the partial chunk's lanes added (the
// same fmas the definition does there), then the fold.
float fold_with_tail(__m256 lo, __m256 hi, const math::WeightView& w, int64_t n, const float* x,
                     int64_t full_chunks) {
  const int64_t tail_start = full_chunks * kLanes;
  if (tail_start < w.cols) {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, lo);
    _mm256_store_ps(lanes + 8, hi);
    for (int64_t k = tail_start; k < w.cols; ++k) {
      const int lane = static_cast<int>(k - tail_start);
      lanes[lane] = math::fma_f32(x[k], math::dequantized_weight(w, n, k), lanes[lane]);
    }
    lo = _mm256_load_ps(lanes);
    hi = _mm256_load_ps(lanes + 8);
  }
  return fold_lanes(lo, hi);
}

// Even/odd registers back to canonical lanes, then fold_with_tail.
float finish_output(__m256 even, __m256 odd, const math::WeightView& w, int64_t n, const float* x,
                    int64_t full_chunks) {
  const __m256 low_pairs = _mm256_unpacklo_ps(even, odd);   // E0 O0 E1 O1 | E4 O4 E5 O5
  const __m256 high_pairs = _mm256_unpackhi_ps(even, odd);  // E2 O2 E3 O3 | E6 O6 E7 O7
  return fold_with_tail(_mm256_permute2f128_ps(low_pairs, high_pairs, 0x20),
                        _mm256_permute2f128_ps(low_pairs, high_pairs, 0x31), w, n, x, full_chunks);
}

// 16 nibbles of the 8 code bytes at `codes`, [even k (low nibbles) | odd k (high nibbles)].
inline __m128i chunk_nibbles(const uint8_t* codes) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return _mm_and_si128(_mm_unpacklo_epi64(bytes, _mm_srli_epi16(bytes, 4)), _mm_set1_epi8(0x0f));
}

// acc_even/odd += xs (even/odd) * float(t) * scale, t the 16 int8 weights [even | odd].
inline void accumulate(__m128i t, __m256 scale, const float* xs, __m256& acc_even,
                       __m256& acc_odd) {
  const __m256 even = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(t)), scale);
  const __m256 odd =
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(t, t))), scale);
  acc_even = _mm256_fmadd_ps(_mm256_loadu_ps(xs), even, acc_even);
  acc_odd = _mm256_fmadd_ps(_mm256_loadu_ps(xs + 8), odd, acc_odd);
}

// Chunks [first, first + count) of row n decoded weight by weight by the scalar definition,
// [chunk][even 8 | odd 8] (blocks whose halved scale is inexact). Kept out of line: the call
// happens only on that rare path, so the accumulators stay in registers on the common one.
[[gnu::noinline]] void decode_exact(const math::WeightView& w, int64_t n, int64_t first,
                                    int64_t count, float* out) {
  for (int64_t c = 0; c < count; ++c)
    for (int i = 0; i < 8; ++i) {
      const int64_t k = (first + c) * kLanes + 2 * i;
      out[c * kLanes + i] = math::dequantized_weight(w, n, k);
      out[c * kLanes + 8 + i] = math::dequantized_weight(w, n, k + 1);
    }
}

// ---- NVFP4 and MXFP4 ----

// Half block scales of chunks [first, first + count) of row n (count <= kBlockChunks) into
// out[0, 16); returns false when some halving is inexact (that block then takes
// accumulate_exact). The scales come from the code tables (the scalar decoders' values) by
// gathers, the NVFP4 product with the row scale as in the definition.
template <WeightFormat kFormat>
bool half_scales(const math::WeightView& w, int64_t n, int64_t first, int64_t count,
                 const CodeTables& tables, float* out) {
  constexpr int64_t kChunksPerScale = kFormat == WeightFormat::kNvfp4 ? 1 : 2;
  const auto* row = static_cast<const uint8_t*>(w.scales) + n * w.scale_ld;
  const int64_t num_scales = (count + kChunksPerScale - 1) / kChunksPerScale;
  // Never read past the row's scales: a short block goes through a zero-filled copy.
  alignas(16) uint8_t copy[16] = {};
  const uint8_t* src = row + first / kChunksPerScale;
  if (num_scales < kBlockChunks / kChunksPerScale) {
    std::memcpy(copy, src, static_cast<size_t>(num_scales));
    src = copy;
  }
  const __m256 half = _mm256_set1_ps(0.5f);
  auto halve = [&](__m256 scale, float* dst) {
    const __m256 halved = _mm256_mul_ps(scale, half);
    _mm256_store_ps(dst, halved);
    // Equal, or unordered (NaN scales stay NaN either way).
    return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(halved, halved), scale, _CMP_EQ_UQ)) ==
           0xff;
  };
  if constexpr (kFormat == WeightFormat::kNvfp4) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m256 row_scale = _mm256_set1_ps(w.row_scales[n]);
    const __m256 lo =
        _mm256_mul_ps(_mm256_i32gather_ps(tables.e4m3, _mm256_cvtepu8_epi32(codes), 4), row_scale);
    const __m256 hi = _mm256_mul_ps(
        _mm256_i32gather_ps(tables.e4m3, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)), 4),
        row_scale);
    const bool lo_exact = halve(lo, out);
    const bool hi_exact = halve(hi, out + 8);
    return lo_exact && hi_exact;
  } else {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m256 scales = _mm256_i32gather_ps(tables.e8m0, _mm256_cvtepu8_epi32(codes), 4);
    alignas(32) float halves[8];
    const bool exact = halve(scales, halves);
    const __m256 halved = _mm256_load_ps(halves);
    _mm256_store_ps(out,
                    _mm256_permutevar8x32_ps(halved, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    _mm256_store_ps(out + 8,
                    _mm256_permutevar8x32_ps(halved, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
    return exact;
  }
}

template <WeightFormat kFormat, int kRows>
void e2m1_rows(const math::WeightView& w, int64_t n0, const float* xs, const float* x,
               int64_t full_chunks, const CodeTables& tables, float* y) {
  const __m128i doubled_e2m1 =
      _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const uint8_t* codes[kRows];
  __m256 acc_even[kRows];
  __m256 acc_odd[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    codes[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * w.ld;
    acc_even[r] = _mm256_setzero_ps();
    acc_odd[r] = _mm256_setzero_ps();
  }
  alignas(32) float halves[kRows][kBlockChunks];
  for (int64_t block = 0; block < full_chunks; block += kBlockChunks) {
    const int64_t count = std::min(kBlockChunks, full_chunks - block);
    // The codes of the block after next (128 bytes a row), ahead of the hardware prefetcher.
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(codes[r] + (block + 2 * kBlockChunks) * 8),
                   _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(codes[r] + (block + 2 * kBlockChunks) * 8 + 64),
                   _MM_HINT_T0);
    }
    bool exact = true;
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
      exact &= half_scales<kFormat>(w, n0 + r, block, count, tables, halves[r]);
    if (!exact) [[unlikely]] {
      alignas(32) float weights[kBlockChunks * kLanes];
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        decode_exact(w, n0 + r, block, count, weights);
        for (int64_t c = 0; c < count; ++c) {
          const float* x_chunk = xs + (block + c) * kLanes;
          acc_even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk),
                                        _mm256_load_ps(weights + c * kLanes), acc_even[r]);
          acc_odd[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk + 8),
                                       _mm256_load_ps(weights + c * kLanes + 8), acc_odd[r]);
        }
      }
      continue;
    }
    for (int64_t c = 0; c < count; ++c) {
      const float* x_chunk = xs + (block + c) * kLanes;
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m128i t = _mm_shuffle_epi8(doubled_e2m1, chunk_nibbles(codes[r] + (block + c) * 8));
        accumulate(t, _mm256_broadcast_ss(&halves[r][c]), x_chunk, acc_even[r], acc_odd[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    y[n0 + r] = finish_output(acc_even[r], acc_odd[r], w, n0 + r, x, full_chunks);
}

// ---- int4, group a multiple of 16, no act order ----

template <int kRows>
void int4_rows(const math::WeightView& w, int64_t n0, const float* xs, const float* x,
               int64_t full_chunks, float* y) {
  const int64_t chunks_per_group = w.group_size / kLanes;
  const uint8_t* codes[kRows];
  const uint8_t* zeros[kRows];
  const float* scales[kRows];
  __m256 acc_even[kRows];
  __m256 acc_odd[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    codes[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * w.ld;
    zeros[r] = w.zeros + (n0 + r) * w.scale_ld;
    scales[r] = static_cast<const float*>(w.scales) + (n0 + r) * w.scale_ld;
    acc_even[r] = _mm256_setzero_ps();
    acc_odd[r] = _mm256_setzero_ps();
  }
  for (int64_t first = 0, group = 0; first < full_chunks; first += chunks_per_group, ++group) {
    const int64_t last = std::min(full_chunks, first + chunks_per_group);
    __m128i zero[kRows];
    __m256 scale[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      zero[r] = _mm_set1_epi8(static_cast<char>(zeros[r][group]));
      scale[r] = _mm256_broadcast_ss(&scales[r][group]);
    }
    for (int64_t c = first; c < last; ++c) {
      const float* x_chunk = xs + c * kLanes;
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m128i t = _mm_sub_epi8(chunk_nibbles(codes[r] + c * 8), zero[r]);
        accumulate(t, scale[r], x_chunk, acc_even[r], acc_odd[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    y[n0 + r] = finish_output(acc_even[r], acc_odd[r], w, n0 + r, x, full_chunks);
}

// ---- FP8 block (E4M3 codes, one fp32 scale per 128 k) ----

// Sign-extended to 16 bits, shifted left by 7 and bit 14 cleared, an E4M3 code is the FP16 of
// its value / 256 (sign to bit 15, the 4 exponent bits into the low 4 of FP16's 5 (bias 15
// against 7: a factor 2^-8), the 3 mantissa bits on top of FP16's 10; E4M3 subnormals land on
// FP16 subnormals), which vcvtph2ps widens exactly. The weight is then that value times
// 256 * scale: the same real product as e4m3(code) * scale, so the same float, as long as
// 256 * scale does not overflow (such a group is decoded by the definition). The NaN codes
// 0x7f / 0xff have no FP16 twin here: a chunk holding one is decoded by the definition too.
inline void fp8_chunk(const uint8_t* codes, __m256 scale_256, const float* x, __m256& acc_lo,
                      __m256& acc_hi) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m256i halves = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7),
                                          _mm256_set1_epi16(static_cast<int16_t>(0xbfff)));
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  acc_lo = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_mul_ps(lo, scale_256), acc_lo);
  acc_hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), _mm256_mul_ps(hi, scale_256), acc_hi);
}

inline bool has_nan_code(const uint8_t* codes) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i magnitude = _mm_and_si128(raw, _mm_set1_epi8(0x7f));
  return _mm_movemask_epi8(_mm_cmpeq_epi8(magnitude, _mm_set1_epi8(0x7f))) != 0;
}

// One chunk's 16 weights decoded by the definition (chunks with a NaN code, groups whose
// 256 * scale overflows). Out of line: only that rare path calls it.
[[gnu::noinline]] void fp8_decode_exact(const math::WeightView& w, int64_t n, int64_t chunk,
                                        float* out) {
  for (int lane = 0; lane < kLanes; ++lane)
    out[lane] = math::dequantized_weight(w, n, chunk * kLanes + lane);
}

template <int kRows>
void fp8_rows(const math::WeightView& w, int64_t n0, const float* x, int64_t full_chunks,
              float* y) {
  constexpr int64_t kChunksPerGroup = math::kFp8BlockGroup / kLanes;
  const uint8_t* codes[kRows];
  const float* scales[kRows];
  __m256 acc_lo[kRows];
  __m256 acc_hi[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    codes[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * w.ld;
    scales[r] = static_cast<const float*>(w.scales) + (n0 + r) * w.scale_ld;
    acc_lo[r] = _mm256_setzero_ps();
    acc_hi[r] = _mm256_setzero_ps();
  }
  for (int64_t first = 0, group = 0; first < full_chunks; first += kChunksPerGroup, ++group) {
    const int64_t last = std::min(full_chunks, first + kChunksPerGroup);
    __m256 scale_256[kRows];
    bool overflows = false;
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const float scaled = scales[r][group] * 256.0f;
      overflows |= std::isfinite(scales[r][group]) && !std::isfinite(scaled);
      scale_256[r] = _mm256_set1_ps(scaled);
    }
    for (int64_t c = first; c < last; ++c) {
      const float* x_chunk = x + c * kLanes;
      bool exceptional = overflows;
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) exceptional |= has_nan_code(codes[r] + c * kLanes);
      if (exceptional) [[unlikely]] {
        alignas(32) float weights[kRows][kLanes];
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) fp8_decode_exact(w, n0 + r, c, weights[r]);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          acc_lo[r] =
              _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk), _mm256_load_ps(weights[r]), acc_lo[r]);
          acc_hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x_chunk + 8), _mm256_load_ps(weights[r] + 8),
                                      acc_hi[r]);
        }
        continue;
      }
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
        fp8_chunk(codes[r] + c * kLanes, scale_256[r], x_chunk, acc_lo[r], acc_hi[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    y[n0 + r] = fold_with_tail(acc_lo[r], acc_hi[r], w, n0 + r, x, full_chunks);
}

}  // namespace

bool qgemv_avx2_handles(const math::WeightView& w) {
  switch (w.format) {
    case WeightFormat::kNvfp4:
    case WeightFormat::kMxfp4:
      return true;
    case WeightFormat::kInt4:
      return w.group_of_k == nullptr && w.group_size % kLanes == 0;
    case WeightFormat::kFp8Block:
      return true;
    case WeightFormat::kDense:
      return false;
  }
  return false;
}

void qgemv_avx2(const QGemmArgs& args) {
  const math::WeightView& w = args.w;
  const int64_t full_chunks = w.cols / kLanes;
  const CodeTables& tables = code_tables();
  thread_local std::vector<float> reordered;
  reordered.resize(static_cast<size_t>(full_chunks * kLanes));
  for (int64_t row = 0; row < args.m; ++row) {
    const float* x = args.x + row * args.ldx;
    float* y = args.y + row * args.ldy;
    if (w.format == WeightFormat::kFp8Block) {  // canonical lane order as stored
      int64_t n = 0;
      for (; n + kRowsAtOnce <= w.rows; n += kRowsAtOnce)
        fp8_rows<kRowsAtOnce>(w, n, x, full_chunks, y);
      for (; n < w.rows; ++n) fp8_rows<1>(w, n, x, full_chunks, y);
      continue;
    }
    for (int64_t c = 0; c < full_chunks; ++c)
      for (int i = 0; i < 8; ++i) {
        reordered[static_cast<size_t>(c * kLanes + i)] = x[c * kLanes + 2 * i];
        reordered[static_cast<size_t>(c * kLanes + 8 + i)] = x[c * kLanes + 2 * i + 1];
      }
    const float* xs = reordered.data();
    int64_t n = 0;
    for (; n + kRowsAtOnce <= w.rows; n += kRowsAtOnce) {
      switch (w.format) {
        case WeightFormat::kNvfp4:
          e2m1_rows<WeightFormat::kNvfp4, kRowsAtOnce>(w, n, xs, x, full_chunks, tables, y);
          break;
        case WeightFormat::kMxfp4:
          e2m1_rows<WeightFormat::kMxfp4, kRowsAtOnce>(w, n, xs, x, full_chunks, tables, y);
          break;
        default:
          int4_rows<kRowsAtOnce>(w, n, xs, x, full_chunks, y);
          break;
      }
    }
    for (; n < w.rows; ++n) {
      switch (w.format) {
        case WeightFormat::kNvfp4:
          e2m1_rows<WeightFormat::kNvfp4, 1>(w, n, xs, x, full_chunks, tables, y);
          break;
        case WeightFormat::kMxfp4:
          e2m1_rows<WeightFormat::kMxfp4, 1>(w, n, xs, x, full_chunks, tables, y);
          break;
        default:
          int4_rows<1>(w, n, xs, x, full_chunks, y);
          break;
      }
    }
  }
}

}  // namespace keel::cpu::detail
