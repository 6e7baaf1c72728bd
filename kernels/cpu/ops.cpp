// CPU reference kernels for the non-GEMM ops. Plain loops with sequential reductions: their
// cost is O(tokens x hidden), small next to the GEMMs, and a fixed order keeps every row's
// bits independent of the batch. The math matches HF transformers' fp32 path.
#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>

namespace keel::cpu {

void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
              float* out) {
  for (int64_t row = 0; row < num_rows; ++row) {
    const float* x_row = x + row * width;
    float* out_row = out + row * width;
    float sum_squares = 0.0f;
    for (int64_t i = 0; i < width; ++i) sum_squares += x_row[i] * x_row[i];
    float inv_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(width) + eps);
    for (int64_t i = 0; i < width; ++i) out_row[i] = weight[i] * (x_row[i] * inv_rms);
  }
}

void rope_cos_sin(int64_t position, double theta, int64_t rotary_dim, float* cos_sin) {
  int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    // As HF: inv_freq in fp32 from theta ** (2i/dim), angle = position * inv_freq in fp32.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    float inv_freq = 1.0f / std::pow(static_cast<float>(theta), exponent);
    float angle = static_cast<float>(position) * inv_freq;
    cos_sin[i] = std::cos(angle);
    cos_sin[half + i] = std::sin(angle);
  }
}

void apply_rope(float* head_vectors, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                const float* cos_sin) {
  int64_t half = rotary_dim / 2;
  const float* cos_values = cos_sin;
  const float* sin_values = cos_sin + half;
  for (int64_t head = 0; head < num_heads; ++head) {
    float* vec = head_vectors + head * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      float x1 = vec[i];
      float x2 = vec[half + i];
      vec[i] = x1 * cos_values[i] - x2 * sin_values[i];
      vec[half + i] = x2 * cos_values[i] + x1 * sin_values[i];
    }
  }
}

void silu_mul(const float* gate, const float* up, int64_t width, float* out) {
  for (int64_t i = 0; i < width; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void softmax(float* row, int64_t width) {
  float max_value = -INFINITY;
  for (int64_t i = 0; i < width; ++i) max_value = std::max(max_value, row[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < width; ++i) {
    row[i] = std::exp(row[i] - max_value);
    sum += row[i];
  }
  float inv_sum = 1.0f / sum;
  for (int64_t i = 0; i < width; ++i) row[i] *= inv_sum;
}

RouteResult route_top_k(const float* router_logits, int64_t num_experts, int64_t top_k,
                        bool normalize, float* probs_scratch, int32_t* expert_ids,
                        float* expert_weights) {
  std::copy(router_logits, router_logits + num_experts, probs_scratch);
  softmax(probs_scratch, num_experts);
  // Selection by repeated scans: k is small (<= 10), E is at most a few hundred. A strict '>'
  // keeps the lowest id among equal probabilities, the documented tie rule.
  for (int64_t slot = 0; slot < top_k; ++slot) {
    int32_t best = -1;
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      bool taken = false;
      for (int64_t prev = 0; prev < slot; ++prev) taken |= expert_ids[prev] == expert;
      if (taken) continue;
      if (best < 0 || probs_scratch[expert] > probs_scratch[best])
        best = static_cast<int32_t>(expert);
    }
    expert_ids[slot] = best;
    expert_weights[slot] = probs_scratch[best];
  }
  RouteResult result;
  if (top_k < num_experts) {
    float next_best = -1.0f;
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      bool taken = false;
      for (int64_t slot = 0; slot < top_k; ++slot) taken |= expert_ids[slot] == expert;
      if (!taken) next_best = std::max(next_best, probs_scratch[expert]);
    }
    result.margin = expert_weights[top_k - 1] - next_best;
  }
  if (normalize) {
    float sum = 0.0f;
    for (int64_t slot = 0; slot < top_k; ++slot) sum += expert_weights[slot];
    for (int64_t slot = 0; slot < top_k; ++slot) expert_weights[slot] /= sum;
  }
  return result;
}

void attention_decode(const float* q, int64_t num_q_heads, const int32_t* kv_head_of_q,
                      const float* k_cache, const float* v_cache, int64_t capacity,
                      int64_t head_dim, int64_t num_positions, float scale, float* scores_scratch,
                      float* out) {
  for (int64_t head = 0; head < num_q_heads; ++head) {
    const float* q_head = q + head * head_dim;
    const float* k_head = k_cache + int64_t{kv_head_of_q[head]} * capacity * head_dim;
    const float* v_head = v_cache + int64_t{kv_head_of_q[head]} * capacity * head_dim;
    float max_score = -INFINITY;
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      const float* k_row = k_head + pos * head_dim;
      float dot = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) dot += q_head[d] * k_row[d];
      scores_scratch[pos] = dot * scale;
      max_score = std::max(max_score, scores_scratch[pos]);
    }
    float sum = 0.0f;
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      scores_scratch[pos] = std::exp(scores_scratch[pos] - max_score);
      sum += scores_scratch[pos];
    }
    float inv_sum = 1.0f / sum;
    float* out_head = out + head * head_dim;
    std::fill(out_head, out_head + head_dim, 0.0f);
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      float weight = scores_scratch[pos] * inv_sum;
      const float* v_row = v_head + pos * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) out_head[d] += weight * v_row[d];
    }
  }
}

void to_f32(const void* src, DType dtype, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, dtype, static_cast<size_t>(i));
}

}  // namespace keel::cpu
