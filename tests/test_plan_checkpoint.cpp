// `keel plan --model DIR`: the planner reads a checkpoint's config.json through the loader's
// ModelConfig and its counts agree exactly with what the loader holds, on synthetic checkpoints
// written by gen-model (Qwen3-MoE, Qwen2-MoE fp32 with q/k/v biases, Mixtral fp16 tied, Qwen3.5-MoE
// in the published VL layout, Qwen3-Next):
//  - parameters: the planner's count equals the elements of the checkpoint's text tensors;
//  - weight bytes per rank at TP 1, 2, 4 (`--quant none`: the checkpoint's dtype, keel's layout:
//    fp32 norms/biases/small GDN tensors, replicated embeddings, padded lm_head; model_spec.h)
//    equal Engine::weight_bytes_per_rank() (rank 0; every preset's experts split evenly);
//  - KV bytes per token for every kv_cache_dtype (fp32, bf16, fp8_e4m3, and auto against the
//    planner's auto rule) and recurrent-state bytes per sequence at TP 1, 2, 4 equal the
//    engine's kv_block_bytes / block_size and state_slot_bytes;
//  - `keel plan --model DIR` prints the plan (exit 0) and refuses an unsupported architecture
//    with the loader's message (exit 1).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/cli/plan_checkpoint.h"
#include "runtime/engine/engine.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/gen_model.h"
#include "runtime/tools/planning/hardware_spec.h"
#include "runtime/tools/planning/memory_model.h"
#include "runtime/tools/planning/quant.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

// "NAME:vocab=V": the preset with another vocabulary (250: TP 4 pads lm_head to 4 x 63 rows).
std::string model_dir(const std::string& param) {
  static const std::string root =
      std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint/pid-" + std::to_string(::getpid());
  const size_t colon = param.find(":vocab=");
  const std::string preset = param.substr(0, colon);
  std::string name = param;
  std::replace(name.begin(), name.end(), ':', '-');
  std::replace(name.begin(), name.end(), '=', '-');
  const std::string dir = root + "/" + name;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 2;
    ModelPreset model = load_model_preset(find_model_preset(preset));
    if (colon != std::string::npos) model.vocab_size = std::stoll(param.substr(colon + 7));
    generate_model(model, options, dir);
  }
  return dir;
}

