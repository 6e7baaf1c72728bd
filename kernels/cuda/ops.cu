// Per-row and elementwise kernels of the forward pass.
//
// Algorithms and layouts (fp32 row-major activations, all device memory):
//  - embedding_gather: one block per token, threads stride over the hidden row; table
//    [vocab, hidden] in its storage dtype, widened with dtype.h's exact conversions.
//  - rms_norm / rms_norm_heads: one block per row. Thread 0 sums the squares sequentially (the
//    contract's order; a tree would change bits), then all threads scale their elements.
//  - rope: one thread per (token, head, pair); cos/sin come from a host-built table.
//  - kv_cache_append: one block per token, threads over kv_heads * head_dim, each element
//    rounded to the pool dtype (kernels/math/kv_math.h); attention widens it back as it reads.
//  - attention: one block per (token, query head); see ops.h for the order of each sum.
//  - silu_mul, add_bias, add_in_place: grid-stride over elements.
//  - argmax_rows: one block per row, per-thread strided scans merged by a shared-memory tree.
// The arithmetic of every kernel is a kernels/math function, the one the CPU kernels call.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/ops.h"
#include "kernels/math/ops_math.h"

namespace keel::cuda {

namespace {

using detail::grid_for;
using detail::grid_for_rows;
using detail::kThreadsPerBlock;
using detail::require;

__device__ float quiet_nan() {
  return bits_float(0x7fc00000u);
}

__global__ void embedding_gather_kernel(const void* table, DType dtype, int64_t vocab,
                                        int64_t hidden, const int32_t* token_ids, float* out) {
  const int64_t token = blockIdx.x;
  const int32_t id = token_ids[token];
  float* out_row = out + token * hidden;
  const bool valid = id >= 0 && id < vocab;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    out_row[i] = valid ? load_as_f32(table, dtype, static_cast<size_t>(int64_t{id} * hidden + i))
                       : quiet_nan();
  }
}

// Row r = (group g, member j): x + g * group_stride + j * width, with members_per_group rows in
// each group. A plain matrix is one member per group with group_stride = width.
struct RowLayout {
  int64_t members_per_group = 1;
  int64_t group_stride = 0;
  int64_t width = 0;
  __device__ int64_t offset(int64_t row) const {
    return (row / members_per_group) * group_stride + (row % members_per_group) * width;
  }
};

__global__ void rms_norm_kernel(const float* x, const float* weight, float eps, RowLayout layout,
                                float* out) {
  __shared__ float inv_rms;
  const int64_t offset = layout.offset(blockIdx.x);
  const float* x_row = x + offset;
  float* out_row = out + offset;
  if (threadIdx.x == 0)
    inv_rms = math::rms_inv(math::rms_sum_squares(x_row, layout.width), layout.width, eps);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < layout.width; i += blockDim.x)
    out_row[i] = math::rms_scale(x_row[i], weight[i], inv_rms);
}

__global__ void rope_kernel(float* rows, int64_t num_tokens, int64_t token_stride,
                            int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                            const int32_t* positions, const float* cos_sin_table,
                            int64_t table_positions) {
  const int64_t half = rotary_dim / 2;
  const int64_t total = num_tokens * num_heads * half;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t pair = index % half;
    const int64_t head = (index / half) % num_heads;
    const int64_t token = index / (half * num_heads);
    float* vec = rows + token * token_stride + head * head_dim;
    const int32_t position = positions[token];
    if (position < 0 || position >= table_positions) {
      vec[pair] = quiet_nan();
      vec[half + pair] = quiet_nan();
      continue;
    }
    const float* cos_sin = cos_sin_table + int64_t{position} * rotary_dim;
    math::rope_rotate_pair(vec[pair], vec[half + pair], cos_sin[pair], cos_sin[half + pair]);
  }
}

template <typename Kv>
__global__ void kv_cache_append_kernel(const float* k_rows, const float* v_rows, int64_t row_stride,
                                       const int32_t* positions, const int32_t* cache_idx,
                                       KvPool pool) {
  const int64_t token = blockIdx.x;
  const int32_t position = positions[token];
  if (position < 0 || position >= pool.capacity()) return;
  const int64_t seq = cache_idx[token];
  const int64_t width = pool.num_kv_heads * pool.head_dim;
  auto* k = static_cast<typename Kv::Storage*>(pool.k);
  auto* v = static_cast<typename Kv::Storage*>(pool.v);
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    const int64_t head = i / pool.head_dim;
    const int64_t d = i % pool.head_dim;
    const int64_t dst = pool.rows<Kv>(pool.k, 1.0f, seq, head).row(position) - k + d;
    k[dst] = Kv::store(k_rows[token * row_stride + i], pool.k_scale);
    v[dst] = Kv::store(v_rows[token * row_stride + i], pool.v_scale);
  }
}

