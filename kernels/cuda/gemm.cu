// CUDA GEMM kernels: the canonical-order (bit-identical to the CPU) GEMM and the cuBLAS path.
//
// Canonical kernel. Grid: (ceil(N / 16), ceil(M / 16)) blocks of 16 x 16 threads; thread
// (tx, ty) owns y[m0 + ty, n0 + tx] and its 16 lane accumulators in registers. For each slab
// of K (64 values = 4 canonical chunks), the block loads x[m0 .. m0+16, slab] and
// w[n0 .. n0+16, slab] (widened to fp32 by the dtype's exact conversion) into shared memory,
// zero-filling past M, N and K, coalesced along k; then each thread runs
// math::canonical_accumulate_chunk for each chunk of the slab that starts below K (a chunk
// starting at or past K is skipped, exactly as the CPU loop never reaches it). Finally
// math::canonical_fold. The per-element operation sequence is that of math::canonical_dot, so
// the result does not depend on the tiling, on M or on N. Shared rows are padded to 65 floats
// so that the 16 threads of a row reading different w rows hit different banks.
//
// Grouped canonical kernel (the MoE experts): grid (ceil(N / 16), row tiles, groups); group g
// multiplies its rows [offsets[g], offsets[g + 1]) of x by its own weight w_table[g], reading
// the offsets on the device, so the host never learns how many rows each group has. Each tile is
// the plain kernel's tile, so a row's bits equal gemm_canonical's (and the CPU's) on that row.
//
// cuBLAS path. Row-major y = x w^T is column-major y^T = w^T' x^T': cublasGemmEx with
// op(A) = T on w ([K, N] column-major, lda = ldw), op(B) = N on x ([K, M], ldb = ldx),
// C = y ([N, M], ldc = ldy); compute CUBLAS_COMPUTE_32F, algo CUBLAS_GEMM_DEFAULT, default math
// mode (no TF32 for fp32 inputs), cublasSetWorkspace(nullptr, 0) so no split-K workspace.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/launch.h"
#include "kernels/math/gemm_math.h"

