// bench/metrics: what one /metrics scrape costs at Qwen3.5-397B scale (the qwen35-shape preset:
// 60 MoE layers x 512 experts, top-10, tiny widths), per telemetry_expert_latency level, and
// what concurrent scrapers cost generation with and without the scrape cache.
//
// Design. In-process, no HTTP: one Engine (--tp thread ranks, fixed_order, round_robin) serves
// a ServingEngine through Engine::serve, as keel serve does.
//  1. Exposition: --requests requests (16-token prompts, --max-tokens tokens each, greedy) fill
//     the counters and histograms; then, for each level (off, layer, expert), --renders fresh
//     renders (ServingEngine::render_metrics, the body GET /metrics serves): series (sample
//     lines; each is one Prometheus series), bytes, render time (median and min), the time the
//     telemetry mutex is held (the snapshot copy: from the call to the moment the formatting
//     starts, via TelemetryConfig::after_metrics_snapshot), and the largest families.
//     The default level must fit the budget (series, bytes, render time; README, "Metrics at
//     397B scale"): "within_budget", exit 1 when not.
//  2. Scrape load (issue 16's "4 scrapers cut generation from ~153 to ~103 tok/s"): for
//     metrics_cache_s 0 (render every scrape) and --cache-s (default 1), with each count in
//     --scrapers-list of threads calling ServingEngine::prometheus() (what the HTTP route calls;
//     sockets left out) every --scrape-interval-ms (default 100: 10 scrapes/s each, far more
//     than a Prometheus server's one per 15 s; 0: back to back, where the scrapers' own copying
//     of the body competes for the cores whatever the cache does), --load-requests concurrent
//     requests of --load-tokens
//     tokens: generated tokens / wall time from the first submit to the last finish. Rounds
//     alternate the order of the configurations (ABBA) so drift hits all alike; medians.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/common/logging.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/serving/serving_engine.h"

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// The default exposition's budget (README, "Metrics at 397B scale", says why these numbers).
constexpr int64_t kBudgetSeries = 50000;
constexpr int64_t kBudgetBytes = 4 << 20;
constexpr double kBudgetRenderSeconds = 0.25;

struct Options {
  std::string model_dir;
  std::string preset = "qwen35-shape";
  int tp = 4;
  int64_t requests = 8;
  int64_t max_tokens = 8;
  int renders = 5;
  int64_t load_requests = 8;
  int64_t load_tokens = 24;
  std::vector<int> scrapers_list = {0, 4};
  double cache_s = 1.0;
  int64_t scrape_interval_ms = 100;
  int rounds = 3;
  bool skip_load = false;
};

Options parse_options(int argc, char** argv) {
  Options options;
  keel::flags::FlagSet flags("bench/metrics",
                             "usage: metrics [flags]\n"
                             "/metrics series, bytes and render time per "
                             "telemetry_expert_latency level, and generation tok/s under "
                             "concurrent scrapers with and without the scrape cache.\n");
  flags.add_string("--model", &options.model_dir, "DIR", "checkpoint (default: --preset's)");
  flags.add_string("--preset", &options.preset, "NAME", "gen-model preset when no --model");
  flags.add_int("--tp", &options.tp, "N", "thread ranks").at_least(1);
  flags.add_int("--requests", &options.requests, "N", "requests before rendering").at_least(1);
  flags.add_int("--max-tokens", &options.max_tokens, "N", "tokens per request").at_least(1);
  flags.add_int("--renders", &options.renders, "R", "renders per level").at_least(1);
  flags.add_int("--load-requests", &options.load_requests, "N", "concurrent requests under load")
      .at_least(1);
  flags.add_int("--load-tokens", &options.load_tokens, "N", "tokens per request under load")
      .at_least(1);
  flags.add_int_list("--scrapers-list", &options.scrapers_list, "K,...", "scraper threads")
      .at_least(0);
  flags.add_double("--cache-s", &options.cache_s, "S", "metrics_cache_s of the cached runs");
  flags
      .add_int("--scrape-interval-ms", &options.scrape_interval_ms, "MS",
               "pause between one scraper's scrapes (0: back to back)")
      .at_least(0);
  flags.add_int("--rounds", &options.rounds, "R", "ABBA rounds of the scrape load").at_least(1);
  flags.add_switch("--skip-load", &options.skip_load, "exposition only (no scrape load)");
  flags.parse_or_exit(argc, argv);
  return options;
}

