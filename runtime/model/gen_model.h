// Synthetic checkpoints in exactly the HF layout (config.json + safetensors, expert tensors
// per-expert or fused 3-D as each architecture's published checkpoints have them), from model
// presets in configs/models/*.yaml.
// Weights are reproducible from (preset, seed): each tensor draws from its own counter-based
// stream keyed by (seed, tensor name), so generation order and sharding never change values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/base/dtype.h"
#include "runtime/model/gen_quant.h"

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
  // Qwen3-MoE / Qwen2-MoE: layers with a dense MLP (mlp.{gate,up,down}_proj [intermediate_size,
  // hidden]) instead of router and experts, written to config.json as transformers' key of the
  // same name. Listing every layer gives a dense model with the MoE preset's attention, so the
  // two differ only in the feed-forward (bench/flip_rate compares them).
  std::vector<int64_t> mlp_only_layers;
  bool is_moe_layer(int64_t layer) const {
    for (int64_t dense : mlp_only_layers)
      if (dense == layer) return false;
    return true;
  }

  // Engineered router near-ties (off unless near_tie_layer >= 0), for demonstrating routing
  // flips from last-bit changes (tests/test_near_tie.cpp). In MoE layer `near_tie_layer` the
  // router rows of experts (2i, 2i+1), i < near_tie_pairs, are made nearly identical:
  //   row[2i+1][j] = row[2i][j] + near_tie_gap * router_std * u_j,  u_j uniform in [-1, 1)
  // (u from its own stream "<router name>.near_tie", router_std = router_scale / sqrt(hidden)),
  // so the two logits differ by about near_tie_gap * router_std * sqrt(hidden / 3) for a unit-RMS
  // input. With a gap around 1e-7 that is the size of float rounding in the logit dot products:
  // whenever such a pair holds the k-th and (k+1)-th places (over half of the tokens with
  // tiny-near-tie.yaml's 6 pairs of 16 experts, top-4), rounding decides between its two
  // experts (margins ~1e-8, often exactly 0: a tie broken to the lower id), and a last-bit change
  // in the hidden state (another all-reduce summation order) can flip it. A 16-bit dtype cannot
  // hold such a gap (bf16 has 8 mantissa bits), so the engineered router tensor alone is written in
  // float32: its rows 2i and the unpaired rows hold exactly the values the preset dtype would have
  // stored. Every other tensor is unchanged; the whole checkpoint stays a pure function of (preset,
  // seed).
  //   near_tie_layer: L   (default -1: off; 0 <= L < num_hidden_layers)
  //   near_tie_gap: G     (default 1.0e-7; 0 <= G <= 1; 0 gives exact ties, never flipped)
  //   near_tie_pairs: P   (default 1; 1 <= P <= num_experts / 2)
  int64_t near_tie_layer = -1;
  double near_tie_gap = 1e-7;
  int64_t near_tie_pairs = 1;

  // Hybrid Gated DeltaNet MoE (architecture Qwen3_5MoeForConditionalGeneration or
  // Qwen3NextForCausalLM); the fields below are rejected for the other architectures.
  // layer_types[i] is "linear_attention" (a Gated DeltaNet mixer) or "full_attention" (gated
  // attention). A preset gives either the list or full_attention_interval N, from which the list
  // is built as transformers does: layer i is full when (i + 1) % N == 0. full_attention_interval
  // stays 0 when the list is irregular, and config.json then carries the list alone (writing an
  // interval that disagrees with it would mislead a loader that reads the interval).
  std::vector<std::string> layer_types;
  int64_t full_attention_interval = 0;
  int64_t linear_num_key_heads = 0;    // HK: q/k heads of the linear layers
  int64_t linear_num_value_heads = 0;  // HV: value heads (a multiple of HK, grouped)
  int64_t linear_key_head_dim = 0;     // DK
  int64_t linear_value_head_dim = 0;   // DV (also the gated norm's width)
  int64_t linear_conv_kernel_dim = 4;  // K: depthwise causal conv taps
  // transformers' Qwen3.5 / Qwen3-Next attention always emits the per-head sigmoid gate (q_proj
  // has 2 x heads x head_dim rows), so only true is accepted; the key is written for loaders.
  bool attn_output_gate = true;
  double partial_rotary_factor = 0.25;  // rotary dims = head_dim x this, the rest pass through
  // Qwen3.5 M-RoPE sections (sum = rotary dims / 2); with text-only positions it is plain RoPE.
  // Default: the rotary half split like the published [11, 11, 10] (two ceil thirds, the rest).
  std::vector<int64_t> mrope_section;
  bool mrope_interleaved = true;

  bool hybrid() const {
    return architecture == "Qwen3_5MoeForConditionalGeneration" ||
           architecture == "Qwen3NextForCausalLM";
  }
  // The exact number of elements gen-model writes for this preset (hybrid architectures), or
  // the attention + experts + shared expert + embeddings estimate the other presets have always
  // reported (norms and biases left out).
  int64_t num_parameters() const;
};

// Reads a preset file; unknown keys and bad values are errors naming the file and key.
ModelPreset load_model_preset(const std::string& path);
// Resolves NAME to configs/models/NAME.yaml (in the source tree) unless NAME is a path.
std::string find_model_preset(const std::string& name_or_path);

struct GenModelOptions {
  uint64_t seed = 0;
  int64_t max_shard_bytes = 0;  // > 0: split into model-0000x-of-0000y + index.json
  // format kNone: the preset dtype throughout. Otherwise the same drawn weights, quantized into
  // that format's released layout and config (runtime/model/gen_quant.h).
  QuantOptions quant;
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