namespace keel::cuda {

namespace {

using detail::grid_for;
using detail::kThreadsPerBlock;
using detail::require;

constexpr int kTile = 16;
constexpr int kSlab = 4 * math::kCanonicalLanes;  // K values staged per step
constexpr int kSlabPadded = kSlab + 1;

static_assert(kTile * kTile == kThreadsPerBlock, "one thread per output of a tile");

// One 16 x 16 output tile at (m0, n0) of y = x w^T over rows [0, m): the body shared by the plain
// and the grouped kernel. Every thread of the block must call it (it synchronises the block).
template <typename Loader, typename Element>
__device__ void canonical_tile(const float* x, int64_t ldx, const void* w, int64_t ldw, float* y,
                               int64_t ldy, int64_t m, int64_t n, int64_t k, int64_t m0, int64_t n0,
                               float (&x_slab)[kTile][kSlabPadded],
                               float (&w_slab)[kTile][kSlabPadded]) {
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int thread = ty * kTile + tx;
  const auto* w_elements = static_cast<const Element*>(w);

  float lanes[math::kCanonicalLanes] = {};
  for (int64_t slab_start = 0; slab_start < k; slab_start += kSlab) {
    for (int e = thread; e < kTile * kSlab; e += kTile * kTile) {
      const int row = e / kSlab;
      const int col = e % kSlab;
      const int64_t k_idx = slab_start + col;
      const bool k_ok = k_idx < k;
      x_slab[row][col] = (k_ok && m0 + row < m) ? x[(m0 + row) * ldx + k_idx] : 0.0f;
      w_slab[row][col] =
          (k_ok && n0 + row < n) ? Loader{w_elements + (n0 + row) * ldw}(k_idx) : 0.0f;
    }
    __syncthreads();
    for (int chunk = 0; chunk < kSlab / math::kCanonicalLanes; ++chunk) {
      const int chunk_offset = chunk * math::kCanonicalLanes;
      if (slab_start + chunk_offset >= k) break;
      math::canonical_accumulate_chunk(lanes, &x_slab[ty][chunk_offset], &w_slab[tx][chunk_offset]);
    }
    __syncthreads();
  }
  if (m0 + ty < m && n0 + tx < n) y[(m0 + ty) * ldy + n0 + tx] = math::canonical_fold(lanes);
}

template <typename Loader, typename Element>
__global__ void gemm_canonical_kernel(const float* x, int64_t ldx, const void* w, int64_t ldw,
                                      float* y, int64_t ldy, int64_t m, int64_t n, int64_t k) {
  __shared__ float x_slab[kTile][kSlabPadded];
  __shared__ float w_slab[kTile][kSlabPadded];
  canonical_tile<Loader, Element>(x, ldx, w, ldw, y, ldy, m, n, k, int64_t{blockIdx.y} * kTile,
                                  int64_t{blockIdx.x} * kTile, x_slab, w_slab);
}

// Grouped: blockIdx.z is the group; its rows [offsets[g], offsets[g + 1]) are read here, on the
// device, and the block strides over their tiles (the row count is uniform within the block, so
// every thread runs the same number of tiles).
template <typename Loader, typename Element>
__global__ void gemm_canonical_grouped_kernel(const float* x, int64_t ldx,
                                              const void* const* w_table, int64_t ldw, float* y,
                                              int64_t ldy, const int32_t* offsets, int64_t n,
                                              int64_t k) {
  __shared__ float x_slab[kTile][kSlabPadded];
  __shared__ float w_slab[kTile][kSlabPadded];
  const int64_t group = blockIdx.z;
  const int64_t first_row = offsets[group];
  const int64_t num_rows = offsets[group + 1] - first_row;
  for (int64_t m0 = int64_t{blockIdx.y} * kTile; m0 < num_rows; m0 += int64_t{gridDim.y} * kTile)
    canonical_tile<Loader, Element>(x + first_row * ldx, ldx, w_table[group], ldw,
                                    y + first_row * ldy, ldy, num_rows, n, k, m0,
                                    int64_t{blockIdx.x} * kTile, x_slab, w_slab);
}

__global__ void fill_zero_rows_kernel(float* y, int64_t ldy, int64_t m, int64_t n) {
  const int64_t total = m * n;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x)
    y[(index / n) * ldy + index % n] = 0.0f;
}

// Widens rows [rows, cols] (stride ld) of a half-precision matrix to dense fp32 [rows, cols].
__global__ void widen_kernel(const uint16_t* src, DType dtype, int64_t rows, int64_t cols,
                             int64_t ld, float* dst) {
  const int64_t total = rows * cols;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const uint16_t bits = src[(index / cols) * ld + index % cols];
    dst[index] = dtype == DType::kBF16 ? bf16_to_f32(bits) : f16_to_f32(bits);
  }
}

// Rounds fp32 rows [rows, cols] (stride ld) to dense half-precision [rows, cols].
__global__ void narrow_kernel(const float* src, DType dtype, int64_t rows, int64_t cols, int64_t ld,
                              uint16_t* dst) {
  const int64_t total = rows * cols;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const float value = src[(index / cols) * ld + index % cols];
    dst[index] = dtype == DType::kBF16 ? f32_to_bf16(value) : f32_to_f16(value);
  }
}

// Calls launch(tag) with tag's Loader/Element types for the weight dtype (checked by callers).
template <typename LoaderType, typename ElementType>
struct WeightLoader {
  using Loader = LoaderType;
  using Element = ElementType;
};
template <typename Launch>
void with_weight_loader(DType w_dtype, Launch&& launch) {
  switch (w_dtype) {
    case DType::kF32:
      return launch(WeightLoader<math::LoadF32, float>{});
    case DType::kBF16:
      return launch(WeightLoader<math::LoadBF16, uint16_t>{});
    case DType::kF16:
      return launch(WeightLoader<math::LoadF16, uint16_t>{});
  }
}

