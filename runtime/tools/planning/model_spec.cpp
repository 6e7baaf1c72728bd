// Planning presets: strict loading and per-part parameter counts (formulas inline).
#include "runtime/tools/planning/model_spec.h"

#include <set>

#include "runtime/tools/planning/quant.h"
#include "runtime/tools/planning/yaml_strict.h"

namespace keel::planning {

using detail::read_optional;
using detail::read_required;

ModelParams count_params(const ModelSpec& m) {
  ModelParams p;
  const double H = static_cast<double>(m.hidden_size);
  const double L = static_cast<double>(m.num_layers);
  const double full = static_cast<double>(m.full_attention_layers());
  const double linear = static_cast<double>(m.linear_attention_layers);

  // Full attention, per layer.
  double attn = 0, attn_small = 0;
  if (m.attention == AttentionType::gqa) {
    const double nh = m.num_attention_heads, nkv = m.num_kv_heads, hd = m.head_dim;
    const double q_out = nh * hd * (m.attn_output_gate ? 2.0 : 1.0);  // q (+ gate) projection
    attn = H * q_out + 2.0 * H * nkv * hd + nh * hd * H;              // q, k, v, o
    if (m.attention_bias) attn_small += nh * hd + 2.0 * nkv * hd;     // q/k/v biases
    if (m.attention_bias && m.attention_o_bias) attn_small += H;      // o_proj bias
    if (m.qk_norm) attn_small += 2.0 * hd;                            // q_norm, k_norm
    if (m.attention_sinks) attn_small += nh;                          // one sink per head
  } else {
    const double nh = m.num_attention_heads;
    const double qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    if (m.q_lora_rank > 0) {
      attn += H * m.q_lora_rank + m.q_lora_rank * nh * qk;  // q_a_proj, q_b_proj
      attn_small += m.q_lora_rank;                          // q_a_layernorm
    } else {
      attn += H * nh * qk;  // q_proj
    }
    attn += H * (m.kv_lora_rank + m.qk_rope_head_dim);                  // kv_a_proj_with_mqa
    attn += m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim);  // kv_b_proj
    attn += nh * m.v_head_dim * H;                                      // o_proj
    attn_small += m.kv_lora_rank;                                       // kv_a_layernorm
  }
  p.attention = attn * full;
  p.attention_bf16 = attn_small * full;

  // Gated DeltaNet, per layer (HF Qwen3NextGatedDeltaNet):
  //   in_proj_qkvz: H -> 2*nk*dk (q, k) + 2*nv*dv (v, z gate); in_proj_ba: H -> 2*nv (beta, a);
  //   conv1d over q,k,v channels (2*nk*dk + nv*dv) * kernel; out_proj nv*dv -> H;
  //   dt_bias, A_log: nv each; gated RMSNorm: dv.
  if (linear > 0) {
    const double nk = m.linear_num_key_heads, nv = m.linear_num_value_heads;
    const double dk = m.linear_key_head_dim, dv = m.linear_value_head_dim;
    const double proj = H * (2 * nk * dk + 2 * nv * dv) + H * 2 * nv + nv * dv * H;
    const double small = (2 * nk * dk + nv * dv) * m.linear_conv_kernel_dim + 2 * nv + dv;
    p.linear_attention = proj * linear;
    p.linear_attention_bf16 = small * linear;
  }

  // MLPs. A SwiGLU MLP of width I has gate, up (H x I) and down (I x H): 3 * H * I.
  const double moe_layers = static_cast<double>(m.moe_layers());
  if (m.is_moe()) {
    p.expert_params = 3.0 * H * m.moe_intermediate_size;
    if (m.mlp_bias) p.expert_params += 2.0 * m.moe_intermediate_size + H;  // gate_up + down bias
    p.routed_experts = p.expert_params * m.num_experts * moe_layers;
    p.router = H * m.num_experts * moe_layers;  // router (gate) weight [E, H]
    if (m.mlp_bias) p.router += m.num_experts * moe_layers;
    p.shared_experts =
        3.0 * H * m.shared_expert_intermediate_size * m.num_shared_experts * moe_layers;
    if (m.shared_expert_gate && m.num_shared_experts > 0) p.shared_experts += H * moe_layers;
  }
  p.dense_mlp = 3.0 * H * m.dense_intermediate_size * static_cast<double>(m.dense_layers);