class CountingSink final : public keel::server::TokenSink {
 public:
  explicit CountingSink(std::atomic<int64_t>& tokens) : tokens_(tokens) {}
  void on_token(const keel::server::GeneratedToken&) override { ++tokens_; }
  void on_finish(const std::string&, keel::server::Usage) override {}
  void on_error(const std::string& message) override {
    std::cerr << "bench/metrics: request failed: " << message << "\n";
  }
  bool cancelled() const override { return false; }

 private:
  std::atomic<int64_t>& tokens_;
};

struct Workload {
  int64_t requests = 0;
  int64_t max_tokens = 0;
};

// Submits the workload to `serving`, serves it to the end on this thread, and returns the wall
// seconds from the first submit to the moment every request had finished.
double serve(keel::Engine& engine, keel::ServingEngine& serving, const Workload& workload,
             std::atomic<int64_t>& tokens) {
  const Clock::time_point start = Clock::now();
  for (int64_t index = 0; index < workload.requests; ++index) {
    keel::server::CompletionRequest request;
    std::vector<int32_t> prompt;
    for (int64_t t = 0; t < 16; ++t)
      prompt.push_back(static_cast<int32_t>(3 + (index * 16 + t) * 7 % 250));
    request.prompt_tokens = std::move(prompt);
    request.max_tokens = static_cast<int>(workload.max_tokens);
    request.temperature = 0;
    request.ignore_eos = true;
    request.request_id = "bench-" + std::to_string(index);
    if (auto error = serving.prepare(request)) keel::throw_error("prepare: ", error->message);
    if (!serving.try_submit(std::move(request), std::make_shared<CountingSink>(tokens)))
      keel::throw_error("submit refused");
  }
  Clock::time_point finished{};
  std::thread stopper([&] {
    while (serving.stats().requests_finished + serving.stats().requests_aborted < workload.requests)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    finished = Clock::now();
    serving.request_stop();
  });
  keel::ServeOptions serve_options;
  serve_options.block_size = 16;
  serve_options.num_kv_blocks = 256;
  serve_options.num_state_slots = engine.config().is_hybrid() ? 64 : 0;
  engine.serve(&serving, serve_options);
  stopper.join();
  return std::chrono::duration<double>(finished - start).count();
}

