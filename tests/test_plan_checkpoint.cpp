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
//    with the loader's message (exit 1);
//  - quantized checkpoints (gen-model --quant nvfp4, nvfp4-ct, fp8, awq, gptq with and without
//    act order, at --quant-scope experts and linear; mxfp4): weight bytes per rank at TP 1, 2, 4
//    equal the engine's, each matrix in keel's in-memory layout, and where the loader refuses a
//    split (a quantized row-parallel slice off a group boundary) the planner refuses it too; such
//    a checkpoint is planned as stored (--quant none) and another --quant is refused.
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
#include "runtime/model/gen_quant.h"
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
 public:
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

// Quantized checkpoints: gen-model --quant FORMAT [--quant-scope SCOPE] [--desc-act] of a tiny
// preset. At TP 1, 2, 4 the planner's weight bytes per rank equal Engine::weight_bytes_per_rank()
// (each matrix in keel's in-memory layout: codes, scales, zeros, row scales, group_of_k), and
// where the loader refuses the split (a row-parallel column slice off a quantization group
// boundary) the planner refuses it too.
struct QuantCase {
  std::string preset;
  std::string format;             // gen-model --quant
  std::string scope = "default";  // gen-model --quant-scope
  bool desc_act = false;          // GPTQ act order
  std::string format_name;        // what the plan's weight lines name (matrix_quant_name)

  std::string name() const {
    std::string out = preset + "_" + format + (scope == "default" ? "" : "_" + scope) +
                      (desc_act ? "_desc_act" : "");
    for (char& c : out)
      if (c == '-' || c == '.') c = '_';
    return out;
  }
};

std::string quant_model_dir(const QuantCase& c) {
  static const std::string root =
      std::string(KEEL_BINARY_DIR) + "/test-plan-checkpoint/pid-" + std::to_string(::getpid());
  const std::string dir = root + "/quant-" + c.name();
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 3;
    options.quant.format = parse_quant_format(c.format);
    options.quant.scope = parse_quant_scope(c.scope);
    options.quant.gptq_desc_act = c.desc_act;
    generate_model(load_model_preset(find_model_preset(c.preset)), options, dir);
  }
  return dir;
}

class PlanQuantizedCheckpoint : public ::testing::TestWithParam<QuantCase> {
 protected:
  static void TearDownTestSuite() { PlanCheckpoint::TearDownTestSuite(); }
};

