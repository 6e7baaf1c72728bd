// keel simulate: option parsing, the serve config's scheduler settings, cost model choice,
// output and plotting. The command line is documented in simulate_cmd.h; the model in
// runtime/tools/simulation/simulator.h. Mechanics:
//  - Flags are parsed by keel_flags (runtime/cli/flags.h) as in the rest of the CLI; --slo
//    takes every following word up to the next "--" option (as bench serve's --goodput).
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
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/tools/simulation/simulator.h"
#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
#include "runtime/tools/planning/hardware_spec.h"
#include "runtime/tools/planning/memory_model.h"
#include "runtime/tools/planning/model_spec.h"
#include "runtime/tools/planning/quant.h"
#endif

#ifndef KEEL_SOURCE_DIR
#define KEEL_SOURCE_DIR "."
#endif

namespace keel {
namespace {

using nlohmann::json;

using flags::UsageError;

const char* kUsage =
    "usage: keel simulate [--config SERVE.yaml] [--block-size N]\n"
    "         [--num-kv-blocks N | --kv-block-bytes B] [--max-num-seqs N]\n"
    "         [--max-num-batched-tokens N] [--max-waiting N]\n"
    "         [--cost linear [--base-ms A] [--per-token-ms B] [--per-kv-token-us C]\n"
    "          | --calibration FILE [--no-jitter]] [--expert-fraction F]\n"
    "         (roofline: --model M --hardware H --quant Q [--efficiency-file F]\n"
    "          [--speculative mtp:K --acceptance A])\n"
    "         (--rate R [--burstiness B] [--num-requests N] [--input-len DIST]\n"
    "          [--output-len DIST] | --trace FILE)\n"
    "         [--zipf S [--num-experts E] [--moe-layers L] | --routing-trace FILE]\n"
    "         [--placement contiguous|round_robin|balanced] [--redundant-experts R] [--tp N]\n"
    "         [--slo ttft:MS tpot:MS e2el:MS] [--sweep-rate MIN:MAX[:STEPS]] [--seed S]\n"
    "         [--json] [--save-json F] [--plot PNG]\n"
    "  DIST: N (fixed) | MIN:MAX (uniform) | lognormal:MEAN:SD\n";

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

// Every flag's value; where the serve config has the setting too, the flag wins when given.
struct SimulateFlags {
  bool json = false, no_jitter = false;
  std::string config, cost, calibration, model, hardware, quant, efficiency_file, speculative,
      acceptance, input_len = "128", output_len = "128", trace, routing_trace, placement,
                  sweep_rate, save_json, plot;
  int64_t block_size = 16, num_kv_blocks = 0, kv_block_bytes = 0, max_num_seqs = 64,
          max_num_batched_tokens = 512, max_waiting = 256, num_requests = 1000, num_experts = 64,
          moe_layers = 8, redundant_experts = 0, tp = 1;
  uint64_t seed = 0;
  double base_ms = 10.0, per_token_ms = 0.05, per_kv_token_us = 0.0, expert_fraction = 0.5,
         rate = 0, burstiness = 1.0, zipf = 0;
  std::vector<std::string> slo;
};

void register_flags(flags::FlagSet& flags, SimulateFlags& f) {
  flags.add_string("--config", &f.config, "SERVE.yaml", "scheduler settings from a serve config");
  flags.add_int("--block-size", &f.block_size, "N", "KV block tokens (config: block_size)")
      .range(1, 1 << 20);
  flags.add_int("--num-kv-blocks", &f.num_kv_blocks, "N", "KV pool (config: num_kv_blocks)");
  flags.add_int("--kv-block-bytes", &f.kv_block_bytes, "B",
                "bytes per KV block, to size the pool from kv_cache_mb");
  flags.add_int("--max-num-seqs", &f.max_num_seqs, "N", "(config: max_num_seqs)");
  flags.add_int("--max-num-batched-tokens", &f.max_num_batched_tokens, "N",
                "(config: max_num_batched_tokens)");
  flags.add_int("--max-waiting", &f.max_waiting, "N", "(config: max_waiting)");
  flags.add_string("--cost", &f.cost, "linear|roofline", "step cost model (default linear)");
  flags.add_double("--base-ms", &f.base_ms, "A", "linear: ms per step");
  flags.add_double("--per-token-ms", &f.per_token_ms, "B", "linear: ms per token");
  flags.add_double("--per-kv-token-us", &f.per_kv_token_us, "C", "linear: us per KV token");
  flags.add_string("--calibration", &f.calibration, "FILE", "measured step times (keel calibrate)");
  flags.add_switch("--no-jitter", &f.no_jitter, "calibration: no step jitter");
  flags.add_double("--expert-fraction", &f.expert_fraction, "F", "expert share of step time");
  flags.add_string("--model", &f.model, "M.yaml", "roofline: model preset");
  flags.add_string("--hardware", &f.hardware, "H.yaml", "roofline: hardware preset");
  flags.add_string("--quant", &f.quant, "Q", "roofline: quantization");
  flags.add_string("--efficiency-file", &f.efficiency_file, "F",
                   "roofline: engine profile (configs/engines/)");
  flags.add_string("--speculative", &f.speculative, "none|mtp:K",
                   "roofline: speculative decoding, K draft tokens per step");
  flags.add_string("--acceptance", &f.acceptance, "A|a1,...,aK",
                   "roofline: draft acceptance (as keel plan)");
  flags.add_double("--rate", &f.rate, "R", "arrivals per second");
  flags.add_double("--burstiness", &f.burstiness, "B", "gamma arrivals shape (1: Poisson)");
  flags.add_int("--num-requests", &f.num_requests, "N", "requests");
  flags.add_string("--input-len", &f.input_len, "DIST", "prompt tokens");
  flags.add_string("--output-len", &f.output_len, "DIST", "output tokens");
  flags.add_string("--trace", &f.trace, "FILE", "replay recorded arrivals");
  flags.add_double("--zipf", &f.zipf, "S", "Zipf-skewed expert loads");
  flags.add_int("--num-experts", &f.num_experts, "E", "zipf: experts per layer");
  flags.add_int("--moe-layers", &f.moe_layers, "L", "zipf: MoE layers");
  flags.add_string("--routing-trace", &f.routing_trace, "FILE", "expert loads from a routing file");
  flags.add_string("--placement", &f.placement, "contiguous|round_robin|balanced",
                   "expert placement (config: placement)");
  flags.add_int("--redundant-experts", &f.redundant_experts, "R", "replicated hot experts");
  flags.add_int("--tp", &f.tp, "N", "ranks (config: tp)");
  flags.add_words("--slo", &f.slo, "KEY:MS", "p99 SLOs: ttft:MS tpot:MS e2el:MS");
  flags.add_string("--sweep-rate", &f.sweep_rate, "MIN:MAX[:STEPS]", "highest rate meeting --slo");
  flags.add_int("--seed", &f.seed, "S", "workload and jitter seed");
  flags.add_switch("--json", &f.json, "JSON on stdout");
  flags.add_string("--save-json", &f.save_json, "F", "full result with per-request arrays");
  flags.add_string("--plot", &f.plot, "PNG", "plot (python3 + matplotlib)");
}

// Returns the exit status; throws UsageError for a bad command line.
int run(const flags::FlagSet& flags, const SimulateFlags& f) {
  // A flag that was given, else the serve config's value.
  auto or_config = [&](const char* name, auto flag_value, auto config_value) {
    return flags.given(name) ? flag_value : config_value;
  };
  // Scheduler settings: serve config, then flags.
  ServeDefaults serve;
  if (flags.given("--config")) serve = read_serve_config(f.config);
  sim::SimulationConfig config;
  config.scheduler.block_size =
      static_cast<int32_t>(or_config("--block-size", f.block_size, serve.block_size));
  int64_t num_kv_blocks = or_config("--num-kv-blocks", f.num_kv_blocks, serve.num_kv_blocks);
  if (!flags.given("--num-kv-blocks") && num_kv_blocks <= 0) {
    if (serve.kv_cache_mb > 0 && flags.given("--kv-block-bytes")) {
      const int64_t block_bytes = f.kv_block_bytes;
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
  config.scheduler.max_num_seqs = or_config("--max-num-seqs", f.max_num_seqs, serve.max_num_seqs);
  config.scheduler.max_num_batched_tokens =
      or_config("--max-num-batched-tokens", f.max_num_batched_tokens, serve.max_num_batched_tokens);
  config.max_waiting = or_config("--max-waiting", f.max_waiting, serve.max_waiting);
  if (flags.given("--slo")) config.slo = loadgen::parse_slo(f.slo);

  // Cost model.
  std::unique_ptr<sim::StepCostModel> cost;
  [[maybe_unused]] bool roofline = false;  // built below, once the MoE skew factor is known
  json cost_json;
  const std::string cost_kind = flags.given("--cost")          ? f.cost
                                : flags.given("--calibration") ? "calibration"
                                                               : "linear";
  if (flags.given("--calibration")) {
    if (flags.given("--cost") && cost_kind != "calibration")
      throw UsageError("--calibration and --cost " + cost_kind + " exclude each other");
    cost =
        std::make_unique<sim::CalibratedCostModel>(sim::CalibratedCostModel::load(f.calibration));
    cost_json = {{"kind", "calibration"}, {"file", f.calibration}};
  } else if (cost_kind == "linear") {
    const double base_ms = f.base_ms, per_token_ms = f.per_token_ms, per_kv_us = f.per_kv_token_us;
    cost =
        std::make_unique<sim::LinearCostModel>(base_ms / 1e3, per_token_ms / 1e3, per_kv_us / 1e6);
    cost_json = {{"kind", "linear"},
                 {"base_ms", base_ms},
                 {"per_token_ms", per_token_ms},
                 {"per_kv_token_us", per_kv_us}};
  } else if (cost_kind == "roofline") {
#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
    if (!flags.given("--model") || !flags.given("--hardware") || !flags.given("--quant"))
      throw UsageError("--cost roofline needs --model M.yaml --hardware H.yaml --quant Q");
    roofline = true;
    cost_json = {
        {"kind", "roofline"}, {"model", f.model}, {"hardware", f.hardware}, {"quant", f.quant}};
#else
    throw UsageError(
        "--cost roofline needs the planner (runtime/planning), which this build "
        "does not have; use --calibration FILE or --cost linear");
#endif
  } else {
    throw UsageError("--cost must be linear or roofline (or give --calibration FILE)");
  }
  if (flags.given("--expert-fraction")) config.expert_fraction = f.expert_fraction;

  // MoE skew.
  const int tp = static_cast<int>(or_config("--tp", f.tp, serve.tp));
  const sim::SimPlacement placement =
      sim::parse_sim_placement(or_config("--placement", f.placement, serve.placement));
  const int64_t redundant = f.redundant_experts;
  const uint64_t seed = f.seed;
  config.jitter_seed = seed + 1;
  config.step_jitter = !flags.given("--no-jitter");
  sim::ExpertLoads loads;
  if (flags.given("--zipf") && flags.given("--routing-trace"))
    throw UsageError("--zipf and --routing-trace exclude each other");
  if (flags.given("--zipf"))
    loads = sim::zipf_expert_loads(f.zipf, f.num_experts, f.moe_layers, seed);
  if (flags.given("--routing-trace")) loads = sim::routing_trace_expert_loads(f.routing_trace);
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
    options.speculative = planning::parse_speculative(f.speculative, f.acceptance);
    planning::HardwareSpec hardware = planning::load_hardware_spec(f.hardware);
    if (flags.given("--efficiency-file"))
      planning::apply_efficiency_file(hardware, f.efficiency_file);
    cost = planning::make_roofline_cost_model(planning::load_model_spec(f.model), hardware,
                                              planning::quant_from_name(f.quant), tp, options);
    cost_json["expert_imbalance"] = config.moe_factor;
    cost_json["engine"] = hardware.engine.name;
    cost_json["speculative_tokens_per_step"] = options.speculative.tokens_per_step();
    config.moe_factor = 1.0;
  }
#endif
  if (!cost) throw std::logic_error("no cost model");

  // Workload.
  sim::WorkloadSpec workload;
  workload.rate = f.rate;
  workload.burstiness = f.burstiness;
  workload.num_requests = f.num_requests;
  workload.input_len = sim::LengthDist::parse(f.input_len);
  workload.output_len = sim::LengthDist::parse(f.output_len);
  workload.seed = seed;
  const bool sweeping = flags.given("--sweep-rate");
  if (flags.given("--trace") && (flags.given("--rate") || sweeping))
    throw UsageError("--trace replays recorded arrivals: it excludes --rate and --sweep-rate");
  if (!flags.given("--trace") && !flags.given("--rate") && !sweeping)
    throw UsageError("give --rate R, --trace FILE or --sweep-rate MIN:MAX");

  json out;
  json sweep_out;
  sim::SimulationResult result;
  if (sweeping) {
    std::vector<std::string> parts;
    std::stringstream stream(f.sweep_rate);
    for (std::string part; std::getline(stream, part, ':');) parts.push_back(part);
    if (parts.size() < 2 || parts.size() > 3) throw UsageError("--sweep-rate MIN:MAX[:STEPS]");
    constexpr double kUnbounded = std::numeric_limits<double>::infinity();
    const double lo = flags::parse_number("--sweep-rate MIN", parts[0], -kUnbounded, kUnbounded);
    const double hi = flags::parse_number("--sweep-rate MAX", parts[1], -kUnbounded, kUnbounded);
    const int steps =
        parts.size() == 3
            ? static_cast<int>(flags::parse_integer("--sweep-rate STEPS", parts[2], 1, 1000))
            : 10;
    if (!config.slo.any()) throw UsageError("--sweep-rate needs --slo ttft:MS and/or tpot:MS");
    const sim::SweepResult sweep = sim::sweep_rate(workload, lo, hi, steps, config, *cost);
    sweep_out = sim::sweep_json(sweep);
    workload.rate = sweep.max_rate ? *sweep.max_rate : lo;
    if (!flags.given("--json")) {
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
      flags.given("--trace") ? sim::load_trace(f.trace) : sim::generate_workload(workload);
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
      {"workload", flags.given("--trace")
                       ? json{{"trace", f.trace}, {"num_requests", requests.size()}}
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
        {"zipf", flags.given("--zipf") ? json(f.zipf) : json(nullptr)},
        {"routing_trace", flags.given("--routing-trace") ? json(f.routing_trace) : json(nullptr)},
        {"slowdown_factor", config.moe_factor}}}};
  if (sweeping) out["sweep"] = sweep_out;
  if (flags.given("--json"))
    std::cout << out.dump(2) << "\n";
  else
    std::cout << sim::result_table(result);

  if (flags.given("--save-json") || flags.given("--plot")) {
    json full = out;
    full.update(loadgen::records_json(result.records));  // per-request arrays, as bench serve
    std::string path = f.save_json;
    std::string temp;
    if (path.empty()) {
      temp = (std::filesystem::temp_directory_path() / "keel-simulate-XXXXXX.json").string();
      int fd = ::mkstemps(temp.data(), 5);
      if (fd < 0) throw_error("cannot create a temporary file");
      ::close(fd);
      path = temp;
    }
    write_file(path, full.dump() + "\n");
    if (flags.given("--plot")) {
      try {
        run_plot(path, f.plot);
      } catch (...) {
        if (!temp.empty()) std::filesystem::remove(temp);
        throw;
      }
      std::cerr << "keel simulate: wrote " << f.plot << "\n";
    }
    if (!temp.empty()) std::filesystem::remove(temp);
  }
  return 0;
}

}  // namespace

int simulate_command(int argc, char** argv) {
  flags::FlagSet flags("keel simulate", kUsage);
  SimulateFlags values;
  register_flags(flags, values);
  try {
    if (!flags.parse(argc, argv, 2)) {
      std::cout << flags.help();
      return 0;
    }
    return run(flags, values);
  } catch (const UsageError& error) {
    std::cerr << "keel simulate: " << error.what() << "\n" << flags.help();
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "keel simulate: " << error.what() << "\n";
    return 2;
  }
}

}  // namespace keel