  // Two RMSNorms per layer (input, post-attention) + the final norm.
  p.layer_norms = 2.0 * H * L + H;
  p.embeddings = static_cast<double>(m.vocab_size) * H;
  p.lm_head = m.tie_word_embeddings ? 0.0 : static_cast<double>(m.vocab_size) * H;

  // Active per token: everything but the unused experts and the embedding table (a lookup).
  const double active_experts =
      m.is_moe() ? p.expert_params * m.num_experts_per_tok * moe_layers : 0.0;
  p.active_per_token = active_experts + p.shared_experts + p.dense_mlp + p.attention +
                       p.attention_bf16 + p.linear_attention + p.linear_attention_bf16 + p.router +
                       p.layer_norms +
                       static_cast<double>(m.vocab_size) * H;  // lm_head (tied or not)
  return p;
}

void validate_model_spec(const ModelSpec& m, const std::string& where) {
  auto positive = [&](int64_t value, const char* key) {
    if (value <= 0) throw_error(where, ": '", key, "' must be positive (got ", value, ")");
  };
  positive(m.vocab_size, "vocab_size");
  positive(m.hidden_size, "hidden_size");
  positive(m.num_layers, "num_hidden_layers");
  positive(m.num_attention_heads, "num_attention_heads");
  dtype_bytes(m.dtype, where + ": dtype");
  if (m.linear_attention_layers < 0 || m.linear_attention_layers >= m.num_layers)
    throw_error(where, ": 'linear_attention_layers' must be in [0, num_hidden_layers)");
  if (m.attention == AttentionType::gqa) {
    positive(m.num_kv_heads, "num_key_value_heads");
    positive(m.head_dim, "head_dim");
    if (m.num_attention_heads % m.num_kv_heads != 0)
      throw_error(where, ": num_attention_heads must be a multiple of num_key_value_heads");
  } else {
    positive(m.kv_lora_rank, "kv_lora_rank");
    positive(m.qk_rope_head_dim, "qk_rope_head_dim");
    positive(m.qk_nope_head_dim, "qk_nope_head_dim");
    positive(m.v_head_dim, "v_head_dim");
  }
  if (m.linear_attention_layers > 0) {
    positive(m.linear_num_key_heads, "linear_num_key_heads");
    positive(m.linear_num_value_heads, "linear_num_value_heads");
    positive(m.linear_key_head_dim, "linear_key_head_dim");
    positive(m.linear_value_head_dim, "linear_value_head_dim");
    dtype_bytes(m.linear_state_dtype, where + ": linear_state_dtype");
  }
  if (m.sliding_window_layers < 0 || m.sliding_window_layers > m.full_attention_layers())
    throw_error(where, ": 'sliding_window_layers' must be in [0, full attention layers]");
  if (m.sliding_window_layers > 0) positive(m.sliding_window, "sliding_window");
  if (m.num_experts > 0) {
    positive(m.num_experts_per_tok, "num_experts_per_tok");
    positive(m.moe_intermediate_size, "moe_intermediate_size");
    if (m.num_experts_per_tok > m.num_experts)
      throw_error(where, ": num_experts_per_tok > num_experts");
    if (m.num_shared_experts > 0)
      positive(m.shared_expert_intermediate_size, "shared_expert_intermediate_size");
  }
  if (m.dense_layers < 0 || m.dense_layers > m.num_layers)
    throw_error(where, ": 'dense_layers' must be in [0, num_hidden_layers]");
  if (m.num_experts == 0 && m.dense_layers != m.num_layers)
    throw_error(where, ": a dense model (num_experts 0) needs dense_layers = num_hidden_layers");
  if (m.dense_layers > 0) positive(m.dense_intermediate_size, "dense_intermediate_size");
}

