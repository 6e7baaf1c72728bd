#include "runtime/gen_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/base/check.h"
#include "runtime/safetensors.h"
#include "runtime/yaml_util.h"

namespace keel {

namespace {

uint64_t splitmix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

uint64_t hash_name(const std::string& name, uint64_t seed) {
  uint64_t hash = 0xcbf29ce484222325ull ^ splitmix64(seed);
  for (char c : name) hash = (hash ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return splitmix64(hash);
}

// A tensor filled with `center + uniform(-1, 1) * sqrt(3) * std` (so its std is `std`).
TensorToWrite random_tensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                            double std_dev, double center, uint64_t seed) {
  TensorToWrite tensor{name, dtype, std::move(shape), {}};
  int64_t count = 1;
  for (int64_t dim : tensor.shape) count *= dim;
  tensor.bytes.resize(static_cast<size_t>(count) * dtype_size(dtype));
  uint64_t key = hash_name(name, seed);
  float scale = static_cast<float>(std_dev * std::sqrt(3.0));
  for (int64_t i = 0; i < count; ++i) {
    uint64_t bits = splitmix64(key + static_cast<uint64_t>(i));
    float unit = static_cast<float>(static_cast<double>(bits >> 40) / 8388608.0 - 1.0);  // [-1, 1)
    float value = static_cast<float>(center) + unit * scale;
    std::byte* out = tensor.bytes.data() + static_cast<size_t>(i) * dtype_size(dtype);
    if (dtype == DType::kF32) {
      std::memcpy(out, &value, 4);
    } else {
      uint16_t half = dtype == DType::kBF16 ? f32_to_bf16(value) : f32_to_f16(value);
      std::memcpy(out, &half, 2);
    }
  }
  return tensor;
}

const char* torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
  }
  return "?";
}

nlohmann::json config_json(const ModelPreset& preset) {
  nlohmann::json config;
  config["architectures"] = {preset.architecture};
  config["hidden_act"] = "silu";
  config["vocab_size"] = preset.vocab_size;
  config["hidden_size"] = preset.hidden_size;
  config["num_hidden_layers"] = preset.num_hidden_layers;
  config["num_attention_heads"] = preset.num_attention_heads;
  config["num_key_value_heads"] = preset.num_key_value_heads;
  config["head_dim"] = preset.head_dim;
  config["num_experts_per_tok"] = preset.num_experts_per_tok;
  config["rope_theta"] = preset.rope_theta;
  config["rms_norm_eps"] = preset.rms_norm_eps;
  config["max_position_embeddings"] = preset.max_position_embeddings;
  config["tie_word_embeddings"] = preset.tie_word_embeddings;
  config["torch_dtype"] = torch_dtype_name(preset.dtype);
  if (preset.architecture == "MixtralForCausalLM") {
    config["model_type"] = "mixtral";
    config["num_local_experts"] = preset.num_experts;
    config["intermediate_size"] = preset.moe_intermediate_size;
  } else {
    config["model_type"] = preset.architecture == "Qwen2MoeForCausalLM" ? "qwen2_moe" : "qwen3_moe";
    config["num_experts"] = preset.num_experts;
    config["moe_intermediate_size"] = preset.moe_intermediate_size;
    config["intermediate_size"] = preset.intermediate_size;
    config["norm_topk_prob"] = preset.norm_topk_prob;
    config["decoder_sparse_step"] = 1;
    config["mlp_only_layers"] = nlohmann::json::array();
    if (preset.architecture == "Qwen2MoeForCausalLM") {
      config["shared_expert_intermediate_size"] = preset.shared_expert_intermediate_size;
      config["qkv_bias"] = true;
    } else {
      config["attention_bias"] = false;
    }
  }
  config["keel_synthetic_preset"] = preset.name;
  return config;
}

}  // namespace

