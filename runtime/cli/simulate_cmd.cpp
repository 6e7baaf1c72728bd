// keel simulate: option parsing, the serve config's scheduler settings, cost model choice,
// output and plotting. The command line is documented in simulate_cmd.h; the model in
// runtime/simulation/simulator.h. Mechanics:
//  - Options are "--flag value" pairs parsed by hand as in the rest of the CLI; --slo takes
//    every following word up to the next "--" option (as bench serve's --goodput).
//  - The serve config is read with yaml-cpp directly (only the scheduler keys; the rest is
//    ignored), so the simulator needs neither the model nor the engine.
//  - Plots run scripts/plot_simulation.py with $KEEL_PYTHON, else python3, else
//    /usr/bin/python3 (the interpreter Debian's python3-matplotlib serves).
#include "runtime/cli/simulate_cmd.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "kernels/base/check.h"
#include "runtime/simulation/simulator.h"
#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
#include "runtime/planning/hardware_spec.h"
#include "runtime/planning/model_spec.h"
#include "runtime/planning/quant.h"
#endif

#ifndef KEEL_SOURCE_DIR
#define KEEL_SOURCE_DIR "."
#endif

namespace keel {
namespace {

using nlohmann::json;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: keel simulate [--config SERVE.yaml] [--block-size N]\n"
    "         [--num-kv-blocks N | --kv-block-bytes B] [--max-num-seqs N]\n"
    "         [--max-num-batched-tokens N] [--max-waiting N]\n"
    "         [--cost linear [--base-ms A] [--per-token-ms B] [--per-kv-token-us C]\n"
    "          | --calibration FILE [--no-jitter]] [--expert-fraction F]\n"
    "         (--rate R [--burstiness B] [--num-requests N] [--input-len DIST]\n"
    "          [--output-len DIST] | --trace FILE)\n"
    "         [--zipf S [--num-experts E] [--moe-layers L] | --routing-trace FILE]\n"
    "         [--placement contiguous|round_robin|balanced] [--redundant-experts R] [--tp N]\n"
    "         [--slo ttft:MS tpot:MS e2el:MS] [--sweep-rate MIN:MAX[:STEPS]] [--seed S]\n"
    "         [--json] [--save-json F] [--plot PNG]\n"
    "  DIST: N (fixed) | MIN:MAX (uniform) | lognormal:MEAN:SD\n";

class Args {
 public:
  Args(int argc, char** argv, int first, const std::set<std::string>& flags,
       const std::set<std::string>& valued) {
    for (int i = first; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "-h" || arg == "--help") throw UsageError("");
      if (flags.count(arg)) {
        values_[arg].push_back("");
      } else if (arg == "--slo") {
        auto& list = values_[arg];
        while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0)
          list.push_back(argv[++i]);
        if (list.empty()) throw UsageError("--slo needs KEY:MS values (ttft:MS tpot:MS e2el:MS)");
      } else if (valued.count(arg)) {
        if (i + 1 >= argc) throw UsageError(arg + " needs a value");
        values_[arg].push_back(argv[++i]);
      } else {
        throw UsageError("unknown option '" + arg + "'");
      }
    }
  }
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback = "") const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second.back();
  }
  const std::vector<std::string>& all(const std::string& name) const {
    static const std::vector<std::string> none;
    auto it = values_.find(name);
    return it == values_.end() ? none : it->second;
  }
  double number(const std::string& name, double fallback) const {
    if (!has(name)) return fallback;
    const std::string text = get(name);
    try {
      size_t used = 0;
      double value = std::stod(text, &used);
      if (used == text.size()) return value;
    } catch (const std::exception&) {
    }
    throw UsageError(name + ": '" + text + "' is not a number");
  }
  int64_t integer(const std::string& name, int64_t fallback) const {
    const double value = number(name, static_cast<double>(fallback));
    if (value != static_cast<double>(static_cast<int64_t>(value)))
      throw UsageError(name + " must be an integer");
    return static_cast<int64_t>(value);
  }

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

