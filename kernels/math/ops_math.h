// Per-element and per-row math of the forward pass (everything but the GEMM), shared by the
// CPU kernels (kernels/cpu/ops.cpp) and the CUDA kernels (kernels/cuda/ops.cu, moe.cu).
//
// Each operation is split into the pieces a parallel kernel needs (an element, a sequential
// row reduction) plus, where the CPU wants it, the whole-row composition of those pieces. The
// reduction orders are the determinism contract: a GPU kernel may parallelise only across
// independent outputs and must run every sum below in the order written here.
// Which results are bit-identical CPU vs GPU, and which only close: kernels/math/README.md.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/exp_math.h"
#include "kernels/math/kv_math.h"
#include "kernels/math/scalar.h"

namespace keel::math {

// ---------------------------------------------------------------------------------------------
// RMSNorm: out[i] = weight[i] * (x[i] * inv_rms), inv_rms = 1 / sqrt(sum(x^2) / width + eps).

// Sum of squares in increasing i (sequential; no pairwise or vector reordering).
KEEL_HD inline float rms_sum_squares(const float* x, int64_t width) {
  float sum_squares = 0.0f;
  for (int64_t i = 0; i < width; ++i) sum_squares += x[i] * x[i];
  return sum_squares;
}

KEEL_HD inline float rms_inv(float sum_squares, int64_t width, float eps) {
  return 1.0f / sqrt_f32(sum_squares / static_cast<float>(width) + eps);
}

KEEL_HD inline float rms_scale(float x, float weight, float inv_rms) {
  return weight * (x * inv_rms);
}

// One row; out may alias x (the sum is complete before the first write).
KEEL_HD inline void rms_norm_row(const float* x, const float* weight, float eps, int64_t width,
                                 float* out) {
  const float inv_rms = rms_inv(rms_sum_squares(x, width), width, eps);
  for (int64_t i = 0; i < width; ++i) out[i] = rms_scale(x[i], weight[i], inv_rms);
}

// ---------------------------------------------------------------------------------------------
// RoPE, HF rotate_half convention: pair (i, i + rotary_dim/2) of each head.

// inv_freq[i] = 1 / theta^(2i / rotary_dim), in fp32 as HF computes it.
KEEL_HD inline float rope_inv_freq(int64_t pair, float theta, int64_t rotary_dim) {
  const float exponent = static_cast<float>(2 * pair) / static_cast<float>(rotary_dim);
  return 1.0f / pow_f32(theta, exponent);
}

KEEL_HD inline float rope_angle(int64_t position, float inv_freq) {
  return static_cast<float>(position) * inv_freq;
}

// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
KEEL_HD inline void rope_rotate_pair(float& x1, float& x2, float cos_value, float sin_value) {
  const float in1 = x1;
  const float in2 = x2;
  x1 = in1 * cos_value - in2 * sin_value;
  x2 = in2 * cos_value + in1 * sin_value;
}

// The cos/sin table row of one position: [cos(angle_0 ..), sin(angle_0 ..)], rotary_dim long.
KEEL_HD inline void rope_cos_sin_row(int64_t position, float theta, int64_t rotary_dim,
                                     float* cos_sin) {
  const int64_t half = rotary_dim / 2;
  for (int64_t pair = 0; pair < half; ++pair) {
    const float angle = rope_angle(position, rope_inv_freq(pair, theta, rotary_dim));
    cos_sin[pair] = cos_f32(angle);
    cos_sin[half + pair] = sin_f32(angle);
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU activation and the shared-expert gate.

// silu(gate) * up with silu(x) = x / (1 + exp(-x)) (exp_math.h). The shared-expert gate is
// sigmoid_f32 (exp_math.h).
KEEL_HD inline float silu_mul(float gate, float up) {
  return silu_f32(gate) * up;
}

// ---------------------------------------------------------------------------------------------
// Softmax over one row, in place: max, then the exps, then their sequential sum, then one
// multiply by the reciprocal of the sum. The exps get a loop of their own so that the CPU
// compiler can vectorise them (each depends only on its element and the max); the sum stays
// sequential.

KEEL_HD inline float row_max(const float* row, int64_t width) {
  float max_value = negative_infinity();
  for (int64_t i = 0; i < width; ++i) max_value = max_keep_first(max_value, row[i]);
  return max_value;
}

KEEL_HD inline void softmax_row(float* row, int64_t width) {
  const float max_value = row_max(row, width);
  for (int64_t i = 0; i < width; ++i) row[i] = exp_f32(row[i] - max_value);
  float sum = 0.0f;
  for (int64_t i = 0; i < width; ++i) sum += row[i];
  const float inv_sum = 1.0f / sum;
  for (int64_t i = 0; i < width; ++i) row[i] *= inv_sum;
}

// ---------------------------------------------------------------------------------------------
// Router top-k for one token: probs = softmax(logits); the top_k largest by repeated scans,
// a strict '>' keeping the lowest id among equal probabilities; margin = p[k-th] - p[(k+1)-th]
// of the unnormalised probabilities (0 when top_k == num_experts); with `normalize` the
// selected weights are divided by their sequential sum. Returns the margin.
// Router replay: with `forced_ids` (top_k distinct ids) the selection is those experts in that
// slot order instead of the scans; weights and margin are computed from this token's own
// probabilities exactly as for a selection the scans made.
KEEL_HD inline float route_top_k_token(const float* logits, int64_t num_experts, int64_t top_k,
                                       bool normalize, float* probs, int32_t* expert_ids,
                                       float* expert_weights, const int32_t* forced_ids = nullptr) {
  for (int64_t expert = 0; expert < num_experts; ++expert) probs[expert] = logits[expert];
  softmax_row(probs, num_experts);
  for (int64_t slot = 0; slot < top_k; ++slot) {
    if (forced_ids != nullptr) {
      expert_ids[slot] = forced_ids[slot];
      expert_weights[slot] = probs[forced_ids[slot]];
      continue;
    }
    int32_t best = -1;
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      bool taken = false;
      for (int64_t prev = 0; prev < slot; ++prev) taken |= expert_ids[prev] == expert;
      if (taken) continue;
      if (best < 0 || probs[expert] > probs[best]) best = static_cast<int32_t>(expert);
    }
    expert_ids[slot] = best;
    expert_weights[slot] = probs[best];
  }
  float margin = 0.0f;
  if (top_k < num_experts) {
    float next_best = -1.0f;
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      bool taken = false;
      for (int64_t slot = 0; slot < top_k; ++slot) taken |= expert_ids[slot] == expert;
      if (!taken) next_best = max_keep_first(next_best, probs[expert]);
    }
    margin = expert_weights[top_k - 1] - next_best;
  }
  if (normalize) {
    float sum = 0.0f;
    for (int64_t slot = 0; slot < top_k; ++slot) sum += expert_weights[slot];
    for (int64_t slot = 0; slot < top_k; ++slot) expert_weights[slot] /= sum;
  }
  return margin;
}

// ---------------------------------------------------------------------------------------------
// Attention of one query head against positions [0, num_positions) of one KV head.
// k_head / v_head: [capacity, head_dim] rows of that KV head (row pos at pos * head_dim).

// score(pos) = (sum_d q[d] * k[pos, d], d increasing) * scale
KEEL_HD inline float attention_score(const float* q_head, const float* k_row, int64_t head_dim,
                                     float scale) {
  float dot = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) dot += q_head[d] * k_row[d];
  return dot * scale;
}