ModelSpec load_model_spec(const std::string& path) {
  YAML::Node root = detail::load_yaml_mapping(path);
  const std::string& where = path;
  static const std::set<std::string> known = {"kind",
                                              "name",
                                              "source",
                                              "vocab_size",
                                              "hidden_size",
                                              "num_hidden_layers",
                                              "tie_word_embeddings",
                                              "attention_type",
                                              "num_attention_heads",
                                              "num_key_value_heads",
                                              "head_dim",
                                              "attention_bias",
                                              "attn_output_gate",
                                              "qk_norm",
                                              "sliding_window",
                                              "sliding_window_layers",
                                              "attention_sinks",
                                              "q_lora_rank",
                                              "kv_lora_rank",
                                              "qk_nope_head_dim",
                                              "qk_rope_head_dim",
                                              "v_head_dim",
                                              "linear_attention_layers",
                                              "linear_num_key_heads",
                                              "linear_num_value_heads",
                                              "linear_key_head_dim",
                                              "linear_value_head_dim",
                                              "linear_conv_kernel_dim",
                                              "linear_state_dtype",
                                              "num_experts",
                                              "num_experts_per_tok",
                                              "moe_intermediate_size",
                                              "num_shared_experts",
                                              "shared_expert_intermediate_size",
                                              "shared_expert_gate",
                                              "mlp_bias",
                                              "dense_layers",
                                              "dense_intermediate_size",
                                              "reference_total_params_b",
                                              "reference_active_params_b"};
  detail::reject_unknown_keys(root, known, where);
  std::string kind;
  read_required(root, "kind", where, kind);
  if (kind != "planning")
    throw_error(where, ": key 'kind' must be 'planning' for a planning preset (got '", kind, "')");

  ModelSpec m;
  m.path = path;
  read_required(root, "name", where, m.name);
  read_optional(root, "source", where, m.source);
  read_required(root, "vocab_size", where, m.vocab_size);
  read_required(root, "hidden_size", where, m.hidden_size);
  read_required(root, "num_hidden_layers", where, m.num_layers);
  read_optional(root, "tie_word_embeddings", where, m.tie_word_embeddings);
  std::string attention_type = "gqa";
  read_optional(root, "attention_type", where, attention_type);
  if (attention_type == "gqa") {
    m.attention = AttentionType::gqa;
  } else if (attention_type == "mla") {
    m.attention = AttentionType::mla;
  } else {
    throw_error(where, ": key 'attention_type' must be 'gqa' or 'mla' (got '", attention_type,
                "')");
  }
  read_required(root, "num_attention_heads", where, m.num_attention_heads);
  read_optional(root, "num_key_value_heads", where, m.num_kv_heads);
  read_optional(root, "head_dim", where, m.head_dim);
  read_optional(root, "attention_bias", where, m.attention_bias);
  read_optional(root, "attn_output_gate", where, m.attn_output_gate);
  read_optional(root, "qk_norm", where, m.qk_norm);
  read_optional(root, "sliding_window", where, m.sliding_window);
  read_optional(root, "sliding_window_layers", where, m.sliding_window_layers);
  read_optional(root, "attention_sinks", where, m.attention_sinks);
  read_optional(root, "q_lora_rank", where, m.q_lora_rank);
  read_optional(root, "kv_lora_rank", where, m.kv_lora_rank);
  read_optional(root, "qk_nope_head_dim", where, m.qk_nope_head_dim);
  read_optional(root, "qk_rope_head_dim", where, m.qk_rope_head_dim);
  read_optional(root, "v_head_dim", where, m.v_head_dim);
  read_optional(root, "linear_attention_layers", where, m.linear_attention_layers);
  read_optional(root, "linear_num_key_heads", where, m.linear_num_key_heads);
  read_optional(root, "linear_num_value_heads", where, m.linear_num_value_heads);
  read_optional(root, "linear_key_head_dim", where, m.linear_key_head_dim);
  read_optional(root, "linear_value_head_dim", where, m.linear_value_head_dim);
  read_optional(root, "linear_conv_kernel_dim", where, m.linear_conv_kernel_dim);
  read_optional(root, "linear_state_dtype", where, m.linear_state_dtype);
  read_optional(root, "num_experts", where, m.num_experts);
  read_optional(root, "num_experts_per_tok", where, m.num_experts_per_tok);
  read_optional(root, "moe_intermediate_size", where, m.moe_intermediate_size);
  read_optional(root, "num_shared_experts", where, m.num_shared_experts);
  read_optional(root, "shared_expert_intermediate_size", where, m.shared_expert_intermediate_size);
  read_optional(root, "shared_expert_gate", where, m.shared_expert_gate);
  read_optional(root, "mlp_bias", where, m.mlp_bias);
  read_optional(root, "dense_layers", where, m.dense_layers);
  read_optional(root, "dense_intermediate_size", where, m.dense_intermediate_size);
  read_optional(root, "reference_total_params_b", where, m.reference_total_params_b);
  read_optional(root, "reference_active_params_b", where, m.reference_active_params_b);
  validate_model_spec(m, where);
  return m;
}

}  // namespace keel::planning
