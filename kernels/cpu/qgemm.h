// Quantized GEMM: y[m, n] = sum_k x[m, k] * w[n, k], w in one of keel's quantized layouts
// (kernels/math/quant_math.h: NVFP4, MXFP4, FP8 block, int4), x and y fp32 row-major.
//
// The reduction is the canonical one of kernels/cpu/gemm.h, with each weight decoded to fp32
// by math::dequantized_weight's definition just before its fused multiply-add: lane j sums
// x[m,k] * w[n,k] for k = j, j+16, ... in increasing k, then the fixed fold. So the bits of a
// row depend on neither M nor the row's place in the batch, and every ISA path (scalar, AVX2,
// AVX-512) and the CUDA twin give the same bits. The packed codes are decoded in registers, 16
// weights at a time; no dequantized copy of a matrix is ever made.
//
// NVFP4 with w.input_scale > 0 (W4A4 emulation): each row of x is first quantized per 16 k with
// that scale (math::nvfp4_quantize_activation_row) into scratch owned by the calling thread, and
// the quantized row is what meets the weights.
#pragma once

#include <cstdint>

#include "kernels/cpu/worker_pool.h"
#include "kernels/math/quant_math.h"

namespace keel::cpu {

struct QGemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  math::WeightView w;  // N = w.rows, K = w.cols
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t m = 0;
};

// Checks the view (format, strides, group sizes; keel::Error naming what is wrong) and runs
// the active ISA's path (cpu::active_isa()).
void qgemm(const QGemmArgs& args);

// y = x * w^T for any view: dense weights through gemm(), quantized ones through qgemm().
void matmul(const float* x, int64_t ldx, const math::WeightView& w, float* y, int64_t ldy,
            int64_t m);

// The same product with the N output rows of w split over the pool's threads by the fixed
// partition (partition_rows, kMatmulRowAlign rows per chunk): each output element is computed by
// one thread exactly as matmul computes it, so the bits equal matmul's at any thread count.
// Products too small to pay for a fork-join run on the caller alone.
inline constexpr int64_t kMatmulRowAlign = 16;
void matmul(const float* x, int64_t ldx, const math::WeightView& w, float* y, int64_t ldy,
            int64_t m, WorkerPool& pool);

// The canonical reduction of one output element, written plainly: the definition the vector
// paths are tested against.
float canonical_qdot(const float* x, const math::WeightView& w, int64_t n);

}  // namespace keel::cpu
