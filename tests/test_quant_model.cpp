// Quantized checkpoints end to end on the CPU: the determinism contract holds for every format
// (a request's bits do not depend on its batch-mates, chunking or TP-rank count under
// fixed_order), W4A4 really changes the numerics, and broken quantized checkpoints are refused
// with the tensor or key named.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/gen_quant.h"
#include "runtime/model/safetensors.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

struct Case {
  std::string preset;
  std::string format;
  // FP8 block scales span 128 input columns: the tiny presets' row-parallel splits are not
  // aligned to them, and keel refuses such splits (test_quant_parity), so FP8 runs at TP=1.
  int max_tp = 2;
};

std::string make_checkpoint(const Case& c, const std::string& tag) {
  GenModelOptions options;
  options.seed = 5;
  options.quant.format = parse_quant_format(c.format);
  const std::string dir = std::string(KEEL_BINARY_DIR) + "/test-quant-model/" + tag;
  fs::remove_all(dir);
  generate_model(load_model_preset(find_model_preset(c.preset)), options, dir);
  return dir;
}

EngineOptions fixed_order(int tp, Nvfp4Activations activations = Nvfp4Activations::kFp32) {
  EngineOptions options;
  options.tp_size = tp;
  options.reduce = comm::ReduceAlgo::kFixedOrder;
  options.placement.kind = PlacementKind::kRoundRobin;
  options.nvfp4_activations = activations;
  return options;
}

const std::vector<int32_t> kPrompt = {5, 17, 3, 42, 8, 11, 2};

GenerateResult run(Engine& engine, std::vector<std::vector<int32_t>> prompts) {
  GenerateRequest request;
  request.prompts = std::move(prompts);
  request.max_new_tokens = 6;
  return engine.generate(request);
}

class QuantModel : public ::testing::TestWithParam<Case> {};

