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

// Qwen3.5-397B-A17B's published config (vision-language wrapper, text settings nested).
TEST(ModelConfig, PublishedQwen3_5MoeVisionLanguageLayout) {
  ModelConfig config = ModelConfig::parse(R"({
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
    "image_token_id": 248056, "tie_word_embeddings": false,
    "vision_config": {"depth": 27, "hidden_size": 1152, "model_type": "qwen3_5_moe"},
    "text_config": {
      "model_type": "qwen3_5_moe_text", "hidden_size": 4096, "num_hidden_layers": 60,
      "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
      "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
      "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
      "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 1024,
      "shared_expert_intermediate_size": 1024, "vocab_size": 248320, "rms_norm_eps": 1e-06,
      "attn_output_gate": true, "mamba_ssm_dtype": "float32", "mtp_num_hidden_layers": 1,
      "mtp_use_dedicated_embeddings": false, "max_position_embeddings": 262144,
      "dtype": "bfloat16", "eos_token_id": 248044, "router_aux_loss_coef": 0.001,
      "rope_parameters": {"mrope_interleaved": true, "mrope_section": [11, 11, 10],
                          "partial_rotary_factor": 0.25, "rope_theta": 10000000,
                          "rope_type": "default"}}})",
                                          "qwen3.5.json");
  EXPECT_EQ(config.architecture, Architecture::kQwen3_5Moe);
  EXPECT_EQ(config.weight_prefix, "model.language_model.");
  EXPECT_TRUE(config.has_vision_tower);
  EXPECT_EQ(config.num_layers, 60);
  EXPECT_EQ(config.num_linear_layers(), 45);
  EXPECT_EQ(config.num_attention_layers(), 15);
  EXPECT_EQ(config.layer_kinds[3], LayerKind::kFullAttention);
  EXPECT_EQ(config.layer_kinds[4], LayerKind::kLinearAttention);
  EXPECT_EQ(config.rotary_dim, 64);
  EXPECT_DOUBLE_EQ(config.rope_theta, 1e7);
  EXPECT_TRUE(config.norm_topk_prob);  // no key: Qwen3.5 always renormalises
  EXPECT_TRUE(config.zero_centered_norm);
  EXPECT_TRUE(config.attn_output_gate);
  EXPECT_TRUE(config.qk_norm);
  EXPECT_EQ(config.linear_conv_dim(), 2 * 16 * 128 + 64 * 128);
  EXPECT_EQ(config.shared_expert_intermediate_size, 1024);
  EXPECT_EQ(config.dtype, DType::kBF16);
  EXPECT_EQ(config.num_moe_layers(), 60);
}

TEST(ModelConfig, Qwen3NextWithAnIrregularLayerPattern) {
  ModelConfig config = ModelConfig::parse(R"({
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 64,
    "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24,
    "layer_types": ["linear_attention", "full_attention", "linear_attention",
                    "linear_attention", "full_attention"],
    "linear_num_key_heads": 4, "linear_num_value_heads": 12, "linear_key_head_dim": 20,
    "linear_value_head_dim": 12, "num_experts": 12, "num_experts_per_tok": 3,
    "moe_intermediate_size": 20, "shared_expert_intermediate_size": 28, "norm_topk_prob": false,
    "vocab_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": [2],
    "intermediate_size": 40, "partial_rotary_factor": 0.25, "rope_theta": 10000})",
                                          "next.json");
  EXPECT_EQ(config.architecture, Architecture::kQwen3Next);
  EXPECT_EQ(config.weight_prefix, "model.");
  EXPECT_EQ(config.layer_kinds,
            (std::vector<LayerKind>{LayerKind::kLinearAttention, LayerKind::kFullAttention,
                                    LayerKind::kLinearAttention, LayerKind::kLinearAttention,
                                    LayerKind::kFullAttention}));
  EXPECT_FALSE(config.norm_topk_prob);
  EXPECT_EQ(config.rotary_dim, 6);
  EXPECT_EQ(config.layer_is_moe, (std::vector<bool>{true, true, false, true, true}));
  EXPECT_EQ(config.linear_conv_dim(), 2 * 4 * 20 + 12 * 12);
}

// A setting that changes the model and that keel does not implement is refused by name.
TEST(ModelConfig, UnimplementedSettingsAreRefusedNotIgnored) {
  EXPECT_NE(error_of(R"({
    "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 64,
    "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
    "sliding_window": 4096})")
                .find("sliding_window 4096 is not supported"),
            std::string::npos);
  const std::string hybrid = R"("architectures": ["Qwen3NextForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8)";
  EXPECT_NE(error_of("{" + hybrid + R"(, "mamba_ssm_dtype": "bfloat16"})")
                .find("mamba_ssm_dtype 'bfloat16' is not supported"),
            std::string::npos);
  EXPECT_NE(error_of("{" + hybrid + R"(, "attention_bias": true})").find("attention_bias"),
            std::string::npos);
  EXPECT_NE(
      error_of("{" + hybrid + R"(, "layer_types": ["linear_attention", "sliding_attention"]})")
          .find("layer_types entry 'sliding_attention'"),
      std::string::npos);
  EXPECT_NE(error_of("{" + hybrid + R"(, "layer_types": ["linear_attention"]})")
                .find("layer_types must be a list of num_hidden_layers"),
            std::string::npos);
  EXPECT_NE(error_of("{" + hybrid + R"(, "linear_num_key_heads": 3, "linear_num_value_heads": 8})")
                .find("not a multiple of linear_num_key_heads"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"architectures": ["Qwen3_5MoeForConditionalGeneration"]})")
                .find("needs a 'text_config' object"),
            std::string::npos);
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
