// Quantization configs: what keel implements parses, everything else is refused by name.
#include <gtest/gtest.h>

#include <string>

#include "kernels/base/check.h"
#include "runtime/model/quant_config.h"

namespace keel {
namespace {

QuantConfig parse(const std::string& text, bool hf_quant_config = false) {
  return parse_quant_config(text, "config.json quantization_config", hf_quant_config);
}

// Parsing `text` fails with a message containing every one of `needles`.
void expect_refused(const std::string& text, std::initializer_list<std::string> needles,
                    bool hf_quant_config = false) {
  try {
    parse(text, hf_quant_config);
    ADD_FAILURE() << "accepted: " << text;
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string& needle : needles)
      EXPECT_NE(message.find(needle), std::string::npos) << message << "\nmissing: " << needle;
  }
}

TEST(QuantConfig, PublishedConfigsParse) {
  QuantConfig modelopt = parse(R"({"quant_method":"modelopt","quant_algo":"NVFP4",
      "config_groups":{"group_0":{"targets":["Linear"],"weights":{"num_bits":4,"type":"float",
      "group_size":16,"dynamic":false},"input_activations":{"num_bits":4,"type":"float",
      "group_size":16,"dynamic":false}}},"ignore":["lm_head","*.self_attn*"],
      "kv_cache_scheme":{"num_bits":8,"type":"float","dynamic":false},"producer":{"name":"modelopt"}})");
  EXPECT_EQ(modelopt.method, QuantMethod::kModelOptNvfp4);
  EXPECT_TRUE(modelopt.kv_cache_fp8);
  EXPECT_EQ(modelopt.not_quantized.size(), 2u);

  QuantConfig legacy = parse(R"({"producer":{"name":"modelopt","version":"0.33.0"},
      "quantization":{"quant_algo":"NVFP4","kv_cache_quant_algo":null,"group_size":16,
      "exclude_modules":["lm_head","model.layers.0.mlp.gate"]}})",
                             /*hf_quant_config=*/true);
  EXPECT_EQ(legacy.method, QuantMethod::kModelOptNvfp4);
  EXPECT_FALSE(legacy.kv_cache_fp8);

  QuantConfig ct = parse(R"({"quant_method":"compressed-tensors","format":"nvfp4-pack-quantized",
      "config_groups":{"group_0":{"targets":["Linear"],"weights":{"num_bits":4,"type":"float",
      "strategy":"tensor_group","group_size":16,"symmetric":true,"dynamic":false},
      "input_activations":{"num_bits":4,"type":"float","strategy":"tensor_group","group_size":16,
      "dynamic":"local"}}},"ignore":["lm_head"],"kv_cache_scheme":null,
      "quantization_status":"compressed"})");
  EXPECT_EQ(ct.method, QuantMethod::kCompressedNvfp4);

  QuantConfig fp8 = parse(R"({"quant_method":"fp8","fmt":"e4m3","activation_scheme":"dynamic",
      "weight_block_size":[128,128],"modules_to_not_convert":["lm_head"]})");
  EXPECT_EQ(fp8.method, QuantMethod::kFp8Block);

  QuantConfig awq = parse(R"({"quant_method":"awq","bits":4,"group_size":128,"zero_point":true,
      "version":"gemm","modules_to_not_convert":null})");
  EXPECT_EQ(awq.method, QuantMethod::kAwq);
  EXPECT_EQ(awq.group_size, 128);

  QuantConfig gptq = parse(R"({"quant_method":"gptq","bits":4,"group_size":32,"desc_act":true,
      "sym":true,"checkpoint_format":"gptq","damp_percent":0.01})");
  EXPECT_EQ(gptq.method, QuantMethod::kGptq);
  EXPECT_TRUE(gptq.desc_act);
  EXPECT_FALSE(gptq.gptq_v2);
  EXPECT_TRUE(parse(R"({"quant_method":"gptq","bits":4,"group_size":32,
      "checkpoint_format":"gptq_v2"})")
                  .gptq_v2);
  // GPTQModel's dynamic "-:" exclusions and modules_to_not_convert both count.
  QuantConfig dynamic = parse(R"({"quant_method":"gptq","bits":4,"group_size":32,
      "dynamic":{"-:^model\\.layers\\.0\\.self_attn\\.q_proj$":{}},
      "modules_to_not_convert":["lm_head"]})");
  EXPECT_TRUE(module_matches("model.layers.0.self_attn.q_proj", dynamic.not_quantized));
  EXPECT_FALSE(module_matches("model.layers.1.self_attn.q_proj", dynamic.not_quantized));
  EXPECT_TRUE(module_matches("lm_head", dynamic.not_quantized));

  QuantConfig mxfp4 = parse(R"({"quant_method":"mxfp4","modules_to_not_convert":["lm_head"]})");
  EXPECT_EQ(mxfp4.method, QuantMethod::kMxfp4);
}

