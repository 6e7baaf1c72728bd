// The attention block of one layer: fused QKV GEMM (column-parallel heads), bias, qk-norm,
// RoPE, append to the paged KV cache (the layer's slot among the full-attention layers),
// causal attention in position order, the sigmoid output gate (Qwen3.5 / Qwen3-Next), and the
// row-parallel o_proj into the partial sum the engine all-reduces.
#include <cmath>

#include "runtime/model/model.h"

namespace keel {

void RankModel::attention(int64_t layer_idx, int64_t num_tokens, const Backend::KvPoolView& view) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t head_dim = config_.head_dim;
  const int64_t q_width = q_heads_local_ * head_dim;
  const int64_t kv_width = kv_heads_local_ * head_dim;
  // With the output gate, the query heads' gate halves follow K and V (weights.cpp).
  const int64_t gate_col = q_width + 2 * kv_width;
  const int64_t qkv_width = gate_col + (config_.attn_output_gate ? q_width : 0);
  const int64_t cache_layer = layer.cache_layer;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  float* qkv = scratch(qkv_, static_cast<size_t>(num_tokens * qkv_width));
  float* attn_out = scratch(attn_out_, static_cast<size_t>(num_tokens * q_width));
  backend_.matmul(normed_.f32(), layer.qkv.view(), qkv, num_tokens);
  // Bias, qk-norm, RoPE, then append K/V to each token's cache before any attention, so every
  // token sees every earlier position of its sequence, including those in this step.
  if (!layer.qkv_bias.empty()) backend_.add_bias(qkv, layer.qkv_bias.f32(), num_tokens, qkv_width);
  if (config_.qk_norm) {
    backend_.head_norm(qkv, qkv_width, 0, q_heads_local_, head_dim, layer.q_norm.f32(), eps,
                       num_tokens);
    backend_.head_norm(qkv, qkv_width, q_width, kv_heads_local_, head_dim, layer.k_norm.f32(), eps,
                       num_tokens);
  }
  backend_.rope(qkv, qkv_width, q_heads_local_, q_width, kv_heads_local_, head_dim,
                config_.rotary_dim, config_.rope_theta, positions_.i32(), num_tokens,
                view.capacity());
  backend_.kv_append(qkv, qkv_width, q_width, q_width + kv_width, positions_.i32(),
                     cache_idx_.i32(), num_tokens, cache_layer, view);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  backend_.attention(qkv, qkv_width, q_heads_local_, kv_head_of_q_.i32(), positions_.i32(),
                     cache_idx_.i32(), num_tokens, cache_layer, view, scale, attn_out);
  if (config_.attn_output_gate)
    backend_.sigmoid_gate_mul(attn_out, num_tokens, q_width, qkv + gate_col, qkv_width);
  backend_.matmul(attn_out, layer.o_proj.view(), partial_.f32(), num_tokens);
}

}  // namespace keel
