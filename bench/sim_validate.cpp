// bench_sim_validate: does `keel simulate`, calibrated on keel's own engine, predict keel's own
// measured serving latencies? Prints predicted vs measured side by side (goal: within 10%).
//
// Method:
//  1. `keel calibrate --config CFG` measures engine step times on a grid of step shapes (or
//     --calibration FILE reuses a file; or --calibrate-load R1[,R2..] serves calibration loads
//     at those rates first and calibrates from the server's own step records, `keel calibrate
//     --from-url --first-step` after the warm-up, step medians plus their jitter).
//     The server first serves --warmup requests one at a time (first-touch of weights and the
//     KV pool; never measured).
//  2. `keel serve --config CFG` runs; for each held-out load (open loop, Poisson arrivals at rate
//     R, fixed prompt/output lengths, ignore_eos) the load generator records every request's
//     send time, TTFT, inter-token gaps and end.
//  3. The simulator replays exactly those arrivals (the recorded send times and lengths) through
//     the real BatchScheduler with the same limits, with step times from the calibration; with
//     step jitter in the calibration, --sim-runs runs with different jitter seeds and each
//     predicted metric is the median over them.
//  4. For each load: TTFT p50/p99, ITL p50/p99, TPOT p50 and output throughput, measured vs
//     predicted, and the relative error.
//  5. Diagnostics per load: the same simulation with the load's own served step times (`keel
//     calibrate --from-url --first-step` over just that load; not a prediction: it separates
//     the simulator's own error from step-time change), and the step-time drift: how much
//     slower the load's steps ran than the calibration's, shape for shape.
//  --save-dir DIR keeps DIR/calibration-steps.json and DIR/steps.json (the server's step records
//  after the calibration loads and at the end) and DIR/load-N.json (each load as
//  `keel bench serve --save-json` writes it, with its first/last step ids), so calibrations and
//  simulations can be redone offline: `keel calibrate --from-steps DIR/steps.json --first-step A
//  --last-step B`, `keel simulate --trace DIR/load-N.json --calibration FILE`.
// The loads are "held out": their rates and the resulting step shapes are not calibration
// points (calibration runs isolated synthetic steps, not loads).
//
// JSON on stdout: machine, calibration file, per load {measured, predicted, error}; a table on
// stderr.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/machine.h"
#include "runtime/cli/flags.h"
#include "runtime/serving/serve_config.h"
#include "runtime/tools/loadgen/loadgen.h"
#include "runtime/tools/simulation/cost_model.h"
#include "runtime/tools/simulation/simulator.h"

