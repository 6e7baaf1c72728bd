// CUDA quantized GEMM kernels: the twins of kernels/cpu/qgemm.cpp, bit for bit.
//
// Algorithm. The tiling of the canonical dense kernel (kernels/cuda/gemm.cu), with the weight
// decoder swapped: grid (ceil(N / 16), ceil(M / 16)) blocks of 16 x 16 threads; thread (tx, ty)
// owns y[m0 + ty, n0 + tx] and its 16 canonical lane accumulators in registers. For each slab of
// 64 k (4 canonical chunks) the block
//   1. stages x[m0 .. m0+16, slab] and the 16 weight rows w[n0 .. n0+16, slab] in shared memory,
//      each weight decoded to fp32 by the format's scalar loader of kernels/math/quant_math.h
//      (LoadNvfp4, LoadMxfp4, LoadFp8Block, LoadInt4: the same functions cpu::canonical_qdot
//      calls), zero-filled past M, N and K;
//   2. W4A4 only (NVFP4 with input_scale > 0): quantizes the staged x in place, one thread per
//      (row, 16-k block) with math::nvfp4_quantize_activation_block. A slab starts at a multiple
//      of 64 and NVFP4 activation blocks at multiples of 16, so each canonical chunk of the slab
//      is exactly one activation block (the last one cut at K, as nvfp4_quantize_activation_row
//      cuts it): the staged values equal the CPU's pre-quantized row, and no scratch row is needed
//      (the grouped kernel could not size one anyway: only the device knows which groups are
//      W4A4). The cost is re-quantizing x once per column tile;
//   3. runs math::canonical_accumulate_chunk for each chunk that starts below K (a chunk at or
//      past K is skipped, as the CPU loop never reaches it);
// then math::canonical_fold. The per-element operation sequence is math::canonical_dot_with's,
// so the bits depend on neither the tiling, M, N, nor the row's place in the batch.
//
// Memory. Shared: two [16][65] fp32 slabs (8.3 KB per block; rows padded to 65 floats so the 16
// threads of a row reading different weight rows hit different banks). Global reads per slab:
// 16 x 64 x fp32 of x, and of w 16 x 32 bytes (4-bit codes) or 16 x 64 bytes (FP8) plus the
// slab's scales; every block of a column tile re-reads the same weights (one weight read per
// 16 rows of M). Correctness first: no tensor cores, no vector loads.
//
// Grouped kernel (the MoE experts): grid (ceil(N / 16), row tiles, groups). Group g reads its
// view views[g] and its rows [offsets[g], offsets[g + 1]) on the device, switches once on the
// view's format (uniform in the block, so no divergence), and strides over its row tiles; each
// tile is the plain kernel's tile, so a row's bits equal qgemm's on that row.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/qgemm.h"
#include "kernels/math/gemm_math.h"
#include "kernels/math/quant_math.h"

