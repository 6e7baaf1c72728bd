#include "runtime/model/model_config.h"
#include "runtime/common/json_depth.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {

namespace {

using nlohmann::json;

class ConfigReader {
 public:
  ConfigReader(const json& root, std::string source) : root_(root), source_(std::move(source)) {}

  bool has(const char* key) const { return root_.contains(key) && !root_[key].is_null(); }

  int64_t integer(const char* key) const {
    if (!has(key)) throw_error(source_, ": missing required field '", key, "'");
    return integer_value(root_[key], key);
  }
  int64_t integer_or(const char* key, int64_t fallback) const {
    return has(key) ? integer_value(root_[key], key) : fallback;
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!root_[key].is_number()) throw_error(source_, ": field '", key, "' must be a number");
    const double value = root_[key].get<double>();
    // JSON has no NaN or infinity, but a literal too large for a double parses as infinity.
    if (!std::isfinite(value))
      throw_error(source_, ": field '", key, "' is ", root_[key].dump(), ", not a finite number");
    return value;
  }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!root_[key].is_boolean()) throw_error(source_, ": field '", key, "' must be a boolean");
    return root_[key].get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!root_[key].is_string()) throw_error(source_, ": field '", key, "' must be a string");
    return root_[key].get<std::string>();
  }
  const std::string& source() const { return source_; }

 private:
  int64_t integer_value(const json& value, const char* key) const {
    if (!value.is_number_integer())
      throw_error(source_, ": field '", key, "' must be an integer, found ", value.dump());
    // nlohmann keeps integers above INT64_MAX unsigned; get<int64_t> would wrap them negative.
    if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t{INT64_MAX})
      throw_error(source_, ": field '", key, "' is ", value.dump(), ", out of range");
    return value.get<int64_t>();
  }
  const json& root_;
  std::string source_;
};

// Upper bounds on size fields, far above any published model (the largest have ~128 layers,
// vocabularies of ~260k, hidden sizes of ~20k, 512 experts): a value past them is a corrupt or
// hostile config, refused by name before anything is sized from it (num_hidden_layers: 1e9
// would otherwise end in a bare std::bad_alloc).
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxWidth = int64_t{1} << 20;  // hidden and intermediate sizes
constexpr int64_t kMaxHeads = 4096;
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxExperts = int64_t{1} << 16;
constexpr int64_t kMaxPositions = int64_t{1} << 28;
constexpr int64_t kMaxConvKernel = 64;

void require_in_range(const ConfigReader& reader, const char* name, int64_t value, int64_t low,
                      int64_t high) {
  if (value < low || value > high)
    throw_error(reader.source(), ": ", name, " is ", value, "; expected a value in [", low, ", ",
                high, "]");
}

void require_positive(const ConfigReader& reader, const char* name, int64_t value,
                      int64_t high = kMaxWidth) {
  if (value <= 0) throw_error(reader.source(), ": ", name, " must be > 0, found ", value);
  require_in_range(reader, name, value, 1, high);
}

DType parse_config_dtype(const ConfigReader& reader) {
  std::string name = reader.string_or("torch_dtype", reader.string_or("dtype", "float32"));
  if (name == "float32") return DType::kF32;
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float16") return DType::kF16;
  throw_error(reader.source(), ": unsupported dtype '", name,
              "' (supported: float32, bfloat16, float16)");
}

