#include "runtime/model/gen_model.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>
#include <unordered_map>

#include "kernels/base/check.h"
#include "runtime/common/yaml_util.h"
#include "runtime/model/safetensors.h"

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

// A tensor whose element i is map(u_i), u_i uniform in [-1, 1) from the stream of (seed, name),
// stored in `dtype`.
template <typename Map>
TensorToWrite stream_tensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                            uint64_t seed, Map map) {
  TensorToWrite tensor{name, dtype, std::move(shape), {}};
  int64_t count = 1;
  for (int64_t dim : tensor.shape) count *= dim;
  tensor.bytes.resize(static_cast<size_t>(count) * dtype_size(dtype));
  uint64_t key = hash_name(name, seed);
  for (int64_t i = 0; i < count; ++i) {
    uint64_t bits = splitmix64(key + static_cast<uint64_t>(i));
    float unit = static_cast<float>(static_cast<double>(bits >> 40) / 8388608.0 - 1.0);  // [-1, 1)
    float value = map(unit);
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

// A tensor filled with `center + uniform(-1, 1) * sqrt(3) * std` (so its std is `std`).
TensorToWrite random_tensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                            double std_dev, double center, uint64_t seed) {
  const float scale = static_cast<float>(std_dev * std::sqrt(3.0));
  return stream_tensor(name, std::move(shape), dtype, seed,
                       [&](float unit) { return static_cast<float>(center) + unit * scale; });
}

// A tensor filled with log(x), x uniform in [low, high): the Gated DeltaNet A_log, whose decay
// rate is A = exp(A_log) (transformers initialises it the same way, from uniform(0.01, 16)).
TensorToWrite log_uniform_tensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                                 double low, double high, uint64_t seed) {
  return stream_tensor(name, std::move(shape), dtype, seed, [&](float unit) {
    return static_cast<float>(
        std::log(low + (static_cast<double>(unit) + 1.0) * 0.5 * (high - low)));
  });
}

// ModelPreset::near_tie_layer: the router [E, H] as float32 (values as stored in its dtype),
// then row 2i + 1 = row 2i + gap * std * u for i < pairs, u uniform in [-1, 1) from the stream
// "<name>.near_tie". Float32 because a 16-bit weight cannot hold a gap near float rounding.
TensorToWrite engineer_near_ties(const TensorToWrite& router, int64_t pairs, double gap,
                                 double std_dev, uint64_t seed) {
  const int64_t rows = router.shape[0], cols = router.shape[1];
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = load_as_f32(router.bytes.data(), router.dtype, i);
  const uint64_t key = hash_name(router.name + ".near_tie", seed);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const float* row_a = values.data() + 2 * pair * cols;
    float* row_b = values.data() + (2 * pair + 1) * cols;
    for (int64_t j = 0; j < cols; ++j) {
      uint64_t bits = splitmix64(key + static_cast<uint64_t>(pair * cols + j));
      double unit = static_cast<double>(bits >> 40) / 8388608.0 - 1.0;  // [-1, 1)
      row_b[j] = static_cast<float>(static_cast<double>(row_a[j]) + gap * std_dev * unit);
    }
  }
  TensorToWrite out{router.name, DType::kF32, router.shape, {}};
  out.bytes.resize(values.size() * sizeof(float));
  std::memcpy(out.bytes.data(), values.data(), out.bytes.size());
  return out;
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
    config["mlp_only_layers"] = preset.mlp_only_layers;
    if (preset.architecture == "Qwen2MoeForCausalLM") {
      config["shared_expert_intermediate_size"] = preset.shared_expert_intermediate_size;
      config["qkv_bias"] = true;
    } else {
      config["attention_bias"] = false;
    }
  }
  return config;
}

// keel's own keys, at the top level of every synthetic config.json.
void add_keel_keys(const ModelPreset& preset, nlohmann::json& config) {
  config["keel_synthetic_preset"] = preset.name;
  if (preset.near_tie_layer >= 0)
    config["keel_near_tie"] = {{"layer", preset.near_tie_layer},
                               {"gap", preset.near_tie_gap},
                               {"pairs", preset.near_tie_pairs}};
}

