// `keel plan --model DIR`: the planner reads a checkpoint's config.json through the loader's
// ModelConfig and its counts agree with what the loader actually holds, on synthetic checkpoints
// written by gen-model (Qwen3-MoE, Qwen3.5-MoE in the published VL layout, Qwen3-Next):
//  - parameters: the planner's count equals the elements of the checkpoint's text tensors;
//  - weight bytes per rank at TP=1: the planner's bf16 plan equals Engine::weight_bytes_per_rank()
//    once the loader's one layout difference is added: keel keeps norms, biases and the small
//    Gated DeltaNet tensors (conv, A_log, dt_bias, gated norm) in fp32, the plan in bf16;
//  - KV bytes per token (fp32, keel's pool) and recurrent-state bytes per sequence at TP 1, 2, 4
//    equal the engine's kv_block_bytes / block_size and state_slot_bytes, exactly.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

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

std::string model_dir(const std::string& preset) {
  static const std::string root =
      std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint/pid-" + std::to_string(::getpid());
  const std::string dir = root + "/" + preset;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 2;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

planning::MemoryPlan plan_for(const planning::ModelSpec& spec, int tp) {
  const planning::HardwareSpec hardware = planning::load_hardware_spec(
      std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml");
  planning::PlanOptions options;
  options.kv_dtype = "fp32";  // keel's KV pool
  options.context = 64;
  return planning::plan_memory(spec, hardware, planning::quant_from_name("bf16"), tp, options);
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

TEST_P(PlanCheckpoint, WeightBytesAtTp1EqualTheLoadersOnceItsFp32SmallTensorsAreCounted) {
  const std::string dir = model_dir(GetParam());
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  const planning::MemoryPlan plan = plan_for(spec, 1);
  const planning::ModelParams& params = plan.params;
  // The plan stores these small tensors in bf16 (2 B); keel loads them as fp32 (4 B).
  const double fp32_small =
      params.layer_norms + params.attention_bf16 + params.linear_attention_bf16;
  EngineOptions options;
  options.tp_size = 1;
  Engine engine(dir, options);
  EXPECT_EQ(plan.weight_bytes + 2.0 * fp32_small,
            static_cast<double>(engine.weight_bytes_per_rank()));
}

TEST_P(PlanCheckpoint, KvAndStateBytesEqualTheEnginesAtEveryTp) {
  const std::string dir = model_dir(GetParam());
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  for (int tp : {1, 2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    const planning::MemoryPlan plan = plan_for(spec, tp);
    EngineOptions options;
    options.tp_size = tp;
    Engine engine(dir, options);
    const int64_t block_size = 16;
    EXPECT_EQ(plan.kv_bytes_per_token,
              static_cast<double>(engine.kv_block_bytes(block_size) / block_size));
    EXPECT_EQ(plan.state_bytes_per_seq, static_cast<double>(engine.state_slot_bytes()));
    if (spec.linear_attention_layers > 0) {
      EXPECT_GT(plan.state_bytes_per_seq, 0.0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, PlanCheckpoint,
                         ::testing::Values("tiny", "tiny-qwen3.5", "tiny-qwen3-next"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           std::replace(name.begin(), name.end(), '.', '_');
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

}  // namespace
}  // namespace keel
