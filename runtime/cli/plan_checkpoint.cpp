#include "runtime/cli/plan_checkpoint.h"

#include <filesystem>

#include "runtime/model/model_config.h"

namespace keel {

bool is_checkpoint_path(const std::string& path) {
  return std::filesystem::is_directory(path) || path.ends_with(".json");
}

planning::ModelSpec model_spec_from_checkpoint(const std::string& path) {
  const std::string config_path =
      std::filesystem::is_directory(path) ? path + "/config.json" : path;
  const ModelConfig config = ModelConfig::load(config_path);
  planning::ModelSpec spec;
  spec.name = config.architecture_name;
  spec.source = config_path;
  spec.path = config_path;
  spec.vocab_size = config.vocab_size;
  spec.hidden_size = config.hidden_size;
  spec.num_layers = config.num_layers;
  spec.tie_word_embeddings = config.tie_word_embeddings;
  switch (config.dtype) {
    case DType::kF32:
      spec.dtype = "fp32";
      break;
    case DType::kBF16:
      spec.dtype = "bf16";
      break;
    case DType::kF16:
      spec.dtype = "fp16";
      break;
  }
  spec.keel_layout = true;  // count what RankModel holds (model_spec.h lists the differences)
  spec.attention = planning::AttentionType::gqa;
  spec.num_attention_heads = config.num_heads;
  spec.num_kv_heads = config.num_kv_heads;
  spec.head_dim = config.head_dim;
  spec.attention_bias = config.attention_bias;  // Qwen2-MoE: q/k/v only (keel refuses o_proj.bias)
  spec.attention_o_bias = false;
  spec.attn_output_gate = config.attn_output_gate;  // Qwen3.5 / Qwen3-Next: q_proj 2x wide
  spec.qk_norm = config.qk_norm;
  spec.linear_attention_layers = config.num_linear_layers();
  if (config.is_hybrid()) {
    spec.linear_num_key_heads = config.linear_num_key_heads;
    spec.linear_num_value_heads = config.linear_num_value_heads;
    spec.linear_key_head_dim = config.linear_key_head_dim;
    spec.linear_value_head_dim = config.linear_value_head_dim;
    spec.linear_conv_kernel_dim = config.linear_conv_kernel;
    spec.linear_state_dtype = "fp32";
    spec.linear_conv_state_dtype = "fp32";
  }
  spec.num_experts = config.num_experts;
  spec.num_experts_per_tok = config.top_k;
  spec.moe_intermediate_size = config.moe_intermediate_size;
  if (config.shared_expert_intermediate_size > 0) {
    spec.num_shared_experts = 1;
    spec.shared_expert_intermediate_size = config.shared_expert_intermediate_size;
    spec.shared_expert_gate = true;  // Qwen2-MoE, Qwen3.5, Qwen3-Next: a sigmoid gate [1, H]
  }
  // Dense-MLP layers (mlp_only_layers / decoder_sparse_step): the planner counts them, wherever
  // they sit in the stack.
  spec.dense_layers = config.num_layers - config.num_moe_layers();
  if (spec.dense_layers > 0) spec.dense_intermediate_size = config.intermediate_size;
  planning::validate_model_spec(spec, config_path);
  return spec;
}

}  // namespace keel