TEST(QuantConfig, AnythingElseIsRefusedByName) {
  expect_refused(R"({"quant_method":"bitsandbytes","load_in_4bit":true})",
                 {"quant_method 'bitsandbytes'", "not implemented"});
  expect_refused(R"({"quant_method":"awq","bits":4,"group_size":128,"zero_point":true,
      "version":"gemm","exllama_config":{"version":2}})",
                 {"'exllama_config'", "AWQ"});
  expect_refused(R"({"quant_method":"awq","bits":4,"group_size":128,"zero_point":true,
      "version":"gemv"})",
                 {"version 'gemv'"});
  expect_refused(R"({"quant_method":"gptq","bits":8,"group_size":128})", {"'bits'", "8"});
  expect_refused(R"({"quant_method":"gptq","bits":4,"group_size":-1})", {"group_size -1"});
  expect_refused(
      R"({"quant_method":"gptq","bits":4,"group_size":128,"checkpoint_format":"marlin"})",
      {"checkpoint_format 'marlin'"});
  expect_refused(R"({"quant_method":"fp8","fmt":"e4m3","weight_block_size":[64,64]})",
                 {"'weight_block_size'", "[64,64]", "[128,128]"});
  expect_refused(
      R"({"quant_method":"fp8","weight_block_size":[128,128],"activation_scheme":"static"})",
      {"activation_scheme 'static'"});
  expect_refused(R"({"quant_method":"modelopt","quant_algo":"FP8"})", {"quant_algo 'FP8'"});
  expect_refused(R"({"quant_method":"modelopt","quant_algo":"NVFP4","config_groups":{"g":{
      "weights":{"num_bits":4,"type":"float","group_size":32}}}})",
                 {"'group_size'", "32"});
  expect_refused(R"({"quant_method":"compressed-tensors","format":"float-quantized"})",
                 {"'format'", "float-quantized"});
  expect_refused(
      R"({"producer":{"name":"modelopt"},"quantization":{"quant_algo":"MIXED_PRECISION"}})",
      {"MIXED_PRECISION"}, /*hf_quant_config=*/true);
  expect_refused(R"({"quant_method":"modelopt","quant_algo":"NVFP4","kv_cache_quant_algo":"INT8"})",
                 {"kv_cache_quant_algo 'INT8'"});
  expect_refused(R"({"quant_method":"mxfp4","dequantize":true})", {"'dequantize'"});
}

TEST(QuantConfig, ConfigJsonAndHfQuantConfigMustAgree) {
  QuantConfig modelopt = parse(R"({"quant_method":"modelopt","quant_algo":"NVFP4"})");
  QuantConfig fp8 = parse(R"({"quant_method":"fp8","weight_block_size":[128,128]})");
  EXPECT_THROW(merge_quant_configs(fp8, modelopt), Error);
  EXPECT_EQ(merge_quant_configs(QuantConfig{}, modelopt).method, QuantMethod::kModelOptNvfp4);
}

TEST(QuantConfig, ModulePatterns) {
  const std::vector<std::string> patterns = {"lm_head", "*.self_attn*", "re:.*shared_expert.*",
                                             "model.layers.0.mlp.gate"};
  EXPECT_TRUE(module_matches("lm_head", patterns));
  EXPECT_TRUE(module_matches("model.layers.3.self_attn.q_proj", patterns));
  EXPECT_TRUE(module_matches("model.layers.3.mlp.shared_expert.up_proj", patterns));
  EXPECT_TRUE(module_matches("model.layers.0.mlp.gate", patterns));
  EXPECT_FALSE(module_matches("model.layers.1.mlp.gate", patterns));
  EXPECT_FALSE(module_matches("model.layers.3.mlp.experts.0.up_proj", patterns));
}

}  // namespace
}  // namespace keel