void check_gemm_args(const GemmArgs& args, const char* what) {
  require(
      args.w_dtype == DType::kF32 || args.w_dtype == DType::kBF16 || args.w_dtype == DType::kF16,
      what, ": unknown weight dtype ", static_cast<int>(args.w_dtype));
  require(args.m >= 0 && args.n >= 0 && args.k >= 0, what, ": negative size m=", args.m,
          " n=", args.n, " k=", args.k);
  require(args.ldx >= args.k && args.ldw >= args.k, what, ": leading dimension below k=", args.k,
          " (ldx=", args.ldx, " ldw=", args.ldw, ")");
  require(args.ldy >= args.n, what, ": ldy=", args.ldy, " below n=", args.n);
  if (args.m == 0 || args.n == 0) return;
  require(args.y != nullptr, what, ": null output");
  if (args.k > 0) require(args.x != nullptr && args.w != nullptr, what, ": null input");
}

// An empty reduction: every canonical lane stays +0 (cuBLAS with beta = 0 agrees).
void fill_zero(const GemmArgs& args, cudaStream_t stream) {
  fill_zero_rows_kernel<<<grid_for(args.m * args.n), kThreadsPerBlock, 0, stream>>>(
      args.y, args.ldy, args.m, args.n);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

const char* cublas_status_text(cublasStatus_t status) {
  return cublasGetStatusString(status);
}

#define KEEL_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                            \
    const cublasStatus_t keel_cublas_status_ = (call);                                            \
    if (keel_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                             \
      throw_error("rank ", current_rank(), ": cuBLAS call ", #call, " failed at ", __FILE__, ":", \
                  __LINE__, ": ", cublas_status_text(keel_cublas_status_));                       \
  } while (0)

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kF32:
      break;
  }
  return CUDA_R_32F;
}

int to_int(int64_t value, const char* what) {
  require(value <= int64_t{0x7fffffff}, "CublasGemm: ", what, "=", value,
          " exceeds cuBLAS's 32-bit sizes");
  return static_cast<int>(value);
}

}  // namespace

void gemm_canonical(const GemmArgs& args, cudaStream_t stream) {
  check_gemm_args(args, "gemm_canonical");
  if (args.m == 0 || args.n == 0) return;
  if (args.k == 0) return fill_zero(args, stream);
  require((args.m + kTile - 1) / kTile <= 65535, "gemm_canonical: m=", args.m,
          " exceeds the grid's y dimension");
  const dim3 grid(static_cast<unsigned>((args.n + kTile - 1) / kTile),
                  static_cast<unsigned>((args.m + kTile - 1) / kTile));
  const dim3 block(kTile, kTile);
  with_weight_loader(args.w_dtype, [&](auto loader) {
    using Loader = typename decltype(loader)::Loader;
    using Element = typename decltype(loader)::Element;
    gemm_canonical_kernel<Loader, Element><<<grid, block, 0, stream>>>(
        args.x, args.ldx, args.w, args.ldw, args.y, args.ldy, args.m, args.n, args.k);
  });
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void gemm_canonical_grouped(const GroupedGemmArgs& args, cudaStream_t stream) {
  require(
      args.w_dtype == DType::kF32 || args.w_dtype == DType::kBF16 || args.w_dtype == DType::kF16,
      "gemm_canonical_grouped: unknown weight dtype ", static_cast<int>(args.w_dtype));
  require(args.num_groups >= 0 && args.n > 0 && args.k > 0 && args.max_group_rows >= 0 &&
              args.total_rows_bound >= 0,
          "gemm_canonical_grouped: bad shape groups=", args.num_groups, " n=", args.n,
          " k=", args.k);
  require(args.ldx >= args.k && args.ldw >= args.k && args.ldy >= args.n,
          "gemm_canonical_grouped: leading dimension below k=", args.k, " or n=", args.n);
  require(args.num_groups <= 65535, "gemm_canonical_grouped: ", args.num_groups,
          " groups exceed the grid's z dimension");
  if (args.num_groups == 0 || args.max_group_rows == 0) return;
  require(
      args.x != nullptr && args.w_table != nullptr && args.y != nullptr && args.offsets != nullptr,
      "gemm_canonical_grouped: null pointer");
  const dim3 grid = detail::grouped_gemm_grid<dim3>(args.n, args.num_groups, args.max_group_rows,
                                                    args.total_rows_bound, kTile);
  const dim3 block(kTile, kTile);
  with_weight_loader(args.w_dtype, [&](auto loader) {
    using Loader = typename decltype(loader)::Loader;
    using Element = typename decltype(loader)::Element;
    gemm_canonical_grouped_kernel<Loader, Element><<<grid, block, 0, stream>>>(
        args.x, args.ldx, args.w_table, args.ldw, args.y, args.ldy, args.offsets, args.n, args.k);
  });
  KEEL_CUDA_CHECK(cudaGetLastError());
}

CublasGemm::CublasGemm(cudaStream_t stream) : stream_(stream) {
  cublasHandle_t handle = nullptr;
  KEEL_CUBLAS_CHECK(cublasCreate(&handle));
  handle_ = handle;
  try {
    KEEL_CUBLAS_CHECK(cublasSetStream(handle, stream));
    KEEL_CUBLAS_CHECK(cublasSetWorkspace(handle, nullptr, 0));
    KEEL_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  } catch (...) {
    cublasDestroy(handle);
    handle_ = nullptr;
    throw;
  }
}

CublasGemm::~CublasGemm() {
  if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
}

CublasGemm::CublasGemm(CublasGemm&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)),
      stream_(other.stream_),
      workspace_(std::move(other.workspace_)) {}