// The plan of keel's own layout: weights as stored (no quantization), KV in `kv_dtype`.
planning::MemoryPlan plan_for(const planning::ModelSpec& spec, int tp,
                              const std::string& kv_dtype = "fp32") {
  const planning::HardwareSpec hardware = planning::load_hardware_spec(
      std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml");
  planning::PlanOptions options;
  options.kv_dtype = kv_dtype;
  options.context = 64;
  return planning::plan_memory(spec, hardware, planning::quant_as_stored(spec.dtype), tp, options);
}

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

RunResult run_keel(const std::string& args) {
  const std::string command = std::string(KEEL_BINARY_DIR) + "/bin/keel " + args + " 2>&1";
  RunResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t bytes;
  while ((bytes = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, bytes);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

class PlanCheckpoint : public ::testing::TestWithParam<std::string> {
 protected:
  static void TearDownTestSuite() {
    std::error_code ignored;
    fs::remove_all(
        std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint/pid-" + std::to_string(::getpid()),
        ignored);
  }
};

TEST_P(PlanCheckpoint, ParameterCountEqualsTheCheckpointsTensors) {
  const std::string dir = model_dir(GetParam());
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  const Checkpoint checkpoint = Checkpoint::open(dir);
  double elements = 0;
  for (const std::string& name : checkpoint.tensor_names())
    if (!name.starts_with("model.visual.") && !name.starts_with("mtp."))
      elements += static_cast<double>(checkpoint.get(name).num_elements());
  EXPECT_EQ(planning::count_params(spec).total(), elements);
}

TEST_P(PlanCheckpoint, WeightBytesPerRankEqualTheLoadersAtEveryTp) {
  const std::string dir = model_dir(GetParam());
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  EXPECT_TRUE(spec.keel_layout);
  for (int tp : {1, 2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    ASSERT_EQ(spec.num_experts % tp, 0) << "pick a preset whose experts split evenly";
    const planning::MemoryPlan plan = plan_for(spec, tp);
    for (PlacementKind placement : {PlacementKind::kRoundRobin, PlacementKind::kContiguous}) {
      SCOPED_TRACE(placement == PlacementKind::kRoundRobin ? "round_robin" : "contiguous");
      EngineOptions options;
      options.tp_size = tp;
      options.placement.kind = placement;
      Engine engine(dir, options);
      EXPECT_EQ(plan.weight_bytes, static_cast<double>(engine.weight_bytes_per_rank()));
    }
  }
}

TEST_P(PlanCheckpoint, KvAndStateBytesEqualTheEnginesAtEveryTpAndKvDtype) {
  const std::string dir = model_dir(GetParam());
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  // The planner's name for each engine setting; auto as `keel plan` resolves it (plan_cmd.cpp).
  const std::string auto_dtype = spec.dtype == "bf16" ? "bf16" : "fp32";
  const std::vector<std::pair<KvCacheDType, std::string>> kv_dtypes = {
      {KvCacheDType::kFp32, "fp32"},
      {KvCacheDType::kBF16, "bf16"},
      {KvCacheDType::kFp8E4M3, "fp8_e4m3"},
      {KvCacheDType::kAuto, auto_dtype}};
  for (int tp : {1, 2, 4}) {
    for (const auto& [kv_dtype, plan_name] : kv_dtypes) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " kv_cache_dtype " +
                   std::string(kv_cache_dtype_name(kv_dtype)));
      const planning::MemoryPlan plan = plan_for(spec, tp, plan_name);
      EngineOptions options;
      options.tp_size = tp;
      options.kv_cache_dtype = kv_dtype;
      Engine engine(dir, options);
      EXPECT_EQ(kv_cache_dtype_name(engine.kv_dtype()), plan_name);
      const int64_t block_size = 16;
      EXPECT_EQ(plan.kv_bytes_per_token,
                static_cast<double>(engine.kv_block_bytes(block_size) / block_size));
      EXPECT_EQ(plan.state_bytes_per_seq, static_cast<double>(engine.state_slot_bytes()));
      if (spec.linear_attention_layers > 0) {
        EXPECT_GT(plan.state_bytes_per_seq, 0.0);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, PlanCheckpoint,
                         ::testing::Values("tiny", "tiny:vocab=250", "tiny-qwen2", "tiny-mixtral",
                                           "tiny-qwen3.5", "tiny-qwen3-next"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           std::replace(name.begin(), name.end(), '.', '_');
                           std::replace(name.begin(), name.end(), ':', '_');
                           std::replace(name.begin(), name.end(), '=', '_');
                           return name;
                         });

TEST(PlanCheckpointErrors, WhatTheLoaderRefusesThePlannerRefuses) {
  const std::string dir =
      std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint-bad-" + std::to_string(::getpid());
  fs::create_directories(dir);
  {
    std::FILE* file = std::fopen((dir + "/config.json").c_str(), "w");
    std::fputs(R"({"architectures": ["LlamaForCausalLM"]})", file);
    std::fclose(file);
  }
  try {
    model_spec_from_checkpoint(dir);
    ADD_FAILURE() << "an unsupported architecture was planned";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("unsupported architecture 'LlamaForCausalLM'"),
              std::string::npos)
        << error.what();
  }
  fs::remove_all(dir);
}

TEST(PlanCheckpointCli, PlansAGeneratedHybridCheckpointAndRefusesAnUnsupportedOne) {
  const std::string dir = model_dir("tiny-qwen3.5");
  const std::string hardware =
      std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml";
  const RunResult ok = run_keel("plan --model " + dir + " --hardware " + hardware +
                                " --quant none --kv-dtype fp32 --tp 2 --context 4096");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("keel plan: Qwen3_5MoeForConditionalGeneration"), std::string::npos)
      << ok.output;
  EXPECT_NE(ok.output.find("Memory per GPU"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("linear attention (Gated DeltaNet)"), std::string::npos) << ok.output;
  const RunResult by_file = run_keel("plan --model " + dir + "/config.json --hardware " + hardware +
                                     " --quant nvfp4 --tp 4 --context 4096 --json");
  EXPECT_EQ(by_file.exit_code, 0) << by_file.output;

  const std::string bad =
      std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint-cli-bad-" + std::to_string(::getpid());
  fs::create_directories(bad);
  {
    std::FILE* file = std::fopen((bad + "/config.json").c_str(), "w");
    std::fputs(R"({"architectures": ["LlamaForCausalLM"]})", file);
    std::fclose(file);
  }
  const RunResult refused = run_keel("plan --model " + bad + " --hardware " + hardware +
                                     " --quant bf16 --tp 1 --context 4096");
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find("unsupported architecture 'LlamaForCausalLM'"), std::string::npos)
      << refused.output;
  fs::remove_all(bad);
}

}  // namespace
}  // namespace keel