int64_t ModelPreset::num_parameters() const {
  int64_t hidden = hidden_size;
  int64_t attention = hidden * head_dim * (2 * num_attention_heads + 2 * num_key_value_heads);
  int64_t experts = num_experts * 3 * hidden * moe_intermediate_size + num_experts * hidden;
  int64_t shared = 3 * hidden * shared_expert_intermediate_size;
  int64_t embeddings = vocab_size * hidden * (tie_word_embeddings ? 1 : 2);
  return num_hidden_layers * (attention + experts + shared) + embeddings;
}

std::string find_model_preset(const std::string& name_or_path) {
  if (std::filesystem::exists(name_or_path)) return name_or_path;
  std::string in_tree = std::string(KEEL_SOURCE_DIR) + "/configs/models/" + name_or_path + ".yaml";
  if (std::filesystem::exists(in_tree)) return in_tree;
  std::string names;
  std::error_code error;
  for (const auto& entry :
       std::filesystem::directory_iterator(std::string(KEEL_SOURCE_DIR) + "/configs/models", error))
    if (entry.path().extension() == ".yaml") names += " " + entry.path().stem().string();
  throw_error("unknown model preset '", name_or_path, "' (presets:", names, ")");
}

ModelPreset load_model_preset(const std::string& path) {
  YAML::Node root = load_yaml_mapping(path);
  reject_unknown_keys(root,
                      {"name",
                       "architecture",
                       "vocab_size",
                       "hidden_size",
                       "num_hidden_layers",
                       "num_attention_heads",
                       "num_key_value_heads",
                       "head_dim",
                       "num_experts",
                       "num_experts_per_tok",
                       "moe_intermediate_size",
                       "intermediate_size",
                       "shared_expert_intermediate_size",
                       "norm_topk_prob",
                       "tie_word_embeddings",
                       "rope_theta",
                       "rms_norm_eps",
                       "max_position_embeddings",
                       "dtype",
                       "router_scale"},
                      path);
  ModelPreset preset;
  preset.name = std::filesystem::path(path).stem().string();
  auto get_int = [&](const char* key, int64_t& field, bool required) {
    if (!root[key]) {
      if (required) throw_error(path, ": missing required key '", key, "'");
      return;
    }
    field = yaml_value<int64_t>(root, key, path);
    if (field < 0 || (required && field == 0)) throw_error(path, ": key '", key, "' must be > 0");
  };
  if (root["name"]) preset.name = yaml_value<std::string>(root, "name", path);
  if (root["architecture"])
    preset.architecture = yaml_value<std::string>(root, "architecture", path);
  if (preset.architecture != "Qwen3MoeForCausalLM" &&
      preset.architecture != "Qwen2MoeForCausalLM" && preset.architecture != "MixtralForCausalLM")
    throw_error(path, ": unsupported architecture '", preset.architecture, "'");
  get_int("vocab_size", preset.vocab_size, true);
  get_int("hidden_size", preset.hidden_size, true);
  get_int("num_hidden_layers", preset.num_hidden_layers, true);
  get_int("num_attention_heads", preset.num_attention_heads, true);
  get_int("num_key_value_heads", preset.num_key_value_heads, true);
  preset.head_dim = preset.hidden_size / preset.num_attention_heads;
  get_int("head_dim", preset.head_dim, false);
  get_int("num_experts", preset.num_experts, true);
  get_int("num_experts_per_tok", preset.num_experts_per_tok, true);
  get_int("moe_intermediate_size", preset.moe_intermediate_size, true);
  get_int("intermediate_size", preset.intermediate_size, false);
  get_int("shared_expert_intermediate_size", preset.shared_expert_intermediate_size, false);
  get_int("max_position_embeddings", preset.max_position_embeddings, false);
  if (root["norm_topk_prob"])
    preset.norm_topk_prob = yaml_value<bool>(root, "norm_topk_prob", path);
  if (root["tie_word_embeddings"])
    preset.tie_word_embeddings = yaml_value<bool>(root, "tie_word_embeddings", path);
  if (root["rope_theta"]) preset.rope_theta = yaml_value<double>(root, "rope_theta", path);
  if (root["rms_norm_eps"]) preset.rms_norm_eps = yaml_value<double>(root, "rms_norm_eps", path);
  if (root["router_scale"]) preset.router_scale = yaml_value<double>(root, "router_scale", path);
  if (root["dtype"]) {
    std::string dtype = yaml_value<std::string>(root, "dtype", path);
    if (dtype == "float32")
      preset.dtype = DType::kF32;
    else if (dtype == "bfloat16")
      preset.dtype = DType::kBF16;
    else if (dtype == "float16")
      preset.dtype = DType::kF16;
    else
      throw_error(path, ": key 'dtype' must be float32, bfloat16 or float16, found '", dtype, "'");
  }
  if (preset.num_experts_per_tok > preset.num_experts)
    throw_error(path, ": num_experts_per_tok exceeds num_experts");
  if (preset.architecture == "Qwen2MoeForCausalLM" && preset.shared_expert_intermediate_size == 0)
    throw_error(path, ": Qwen2MoeForCausalLM needs shared_expert_intermediate_size");
  return preset;
}

