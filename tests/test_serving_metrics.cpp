// /metrics at Qwen3.5-397B scale (60 MoE layers x 512 experts, top-10, TP 4, round_robin), from
// ServingTelemetry fed synthetic steps whose routing and expert times are known exactly:
//  - cardinality per telemetry_expert_latency level, by formula: per-(layer, expert) token
//    counters without a rank label, per-(layer, rank) token counters, expert time as one
//    histogram per layer (default), per expert (opt-in) or none; the default stays inside the
//    series budget (README, "Metrics at 397B scale") and the JSON keeps every expert's detail;
//  - the values: counters = the routing fed, rank counters = the placement's sums, a layer's
//    histogram = the bucket-wise sum of its experts' histograms;
//  - a render holds no lock a step needs: a step folded from inside the render (after the
//    snapshot) completes, and shows in the next render, not in this one;
//  - vLLM's names carry the same samples as keel's; the config keys and their errors.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/serving/serve_config.h"
#include "runtime/serving/serving_telemetry.h"

namespace keel {
namespace {

constexpr int64_t kLayers = 60;
constexpr int64_t kExperts = 512;
constexpr int64_t kTopK = 10;
constexpr int kTp = 4;
// Series budget for the default exposition (README, "Metrics at 397B scale").
constexpr size_t kSeriesBudget = 50000;

ModelConfig qwen35_shape() {
  ModelConfig config;
  config.num_layers = kLayers;
  config.num_experts = kExperts;
  config.top_k = kTopK;
  config.layer_is_moe.assign(kLayers, true);
  return config;
}

ExpertPlacement round_robin() {
  PlacementSpec spec;
  spec.kind = PlacementKind::kRoundRobin;
  return ExpertPlacement::build(spec, kLayers, kExperts, kTp);
}

// Token t of step s in layer l picks experts (7 t + 3 l + 11 s + 37 j) mod 512, j < 10 (37 is
// odd, so the ten are distinct); an expert that got tokens took 1e-5 x (1 + e mod 7) s.
int64_t routed_expert(int64_t step, int64_t token, int64_t layer, int64_t slot) {
  return (7 * token + 3 * layer + 11 * step + 37 * slot) % kExperts;
}

struct SyntheticStep {
  StepRecord record;
  StepObservation observation;
  StepOutput output;
};

SyntheticStep make_step(int64_t step_idx, int64_t num_tokens) {
  SyntheticStep step;
  step.record.id = step_idx;
  step.record.seconds = 0.01;
  step.record.num_seqs = num_tokens;
  step.record.num_tokens = num_tokens;
  step.output.expert_seconds.assign(static_cast<size_t>(kLayers * kExperts), 0.0f);
  for (int64_t layer = 0; layer < kLayers; ++layer)
    for (int64_t token = 0; token < num_tokens; ++token) {
      for (int64_t slot = 0; slot < kTopK; ++slot) {
        const int64_t expert = routed_expert(step_idx, token, layer, slot);
        step.observation.route_ids.push_back(static_cast<int32_t>(expert));
        step.output.expert_seconds[static_cast<size_t>(layer * kExperts + expert)] =
            1e-5f * static_cast<float>(1 + expert % 7);
      }
      step.observation.margins.push_back(0.01f);
    }
  step.output.rank_phase_seconds.assign(kTp, {});
  return step;
}

void fold(ServingTelemetry& telemetry, int64_t step_idx, int64_t num_tokens) {
  SyntheticStep step = make_step(step_idx, num_tokens);
  step.output.observation = &step.observation;
  telemetry.on_step(step.record, step.output);
}

std::string render(const ServingTelemetry& telemetry, ExpertLatencyDetail detail,
                   MetricNames names = MetricNames::kKeel) {
  telemetry::PromText text;
  telemetry.append_prometheus(text, {detail, names});
  return text.str();
}

// Sample lines by metric name (the text before '{' or ' '), and each line's value by series.
struct Samples {
  std::map<std::string, size_t> per_name;
  std::map<std::string, double> value;  // "name{labels}" -> value
  size_t total = 0;
};

Samples parse(const std::string& text) {
  Samples samples;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    const std::string series = line.substr(0, space);
    ++samples.per_name[series.substr(0, series.find_first_of("{ "))];
    samples.value[series] = std::stod(line.substr(space + 1));
    ++samples.total;
  }
  return samples;
}

// Samples of one histogram family: _bucket lines + _sum + _count.
size_t histogram_samples(const Samples& samples, const std::string& family) {
  const auto count = [&](const std::string& name) {
    const auto it = samples.per_name.find(name);
    return it == samples.per_name.end() ? size_t{0} : it->second;
  };
  return count(family + "_bucket") + count(family + "_sum") + count(family + "_count");
}

std::string expert_series(int64_t layer, int64_t expert) {
  return "keel_expert_tokens_total{model_name=\"m\",layer=\"" + std::to_string(layer) +
         "\",expert=\"" + std::to_string(expert) + "\"}";
}

class ServingMetrics : public ::testing::Test {
 protected:
  ServingMetrics() : telemetry_(qwen35_shape(), round_robin(), kTp, "m", TelemetryConfig{}) {
    for (int64_t step = 0; step < 3; ++step) fold(telemetry_, step, 5);
  }
  ServingTelemetry telemetry_;
};

TEST_F(ServingMetrics, CardinalityPerExpertLatencyLevelIsTheFormula) {
  // Each histogram: its finite buckets, +Inf, _sum and _count.
  const size_t per_histogram = telemetry::expert_compute_seconds_bounds().size() + 3;
  ASSERT_EQ(per_histogram, 32u);
  const Samples layer = parse(render(telemetry_, ExpertLatencyDetail::kLayer));
  const Samples expert = parse(render(telemetry_, ExpertLatencyDetail::kExpert));
  const Samples off = parse(render(telemetry_, ExpertLatencyDetail::kOff));
  for (const Samples* samples : {&layer, &expert, &off}) {
    EXPECT_EQ(samples->per_name.at("keel_expert_tokens_total"), size_t{kLayers * kExperts});
    EXPECT_EQ(samples->per_name.at("keel_moe_rank_tokens_total"), size_t{kLayers * kTp});
  }
  EXPECT_EQ(histogram_samples(layer, "keel_expert_seconds"), kLayers * per_histogram);
  EXPECT_EQ(histogram_samples(expert, "keel_expert_seconds"), kLayers * kExperts * per_histogram);
  EXPECT_EQ(histogram_samples(off, "keel_expert_seconds"), 0u);
  // Levels differ only in keel_expert_seconds.
  EXPECT_EQ(expert.total - layer.total, (kLayers * kExperts - kLayers) * per_histogram);
  EXPECT_EQ(layer.total - off.total, kLayers * per_histogram);
  EXPECT_LT(layer.total, kSeriesBudget) << "the default exposition outgrew its budget";
  EXPECT_GT(expert.total, 1000000u) << "per-expert histograms are the ~1 M the issue measured";
  // No rank label on the per-expert counters: the placement implies it.
  const std::string text = render(telemetry_, ExpertLatencyDetail::kLayer);
  EXPECT_EQ(text.find("keel_expert_tokens_total{model_name=\"m\",layer=\"0\",expert=\"0\",rank"),
            std::string::npos);
  EXPECT_NE(text.find("# TYPE keel_expert_seconds histogram"), std::string::npos);
  EXPECT_EQ(render(telemetry_, ExpertLatencyDetail::kOff).find("keel_expert_seconds"),
            std::string::npos);
  // The JSON keeps every expert's latency percentiles and rank whatever /metrics shows.
  const nlohmann::json experts = telemetry_.experts_json();
  ASSERT_EQ(experts["layers"].size(), size_t{kLayers});
  EXPECT_EQ(experts["layers"][0]["expert_seconds"]["p99"].size(), size_t{kExperts});
  EXPECT_EQ(experts["expert_rank"][7][5], 5 % kTp);
}

TEST_F(ServingMetrics, ValuesAreTheRoutingFedAndLayerHistogramsSumTheirExperts) {
  // Expected tokens per (layer, expert) from the same formula the steps were built with.
  std::vector<int64_t> expected(static_cast<size_t>(kLayers * kExperts), 0);
  for (int64_t step = 0; step < 3; ++step)
    for (int64_t layer = 0; layer < kLayers; ++layer)
      for (int64_t token = 0; token < 5; ++token)
        for (int64_t slot = 0; slot < kTopK; ++slot)
          ++expected[static_cast<size_t>(layer * kExperts +
                                         routed_expert(step, token, layer, slot))];
  const Samples layer = parse(render(telemetry_, ExpertLatencyDetail::kLayer));
  const Samples expert = parse(render(telemetry_, ExpertLatencyDetail::kExpert));
  for (int64_t l = 0; l < kLayers; ++l) {
    std::vector<int64_t> per_rank(kTp, 0);
    for (int64_t e = 0; e < kExperts; ++e) {
      const int64_t tokens = expected[static_cast<size_t>(l * kExperts + e)];
      ASSERT_EQ(layer.value.at(expert_series(l, e)), static_cast<double>(tokens))
          << "layer " << l << " expert " << e;
      per_rank[static_cast<size_t>(e % kTp)] += tokens;
    }
    for (int rank = 0; rank < kTp; ++rank)
      EXPECT_EQ(layer.value.at("keel_moe_rank_tokens_total{model_name=\"m\",layer=\"" +
                               std::to_string(l) + "\",rank=\"" + std::to_string(rank) + "\"}"),
                static_cast<double>(per_rank[static_cast<size_t>(rank)]));
  }
  // Each layer histogram's cumulative buckets, sum and count = its experts' added up.
  for (const int64_t l : {int64_t{0}, int64_t{31}, kLayers - 1}) {
    const std::string layer_labels = "model_name=\"m\",layer=\"" + std::to_string(l) + "\"";
    std::vector<std::string> les;
    for (const double bound : telemetry::expert_compute_seconds_bounds())
      les.push_back(telemetry::format_value(bound));
    les.push_back("+Inf");
    double observed = 0;
    for (const std::string& le : les) {
      double sum_over_experts = 0;
      for (int64_t e = 0; e < kExperts; ++e)
        sum_over_experts +=
            expert.value.at("keel_expert_seconds_bucket{" + layer_labels + ",expert=\"" +
                            std::to_string(e) + "\",le=\"" + le + "\"}");
      EXPECT_EQ(
          layer.value.at("keel_expert_seconds_bucket{" + layer_labels + ",le=\"" + le + "\"}"),
          sum_over_experts)
          << "layer " << l << " le " << le;
      observed = sum_over_experts;
    }
    // One observation per (step, expert that got tokens): at most 3 steps x 50 pairs.
    EXPECT_GT(observed, 0);
    EXPECT_EQ(layer.value.at("keel_expert_seconds_count{" + layer_labels + "}"), observed);
  }
}

TEST(ServingMetricsLock, ARenderHoldsNoLockAStepNeeds) {
  ServingTelemetry* target = nullptr;
  bool step_completed = false;
  int hook_calls = 0;
  std::future<void> step;  // outlives the hook: a held lock must not deadlock the test itself
  TelemetryConfig options;
  // Runs inside append_prometheus, between its snapshot and its formatting: folds a step from
  // another thread, as the engine's leader would. Were the render still holding the mutex the
  // step needs, the step could not finish until the render did: the bounded wait would run out
  // (a deadlock detector, not a timing measurement; a passing run does not wait at all).
  options.after_metrics_snapshot = [&] {
    if (++hook_calls != 1) return;
    step = std::async(std::launch::async, [&] { fold(*target, 100, 2); });
    step_completed = step.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  };
  ServingTelemetry telemetry(qwen35_shape(), round_robin(), kTp, "m", options);
  target = &telemetry;
  fold(telemetry, 0, 5);
  const Samples during = parse(render(telemetry, ExpertLatencyDetail::kLayer));
  step.get();
  EXPECT_TRUE(step_completed) << "a step waited for a /metrics render";
  // The render shows its snapshot (one step), the next render both.
  EXPECT_EQ(during.value.at("keel_step_seconds_count{model_name=\"m\"}"), 1);
  const Samples after = parse(render(telemetry, ExpertLatencyDetail::kLayer));
  EXPECT_EQ(after.value.at("keel_step_seconds_count{model_name=\"m\"}"), 2);
  EXPECT_EQ(hook_calls, 2);
}

TEST_F(ServingMetrics, VllmNamesCarryTheSameSamplesAsKeelNames) {
  RequestRecord request;
  request.id = "r";
  request.queue_s = 0.01;
  request.ttft_s = 0.05;
  request.e2e_s = 0.5;
  request.prompt_tokens = 12;
  request.completion_tokens = 4;
  request.max_tokens = 16;
  request.token_times_s = {0.05, 0.2, 0.3, 0.5};
  telemetry_.on_request(request);
  const std::string keel = render(telemetry_, ExpertLatencyDetail::kLayer, MetricNames::kKeel);
  const std::string both = render(telemetry_, ExpertLatencyDetail::kLayer, MetricNames::kVllm);
  EXPECT_EQ(keel.find("vllm:"), std::string::npos);
  const Samples keel_samples = parse(keel);
  const Samples both_samples = parse(both);
  const std::pair<const char*, const char*> aliases[] = {
      {"keel_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"},
      {"keel_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"},
      {"keel_inter_token_latency_seconds", "vllm:time_per_output_token_seconds"},
      {"keel_request_time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds"},
      {"keel_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"},
      {"keel_request_queue_time_seconds", "vllm:request_queue_time_seconds"},
      {"keel_request_prefill_time_seconds", "vllm:request_prefill_time_seconds"},
      {"keel_request_decode_time_seconds", "vllm:request_decode_time_seconds"},
      {"keel_request_inference_time_seconds", "vllm:request_inference_time_seconds"},
      {"keel_request_prompt_tokens", "vllm:request_prompt_tokens"},
      {"keel_request_generation_tokens", "vllm:request_generation_tokens"},
      {"keel_request_max_num_generation_tokens", "vllm:request_max_num_generation_tokens"}};
  for (const auto& [keel_name, vllm_name] : aliases) {
    size_t compared = 0;
    for (const auto& [series, value] : keel_samples.value) {
      if (series.rfind(std::string(keel_name) + "_", 0) != 0) continue;
      const std::string alias = vllm_name + series.substr(std::string(keel_name).size());
      ASSERT_TRUE(both_samples.value.count(alias)) << alias;
      EXPECT_EQ(both_samples.value.at(alias), value) << alias;
      ++compared;
    }
    EXPECT_GT(compared, 3u) << keel_name;
  }
  // The request's own numbers: prefill = TTFT - queue, decode = e2e - TTFT.
  EXPECT_DOUBLE_EQ(keel_samples.value.at("keel_request_prefill_time_seconds_sum{model_name=\"m\"}"),
                   0.05 - 0.01);
  EXPECT_DOUBLE_EQ(keel_samples.value.at("keel_request_decode_time_seconds_sum{model_name=\"m\"}"),
                   0.5 - 0.05);
  EXPECT_EQ(keel_samples.value.at("keel_request_max_num_generation_tokens_sum{model_name=\"m\"}"),
            16);
  EXPECT_EQ(keel_samples.value.at("keel_inter_token_latency_seconds_count{model_name=\"m\"}"), 3);
}

TEST(ServingMetricsConfig, KeysParseAndBadValuesAreNamed) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("keel_test_serving_metrics_" + std::to_string(::getpid())))
                              .string();
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = dir + "/" + name;
    std::ofstream(path) << text;
    return path;
  };
  const ServeConfig defaults = load_serve_config(write("d.yaml", "model: m\n"));
  EXPECT_EQ(defaults.telemetry_expert_latency, ExpertLatencyDetail::kLayer);
  EXPECT_EQ(defaults.metrics_names, MetricNames::kKeel);
  EXPECT_EQ(defaults.metrics_cache_s, 1.0);
  const ServeConfig set = load_serve_config(
      write("s.yaml",
            "model: m\ntelemetry_expert_latency: expert\nmetrics_names: vllm\nmetrics_cache_s: "
            "0\n"));
  EXPECT_EQ(set.telemetry_expert_latency, ExpertLatencyDetail::kExpert);
  EXPECT_EQ(set.metrics_names, MetricNames::kVllm);
  EXPECT_EQ(set.metrics_cache_s, 0.0);
  EXPECT_EQ(load_serve_config(write("o.yaml", "model: m\ntelemetry_expert_latency: off\n"))
                .telemetry_expert_latency,
            ExpertLatencyDetail::kOff);
  auto error_of = [&](const std::string& text) {
    try {
      load_serve_config(write("bad.yaml", "model: m\n" + text));
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("telemetry_expert_latency: per_expert\n")
                .find("key 'telemetry_expert_latency' is 'per_expert'; expected off, layer or "
                      "expert"),
            std::string::npos);
  EXPECT_NE(error_of("metrics_names: prometheus\n")
                .find("key 'metrics_names' is 'prometheus'; expected keel or vllm"),
            std::string::npos);
  EXPECT_NE(error_of("metrics_cache_s: -1\n").find("metrics_cache_s"), std::string::npos);
  EXPECT_NE(error_of("metrics_cache_s: 7200\n").find("metrics_cache_s"), std::string::npos);
  EXPECT_NE(error_of("metrics_cache_s: .nan\n"), "no error");
  EXPECT_THROW(parse_metric_names("VLLM", "--metrics-names"), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace keel
