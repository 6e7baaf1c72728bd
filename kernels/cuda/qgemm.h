// CUDA quantized GEMMs: y[m, n] = sum_k x[m, k] * w[n, k], w in one of keel's weight layouts
// (kernels/math/quant_math.h: NVFP4, MXFP4, FP8 block, int4), x and y fp32 row-major, all
// device memory. The CUDA twins of kernels/cpu/qgemm.h: every output element is
// math::canonical_dot_with over the format's scalar loader (W4A4: over the row quantized by
// math::nvfp4_quantize_activation_row), so y is bit-identical to cpu::qgemm for every M, N, K
// and stride, and batch-invariant.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/math/quant_math.h"

namespace keel::cuda {

// As cpu::QGemmArgs: x [m, w.cols] (stride ldx), y [m, w.rows] (stride ldy, overwritten); the
// view's pointers are device memory.
struct QGemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  math::WeightView w;  // N = w.rows, K = w.cols
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t m = 0;
};

// Checks the view as cpu::qgemm does (keel::Error naming what is wrong) and launches.
void qgemm(const QGemmArgs& args, cudaStream_t stream = nullptr);

// Grouped (the MoE experts): for each group g < num_groups, rows [offsets[g], offsets[g + 1])
// of y = the same rows of x times views[g]^T. views: device array [num_groups] of weight views
// (any format, kDense included; each may carry its own NVFP4 input scale), offsets: device
// int32 [num_groups + 1]; both are read on the device only, so the host never learns a group's
// format or row count. Every view must be n x k: a group whose view does not fit (wrong shape,
// bad strides or group size, null pointers) gets NaN rows instead of a host-side error.
// max_group_rows bounds every group's row count and total_rows_bound the sum; they size the
// grid. A row's bits equal qgemm's on that row (and cpu::qgemm's).
struct GroupedQGemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  const math::WeightView* views = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  const int32_t* offsets = nullptr;
  int64_t num_groups = 0;
  int64_t max_group_rows = 0;
  int64_t total_rows_bound = 0;
  int64_t n = 0;
  int64_t k = 0;
};
void qgemm_grouped(const GroupedQGemmArgs& args, cudaStream_t stream = nullptr);

}  // namespace keel::cuda