namespace keel::cuda {

namespace {

using detail::require;
using math::WeightFormat;
using math::WeightView;

constexpr int kTile = 16;
constexpr int kSlab = 4 * math::kCanonicalLanes;  // K values staged per step
constexpr int kSlabPadded = kSlab + 1;
constexpr int kChunksPerSlab = kSlab / math::kCanonicalLanes;

static_assert(kTile * kTile == detail::kThreadsPerBlock, "one thread per output of a tile");
static_assert(math::kNvfp4Group == math::kCanonicalLanes,
              "W4A4 quantizes the staged x one canonical chunk per activation block");

// Weight [n][k] of `w` (format F) through the loader cpu::canonical_qdot builds for row n (the
// dense case as math::dequantized_weight reads it).
template <WeightFormat F>
__device__ float decode_weight(const WeightView& w, int64_t n, int64_t k) {
  const auto* codes = static_cast<const uint8_t*>(w.data) + n * w.ld;
  if constexpr (F == WeightFormat::kNvfp4) {
    return math::LoadNvfp4{codes, static_cast<const uint8_t*>(w.scales) + n * w.scale_ld,
                           w.row_scales[n]}(k);
  } else if constexpr (F == WeightFormat::kMxfp4) {
    return math::LoadMxfp4{codes, static_cast<const uint8_t*>(w.scales) + n * w.scale_ld}(k);
  } else if constexpr (F == WeightFormat::kFp8Block) {
    return math::LoadFp8Block{codes, static_cast<const float*>(w.scales) + n * w.scale_ld}(k);
  } else if constexpr (F == WeightFormat::kInt4) {
    return math::LoadInt4{codes, w.zeros + n * w.scale_ld,
                          static_cast<const float*>(w.scales) + n * w.scale_ld, w.group_of_k,
                          w.group_size}(k);
  } else {
    return load_as_f32(w.data, w.dtype, static_cast<size_t>(n * w.ld + k));
  }
}

// One 16 x 16 output tile at (m0, n0) of y = x w^T over rows [0, m), N = w.rows, K = w.cols:
// the body shared by the plain and the grouped kernel. Every thread of the block must call it
// (it synchronises the block).
template <WeightFormat F>
__device__ void qgemm_tile(const float* x, int64_t ldx, const WeightView& w, float* y, int64_t ldy,
                           int64_t m, int64_t m0, int64_t n0, float (&x_slab)[kTile][kSlabPadded],
                           float (&w_slab)[kTile][kSlabPadded]) {
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int thread = ty * kTile + tx;
  const int64_t n = w.rows;
  const int64_t k = w.cols;
  const bool w4a4 = F == WeightFormat::kNvfp4 && w.input_scale > 0.0f;

  float lanes[math::kCanonicalLanes] = {};
  for (int64_t slab_start = 0; slab_start < k; slab_start += kSlab) {
    for (int e = thread; e < kTile * kSlab; e += kTile * kTile) {
      const int row = e / kSlab;
      const int col = e % kSlab;
      const int64_t k_idx = slab_start + col;
      const bool k_ok = k_idx < k;
      x_slab[row][col] = (k_ok && m0 + row < m) ? x[(m0 + row) * ldx + k_idx] : 0.0f;
      w_slab[row][col] = (k_ok && n0 + row < n) ? decode_weight<F>(w, n0 + row, k_idx) : 0.0f;
    }
    __syncthreads();
    if (w4a4) {
      // One thread per (row, chunk): the chunk is one activation block of nvfp4_quantize_
      // activation_row, cut at K; positions past K stay 0 as the CPU never reads them.
      if (thread < kTile * kChunksPerSlab) {
        const int row = thread / kChunksPerSlab;
        const int chunk_offset = (thread % kChunksPerSlab) * math::kCanonicalLanes;
        const int64_t left = k - slab_start - chunk_offset;
        const int64_t count = left < math::kNvfp4Group ? left : math::kNvfp4Group;
        if (count > 0 && m0 + row < m)
          math::nvfp4_quantize_activation_block(&x_slab[row][chunk_offset], count, w.input_scale,
                                                &x_slab[row][chunk_offset]);
      }
      __syncthreads();
    }
    for (int chunk = 0; chunk < kChunksPerSlab; ++chunk) {
      const int chunk_offset = chunk * math::kCanonicalLanes;
      if (slab_start + chunk_offset >= k) break;
      math::canonical_accumulate_chunk(lanes, &x_slab[ty][chunk_offset], &w_slab[tx][chunk_offset]);
    }
    __syncthreads();
  }
  if (m0 + ty < m && n0 + tx < n) y[(m0 + ty) * ldy + n0 + tx] = math::canonical_fold(lanes);
}

template <WeightFormat F>
__global__ void qgemm_kernel(const float* x, int64_t ldx, const WeightView w, float* y, int64_t ldy,
                             int64_t m) {
  __shared__ float x_slab[kTile][kSlabPadded];
  __shared__ float w_slab[kTile][kSlabPadded];
  qgemm_tile<F>(x, ldx, w, y, ldy, m, int64_t{blockIdx.y} * kTile, int64_t{blockIdx.x} * kTile,
                x_slab, w_slab);
}

// Grouped: blockIdx.z is the group; its view and rows [offsets[g], offsets[g + 1]) are read
// here, on the device. The format and row count are uniform within the block, so every thread
// takes the same branch and runs the same number of tiles.
__global__ void qgemm_grouped_kernel(const float* x, int64_t ldx, const WeightView* views, float* y,
                                     int64_t ldy, const int32_t* offsets, int64_t n, int64_t k) {
  __shared__ float x_slab[kTile][kSlabPadded];
  __shared__ float w_slab[kTile][kSlabPadded];
  const int64_t group = blockIdx.z;
  const int64_t first_row = offsets[group];
  const int64_t num_rows = offsets[group + 1] - first_row;
  const WeightView w = views[group];
  const int64_t n0 = int64_t{blockIdx.x} * kTile;
  const float* group_x = x + first_row * ldx;
  float* group_y = y + first_row * ldy;
  if (w.rows != n || w.cols != k || math::weight_view_problem(w, /*allow_dense=*/true) != nullptr) {
    // A view that does not fit: NaN rows, visible in the output, never a wild read.
    const int64_t col = n0 + threadIdx.x;
    for (int64_t row = int64_t{blockIdx.y} * kTile + threadIdx.y; row < num_rows;
         row += int64_t{gridDim.y} * kTile)
      if (col < n) group_y[row * ldy + col] = bits_float(0x7fc00000u);
    return;
  }
  for (int64_t m0 = int64_t{blockIdx.y} * kTile; m0 < num_rows; m0 += int64_t{gridDim.y} * kTile) {
    switch (w.format) {
      case WeightFormat::kNvfp4:
        qgemm_tile<WeightFormat::kNvfp4>(group_x, ldx, w, group_y, ldy, num_rows, m0, n0, x_slab,
                                         w_slab);
        break;
      case WeightFormat::kMxfp4:
        qgemm_tile<WeightFormat::kMxfp4>(group_x, ldx, w, group_y, ldy, num_rows, m0, n0, x_slab,
                                         w_slab);
        break;
      case WeightFormat::kFp8Block:
        qgemm_tile<WeightFormat::kFp8Block>(group_x, ldx, w, group_y, ldy, num_rows, m0, n0, x_slab,
                                            w_slab);
        break;
      case WeightFormat::kInt4:
        qgemm_tile<WeightFormat::kInt4>(group_x, ldx, w, group_y, ldy, num_rows, m0, n0, x_slab,
                                        w_slab);
        break;
      case WeightFormat::kDense:
        qgemm_tile<WeightFormat::kDense>(group_x, ldx, w, group_y, ldy, num_rows, m0, n0, x_slab,
                                         w_slab);
        break;
    }
  }
}

}  // namespace

void qgemm(const QGemmArgs& args, cudaStream_t stream) {
  const WeightView& w = args.w;
  const char* problem = math::weight_view_problem(w, /*allow_dense=*/false);
  require(problem == nullptr, "cuda::qgemm(", math::weight_format_name(w.format),
          "): ", problem == nullptr ? "" : problem, " (", w.rows, "x", w.cols, ", ld ", w.ld, ", ",
          w.scale_ld, " scales per row, group size ", w.group_size, ", input scale ", w.input_scale,
          ")");
  require(args.m >= 0, "cuda::qgemm: negative m=", args.m);
  require(args.ldx >= w.cols && args.ldy >= w.rows, "cuda::qgemm: ldx=", args.ldx,
          " ldy=", args.ldy, " below k=", w.cols, " / n=", w.rows);
  if (args.m == 0) return;
  require(args.x != nullptr && args.y != nullptr, "cuda::qgemm: null x or y");
  require((args.m + kTile - 1) / kTile <= 65535, "cuda::qgemm: m=", args.m,
          " exceeds the grid's y dimension");
  require((w.rows + kTile - 1) / kTile <= int64_t{0x7fffffff}, "cuda::qgemm: n=", w.rows,
          " exceeds the grid's x dimension");
  const dim3 grid(static_cast<unsigned>((w.rows + kTile - 1) / kTile),
                  static_cast<unsigned>((args.m + kTile - 1) / kTile));
  const dim3 block(kTile, kTile);
  switch (w.format) {
    case WeightFormat::kNvfp4:
      qgemm_kernel<WeightFormat::kNvfp4>
          <<<grid, block, 0, stream>>>(args.x, args.ldx, w, args.y, args.ldy, args.m);
      break;
    case WeightFormat::kMxfp4:
      qgemm_kernel<WeightFormat::kMxfp4>
          <<<grid, block, 0, stream>>>(args.x, args.ldx, w, args.y, args.ldy, args.m);
      break;
    case WeightFormat::kFp8Block:
      qgemm_kernel<WeightFormat::kFp8Block>
          <<<grid, block, 0, stream>>>(args.x, args.ldx, w, args.y, args.ldy, args.m);
      break;
    case WeightFormat::kInt4:
      qgemm_kernel<WeightFormat::kInt4>
          <<<grid, block, 0, stream>>>(args.x, args.ldx, w, args.y, args.ldy, args.m);
      break;
    case WeightFormat::kDense:
      break;  // rejected by math::weight_view_problem
  }
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void qgemm_grouped(const GroupedQGemmArgs& args, cudaStream_t stream) {
  require(args.num_groups >= 0 && args.n > 0 && args.k > 0 && args.max_group_rows >= 0 &&
              args.total_rows_bound >= 0,
          "cuda::qgemm_grouped: bad shape groups=", args.num_groups, " n=", args.n, " k=", args.k);
  require(args.ldx >= args.k && args.ldy >= args.n,
          "cuda::qgemm_grouped: leading dimension below k=", args.k, " or n=", args.n,
          " (ldx=", args.ldx, " ldy=", args.ldy, ")");
  require(args.num_groups <= 65535, "cuda::qgemm_grouped: ", args.num_groups,
          " groups exceed the grid's z dimension");
  require((args.n + kTile - 1) / kTile <= int64_t{0x7fffffff}, "cuda::qgemm_grouped: n=", args.n,
          " exceeds the grid's x dimension");
  if (args.num_groups == 0 || args.max_group_rows == 0) return;
  require(
      args.x != nullptr && args.views != nullptr && args.y != nullptr && args.offsets != nullptr,
      "cuda::qgemm_grouped: null pointer");
  const dim3 grid = detail::grouped_gemm_grid<dim3>(args.n, args.num_groups, args.max_group_rows,
                                                    args.total_rows_bound, kTile);
  const dim3 block(kTile, kTile);
  qgemm_grouped_kernel<<<grid, block, 0, stream>>>(args.x, args.ldx, args.views, args.y, args.ldy,
                                                   args.offsets, args.n, args.k);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace keel::cuda
