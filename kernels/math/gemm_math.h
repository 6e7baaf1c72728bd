// The canonical dot product of the batch-invariant GEMM (definition in kernels/cpu/gemm.h),
// shared by the CPU scalar path (kernels/cpu/gemm.cpp) and the CUDA canonical GEMM
// (kernels/cuda/gemm.cu).
//
// One output element is computed by 16 lanes; lane j accumulates, with one fused multiply-add
// per step and in increasing k, x[k] * w[k] for k = j, j+16, j+32, ... A chunk of 16 k values
// that starts below K is processed whole: its positions at or past K contribute fma(0, 0, acc)
// (which turns a -0 lane into +0). Chunks starting at or past K are not processed at all. The
// lanes are then folded by the fixed tree i += i+8, i += i+4, i += i+2, lane 0 + lane 1.
//
// Only fma and + are used, both correctly rounded on host and device, so a CPU and a GPU that
// run these functions on the same inputs produce the same bits.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/scalar.h"

namespace keel::math {

inline constexpr int kCanonicalLanes = 16;

// Operands of y[m, n] = sum_k x[m, k] * w[n, k], shared by the CPU and CUDA GEMMs: x fp32
// row-major [M, K] (row stride ldx), w [N, K] in w_dtype (row stride ldw), y fp32 [M, N]
// (row stride ldy).
struct GemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  DType w_dtype = DType::kF32;
  int64_t ldw = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
};

// One chunk of the canonical reduction: lanes[j] = fma(x_chunk[j], w_chunk[j], lanes[j]) for
// j in [0, 16). The caller has already zero-filled positions at or past K.
KEEL_HD inline void canonical_accumulate_chunk(float (&lanes)[kCanonicalLanes],
                                               const float* x_chunk, const float* w_chunk) {
  for (int lane = 0; lane < kCanonicalLanes; ++lane)
    lanes[lane] = fma_f32(x_chunk[lane], w_chunk[lane], lanes[lane]);
}

// The fixed folding tree; consumes `lanes`.
KEEL_HD inline float canonical_fold(float (&lanes)[kCanonicalLanes]) {
  for (int width = kCanonicalLanes / 2; width >= 2; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] = lanes[lane] + lanes[lane + width];
  }
  return lanes[0] + lanes[1];
}

// Weight loaders: element i of a weight row in its storage dtype, widened to fp32 (exact).
struct LoadF32 {
  const float* row;
  KEEL_HD float operator()(int64_t i) const { return row[i]; }
};
struct LoadBF16 {
  const uint16_t* row;
  KEEL_HD float operator()(int64_t i) const { return bf16_to_f32(row[i]); }
};
struct LoadF16 {
  const uint16_t* row;
  KEEL_HD float operator()(int64_t i) const { return f16_to_f32(row[i]); }
};

// The canonical reduction of x[0, k) against one weight row read through `load_weight`.
template <typename LoadWeight>
KEEL_HD float canonical_dot_with(const float* x, int64_t k, LoadWeight load_weight) {
  float lanes[kCanonicalLanes] = {};
  float x_chunk[kCanonicalLanes];
  float w_chunk[kCanonicalLanes];
  for (int64_t chunk_start = 0; chunk_start < k; chunk_start += kCanonicalLanes) {
    for (int lane = 0; lane < kCanonicalLanes; ++lane) {
      int64_t k_idx = chunk_start + lane;
      x_chunk[lane] = k_idx < k ? x[k_idx] : 0.0f;
      w_chunk[lane] = k_idx < k ? load_weight(k_idx) : 0.0f;
    }
    canonical_accumulate_chunk(lanes, x_chunk, w_chunk);
  }
  return canonical_fold(lanes);
}

// Dispatch on the weight dtype; an unknown dtype returns NaN (callers validate dtypes first).
KEEL_HD inline float canonical_dot(const float* x, const void* w, DType w_dtype, int64_t k) {
  switch (w_dtype) {
    case DType::kBF16:
      return canonical_dot_with(x, k, LoadBF16{static_cast<const uint16_t*>(w)});
    case DType::kF16:
      return canonical_dot_with(x, k, LoadF16{static_cast<const uint16_t*>(w)});
    case DType::kF32:
      return canonical_dot_with(x, k, LoadF32{static_cast<const float*>(w)});
  }
  return bits_float(0x7fc00000u);
}

}  // namespace keel::math
