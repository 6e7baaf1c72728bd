// The model description keel needs, read from an HF config.json. One typed struct; every
// field the forward pass uses is validated here so later code can trust it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/base/dtype.h"

namespace keel {

enum class Architecture : uint8_t { kQwen3Moe, kQwen2Moe, kMixtral };

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

  // Throws keel::Error naming the file and field on anything missing, malformed or unsupported.
  static ModelConfig load(const std::string& config_json_path);
  static ModelConfig parse(const std::string& json_text, const std::string& source_name);

  int64_t num_moe_layers() const;
};

std::string_view architecture_name(Architecture architecture);

}  // namespace keel
