// MoE kernels: router top-k, permute into per-expert batches, slot map, canonical combine.
//
// Layouts (device memory, fp32 unless stated):
//  - logits / probs_scratch [tokens, E]; expert_ids (int32) / expert_weights [tokens, top_k];
//    margins [tokens]. route_top_k runs one thread per token: the repeated-scan selection and
//    the sequential softmax of math::route_top_k_token, nothing reordered.
//  - moe_pack: ONE block of kPackThreads threads. (1) Shared counters count each local
//    expert's pairs (atomicAdd of integers: order-free, exact). (2) Thread 0 writes the counts
//    into offsets and runs math::pack_prefix_sum; the counters become per-expert cursors.
//    (3) Pairs go in tiles of kPackThreads, in (token, slot) order: a thread's packed row is its
//    expert's cursor plus the number of earlier pairs of the tile with the same expert (a scan
//    of the tile in shared memory), which is exactly the sequential sort's placement; the last
//    pair of each expert in the tile then advances that cursor. Work O(pairs * kPackThreads)
//    scalar steps spread over the block: microseconds at decode sizes; a multi-block sort is the
//    upgrade path for long prefills. Local experts are limited by shared memory (12288).
//  - routes (math::PackedRoute) [rows]: local experts back to back. moe_gather: one block per
//    possible packed row, threads over width; rows past offsets[num_groups] return at once.
//  - moe_silu_mul: grid-stride over max_rows * width, rows past the packed count skipped.
//  - moe_combine: one block per token, threads over hidden; each element adds its slots in
//    slot order (math::combine_element) and then the gated shared expert.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/moe.h"
#include "kernels/math/ops_math.h"

namespace keel::cuda {

namespace {

using detail::grid_for;
using detail::grid_for_rows;
using detail::kThreadsPerBlock;
using detail::require;

__global__ void route_top_k_kernel(const float* logits, int64_t num_tokens, int64_t num_experts,
                                   int64_t top_k, bool normalize, float* probs_scratch,
                                   int32_t* expert_ids, float* expert_weights, float* margins,
                                   const int32_t* forced_ids) {
  for (int64_t token = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; token < num_tokens;
       token += int64_t{gridDim.x} * blockDim.x) {
    margins[token] =
        math::route_top_k_token(logits + token * num_experts, num_experts, top_k, normalize,
                                probs_scratch + token * num_experts, expert_ids + token * top_k,
                                expert_weights + token * top_k,
                                forced_ids == nullptr ? nullptr : forced_ids + token * top_k);
  }
}

constexpr int kPackThreads = 256;
constexpr int64_t kMaxPackLocalExperts = 12288;  // int32 cursors in 48 KiB of shared memory

__global__ void pack_kernel(const int32_t* expert_ids, int64_t num_pairs, int64_t top_k,
                            const int32_t* expert_to_local, int64_t num_local, int32_t* offsets,
                            math::PackedRoute* routes, int32_t* slot_rows) {
  extern __shared__ int32_t cursor[];  // [num_local]: counts, then next free row per expert
  __shared__ int32_t tile[kPackThreads];
  const int thread = threadIdx.x;
  for (int64_t local = thread; local < num_local; local += kPackThreads) cursor[local] = 0;
  __syncthreads();
  for (int64_t pair = thread; pair < num_pairs; pair += kPackThreads) {
    const int32_t local = math::local_expert_of(expert_to_local, expert_ids[pair]);
    if (local >= 0) atomicAdd(&cursor[local], 1);
  }
  __syncthreads();
  if (thread == 0) {
    offsets[0] = 0;
    for (int64_t local = 0; local < num_local; ++local) offsets[local + 1] = cursor[local];
    math::pack_prefix_sum(offsets, num_local);
    for (int64_t local = 0; local < num_local; ++local) cursor[local] = offsets[local];
  }
  __syncthreads();
  for (int64_t base = 0; base < num_pairs; base += kPackThreads) {
    const int64_t pair = base + thread;
    const int32_t local =
        pair < num_pairs ? math::local_expert_of(expert_to_local, expert_ids[pair]) : -1;
    tile[thread] = local;
    __syncthreads();
    int32_t rank = 0;
    bool last_of_expert = true;
    if (local >= 0) {
      for (int other = 0; other < kPackThreads; ++other) {
        if (tile[other] != local) continue;
        if (other < thread) ++rank;
        if (other > thread) last_of_expert = false;
      }
      const int32_t row = cursor[local] + rank;
      routes[row] = math::packed_route_of_pair(pair, top_k);
      slot_rows[pair] = row;
    } else if (pair < num_pairs) {
      slot_rows[pair] = -1;
    }
    __syncthreads();  // every cursor read of this tile before any advance
    if (local >= 0 && last_of_expert) cursor[local] += rank + 1;
    __syncthreads();
  }
}

__global__ void gather_rows_kernel(const float* x, int64_t x_stride, int64_t width,
                                   const math::PackedRoute* routes, float* out) {
  const int64_t row = blockIdx.x;
  const float* src = x + int64_t{routes[row].token_idx} * x_stride;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) out[row * width + i] = src[i];
}

__global__ void gather_kernel(const float* x, int64_t x_stride, int64_t width,
                              const math::PackedRoute* routes, const int32_t* offsets,
                              int64_t num_groups, float* expert_in) {
  const int64_t row = offsets[0] + int64_t{blockIdx.x};
  if (row >= offsets[num_groups]) return;
  const float* src = x + int64_t{routes[row].token_idx} * x_stride;
  float* dst = expert_in + row * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

__global__ void packed_silu_mul_kernel(const float* mid, const int32_t* offsets, int64_t num_groups,
                                       int64_t max_rows, int64_t width, float* act) {
  const int64_t first_row = offsets[0];
  const int64_t num_rows = min(offsets[num_groups] - first_row, max_rows);
  const int64_t total = num_rows * width;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = first_row + index / width;
    const int64_t i = index % width;
    act[row * width + i] =
        math::silu_mul(mid[row * 2 * width + i], mid[row * 2 * width + width + i]);
  }
}

__global__ void combine_kernel(const float* expert_out, int64_t hidden, const int32_t* slot_rows,
                               const float* route_weights, int64_t top_k,
                               math::CombinePrecisionArgs precision, SharedExpertOutput shared,
                               float* out) {
  const int64_t token = blockIdx.x;
  const float* weights = route_weights + token * top_k;
  const int32_t* rows = slot_rows + token * top_k;
  const bool has_shared = shared.out != nullptr;
  const float gate = has_shared ? math::sigmoid_f32(shared.gate_logits[token]) : 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = math::combine_element(top_k, weights, rows, expert_out, hidden, i, precision);
    if (has_shared) acc = math::combine_add_shared(acc, gate, shared.out[token * hidden + i]);
    out[token * hidden + i] = acc;
  }
}

}  // namespace

