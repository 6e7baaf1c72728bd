// HF config.json parsing: the field variants published checkpoints and transformers 5 write,
// and a clear error for everything keel cannot run.
#include <gtest/gtest.h>

#include "kernels/base/check.h"
#include "runtime/engine/deployment.h"
#include "runtime/model/model_config.h"

namespace keel {
namespace {

std::string error_of(const std::string& json) {
  try {
    ModelConfig::parse(json, "test/config.json");
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(ModelConfig, PublishedQwen3MoeStyle) {
  // As Qwen/Qwen3-30B-A3B's config.json: top-level rope_theta, torch_dtype, num_experts.
  ModelConfig config = ModelConfig::parse(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "intermediate_size": 6144, "norm_topk_prob": true, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "torch_dtype": "bfloat16", "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": false, "max_position_embeddings": 40960,
    "hidden_act": "silu", "rope_scaling": null})",
                                          "qwen3.json");
  EXPECT_EQ(config.architecture, Architecture::kQwen3Moe);
  EXPECT_EQ(config.num_experts, 128);
  EXPECT_EQ(config.top_k, 8);
  EXPECT_EQ(config.head_dim, 128);
  EXPECT_EQ(config.rotary_dim, 128);
  EXPECT_DOUBLE_EQ(config.rope_theta, 1e6);
  EXPECT_TRUE(config.qk_norm);
  EXPECT_TRUE(config.norm_topk_prob);
  EXPECT_EQ(config.dtype, DType::kBF16);
  EXPECT_EQ(config.num_moe_layers(), 48);
}

TEST(ModelConfig, Transformers5StyleRopeParametersAndLocalExperts) {
  ModelConfig config = ModelConfig::parse(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
    "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "intermediate_size": 96, "mlp_only_layers": [1], "dtype": "float32",
    "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default",
                        "partial_rotary_factor": 0.25}})",
                                          "v5.json");
  EXPECT_EQ(config.num_experts, 8);
  EXPECT_DOUBLE_EQ(config.rope_theta, 5000.0);
  EXPECT_EQ(config.rotary_dim, 4);
  EXPECT_EQ(config.layer_is_moe, (std::vector<bool>{true, false, true}));
  EXPECT_EQ(config.dtype, DType::kF32);
}

TEST(ModelConfig, MixtralAndQwen2) {
  ModelConfig mixtral = ModelConfig::parse(R"({
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 14336,
    "rope_theta": 1e6, "sliding_window": null, "tie_word_embeddings": false})",
                                           "mixtral.json");
  EXPECT_EQ(mixtral.head_dim, 128);
  EXPECT_EQ(mixtral.moe_intermediate_size, 14336);
  EXPECT_TRUE(mixtral.norm_topk_prob);  // Mixtral always renormalises its top-2
  EXPECT_FALSE(mixtral.qk_norm);

  ModelConfig qwen2 = ModelConfig::parse(R"({
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
    "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "intermediate_size": 5632,
    "norm_topk_prob": false, "decoder_sparse_step": 2})",
                                         "qwen2.json");
  EXPECT_EQ(qwen2.shared_expert_intermediate_size, 5632);
  EXPECT_TRUE(qwen2.attention_bias);
  EXPECT_FALSE(qwen2.norm_topk_prob);
  // decoder_sparse_step 2: layers 1, 3, 5, ... are MoE.
  EXPECT_FALSE(qwen2.layer_is_moe[0]);
  EXPECT_TRUE(qwen2.layer_is_moe[1]);
}

TEST(ModelConfig, ErrorsNameTheProblem) {
  EXPECT_NE(error_of(R"({"architectures": ["LlamaForCausalLM"]})")
                .find("unsupported architecture 'LlamaForCausalLM'"),
            std::string::npos);
  EXPECT_NE(error_of("{not json").find("test/config.json: not a valid JSON object"),
            std::string::npos);
  const std::string base = R"("architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
      "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 64, "num_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 8)";
  EXPECT_NE(error_of("{" + base + "}").find("missing required field 'hidden_size'"),
            std::string::npos);
  EXPECT_NE(
      error_of("{" + base + R"(, "hidden_size": "64"})").find("'hidden_size' must be an integer"),
      std::string::npos);
  EXPECT_NE(error_of("{" + base +
                     R"(, "hidden_size": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4}})")
                .find("unsupported rope_type 'yarn'"),
            std::string::npos);
  EXPECT_NE(error_of("{" + base + R"(, "hidden_size": 64, "num_experts_per_tok": 9})")
                .find("num_experts_per_tok"),
            std::string::npos);
  EXPECT_NE(error_of("{" + base + R"(, "hidden_size": 64, "hidden_act": "gelu"})")
                .find("hidden_act 'gelu'"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
      "num_attention_heads": 6, "num_key_value_heads": 4, "vocab_size": 64, "num_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 8, "hidden_size": 48})")
                .find("not a multiple of num_key_value_heads"),
            std::string::npos);
}

}  // namespace
}  // namespace keel
