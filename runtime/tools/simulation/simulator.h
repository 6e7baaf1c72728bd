// keel simulate: a discrete-event simulation of serving that drives keel's REAL scheduler.
//
// Design note. The code that serves is the code that is simulated: every step is built by
// keel::BatchScheduler (scheduler/batch_scheduler.h) over its paged BlockManager with the serve
// config's settings, exactly as ServingEngine drives it (runtime/serving/serving_engine.cpp);
// only the engine is replaced by a StepCostModel (cost_model.h) that says how long the step
// takes. The event loop:
//   t = 0. Repeat:
//     1. every request with arrival_s <= t is offered to the server in arrival order. As the
//        server's try_submit, it is refused (HTTP 429; counted as rejected) when the waiting
//        queue already holds max_waiting requests; otherwise it is add_request()ed with
//        deterministic synthetic prompt ids and max_new_tokens = its output length, no stop
//        tokens (ignore_eos: outputs end by length only). Prefix caching is off.
//     2. nothing unfinished: jump t to the next arrival (stop when there is none).
//     3. plan = schedule(); shape = StepShape of the plan (below); dt = cost(shape), scaled by
//        the MoE skew (below); t += dt.
//     4. on_step_done(one dummy id per sequence that asked for logits): each such sequence
//        emitted a token at t (its first token sets TTFT); finished requests end at t.
//   Per-step work is O(plan size): the plan itself and a few counters.
// StepShape of a plan: num_seqs = plan sequences; a sequence fed exactly one token is a decode
// token, the tokens of all other sequences are prefill tokens (chunks and preemption
// recompute); kv_tokens_read = sum over sequences of (last position fed + 1).
//
// MoE skew. The cost model prices a perfectly balanced step. With expert loads (a Zipf law or a
// recorded routing trace) and a placement, the slowdown factor is
//   F = sum_layers max_rank(load of the rank) / sum_layers mean_rank(load of the rank)
// (layers run one after another, so a step's expert time is the sum over layers of its slowest
// rank), and each step takes
//   dt = cost(shape) * ((1 - expert_fraction) + expert_fraction * F).
// expert_fraction: --expert-fraction, else the cost model's own (ExpertShareSource), else 0.5.
// Loads are expected token shares (static over the run), so F is one number per configuration.
//   Zipf(s): in each layer the expert of popularity rank i (i = 0 .. E-1) gets a share
//     proportional to 1 / (i + 1)^s; which expert id has rank i is a seeded random permutation
//     per layer (hot experts are not neighbours), s = 0 is uniform.
//   Routing trace: a keel routing file's per-layer counts of tokens per expert.
// Placements (over tp ranks): contiguous (e / ceil(E/tp)), round_robin (e % tp) as
// ExpertPlacement; balanced: greedy by load (heaviest expert first onto the least-loaded rank
// with a free slot, ceil((E+R)/tp) slots per rank), after giving R redundant replicas to the
// hottest experts as DeepSeek's EPLB (repeatedly the expert with the highest load per replica
// gets one more replica; its load is split evenly over its replicas). R > 0 needs balanced.
//
// Step jitter. A calibration measured from served steps carries the scatter of real step times
// around their shape's median (StepJitter: quantiles of the ratio, and the lag-1 correlation of
// consecutive log ratios, since slow steps on a shared machine come in runs). With it (and
// SimulationConfig::step_jitter on) step i's time is multiplied by ratio_at(Phi(z_i)), where
// z_i = rho z_{i-1} + sqrt(1 - rho^2) n_i, n_i standard normal from a mt19937_64 seeded with
// jitter_seed, z_0 ~ N(0, 1): a Gaussian copula, so the ratios have exactly the measured
// marginal distribution and correlation about rho. Without jitter every step of a shape takes
// the model's median time, which predicts medians well and tails (p99) too short.
//
// Metrics are computed by keel's own load generator code (loadgen::summarize) from per-request
// records built like `keel bench serve`'s, so the JSON keys and definitions (TTFT, TPOT, ITL,
// E2EL, goodput) are exactly those of `keel bench serve --save-json` (vLLM's names).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/tools/loadgen/loadgen.h"
#include "runtime/tools/simulation/cost_model.h"
#include "scheduler/batch_scheduler.h"

