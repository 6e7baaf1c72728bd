// The model description keel needs, read from an HF config.json. One typed struct; every
// field the forward pass uses is validated here so later code can trust it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/base/dtype.h"
#include "runtime/model/quant_config.h"

namespace keel {

enum class Architecture : uint8_t { kQwen3Moe, kQwen2Moe, kMixtral, kQwen3_5Moe, kQwen3Next };

// What a decoder layer mixes tokens with: softmax attention over the KV cache, or a Gated
// DeltaNet recurrence over a per-sequence state (Qwen3.5 / Qwen3-Next "linear_attention").
enum class LayerKind : uint8_t { kFullAttention, kLinearAttention };

struct ModelConfig {
  Architecture architecture = Architecture::kQwen3Moe;
  std::string architecture_name;  // as in config.json, e.g. "Qwen3MoeForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;  // head_dim * partial_rotary_factor
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;

  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t moe_intermediate_size = 0;
  int64_t intermediate_size = 0;                // dense-MLP layers
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool norm_topk_prob = false;
  std::vector<bool> layer_is_moe;  // [num_layers]

  bool qk_norm = false;         // Qwen3: RMSNorm over head_dim on q and k before RoPE
  bool attention_bias = false;  // Qwen2: bias on q/k/v projections
  bool tie_word_embeddings = false;
  DType dtype = DType::kF32;  // declared dtype (torch_dtype / dtype)

  // Hybrid models (Qwen3.5-MoE, Qwen3-Next). Every other architecture: all kFullAttention.
  std::vector<LayerKind> layer_kinds;  // [num_layers]
  // Qwen3.5 / Qwen3-Next RMSNorms scale by (1 + w) (input, post-attention, final, q/k norms);
  // the loader folds the 1 in, in fp32, as transformers computes it.
  bool zero_centered_norm = false;
  // Full attention: q_proj holds [query_h | gate_h] per head; out *= sigmoid(gate) before o_proj.
  bool attn_output_gate = false;
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;
  int64_t linear_key_head_dim = 0;
  int64_t linear_value_head_dim = 0;
  int64_t linear_conv_kernel = 0;
  // Tensor-name prefix of the decoder ("model." or, for the published Qwen3.5 vision-language
  // layout, "model.language_model."); lm_head.weight is always top level.
  std::string weight_prefix = "model.";
  bool has_vision_tower = false;  // declared, never loaded: image inputs are refused
  // The checkpoint's quantization (config.json quantization_config and hf_quant_config.json
  // beside it); kNone for float checkpoints.
  QuantConfig quant;

  // Throws keel::Error naming the file and field on anything missing, malformed or unsupported.
  static ModelConfig load(const std::string& config_json_path);
  static ModelConfig parse(const std::string& json_text, const std::string& source_name);

  int64_t num_moe_layers() const;
  int64_t num_linear_layers() const;
  int64_t num_attention_layers() const { return num_layers - num_linear_layers(); }
  bool is_hybrid() const { return num_linear_layers() > 0; }
  // Gated DeltaNet widths of the whole model (per rank: divide the head counts by tp).
  int64_t linear_key_dim() const { return linear_num_key_heads * linear_key_head_dim; }
  int64_t linear_value_dim() const { return linear_num_value_heads * linear_value_head_dim; }
  int64_t linear_conv_dim() const { return 2 * linear_key_dim() + linear_value_dim(); }
};

std::string_view architecture_name(Architecture architecture);

}  // namespace keel