template <typename Kv>
__global__ void attention_kernel(const float* q, int64_t q_token_stride, int64_t num_q_heads,
                                 const int32_t* kv_head_of_q, KvPool pool, const int32_t* positions,
                                 const int32_t* cache_idx, float scale, float* scores_scratch,
                                 float* out, int64_t out_token_stride) {
  __shared__ float max_score;
  __shared__ float inv_sum;
  const int64_t token = blockIdx.x / num_q_heads;
  const int64_t head = blockIdx.x % num_q_heads;
  const int64_t head_dim = pool.head_dim;
  float* out_head = out + token * out_token_stride + head * head_dim;
  const int32_t position = positions[token];
  if (position < 0 || position >= pool.capacity()) {
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) out_head[d] = quiet_nan();
    return;
  }
  const int64_t num_positions = int64_t{position} + 1;
  const float* q_head = q + token * q_token_stride + head * head_dim;
  const math::PagedKvRowsOf<Kv> k_rows =
      pool.rows<Kv>(pool.k, pool.k_scale, cache_idx[token], kv_head_of_q[head]);
  const math::PagedKvRowsOf<Kv> v_rows =
      pool.rows<Kv>(pool.v, pool.v_scale, cache_idx[token], kv_head_of_q[head]);
  float* scores = scores_scratch + int64_t{blockIdx.x} * pool.capacity();

  for (int64_t pos = threadIdx.x; pos < num_positions; pos += blockDim.x)
    scores[pos] = math::attention_score_paged(q_head, k_rows, pos, scale);
  __syncthreads();
  if (threadIdx.x == 0) max_score = math::row_max(scores, num_positions);
  __syncthreads();
  for (int64_t pos = threadIdx.x; pos < num_positions; pos += blockDim.x)
    scores[pos] = math::attention_exp_score(scores[pos], max_score);
  __syncthreads();
  if (threadIdx.x == 0) inv_sum = math::attention_inv_sum(scores, num_positions);
  __syncthreads();
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x)
    out_head[d] = math::attention_output_element_paged(scores, inv_sum, v_rows, num_positions, d);
}

// Runs fn(Kv{}) with the storage format of `dtype`.
template <typename Fn>
void with_kv_format(math::KvDType dtype, Fn&& fn) {
  switch (dtype) {
    case math::KvDType::kF32:
      return fn(math::KvF32{});
    case math::KvDType::kBF16:
      return fn(math::KvBF16{});
    case math::KvDType::kFp8E4M3:
      return fn(math::KvFp8E4M3{});
  }
  require(false, "unknown KV cache dtype ", static_cast<int>(dtype));
}

__global__ void silu_mul_kernel(const float* gate, const float* up, int64_t in_stride,
                                int64_t num_rows, int64_t width, float* out, int64_t out_stride) {
  const int64_t total = num_rows * width;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = index / width;
    const int64_t i = index % width;
    out[row * out_stride + i] = math::silu_mul(gate[row * in_stride + i], up[row * in_stride + i]);
  }
}

__global__ void add_bias_kernel(float* rows, int64_t num_rows, int64_t width, int64_t row_stride,
                                const float* bias) {
  const int64_t total = num_rows * width;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = index / width;
    const int64_t i = index % width;
    rows[row * row_stride + i] += bias[i];
  }
}

__global__ void add_in_place_kernel(float* dst, const float* src, int64_t count) {
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < count;
       index += int64_t{gridDim.x} * blockDim.x)
    dst[index] += src[index];
}

constexpr int kArgmaxThreads = 256;