// Qwen3_5MoeForConditionalGeneration / Qwen3NextForCausalLM config.json, with the keys the
// published checkpoints carry (transformers' Qwen3_5MoeTextConfig / Qwen3NextConfig fields plus
// attn_output_gate, mamba_ssm_dtype and the mtp_* keys that the released configs add).
nlohmann::json hybrid_config_json(const ModelPreset& preset) {
  const bool qwen35 = preset.architecture == "Qwen3_5MoeForConditionalGeneration";
  nlohmann::json text;
  text["vocab_size"] = preset.vocab_size;
  text["hidden_size"] = preset.hidden_size;
  text["num_hidden_layers"] = preset.num_hidden_layers;
  text["num_attention_heads"] = preset.num_attention_heads;
  text["num_key_value_heads"] = preset.num_key_value_heads;
  text["head_dim"] = preset.head_dim;
  text["hidden_act"] = "silu";
  text["rms_norm_eps"] = preset.rms_norm_eps;
  text["max_position_embeddings"] = preset.max_position_embeddings;
  text["attention_bias"] = false;
  text["attention_dropout"] = 0.0;
  text["layer_types"] = preset.layer_types;
  if (preset.full_attention_interval > 0)
    text["full_attention_interval"] = preset.full_attention_interval;
  text["linear_conv_kernel_dim"] = preset.linear_conv_kernel_dim;
  text["linear_key_head_dim"] = preset.linear_key_head_dim;
  text["linear_value_head_dim"] = preset.linear_value_head_dim;
  text["linear_num_key_heads"] = preset.linear_num_key_heads;
  text["linear_num_value_heads"] = preset.linear_num_value_heads;
  text["num_experts"] = preset.num_experts;
  text["num_experts_per_tok"] = preset.num_experts_per_tok;
  text["moe_intermediate_size"] = preset.moe_intermediate_size;
  text["shared_expert_intermediate_size"] = preset.shared_expert_intermediate_size;
  text["attn_output_gate"] = preset.attn_output_gate;
  // The recurrent state's dtype in the released configs; keel keeps it in float32 too.
  text["mamba_ssm_dtype"] = "float32";
  text["tie_word_embeddings"] = preset.tie_word_embeddings;
  if (qwen35) {
    text["model_type"] = "qwen3_5_moe_text";
    // transformers 5 names: nested rope_parameters and "dtype". Qwen3.5 has no norm_topk_prob
    // key: its router always renormalises the top-k weights.
    text["rope_parameters"] = {{"rope_type", "default"},
                               {"rope_theta", preset.rope_theta},
                               {"partial_rotary_factor", preset.partial_rotary_factor},
                               {"mrope_section", preset.mrope_section},
                               {"mrope_interleaved", preset.mrope_interleaved}};
    text["dtype"] = torch_dtype_name(preset.dtype);
    // No MTP head is written (transformers ignores mtp.* at load, and keel has no MTP).
    text["mtp_num_hidden_layers"] = 0;
    text["mtp_use_dedicated_embeddings"] = false;
    nlohmann::json config;
    config["architectures"] = {preset.architecture};
    config["model_type"] = "qwen3_5_moe";
    config["tie_word_embeddings"] = preset.tie_word_embeddings;
    config["text_config"] = std::move(text);
    // A plausible tiny vision tower description (Qwen3_5MoeVisionConfig fields) so that the
    // config parses as the published multimodal one; no model.visual.* weights are written
    // (keel runs the text model only). image/video/vision_start/vision_end token ids are left
    // out: the class defaults (248053...) lie beyond a synthetic vocabulary, and the synthetic
    // tokenizer has no vision tokens to point them at.
    config["vision_config"] = {{"model_type", "qwen3_5_moe_vision"},
                               {"depth", 2},
                               {"hidden_size", 32},
                               {"hidden_act", "gelu_pytorch_tanh"},
                               {"intermediate_size", 64},
                               {"num_heads", 2},
                               {"in_channels", 3},
                               {"patch_size", 16},
                               {"spatial_merge_size", 2},
                               {"temporal_patch_size", 2},
                               {"out_hidden_size", preset.hidden_size},
                               {"num_position_embeddings", 64},
                               {"initializer_range", 0.02}};
    return config;
  }
  // Qwen3-Next: one flat config with the transformers 4.57 names of the released checkpoint
  // (flat rope_theta / partial_rotary_factor, torch_dtype).
  nlohmann::json& config = text;
  config["architectures"] = {preset.architecture};
  config["model_type"] = "qwen3_next";
  config["rope_theta"] = preset.rope_theta;
  config["partial_rotary_factor"] = preset.partial_rotary_factor;
  config["norm_topk_prob"] = preset.norm_topk_prob;
  config["decoder_sparse_step"] = 1;
  config["mlp_only_layers"] = nlohmann::json::array();
  config["intermediate_size"] = preset.intermediate_size;
  config["torch_dtype"] = torch_dtype_name(preset.dtype);
  return config;
}

// ---- Synthetic tokenizer ------------------------------------------------------------------
// gen-model also writes a small Qwen2-style byte-level BPE (tokenizer.json) and a ChatML
// tokenizer_config.json so a synthetic model directory can be served end to end like a real
// one. Its merges are learned from the built-in text below by a tiny greedy BPE trainer with
// fixed tie-breaking, so the files depend only on the preset's vocab_size (byte-identical
// across runs and machines).

// Plain English prose to learn merges from (ASCII only: the 256 byte tokens cover the rest).
constexpr std::string_view kTokenizerTrainingText =
    "The river starts high in the hills, where the snow melts slowly in the spring and the "
    "water finds its way down through the rocks. At first it is only a small stream, cold and "
    "clear, and you can step across it without getting your feet wet. Further down, other "
    "streams join it, and by the time it reaches the first village it is wide enough for a "
    "wooden bridge. The people of the village have always lived by the river. They take water "
    "from it for their fields, they catch fish in the deep pools under the trees, and in the "
    "summer the children swim in the shallow places near the mill.\n\n"
    "In the old days the mill was the centre of the village. Farmers brought their grain on "
    "carts, and the miller ground it into flour between two heavy stones that were turned by "
    "the wheel in the water. It was hard work, and the miller was always covered in white "
    "dust, but it was good work, and everyone in the village knew him. Today the mill is quiet. "
    "The wheel still turns when the water is high, but the stones are still, and the building "
    "is a small museum where visitors can see how things were done a long time ago.\n\n"
    "Below the village the river becomes slower and wider. It winds through green meadows "
    "where cows stand in the long grass and birds call from the reeds along the banks. In the "
    "evening the light turns gold on the water, and the air is full of insects. Some people "
    "say that this is the most beautiful part of the valley, and many painters have come here "
    "to try to capture the colours of the sky reflected in the still water. Few of them have "
    "managed it, because the light changes so quickly that the scene is never the same for "
    "more than a few minutes.\n\n"
    "When the river reaches the town, it is no longer quiet. There are boats on the water, "
    "bridges of stone and iron, and busy streets along both sides. The town grew up here "
    "because the river made it easy to move goods from one place to another. Long before "
    "there were roads or railways, the boats carried wood, wool, salt and wine down to the "
    "sea and brought back cloth, tools and news from the wider world. The old warehouses "
    "still stand along the water, though most of them are now shops, restaurants and homes.\n\n"
    "Every year, at the end of the summer, the town holds a festival on the river. There are "
    "boat races in the afternoon, music in the squares, and in the evening thousands of small "
    "lights are set on the water and allowed to drift slowly towards the sea. It is said that "
    "each light carries a wish, and that if your light reaches the last bridge before it goes "
    "out, your wish will come true. Nobody really believes it, of course, but everyone watches "
    "their own light with great attention, and there is always a cheer when one of them makes "
    "it all the way.\n\n"
    "Finally the river meets the sea. The water spreads out across wide sands and mud where "
    "thousands of birds come to feed when the tide is low. The fresh water and the salt water "
    "mix, and the river, which began as a thin cold stream in the hills, becomes part of "
    "something much larger. Standing on the shore and looking out at the grey waves, it is "
    "hard to believe that all of this water once passed through the small village, under the "
    "wooden bridge and past the old mill, on its long journey down from the mountains. It "
    "takes a drop of water many days to make that journey, and yet the river itself never "
    "stops: it is always arriving and always leaving, always the same and never the same.\n";