KEEL_HD inline float attention_exp_score(float score, float max_score) {
  return exp_f32(score - max_score);
}

// 1 / (sum of exp_scores[0, n) in increasing pos).
KEEL_HD inline float attention_inv_sum(const float* exp_scores, int64_t num_positions) {
  float sum = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos) sum += exp_scores[pos];
  return 1.0f / sum;
}

// In place over scores[0, n): scores[pos] = exp(scores[pos] - max), summed in increasing pos.
// Returns 1 / sum. The GPU kernel does the exps in parallel and then attention_inv_sum in one
// thread: the same bits, since each exp depends only on its own score and the max. The CPU
// does the same in two loops, so that the exps vectorise.
KEEL_HD inline float attention_exp_scores(float* scores, int64_t num_positions, float max_score) {
  for (int64_t pos = 0; pos < num_positions; ++pos)
    scores[pos] = attention_exp_score(scores[pos], max_score);
  return attention_inv_sum(scores, num_positions);
}

// out[d] = sum over pos (increasing) of (scores[pos] * inv_sum) * v[pos, d], from +0.
KEEL_HD inline float attention_output_element(const float* exp_scores, float inv_sum,
                                              const float* v_head, int64_t head_dim,
                                              int64_t num_positions, int64_t d) {
  float acc = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos)
    acc += (exp_scores[pos] * inv_sum) * v_head[pos * head_dim + d];
  return acc;
}

// The whole head, sequentially; scores_scratch holds num_positions floats.
KEEL_HD inline void attention_head(const float* q_head, const float* k_head, const float* v_head,
                                   int64_t head_dim, int64_t num_positions, float scale,
                                   float* scores_scratch, float* out_head) {
  float max_score = negative_infinity();
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    scores_scratch[pos] = attention_score(q_head, k_head + pos * head_dim, head_dim, scale);
    max_score = max_keep_first(max_score, scores_scratch[pos]);
  }
  const float inv_sum = attention_exp_scores(scores_scratch, num_positions, max_score);
  for (int64_t d = 0; d < head_dim; ++d) out_head[d] = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    const float weight = scores_scratch[pos] * inv_sum;
    const float* v_row = v_head + pos * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) out_head[d] += weight * v_row[d];
  }
}

