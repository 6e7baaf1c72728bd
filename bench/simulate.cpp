// bench/simulate: how fast keel simulate plays a workload through the real BatchScheduler.
//
// Design. A seeded Poisson workload (default 10,000 requests at 40 req/s, lognormal prompts of
// mean 512 and outputs of mean 128) runs through simulate() with a linear step cost (8 ms +
// 20 us per token + 20 ns per KV token read), 16,384 blocks of 16 tokens, 128 sequences and
// 2,048 tokens per step. Each of --runs runs is timed with the steady clock around simulate();
// the figure is the median wall time and the simulated requests per wall second. The check:
// every run gives the same number of steps and completions (the simulation is deterministic),
// and every request finishes or is rejected; otherwise exit 1.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/machine.h"
#include "runtime/cli/flags.h"
#include "runtime/tools/simulation/simulator.h"

namespace {

struct Options {
  int64_t num_requests = 10000;
  double rate = 40.0;
  int runs = 3;
};

Options parse(int argc, char** argv) {
  Options options;
  keel::flags::FlagSet flags("simulate bench",
                             "usage: simulate [flags]\n"
                             "Simulator speed: simulated requests per wall second on a "
                             "lognormal workload.\n");
  flags.add_int("--num-requests", &options.num_requests, "N", "requests per run").at_least(1);
  flags.add_double("--rate", &options.rate, "R", "arrival rate (req/s)").above(0);
  flags.add_int("--runs", &options.runs, "K", "timed runs").at_least(1);
  flags.parse_or_exit(argc, argv);
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace keel::sim;
  const Options options = parse(argc, argv);
  WorkloadSpec spec;
  spec.rate = options.rate;
  spec.num_requests = options.num_requests;
  spec.input_len = LengthDist::parse("lognormal:512:256");
  spec.output_len = LengthDist::parse("lognormal:128:64");
  spec.seed = 42;
  const std::vector<SimRequest> requests = generate_workload(spec);
  SimulationConfig config;
  config.scheduler.num_kv_blocks = 16384;
  config.scheduler.block_size = 16;
  config.scheduler.max_num_seqs = 128;
  config.scheduler.max_num_batched_tokens = 2048;
  config.max_waiting = 1 << 20;
  const LinearCostModel cost(0.008, 2e-5, 2e-8);

  std::vector<double> wall_s;
  int64_t steps = -1, completed = -1;
  bool consistent = true;
  for (int run = 0; run < options.runs; ++run) {
    const auto start = std::chrono::steady_clock::now();
    const SimulationResult result = simulate(requests, config, cost);
    wall_s.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (result.summary.completed + result.summary.failed != options.num_requests)
      consistent = false;
    if (run > 0 && (result.num_steps != steps || result.summary.completed != completed))
      consistent = false;
    steps = result.num_steps;
    completed = result.summary.completed;
  }
  std::vector<double> sorted = wall_s;
  std::sort(sorted.begin(), sorted.end());
  const double median_s = sorted[sorted.size() / 2];
  nlohmann::json out = {
      {"bench", "simulate"},
      {"machine", keel::bench::machine_name()},
      {"load_average_1m", keel::bench::one_minute_load_average()},
      {"num_requests", options.num_requests},
      {"rate", options.rate},
      {"num_steps", steps},
      {"completed", completed},
      {"wall_s", wall_s},
      {"median_wall_s", median_s},
      {"simulated_requests_per_s", static_cast<double>(options.num_requests) / median_s},
      {"deterministic_and_conserved", consistent}};
  std::cout << out.dump(2) << "\n";
  return consistent ? 0 : 1;
}