// Settings that change what a model computes and that keel does not implement: refused with
// the key named, never run as a silently different model. Keys that only matter for training
// (router_aux_loss_coef, output_router_logits, attention_dropout, initializer_range) or for
// heads keel does not run (mtp_*: multi-token-prediction layers, which transformers does not
// load either) are accepted.
void refuse_unimplemented_settings(const ConfigReader& reader, const json& text,
                                   Architecture architecture) {
  const std::string& source = reader.source();
  std::string hidden_act = reader.string_or("hidden_act", "silu");
  if (hidden_act != "silu")
    throw_error(source, ": unsupported hidden_act '", hidden_act, "' (supported: silu)");
  if (reader.boolean_or("use_sliding_window", false))
    throw_error(source, ": sliding-window attention is not supported (use_sliding_window true)");
  // Mixtral applies sliding_window whenever it is set (no use_sliding_window switch); Qwen
  // configs carry a sliding_window that only use_sliding_window turns on.
  if (architecture == Architecture::kMixtral && reader.has("sliding_window"))
    throw_error(source, ": sliding_window ", text["sliding_window"].dump(),
                " is not supported (keel attends over the whole context, which would give "
                "different tokens); only null is accepted");
  const bool hybrid =
      architecture == Architecture::kQwen3_5Moe || architecture == Architecture::kQwen3Next;
  if (hybrid) {
    if (reader.boolean_or("attention_bias", false))
      throw_error(source, ": attention_bias true is not supported for ",
                  architecture_name(architecture));
    const std::string ssm_dtype = reader.string_or("mamba_ssm_dtype", "float32");
    if (ssm_dtype != "float32")
      throw_error(source, ": mamba_ssm_dtype '", ssm_dtype,
                  "' is not supported (keel keeps the Gated DeltaNet state in float32)");
  }
}

// Gated DeltaNet settings and the layer pattern (transformers' defaults where a key is absent).
void parse_linear_attention(const ConfigReader& reader, const json& text, ModelConfig& config) {
  const std::string& source = reader.source();
  config.linear_conv_kernel = reader.integer_or("linear_conv_kernel_dim", 4);
  config.linear_key_head_dim = reader.integer_or("linear_key_head_dim", 128);
  config.linear_value_head_dim = reader.integer_or("linear_value_head_dim", 128);
  config.linear_num_key_heads = reader.integer_or("linear_num_key_heads", 16);
  config.linear_num_value_heads = reader.integer_or("linear_num_value_heads", 32);
  require_positive(reader, "linear_conv_kernel_dim", config.linear_conv_kernel, kMaxConvKernel);
  require_positive(reader, "linear_key_head_dim", config.linear_key_head_dim, kMaxHeadDim);
  require_positive(reader, "linear_value_head_dim", config.linear_value_head_dim, kMaxHeadDim);
  require_positive(reader, "linear_num_key_heads", config.linear_num_key_heads, kMaxHeads);
  require_positive(reader, "linear_num_value_heads", config.linear_num_value_heads, kMaxHeads);
  if (config.linear_num_value_heads % config.linear_num_key_heads != 0)
    throw_error(source, ": linear_num_value_heads (", config.linear_num_value_heads,
                ") is not a multiple of linear_num_key_heads (", config.linear_num_key_heads, ")");

  const size_t num_layers = static_cast<size_t>(config.num_layers);
  config.layer_kinds.clear();
  if (reader.has("layer_types")) {
    const json& types = text["layer_types"];
    if (!types.is_array() || types.size() != num_layers)
      throw_error(source, ": layer_types must be a list of num_hidden_layers (", num_layers,
                  ") entries");
    for (const json& type : types) {
      const std::string name = type.is_string() ? type.get<std::string>() : type.dump();
      if (name == "linear_attention") {
        config.layer_kinds.push_back(LayerKind::kLinearAttention);
      } else if (name == "full_attention") {
        config.layer_kinds.push_back(LayerKind::kFullAttention);
      } else {
        throw_error(source, ": layer_types entry '", name,
                    "' is not supported (supported: linear_attention, full_attention)");
      }
    }
  } else {
    const int64_t interval = reader.integer_or("full_attention_interval", 4);
    require_positive(reader, "full_attention_interval", interval, kMaxLayers);
    for (size_t layer = 0; layer < num_layers; ++layer)
      config.layer_kinds.push_back((static_cast<int64_t>(layer) + 1) % interval != 0
                                       ? LayerKind::kLinearAttention
                                       : LayerKind::kFullAttention);
  }
}

}  // namespace

