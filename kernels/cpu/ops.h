// Elementwise and per-row CPU kernels of the forward pass (everything but the GEMM).
//
// Layout: activations are fp32 row-major [num_tokens, width]; small weights (norm scales,
// biases) are fp32. Every kernel works row by row with a fixed, sequential summation order,
// so a row's result never depends on other rows or on how many there are (batch invariance).
#pragma once

#include <cstdint>
#include <span>

#include "kernels/base/dtype.h"
#include "kernels/math/exp_math.h"

namespace keel::cpu {

// out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight   (out may alias x)
void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
              float* out);

// Rotary position embedding in the HF "rotate_half" convention on the first `rotary_dim`
// dimensions of each head (partial rotary leaves the rest untouched):
//   inv_freq[i] = 1 / theta^(2i / rotary_dim),  angle = position * inv_freq[i]  (fp32)
//   (x1, x2) = (x[i], x[i + rotary_dim/2]) -> (x1 cos - x2 sin, x2 cos + x1 sin)
// `cos_sin` holds [cos(angle_0..), sin(angle_0..)] of length rotary_dim, from rope_cos_sin().
void rope_cos_sin(int64_t position, double theta, int64_t rotary_dim, float* cos_sin);
void apply_rope(float* head_vectors, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                const float* cos_sin);

// out[i] = silu(gate[i]) * up[i] for one row pair; silu(x) = x / (1 + exp(-x)).
void silu_mul(const float* gate, const float* up, int64_t width, float* out);

// The shared-expert gate: math::sigmoid_f32, the function the CUDA combine uses (same bits).
inline float sigmoid(float x) {
  return math::sigmoid_f32(x);
}

// In-place softmax over one row (max-subtracted, fp32).
void softmax(float* row, int64_t width);

// Router selection for one token: probabilities = softmax(logits); the top_k largest, ties
// broken toward the lower expert id; margin = p[k-th] - p[(k+1)-th] (0 when k == E).
// With `normalize`, the selected weights are divided by their sum (norm_topk_prob).
struct RouteResult {
  float margin = 0.0f;
};
RouteResult route_top_k(const float* router_logits, int64_t num_experts, int64_t top_k,
                        bool normalize, float* probs_scratch, int32_t* expert_ids,
                        float* expert_weights, const int32_t* forced_ids = nullptr);

// Causal attention of one query token against positions [0, num_positions) of a KV cache.
// q: [num_q_heads, head_dim]; k_cache/v_cache: [num_kv_heads, capacity, head_dim];
// q head h reads kv head kv_head_of_q[h]. out: [num_q_heads, head_dim].
// Scores are summed over head_dim in order, softmax in fp32, and the weighted V sum runs over
// positions in increasing order, so a token's output depends only on its own cache prefix.
void attention_decode(const float* q, int64_t num_q_heads, const int32_t* kv_head_of_q,
                      const float* k_cache, const float* v_cache, int64_t capacity,
                      int64_t head_dim, int64_t num_positions, float scale, float* scores_scratch,
                      float* out);

// Converts `count` elements of `src` in `dtype` into fp32.
void to_f32(const void* src, DType dtype, int64_t count, float* dst);

}  // namespace keel::cpu