__global__ void argmax_kernel(const float* logits, int64_t vocab, int64_t row_stride,
                              int32_t* ids) {
  __shared__ float best_values[kArgmaxThreads];
  __shared__ int32_t best_indices[kArgmaxThreads];
  const float* row = logits + int64_t{blockIdx.x} * row_stride;
  float best_value = 0.0f;
  int32_t best_index = -1;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float value = row[i];
    // Candidates: every non-NaN entry, and index 0 whatever it holds (see argmax_row).
    const bool candidate = i == 0 || value == value;
    if (candidate && math::argmax_prefers(value, static_cast<int32_t>(i), best_value, best_index)) {
      best_value = value;
      best_index = static_cast<int32_t>(i);
    }
  }
  best_values[threadIdx.x] = best_value;
  best_indices[threadIdx.x] = best_index;
  __syncthreads();
  for (int width = kArgmaxThreads / 2; width >= 1; width /= 2) {
    if (threadIdx.x < width) {
      const int other = threadIdx.x + width;
      if (math::argmax_prefers(best_values[other], best_indices[other], best_values[threadIdx.x],
                               best_indices[threadIdx.x])) {
        best_values[threadIdx.x] = best_values[other];
        best_indices[threadIdx.x] = best_indices[other];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = best_indices[0];
}

void check_dtype(DType dtype, const char* what) {
  require(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16, what,
          ": unknown dtype ", static_cast<int>(dtype));
}

}  // namespace

void embedding_gather(const void* table, DType dtype, int64_t vocab, int64_t hidden,
                      const int32_t* token_ids, int64_t num_tokens, float* out,
                      cudaStream_t stream) {
  check_dtype(dtype, "embedding_gather");
  require(vocab > 0 && hidden > 0 && num_tokens >= 0, "embedding_gather: bad shape vocab=", vocab,
          " hidden=", hidden, " tokens=", num_tokens);
  if (num_tokens == 0) return;
  require(table != nullptr && token_ids != nullptr && out != nullptr,
          "embedding_gather: null pointer");
  embedding_gather_kernel<<<grid_for_rows(num_tokens, "embedding_gather"), kThreadsPerBlock, 0,
                            stream>>>(table, dtype, vocab, hidden, token_ids, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
              float* out, cudaStream_t stream) {
  require(num_rows >= 0 && width > 0, "rms_norm: bad shape rows=", num_rows, " width=", width);
  if (num_rows == 0) return;
  require(x != nullptr && weight != nullptr && out != nullptr, "rms_norm: null pointer");
  rms_norm_kernel<<<grid_for_rows(num_rows, "rms_norm"), kThreadsPerBlock, 0, stream>>>(
      x, weight, eps, RowLayout{1, width, width}, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void rms_norm_heads(float* rows, int64_t num_tokens, int64_t token_stride, int64_t num_heads,
                    int64_t head_dim, const float* weight, float eps, cudaStream_t stream) {
  require(num_tokens >= 0 && num_heads > 0 && head_dim > 0 && token_stride >= num_heads * head_dim,
          "rms_norm_heads: bad shape tokens=", num_tokens, " heads=", num_heads,
          " head_dim=", head_dim, " token_stride=", token_stride);
  if (num_tokens == 0) return;
  require(rows != nullptr && weight != nullptr, "rms_norm_heads: null pointer");
  rms_norm_kernel<<<grid_for_rows(num_tokens * num_heads, "rms_norm_heads"), kThreadsPerBlock, 0,
                    stream>>>(rows, weight, eps, RowLayout{num_heads, token_stride, head_dim},
                              rows);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

std::vector<float> rope_cos_sin_table(int64_t num_positions, double theta, int64_t rotary_dim) {
  require(num_positions >= 0 && rotary_dim > 0 && rotary_dim % 2 == 0,
          "rope_cos_sin_table: bad shape positions=", num_positions, " rotary_dim=", rotary_dim);
  std::vector<float> table(static_cast<size_t>(num_positions * rotary_dim));
  for (int64_t position = 0; position < num_positions; ++position)
    math::rope_cos_sin_row(position, static_cast<float>(theta), rotary_dim,
                           table.data() + position * rotary_dim);
  return table;
}

void rope(float* rows, int64_t num_tokens, int64_t token_stride, int64_t num_heads,
          int64_t head_dim, int64_t rotary_dim, const int32_t* positions,
          const float* cos_sin_table, int64_t table_positions, cudaStream_t stream) {
  require(num_tokens >= 0 && num_heads > 0 && rotary_dim > 0 && rotary_dim % 2 == 0 &&
              rotary_dim <= head_dim && token_stride >= num_heads * head_dim,
          "rope: bad shape tokens=", num_tokens, " heads=", num_heads, " head_dim=", head_dim,
          " rotary_dim=", rotary_dim, " token_stride=", token_stride);
  if (num_tokens == 0) return;
  require(rows != nullptr && positions != nullptr && cos_sin_table != nullptr,
          "rope: null pointer");
  const int64_t total = num_tokens * num_heads * (rotary_dim / 2);
  rope_kernel<<<grid_for(total), kThreadsPerBlock, 0, stream>>>(
      rows, num_tokens, token_stride, num_heads, head_dim, rotary_dim, positions, cos_sin_table,
      table_positions);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void kv_cache_append(const float* k_rows, const float* v_rows, int64_t row_stride,
                     int64_t num_tokens, const int32_t* positions, const int32_t* cache_idx,
                     const KvPool& pool, cudaStream_t stream) {
  require(num_tokens >= 0 && pool.capacity() > 0 && pool.num_kv_heads > 0 && pool.head_dim > 0 &&
              row_stride >= pool.num_kv_heads * pool.head_dim &&
              pool.block_stride >= pool.num_kv_heads * pool.block_size * pool.head_dim,
          "kv_cache_append: bad shape tokens=", num_tokens, " capacity=", pool.capacity(),
          " kv_heads=", pool.num_kv_heads, " head_dim=", pool.head_dim, " row_stride=", row_stride,
          " block_stride=", pool.block_stride);
  if (num_tokens == 0) return;
  require(k_rows != nullptr && v_rows != nullptr && positions != nullptr && cache_idx != nullptr &&
              pool.k != nullptr && pool.v != nullptr && pool.block_tables != nullptr,
          "kv_cache_append: null pointer");
  with_kv_format(pool.dtype, [&](auto format) {
    kv_cache_append_kernel<decltype(format)>
        <<<grid_for_rows(num_tokens, "kv_cache_append"), kThreadsPerBlock, 0, stream>>>(
            k_rows, v_rows, row_stride, positions, cache_idx, pool);
  });
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void attention(const float* q, int64_t q_token_stride, int64_t num_tokens, int64_t num_q_heads,
               const int32_t* kv_head_of_q, const KvPool& pool, const int32_t* positions,
               const int32_t* cache_idx, float scale, float* scores_scratch, float* out,
               int64_t out_token_stride, cudaStream_t stream) {
  require(num_tokens >= 0 && num_q_heads > 0 && pool.capacity() > 0 && pool.num_kv_heads > 0 &&
              pool.head_dim > 0 && q_token_stride >= num_q_heads * pool.head_dim &&
              out_token_stride >= num_q_heads * pool.head_dim &&
              pool.block_stride >= pool.num_kv_heads * pool.block_size * pool.head_dim,
          "attention: bad shape tokens=", num_tokens, " q_heads=", num_q_heads,
          " head_dim=", pool.head_dim, " capacity=", pool.capacity(),
          " q_token_stride=", q_token_stride, " out_token_stride=", out_token_stride);
  if (num_tokens == 0) return;
  require(q != nullptr && kv_head_of_q != nullptr && pool.k != nullptr && pool.v != nullptr &&
              pool.block_tables != nullptr && positions != nullptr && cache_idx != nullptr &&
              scores_scratch != nullptr && out != nullptr,
          "attention: null pointer");
  with_kv_format(pool.dtype, [&](auto format) {
    attention_kernel<decltype(format)>
        <<<grid_for_rows(num_tokens * num_q_heads, "attention"), 128, 0, stream>>>(
            q, q_token_stride, num_q_heads, kv_head_of_q, pool, positions, cache_idx, scale,
            scores_scratch, out, out_token_stride);
  });
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void silu_mul(const float* gate, const float* up, int64_t in_stride, int64_t num_rows,
              int64_t width, float* out, int64_t out_stride, cudaStream_t stream) {
  require(num_rows >= 0 && width > 0 && in_stride >= width && out_stride >= width,
          "silu_mul: bad shape rows=", num_rows, " width=", width, " in_stride=", in_stride,
          " out_stride=", out_stride);
  if (num_rows == 0) return;
  require(gate != nullptr && up != nullptr && out != nullptr, "silu_mul: null pointer");
  silu_mul_kernel<<<grid_for(num_rows * width), kThreadsPerBlock, 0, stream>>>(
      gate, up, in_stride, num_rows, width, out, out_stride);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void add_bias(float* rows, int64_t num_rows, int64_t width, int64_t row_stride, const float* bias,
              cudaStream_t stream) {
  require(num_rows >= 0 && width > 0 && row_stride >= width, "add_bias: bad shape rows=", num_rows,
          " width=", width, " row_stride=", row_stride);
  if (num_rows == 0) return;
  require(rows != nullptr && bias != nullptr, "add_bias: null pointer");
  add_bias_kernel<<<grid_for(num_rows * width), kThreadsPerBlock, 0, stream>>>(
      rows, num_rows, width, row_stride, bias);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void add_in_place(float* dst, const float* src, int64_t count, cudaStream_t stream) {
  require(count >= 0, "add_in_place: negative count ", count);
  if (count == 0) return;
  require(dst != nullptr && src != nullptr, "add_in_place: null pointer");
  add_in_place_kernel<<<grid_for(count), kThreadsPerBlock, 0, stream>>>(dst, src, count);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void argmax_rows(const float* logits, int64_t num_rows, int64_t vocab, int64_t row_stride,
                 int32_t* ids, cudaStream_t stream) {
  require(num_rows >= 0 && vocab > 0 && vocab <= int64_t{0x7fffffff} && row_stride >= vocab,
          "argmax_rows: bad shape rows=", num_rows, " vocab=", vocab, " row_stride=", row_stride);
  if (num_rows == 0) return;
  require(logits != nullptr && ids != nullptr, "argmax_rows: null pointer");
  argmax_kernel<<<grid_for_rows(num_rows, "argmax_rows"), kArgmaxThreads, 0, stream>>>(
      logits, vocab, row_stride, ids);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace keel::cuda
