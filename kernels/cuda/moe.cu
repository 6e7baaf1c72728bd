// MoE kernels: router top-k, permute into per-expert batches, slot map, canonical combine.
//
// Layouts (device memory, fp32 unless stated):
//  - logits / probs_scratch [tokens, E]; expert_ids (int32) / expert_weights [tokens, top_k];
//    margins [tokens]. route_top_k runs one thread per token: the repeated-scan selection and
//    the sequential softmax of math::route_top_k_token, nothing reordered.
//  - routes (DeviceRoute) [rows]: the host counting sort's output, local experts back to back.
//    moe_permute: one block per packed row, threads over hidden, a plain copy.
//  - slot_rows (int32) [tokens, top_k]: filled with -1 by cudaMemsetAsync (0xff bytes), then
//    one thread per packed row writes its index.
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

__global__ void permute_kernel(const float* x, int64_t x_stride, int64_t hidden,
                               const DeviceRoute* routes, float* expert_in) {
  const int64_t row = blockIdx.x;
  const float* src = x + int64_t{routes[row].token_idx} * x_stride;
  float* dst = expert_in + row * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

__global__ void slot_rows_kernel(const DeviceRoute* routes, int64_t num_rows, int64_t num_tokens,
                                 int64_t top_k, int32_t* slot_rows) {
  for (int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; row < num_rows;
       row += int64_t{gridDim.x} * blockDim.x) {
    const DeviceRoute route = routes[row];
    if (route.token_idx < 0 || route.token_idx >= num_tokens || route.slot_idx < 0 ||
        route.slot_idx >= top_k)
      continue;
    slot_rows[int64_t{route.token_idx} * top_k + route.slot_idx] = static_cast<int32_t>(row);
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

void moe_permute(const float* x, int64_t x_stride, int64_t hidden, const DeviceRoute* routes,
                 int64_t num_rows, float* expert_in, cudaStream_t stream) {
  require(num_rows >= 0 && hidden > 0 && x_stride >= hidden,
          "moe_permute: bad shape rows=", num_rows, " hidden=", hidden, " x_stride=", x_stride);
  if (num_rows == 0) return;
  require(x != nullptr && routes != nullptr && expert_in != nullptr, "moe_permute: null pointer");
  permute_kernel<<<grid_for_rows(num_rows, "moe_permute"), kThreadsPerBlock, 0, stream>>>(
      x, x_stride, hidden, routes, expert_in);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void moe_slot_rows(const DeviceRoute* routes, int64_t num_rows, int64_t num_tokens, int64_t top_k,
                   int32_t* slot_rows, cudaStream_t stream) {
  require(num_rows >= 0 && num_tokens >= 0 && top_k > 0 && num_rows <= num_tokens * top_k,
          "moe_slot_rows: bad shape rows=", num_rows, " tokens=", num_tokens, " top_k=", top_k);
  if (num_tokens == 0) return;
  require(slot_rows != nullptr && (num_rows == 0 || routes != nullptr),
          "moe_slot_rows: null pointer");
  KEEL_CUDA_CHECK(cudaMemsetAsync(
      slot_rows, 0xff, static_cast<size_t>(num_tokens * top_k) * sizeof(int32_t), stream));
  if (num_rows == 0) return;
  slot_rows_kernel<<<grid_for(num_rows), kThreadsPerBlock, 0, stream>>>(
      routes, num_rows, num_tokens, top_k, slot_rows);
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