void generate_model(const ModelPreset& preset, const GenModelOptions& options,
                    const std::string& out_dir) {
  std::filesystem::create_directories(out_dir);
  const uint64_t seed = options.seed;
  const DType dtype = preset.dtype;
  const int64_t hidden = preset.hidden_size;
  const int64_t head_dim = preset.head_dim;
  const double proj_std = 1.0 / std::sqrt(static_cast<double>(hidden));
  const bool mixtral = preset.architecture == "MixtralForCausalLM";
  const bool qwen2 = preset.architecture == "Qwen2MoeForCausalLM";

  // Tensors are produced and written one shard at a time so memory stays at one shard.
  std::vector<std::vector<TensorToWrite>> shards(1);
  int64_t shard_bytes = 0;
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> shard_of_tensor;
  int64_t total_bytes = 0;
  std::vector<std::string> written_files;
  auto flush = [&](bool last) {
    if (shards.back().empty()) return;
    std::string temp_name = "shard-" + std::to_string(written_files.size()) + ".tmp.safetensors";
    for (const auto& tensor : shards.back()) weight_map[tensor.name] = temp_name;
    write_safetensors(out_dir + "/" + temp_name, shards.back(), {{"format", "pt"}});
    written_files.push_back(temp_name);
    shards.back().clear();
    shard_bytes = 0;
    (void)last;
  };
  auto add = [&](TensorToWrite tensor) {
    int64_t bytes = static_cast<int64_t>(tensor.bytes.size());
    if (options.max_shard_bytes > 0 && shard_bytes > 0 &&
        shard_bytes + bytes > options.max_shard_bytes)
      flush(false);
    shard_bytes += bytes;
    total_bytes += bytes;
    shards.back().push_back(std::move(tensor));
  };

  add(random_tensor("model.embed_tokens.weight", {preset.vocab_size, hidden}, dtype, 1.0, 0.0,
                    seed));
  for (int64_t layer = 0; layer < preset.num_hidden_layers; ++layer) {
    std::string prefix = "model.layers." + std::to_string(layer) + ".";
    add(random_tensor(prefix + "input_layernorm.weight", {hidden}, dtype, 0.05, 1.0, seed));
    add(random_tensor(prefix + "post_attention_layernorm.weight", {hidden}, dtype, 0.05, 1.0,
                      seed));
    std::string attn = prefix + "self_attn.";
    int64_t q_rows = preset.num_attention_heads * head_dim;
    int64_t kv_rows = preset.num_key_value_heads * head_dim;
    add(random_tensor(attn + "q_proj.weight", {q_rows, hidden}, dtype, proj_std, 0.0, seed));
    add(random_tensor(attn + "k_proj.weight", {kv_rows, hidden}, dtype, proj_std, 0.0, seed));
    add(random_tensor(attn + "v_proj.weight", {kv_rows, hidden}, dtype, proj_std, 0.0, seed));
    add(random_tensor(attn + "o_proj.weight", {hidden, q_rows}, dtype,
                      0.5 / std::sqrt(static_cast<double>(q_rows)), 0.0, seed));
    if (qwen2) {
      add(random_tensor(attn + "q_proj.bias", {q_rows}, dtype, 0.1, 0.0, seed));
      add(random_tensor(attn + "k_proj.bias", {kv_rows}, dtype, 0.1, 0.0, seed));
      add(random_tensor(attn + "v_proj.bias", {kv_rows}, dtype, 0.1, 0.0, seed));
    } else if (!mixtral) {
      add(random_tensor(attn + "q_norm.weight", {head_dim}, dtype, 0.05, 1.0, seed));
      add(random_tensor(attn + "k_norm.weight", {head_dim}, dtype, 0.05, 1.0, seed));
    }
    std::string moe = prefix + (mixtral ? "block_sparse_moe." : "mlp.");
    const int64_t inter = preset.moe_intermediate_size;
    add(random_tensor(moe + "gate.weight", {preset.num_experts, hidden}, dtype,
                      preset.router_scale * proj_std, 0.0, seed));
    const double down_std = 0.5 / std::sqrt(static_cast<double>(inter));
    for (int64_t expert = 0; expert < preset.num_experts; ++expert) {
      std::string name = moe + "experts." + std::to_string(expert) + ".";
      add(random_tensor(name + (mixtral ? "w1.weight" : "gate_proj.weight"), {inter, hidden}, dtype,
                        proj_std, 0.0, seed));
      add(random_tensor(name + (mixtral ? "w3.weight" : "up_proj.weight"), {inter, hidden}, dtype,
                        proj_std, 0.0, seed));
      add(random_tensor(name + (mixtral ? "w2.weight" : "down_proj.weight"), {hidden, inter}, dtype,
                        down_std, 0.0, seed));
    }
    if (qwen2) {
      const int64_t shared = preset.shared_expert_intermediate_size;
      add(random_tensor(moe + "shared_expert.gate_proj.weight", {shared, hidden}, dtype, proj_std,
                        0.0, seed));
      add(random_tensor(moe + "shared_expert.up_proj.weight", {shared, hidden}, dtype, proj_std,
                        0.0, seed));
      add(random_tensor(moe + "shared_expert.down_proj.weight", {hidden, shared}, dtype,
                        0.5 / std::sqrt(static_cast<double>(shared)), 0.0, seed));
      add(random_tensor(moe + "shared_expert_gate.weight", {1, hidden}, dtype, proj_std, 0.0,
                        seed));
    }
  }
  add(random_tensor("model.norm.weight", {hidden}, dtype, 0.05, 1.0, seed));
  if (!preset.tie_word_embeddings)
    add(random_tensor("lm_head.weight", {preset.vocab_size, hidden}, dtype, proj_std, 0.0, seed));
  flush(true);

  // Final names: model.safetensors for one file, else HF's model-0000x-of-0000y + index.
  std::map<std::string, std::string> final_name;
  if (written_files.size() == 1) {
    final_name[written_files[0]] = "model.safetensors";
    std::filesystem::remove(out_dir + "/model.safetensors.index.json");
  } else {
    char buffer[64];
    for (size_t i = 0; i < written_files.size(); ++i) {
      std::snprintf(buffer, sizeof(buffer), "model-%05zu-of-%05zu.safetensors", i + 1,
                    written_files.size());
      final_name[written_files[i]] = buffer;
    }
    std::filesystem::remove(out_dir + "/model.safetensors");
  }
  for (const auto& [temp, name] : final_name)
    std::filesystem::rename(out_dir + "/" + temp, out_dir + "/" + name);
  if (written_files.size() > 1) {
    nlohmann::json index;
    index["metadata"]["total_size"] = total_bytes;
    for (const auto& [tensor, file] : weight_map) index["weight_map"][tensor] = final_name[file];
    std::ofstream(out_dir + "/model.safetensors.index.json") << index.dump(2) << "\n";
  }
  std::ofstream config_file(out_dir + "/config.json");
  config_file << config_json(preset).dump(2) << "\n";
  if (!config_file) throw_error("cannot write ", out_dir, "/config.json");
}

}  // namespace keel