keel::ServingConfig serving_config(const keel::Engine& engine, double cache_s) {
  keel::ServingConfig config;
  config.model_name = "bench";
  config.scheduler.num_kv_blocks = 256;
  config.scheduler.block_size = 16;
  config.scheduler.max_num_seqs = 64;
  config.scheduler.max_num_batched_tokens = 512;
  if (engine.config().is_hybrid()) config.scheduler.num_state_slots = 64;
  config.max_waiting = 1 << 20;
  config.metrics_cache_s = cache_s;
  return config;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

json describe_exposition(const std::string& text) {
  std::map<std::string, int64_t> per_family;
  int64_t series = 0;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::string name = line.substr(0, line.find_first_of("{ "));
    for (const char* suffix : {"_bucket", "_sum", "_count"})
      if (name.ends_with(suffix) &&
          text.find("# TYPE " + name.substr(0, name.size() - std::strlen(suffix)) + " histogram") !=
              std::string::npos) {
        name.resize(name.size() - std::strlen(suffix));
        break;
      }
    ++per_family[name];
    ++series;
  }
  std::vector<std::pair<std::string, int64_t>> largest(per_family.begin(), per_family.end());
  std::sort(largest.begin(), largest.end(),
            [](const auto& a, const auto& b) { return a.second > b.second; });
  json top = json::array();
  for (size_t i = 0; i < std::min<size_t>(5, largest.size()); ++i)
    top.push_back({{"family", largest[i].first}, {"series", largest[i].second}});
  return {{"series", series},
          {"bytes", static_cast<int64_t>(text.size())},
          {"families", static_cast<int64_t>(per_family.size())},
          {"largest_families", top}};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options = parse_options(argc, argv);
    keel::init_logging(false);  // warnings to stderr: stdout is the JSON report
    if (options.model_dir.empty()) {
      options.model_dir = std::string(KEEL_BINARY_DIR) + "/bench-models/" + options.preset;
      if (!std::filesystem::exists(options.model_dir + "/config.json")) {
        std::cerr << "bench/metrics: writing the " << options.preset << " preset to "
                  << options.model_dir << "\n";
        keel::GenModelOptions gen_options;
        gen_options.seed = 1;
        keel::generate_model(keel::load_model_preset(keel::find_model_preset(options.preset)),
                             gen_options, options.model_dir);
      }
    }
    keel::EngineOptions engine_options;
    engine_options.tp_size = options.tp;
    engine_options.placement.kind = keel::PlacementKind::kRoundRobin;
    engine_options.reduce = keel::comm::ReduceAlgo::kFixedOrder;
    keel::Engine engine(options.model_dir, engine_options);
    const keel::ModelConfig& model = engine.config();
    int64_t moe_layers = 0;
    for (const bool moe : model.layer_is_moe) moe_layers += moe ? 1 : 0;

    json report;
    report["benchmark"] = "metrics";
    report["machine"] = {{"cpu", keel::bench::machine_name()},
                         {"load_average_before", keel::bench::one_minute_load_average()}};
    report["model"] = {{"dir", options.model_dir}, {"layers", model.num_layers},
                       {"moe_layers", moe_layers}, {"experts", model.num_experts},
                       {"top_k", model.top_k},     {"tp", options.tp}};
    report["budget"] = {{"series", kBudgetSeries},
                        {"bytes", kBudgetBytes},
                        {"render_seconds", kBudgetRenderSeconds}};

    // 1. The exposition per level, on one state.
    double snapshot_done = 0;
    keel::ServingConfig config = serving_config(engine, 0);
    config.telemetry_options.after_metrics_snapshot = [&] {
      snapshot_done = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    };
    bool within_budget = true;
    {
      keel::ServingEngine serving(engine, options.model_dir, config);
      std::atomic<int64_t> tokens{0};
      serve(engine, serving, {options.requests, options.max_tokens}, tokens);
      report["exposition_state"] = {{"requests", options.requests},
                                    {"tokens_generated", tokens.load()}};
      json levels = json::array();
      for (const auto detail : {keel::ExpertLatencyDetail::kOff, keel::ExpertLatencyDetail::kLayer,
                                keel::ExpertLatencyDetail::kExpert}) {
        std::vector<double> render_s, locked_s;
        std::string text;
        for (int r = 0; r < options.renders; ++r) {
          const Clock::time_point start = Clock::now();
          text = serving.render_metrics({detail, keel::MetricNames::kKeel});
          render_s.push_back(std::chrono::duration<double>(Clock::now() - start).count());
          // The mutex alone: the telemetry's own append (the snapshot is its first act).
          keel::telemetry::PromText scratch;
          const double begin =
              std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
          serving.telemetry().append_prometheus(scratch, {detail, keel::MetricNames::kKeel});
          locked_s.push_back(snapshot_done - begin);
        }
        json entry = describe_exposition(text);
        entry["telemetry_expert_latency"] = std::string(keel::expert_latency_detail_name(detail));
        entry["render_seconds_median"] = median(render_s);
        entry["render_seconds_min"] = *std::min_element(render_s.begin(), render_s.end());
        entry["lock_held_seconds_median"] = median(locked_s);
        const int64_t vllm_extra =
            static_cast<int64_t>(
                serving.render_metrics({detail, keel::MetricNames::kVllm}).size()) -
            entry["bytes"].get<int64_t>();
        entry["vllm_names_extra_bytes"] = vllm_extra;
        // Correctness: one token counter per (MoE layer, expert), whatever the level.
        int64_t counters = 0;
        for (size_t at = text.find("\nkeel_expert_tokens_total{"); at != std::string::npos;
             at = text.find("\nkeel_expert_tokens_total{", at + 1))
          ++counters;
        if (counters != moe_layers * model.num_experts)
          keel::throw_error("keel_expert_tokens_total has ", counters, " series; expected ",
                            moe_layers * model.num_experts);
        if (detail == keel::ExpertLatencyDetail::kLayer) {
          within_budget = entry["series"].get<int64_t>() <= kBudgetSeries &&
                          entry["bytes"].get<int64_t>() <= kBudgetBytes &&
                          entry["render_seconds_median"].get<double>() <= kBudgetRenderSeconds;
          entry["default"] = true;
        }
        levels.push_back(entry);
      }
      report["levels"] = levels;
      report["within_budget"] = within_budget;
    }

    // 2. Generation under concurrent scrapers, cache off and on.
    if (!options.skip_load) {
      struct Config {
        double cache_s;
        int scrapers;
      };
      std::vector<Config> configs;
      for (const double cache_s : {0.0, options.cache_s})
        for (const int scrapers : options.scrapers_list) {
          if (scrapers == 0 && cache_s != 0.0) continue;  // no scraper: the cache is idle
          configs.push_back({cache_s, scrapers});
        }
      std::vector<std::vector<double>> tok_s(configs.size());
      std::vector<std::vector<double>> scrapes_per_s(configs.size());
      for (int round = 0; round < options.rounds; ++round)
        for (size_t k = 0; k < configs.size(); ++k) {
          const size_t c = round % 2 == 0 ? k : configs.size() - 1 - k;
          keel::ServingEngine serving(engine, options.model_dir,
                                      serving_config(engine, configs[c].cache_s));
          std::atomic<bool> done{false};
          std::atomic<int64_t> scrapes{0}, empty_bodies{0};
          std::vector<std::thread> scrapers;
          for (int s = 0; s < configs[c].scrapers; ++s)
            scrapers.emplace_back([&] {
              while (!done.load()) {
                if (serving.prometheus().empty()) ++empty_bodies;
                ++scrapes;
                std::this_thread::sleep_for(std::chrono::milliseconds(options.scrape_interval_ms));
              }
            });
          std::atomic<int64_t> tokens{0};
          const double seconds =
              serve(engine, serving, {options.load_requests, options.load_tokens}, tokens);
          done = true;
          for (std::thread& scraper : scrapers) scraper.join();
          if (empty_bodies > 0) keel::throw_error(empty_bodies.load(), " empty /metrics bodies");
          tok_s[c].push_back(static_cast<double>(tokens.load()) / seconds);
          scrapes_per_s[c].push_back(static_cast<double>(scrapes.load()) / seconds);
        }
      json load = json::array();
      for (size_t c = 0; c < configs.size(); ++c)
        load.push_back({{"metrics_cache_s", configs[c].cache_s},
                        {"scrapers", configs[c].scrapers},
                        {"tok_s_median", median(tok_s[c])},
                        {"tok_s_rounds", tok_s[c]},
                        {"scrapes_per_s_median", median(scrapes_per_s[c])}});
      report["scrape_load"] = {{"load_requests", options.load_requests},
                               {"scrape_interval_ms", options.scrape_interval_ms},
                               {"load_tokens", options.load_tokens},
                               {"rounds", options.rounds},
                               {"order", "rounds alternate the configuration order (ABBA)"},
                               {"runs", load}};
    }
    report["machine"]["load_average_after"] = keel::bench::one_minute_load_average();
    std::cout << report.dump(2) << std::endl;
    return within_budget ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "bench/metrics: " << error.what() << "\n";
    return 1;
  }
}
