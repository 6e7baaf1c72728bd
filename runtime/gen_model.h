// Synthetic checkpoints in exactly the HF layout (config.json + safetensors, per-expert tensor
// names as published checkpoints have them), from model presets in configs/models/*.yaml.
// Weights are reproducible from (preset, seed): each tensor draws from its own counter-based
// stream keyed by (seed, tensor name), so generation order and sharding never change values.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/base/dtype.h"

namespace keel {

struct ModelPreset {
  std::string name;
  std::string architecture = "Qwen3MoeForCausalLM";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;
  bool norm_topk_prob = true;
  bool tie_word_embeddings = false;
  double rope_theta = 1000000.0;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 4096;
  DType dtype = DType::kBF16;
  double router_scale = 1.0;  // multiplies the router init std (larger: clearer routing)

  int64_t num_parameters() const;
};

// Reads a preset file; unknown keys and bad values are errors naming the file and key.
ModelPreset load_model_preset(const std::string& path);
// Resolves NAME to configs/models/NAME.yaml (in the source tree) unless NAME is a path.
std::string find_model_preset(const std::string& name_or_path);

struct GenModelOptions {
  uint64_t seed = 0;
  int64_t max_shard_bytes = 0;  // > 0: split into model-0000x-of-0000y + index.json
};

// Writes config.json and the safetensors files into `out_dir` (created if missing), plus
// tokenizer.json and tokenizer_config.json (write_synthetic_tokenizer) when the preset's
// vocab_size has room for them (>= 259); config.json then names <|im_end|> as eos_token_id.
void generate_model(const ModelPreset& preset, const GenModelOptions& options,
                    const std::string& out_dir);

// Ids of the synthetic tokenizer's special tokens (after the 256 byte tokens and the merges).
struct SyntheticTokenizer {
  int32_t endoftext = -1;  // <|endoftext|>: tokenizer_config pad_token
  int32_t im_start = -1;   // <|im_start|>
  int32_t im_end = -1;     // <|im_end|>: eos_token (ChatML end of turn)
  int64_t learned_merges = 0;
};

// Writes `out_dir`/tokenizer.json, a Qwen2-style byte-level BPE (byte tokens 0..255, then up
// to min(vocab_size - 3, 256 + 2000) tokens from merges learned deterministically from a
// built-in English text, then the three special tokens) and tokenizer_config.json (ChatML
// chat_template, eos <|im_end|>, pad <|endoftext|>, no bos). Depends only on vocab_size:
// the same preset gives byte-identical files. keel::Error when vocab_size < 259.
SyntheticTokenizer write_synthetic_tokenizer(const ModelPreset& preset, const std::string& out_dir);

}  // namespace keel