// The scheduler keys of a serve config (runtime/serving/serve_config.h); others are ignored.
struct ServeDefaults {
  int64_t block_size = 16;
  int64_t num_kv_blocks = 0;
  int64_t kv_cache_mb = 0;
  int64_t max_num_seqs = 64;
  int64_t max_num_batched_tokens = 512;
  int64_t max_waiting = 256;
  int64_t tp = 1;
  std::string placement = "contiguous";
};

ServeDefaults read_serve_config(const std::string& path) {
  ServeDefaults defaults;
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& error) {
    throw_error("serve config ", path, ": ", error.what());
  }
  auto integer = [&](const char* key, int64_t& out) {
    if (!root[key]) return;
    try {
      out = root[key].as<int64_t>();
    } catch (const YAML::Exception&) {
      throw_error("serve config ", path, ": ", key, " must be an integer");
    }
  };
  integer("block_size", defaults.block_size);
  integer("num_kv_blocks", defaults.num_kv_blocks);
  integer("kv_cache_mb", defaults.kv_cache_mb);
  integer("max_num_seqs", defaults.max_num_seqs);
  integer("max_num_batched_tokens", defaults.max_num_batched_tokens);
  integer("max_waiting", defaults.max_waiting);
  integer("tp", defaults.tp);
  if (root["placement"]) defaults.placement = root["placement"].as<std::string>();
  if (root["prefix_caching"] && root["prefix_caching"].as<bool>())
    std::cerr << "keel simulate: note: prefix_caching is simulated as off\n";
  return defaults;
}

std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

void run_plot(const std::string& input, const std::string& output) {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KEEL_PYTHON"); env && *env)
    candidates.push_back(env);
  else
    candidates = {"python3", "/usr/bin/python3"};
  std::string python;
  for (const std::string& candidate : candidates)
    if (std::system((shell_quote(candidate) + " -c 'import matplotlib' >/dev/null 2>&1").c_str()) ==
        0) {
      python = candidate;
      break;
    }
  if (python.empty())
    throw_error(
        "--plot needs python3 with matplotlib, which was not found; install the Debian "
        "package python3-matplotlib, or set KEEL_PYTHON to a python that has it");
  const char* env = std::getenv("KEEL_SCRIPTS_DIR");
  const std::string script =
      (env && *env ? std::string(env) : std::string(KEEL_SOURCE_DIR) + "/scripts") +
      "/plot_simulation.py";
  if (!std::filesystem::exists(script))
    throw_error("plot script ", script, " not found (set KEEL_SCRIPTS_DIR)");
  const std::string command = shell_quote(python) + " " + shell_quote(script) + " " +
                              shell_quote(input) + " " + shell_quote(output);
  if (int status = std::system(command.c_str()); status != 0)
    throw_error("plot_simulation.py failed (status ", status, ")");
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out) throw_error("cannot write ", path);
}

