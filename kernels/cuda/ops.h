// CUDA launchers for the per-row and elementwise ops of the forward pass (everything but the
// GEMM and the MoE routing/combine, which live in gemm.h and moe.h).
//
// All pointers are device pointers; activations are fp32 row-major. Every launcher checks its
// shapes (throwing keel::Error), enqueues on `stream` and checks the launch with
// KEEL_CUDA_CHECK. The math is kernels/math/ops_math.h, the same functions the CPU kernels run;
// kernels/math/README.md lists them: every launcher here is bit-identical to kernels/cpu (the
// exps through kernels/math/exp_math.h, the same polynomial on both sides).
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/math/ops_math.h"

namespace keel::cuda {

// out[t, :] = table[token_ids[t], :] widened to fp32 (table [vocab, hidden] in `dtype`).
// Bit-identical to cpu::to_f32 of the row. An id outside [0, vocab) yields a row of NaN (the
// ids are device data; the engine validates them on the host before uploading).
void embedding_gather(const void* table, DType dtype, int64_t vocab, int64_t hidden,
                      const int32_t* token_ids, int64_t num_tokens, float* out,
                      cudaStream_t stream = nullptr);

// out[r, :] = rms_norm(x[r, :]) * weight, rows contiguous [num_rows, width]; out may alias x.
// Bit-identical to cpu::rms_norm (sequential sum of squares, IEEE sqrt and division).
void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
              float* out, cudaStream_t stream = nullptr);

// In-place RMSNorm of every head vector (qk-norm): head h of token t is the head_dim floats at
// rows + t * token_stride + h * head_dim. Bit-identical to cpu::rms_norm on those rows.
void rms_norm_heads(float* rows, int64_t num_tokens, int64_t token_stride, int64_t num_heads,
                    int64_t head_dim, const float* weight, float eps,
                    cudaStream_t stream = nullptr);

// Host side: the RoPE table [num_positions, rotary_dim], row p = cpu::rope_cos_sin(p, ...)
// (cos of the rotary_dim/2 angles, then their sin), computed with the shared math on the host
// and meant to be uploaded once per model. Reading cos/sin from this table instead of calling
// cosf/sinf on the device is what makes the GPU RoPE bit-identical to the CPU's.
std::vector<float> rope_cos_sin_table(int64_t num_positions, double theta, int64_t rotary_dim);

// In-place RoPE of num_heads heads per token (head h of token t at
// rows + t * token_stride + h * head_dim) at positions[t], with cos/sin from the device copy of
// rope_cos_sin_table (table_positions rows). Bit-identical to cpu::apply_rope. A position
// outside the table turns the token's heads into NaN.
void rope(float* rows, int64_t num_tokens, int64_t token_stride, int64_t num_heads,
          int64_t head_dim, int64_t rotary_dim, const int32_t* positions,
          const float* cos_sin_table, int64_t table_positions, cudaStream_t stream = nullptr);

// One layer of the paged KV pool (kernels/math/ops_math.h, PagedKvRowsOf): k and v point at the
// layer's first block; block b of KV head h starts at k + b * block_stride + h * block_size *
// head_dim elements of `dtype` (kernels/math/kv_math.h). Sequence s of the step owns row s of
// block_tables ([num_seqs][max_blocks_per_seq]). k_scale / v_scale: the layer's fp8 scales.
struct KvPool {
  void* k = nullptr;
  void* v = nullptr;
  int64_t num_blocks = 0;
  int64_t block_stride =
      0;  // elements between consecutive blocks: num_kv_heads * block_size * head_dim
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  const int32_t* block_tables = nullptr;
  int64_t max_blocks_per_seq = 0;
  math::KvDType dtype = math::KvDType::kF32;
  float k_scale = 1.0f;
  float v_scale = 1.0f;

  __host__ __device__ int64_t capacity() const { return max_blocks_per_seq * block_size; }
  template <typename Kv>
  __host__ __device__ math::PagedKvRowsOf<Kv> rows(const void* base, float scale, int64_t seq,
                                                   int64_t head) const {
    math::PagedKvRowsOf<Kv> view;
    view.head_base = static_cast<const typename Kv::Storage*>(base) + head * block_size * head_dim;
    view.block_table = block_tables + seq * max_blocks_per_seq;
    view.block_stride = block_stride;
    view.block_size = block_size;
    view.head_dim = head_dim;
    view.scale = scale;
    return view;
  }
};

// Appends each token's K and V heads to its sequence's block at its position:
// k_rows + t * row_stride + h * head_dim -> sequence cache_idx[t], head h, position positions[t]
// (likewise v_rows), each element rounded by the pool dtype's math::Kv*::store. Tokens whose
// position is outside [0, capacity) are skipped (the engine checks positions and block ids on
// the host). The same per-element rounding as the CPU: bit-identical bytes.
void kv_cache_append(const float* k_rows, const float* v_rows, int64_t row_stride,
                     int64_t num_tokens, const int32_t* positions, const int32_t* cache_idx,
                     const KvPool& pool, cudaStream_t stream = nullptr);

// Causal attention of each token's query heads over positions [0, positions[t]] of its own
// sequence (decode and prefill alike: in prefill every token of a prompt reads its own prefix,
// after kv_cache_append of the whole step). Query head h of token t is at
// q + t * q_token_stride + h * head_dim and reads KV head kv_head_of_q[h]; the output goes to
// out + t * out_token_stride + h * head_dim. One block per (token, head): scores in parallel
// over positions (each a sequential dot over head_dim), max, exp sum in one thread in position
// order, outputs in parallel over head_dim, each a sequential sum over positions.
// scores_scratch: num_tokens * num_q_heads * pool.capacity() floats. Same operations and order
// as math::attention_head_paged (and cpu::attention_decode), exps included (math::exp_f32),
// K/V widened by the pool dtype's math::Kv*::load: bit-identical. A position outside [0, capacity)
// gives NaN outputs.
void attention(const float* q, int64_t q_token_stride, int64_t num_tokens, int64_t num_q_heads,
               const int32_t* kv_head_of_q, const KvPool& pool, const int32_t* positions,
               const int32_t* cache_idx, float scale, float* scores_scratch, float* out,
               int64_t out_token_stride, cudaStream_t stream = nullptr);

// out[r, i] = silu(gate[r, i]) * up[r, i]; gate and up rows at stride in_stride (for a fused
// gate_up output: up = gate + width, in_stride = 2 * width), out rows at stride out_stride.
// Bit-identical to cpu::silu_mul (math::silu_f32).
void silu_mul(const float* gate, const float* up, int64_t in_stride, int64_t num_rows,
              int64_t width, float* out, int64_t out_stride, cudaStream_t stream = nullptr);

// rows[r, i] += bias[i] for rows at stride row_stride (the qkv bias). Bit-identical.
void add_bias(float* rows, int64_t num_rows, int64_t width, int64_t row_stride, const float* bias,
              cudaStream_t stream = nullptr);

// dst[i] += src[i] (the residual add). Bit-identical.
void add_in_place(float* dst, const float* src, int64_t count, cudaStream_t stream = nullptr);

// Greedy sampling: ids[r] = first index of the largest logit of row r (rows at stride
// row_stride), the engine's strict '>' scan from index 0 (NaN never wins unless at index 0).
// Exact: a parallel reduction with math::argmax_prefers gives the sequential answer.
void argmax_rows(const float* logits, int64_t num_rows, int64_t vocab, int64_t row_stride,
                 int32_t* ids, cudaStream_t stream = nullptr);

}  // namespace keel::cuda