constexpr int64_t kMaxLearnedMerges = 2000;
constexpr const char* kChatMLTemplate =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";
// The Split regex Qwen2's tokenizer.json uses (keel's tokenizer implements exactly this one).
constexpr const char* kQwenSplitRegex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::string utf8_encode(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// Byte-level symbols in HF order: GPT-2's byte -> printable code point map (printable Latin-1
// bytes map to themselves, the other 68 to U+0100 onwards), vocabulary ids by code point, as
// in Qwen2's vocabulary ("!" is 0, "Ā" (byte 0x00) is 188).
struct ByteSymbols {
  std::array<int32_t, 256> id_of_byte{};
  std::vector<std::string> token;  // by id
};

ByteSymbols byte_symbols() {
  std::vector<std::pair<uint32_t, int>> by_code_point;  // (code point, byte)
  uint32_t next_free = 256;
  for (int byte = 0; byte < 256; ++byte) {
    bool printable = (byte >= 0x21 && byte <= 0x7E) || (byte >= 0xA1 && byte <= 0xAC) ||
                     (byte >= 0xAE && byte <= 0xFF);
    by_code_point.push_back({printable ? static_cast<uint32_t>(byte) : next_free++, byte});
  }
  std::sort(by_code_point.begin(), by_code_point.end());
  ByteSymbols symbols;
  for (const auto& [code_point, byte] : by_code_point) {
    symbols.id_of_byte[byte] = static_cast<int32_t>(symbols.token.size());
    symbols.token.push_back(utf8_encode(code_point));
  }
  return symbols;
}

// The Qwen2 pre-tokenizer regex (kQwenSplitRegex) restricted to ASCII, which is all the
// training text holds, so merges are learned within the words the tokenizer will BPE. Returns
// the length of the word starting at text[i], trying the regex's alternatives in order.
size_t training_word_length(std::string_view text, size_t i) {
  auto at = [&](size_t k) { return k < text.size() ? text[k] : '\0'; };
  auto is_letter = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; };
  auto is_digit = [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; };
  auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  auto is_newline = [](char c) { return c == '\r' || c == '\n'; };
  auto is_other = [&](char c) {
    return c != '\0' && !is_space(c) && !is_letter(c) && !is_digit(c);
  };
  const char c = text[i];
  if (c == '\'') {  // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    for (std::string_view suffix : {"s", "t", "re", "ve", "m", "ll", "d"}) {
      bool match = true;
      for (size_t k = 0; k < suffix.size(); ++k)
        match = match && std::tolower(static_cast<unsigned char>(at(i + 1 + k))) == suffix[k];
      if (match) return 1 + suffix.size();
    }
  }
  size_t end = i + 1;
  if (is_letter(c) || (!is_newline(c) && !is_digit(c) && is_letter(at(i + 1)))) {
    while (is_letter(at(end))) ++end;  // [^\r\n\p{L}\p{N}]?\p{L}+
    return end - i;
  }
  if (is_digit(c)) return 1;  // \p{N}
  if (is_other(c) || (c == ' ' && is_other(at(i + 1)))) {
    if (c == ' ') ++end;  // " ?[^\s\p{L}\p{N}]+[\r\n]*"
    while (is_other(at(end))) ++end;
    while (is_newline(at(end))) ++end;
    return end - i;
  }
  size_t run_end = i;
  while (run_end < text.size() && is_space(text[run_end])) ++run_end;
  if (run_end == i) return 1;  // not reached for ASCII text; keeps progress for anything else
  for (size_t k = run_end; k > i; --k)
    if (is_newline(text[k - 1])) return k - i;  // \s*[\r\n]+ up to the last newline
  if (run_end == text.size() || run_end - i == 1) return run_end - i;  // \s+(?!\S), \s+
  return run_end - 1 - i;  // \s+(?!\S): one space is left to prefix the next word
}

std::vector<std::string_view> split_training_words(std::string_view text) {
  std::vector<std::string_view> words;
  for (size_t i = 0; i < text.size();) {
    size_t length = training_word_length(text, i);
    words.push_back(text.substr(i, length));
    i += length;
  }
  return words;
}

struct LearnedBpe {
  std::vector<std::string> tokens;                  // by id: 256 byte symbols, then merges
  std::vector<std::pair<int32_t, int32_t>> merges;  // in rank order
};

// Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: lexicographically
// smallest (left, right) token strings) until the vocabulary has `target_size` tokens or no
// pair occurs twice. Counting from scratch each round is quadratic in principle but the text
// is a few KB, so 2000 rounds take well under a second.
LearnedBpe learn_bpe(std::string_view text, size_t target_size) {
  ByteSymbols bytes = byte_symbols();
  LearnedBpe bpe{bytes.token, {}};
  std::map<std::string_view, int64_t> word_counts;  // ordered: a fixed word order
  for (std::string_view word : split_training_words(text)) ++word_counts[word];
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [word, count] : word_counts) {
    std::vector<int32_t> symbols;
    for (char c : word) symbols.push_back(bytes.id_of_byte[static_cast<uint8_t>(c)]);
    words.push_back({std::move(symbols), count});
  }
  std::map<std::string, int32_t> id_of_token;
  for (size_t id = 0; id < bpe.tokens.size(); ++id)
    id_of_token[bpe.tokens[id]] = static_cast<int32_t>(id);

  auto key = [](int32_t left, int32_t right) {
    return (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
  };
  while (bpe.tokens.size() < target_size) {
    std::unordered_map<uint64_t, int64_t> pair_counts;
    for (const auto& [symbols, count] : words)
      for (size_t k = 0; k + 1 < symbols.size(); ++k)
        pair_counts[key(symbols[k], symbols[k + 1])] += count;
    int64_t best_count = 0;
    int32_t best_left = -1, best_right = -1;
    for (const auto& [pair, count] : pair_counts) {
      int32_t left = static_cast<int32_t>(pair >> 32), right = static_cast<int32_t>(pair);
      bool better =
          count > best_count ||
          (count == best_count && std::tie(bpe.tokens[left], bpe.tokens[right]) <
                                      std::tie(bpe.tokens[best_left], bpe.tokens[best_right]));
      if (better) {
        best_count = count;
        best_left = left;
        best_right = right;
      }
    }
    if (best_count < 2) break;
    // Different pairs can spell the same string ("ab"+"c", "a"+"bc"): one id, as in HF.
    std::string merged = bpe.tokens[best_left] + bpe.tokens[best_right];
    auto [it, added] = id_of_token.emplace(merged, static_cast<int32_t>(bpe.tokens.size()));
    if (added) bpe.tokens.push_back(merged);
    bpe.merges.push_back({best_left, best_right});
    for (auto& [symbols, count] : words) {
      std::vector<int32_t> next;
      next.reserve(symbols.size());
      for (size_t k = 0; k < symbols.size(); ++k) {
        if (k + 1 < symbols.size() && symbols[k] == best_left && symbols[k + 1] == best_right) {
          next.push_back(it->second);
          ++k;
        } else {
          next.push_back(symbols[k]);
        }
      }
      symbols = std::move(next);
    }
  }
  return bpe;
}

nlohmann::ordered_json byte_level_step(bool decoder) {
  // HF writes add_prefix_space/trim_offsets/use_regex true for Qwen2's decoder, false
  // elsewhere; keel's loader and HF behave identically either way for these files.
  return {{"type", "ByteLevel"},
          {"add_prefix_space", decoder},
          {"trim_offsets", decoder},
          {"use_regex", decoder}};
}

}  // namespace