namespace keel::sim {

// Length distributions, parsed from:
//   "N"                     fixed N
//   "MIN:MAX"               uniform integers in [MIN, MAX]
//   "lognormal:MEAN:SD"     lognormal with this mean and standard deviation (of the lengths
//                           themselves, not of their log): sigma^2 = ln(1 + SD^2/MEAN^2),
//                           mu = ln(MEAN) - sigma^2 / 2; rounded to the nearest integer and
//                           clamped to [1, 16 * MEAN]
struct LengthDist {
  enum class Kind : uint8_t { kFixed, kUniform, kLognormal };
  Kind kind = Kind::kFixed;
  double a = 128, b = 128;  // fixed: a; uniform: [a, b]; lognormal: mean a, sd b
  static LengthDist parse(const std::string& text);  // throws keel::Error
  int64_t sample(std::mt19937_64& rng) const;
  std::string to_string() const;
};

struct SimRequest {
  double arrival_s = 0.0;
  int64_t prompt_len = 1;
  int64_t output_len = 1;
};

struct WorkloadSpec {
  double rate = 1.0;        // requests per second (> 0)
  double burstiness = 1.0;  // gamma shape of the arrival gaps: 1 = Poisson
  int64_t num_requests = 100;
  LengthDist input_len, output_len;
  uint64_t seed = 0;
};
// Arrivals as `keel bench serve` draws them: the first request at 0, then gamma gaps. With
// fixed/uniform lengths this is loadgen::plan_requests itself, so the same seed, rate,
// burstiness and lengths give the very load `keel bench serve` sends; lognormal lengths use
// their own draws from the same seeded mt19937_64.
std::vector<SimRequest> generate_workload(const WorkloadSpec& spec);
// A trace: either a `keel bench serve --save-json` file (arrivals from "start_times", lengths
// from "input_lens" / "output_lens"; failed requests, which have 0 lengths, are skipped) or
// JSONL lines {"arrival_s": s, "prompt_len": n, "output_len": n}. Sorted by arrival. Throws
// keel::Error naming the file.
std::vector<SimRequest> load_trace(const std::string& path);

// Expert loads, [layer][expert], any positive scale.
using ExpertLoads = std::vector<std::vector<double>>;
ExpertLoads zipf_expert_loads(double s, int64_t num_experts, int64_t num_layers, uint64_t seed);
// Tokens per expert per MoE layer of a keel routing file (runtime/routing/routing_file.h).
ExpertLoads routing_trace_expert_loads(const std::string& path);

enum class SimPlacement : uint8_t { kContiguous, kRoundRobin, kBalanced };
SimPlacement parse_sim_placement(const std::string& name);  // throws keel::Error
std::string sim_placement_name(SimPlacement placement);
// Per layer, the load of each rank [layer][rank] under the placement.
std::vector<std::vector<double>> rank_loads(const ExpertLoads& loads, SimPlacement placement,
                                            int tp, int64_t redundant_experts);
// F above (1 for empty loads or tp 1 without redundancy).
double moe_slowdown_factor(const ExpertLoads& loads, SimPlacement placement, int tp,
                           int64_t redundant_experts);

struct SimulationConfig {
  SchedulerConfig scheduler;  // prefix caching is forced off
  int64_t max_waiting = 256;
  double moe_factor = 1.0;  // F
  std::optional<double> expert_fraction;
  loadgen::Slo slo;
  // Multiply step times by the cost model's StepJitter when it has one (see the top).
  bool step_jitter = true;
  uint64_t jitter_seed = 1;
  // Time-series samples kept in the result (evenly thinned from the per-step samples).
  size_t max_series_points = 2000;
  // Called with every non-empty plan and the simulated time its step starts (tests).
  std::function<void(const StepPlan&, double)> on_plan;
};

struct SeriesPoint {
  double t_s = 0.0;          // step end
  double kv_usage = 0.0;     // used / total KV blocks after the step
  int64_t running = 0;       // after the step
  int64_t waiting = 0;       // after the step
  int64_t preemptions = 0;   // cumulative
  int64_t batch_tokens = 0;  // tokens the step fed
  double step_s = 0.0;
};

struct SimulationResult {
  std::vector<loadgen::RequestRecord> records;  // request order; rejected: success false
  loadgen::Summary summary;
  int64_t rejected = 0;
  int64_t num_steps = 0;
  int64_t preemptions = 0;
  int64_t prompt_tokens_requested = 0;  // of admitted requests
  int64_t prompt_tokens_computed = 0;   // prefill tokens fed, recompute after preemption included
  int64_t output_tokens_requested = 0;  // of admitted requests
  int64_t output_tokens_generated = 0;
  double busy_s = 0.0;                             // sum of step times
  double max_kv_usage = 0.0, mean_kv_usage = 0.0;  // mean weighted by step time
  double moe_factor = 1.0, expert_fraction = 0.5;
  std::vector<SeriesPoint> series;
  double wall_s = 0.0;  // real time the simulation took
};

SimulationResult simulate(const std::vector<SimRequest>& requests, const SimulationConfig& config,
                          const StepCostModel& cost);

// The bench-serve-compatible summary (loadgen::summary_json) plus keel simulate's own keys:
// rejected, num_steps, preemptions, prompt/output token totals, kv usage, moe factor, series.
nlohmann::json result_json(const SimulationResult& result, bool per_request = false);
std::string result_table(const SimulationResult& result);

// Whether a run meets the SLO at p99: p99 TTFT <= slo.ttft_ms, p99 TPOT <= slo.tpot_ms,
// p99 E2EL <= slo.e2el_ms (those set) and no request was rejected.
bool meets_p99_slo(const SimulationResult& result, const loadgen::Slo& slo);

struct SweepProbe {
  double rate = 0.0;
  bool ok = false;
  double p99_ttft_ms = 0.0, p99_tpot_ms = 0.0;
  int64_t rejected = 0;
};
struct SweepResult {
  std::optional<double> max_rate;  // highest rate found meeting the SLO; none if min fails
  bool saturated_at_max = false;   // max itself meets the SLO (the boundary is above the range)
  std::vector<SweepProbe> probes;  // in probe order
};
// Bisection over [min_rate, max_rate] for `steps` halvings (the workload is regenerated at each
// rate with the same seed, so probes differ only in the rate), assuming the SLO holds below
// some rate and breaks above it.
SweepResult sweep_rate(const WorkloadSpec& workload, double min_rate, double max_rate, int steps,
                       const SimulationConfig& config, const StepCostModel& cost);
nlohmann::json sweep_json(const SweepResult& sweep);

}  // namespace keel::sim