TEST_P(PlanQuantizedCheckpoint, WeightBytesPerRankEqualTheLoadersOrBothRefuse) {
  const QuantCase& c = GetParam();
  const std::string dir = quant_model_dir(c);
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  ASSERT_EQ(static_cast<int64_t>(spec.layer_quant.size()), spec.num_layers);
  EXPECT_FALSE(spec.quant_method.empty());
  for (int tp : {1, 2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    ASSERT_EQ(spec.num_experts % tp, 0) << "pick a preset whose experts split evenly";
    EngineOptions options;
    options.tp_size = tp;
    int64_t engine_bytes = -1;
    std::string loader_error;
    try {
      Engine engine(dir, options);
      engine_bytes = engine.weight_bytes_per_rank();
    } catch (const std::exception& error) {
      loader_error = error.what();
    }
    if (!loader_error.empty()) {
      // The only refusal these presets meet: a quantized row-parallel slice off a group.
      EXPECT_NE(loader_error.find("quantization group boundary"), std::string::npos)
          << loader_error;
      EXPECT_GT(tp, 1) << loader_error;
      try {
        plan_for(spec, tp);
        ADD_FAILURE() << "the loader refuses tp " << tp << " (" << loader_error
                      << ") but the planner planned it";
      } catch (const Error& error) {
        EXPECT_NE(std::string(error.what()).find("quantization group boundary"), std::string::npos)
            << error.what();
      }
      continue;
    }
    const planning::MemoryPlan plan = plan_for(spec, tp);
    EXPECT_EQ(plan.weight_bytes, static_cast<double>(engine_bytes));
    bool named = false;
    for (const planning::MemoryLine& line : plan.weights)
      named = named || line.note.find(c.format_name) != std::string::npos;
    EXPECT_TRUE(named) << "no weight line names " << c.format_name;
  }
}

std::vector<QuantCase> quant_cases() {
  std::vector<QuantCase> cases;
  const std::vector<std::pair<std::string, std::string>> formats = {{"nvfp4", "nvfp4"},
                                                                    {"nvfp4-ct", "nvfp4"},
                                                                    {"fp8", "fp8_block"},
                                                                    {"awq", "int4 g"},
                                                                    {"gptq", "int4 g"}};
  for (const std::string preset : {"tiny", "tiny-qwen3.5"}) {
    for (const auto& [format, format_name] : formats) {
      for (const std::string scope : {"experts", "linear"})
        cases.push_back({preset, format, scope, false, format_name});
    }
    cases.push_back({preset, "gptq", "experts", true, "int4 g"});
    cases.push_back({preset, "gptq", "linear", true, "act-order"});
  }
  // gen-model's mxfp4 needs every expert K a multiple of 32 (tiny's 48 is not).
  for (const std::string preset : {"tiny-qwen2", "tiny-qwen3.5"})
    cases.push_back({preset, "mxfp4", "default", false, "mxfp4"});
  // Qwen3-Next's interleaved in_proj_qkvz / in_proj_ba; Mixtral's w1/w3/w2 experts (fp16, tied);
  // Qwen2-MoE's shared expert (fp32) quantized.
  cases.push_back({"tiny-qwen3-next", "nvfp4", "linear", false, "nvfp4"});
  cases.push_back({"tiny-qwen3-next", "fp8", "default", false, "fp8_block"});
  cases.push_back({"tiny-mixtral", "awq", "default", false, "int4 g"});
  cases.push_back({"tiny-qwen2", "nvfp4-ct", "linear", false, "nvfp4"});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Formats, PlanQuantizedCheckpoint, ::testing::ValuesIn(quant_cases()),
                         [](const auto& info) { return info.param.name(); });

// What --quant means for a quantized checkpoint: it is planned as stored (--quant none), and
// re-quantizing it (any other --quant, or --attention-bf16) is refused.
TEST(PlanQuantizedCheckpointCli, PlansAsStoredAndRefusesAnotherQuant) {
  const std::string dir = quant_model_dir({"tiny-qwen3.5", "nvfp4", "linear", false, "nvfp4"});
  const planning::ModelSpec spec = model_spec_from_checkpoint(dir);
  const planning::HardwareSpec hardware = planning::load_hardware_spec(
      std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml");
  const planning::QuantSpec as_stored = checkpoint_quant_spec(spec);
  EXPECT_TRUE(as_stored.as_stored);
  EXPECT_EQ(as_stored.name, "as stored (modelopt-nvfp4)");
  EXPECT_EQ(as_stored.compute, planning::ComputePrecision::fp4);
  planning::PlanOptions options;
  options.context = 64;
  options.kv_dtype = "bf16";
  EXPECT_EQ(planning::plan_memory(spec, hardware, as_stored, 2, options).weight_bytes,
            plan_for(spec, 2).weight_bytes);
  EXPECT_THROW(planning::plan_memory(spec, hardware, planning::quant_from_name("fp8"), 2, options),
               Error);
  options.attention_bf16 = true;
  EXPECT_THROW(planning::plan_memory(spec, hardware, as_stored, 2, options), Error);

  const std::string hardware_path =
      std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml";
  const RunResult ok = run_keel("plan --model " + dir + " --hardware " + hardware_path +
                                " --quant none --tp 2 --context 4096");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("as stored (modelopt-nvfp4)"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("nvfp4"), std::string::npos) << ok.output;
  const RunResult refused = run_keel("plan --model " + dir + " --hardware " + hardware_path +
                                     " --quant fp8 --tp 2 --context 4096");
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find("is a quantized checkpoint (modelopt-nvfp4)"), std::string::npos)
      << refused.output;
  // FP8 block 128 on a tiny preset: o_proj's 64 in_features per rank at TP 2 are off the group.
  const std::string fp8 = quant_model_dir({"tiny", "fp8", "default", false, "fp8_block"});
  const RunResult off_group = run_keel("plan --model " + fp8 + " --hardware " + hardware_path +
                                       " --quant none --tp 2 --context 4096");
  EXPECT_EQ(off_group.exit_code, 1) << off_group.output;
  EXPECT_NE(off_group.output.find("quantization group boundary"), std::string::npos)
      << off_group.output;
  fs::remove_all(dir);
  fs::remove_all(fp8);
}

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