SyntheticTokenizer write_synthetic_tokenizer(const ModelPreset& preset,
                                             const std::string& out_dir) {
  constexpr int64_t kSpecialCount = 3;
  if (preset.vocab_size < 256 + kSpecialCount)
    throw_error("preset '", preset.name, "': vocab_size ", preset.vocab_size,
                " is too small for the synthetic tokenizer, which needs 256 byte tokens plus ",
                kSpecialCount, " special tokens (<|endoftext|>, <|im_start|>, <|im_end|>)");
  const size_t target = static_cast<size_t>(
      std::min(preset.vocab_size - kSpecialCount, int64_t{256} + kMaxLearnedMerges));
  LearnedBpe bpe = learn_bpe(kTokenizerTrainingText, target);

  SyntheticTokenizer ids;
  ids.learned_merges = static_cast<int64_t>(bpe.merges.size());
  ids.endoftext = static_cast<int32_t>(bpe.tokens.size());
  ids.im_start = ids.endoftext + 1;
  ids.im_end = ids.endoftext + 2;
  KEEL_CHECK(ids.im_end < preset.vocab_size, "synthetic tokenizer id ", ids.im_end,
             " outside vocab_size ", preset.vocab_size);

  using ordered_json = nlohmann::ordered_json;
  ordered_json added = ordered_json::array();
  for (const auto& [content, id] : {std::pair<const char*, int32_t>{"<|endoftext|>", ids.endoftext},
                                    {"<|im_start|>", ids.im_start},
                                    {"<|im_end|>", ids.im_end}})
    added.push_back({{"id", id},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  ordered_json vocab = ordered_json::object();
  for (size_t id = 0; id < bpe.tokens.size(); ++id) vocab[bpe.tokens[id]] = id;
  ordered_json merges = ordered_json::array();
  for (const auto& [left, right] : bpe.merges)
    merges.push_back({bpe.tokens[left], bpe.tokens[right]});
  ordered_json tokenizer = {{"version", "1.0"},
                            {"truncation", nullptr},
                            {"padding", nullptr},
                            {"added_tokens", added},
                            {"normalizer", {{"type", "NFC"}}},
                            {"pre_tokenizer",
                             {{"type", "Sequence"},
                              {"pretokenizers",
                               {{{"type", "Split"},
                                 {"pattern", {{"Regex", kQwenSplitRegex}}},
                                 {"behavior", "Isolated"},
                                 {"invert", false}},
                                byte_level_step(false)}}}},
                            {"post_processor", byte_level_step(false)},
                            {"decoder", byte_level_step(true)},
                            {"model",
                             {{"type", "BPE"},
                              {"dropout", nullptr},
                              {"unk_token", nullptr},
                              {"continuing_subword_prefix", nullptr},
                              {"end_of_word_suffix", nullptr},
                              {"fuse_unk", false},
                              {"byte_fallback", false},
                              {"ignore_merges", false},
                              {"vocab", vocab},
                              {"merges", merges}}}};
  ordered_json config = {{"bos_token", nullptr},
                         {"eos_token", "<|im_end|>"},
                         {"pad_token", "<|endoftext|>"},
                         {"chat_template", kChatMLTemplate},
                         {"model_max_length", preset.max_position_embeddings},
                         {"clean_up_tokenization_spaces", false},
                         {"tokenizer_class", "PreTrainedTokenizerFast"}};

  std::filesystem::create_directories(out_dir);
  for (const auto& [name, json] :
       {std::pair<const char*, const ordered_json*>{"tokenizer.json", &tokenizer},
        {"tokenizer_config.json", &config}}) {
    std::string path = out_dir + "/" + name;
    std::ofstream file(path, std::ios::binary);
    file << json->dump(2) << "\n";
    if (!file) throw_error("cannot write ", path);
  }
  return ids;
}

int64_t ModelPreset::num_parameters() const {
  int64_t hidden = hidden_size;
  if (hybrid()) {
    // Every tensor generate_model writes, element for element (Qwen3-Next's fused in_proj_qkvz /
    // in_proj_ba hold exactly Qwen3.5's in_proj_qkv + in_proj_z / in_proj_b + in_proj_a).
    const int64_t key_dim = linear_num_key_heads * linear_key_head_dim;
    const int64_t value_dim = linear_num_value_heads * linear_value_head_dim;
    const int64_t conv_dim = 2 * key_dim + value_dim;
    const int64_t linear = (conv_dim + value_dim + 2 * linear_num_value_heads) * hidden  // in_proj
                           + conv_dim * linear_conv_kernel_dim                           // conv1d
                           + 2 * linear_num_value_heads                                  // dt, A
                           + linear_value_head_dim                                       // norm
                           + hidden * value_dim;                                         // out
    const int64_t q_rows = num_attention_heads * head_dim;
    const int64_t full = 2 * q_rows * hidden                                       // q + gate
                         + 2 * num_key_value_heads * head_dim * hidden             // k, v
                         + hidden * q_rows                                         // o
                         + 2 * head_dim;                                           // q_norm, k_norm
    const int64_t moe = num_experts * hidden                                       // router
                        + num_experts * 3 * moe_intermediate_size * hidden         // experts
                        + 3 * shared_expert_intermediate_size * hidden             // shared expert
                        + hidden;                                                  // its gate
    int64_t total = vocab_size * hidden * (tie_word_embeddings ? 1 : 2) + hidden;  // + norm
    for (const std::string& type : layer_types)
      total += 2 * hidden + (type == "linear_attention" ? linear : full) + moe;
    return total;
  }
  int64_t attention = hidden * head_dim * (2 * num_attention_heads + 2 * num_key_value_heads);
  int64_t experts = num_experts * 3 * hidden * moe_intermediate_size + num_experts * hidden;
  int64_t shared = 3 * hidden * shared_expert_intermediate_size;
  int64_t embeddings = vocab_size * hidden * (tie_word_embeddings ? 1 : 2);
  const auto dense_layers = static_cast<int64_t>(mlp_only_layers.size());
  return num_hidden_layers * attention + (num_hidden_layers - dense_layers) * (experts + shared) +
         dense_layers * 3 * hidden * intermediate_size + embeddings;
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

namespace {

// The preset keys only the hybrid architectures take.
const char* const kHybridKeys[] = {"layer_types",
                                   "full_attention_interval",
                                   "linear_num_key_heads",
                                   "linear_num_value_heads",
                                   "linear_key_head_dim",
                                   "linear_value_head_dim",
                                   "linear_conv_kernel_dim",
                                   "attn_output_gate",
                                   "partial_rotary_factor",
                                   "mrope_section",
                                   "mrope_interleaved"};

// The Gated DeltaNet keys of load_model_preset: required and checked for the hybrid
// architectures, refused for the others (where no tensor would reflect them).
void load_hybrid_keys(const YAML::Node& root, const std::string& path, ModelPreset& preset) {
  if (!preset.hybrid()) {
    for (const char* key : kHybridKeys)
      if (root[key])
        throw_error(path, ": key '", key, "' is only for Qwen3_5MoeForConditionalGeneration and ",
                    "Qwen3NextForCausalLM");
    return;
  }
  const bool qwen35 = preset.architecture == "Qwen3_5MoeForConditionalGeneration";
  auto positive = [&](const char* key, int64_t& field, bool required) {
    if (!root[key]) {
      if (required) throw_error(path, ": missing required key '", key, "'");
      return;
    }
    field = yaml_value<int64_t>(root, key, path);
    if (field <= 0) throw_error(path, ": key '", key, "' must be > 0");
  };
  positive("linear_num_key_heads", preset.linear_num_key_heads, true);
  positive("linear_num_value_heads", preset.linear_num_value_heads, true);
  positive("linear_key_head_dim", preset.linear_key_head_dim, true);
  positive("linear_value_head_dim", preset.linear_value_head_dim, true);
  positive("linear_conv_kernel_dim", preset.linear_conv_kernel_dim, false);
  // Grouped value attention: value head h reads q/k head h / (HV / HK).
  if (preset.linear_num_value_heads % preset.linear_num_key_heads != 0)
    throw_error(path, ": linear_num_value_heads must be a multiple of linear_num_key_heads");

  if (root["layer_types"] && root["full_attention_interval"])
    throw_error(path, ": give layer_types or full_attention_interval, not both");
  if (root["layer_types"]) {
    preset.layer_types = yaml_value<std::vector<std::string>>(root, "layer_types", path);
    if (static_cast<int64_t>(preset.layer_types.size()) != preset.num_hidden_layers)
      throw_error(path, ": layer_types has ", preset.layer_types.size(), " entries for ",
                  preset.num_hidden_layers, " layers");
    for (const std::string& type : preset.layer_types)
      if (type != "linear_attention" && type != "full_attention")
        throw_error(path, ": layer_types entry '", type,
                    "' is neither linear_attention nor full_attention");
    // Record the interval when the list is exactly one (config.json then carries both, as the
    // published configs do).
    for (int64_t interval = 1; interval <= preset.num_hidden_layers; ++interval) {
      bool matches = true;
      for (int64_t i = 0; i < preset.num_hidden_layers && matches; ++i)
        matches = (preset.layer_types[static_cast<size_t>(i)] == "full_attention") ==
                  ((i + 1) % interval == 0);
      if (matches) {
        preset.full_attention_interval = interval;
        break;
      }
    }
  } else {
    positive("full_attention_interval", preset.full_attention_interval, true);
    for (int64_t i = 0; i < preset.num_hidden_layers; ++i)
      preset.layer_types.push_back(
          (i + 1) % preset.full_attention_interval == 0 ? "full_attention" : "linear_attention");
  }

  if (root["attn_output_gate"])
    preset.attn_output_gate = yaml_value<bool>(root, "attn_output_gate", path);
  if (!preset.attn_output_gate)
    throw_error(path, ": attn_output_gate: false is not supported (transformers' ",
                preset.architecture, " attention always has the output gate)");
  if (root["partial_rotary_factor"])
    preset.partial_rotary_factor = yaml_value<double>(root, "partial_rotary_factor", path);
  // transformers takes int(head_dim * factor) rotary dims, rotated in halves: keep it exact.
  const double rotary = static_cast<double>(preset.head_dim) * preset.partial_rotary_factor;
  const auto rotary_dims = static_cast<int64_t>(rotary);
  if (!(preset.partial_rotary_factor > 0.0 && preset.partial_rotary_factor <= 1.0) ||
      static_cast<double>(rotary_dims) != rotary || rotary_dims % 2 != 0)
    throw_error(path, ": head_dim x partial_rotary_factor must be an even number of dims (found ",
                rotary, ")");

  if (qwen35) {
    const int64_t half = rotary_dims / 2;
    if (root["mrope_section"]) {
      preset.mrope_section = yaml_value<std::vector<int64_t>>(root, "mrope_section", path);
    } else {
      const int64_t third = (half + 2) / 3;
      preset.mrope_section = {third, third, half - 2 * third};
    }
    int64_t sum = 0;
    bool negative = false;
    for (int64_t section : preset.mrope_section) {
      sum += section;
      negative = negative || section < 0;
    }
    if (preset.mrope_section.size() != 3 || negative || sum != half)
      throw_error(path, ": mrope_section must be 3 sections >= 0 summing to the rotary dims / 2 (",
                  half, ")");
    if (root["mrope_interleaved"])
      preset.mrope_interleaved = yaml_value<bool>(root, "mrope_interleaved", path);
    // Qwen3.5's router always renormalises its top-k weights; its config has no such key.
    if (!preset.norm_topk_prob)
      throw_error(path, ": Qwen3_5MoeForConditionalGeneration always renormalises the top-k ",
                  "weights (norm_topk_prob must stay true)");
    if (preset.intermediate_size != 0)
      throw_error(path, ": Qwen3_5MoeForConditionalGeneration has no dense intermediate_size");
  } else if (root["mrope_section"] || root["mrope_interleaved"]) {
    throw_error(path, ": mrope_section / mrope_interleaved are Qwen3.5 keys (Qwen3-Next has 1-D ",
                "RoPE)");
  }
  // Both architectures build the shared expert and its gate unconditionally.
  if (preset.shared_expert_intermediate_size == 0)
    throw_error(path, ": ", preset.architecture, " needs shared_expert_intermediate_size");
}

}  // namespace

ModelPreset load_model_preset(const std::string& path) {
  YAML::Node root = load_yaml_mapping(path);
  std::set<std::string> known_keys = {"name",
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
                                      "router_scale",
                                      "near_tie_layer",
                                      "near_tie_gap",
                                      "near_tie_pairs",
                                      "mlp_only_layers"};
  known_keys.insert(std::begin(kHybridKeys), std::end(kHybridKeys));
  reject_unknown_keys(root, known_keys, path);
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
      preset.architecture != "Qwen2MoeForCausalLM" && preset.architecture != "MixtralForCausalLM" &&
      !preset.hybrid())
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
  if (root["near_tie_layer"]) {
    preset.near_tie_layer = yaml_value<int64_t>(root, "near_tie_layer", path);
    if (preset.near_tie_layer < 0 || preset.near_tie_layer >= preset.num_hidden_layers)
      throw_error(path, ": key 'near_tie_layer' must be in [0, num_hidden_layers)");
  }
  if (root["near_tie_gap"]) {
    preset.near_tie_gap = yaml_value<double>(root, "near_tie_gap", path);
    if (!(preset.near_tie_gap >= 0.0 && preset.near_tie_gap <= 1.0))
      throw_error(path, ": key 'near_tie_gap' must be in [0, 1]");
  }
  if (root["near_tie_pairs"]) {
    preset.near_tie_pairs = yaml_value<int64_t>(root, "near_tie_pairs", path);
    if (preset.near_tie_pairs < 1 || 2 * preset.near_tie_pairs > preset.num_experts)
      throw_error(path, ": key 'near_tie_pairs' must be in [1, num_experts / 2]");
  }
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
  if (root["mlp_only_layers"]) {
    if (preset.architecture != "Qwen3MoeForCausalLM" &&
        preset.architecture != "Qwen2MoeForCausalLM")
      throw_error(path, ": key 'mlp_only_layers' is for Qwen3MoeForCausalLM / Qwen2MoeForCausalLM");
    if (!root["mlp_only_layers"].IsSequence())
      throw_error(path, ": key 'mlp_only_layers' must be a list of layer indices");
    for (const YAML::Node& item : root["mlp_only_layers"]) {
      int64_t layer = -1;
      try {
        layer = item.as<int64_t>();
      } catch (const YAML::Exception&) {
        throw_error(path, ": mlp_only_layers entries must be integers");
      }
      if (layer < 0 || layer >= preset.num_hidden_layers)
        throw_error(path, ": mlp_only_layers entry ", layer, " is not in [0, num_hidden_layers)");
      if (!preset.is_moe_layer(layer))
        throw_error(path, ": mlp_only_layers lists layer ", layer, " twice");
      preset.mlp_only_layers.push_back(layer);
    }
    if (!preset.mlp_only_layers.empty() && preset.intermediate_size == 0)
      throw_error(path, ": mlp_only_layers needs intermediate_size (the dense MLP width)");
    if (preset.near_tie_layer >= 0 && !preset.is_moe_layer(preset.near_tie_layer))
      throw_error(path, ": near_tie_layer ", preset.near_tie_layer, " is a dense MLP layer");
  }
  load_hybrid_keys(root, path, preset);
  return preset;
}

namespace {

// The tensors of a hybrid Gated DeltaNet MoE preset, in the published layouts (names and shapes
// as transformers' Qwen3_5MoeForConditionalGeneration / Qwen3NextForCausalLM load them):
//   Qwen3.5: model.language_model.{embed_tokens,layers.N,norm}, separate in_proj_qkv (rows
//     q | k | v) / in_proj_z / in_proj_b / in_proj_a, routed experts fused 3-D
//     (experts.gate_up_proj [E, 2I, H]: gate rows then up rows; experts.down_proj [E, H, I]).
//   Qwen3-Next: model.{embed_tokens,layers.N,norm}, fused in_proj_qkvz / in_proj_ba (interleaved
//     per key-head group), per-expert experts.{e}.{gate,up,down}_proj.
// Value scales: the norms whose effective weight is 1 + w (input, post-attention, final, q/k
// norms: transformers' zero-centred RMSNorm) hold small values around 0; the gated output norm
// (a plain w * x) holds values around 1. Projections have std 1/sqrt(fan_in) (outputs at half
// that, as the other presets), the depthwise conv 1/sqrt(K) so it keeps the input's scale.
// A_log = log U[1, 16) gives decay rates A in [1, 16); dt_bias around -1.5 puts
// softplus(a + dt_bias) near 0.2, so the per-token state decay exp(-A softplus(..)) spreads over
// ~0.04 .. 0.8 and the recurrent state carries information over several tokens (around 0,
// half of the heads would forget nearly everything at every token).
template <typename Add>
void add_hybrid_tensors(const ModelPreset& preset, uint64_t seed, Add& add) {
  const bool qwen35 = preset.architecture == "Qwen3_5MoeForConditionalGeneration";
  const DType dtype = preset.dtype;
  const int64_t hidden = preset.hidden_size;
  const int64_t head_dim = preset.head_dim;
  const double proj_std = 1.0 / std::sqrt(static_cast<double>(hidden));
  auto out_std = [](int64_t fan_in) { return 0.5 / std::sqrt(static_cast<double>(fan_in)); };
  constexpr double kZeroCentredStd = 0.1;
  const std::string root = qwen35 ? "model.language_model." : "model.";

  const int64_t hk = preset.linear_num_key_heads, hv = preset.linear_num_value_heads;
  const int64_t dk = preset.linear_key_head_dim, dv = preset.linear_value_head_dim;
  const int64_t key_dim = hk * dk, value_dim = hv * dv, conv_dim = 2 * key_dim + value_dim;
  const int64_t kernel = preset.linear_conv_kernel_dim;

  add(random_tensor(root + "embed_tokens.weight", {preset.vocab_size, hidden}, dtype, 1.0, 0.0,
                    seed));
  for (int64_t layer = 0; layer < preset.num_hidden_layers; ++layer) {
    const std::string prefix = root + "layers." + std::to_string(layer) + ".";
    add(random_tensor(prefix + "input_layernorm.weight", {hidden}, dtype, kZeroCentredStd, 0.0,
                      seed));
    add(random_tensor(prefix + "post_attention_layernorm.weight", {hidden}, dtype, kZeroCentredStd,
                      0.0, seed));
    if (preset.layer_types[static_cast<size_t>(layer)] == "linear_attention") {
      const std::string attn = prefix + "linear_attn.";
      if (qwen35) {
        add(random_tensor(attn + "in_proj_qkv.weight", {conv_dim, hidden}, dtype, proj_std, 0.0,
                          seed));
        add(random_tensor(attn + "in_proj_z.weight", {value_dim, hidden}, dtype, proj_std, 0.0,
                          seed));
        add(random_tensor(attn + "in_proj_b.weight", {hv, hidden}, dtype, proj_std, 0.0, seed));
        add(random_tensor(attn + "in_proj_a.weight", {hv, hidden}, dtype, proj_std, 0.0, seed));
      } else {
        // Rows per key-head group g: [q_g (DK) | k_g (DK) | v_g (DV HV/HK) | z_g (DV HV/HK)]
        // and [b_g (HV/HK) | a_g (HV/HK)] (Qwen3NextGatedDeltaNet.fix_query_key_value_ordering).
        // All rows share one scale, so one stream per tensor fills them.
        add(random_tensor(attn + "in_proj_qkvz.weight", {conv_dim + value_dim, hidden}, dtype,
                          proj_std, 0.0, seed));
        add(random_tensor(attn + "in_proj_ba.weight", {2 * hv, hidden}, dtype, proj_std, 0.0,
                          seed));
      }
      add(random_tensor(attn + "conv1d.weight", {conv_dim, 1, kernel}, dtype,
                        1.0 / std::sqrt(static_cast<double>(kernel)), 0.0, seed));
      add(random_tensor(attn + "dt_bias", {hv}, dtype, 0.1, -1.5, seed));
      add(log_uniform_tensor(attn + "A_log", {hv}, dtype, 1.0, 16.0, seed));
      add(random_tensor(attn + "norm.weight", {dv}, dtype, 0.05, 1.0, seed));
      add(random_tensor(attn + "out_proj.weight", {hidden, value_dim}, dtype, out_std(value_dim),
                        0.0, seed));
    } else {
      const std::string attn = prefix + "self_attn.";
      const int64_t q_rows = preset.num_attention_heads * head_dim;
      const int64_t kv_rows = preset.num_key_value_heads * head_dim;
      // Per head h: rows [q_h (D) | gate_h (D)] (the q_proj output is viewed [.., heads, 2D]
      // and chunked in the last dim).
      add(random_tensor(attn + "q_proj.weight", {2 * q_rows, hidden}, dtype, proj_std, 0.0, seed));
      add(random_tensor(attn + "k_proj.weight", {kv_rows, hidden}, dtype, proj_std, 0.0, seed));
      add(random_tensor(attn + "v_proj.weight", {kv_rows, hidden}, dtype, proj_std, 0.0, seed));
      add(random_tensor(attn + "o_proj.weight", {hidden, q_rows}, dtype, out_std(q_rows), 0.0,
                        seed));
      add(random_tensor(attn + "q_norm.weight", {head_dim}, dtype, kZeroCentredStd, 0.0, seed));
      add(random_tensor(attn + "k_norm.weight", {head_dim}, dtype, kZeroCentredStd, 0.0, seed));
    }
    const std::string moe = prefix + "mlp.";
    const int64_t inter = preset.moe_intermediate_size;
    const int64_t experts = preset.num_experts;
    TensorToWrite router = random_tensor(moe + "gate.weight", {experts, hidden}, dtype,
                                         preset.router_scale * proj_std, 0.0, seed);
    if (layer == preset.near_tie_layer)
      router = engineer_near_ties(router, preset.near_tie_pairs, preset.near_tie_gap,
                                  preset.router_scale * proj_std, seed);
    add(std::move(router));
    if (qwen35) {
      add(random_tensor(moe + "experts.gate_up_proj", {experts, 2 * inter, hidden}, dtype, proj_std,
                        0.0, seed));
      add(random_tensor(moe + "experts.down_proj", {experts, hidden, inter}, dtype, out_std(inter),
                        0.0, seed));
    } else {
      for (int64_t expert = 0; expert < experts; ++expert) {
        const std::string name = moe + "experts." + std::to_string(expert) + ".";
        add(random_tensor(name + "gate_proj.weight", {inter, hidden}, dtype, proj_std, 0.0, seed));
        add(random_tensor(name + "up_proj.weight", {inter, hidden}, dtype, proj_std, 0.0, seed));
        add(random_tensor(name + "down_proj.weight", {hidden, inter}, dtype, out_std(inter), 0.0,
                          seed));
      }
    }
    const int64_t shared = preset.shared_expert_intermediate_size;
    add(random_tensor(moe + "shared_expert.gate_proj.weight", {shared, hidden}, dtype, proj_std,
                      0.0, seed));
    add(random_tensor(moe + "shared_expert.up_proj.weight", {shared, hidden}, dtype, proj_std, 0.0,
                      seed));
    add(random_tensor(moe + "shared_expert.down_proj.weight", {hidden, shared}, dtype,
                      out_std(shared), 0.0, seed));
    add(random_tensor(moe + "shared_expert_gate.weight", {1, hidden}, dtype, proj_std, 0.0, seed));
  }
  add(random_tensor(root + "norm.weight", {hidden}, dtype, kZeroCentredStd, 0.0, seed));
  if (!preset.tie_word_embeddings)
    add(random_tensor("lm_head.weight", {preset.vocab_size, hidden}, dtype, proj_std, 0.0, seed));
}

}  // namespace

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
  auto store = [&](TensorToWrite tensor) {
    int64_t bytes = static_cast<int64_t>(tensor.bytes.size());
    if (options.max_shard_bytes > 0 && shard_bytes > 0 &&
        shard_bytes + bytes > options.max_shard_bytes)
      flush(false);
    shard_bytes += bytes;
    total_bytes += bytes;
    shards.back().push_back(std::move(tensor));
  };
  std::optional<CheckpointQuantizer> quantizer;
  if (options.quant.format != QuantFormat::kNone) quantizer.emplace(preset, options.quant);
  auto add = [&](TensorToWrite tensor) {
    if (!quantizer) return store(std::move(tensor));
    for (TensorToWrite& stored : quantizer->add(std::move(tensor))) store(std::move(stored));
  };

  if (preset.hybrid()) {
    add_hybrid_tensors(preset, seed, add);
  } else {
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
      if (!preset.is_moe_layer(layer)) {
        const std::string mlp = prefix + "mlp.";
        const int64_t dense_inter = preset.intermediate_size;
        add(random_tensor(mlp + "gate_proj.weight", {dense_inter, hidden}, dtype, proj_std, 0.0,
                          seed));
        add(random_tensor(mlp + "up_proj.weight", {dense_inter, hidden}, dtype, proj_std, 0.0,
                          seed));
        add(random_tensor(mlp + "down_proj.weight", {hidden, dense_inter}, dtype,
                          0.5 / std::sqrt(static_cast<double>(dense_inter)), 0.0, seed));
        continue;
      }
      std::string moe = prefix + (mixtral ? "block_sparse_moe." : "mlp.");
      const int64_t inter = preset.moe_intermediate_size;
      TensorToWrite router = random_tensor(moe + "gate.weight", {preset.num_experts, hidden}, dtype,
                                           preset.router_scale * proj_std, 0.0, seed);
      if (layer == preset.near_tie_layer)
        router = engineer_near_ties(router, preset.near_tie_pairs, preset.near_tie_gap,
                                    preset.router_scale * proj_std, seed);
      add(std::move(router));
      const double down_std = 0.5 / std::sqrt(static_cast<double>(inter));
      for (int64_t expert = 0; expert < preset.num_experts; ++expert) {
        std::string name = moe + "experts." + std::to_string(expert) + ".";
        add(random_tensor(name + (mixtral ? "w1.weight" : "gate_proj.weight"), {inter, hidden},
                          dtype, proj_std, 0.0, seed));
        add(random_tensor(name + (mixtral ? "w3.weight" : "up_proj.weight"), {inter, hidden}, dtype,
                          proj_std, 0.0, seed));
        add(random_tensor(name + (mixtral ? "w2.weight" : "down_proj.weight"), {hidden, inter},
                          dtype, down_std, 0.0, seed));
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
  }
  if (quantizer)
    for (TensorToWrite& stored : quantizer->finish()) store(std::move(stored));
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
  nlohmann::json config = preset.hybrid() ? hybrid_config_json(preset) : config_json(preset);
  add_keel_keys(preset, config);
  std::filesystem::remove(out_dir + "/hf_quant_config.json");  // a stale one would mislead
  if (quantizer) quantizer->write_config(config, out_dir);
  // Presets too small for 256 byte tokens + 3 specials (the tiny test presets have 256) get
  // weights only; the rest get a tokenizer whose <|im_end|> is the model's eos. Qwen3.5 keeps
  // the token ids with the text model's keys, in text_config.
  if (preset.vocab_size >= 256 + 3) {
    SyntheticTokenizer tokenizer = write_synthetic_tokenizer(preset, out_dir);
    nlohmann::json& target = config.contains("text_config") ? config["text_config"] : config;
    target["bos_token_id"] = nullptr;
    target["eos_token_id"] = tokenizer.im_end;
  }
  std::ofstream config_file(out_dir + "/config.json");
  config_file << config.dump(2) << "\n";
  if (!config_file) throw_error("cannot write ", out_dir, "/config.json");
}

}  // namespace keel