CublasGemm& CublasGemm::operator=(CublasGemm&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
    handle_ = std::exchange(other.handle_, nullptr);
    stream_ = other.stream_;
    workspace_ = std::move(other.workspace_);
  }
  return *this;
}

void CublasGemm::gemm(const GemmArgs& args, CublasInputs inputs) {
  check_gemm_args(args, "CublasGemm::gemm");
  require(handle_ != nullptr, "CublasGemm::gemm: moved-from handle");
  if (args.m == 0 || args.n == 0) return;
  if (args.k == 0) return fill_zero(args, stream_);
  auto* handle = static_cast<cublasHandle_t>(handle_);

  const void* a = args.w;  // op(A) = A^T: w as column-major [K, N]
  cudaDataType_t a_type = cuda_type(args.w_dtype);
  int64_t lda = args.ldw;
  const void* b = args.x;  // op(B) = B: x as column-major [K, M]
  cudaDataType_t b_type = CUDA_R_32F;
  int64_t ldb = args.ldx;
  if (args.w_dtype != DType::kF32 && inputs == CublasInputs::kWidenWeights) {
    const size_t bytes = static_cast<size_t>(args.n * args.k) * sizeof(float);
    if (workspace_.bytes() < bytes) workspace_ = DeviceBuffer(bytes);
    widen_kernel<<<grid_for(args.n * args.k), kThreadsPerBlock, 0, stream_>>>(
        static_cast<const uint16_t*>(args.w), args.w_dtype, args.n, args.k, args.ldw,
        workspace_.as<float>());
    KEEL_CUDA_CHECK(cudaGetLastError());
    a = workspace_.data();
    a_type = CUDA_R_32F;
    lda = args.k;
  } else if (args.w_dtype != DType::kF32) {
    const size_t bytes = static_cast<size_t>(args.m * args.k) * sizeof(uint16_t);
    if (workspace_.bytes() < bytes) workspace_ = DeviceBuffer(bytes);
    narrow_kernel<<<grid_for(args.m * args.k), kThreadsPerBlock, 0, stream_>>>(
        args.x, args.w_dtype, args.m, args.k, args.ldx, workspace_.as<uint16_t>());
    KEEL_CUDA_CHECK(cudaGetLastError());
    b = workspace_.data();
    b_type = a_type;
    ldb = args.k;
  }
  const float alpha = 1.0f;
  const float beta = 0.0f;
  KEEL_CUBLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, to_int(args.n, "n"), to_int(args.m, "m"),
      to_int(args.k, "k"), &alpha, a, a_type, to_int(lda, "lda"), b, b_type, to_int(ldb, "ldb"),
      &beta, args.y, CUDA_R_32F, to_int(args.ldy, "ldy"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace keel::cuda
