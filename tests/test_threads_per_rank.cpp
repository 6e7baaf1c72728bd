// Threads per rank (EngineOptions::threads_per_rank, `--threads`, config key `threads`): the CPU
// backend splits every GEMM's output rows and attention's heads over a rank's threads by a fixed
// partition, so a run's logits are bit-identical at 1, 2 and 3 threads per rank, for dense and
// quantized checkpoints (W4A4 too), MoE and hybrid models, at TP 1 and 2. Batched prompts make
// the products big enough that they really are split (a decode of 25 rows through lm_head,
// prefill of ~170 rows through every layer). Also: the settings are range-checked where they
// enter (engine, deployment and serve files, placement files).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/engine/deployment.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/gen_quant.h"
#include "runtime/serving/serve_config.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

std::string scratch() {
  static const std::string dir =
      std::string(KEEL_BINARY_DIR) + "/test-threads/pid-" + std::to_string(::getpid());
  return dir;
}

std::string make_checkpoint(const std::string& preset, const std::string& quant) {
  const std::string dir = scratch() + "/" + preset + "-" + quant;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 9;
    options.quant.format = parse_quant_format(quant);
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

struct Case {
  std::string preset;
  std::string quant;
  int tp = 1;
  Nvfp4Activations activations = Nvfp4Activations::kFp32;
};

void PrintTo(const Case& c, std::ostream* out) {
  *out << c.preset << " " << c.quant << " tp " << c.tp;
}

class ThreadsPerRank : public ::testing::TestWithParam<Case> {};

void expect_same_bits(const GenerateResult& one, const GenerateResult& other,
                      const std::string& what) {
  EXPECT_EQ(other.tokens, one.tokens) << what;
  EXPECT_EQ(other.logits_digest, one.logits_digest) << what;
  ASSERT_EQ(other.step_logits.size(), one.step_logits.size());
  for (size_t prompt = 0; prompt < one.step_logits.size(); ++prompt) {
    ASSERT_EQ(other.step_logits[prompt].size(), one.step_logits[prompt].size());
    for (size_t step = 0; step < one.step_logits[prompt].size(); ++step) {
      const auto& a = one.step_logits[prompt][step];
      const auto& b = other.step_logits[prompt][step];
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
          << what << ", prompt " << prompt << " step " << step;
    }
    const auto& pa = one.prompt_logits[prompt];
    const auto& pb = other.prompt_logits[prompt];
    ASSERT_EQ(pa.size(), pb.size());
    for (size_t position = 0; position < pa.size(); ++position)
      EXPECT_EQ(std::memcmp(pa[position].data(), pb[position].data(),
                            pa[position].size() * sizeof(float)),
                0)
          << what << ", prompt " << prompt << " position " << position;
  }
}

// Two requests per engine: 25 prompts (every GEMM and attention split by rows / heads) and one
// prompt alone (decode steps of one row: the MoE layer gives whole experts to each thread).
TEST_P(ThreadsPerRank, LogitsBitIdenticalAtAnyThreadCount) {
  const Case& c = GetParam();
  const std::string dir = make_checkpoint(c.preset, c.quant);
  std::vector<GenerateResult> batched, alone;
  for (int threads : {1, 2, 3}) {
    EngineOptions options;
    options.tp_size = c.tp;
    options.threads_per_rank = threads;
    options.reduce = comm::ReduceAlgo::kFixedOrder;
    options.placement.kind = PlacementKind::kRoundRobin;
    options.nvfp4_activations = c.activations;
    Engine engine(dir, options);
    GenerateRequest request;
    request.prompts = synthetic_prompts(24, engine.config().vocab_size, 3);
    request.prompts.push_back({5, 17, 3, 42, 8, 11, 2});
    request.max_new_tokens = 4;
    request.keep_all_logits = true;
    batched.push_back(engine.generate(request));
    request.prompts.erase(request.prompts.begin(), request.prompts.end() - 1);
    request.max_new_tokens = 8;
    alone.push_back(engine.generate(request));
  }
  for (size_t run = 1; run < batched.size(); ++run) {
    expect_same_bits(batched[0], batched[run], std::to_string(run + 1) + " threads, batched");
    expect_same_bits(alone[0], alone[run], std::to_string(run + 1) + " threads, alone");
  }
}

INSTANTIATE_TEST_SUITE_P(Models, ThreadsPerRank,
                         ::testing::Values(Case{"tiny", "none", 1}, Case{"tiny", "none", 2},
                                           Case{"tiny", "nvfp4", 1, Nvfp4Activations::kW4A4},
                                           Case{"tiny", "gptq", 1},
                                           Case{"tiny-qwen3.5", "none", 2}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name = info.param.preset + "_" + info.param.quant + "_tp" +
                                              std::to_string(info.param.tp);
                           for (char& ch : name)
                             if (ch == '-' || ch == '.') ch = '_';
                           return name;
                         });

TEST(ThreadsPerRankSettings, RefusedOutsideTheirRange) {
  const std::string dir = make_checkpoint("tiny", "none");
  EngineOptions options;
  options.threads_per_rank = 0;
  EXPECT_NE(error_of([&] { Engine engine(dir, options); }).find("threads per rank"),
            std::string::npos);
  options.threads_per_rank = 2;
  options.device = Device::kCuda;
  EXPECT_NE(error_of([&] { Engine engine(dir, options); }).find("apply to the cpu backend"),
            std::string::npos);
}

TEST(ThreadsPerRankSettings, ConfigFilesAndPlacementFiles) {
  const std::string dir = scratch() + "/yaml";
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  EXPECT_EQ(load_deployment(write("d.yaml", "threads: 3\n")).engine.threads_per_rank, 3);
  EXPECT_NE(error_of([&] {
              load_deployment(write("d0.yaml", "threads: 0\n"));
            }).find("key 'threads' is 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_serve_config(write("s0.yaml", "model: m\nthreads: 999\n"));
            }).find("key 'threads' is 999"),
            std::string::npos);

  write("balanced.yaml", "placement: explicit\nexplicit_placement:\n  - [0, 1, 1, 0]\n");
  const ServeConfig serve =
      load_serve_config(write("s.yaml", "model: m\nthreads: 2\nplacement_file: balanced.yaml\n"));
  EXPECT_EQ(serve.engine.threads_per_rank, 2);
  EXPECT_EQ(serve.engine.placement.kind, PlacementKind::kExplicit);
  EXPECT_EQ(serve.engine.placement.explicit_ranks, (std::vector<std::vector<int>>{{0, 1, 1, 0}}));
  EXPECT_NE(
      error_of([&] {
        load_serve_config(write(
            "both.yaml", "model: m\nplacement: round_robin\nplacement_file: balanced.yaml\n"));
      }).find("not both"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              load_serve_config(write("inline.yaml", "model: m\nplacement: explicit\n"));
            }).find("placement_file"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_placement_file(write("typo.yaml", "explicit_placment: [[0]]\n"));
            }).find("unknown key 'explicit_placment'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_placement_file(write("empty.yaml", "placement: explicit\n"));
            }).find("needs an explicit_placement list"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_placement_file(
                  write("kind.yaml", "placement: round_robin\nexplicit_placement: [[0]]\n"));
            }).find("holds placement: explicit"),
            std::string::npos);
}

}  // namespace
}  // namespace keel
