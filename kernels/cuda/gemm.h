// CUDA GEMMs: y[m, n] = sum_k x[m, k] * w[n, k]   (x fp32, w f32/bf16/f16, y fp32)
//
// Layout as kernels/cpu/gemm.h: x row-major [M, K] (stride ldx), w row-major [N, K] in its
// storage dtype (stride ldw, the nn.Linear layout), y row-major [M, N] (stride ldy),
// overwritten. All device pointers.
//
// Two paths:
//  - gemm_canonical: the deterministic mode. Every output element is math::canonical_dot, the
//    16-lane reduction the CPU GEMM runs, so y is bit-identical to cpu::gemm for every M, N, K
//    and stride (and so batch-invariant).
//  - CublasGemm: cublasGemmEx with CUBLAS_COMPUTE_32F and CUBLAS_GEMM_DEFAULT, zero workspace
//    (no split-K that would need one). Fast, run-to-run deterministic on one GPU and library
//    version, but neither bit-identical to the CPU nor batch-invariant: cuBLAS picks kernels,
//    and with them reduction orders, by shape.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/math/gemm_math.h"

namespace keel::cuda {

using GemmArgs = math::GemmArgs;

// Canonical-order GEMM: blocks of 16 x 16 outputs; each step stages a 16 x 64 slab of x and of
// w (widened to fp32) in shared memory, and each thread feeds its own output's 16 lane
// accumulators one canonical chunk (16 k values) at a time. Throws keel::Error on bad shapes.
void gemm_canonical(const GemmArgs& args, cudaStream_t stream = nullptr);

// Grouped canonical GEMM: for each group g < num_groups, rows [offsets[g], offsets[g + 1]) of y
// = the same rows of x times w_table[g]^T (w_table: device array of device pointers, one weight
// [n, k] in w_dtype per group; offsets: device int32 [num_groups + 1], read on the device only).
// max_group_rows bounds every group's row count (MoE: the number of tokens) and
// total_rows_bound the sum (tokens * top_k); they size the grid. Row bits equal gemm_canonical's.
struct GroupedGemmArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* const* w_table = nullptr;
  DType w_dtype = DType::kF32;
  int64_t ldw = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  const int32_t* offsets = nullptr;
  int64_t num_groups = 0;
  int64_t max_group_rows = 0;
  int64_t total_rows_bound = 0;
  int64_t n = 0;
  int64_t k = 0;
};
void gemm_canonical_grouped(const GroupedGemmArgs& args, cudaStream_t stream = nullptr);

// How CublasGemm feeds bf16/f16 weights to cuBLAS, which has no fp32 x half-precision GEMM:
enum class CublasInputs : uint8_t {
  // Widen w to fp32 in a workspace, then an fp32 GEMM: every product is exact, only the
  // summation order differs from the canonical path. Costs a pass over w per call.
  kWidenWeights,
  // Round x to w's dtype in a workspace and use the half-precision tensor-core GEMM with fp32
  // accumulation: fastest, but x loses precision (bf16 keeps 8 significant bits).
  kNarrowActivations,
};

// Owns a cuBLAS handle (bound to one device and stream) and the conversion workspace.
// Move-only.
class CublasGemm {
 public:
  explicit CublasGemm(cudaStream_t stream = nullptr);
  ~CublasGemm();
  CublasGemm(CublasGemm&& other) noexcept;
  CublasGemm& operator=(CublasGemm&& other) noexcept;
  CublasGemm(const CublasGemm&) = delete;
  CublasGemm& operator=(const CublasGemm&) = delete;

  void gemm(const GemmArgs& args, CublasInputs inputs = CublasInputs::kWidenWeights);

 private:
  void* handle_ = nullptr;  // cublasHandle_t, kept opaque so this header needs no cuBLAS
  cudaStream_t stream_ = nullptr;
  DeviceBuffer workspace_;  // widened w or narrowed x
};

}  // namespace keel::cuda