void route_top_k(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                 bool normalize, float* probs_scratch, int32_t* expert_ids, float* expert_weights,
                 float* margins, cudaStream_t stream, const int32_t* forced_ids) {
  require(num_tokens >= 0 && num_experts > 0 && top_k > 0 && top_k <= num_experts,
          "route_top_k: bad shape tokens=", num_tokens, " experts=", num_experts, " top_k=", top_k);
  if (num_tokens == 0) return;
  require(logits != nullptr && probs_scratch != nullptr && expert_ids != nullptr &&
              expert_weights != nullptr && margins != nullptr,
          "route_top_k: null pointer");
  constexpr int kThreads = 64;
  route_top_k_kernel<<<grid_for(num_tokens, kThreads), kThreads, 0, stream>>>(
      logits, num_tokens, num_experts, top_k, normalize, probs_scratch, expert_ids, expert_weights,
      margins, forced_ids);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void router(const float* x, int64_t num_tokens, int64_t hidden, const void* router_weight,
            DType w_dtype, int64_t num_experts, int64_t top_k, bool normalize, float* logits,
            float* probs_scratch, int32_t* expert_ids, float* expert_weights, float* margins,
            cudaStream_t stream) {
  gemm_canonical(GemmArgs{x, hidden, router_weight, w_dtype, hidden, logits, num_experts,
                          num_tokens, num_experts, hidden},
                 stream);
  route_top_k(logits, num_tokens, num_experts, top_k, normalize, probs_scratch, expert_ids,
              expert_weights, margins, stream);
}

void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
              const int32_t* expert_to_local, int64_t num_local, int32_t* offsets,
              math::PackedRoute* routes, int32_t* slot_rows, cudaStream_t stream) {
  require(num_tokens >= 0 && top_k > 0 && num_local >= 0, "moe_pack: bad shape tokens=", num_tokens,
          " top_k=", top_k, " local experts=", num_local);
  require(num_local <= kMaxPackLocalExperts, "moe_pack: ", num_local, " local experts exceed the ",
          kMaxPackLocalExperts, " one block can count");
  require(offsets != nullptr, "moe_pack: null offsets");
  require(num_tokens == 0 || (expert_ids != nullptr && expert_to_local != nullptr &&
                              routes != nullptr && slot_rows != nullptr),
          "moe_pack: null pointer");
  const size_t shared_bytes = static_cast<size_t>(num_local) * sizeof(int32_t);
  pack_kernel<<<1, kPackThreads, shared_bytes, stream>>>(expert_ids, num_tokens * top_k, top_k,
                                                         expert_to_local, num_local, offsets,
                                                         routes, slot_rows);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void gather_rows(const float* x, int64_t x_stride, int64_t width, const math::PackedRoute* routes,
                 int64_t num_rows, float* out, cudaStream_t stream) {
  require(num_rows >= 0 && width > 0 && x_stride >= width, "gather_rows: bad shape rows=", num_rows,
          " width=", width, " x_stride=", x_stride);
  if (num_rows == 0) return;
  require(x != nullptr && routes != nullptr && out != nullptr, "gather_rows: null pointer");
  gather_rows_kernel<<<grid_for_rows(num_rows, "gather_rows"), kThreadsPerBlock, 0, stream>>>(
      x, x_stride, width, routes, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void moe_gather(const float* x, int64_t x_stride, int64_t width, const math::PackedRoute* routes,
                const int32_t* offsets, int64_t num_groups, int64_t max_rows, float* expert_in,
                cudaStream_t stream) {
  require(max_rows >= 0 && width > 0 && x_stride >= width && num_groups >= 0,
          "moe_gather: bad shape rows=", max_rows, " width=", width, " x_stride=", x_stride);
  if (max_rows == 0 || num_groups == 0) return;
  require(x != nullptr && routes != nullptr && offsets != nullptr && expert_in != nullptr,
          "moe_gather: null pointer");
  gather_kernel<<<grid_for_rows(max_rows, "moe_gather"), kThreadsPerBlock, 0, stream>>>(
      x, x_stride, width, routes, offsets, num_groups, expert_in);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void moe_silu_mul(const float* mid, const int32_t* offsets, int64_t num_groups, int64_t max_rows,
                  int64_t width, float* act, cudaStream_t stream) {
  require(max_rows >= 0 && width > 0 && num_groups >= 0, "moe_silu_mul: bad shape rows=", max_rows,
          " width=", width);
  if (max_rows == 0 || num_groups == 0) return;
  require(mid != nullptr && offsets != nullptr && act != nullptr, "moe_silu_mul: null pointer");
  packed_silu_mul_kernel<<<grid_for(max_rows * width), kThreadsPerBlock, 0, stream>>>(
      mid, offsets, num_groups, max_rows, width, act);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void moe_combine(const float* expert_out, int64_t hidden, const int32_t* slot_rows,
                 const float* route_weights, int64_t num_tokens, int64_t top_k,
                 math::CombinePrecisionArgs precision, SharedExpertOutput shared, float* out,
                 cudaStream_t stream) {
  require(num_tokens >= 0 && hidden > 0 && top_k > 0, "moe_combine: bad shape tokens=", num_tokens,
          " hidden=", hidden, " top_k=", top_k);
  require((shared.out == nullptr) == (shared.gate_logits == nullptr),
          "moe_combine: shared expert output and gate logits must be given together");
  require(precision.expert_dtype == DType::kF32 || precision.expert_dtype == DType::kBF16 ||
              precision.expert_dtype == DType::kF16,
          "moe_combine: unknown expert dtype ", static_cast<int>(precision.expert_dtype));
  if (num_tokens == 0) return;
  require(slot_rows != nullptr && route_weights != nullptr && out != nullptr,
          "moe_combine: null pointer");
  combine_kernel<<<grid_for_rows(num_tokens, "moe_combine"), kThreadsPerBlock, 0, stream>>>(
      expert_out, hidden, slot_rows, route_weights, top_k, precision, shared, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace keel::cuda