namespace {

using json = nlohmann::json;

struct Args {
  std::string keel = "build/bin/keel";
  std::string config = "configs/serve/demo.yaml";
  std::string calibration;
  std::vector<double> calibrate_load_rates;  // non-empty: calibrate from the server's steps
  int warmup = 2;
  int sim_runs = 9;
  std::string save_dir;  // non-empty: keep the step records and each load's requests
  std::vector<double> rates = {0.5, 1.5, 3.0};
  int num_requests = 40;
  int input_len = 64;
  int output_len = 64;
  uint64_t seed = 7;
};

Args parse_args(int argc, char** argv) {
  Args args;
  keel::flags::FlagSet flags(
      "bench/sim_validate",
      "usage: sim_validate [flags]\n"
      "Predicted (keel calibrate + keel simulate) vs measured (keel serve + keel bench serve)\n"
      "latencies on held-out open-loop loads. Run from the repository root.\n");
  flags.add_string("--keel", &args.keel, "BINARY", "the keel binary");
  flags.add_string("--config", &args.config, "SERVE.yaml", "deployment to serve and calibrate");
  flags.add_string("--calibration", &args.calibration, "FILE", "reuse this calibration");
  flags
      .add_double_list("--calibrate-load", &args.calibrate_load_rates, "R,...",
                       "calibrate from the server's steps under loads at these rates")
      .at_least(0);
  flags.add_int("--warmup", &args.warmup, "N", "requests before measuring").at_least(0);
  flags.add_string("--save-dir", &args.save_dir, "DIR", "keep step records and loads here");
  flags.add_int("--sim-runs", &args.sim_runs, "N", "simulations per load (jitter seeds)");
  flags.add_double_list("--rates", &args.rates, "R,...", "held-out load rates (req/s)").at_least(0);
  flags.add_int("--num-requests", &args.num_requests, "N", "requests per load").at_least(1);
  flags.add_int("--input-len", &args.input_len, "L", "prompt tokens").at_least(1);
  flags.add_int("--output-len", &args.output_len, "L", "output tokens").at_least(1);
  flags.add_int("--seed", &args.seed, "S", "workload seed");
  flags.parse_or_exit(argc, argv);
  args.sim_runs = std::max(1, args.sim_runs);  // as before: 0 or less means one run
  return args;
}

int run_command(const std::string& command) {
  std::cerr << "bench/sim_validate: " << command << "\n";
  return std::system(command.c_str());
}

json read_json(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot read " + path);
  return json::parse(file);
}

void write_json(const std::string& path, const json& value) {
  std::ofstream file(path);
  file << value.dump(1) << "\n";
  if (!file) throw std::runtime_error("cannot write " + path);
}

// The id the server's next step will have.
int64_t next_step_id(const std::string& url) {
  const json steps =
      json::parse(keel::loadgen::http_get(url + "/v1/telemetry/steps").body)["steps"];
  return steps.empty() ? 0 : steps.back()["id"].get<int64_t>() + 1;
}

// How much slower (> 0) this load's steps ran than the calibration's, shape for shape: the
// geometric mean of own / calibrated median step time over the (decode, prefill) shapes both
// measured at least 5 times, weighted by this load's sample counts. 0 when no shape is shared.
double step_time_drift(const json& calibration_points, const json& own_points) {
  double log_sum = 0, weight_sum = 0;
  for (const json& own : own_points) {
    if (own.value("samples", 0) < 5) continue;
    for (const json& reference : calibration_points) {
      // Grid calibrations carry no sample counts: their points are medians of repeats.
      if (reference.value("samples", 5) < 5 ||
          reference["num_decode_tokens"] != own["num_decode_tokens"] ||
          reference["num_prefill_tokens"] != own["num_prefill_tokens"])
        continue;
      const double weight = own["samples"].get<double>();
      log_sum += weight * std::log(own["step_s"].get<double>() / reference["step_s"].get<double>());
      weight_sum += weight;
    }
  }
  return weight_sum > 0 ? std::exp(log_sum / weight_sum) - 1 : 0.0;
}

double relative_error(double predicted, double measured) {
  return measured != 0 ? (predicted - measured) / measured : 0.0;
}

// Predicted value of a metric: the median over the simulation runs.
json compare(const keel::loadgen::Summary& measured,
             const std::vector<keel::loadgen::Summary>& predicted) {
  auto row = [&](double m, auto metric) {
    std::vector<double> values;
    for (const keel::loadgen::Summary& run : predicted) values.push_back(metric(run));
    std::sort(values.begin(), values.end());
    const double p = values[values.size() / 2];
    return json{{"measured", m},
                {"predicted", p},
                {"predicted_min", values.front()},
                {"predicted_max", values.back()},
                {"error", relative_error(p, m)}};
  };
  using Summary = keel::loadgen::Summary;
  return {
      {"median_ttft_ms",
       row(measured.ttft_ms.median, [](const Summary& s) { return s.ttft_ms.median; })},
      {"p99_ttft_ms", row(measured.ttft_ms.p99, [](const Summary& s) { return s.ttft_ms.p99; })},
      {"median_itl_ms",
       row(measured.itl_ms.median, [](const Summary& s) { return s.itl_ms.median; })},
      {"p99_itl_ms", row(measured.itl_ms.p99, [](const Summary& s) { return s.itl_ms.p99; })},
      {"median_tpot_ms",
       row(measured.tpot_ms.median, [](const Summary& s) { return s.tpot_ms.median; })},
      {"output_throughput",
       row(measured.output_throughput, [](const Summary& s) { return s.output_throughput; })}};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args args = parse_args(argc, argv);
    if (!args.save_dir.empty()) std::filesystem::create_directories(args.save_dir);
    const double load_before = keel::bench::one_minute_load_average();
    const bool from_server = args.calibration.empty() && !args.calibrate_load_rates.empty();
    if (args.calibration.empty() && !from_server) {
      args.calibration =
          (std::filesystem::temp_directory_path() / "keel-sim-validate-calibration.json").string();
      // Shapes the loads produce: decodes up to the batch cap, prefill chunks up to the budget.
      const std::string command =
          args.keel + " calibrate --config " + args.config + " --out " + args.calibration +
          " --decode-list 0,1,2,4,8,16,32,64 --prefill-list 0,64,128,256,512"
          " --context-list 64,128 --repeats 3 >&2";
      if (run_command(command) != 0) throw std::runtime_error("keel calibrate failed");
    }
    keel::ServeConfig serve = keel::load_serve_config(args.config);

    keel::sim::SimulationConfig sim_config;
    sim_config.scheduler.block_size = static_cast<int32_t>(serve.block_size);
    // The demo pool (kv_cache_mb) holds thousands of blocks; these loads never fill it. The
    // prediction reports its preemptions so a too-small assumption would show.
    sim_config.scheduler.num_kv_blocks =
        static_cast<int32_t>(serve.num_kv_blocks > 0 ? serve.num_kv_blocks : 8192);
    sim_config.scheduler.max_num_seqs = serve.max_num_seqs;
    sim_config.scheduler.max_num_batched_tokens = serve.max_num_batched_tokens;
    sim_config.max_waiting = serve.max_waiting;

    keel::loadgen::ServerProcess server(
        {args.keel, "serve", "--config", args.config, "--port", "0"});
    const std::string url = server.start(std::chrono::minutes(5));
    auto make_spec = [&](double rate, uint64_t seed) {
      keel::loadgen::LoadSpec spec;
      spec.url = url;
      spec.request_rate = rate;
      spec.num_prompts = args.num_requests;
      spec.input_len_min = spec.input_len_max = args.input_len;
      spec.output_len_min = spec.output_len_max = args.output_len;
      spec.ignore_eos = true;
      spec.seed = seed;
      return spec;
    };
    if (args.warmup > 0) {
      keel::loadgen::LoadSpec warmup = make_spec(0, args.seed + 2000);
      warmup.concurrency = 1;
      warmup.num_prompts = args.warmup;
      if (keel::loadgen::run_load(warmup).summary.failed > 0)
        throw std::runtime_error("warm-up requests failed");
    }
    if (from_server) {
      // The first step after the warm-up: calibration uses only the calibration loads' steps.
      const json steps =
          json::parse(keel::loadgen::http_get(url + "/v1/telemetry/steps").body)["steps"];
      const int64_t first_step = steps.empty() ? 0 : steps.back()["id"].get<int64_t>() + 1;
      // Calibration loads at their own rates (not the held-out rates) and seeds, then the step
      // shapes the server recorded while serving them.
      for (size_t i = 0; i < args.calibrate_load_rates.size(); ++i) {
        keel::loadgen::LoadResult load =
            keel::loadgen::run_load(make_spec(args.calibrate_load_rates[i], args.seed + 1000 + i));
        if (load.summary.failed > 0) throw std::runtime_error("calibration load: requests failed");
      }
      if (!args.save_dir.empty())  // now: the server keeps only its last 8192 step records
        write_json(args.save_dir + "/calibration-steps.json",
                   json::parse(keel::loadgen::http_get(url + "/v1/telemetry/steps").body));
      args.calibration =
          (std::filesystem::temp_directory_path() / "keel-sim-validate-served-calibration.json")
              .string();
      if (run_command(args.keel + " calibrate --from-url " + url + " --first-step " +
                      std::to_string(first_step) + " --out " + args.calibration + " >&2") != 0)
        throw std::runtime_error("keel calibrate --from-url failed");
    }
    keel::sim::CalibratedCostModel cost = keel::sim::CalibratedCostModel::load(args.calibration);
    json loads = json::array();
    bool all_within = true;
    const json calibration_points = read_json(args.calibration)["points"];
    for (double rate : args.rates) {
      const int64_t first_step = next_step_id(url);
      keel::loadgen::LoadResult measured = keel::loadgen::run_load(make_spec(rate, args.seed));
      if (measured.summary.failed > 0)
        throw std::runtime_error("load at rate " + std::to_string(rate) + ": " +
                                 std::to_string(measured.summary.failed) + " requests failed");
      std::vector<keel::sim::SimRequest> requests;
      for (const auto& record : measured.records)
        requests.push_back({record.start_s, record.prompt_tokens, record.completion_tokens});
      // The most preemptions / rejections of the prediction's runs (not the diagnostic's).
      int64_t preemptions = 0, rejected = 0;
      auto simulate_runs = [&](const keel::sim::CalibratedCostModel& model, bool tally) {
        std::vector<keel::loadgen::Summary> summaries;
        const int runs = model.step_jitter() ? args.sim_runs : 1;
        for (int run = 0; run < runs; ++run) {
          sim_config.jitter_seed = static_cast<uint64_t>(run) + 1;
          keel::sim::SimulationResult result = keel::sim::simulate(requests, sim_config, model);
          summaries.push_back(result.summary);
          if (!tally) continue;
          preemptions = std::max(preemptions, result.preemptions);
          rejected = std::max(rejected, result.rejected);
        }
        return summaries;
      };
      const std::vector<keel::loadgen::Summary> predicted = simulate_runs(cost, true);
      json comparison = compare(measured.summary, predicted);
      // Diagnostic, not a prediction: the same simulation with this load's own step times (a
      // calibration from its served steps). Its error is the simulator's (scheduling, queueing,
      // jitter model); the rest of the prediction's error is step-time change between the
      // calibration and this load, reported as the drift.
      const std::string own_path =
          (std::filesystem::temp_directory_path() /
           ("keel-sim-validate-load-" + std::to_string(loads.size()) + ".json"))
              .string();
      if (run_command(args.keel + " calibrate --from-url " + url + " --first-step " +
                      std::to_string(first_step) + " --out " + own_path + " >&2") != 0)
        throw std::runtime_error("keel calibrate --from-url (the load's own steps) failed");
      const json own_calibration = read_json(own_path);
      const json replay =
          compare(measured.summary,
                  simulate_runs(
                      keel::sim::CalibratedCostModel::from_json(own_calibration, own_path), false));
      const double drift = step_time_drift(calibration_points, own_calibration["points"]);
      std::fprintf(stderr, "%-6s %-18s %10s %10s %8s %10s %8s\n", "rate", "metric", "measured",
                   "predicted", "error", "own-steps", "error");
      for (const auto& [metric, values] : comparison.items()) {
        std::fprintf(stderr, "%-6.2f %-18s %10.2f %10.2f %+7.1f%% %10.2f %+7.1f%%\n", rate,
                     metric.c_str(), values["measured"].get<double>(),
                     values["predicted"].get<double>(), 100 * values["error"].get<double>(),
                     replay[metric]["predicted"].get<double>(),
                     100 * replay[metric]["error"].get<double>());
        if (std::abs(values["error"].get<double>()) > 0.10) all_within = false;
      }
      std::fprintf(stderr, "%-6.2f step times of this load vs the calibration: %+.1f%%\n", rate,
                   100 * drift);
      if (!args.save_dir.empty()) {
        // A `keel bench serve --save-json` file: `keel simulate --trace` replays it.
        json saved = keel::loadgen::summary_json(measured.summary);
        saved["summary_errors"] = saved["errors"];
        saved.update(keel::loadgen::records_json(measured.records));
        saved["load"] = keel::loadgen::spec_json(make_spec(rate, args.seed));
        saved["first_step"] = first_step;
        saved["last_step"] = next_step_id(url) - 1;
        write_json(args.save_dir + "/load-" + std::to_string(loads.size()) + ".json", saved);
      }
      loads.push_back({{"rate", rate},
                       {"num_requests", args.num_requests},
                       {"comparison", comparison},
                       {"replay_with_own_step_times", replay},
                       {"step_time_drift", drift},
                       {"simulation_runs", static_cast<int>(predicted.size())},
                       {"predicted_preemptions", preemptions},
                       {"predicted_rejected", rejected}});
    }
    if (!args.save_dir.empty())
      write_json(args.save_dir + "/steps.json",
                 json::parse(keel::loadgen::http_get(url + "/v1/telemetry/steps").body));
    const int server_status = server.stop(std::chrono::seconds(60));
    json out = {{"benchmark", "sim_validate"},
                {"machine",
                 {{"name", keel::bench::machine_name()},
                  {"load_average_before", load_before},
                  {"load_average_after", keel::bench::one_minute_load_average()}}},
                {"config", args.config},
                {"calibration", args.calibration},
                {"calibration_source",
                 from_server ? "served steps of the calibration loads" : "keel calibrate grid"},
                {"calibrate_load_rates", args.calibrate_load_rates},
                {"input_len", args.input_len},
                {"output_len", args.output_len},
                {"loads", loads},
                {"server_exit_status", server_status},
                {"within_10_percent", all_within}};
    std::cout << out.dump(1) << std::endl;
    return server_status == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "bench/sim_validate: error: " << error.what() << "\n";
    return 2;
  }
}
