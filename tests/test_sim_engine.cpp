// The code that serves is the code that is simulated: for the same arrival sequence, keel's
// engine (ServingEngine over Engine::serve, tiny model, 2 thread ranks) and keel simulate make
// the same sequence of scheduling decisions, step for step: which sequences run and how many
// tokens each step feeds, including chunked prefill and preemption by recompute.
//
// All requests arrive before the first step in both worlds (the engine's arrivals land between
// steps at times it does not control, so a common arrival sequence means "all at once");
// outputs end by length (ignore_eos), as the simulator's do. The engine's steps are read back
// from its telemetry ring (/v1/telemetry/steps), the simulator's through its on_plan hook.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "runtime/engine.h"
#include "runtime/gen_model.h"
#include "runtime/serving/serving_engine.h"
#include "runtime/simulation/cost_model.h"
#include "runtime/simulation/simulator.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class QuietSink final : public keel::server::TokenSink {
 public:
  void on_token(const std::string&, int32_t, float,
                const std::vector<keel::server::TopLogprob>&) override {}
  void on_finish(const std::string&, keel::server::Usage) override {}
  void on_error(const std::string& message) override { ADD_FAILURE() << message; }
  bool cancelled() const override { return false; }
};

struct Step {
  std::vector<int64_t> seq_ids;
  int64_t num_tokens = 0;
  bool operator==(const Step&) const = default;
};

std::ostream& operator<<(std::ostream& out, const Step& step) {
  out << "{tokens " << step.num_tokens << ", seqs";
  for (int64_t id : step.seq_ids) out << " " << id;
  return out << "}";
}

struct Load {
  std::vector<int64_t> prompt_lens;
  std::vector<int64_t> output_lens;
};

std::vector<Step> engine_steps(const std::string& model_dir, const keel::SchedulerConfig& config,
                               const Load& load, int64_t* preemptions = nullptr) {
  keel::EngineOptions options;
  options.tp_size = 2;
  keel::Engine engine(model_dir, options);
  keel::ServingConfig serving_config;
  serving_config.model_name = "tiny";
  serving_config.scheduler = config;
  serving_config.max_waiting = 1 << 20;
  keel::ServingEngine serving(engine, model_dir, serving_config);
  for (size_t index = 0; index < load.prompt_lens.size(); ++index) {
    keel::server::CompletionRequest request;
    request.prompt_tokens = std::vector<int32_t>(static_cast<size_t>(load.prompt_lens[index]),
                                                 static_cast<int32_t>(3 + index));
    request.max_tokens = static_cast<int>(load.output_lens[index]);
    request.temperature = 0;
    request.ignore_eos = true;
    request.request_id = "r" + std::to_string(index);
    EXPECT_FALSE(serving.prepare(request).has_value());
    EXPECT_TRUE(serving.try_submit(std::move(request), std::make_shared<QuietSink>()));
  }
  std::thread stopper([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (serving.stats().requests_finished < static_cast<int64_t>(load.prompt_lens.size()) &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    serving.request_stop();
  });
  keel::ServeOptions serve_options;
  serve_options.block_size = config.block_size;
  serve_options.num_kv_blocks = config.num_kv_blocks;
  engine.serve(&serving, serve_options);
  stopper.join();
  EXPECT_EQ(serving.stats().requests_finished, static_cast<int64_t>(load.prompt_lens.size()))
      << "steps " << serving.stats().steps << " aborted " << serving.stats().requests_aborted;
  std::vector<Step> steps;
  if (preemptions != nullptr) *preemptions = serving.stats().preemptions;
  const json recorded = serving.telemetry().steps_json(0, 1 << 30);
  for (const json& step : recorded["steps"])
    steps.push_back({step["seq_ids"].get<std::vector<int64_t>>(), step["num_tokens"]});
  return steps;
}

std::vector<Step> simulated_steps(const keel::SchedulerConfig& config, const Load& load) {
  std::vector<keel::sim::SimRequest> requests;
  for (size_t index = 0; index < load.prompt_lens.size(); ++index)
    requests.push_back({0.0, load.prompt_lens[index], load.output_lens[index]});
  keel::sim::SimulationConfig sim_config;
  sim_config.scheduler = config;
  sim_config.max_waiting = 1 << 20;
  std::vector<Step> steps;
  sim_config.on_plan = [&](const keel::StepPlan& plan, double) {
    steps.push_back({plan.seq_ids, plan.num_scheduled_tokens});
  };
  keel::sim::LinearCostModel cost(0.001, 0.0, 0.0);
  keel::sim::simulate(requests, sim_config, cost);
  return steps;
}

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string out = std::string(KEEL_BINARY_DIR) + "/test-sim-engine/pid-" +
                      std::to_string(::getpid()) + "/tiny-chat";
    keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), {}, out);
    return out;
  }();
  return dir;
}

TEST(SimulatorVsEngine, SameArrivalsGiveTheSameStepsWithChunkedPrefill) {
  keel::SchedulerConfig config;
  config.num_kv_blocks = 256;
  config.block_size = 16;
  config.max_num_batched_tokens = 40;  // prompts of up to 70 tokens: several prefill chunks
  config.max_num_seqs = 4;             // more requests than seats: some wait
  const Load load{{5, 70, 33, 12, 48, 9}, {6, 3, 9, 4, 7, 5}};
  const std::vector<Step> engine = engine_steps(model_dir(), config, load);
  const std::vector<Step> simulated = simulated_steps(config, load);
  ASSERT_FALSE(engine.empty());
  EXPECT_EQ(engine, simulated);
}

TEST(SimulatorVsEngine, SameArrivalsGiveTheSameStepsUnderPreemption) {
  keel::SchedulerConfig config;
  config.num_kv_blocks = 12;  // 12 blocks of 4 = 48 KV slots for 3 growing sequences
  config.block_size = 4;
  config.max_num_batched_tokens = 64;
  config.max_num_seqs = 8;
  const Load load{{10, 14, 9}, {20, 18, 22}};
  int64_t preemptions = 0;
  const std::vector<Step> engine = engine_steps(model_dir(), config, load, &preemptions);
  EXPECT_GT(preemptions, 0) << "the pool is meant to run out";
  const std::vector<Step> simulated = simulated_steps(config, load);
  ASSERT_FALSE(engine.empty());
  EXPECT_EQ(engine, simulated);
}

}  // namespace