std::string_view architecture_name(Architecture architecture) {
  switch (architecture) {
    case Architecture::kQwen3Moe:
      return "Qwen3MoeForCausalLM";
    case Architecture::kQwen2Moe:
      return "Qwen2MoeForCausalLM";
    case Architecture::kMixtral:
      return "MixtralForCausalLM";
    case Architecture::kQwen3_5Moe:
      return "Qwen3_5MoeForCausalLM";
    case Architecture::kQwen3Next:
      return "Qwen3NextForCausalLM";
  }
  return "?";
}

int64_t ModelConfig::num_linear_layers() const {
  int64_t count = 0;
  for (LayerKind kind : layer_kinds) count += kind == LayerKind::kLinearAttention ? 1 : 0;
  return count;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t count = 0;
  for (bool is_moe : layer_is_moe) count += is_moe ? 1 : 0;
  return count;
}

ModelConfig ModelConfig::load(const std::string& config_json_path) {
  std::ifstream file(config_json_path);
  if (!file) throw_error("cannot open model config ", config_json_path);
  std::stringstream text;
  text << file.rdbuf();
  ModelConfig config = parse(text.str(), config_json_path);
  // ModelOpt's legacy exports put the quantization beside config.json.
  const std::filesystem::path hf_quant =
      std::filesystem::path(config_json_path).parent_path() / "hf_quant_config.json";
  if (std::filesystem::exists(hf_quant)) {
    std::ifstream quant_file(hf_quant);
    if (!quant_file) throw_error("cannot open ", hf_quant.string());
    std::stringstream quant_text;
    quant_text << quant_file.rdbuf();
    config.quant = merge_quant_configs(
        config.quant, parse_quant_config(quant_text.str(), hf_quant.string(), true));
  }
  return config;
}

