// keel_clients: the operator-facing client commands of the keel CLI. They talk to a running
// server over HTTP only (never link the engine), so they work against any keel serve, local or
// remote, and test against fakes:
//   keel bench serve  - load generation with vLLM benchmark_serving's metrics (keel_loadgen),
//                       optional latency-CDF plot (scripts/plot_latency_cdf.py).
//   keel experts      - per-layer expert load/latency table from GET /v1/telemetry/experts,
//                       optional heatmap (scripts/plot_expert_heatmap.py).
//   keel profile tail - why the slowest requests were slow: joins GET /v1/telemetry/requests
//                       with GET /v1/telemetry/steps and ranks causes by time.
//
// Design: each command is a thin argv parser + HTTP fetch around a pure function over the
// server's JSON (expert_rows, analyze_tail) so the arithmetic is testable on hand-built
// documents. Plots are drawn by Python/matplotlib scripts on the JSON we already write, not
// in C++: no plotting dependency for the binary, and the scripts work on saved files too.
//
// Command entry points take the CLI's argv unchanged: argv[1] is the command word ("bench",
// "experts", "profile"); "bench" and "profile" expect their subcommand ("serve", "tail") in
// argv[2]. They print their own errors ("keel <cmd>: error: ...") and return 0 on success, 1
// on a failure, 2 on a usage error; they do not throw.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace keel {

int bench_serve_command(int argc, char** argv);
int experts_command(int argc, char** argv);
int profile_command(int argc, char** argv);

namespace clients {

// ---- keel experts ----

struct ExpertTokens {
  int expert = 0;
  int64_t tokens = 0;
  double share = 0.0;  // of the layer's routed tokens
};
struct ExpertLatency {
  int expert = 0;
  double p99_s = 0.0;
};
struct LayerRow {
  int layer = 0;
  int64_t tokens = 0;  // routed (token, expert) assignments in the layer
  double balancedness = 0.0;
  double imbalance = 0.0;
  int64_t near_ties = 0;
  std::vector<ExpertTokens> hottest;   // top N by tokens (ties: lower expert id first)
  std::vector<ExpertLatency> slowest;  // top N by expert_seconds.p99 (ties: lower id first)
};
// One row per MoE layer of the /v1/telemetry/experts document (non-MoE layers skipped).
// Throws std::runtime_error naming the field for a document that does not match the schema.
std::vector<LayerRow> expert_rows(const nlohmann::json& telemetry, int top);
std::string experts_table(const nlohmann::json& telemetry, const std::vector<LayerRow>& rows);
nlohmann::json expert_rows_json(const std::vector<LayerRow>& rows);

// ---- keel profile tail ----
//
// Decomposition of each slow request's end-to-end time (e2e_s), so causes add up to exactly
// the slow requests' total time:
//   queueing             = queue_s (capped at ttft_s)
//   prefill              = ttft_s - queueing
//   decode               = e2e_s - ttft_s, split over the request's decode steps (steps whose
//                          request_ids contain it and whose midpoint is after its first token):
//     decode (normal pace)   sum of min(step seconds, median step seconds of the window)
//     step excess            sum of (seconds - median) of the slower steps, split over the
//                            step's components in proportion to how much each exceeds its own
//                            window median (falling back to component size when none does):
//                            a component that grew is the explanation, a large but usual one
//                            (attention, say) is not. Components: each phase's time on its
//                            slowest rank, except allreduce, which is split into the fastest
//                            rank's allreduce ("step phase: allreduce") and the spread between
//                            slowest and fastest rank ("allreduce stall (rank skew)": time spent
//                            waiting for a lagging rank); plus sampling_s and schedule_s. The
//                            experts share of a step that reports hot_experts becomes "hot
//                            experts" (detailed per layer/expert/rank by their seconds).
//     preemption / between steps   decode time not covered by the request's steps: lost to
//                            preemption when the request was preempted, else gaps between
//                            steps (or steps that fell out of the server's telemetry ring).
//   When the steps cover more than the decode time (clock granularity), the step parts are
//   scaled down to fit.
struct CauseExample {
  std::string request_id;
  double seconds = 0.0;
};
struct Cause {
  std::string name;
  double seconds = 0.0;                // summed over the slow requests
  double share = 0.0;                  // of the slow requests' total e2e time
  std::vector<CauseExample> examples;  // requests with the largest contribution, largest first
};
struct HotExpertTime {
  int layer = 0, expert = 0, rank = 0;
  double seconds = 0.0;  // of the "hot experts" cause attributed to this expert
};
struct TailReport {
  double percentile = 99.0;
  double threshold_s = 0.0;  // e2e at the percentile (numpy linear) over the window
  double median_step_s = 0.0;
  int window_requests = 0;
  int window_steps = 0;
  std::vector<std::string> slow_ids;       // slowest first
  double total_s = 0.0;                    // sum of the slow requests' e2e
  std::vector<Cause> causes;               // by seconds, largest first; zero causes left out
  std::vector<HotExpertTime> hot_experts;  // by seconds, largest first
  nlohmann::json per_request;  // [{id, e2e_s, preemptions, steps: [ids], causes: {name: s}}]
};
// `requests` and `steps` are the bodies of /v1/telemetry/requests and /v1/telemetry/steps.
TailReport analyze_tail(const nlohmann::json& requests, const nlohmann::json& steps,
                        double percentile, int examples = 3);
std::string tail_table(const TailReport& report);
nlohmann::json tail_report_json(const TailReport& report);

// ---- shared ----

// "L" -> {L, L}; "MIN:MAX" -> {MIN, MAX}. Throws std::runtime_error otherwise.
std::pair<int, int> parse_length_range(const std::string& text);

}  // namespace clients
}  // namespace keel
