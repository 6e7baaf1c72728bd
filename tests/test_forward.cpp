// The TP forward pass end to end on synthetic checkpoints written by gen-model:
//  - TP=2 and TP=4 agree with TP=1 within a stated tolerance, and greedy tokens are identical;
//  - fixed_order gives identical logits digests across runs, placements' runs and batch sizes;
//  - KV-head replication (8 q / 2 kv heads at TP=4), sharded checkpoints, explicit placement,
//    the combine-precision knob, and bad shapes/options fail with clear errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/base/check.h"
#include "runtime/engine/deployment.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

// ctest runs each test in its own process, two at a time, so every process writes its own
// checkpoints (and removes them at exit): no process reads a directory another is rewriting.
struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-models/pid-" + std::to_string(::getpid());
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string scratch_dir() {
  static ScratchDir dir;
  return dir.path;
}

std::string model_dir(const std::string& preset, int64_t max_shard_bytes = 0) {
  std::string dir = scratch_dir() + "/" + preset + (max_shard_bytes > 0 ? "-sharded" : "");
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 3;
    options.max_shard_bytes = max_shard_bytes;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

EngineOptions options_for(int tp, comm::ReduceAlgo reduce = comm::ReduceAlgo::kFixedOrder,
                          PlacementKind placement = PlacementKind::kContiguous) {
  EngineOptions options;
  options.tp_size = tp;
  options.reduce = reduce;
  options.placement.kind = placement;
  return options;
}

GenerateRequest request_with(int64_t batch_with, int64_t vocab, bool keep_logits = false) {
  GenerateRequest request;
  // The prompt under study goes last, so batching moves its rows within every message.
  request.prompts = synthetic_prompts(batch_with, vocab, 11);
  request.prompts.push_back({1, 5, 9, 42, 7, 3});
  request.digest_prompt_idx = batch_with;
  request.max_new_tokens = 8;
  request.keep_all_logits = keep_logits;
  return request;
}

// Largest |a - b| over all step logits of all prompts, relative to the largest |logit|.
double max_relative_logit_diff(const GenerateResult& a, const GenerateResult& b) {
  double max_diff = 0, max_abs = 0;
  for (size_t prompt = 0; prompt < a.step_logits.size(); ++prompt)
    for (size_t step = 0; step < a.step_logits[prompt].size(); ++step)
      for (size_t i = 0; i < a.step_logits[prompt][step].size(); ++i) {
        max_diff = std::max(max_diff, std::fabs(double{a.step_logits[prompt][step][i]} -
                                                b.step_logits[prompt][step][i]));
        max_abs = std::max(max_abs, std::fabs(double{a.step_logits[prompt][step][i]}));
      }
  return max_diff / max_abs;
}

class TensorParallel : public ::testing::TestWithParam<std::string> {};

// TP changes which partial sums are added where (o_proj, shared/dense down_proj and the MoE
// combine are split over ranks), so fp32 results move by rounding only: with hidden size 64 and
// two layers, relative error stays within ~1e-5; 1e-4 leaves room without hiding a real bug
// (a wrong shard or a lost partial moves logits by O(1)). Greedy tokens must match exactly.
TEST_P(TensorParallel, MatchesSingleRankWithinFp32Rounding) {
  std::string dir = model_dir(GetParam());
  Engine reference_engine(dir, options_for(1));
  GenerateRequest request = request_with(3, reference_engine.config().vocab_size, true);
  GenerateResult reference = reference_engine.generate(request);
  for (int tp : {2, 4}) {
    for (auto reduce : {comm::ReduceAlgo::kNative, comm::ReduceAlgo::kFixedOrder}) {
      for (auto placement : {PlacementKind::kContiguous, PlacementKind::kRoundRobin}) {
        Engine engine(dir, options_for(tp, reduce, placement));
        GenerateResult result = engine.generate(request);
        SCOPED_TRACE("tp=" + std::to_string(tp) +
                     " reduce=" + std::string(comm::reduce_algo_name(reduce)) +
                     " placement=" + std::string(placement_kind_name(placement)));
        EXPECT_EQ(result.tokens, reference.tokens);
        EXPECT_LT(max_relative_logit_diff(result, reference), 1e-4);
        EXPECT_EQ(result.expert_counts, reference.expert_counts);
      }
    }
  }
}

TEST_P(TensorParallel, ExpertCountsAddUpToRoutedTokens) {
  std::string dir = model_dir(GetParam());
  Engine engine(dir, options_for(4));
  GenerateRequest request = request_with(2, engine.config().vocab_size);
  GenerateResult result = engine.generate(request);
  int64_t tokens_processed = result.num_prompt_tokens +
                             result.num_decode_steps * static_cast<int64_t>(request.prompts.size());
  for (size_t layer = 0; layer < result.expert_counts.size(); ++layer) {
    int64_t total = 0;
    for (int64_t count : result.expert_counts[layer]) total += count;
    int64_t expected =
        engine.config().layer_is_moe[layer] ? tokens_processed * engine.config().top_k : 0;
    EXPECT_EQ(total, expected) << "layer " << layer;
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, TensorParallel,
                         ::testing::Values("tiny", "tiny-qwen2", "tiny-mixtral"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// The determinism promise of fixed_order: for every placement, TP=4 digests are identical
// across 5 runs and whether the prompt runs alone or batched with 7 others.
TEST(FixedOrder, DigestIdenticalAcrossRunsAndBatchSizes) {
  std::string dir = model_dir("tiny");
  for (auto placement :
       {PlacementKind::kContiguous, PlacementKind::kRoundRobin, PlacementKind::kExplicit}) {
    EngineOptions options = options_for(4, comm::ReduceAlgo::kFixedOrder, placement);
    if (placement == PlacementKind::kExplicit)
      options.placement =
          load_deployment(std::string(KEEL_SOURCE_DIR) + "/configs/deployments/explicit-tiny.yaml")
              .engine.placement;
    Engine engine(dir, options);
    GenerateResult alone = engine.generate(request_with(0, engine.config().vocab_size));
    ASSERT_EQ(alone.logits_digest.size(), 64u);
    for (int run = 0; run < 5; ++run) {
      GenerateResult again = engine.generate(request_with(0, engine.config().vocab_size));
      EXPECT_EQ(again.logits_digest, alone.logits_digest)
          << placement_kind_name(placement) << " run " << run;
      EXPECT_EQ(again.tokens.back(), alone.tokens.back());
    }
    GenerateResult batched = engine.generate(request_with(7, engine.config().vocab_size));
    EXPECT_EQ(batched.logits_digest, alone.logits_digest) << placement_kind_name(placement);
    EXPECT_EQ(batched.tokens.back(), alone.tokens.back());
  }
}

// The contrast that makes the promise meaningful: with 40 batch-mates the prefill message
// (~290 tokens x 64 floats) is over native's 64 KiB single-chunk threshold, the prompt's rows
// land in the last chunk, whose native sum starts at rank 3, and its bits change; fixed_order
// keeps them.
TEST(FixedOrder, NativeBitsDependOnBatchFixedOrderBitsDoNot) {
  std::string dir = model_dir("tiny");
  Engine native(dir, options_for(4, comm::ReduceAlgo::kNative));
  Engine fixed(dir, options_for(4, comm::ReduceAlgo::kFixedOrder));
  const int64_t vocab = native.config().vocab_size;
  EXPECT_NE(native.generate(request_with(0, vocab)).logits_digest,
            native.generate(request_with(40, vocab)).logits_digest);
  EXPECT_EQ(fixed.generate(request_with(0, vocab)).logits_digest,
            fixed.generate(request_with(40, vocab)).logits_digest);
}

// The digest is a real fingerprint: a different model seed, prompt or combine precision moves it.
TEST(FixedOrder, DigestDetectsChanges) {
  std::string dir = model_dir("tiny");
  Engine fp32_engine(dir, options_for(4));
  EngineOptions rounded = options_for(4);
  rounded.combine = CombinePrecision::kRoundPerExpert;
  Engine rounded_engine(dir, rounded);
  GenerateRequest request = request_with(0, fp32_engine.config().vocab_size, true);
  GenerateResult fp32 = fp32_engine.generate(request);
  GenerateResult round = rounded_engine.generate(request);
  // tiny stores bf16: rounding each weighted expert output to bf16 changes bits, but only by
  // bf16 rounding of O(1) values (2^-8 relative) accumulated over two layers.
  EXPECT_NE(fp32.logits_digest, round.logits_digest);
  EXPECT_LT(max_relative_logit_diff(fp32, round), 0.05);
  request.prompts[0][0] = 2;
  EXPECT_NE(fp32_engine.generate(request).logits_digest, fp32.logits_digest);
}

TEST(Checkpoint, ShardedCheckpointGivesTheSameBits) {
  std::string single = model_dir("tiny");
  std::string sharded = model_dir("tiny", 200 * 1024);
  ASSERT_TRUE(fs::exists(sharded + "/model.safetensors.index.json"));
  ASSERT_TRUE(fs::exists(sharded + "/model-00001-of-00003.safetensors") ||
              fs::exists(sharded + "/model-00001-of-00004.safetensors") ||
              fs::exists(sharded + "/model-00001-of-00002.safetensors"));
  Engine a(single, options_for(2));
  Engine b(sharded, options_for(2));
  GenerateRequest request = request_with(1, a.config().vocab_size);
  EXPECT_EQ(a.generate(request).logits_digest, b.generate(request).logits_digest);
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(Errors, UnsplittableHeadsAndBadShapes) {
  std::string dir = model_dir("tiny");
  EXPECT_NE(error_of([&] {
              Engine engine(dir, options_for(3));
            }).find("cannot split 8 attention heads over tp=3"),
            std::string::npos);

  // A config that disagrees with the weights: the error names the tensor and both shapes.
  std::string broken = scratch_dir() + "/tiny-wrong-shape";
  fs::remove_all(broken);
  fs::create_directories(broken);
  fs::copy_file(dir + "/model.safetensors", broken + "/model.safetensors");
  nlohmann::json config = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  config["moe_intermediate_size"] = 40;
  std::ofstream(broken + "/config.json") << config.dump();
  std::string message = error_of([&] { Engine engine(broken, options_for(1)); });
  EXPECT_NE(message.find("experts.0.gate_proj.weight"), std::string::npos) << message;
  EXPECT_NE(message.find("expected shape [40, 64], found [48, 64]"), std::string::npos) << message;

  Engine engine(dir, options_for(1));
  GenerateRequest request = request_with(0, engine.config().vocab_size);
  request.prompts[0][0] = 100000;
  EXPECT_NE(error_of([&] { engine.generate(request); }).find("outside the vocabulary"),
            std::string::npos);
}

TEST(Errors, DeploymentYamlRejectsUnknownKeysAndBadValues) {
  std::string dir = scratch_dir() + "/yaml";
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  EXPECT_NE(error_of([&] {
              load_deployment(write("typo.yaml", "tp: 4\nreduse: native\n"));
            }).find("unknown key 'reduse'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_deployment(write("algo.yaml", "reduce: fastest\n"));
            }).find("unknown all-reduce algorithm 'fastest'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_deployment(write("tp.yaml", "tp: four\n")); }).find("key 'tp'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_deployment(write("explicit.yaml", "placement: explicit\n"));
            }).find("needs an explicit_placement list"),
            std::string::npos);
  Deployment deployment = load_deployment(write(
      "ok.yaml",
      "model: /m\ntp: 2\nreduce: native\nplacement: round_robin\ncombine: round_per_expert\n"));
  EXPECT_EQ(deployment.model_dir, "/m");
  EXPECT_EQ(deployment.engine.tp_size, 2);
  EXPECT_EQ(deployment.engine.reduce, comm::ReduceAlgo::kNative);
  EXPECT_EQ(deployment.engine.placement.kind, PlacementKind::kRoundRobin);
  EXPECT_EQ(deployment.engine.combine, CombinePrecision::kRoundPerExpert);
}

}  // namespace
}  // namespace keel