int run(int argc, char** argv) {
  const Args args(argc, argv, 2, {"--json", "--no-jitter"},
                  {"--config",
                   "--block-size",
                   "--num-kv-blocks",
                   "--kv-block-bytes",
                   "--max-num-seqs",
                   "--max-num-batched-tokens",
                   "--max-waiting",
                   "--cost",
                   "--base-ms",
                   "--per-token-ms",
                   "--per-kv-token-us",
                   "--calibration",
                   "--expert-fraction",
                   "--model",
                   "--hardware",
                   "--quant",
                   "--rate",
                   "--burstiness",
                   "--num-requests",
                   "--input-len",
                   "--output-len",
                   "--trace",
                   "--zipf",
                   "--num-experts",
                   "--moe-layers",
                   "--routing-trace",
                   "--placement",
                   "--redundant-experts",
                   "--tp",
                   "--slo",
                   "--sweep-rate",
                   "--seed",
                   "--save-json",
                   "--plot"});

  // Scheduler settings: serve config, then flags.
  ServeDefaults serve;
  if (args.has("--config")) serve = read_serve_config(args.get("--config"));
  sim::SimulationConfig config;
  config.scheduler.block_size =
      static_cast<int32_t>(args.integer("--block-size", serve.block_size));
  int64_t num_kv_blocks = args.integer("--num-kv-blocks", serve.num_kv_blocks);
  if (!args.has("--num-kv-blocks") && num_kv_blocks <= 0) {
    if (serve.kv_cache_mb > 0 && args.has("--kv-block-bytes")) {
      const int64_t block_bytes = args.integer("--kv-block-bytes", 0);
      if (block_bytes < 1) throw UsageError("--kv-block-bytes must be >= 1");
      num_kv_blocks = std::max<int64_t>(1, serve.kv_cache_mb * 1024 * 1024 / block_bytes);
    } else {
      throw UsageError(
          "the KV pool size is unknown: give --num-kv-blocks N (the serve config's kv_cache_mb "
          "needs the model's bytes per block: --kv-block-bytes B, as `keel serve` logs it)");
    }
  }
  if (num_kv_blocks < 1 || num_kv_blocks > (int64_t{1} << 30))
    throw UsageError("--num-kv-blocks out of range");
  config.scheduler.num_kv_blocks = static_cast<int32_t>(num_kv_blocks);
  config.scheduler.max_num_seqs = args.integer("--max-num-seqs", serve.max_num_seqs);
  config.scheduler.max_num_batched_tokens =
      args.integer("--max-num-batched-tokens", serve.max_num_batched_tokens);
  config.max_waiting = args.integer("--max-waiting", serve.max_waiting);
  if (args.has("--slo")) config.slo = loadgen::parse_slo(args.all("--slo"));

  // Cost model.
  std::unique_ptr<sim::StepCostModel> cost;
  [[maybe_unused]] bool roofline = false;  // built below, once the MoE skew factor is known
  json cost_json;
  const std::string cost_kind =
      args.get("--cost", args.has("--calibration") ? "calibration" : "linear");
  if (args.has("--calibration")) {
    if (args.has("--cost") && cost_kind != "calibration")
      throw UsageError("--calibration and --cost " + cost_kind + " exclude each other");
    cost = std::make_unique<sim::CalibratedCostModel>(
        sim::CalibratedCostModel::load(args.get("--calibration")));
    cost_json = {{"kind", "calibration"}, {"file", args.get("--calibration")}};
  } else if (cost_kind == "linear") {
    const double base_ms = args.number("--base-ms", 10.0),
                 per_token_ms = args.number("--per-token-ms", 0.05),
                 per_kv_us = args.number("--per-kv-token-us", 0.0);
    cost =
        std::make_unique<sim::LinearCostModel>(base_ms / 1e3, per_token_ms / 1e3, per_kv_us / 1e6);
    cost_json = {{"kind", "linear"},
                 {"base_ms", base_ms},
                 {"per_token_ms", per_token_ms},
                 {"per_kv_token_us", per_kv_us}};
  } else if (cost_kind == "roofline") {
#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
    if (!args.has("--model") || !args.has("--hardware") || !args.has("--quant"))
      throw UsageError("--cost roofline needs --model M.yaml --hardware H.yaml --quant Q");
    roofline = true;
    cost_json = {{"kind", "roofline"},
                 {"model", args.get("--model")},
                 {"hardware", args.get("--hardware")},
                 {"quant", args.get("--quant")}};
#else
    throw UsageError(
        "--cost roofline needs the planner (runtime/planning), which this build "
        "does not have; use --calibration FILE or --cost linear");
#endif
  } else {
    throw UsageError("--cost must be linear or roofline (or give --calibration FILE)");
  }
  if (args.has("--expert-fraction")) config.expert_fraction = args.number("--expert-fraction", 0.5);

  // MoE skew.
  const int tp = static_cast<int>(args.integer("--tp", serve.tp));
  const sim::SimPlacement placement =
      sim::parse_sim_placement(args.get("--placement", serve.placement));
  const int64_t redundant = args.integer("--redundant-experts", 0);
  const uint64_t seed = static_cast<uint64_t>(args.integer("--seed", 0));
  config.jitter_seed = seed + 1;
  config.step_jitter = !args.has("--no-jitter");
  sim::ExpertLoads loads;
  if (args.has("--zipf") && args.has("--routing-trace"))
    throw UsageError("--zipf and --routing-trace exclude each other");
  if (args.has("--zipf"))
    loads = sim::zipf_expert_loads(args.number("--zipf", 0), args.integer("--num-experts", 64),
                                   args.integer("--moe-layers", 8), seed);
  if (args.has("--routing-trace"))
    loads = sim::routing_trace_expert_loads(args.get("--routing-trace"));
  if (!loads.empty())
    config.moe_factor = sim::moe_slowdown_factor(loads, placement, tp, redundant);
  else if (redundant > 0)
    throw UsageError("--redundant-experts needs --zipf or --routing-trace");
#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
  if (roofline) {
    // The roofline prices expert reads on the busiest rank itself (PlanOptions::
    // expert_imbalance), so the skew factor goes there instead of the expert_fraction split.
    planning::PlanOptions options;
    options.max_num_batched_tokens = config.scheduler.max_num_batched_tokens;
    options.max_num_seqs = config.scheduler.max_num_seqs;
    options.expert_imbalance = config.moe_factor;
    cost = planning::make_roofline_cost_model(planning::load_model_spec(args.get("--model")),
                                              planning::load_hardware_spec(args.get("--hardware")),
                                              planning::quant_from_name(args.get("--quant")), tp,
                                              options);
    cost_json["expert_imbalance"] = config.moe_factor;
    config.moe_factor = 1.0;
  }
#endif
  if (!cost) throw std::logic_error("no cost model");

  // Workload.
  sim::WorkloadSpec workload;
  workload.rate = args.number("--rate", 0);
  workload.burstiness = args.number("--burstiness", 1.0);
  workload.num_requests = args.integer("--num-requests", 1000);
  workload.input_len = sim::LengthDist::parse(args.get("--input-len", "128"));
  workload.output_len = sim::LengthDist::parse(args.get("--output-len", "128"));
  workload.seed = seed;
  const bool sweeping = args.has("--sweep-rate");
  if (args.has("--trace") && (args.has("--rate") || sweeping))
    throw UsageError("--trace replays recorded arrivals: it excludes --rate and --sweep-rate");
  if (!args.has("--trace") && !args.has("--rate") && !sweeping)
    throw UsageError("give --rate R, --trace FILE or --sweep-rate MIN:MAX");

  json out;
  json sweep_out;
  sim::SimulationResult result;
  if (sweeping) {
    std::vector<std::string> parts;
    std::stringstream stream(args.get("--sweep-rate"));
    for (std::string part; std::getline(stream, part, ':');) parts.push_back(part);
    if (parts.size() < 2 || parts.size() > 3) throw UsageError("--sweep-rate MIN:MAX[:STEPS]");
    double lo = 0, hi = 0;
    int steps = 10;
    try {
      lo = std::stod(parts[0]);
      hi = std::stod(parts[1]);
      if (parts.size() == 3) steps = std::stoi(parts[2]);
    } catch (const std::exception&) {
      throw UsageError("--sweep-rate MIN:MAX[:STEPS] needs numbers");
    }
    if (!config.slo.any()) throw UsageError("--sweep-rate needs --slo ttft:MS and/or tpot:MS");
    const sim::SweepResult sweep = sim::sweep_rate(workload, lo, hi, steps, config, *cost);
    sweep_out = sim::sweep_json(sweep);
    workload.rate = sweep.max_rate ? *sweep.max_rate : lo;
    if (!args.has("--json")) {
      std::cout << "keel simulate: rate sweep over [" << lo << ", " << hi << "] req/s, p99 SLO";
      if (config.slo.ttft_ms) std::cout << " ttft <= " << *config.slo.ttft_ms << " ms";
      if (config.slo.tpot_ms) std::cout << " tpot <= " << *config.slo.tpot_ms << " ms";
      if (config.slo.e2el_ms) std::cout << " e2el <= " << *config.slo.e2el_ms << " ms";
      std::cout << "\n";
      for (const sim::SweepProbe& probe : sweep.probes)
        std::cout << "  rate " << probe.rate << ": p99 ttft " << probe.p99_ttft_ms
                  << " ms, p99 tpot " << probe.p99_tpot_ms << " ms, rejected " << probe.rejected
                  << " -> " << (probe.ok ? "meets" : "breaks") << "\n";
      if (!sweep.max_rate)
        std::cout << "no rate in the range meets the SLO (even " << lo << " req/s breaks it)\n";
      else
        std::cout << (sweep.saturated_at_max ? "the SLO holds at the top of the range: "
                                             : "highest rate meeting the SLO: ")
                  << *sweep.max_rate << " req/s (the run below is at this rate)\n\n";
    }
  }
  const std::vector<sim::SimRequest> requests =
      args.has("--trace") ? sim::load_trace(args.get("--trace")) : sim::generate_workload(workload);
  result = sim::simulate(requests, config, *cost);

  out = sim::result_json(result);
  out["simulation"] = {
      {"scheduler",
       {{"block_size", config.scheduler.block_size},
        {"num_kv_blocks", config.scheduler.num_kv_blocks},
        {"max_num_seqs", config.scheduler.max_num_seqs},
        {"max_num_batched_tokens", config.scheduler.max_num_batched_tokens},
        {"max_waiting", config.max_waiting}}},
      {"cost", cost_json},
      {"workload", args.has("--trace")
                       ? json{{"trace", args.get("--trace")}, {"num_requests", requests.size()}}
                       : json{{"rate", workload.rate},
                              {"burstiness", workload.burstiness},
                              {"num_requests", workload.num_requests},
                              {"input_len", workload.input_len.to_string()},
                              {"output_len", workload.output_len.to_string()},
                              {"seed", workload.seed}}},
      {"moe",
       {{"placement", sim::sim_placement_name(placement)},
        {"tp", tp},
        {"redundant_experts", redundant},
        {"zipf", args.has("--zipf") ? json(args.number("--zipf", 0)) : json(nullptr)},
        {"routing_trace",
         args.has("--routing-trace") ? json(args.get("--routing-trace")) : json(nullptr)},
        {"slowdown_factor", config.moe_factor}}}};
  if (sweeping) out["sweep"] = sweep_out;
  if (args.has("--json"))
    std::cout << out.dump(2) << "\n";
  else
    std::cout << sim::result_table(result);

  if (args.has("--save-json") || args.has("--plot")) {
    json full = out;
    full.update(loadgen::records_json(result.records));  // per-request arrays, as bench serve
    std::string path = args.get("--save-json");
    std::string temp;
    if (path.empty()) {
      temp = (std::filesystem::temp_directory_path() / "keel-simulate-XXXXXX.json").string();
      int fd = ::mkstemps(temp.data(), 5);
      if (fd < 0) throw_error("cannot create a temporary file");
      ::close(fd);
      path = temp;
    }
    write_file(path, full.dump() + "\n");
    if (args.has("--plot")) {
      try {
        run_plot(path, args.get("--plot"));
      } catch (...) {
        if (!temp.empty()) std::filesystem::remove(temp);
        throw;
      }
      std::cerr << "keel simulate: wrote " << args.get("--plot") << "\n";
    }
    if (!temp.empty()) std::filesystem::remove(temp);
  }
  return 0;
}

}  // namespace

int simulate_command(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& error) {
    if (*error.what()) std::cerr << "keel simulate: " << error.what() << "\n";
    std::cerr << kUsage;
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "keel simulate: " << error.what() << "\n";
    return 2;
  }
}

}  // namespace keel