// ---------------------------------------------------------------------------------------------
// Paged KV (the serving layout): one sequence's rows of one (layer, KV head) are spread over
// fixed-size blocks; position pos is row pos % block_size of block block_table[pos / block_size].
// Pool layout [num_layers][num_blocks][kv_heads][block_size][head_dim], so a block of a given
// (layer, head) starts at head_base + block_id * block_stride with
// block_stride = kv_heads * block_size * head_dim (elements).
//
// Attention over a paged sequence runs the very sums of attention_head in the same order
// (positions increasing, from the sequence's first token): only the address of a row changes,
// never which rows are added or in what order. So a token's output depends on its absolute
// position and its cache contents alone, not on block size, block ids, or where prefill chunks
// ended.
//
// Kv (kernels/math/kv_math.h) is the storage format: elements are widened to fp32 by Kv::load
// as they are read (fp32: the stored float itself, so the fp32 pool runs exactly the
// operations of attention_head); `scale` is the layer's k_scale or v_scale (fp8 only).
template <typename Kv>
struct PagedKvRowsOf {
  using Storage = typename Kv::Storage;
  const Storage* head_base = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_stride = 0;
  int64_t block_size = 1;
  int64_t head_dim = 0;
  float scale = 1.0f;

  KEEL_HD const Storage* row(int64_t pos) const {
    return head_base + int64_t{block_table[pos / block_size]} * block_stride +
           (pos % block_size) * head_dim;
  }
  KEEL_HD float at(int64_t pos, int64_t d) const { return Kv::load(row(pos)[d], scale); }
};
using PagedKvRows = PagedKvRowsOf<KvF32>;

// attention_score against paged K row pos (same order and operations).
template <typename Kv>
KEEL_HD inline float attention_score_paged(const float* q_head, const PagedKvRowsOf<Kv>& k,
                                           int64_t pos, float scale) {
  const typename Kv::Storage* k_row = k.row(pos);
  float dot = 0.0f;
  for (int64_t d = 0; d < k.head_dim; ++d) dot += q_head[d] * Kv::load(k_row[d], k.scale);
  return dot * scale;
}

// attention_output_element over paged V rows (same order and operations).
template <typename Kv>
KEEL_HD inline float attention_output_element_paged(const float* exp_scores, float inv_sum,
                                                    const PagedKvRowsOf<Kv>& v,
                                                    int64_t num_positions, int64_t d) {
  float acc = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos)
    acc += (exp_scores[pos] * inv_sum) * v.at(pos, d);
  return acc;
}

// attention_head over paged K/V rows (same order and operations).
template <typename Kv>
KEEL_HD inline void attention_head_paged(const float* q_head, const PagedKvRowsOf<Kv>& k,
                                         const PagedKvRowsOf<Kv>& v, int64_t num_positions,
                                         float scale, float* scores_scratch, float* out_head) {
  const int64_t head_dim = k.head_dim;
  float max_score = negative_infinity();
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    scores_scratch[pos] = attention_score_paged(q_head, k, pos, scale);
    max_score = max_keep_first(max_score, scores_scratch[pos]);
  }
  const float inv_sum = attention_exp_scores(scores_scratch, num_positions, max_score);
  for (int64_t d = 0; d < head_dim; ++d) out_head[d] = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    const float weight = scores_scratch[pos] * inv_sum;
    const typename Kv::Storage* v_row = v.row(pos);
    for (int64_t d = 0; d < head_dim; ++d) out_head[d] += weight * Kv::load(v_row[d], v.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling: the first index of the largest logit (a strict '>' scan from index 0, as
// the engine does). NaN never wins, except a NaN at index 0, which nothing can beat.

KEEL_HD inline int32_t argmax_row(const float* logits, int64_t vocab) {
  int32_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  return best;
}

// Merge rule for a parallel argmax over disjoint index sets (index -1 = no candidate). Any
// merge tree gives argmax_row's answer, provided index 0 is handled as argmax_row does.
KEEL_HD inline bool argmax_prefers(float value_a, int32_t index_a, float value_b, int32_t index_b) {
  if (index_b < 0) return true;
  if (index_a < 0) return false;
  if (value_a > value_b) return true;
  if (value_b > value_a) return false;
  return index_a < index_b;
}

}  // namespace keel::math