// Alone, amid three batch-mates of other lengths, and (TP=2) on two ranks amid the same mates:
// the prompt's tokens and every step's logit bits are the same in the first two; TP=2 has its
// own fixed order, identical with and without batch-mates.
TEST_P(QuantModel, BatchInvariantUnderFixedOrder) {
  const Case& c = GetParam();
  const std::string dir = make_checkpoint(c, c.preset + "-" + c.format);
  const std::vector<std::vector<int32_t>> mates = {
      {9, 9, 1}, {4, 6, 8, 10, 12, 14, 16, 18, 20}, {7}};
  for (int tp = 1; tp <= c.max_tp; tp *= 2) {
    Engine engine(dir, fixed_order(tp));
    ASSERT_EQ(engine.config().quant.method == QuantMethod::kNone, c.format == "none");
    const GenerateResult alone = run(engine, {kPrompt});
    std::vector<std::vector<int32_t>> batch = {kPrompt};
    batch.insert(batch.end(), mates.begin(), mates.end());
    const GenerateResult batched = run(engine, batch);
    EXPECT_EQ(alone.logits_digest, batched.logits_digest) << c.format << " tp=" << tp;
    EXPECT_EQ(alone.tokens.front(), batched.tokens.front()) << c.format << " tp=" << tp;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantModel,
                         ::testing::Values(Case{"tiny", "nvfp4"}, Case{"tiny", "nvfp4-ct"},
                                           Case{"tiny", "fp8", 1}, Case{"tiny", "awq"},
                                           Case{"tiny", "gptq"}, Case{"tiny-qwen2", "mxfp4"},
                                           Case{"tiny-qwen3.5", "nvfp4"}),
                         [](const auto& info) {
                           std::string name = info.param.preset + "_" + info.param.format;
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

// W4A4 is a different computation (activations quantized), batch-invariant in its own right;
// refused for checkpoints that are not NVFP4.
TEST(QuantModelW4a4, ChangesTheNumericsAndStaysBatchInvariant) {
  const std::string dir = make_checkpoint({"tiny", "nvfp4"}, "w4a4");
  Engine weight_only(dir, fixed_order(1));
  Engine w4a4(dir, fixed_order(1, Nvfp4Activations::kW4A4));
  const GenerateResult a = run(weight_only, {kPrompt});
  const GenerateResult b = run(w4a4, {kPrompt});
  EXPECT_NE(a.logits_digest, b.logits_digest);
  const GenerateResult b_batched = run(w4a4, {kPrompt, {1, 2, 3, 4, 5, 6, 7, 8, 9}});
  EXPECT_EQ(b.logits_digest, b_batched.logits_digest);

  const std::string fp8 = make_checkpoint({"tiny", "fp8"}, "w4a4-fp8");
  try {
    Engine refused(fp8, fixed_order(1, Nvfp4Activations::kW4A4));
    FAIL() << "w4a4 accepted for an FP8 checkpoint";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("needs an NVFP4 checkpoint"), std::string::npos)
        << error.what();
  }
}

// Loading `dir` fails with a message containing `needle`.
void expect_load_error(const std::string& dir, const std::string& needle) {
  try {
    Engine engine(dir, fixed_order(1));
    ADD_FAILURE() << "loaded " << dir;
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
  }
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream file(path);
  return nlohmann::json::parse(file);
}

void write_json(const std::string& path, const nlohmann::json& value) {
  std::ofstream(path) << value.dump(2);
}

// Rewrites model.safetensors with `edit` applied to its tensors.
template <typename Edit>
void rewrite_tensors(const std::string& dir, Edit edit) {
  const std::string path = dir + "/model.safetensors";
  std::vector<TensorToWrite> tensors;
  {
    auto file = SafetensorsFile::open(path);
    for (const auto& [name, view] : file->tensors()) {
      TensorToWrite tensor;
      tensor.name = name;
      tensor.raw_type = view.type;
      tensor.shape = view.shape;
      tensor.bytes.assign(view.data, view.data + view.nbytes);
      if (edit(tensor)) tensors.push_back(std::move(tensor));
    }
  }
  write_safetensors(path, tensors);
}

TEST(QuantModelErrors, BrokenQuantizedCheckpointsAreRefusedByName) {
  {  // a config key keel does not implement
    const std::string dir = make_checkpoint({"tiny", "awq"}, "bad-key");
    nlohmann::json config = read_json(dir + "/config.json");
    config["quantization_config"]["exllama_config"] = {{"version", 2}};
    write_json(dir + "/config.json", config);
    expect_load_error(dir, "'exllama_config'");
  }
  {  // quantized tensors without any quantization config
    const std::string dir = make_checkpoint({"tiny", "fp8"}, "no-config");
    nlohmann::json config = read_json(dir + "/config.json");
    config.erase("quantization_config");
    write_json(dir + "/config.json", config);
    expect_load_error(dir, "declares no quantization");
  }
  {  // a missing global scale
    const std::string dir = make_checkpoint({"tiny", "nvfp4"}, "no-scale2");
    std::string dropped;
    rewrite_tensors(dir, [&](const TensorToWrite& tensor) {
      if (dropped.empty() && tensor.name.find("weight_scale_2") != std::string::npos) {
        dropped = tensor.name;
        return false;
      }
      return true;
    });
    ASSERT_FALSE(dropped.empty());
    expect_load_error(dir, dropped);
  }
  {  // block scales of the wrong shape
    const std::string dir = make_checkpoint({"tiny", "fp8"}, "bad-shape");
    std::string changed;
    rewrite_tensors(dir, [&](TensorToWrite& tensor) {
      if (changed.empty() && tensor.name.find("weight_scale_inv") != std::string::npos) {
        changed = tensor.name;
        tensor.shape.back() += 1;  // one block column too many, data to match
        tensor.bytes.resize(tensor.bytes.size() / tensor.shape.front() / (tensor.shape.back() - 1) *
                            tensor.shape.front() * tensor.shape.back());
      }
      return true;
    });
    ASSERT_FALSE(changed.empty());
    expect_load_error(dir, changed);
  }
  {  // a method/tensor mismatch: AWQ tensors under a GPTQ config
    const std::string dir = make_checkpoint({"tiny", "awq"}, "wrong-method");
    nlohmann::json config = read_json(dir + "/config.json");
    config["quantization_config"] = {{"quant_method", "gptq"},
                                     {"bits", 4},
                                     {"group_size", config["quantization_config"]["group_size"]}};
    write_json(dir + "/config.json", config);
    expect_load_error(dir, "qweight");
  }
}

}  // namespace
}  // namespace keel