ModelConfig ModelConfig::parse(const std::string& json_text, const std::string& source_name) {
  check_json_depth(json_text, source_name);
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object())
    throw_error(source_name, ": not a valid JSON object");
  ModelConfig config;
  if (!root.contains("architectures") || !root["architectures"].is_array() ||
      root["architectures"].empty() || !root["architectures"][0].is_string())
    throw_error(source_name, ": missing 'architectures' list");
  config.architecture_name = root["architectures"][0].get<std::string>();
  // The published Qwen3.5 checkpoints are vision-language: text settings under text_config,
  // decoder weights under model.language_model. (the vision tower is not loaded).
  const json* text_root = &root;
  std::string text_source = source_name;
  if (config.architecture_name == "Qwen3MoeForCausalLM") {
    config.architecture = Architecture::kQwen3Moe;
  } else if (config.architecture_name == "Qwen2MoeForCausalLM") {
    config.architecture = Architecture::kQwen2Moe;
  } else if (config.architecture_name == "MixtralForCausalLM") {
    config.architecture = Architecture::kMixtral;
  } else if (config.architecture_name == "Qwen3_5MoeForCausalLM") {
    config.architecture = Architecture::kQwen3_5Moe;
  } else if (config.architecture_name == "Qwen3_5MoeForConditionalGeneration") {
    config.architecture = Architecture::kQwen3_5Moe;
    if (!root.contains("text_config") || !root["text_config"].is_object())
      throw_error(source_name, ": ", config.architecture_name, " needs a 'text_config' object");
    text_root = &root["text_config"];
    text_source = source_name + " text_config";
    config.weight_prefix = "model.language_model.";
    config.has_vision_tower = root.contains("vision_config") && !root["vision_config"].is_null();
  } else if (config.architecture_name == "Qwen3NextForCausalLM") {
    config.architecture = Architecture::kQwen3Next;
  } else {
    throw_error(source_name, ": unsupported architecture '", config.architecture_name,
                "' (supported: Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, "
                "Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, "
                "Qwen3NextForCausalLM)");
  }
  const bool hybrid = config.architecture == Architecture::kQwen3_5Moe ||
                      config.architecture == Architecture::kQwen3Next;
  ConfigReader reader(*text_root, text_source);
  const json& text = *text_root;
  refuse_unimplemented_settings(reader, text, config.architecture);
  for (const json* scope : std::initializer_list<const json*>{&root, text_root}) {
    if (scope->contains("quantization_config") && !(*scope)["quantization_config"].is_null()) {
      config.quant = parse_quant_config((*scope)["quantization_config"].dump(),
                                        source_name + " quantization_config", false);
      break;
    }
  }

  config.vocab_size = reader.integer("vocab_size");
  config.hidden_size = reader.integer("hidden_size");
  config.num_layers = reader.integer("num_hidden_layers");
  config.num_heads = reader.integer("num_attention_heads");
  config.num_kv_heads = reader.integer_or("num_key_value_heads", config.num_heads);
  require_positive(reader, "vocab_size", config.vocab_size, kMaxVocab);
  require_positive(reader, "hidden_size", config.hidden_size);
  require_positive(reader, "num_hidden_layers", config.num_layers, kMaxLayers);
  require_positive(reader, "num_attention_heads", config.num_heads, kMaxHeads);
  require_positive(reader, "num_key_value_heads", config.num_kv_heads, kMaxHeads);
  if (config.num_heads % config.num_kv_heads != 0)
    throw_error(source_name, ": num_attention_heads (", config.num_heads,
                ") is not a multiple of num_key_value_heads (", config.num_kv_heads, ")");
  config.head_dim = reader.integer_or("head_dim", config.hidden_size / config.num_heads);
  require_positive(reader, "head_dim", config.head_dim, kMaxHeadDim);
  config.max_position_embeddings = reader.integer_or("max_position_embeddings", 32768);
  require_positive(reader, "max_position_embeddings", config.max_position_embeddings,
                   kMaxPositions);
  config.rms_norm_eps = reader.number_or("rms_norm_eps", 1e-6);
  // RMSNorm divides by sqrt(mean(x^2) + eps): eps <= 0 gives NaN or infinity on a zero row.
  if (!(config.rms_norm_eps > 0.0 && config.rms_norm_eps <= 1.0))
    throw_error(text_source, ": rms_norm_eps is ", config.rms_norm_eps,
                "; expected a value in (0, 1]");

  // RoPE: transformers 5 writes rope_parameters {rope_theta, rope_type, partial_rotary_factor};
  // published checkpoints have top-level rope_theta / rope_scaling.
  // Qwen3.5 / Qwen3-Next default to a quarter of head_dim (transformers' __post_init__).
  double partial_rotary_factor = reader.number_or("partial_rotary_factor", hybrid ? 0.25 : 1.0);
  config.rope_theta = reader.number_or("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!reader.has(key)) continue;
    const json& rope = text[key];
    if (!rope.is_object()) throw_error(source_name, ": '", key, "' must be an object");
    ConfigReader rope_reader(rope, source_name + " " + key);
    std::string rope_type =
        rope_reader.string_or("rope_type", rope_reader.string_or("type", "default"));
    if (rope_type != "default")
      throw_error(source_name, ": unsupported rope_type '", rope_type, "' in ", key,
                  " (supported: default)");
    config.rope_theta = rope_reader.number_or("rope_theta", config.rope_theta);
    partial_rotary_factor = rope_reader.number_or("partial_rotary_factor", partial_rotary_factor);
  }
  if (!(config.rope_theta > 0)) throw_error(source_name, ": rope_theta must be > 0");
  if (!(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0))
    throw_error(source_name, ": partial_rotary_factor is ", partial_rotary_factor,
                "; expected a value in (0, 1]");
  config.rotary_dim =
      static_cast<int64_t>(static_cast<double>(config.head_dim) * partial_rotary_factor);
  if (config.rotary_dim <= 0 || config.rotary_dim > config.head_dim || config.rotary_dim % 2 != 0)
    throw_error(source_name, ": partial_rotary_factor ", partial_rotary_factor,
                " gives rotary dim ", config.rotary_dim, " for head_dim ", config.head_dim,
                " (must be even and in (0, head_dim])");

  config.num_experts = reader.integer_or("num_experts", reader.integer_or("num_local_experts", 0));
  config.top_k = reader.integer("num_experts_per_tok");
  require_positive(reader, "num_experts", config.num_experts, kMaxExperts);
  if (config.top_k <= 0 || config.top_k > config.num_experts)
    throw_error(source_name, ": num_experts_per_tok must be in [1, ", config.num_experts,
                "], found ", config.top_k);
  config.intermediate_size = reader.integer_or("intermediate_size", 0);
  // The vision-language wrapper declares tie_word_embeddings at the top level.
  config.tie_word_embeddings =
      reader.boolean_or("tie_word_embeddings",
                        ConfigReader(root, source_name).boolean_or("tie_word_embeddings", false));
  config.dtype = parse_config_dtype(
      reader.has("dtype") || reader.has("torch_dtype") ? reader : ConfigReader(root, source_name));
  config.layer_is_moe.assign(static_cast<size_t>(config.num_layers), true);

  switch (config.architecture) {
    case Architecture::kMixtral:
      // Mixtral's expert FFN width is intermediate_size; it always renormalises top-k.
      config.moe_intermediate_size = config.intermediate_size;
      config.norm_topk_prob = true;
      break;
    case Architecture::kQwen3Moe:
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3_5Moe:
    case Architecture::kQwen3Next: {
      config.moe_intermediate_size = reader.integer("moe_intermediate_size");
      // Qwen3.5 has no norm_topk_prob key: its router always renormalises.
      config.norm_topk_prob = config.architecture == Architecture::kQwen3_5Moe ||
                              reader.boolean_or("norm_topk_prob", false);
      int64_t sparse_step = reader.integer_or("decoder_sparse_step", 1);
      require_positive(reader, "decoder_sparse_step", sparse_step, kMaxLayers);
      std::vector<int64_t> mlp_only_layers;
      if (reader.has("mlp_only_layers")) {
        if (!text["mlp_only_layers"].is_array())
          throw_error(source_name, ": mlp_only_layers must be a list");
        for (const json& value : text["mlp_only_layers"]) {
          if (!value.is_number_integer())
            throw_error(source_name, ": mlp_only_layers entries must be integers");
          mlp_only_layers.push_back(value.get<int64_t>());
        }
      }
      for (int64_t layer = 0; layer < config.num_layers; ++layer) {
        bool dense = (layer + 1) % sparse_step != 0;
        for (int64_t dense_layer : mlp_only_layers) dense |= dense_layer == layer;
        config.layer_is_moe[static_cast<size_t>(layer)] = !dense;
      }
      if (config.architecture == Architecture::kQwen3Moe) {
        config.qk_norm = true;
        config.attention_bias = reader.boolean_or("attention_bias", false);
      } else if (hybrid) {
        config.qk_norm = true;
        config.zero_centered_norm = true;
        config.attn_output_gate = reader.boolean_or("attn_output_gate", true);
        config.shared_expert_intermediate_size =
            reader.integer_or("shared_expert_intermediate_size", 0);
        parse_linear_attention(reader, text, config);
      } else {
        config.attention_bias = reader.boolean_or("qkv_bias", true);
        config.shared_expert_intermediate_size =
            reader.integer_or("shared_expert_intermediate_size", 0);
      }
      break;
    }
  }
  if (config.layer_kinds.empty())
    config.layer_kinds.assign(static_cast<size_t>(config.num_layers), LayerKind::kFullAttention);
  require_positive(reader, "moe_intermediate_size", config.moe_intermediate_size);
  require_in_range(reader, "intermediate_size", config.intermediate_size, 0, kMaxWidth);
  require_in_range(reader, "shared_expert_intermediate_size",
                   config.shared_expert_intermediate_size, 0, kMaxWidth);
  for (bool is_moe : config.layer_is_moe)
    if (!is_moe)
      require_positive(reader, "intermediate_size (dense layers)", config.intermediate_size);
  return config;
}

}  // namespace keel
