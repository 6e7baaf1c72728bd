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

#include "kernels/base/check.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/serving/calibrate.h"
#include "runtime/serving/serving_engine.h"
#include "runtime/tools/simulation/cost_model.h"
#include "runtime/tools/simulation/simulator.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class QuietSink final : public keel::server::TokenSink {
 public:
  void on_token(const keel::server::GeneratedToken&) override {}
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

// keel calibrate --from-url's arithmetic on hand-made step records: costs include the gap to the
// next back-to-back step (the median gap when an idle wait followed), one point per shape with
// the median cost, and the jitter table of cost / shape median with its lag-1 correlation.
json served_step(int64_t id, int64_t decode, int64_t prefill, double seconds, double gap) {
  return {{"id", id},
          {"num_decode_tokens", decode},
          {"num_prefill_tokens", prefill},
          {"kv_tokens_read", decode * 100 + prefill},
          {"seconds", seconds},
          {"gap_before_s", gap >= 0 ? json(gap) : json(nullptr)}};
}

TEST(CalibrationFromServedSteps, CostsPointsAndJitterByHand) {
  json steps = json::array();
  // 120 decode steps of one sequence, back to back with 1 ms gaps, costs cycling 10/20/30 ms.
  for (int64_t id = 1; id <= 120; ++id)
    steps.push_back(served_step(id, 1, 0, 0.009 + 0.01 * ((id - 1) % 3), id == 1 ? -1 : 0.001));
  // Two prefill steps: the first back to back with the last decode step, the second after an
  // idle wait (so the first gets the median gap, 1 ms, and so does the last).
  steps.push_back(served_step(121, 0, 64, 0.100, 0.001));
  steps.push_back(served_step(122, 0, 64, 0.200, -1));
  const json calibration = keel::calibration_from_served_steps(steps, 1);
  ASSERT_EQ(calibration["points"].size(), 2u);
  for (const json& point : calibration["points"]) {
    if (point["num_prefill_tokens"] == 0) {
      EXPECT_EQ(point["num_decode_tokens"], 1);
      EXPECT_NEAR(point["step_s"].get<double>(), 0.020, 1e-12);  // median of 40 x 10/20/30 ms
      EXPECT_EQ(point["kv_tokens_read"], 100);
      EXPECT_EQ(point["samples"], 120);
    } else {
      EXPECT_NEAR(point["step_s"].get<double>(), 0.201, 1e-12);  // upper median of 101, 201 ms
      EXPECT_EQ(point["samples"], 2);
    }
  }
  EXPECT_NEAR(calibration["median_gap_s"].get<double>(), 0.001, 1e-15);
  // Jitter from the 120 decode steps only (the prefill shape has fewer than 5): ratios 0.5, 1,
  // 1.5, 40 each; quantile q is the sorted ratio at round(q * 119).
  const json& jitter = calibration["step_jitter"];
  ASSERT_EQ(jitter["ratio_quantiles"].size(), 101u);
  EXPECT_NEAR(jitter["ratio_quantiles"][0].get<double>(), 0.5, 1e-12);
  EXPECT_NEAR(jitter["ratio_quantiles"][33].get<double>(), 0.5, 1e-12);   // index 39
  EXPECT_NEAR(jitter["ratio_quantiles"][34].get<double>(), 1.0, 1e-12);   // index 40
  EXPECT_NEAR(jitter["ratio_quantiles"][50].get<double>(), 1.0, 1e-12);   // index 60
  EXPECT_NEAR(jitter["ratio_quantiles"][100].get<double>(), 1.5, 1e-12);  // index 119
  // A period-3 cycle has lag-1 autocorrelation -0.5: clamped to 0.
  EXPECT_EQ(jitter["lag1_correlation"].get<double>(), 0.0);
  EXPECT_NO_THROW(keel::sim::CalibratedCostModel::from_json(calibration, "served"));

  // Slow steps in one run: 60 fast then 60 slow steps correlate strongly (only one of 119
  // pairs straddles the change): clamped to at most 0.99.
  json runs = json::array();
  for (int64_t id = 1; id <= 120; ++id)
    runs.push_back(served_step(id, 2, 0, id <= 60 ? 0.010 : 0.030, id == 1 ? -1 : 0.0));
  const double correlation =
      keel::calibration_from_served_steps(runs, 1)["step_jitter"]["lag1_correlation"];
  EXPECT_GT(correlation, 0.9);
  EXPECT_LE(correlation, 0.99);

  // Prefill shapes take the weighted line through their medians: (0, 64) 100 ms x 6,
  // (1, 64) one 200 ms outlier, (2, 64) 120 ms x 6. Sums: w 13, wx 13, wy 1.52, wxx 25,
  // wxy 1.64; slope (13 * 1.64 - 13 * 1.52) / (13 * 25 - 13^2) = 0.01 s per decode token,
  // intercept (1.52 - 0.13) / 13. No gaps (every step after an idle wait): cost = seconds.
  json prefills = json::array();
  int64_t id = 1;
  for (int i = 0; i < 6; ++i) prefills.push_back(served_step(id++, 0, 64, 0.100, -1));
  prefills.push_back(served_step(id++, 1, 64, 0.200, -1));
  for (int i = 0; i < 6; ++i) prefills.push_back(served_step(id++, 2, 64, 0.120, -1));
  const double intercept = (1.52 - 0.13) / 13;
  const json fitted = keel::calibration_from_served_steps(prefills, 1);
  for (const json& point : fitted["points"]) {
    const double decode = point["num_decode_tokens"].get<double>();
    EXPECT_NEAR(point["step_s"].get<double>(), intercept + 0.01 * decode, 1e-12) << point;
    EXPECT_NEAR(point["median_s"].get<double>(), decode == 1 ? 0.2 : 0.1 + 0.01 * decode, 1e-12);
  }

  // Too few samples of every shape, and records without the fields, are errors.
  EXPECT_THROW(keel::calibration_from_served_steps(steps, 1000), keel::Error);
  json old = steps;
  old[3].erase("gap_before_s");
  EXPECT_THROW(keel::calibration_from_served_steps(old, 1), keel::Error);
}

}  // namespace
