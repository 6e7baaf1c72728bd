// gen-model's hybrid Gated DeltaNet MoE presets (tiny-qwen3.5, tiny-qwen3-next, small-qwen3.5):
// every tensor name and shape is the published HF layout (written out here from the preset
// values, independently of the generator), config.json has the keys transformers reads, the
// weights are a pure function of (preset, seed), num_parameters() counts exactly what is
// written, the value conventions (zero-centred norms, A_log range) hold, and bad presets are
// refused with the key named.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/gen_model.h"

namespace keel {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;
using Shapes = std::map<std::string, std::vector<int64_t>>;

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// Under the running test's name: ctest runs each test as its own process, in parallel.
std::string scratch_dir(const std::string& name) {
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = std::string(KEEL_BINARY_DIR) + "/test_gen_model_hybrid/" +
                    (test != nullptr ? test->name() : "no_test") + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

ModelPreset preset(const std::string& name) {
  return load_model_preset(find_model_preset(name));
}

std::string generate(const std::string& name, uint64_t seed, const std::string& dir_name,
                     int64_t max_shard_bytes = 0) {
  std::string dir = scratch_dir(dir_name);
  GenModelOptions options;
  options.seed = seed;
  options.max_shard_bytes = max_shard_bytes;
  generate_model(preset(name), options, dir);
  return dir;
}

// The sizes both tiny presets share (configs/models/tiny-qwen3.5.yaml, tiny-qwen3-next.yaml).
constexpr int64_t kV = 512, kH = 64, kNH = 8, kNKV = 2, kD = 16;
constexpr int64_t kHK = 4, kHV = 8, kDK = 16, kDV = 12, kK = 4;
constexpr int64_t kE = 8, kI = 32, kIs = 32;

// The MoE block of one layer, both architectures' names (experts apart).
void add_shared_moe(Shapes& shapes, const std::string& mlp) {
  shapes[mlp + "gate.weight"] = {kE, kH};
  shapes[mlp + "shared_expert.gate_proj.weight"] = {kIs, kH};
  shapes[mlp + "shared_expert.up_proj.weight"] = {kIs, kH};
  shapes[mlp + "shared_expert.down_proj.weight"] = {kH, kIs};
  shapes[mlp + "shared_expert_gate.weight"] = {1, kH};
}

void add_full_attention(Shapes& shapes, const std::string& attn) {
  shapes[attn + "q_proj.weight"] = {kNH * kD * 2, kH};  // per head [q_h | gate_h]
  shapes[attn + "k_proj.weight"] = {kNKV * kD, kH};
  shapes[attn + "v_proj.weight"] = {kNKV * kD, kH};
  shapes[attn + "o_proj.weight"] = {kH, kNH * kD};
  shapes[attn + "q_norm.weight"] = {kD};
  shapes[attn + "k_norm.weight"] = {kD};
}

void add_linear_common(Shapes& shapes, const std::string& attn) {
  shapes[attn + "conv1d.weight"] = {2 * kHK * kDK + kHV * kDV, 1, kK};
  shapes[attn + "dt_bias"] = {kHV};
  shapes[attn + "A_log"] = {kHV};
  shapes[attn + "norm.weight"] = {kDV};
  shapes[attn + "out_proj.weight"] = {kH, kHV * kDV};
}

Shapes expected_qwen35() {
  const std::vector<bool> linear = {true, false, true, true, false};
  const std::string root = "model.language_model.";
  Shapes shapes;
  shapes[root + "embed_tokens.weight"] = {kV, kH};
  shapes[root + "norm.weight"] = {kH};
  shapes["lm_head.weight"] = {kV, kH};
  for (size_t layer = 0; layer < linear.size(); ++layer) {
    const std::string prefix = root + "layers." + std::to_string(layer) + ".";
    shapes[prefix + "input_layernorm.weight"] = {kH};
    shapes[prefix + "post_attention_layernorm.weight"] = {kH};
    if (linear[layer]) {
      const std::string attn = prefix + "linear_attn.";
      shapes[attn + "in_proj_qkv.weight"] = {2 * kHK * kDK + kHV * kDV, kH};
      shapes[attn + "in_proj_z.weight"] = {kHV * kDV, kH};
      shapes[attn + "in_proj_b.weight"] = {kHV, kH};
      shapes[attn + "in_proj_a.weight"] = {kHV, kH};
      add_linear_common(shapes, attn);
    } else {
      add_full_attention(shapes, prefix + "self_attn.");
    }
    const std::string mlp = prefix + "mlp.";
    add_shared_moe(shapes, mlp);
    shapes[mlp + "experts.gate_up_proj"] = {kE, 2 * kI, kH};
    shapes[mlp + "experts.down_proj"] = {kE, kH, kI};
  }
  return shapes;
}

Shapes expected_qwen3_next() {
  const std::vector<bool> linear = {true, false, true, false};
  Shapes shapes;
  shapes["model.embed_tokens.weight"] = {kV, kH};
  shapes["model.norm.weight"] = {kH};
  shapes["lm_head.weight"] = {kV, kH};
  for (size_t layer = 0; layer < linear.size(); ++layer) {
    const std::string prefix = "model.layers." + std::to_string(layer) + ".";
    shapes[prefix + "input_layernorm.weight"] = {kH};
    shapes[prefix + "post_attention_layernorm.weight"] = {kH};
    if (linear[layer]) {
      const std::string attn = prefix + "linear_attn.";
      shapes[attn + "in_proj_qkvz.weight"] = {2 * kHK * kDK + 2 * kHV * kDV, kH};
      shapes[attn + "in_proj_ba.weight"] = {2 * kHV, kH};
      add_linear_common(shapes, attn);
    } else {
      add_full_attention(shapes, prefix + "self_attn.");
    }
    const std::string mlp = prefix + "mlp.";
    add_shared_moe(shapes, mlp);
    for (int64_t expert = 0; expert < kE; ++expert) {
      const std::string name = mlp + "experts." + std::to_string(expert) + ".";
      shapes[name + "gate_proj.weight"] = {kI, kH};
      shapes[name + "up_proj.weight"] = {kI, kH};
      shapes[name + "down_proj.weight"] = {kH, kI};
    }
  }
  return shapes;
}

void expect_layout(const std::string& dir, const Shapes& expected) {
  Checkpoint checkpoint = Checkpoint::open(dir);
  std::vector<std::string> names = checkpoint.tensor_names();
  std::vector<std::string> expected_names;
  for (const auto& [name, shape] : expected) expected_names.push_back(name);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, expected_names);
  for (const auto& [name, shape] : expected) {
    const TensorView* tensor = checkpoint.find(name);
    ASSERT_NE(tensor, nullptr) << name;
    EXPECT_EQ(tensor->shape, shape) << name;
    EXPECT_EQ(tensor->dtype, DType::kBF16) << name;
  }
}

int64_t written_elements(const std::string& dir) {
  Checkpoint checkpoint = Checkpoint::open(dir);
  int64_t total = 0;
  for (const std::string& name : checkpoint.tensor_names())
    total += checkpoint.get(name).num_elements();
  return total;
}

std::vector<float> values(const TensorView& tensor) {
  std::vector<float> out(static_cast<size_t>(tensor.num_elements()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_f32(tensor.data, tensor.dtype, i);
  return out;
}

double mean(const std::vector<float>& v) {
  double sum = 0;
  for (float x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

TEST(GenModelHybrid, TinyQwen35Layout) {
  std::string dir = generate("tiny-qwen3.5", 1, "model");
  expect_layout(dir, expected_qwen35());
  // No vision tower and no MTP head: keel runs the text model only.
  for (const std::string& name : Checkpoint::open(dir).tensor_names()) {
    EXPECT_NE(name.rfind("model.visual.", 0), 0u) << name;
    EXPECT_NE(name.rfind("mtp.", 0), 0u) << name;
  }
}

TEST(GenModelHybrid, TinyQwen3NextLayout) {
  expect_layout(generate("tiny-qwen3-next", 1, "model"), expected_qwen3_next());
}

TEST(GenModelHybrid, Qwen35ConfigJson) {
  std::string dir = generate("tiny-qwen3.5", 0, "model");
  json config = json::parse(read_text(dir + "/config.json"));
  EXPECT_EQ(config["architectures"], json::array({"Qwen3_5MoeForConditionalGeneration"}));
  EXPECT_EQ(config["model_type"], "qwen3_5_moe");
  EXPECT_EQ(config["tie_word_embeddings"], false);
  ASSERT_TRUE(config.contains("vision_config"));
  EXPECT_EQ(config["vision_config"]["model_type"], "qwen3_5_moe_vision");
  EXPECT_EQ(config["vision_config"]["out_hidden_size"], kH);
  const json& text = config["text_config"];
  EXPECT_EQ(text["model_type"], "qwen3_5_moe_text");
  const std::map<std::string, int64_t> ints = {{"vocab_size", kV},
                                               {"hidden_size", kH},
                                               {"num_hidden_layers", 5},
                                               {"num_attention_heads", kNH},
                                               {"num_key_value_heads", kNKV},
                                               {"head_dim", kD},
                                               {"linear_conv_kernel_dim", kK},
                                               {"linear_key_head_dim", kDK},
                                               {"linear_value_head_dim", kDV},
                                               {"linear_num_key_heads", kHK},
                                               {"linear_num_value_heads", kHV},
                                               {"num_experts", kE},
                                               {"num_experts_per_tok", 2},
                                               {"moe_intermediate_size", kI},
                                               {"shared_expert_intermediate_size", kIs},
                                               {"max_position_embeddings", 4096},
                                               {"mtp_num_hidden_layers", 0}};
  for (const auto& [key, value] : ints) EXPECT_EQ(text.value(key, int64_t{-1}), value) << key;
  EXPECT_EQ(text["layer_types"],
            json::array({"linear_attention", "full_attention", "linear_attention",
                         "linear_attention", "full_attention"}));
  // Irregular pattern: no interval that would contradict the list.
  EXPECT_FALSE(text.contains("full_attention_interval"));
  EXPECT_EQ(text["attn_output_gate"], true);
  EXPECT_EQ(text["mamba_ssm_dtype"], "float32");
  EXPECT_EQ(text["hidden_act"], "silu");
  EXPECT_EQ(text["dtype"], "bfloat16");
  EXPECT_DOUBLE_EQ(text["rms_norm_eps"].get<double>(), 1e-6);
  EXPECT_FALSE(text.contains("norm_topk_prob"));  // Qwen3.5 always renormalises
  const json& rope = text["rope_parameters"];
  EXPECT_EQ(rope["rope_type"], "default");
  EXPECT_DOUBLE_EQ(rope["rope_theta"].get<double>(), 1e7);
  EXPECT_DOUBLE_EQ(rope["partial_rotary_factor"].get<double>(), 0.25);
  EXPECT_EQ(rope["mrope_section"], json::array({1, 1, 0}));  // sums to 4 rotary dims / 2
  EXPECT_EQ(rope["mrope_interleaved"], true);
  // The synthetic tokenizer's eos, with the text model's keys.
  EXPECT_EQ(text["eos_token_id"], kV - 1);
  EXPECT_TRUE(fs::exists(dir + "/tokenizer.json"));
  EXPECT_EQ(config["keel_synthetic_preset"], "tiny-qwen3.5");
}

TEST(GenModelHybrid, Qwen3NextConfigJson) {
  std::string dir = generate("tiny-qwen3-next", 0, "model");
  json config = json::parse(read_text(dir + "/config.json"));
  EXPECT_EQ(config["architectures"], json::array({"Qwen3NextForCausalLM"}));
  EXPECT_EQ(config["model_type"], "qwen3_next");
  EXPECT_FALSE(config.contains("text_config"));
  const std::map<std::string, int64_t> ints = {{"vocab_size", kV},
                                               {"hidden_size", kH},
                                               {"num_hidden_layers", 4},
                                               {"num_attention_heads", kNH},
                                               {"num_key_value_heads", kNKV},
                                               {"head_dim", kD},
                                               {"full_attention_interval", 2},
                                               {"linear_conv_kernel_dim", kK},
                                               {"linear_key_head_dim", kDK},
                                               {"linear_value_head_dim", kDV},
                                               {"linear_num_key_heads", kHK},
                                               {"linear_num_value_heads", kHV},
                                               {"num_experts", kE},
                                               {"num_experts_per_tok", 2},
                                               {"moe_intermediate_size", kI},
                                               {"shared_expert_intermediate_size", kIs},
                                               {"decoder_sparse_step", 1}};
  for (const auto& [key, value] : ints) EXPECT_EQ(config.value(key, int64_t{-1}), value) << key;
  EXPECT_EQ(config["layer_types"], json::array({"linear_attention", "full_attention",
                                                "linear_attention", "full_attention"}));
  EXPECT_EQ(config["mlp_only_layers"], json::array());
  EXPECT_EQ(config["norm_topk_prob"], true);
  EXPECT_DOUBLE_EQ(config["partial_rotary_factor"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(config["rope_theta"].get<double>(), 1e7);
  EXPECT_EQ(config["torch_dtype"], "bfloat16");
  EXPECT_EQ(config["tie_word_embeddings"], false);
  EXPECT_EQ(config["eos_token_id"], kV - 1);
}

TEST(GenModelHybrid, ReproducibleFromPresetAndSeed) {
  for (const std::string name : {"tiny-qwen3.5", "tiny-qwen3-next"}) {
    std::string a = generate(name, 7, name + "-a");
    std::string b = generate(name, 7, name + "-b");
    std::string c = generate(name, 8, name + "-c");
    for (const char* file : {"/model.safetensors", "/config.json", "/tokenizer.json"})
      EXPECT_EQ(read_text(a + file), read_text(b + file)) << name << file;
    EXPECT_NE(read_text(a + "/model.safetensors"), read_text(c + "/model.safetensors")) << name;
    // Sharding moves tensors between files, never changes their bytes.
    std::string sharded = generate(name, 7, name + "-sharded", 64 * 1024);
    ASSERT_TRUE(fs::exists(sharded + "/model.safetensors.index.json")) << name;
    Checkpoint whole = Checkpoint::open(a), split = Checkpoint::open(sharded);
    ASSERT_EQ(whole.tensor_names(), split.tensor_names()) << name;
    for (const std::string& tensor : whole.tensor_names()) {
      const TensorView& x = whole.get(tensor);
      const TensorView& y = split.get(tensor);
      ASSERT_EQ(x.nbytes, y.nbytes) << tensor;
      EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes), 0) << tensor;
    }
  }
}

TEST(GenModelHybrid, NumParametersCountsTheWrittenTensors) {
  for (const std::string name : {"tiny-qwen3.5", "tiny-qwen3-next"})
    EXPECT_EQ(preset(name).num_parameters(), written_elements(generate(name, 0, name))) << name;
  // small-qwen3.5 (1 GB to write) against the count worked out by hand:
  //   embeddings + lm_head 2 x 32000 x 1024 + final norm 1024
  //   + 16 x (MoE 20,481,024 + 2 norms 2,048) + 12 GDN x 8,437,920 + 4 attention x 6,816,000.
  EXPECT_EQ(preset("small-qwen3.5").num_parameters(), 521785216);
  ModelPreset small = preset("small-qwen3.5");
  EXPECT_EQ(small.layer_types.size(), 16u);
  for (size_t i = 0; i < small.layer_types.size(); ++i)
    EXPECT_EQ(small.layer_types[i], (i + 1) % 4 == 0 ? "full_attention" : "linear_attention") << i;
}

TEST(GenModelHybrid, ValueConventions) {
  Checkpoint checkpoint = Checkpoint::open(generate("tiny-qwen3.5", 3, "model"));
  const std::string layer0 = "model.language_model.layers.0.";
  // Zero-centred norms (effective weight 1 + w) hold values around 0 ...
  for (const std::string& name :
       {layer0 + "input_layernorm.weight", layer0 + "post_attention_layernorm.weight",
        std::string("model.language_model.layers.1.self_attn.q_norm.weight"),
        std::string("model.language_model.norm.weight")}) {
    std::vector<float> v = values(checkpoint.get(name));
    EXPECT_LT(std::abs(mean(v)), 0.1) << name;
    for (float x : v) EXPECT_LT(std::abs(x), 0.2f) << name;
  }
  // ... the gated output norm (plain w) around 1.
  for (float x : values(checkpoint.get(layer0 + "linear_attn.norm.weight")))
    EXPECT_NEAR(x, 1.0f, 0.1f);
  // A_log = log U[1, 16); dt_bias around -1.5.
  for (float x : values(checkpoint.get(layer0 + "linear_attn.A_log"))) {
    EXPECT_GE(x, -0.01f);
    EXPECT_LE(x, std::log(16.0f) + 0.02f);
  }
  for (float x : values(checkpoint.get(layer0 + "linear_attn.dt_bias")))
    EXPECT_NEAR(x, -1.5f, 0.2f);
}

// Writes `body` as a preset file and expects load_model_preset to fail naming `needle`.
void expect_refused(const std::string& body, const std::string& needle) {
  std::string path = scratch_dir("bad") + "/bad.yaml";
  std::ofstream(path) << body;
  try {
    load_model_preset(path);
    ADD_FAILURE() << "accepted:\n" << body;
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
  }
}

TEST(GenModelHybrid, BadPresetsAreRefused) {
  const std::string base =
      "architecture: Qwen3_5MoeForConditionalGeneration\n"
      "vocab_size: 256\nhidden_size: 64\nnum_attention_heads: 8\nnum_key_value_heads: 2\n"
      "head_dim: 16\nnum_experts: 8\nnum_experts_per_tok: 2\nmoe_intermediate_size: 32\n"
      "shared_expert_intermediate_size: 32\nlinear_num_key_heads: 4\n"
      "linear_num_value_heads: 8\nlinear_key_head_dim: 16\nlinear_value_head_dim: 12\n";
  // The base itself loads (interval form).
  {
    std::string path = scratch_dir("good") + "/good.yaml";
    std::ofstream(path) << base << "num_hidden_layers: 4\nfull_attention_interval: 2\n";
    EXPECT_EQ(load_model_preset(path).layer_types.size(), 4u);
  }
  expect_refused(base + "num_hidden_layers: 4\nfull_attention_interval: 2\nlinear_heads: 3\n",
                 "unknown key 'linear_heads'");
  expect_refused(base + "num_hidden_layers: 2\nlayer_types: [linear_attention]\n",
                 "layer_types has 1 entries for 2 layers");
  expect_refused(base + "num_hidden_layers: 2\nlayer_types: [linear_attention, mamba]\n",
                 "'mamba'");
  expect_refused(base +
                     "num_hidden_layers: 2\nfull_attention_interval: 2\n"
                     "layer_types: [linear_attention, full_attention]\n",
                 "not both");
  expect_refused(base + "num_hidden_layers: 2\n", "full_attention_interval");
  expect_refused(base +
                     "num_hidden_layers: 2\nfull_attention_interval: 2\n"
                     "partial_rotary_factor: 0.3\n",
                 "partial_rotary_factor");
  expect_refused(base +
                     "num_hidden_layers: 2\nfull_attention_interval: 2\n"
                     "mrope_section: [2, 1, 0]\n",
                 "mrope_section");
  expect_refused(base +
                     "num_hidden_layers: 2\nfull_attention_interval: 2\n"
                     "attn_output_gate: false\n",
                 "attn_output_gate");
  expect_refused(base +
                     "num_hidden_layers: 2\nfull_attention_interval: 2\n"
                     "norm_topk_prob: false\n",
                 "norm_topk_prob");
  // Gated DeltaNet keys mean nothing for the other architectures.
  expect_refused(
      "architecture: Qwen3MoeForCausalLM\nvocab_size: 256\nhidden_size: 64\n"
      "num_hidden_layers: 2\nnum_attention_heads: 8\nnum_key_value_heads: 2\nnum_experts: 8\n"
      "num_experts_per_tok: 2\nmoe_intermediate_size: 32\nfull_attention_interval: 2\n",
      "only for Qwen3_5MoeForConditionalGeneration");
}

}  // namespace
}  // namespace keel
