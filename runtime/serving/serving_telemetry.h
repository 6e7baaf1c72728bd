// Server-side telemetry: what the leader learns from every step and request, folded into
// Prometheus metrics, JSON snapshots (experts, recent requests, recent steps), periodic JSONL
// dumps and Chrome traces.
//
// Design:
//  - Ranks collect without locks: each rank's forward pass writes its own StepObservation
//    (runtime/model/model.h); the engine all-gathers phase and expert seconds once per step and the
//    leader folds them in here (Engine::serve, StepOutput). Routing and margins are replicated,
//    so the leader's copy is everyone's.
//  - One mutex guards the folded state: the leader takes it once per step and once per finished
//    request; HTTP threads take it for the JSON endpoints and, for /metrics, only long enough to
//    copy what the exposition needs (MetricsSnapshot): the text is formatted after the mutex is
//    released, so a scrape never holds up a step for longer than that copy. Nothing on a rank's
//    hot path waits for it.
//  - /metrics cardinality is bounded for 512 experts x 60 layers (README, "Metrics at 397B
//    scale"): per-(layer, expert) token counters without a rank label (the placement implies
//    the rank; per-(layer, rank) tokens are their own counter), expert compute time as one
//    histogram per layer by default, per expert only when asked (telemetry_expert_latency:
//    expert). The JSON endpoints keep every expert's detail whatever the setting.
//  - Step and request records live in bounded rings (the most recent N), so memory is bounded
//    whatever the uptime; `keel profile tail` joins them by step id.
//  - Names follow vLLM's (keel_ prefix, seconds, histograms with millisecond-resolving buckets).
#pragma once

#include <cstdint>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine/engine.h"
#include "runtime/serving/metric_export.h"
#include "runtime/telemetry/metrics.h"
#include "runtime/telemetry/trace.h"

namespace keel {

// What /metrics carries of expert compute time (`telemetry_expert_latency`):
//   off: nothing (the JSON endpoints still have every expert's percentiles);
//   layer: one histogram per MoE layer over all its experts (the default);
//   expert: one histogram per (layer, expert): 32 series each, ~1 M for 512 x 60.
enum class ExpertLatencyDetail : uint8_t { kOff, kLayer, kExpert };
std::string_view expert_latency_detail_name(ExpertLatencyDetail detail);
// Throws keel::Error naming `what` (the key) and the accepted values.
ExpertLatencyDetail parse_expert_latency_detail(std::string_view name, std::string_view what);

struct MetricsOptions {
  ExpertLatencyDetail expert_latency = ExpertLatencyDetail::kLayer;
  MetricNames names = MetricNames::kKeel;
};

struct TelemetryConfig {
  double near_tie_epsilon = 1e-4;  // router margins below this count as near-ties
  size_t step_ring = 8192;         // step records kept for /v1/telemetry/steps
  size_t request_ring = 4096;      // finished-request records kept for /v1/telemetry/requests
  std::string dump_dir;            // periodic JSONL dumps; empty: off
  double dump_interval_s = 10;
  std::string reduce_algorithm;  // labels the allreduce phase ("fixed_order" / "native")
  MetricsOptions metrics;        // what GET /metrics carries (ServingEngine::prometheus)
  // Test seam: called by append_prometheus after its snapshot is taken and the mutex released,
  // before any text is formatted (a test steps the engine from here to show the render holds no
  // lock the step needs). Empty in keel serve.
  std::function<void()> after_metrics_snapshot;
  size_t max_trace_spans = 200000;  // a profile stops by itself at this many spans
};

// A stopped profile's spans, handed over to be written.
struct TakenTrace {
  std::vector<telemetry::TraceSpan> spans;
  bool stopped_by_cap = false;  // the span cap ended it, not the client
};

// One step as the leader saw it (times in seconds since the telemetry started).
struct StepRecord {
  int64_t id = 0;
  double start_s = 0;
  double seconds = 0;
  double schedule_s = 0;  // planning before the step (leader)
  double sampling_s = 0;  // sampling + streaming after it (leader)
  // Time from the previous step's end to this step's start when the engine went straight on
  // (no idle wait between them); -1 after an idle wait or for the first step.
  double gap_before_s = -1;
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;
  int64_t num_prefill_tokens = 0;  // tokens of sequences fed more than one token, or no logits
  int64_t num_decode_tokens = 0;   // sequences fed exactly one token that asked for logits
  int64_t kv_tokens_read = 0;      // sum over sequences of (last position fed + 1)
  int64_t kv_blocks_used = 0;
  int64_t preemptions = 0;
  std::vector<int64_t> seq_ids;
  std::vector<std::string> request_ids;
};

// A finished request (times in seconds since the telemetry started; intervals in seconds).
struct RequestRecord {
  std::string id;
  int64_t seq_id = 0;
  double arrival_s = 0;
  double queue_s = 0;  // arrival to its first scheduled step
  double ttft_s = 0;   // arrival to its first token
  double e2e_s = 0;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t max_tokens = 0;  // the generation limit it ran under (max_tokens, capped by the context)
  int64_t preemptions = 0;
  int64_t first_step = -1;
  int64_t last_step = -1;
  std::string finish_reason;
  std::vector<double> token_times_s;  // each token's emission time (for ITL / TPOT)
};

class ServingTelemetry {
 public:
  ServingTelemetry(const ModelConfig& config, const ExpertPlacement& placement, int tp_size,
                   std::string model_name, TelemetryConfig options);
  ~ServingTelemetry();

  double now_s() const;  // seconds since construction (steady clock)

  // Leader thread.
  void on_step(const StepRecord& step, const StepOutput& output);
  void on_request(const RequestRecord& request);
  // A Chrome trace of every rank's phases and expert GEMMs (thread ranks: all ranks; MPI: the
  // leader's). start_trace discards what an earlier profile left; at max_trace_spans the
  // profile stops by itself (logged, and said by trace_status and the stop's answer), keeping
  // the spans so far. take_trace stops it and hands the spans over (false: no profile ran
  // since the last take).
  void start_trace();
  bool tracing() const;
  bool trace_pending() const;  // started and not taken yet (running or stopped by the cap)
  bool take_trace(TakenTrace& out);
  // {"tracing", "spans" (buffered), "max_spans", "stopped_by_cap"}.
  nlohmann::json trace_status() const;
  const std::string& model_name() const { return model_name_; }

  // Any thread. The mutex is held only while the snapshot is copied (see the design note).
  void append_prometheus(telemetry::PromText& out, const MetricsOptions& options) const;
  nlohmann::json experts_json() const;
  // Every routed layer's tokens per expert so far and the ranks its experts sit on now (the
  // input of balanced_placement_file, scheduler/placement.h).
  std::vector<LayerLoad> layer_loads() const;
  nlohmann::json requests_json(size_t limit) const;
  nlohmann::json steps_json(int64_t first, int64_t last) const;

 private:
  struct MetricsSnapshot;  // what one /metrics render needs (serving_telemetry.cpp)
  MetricsSnapshot snapshot_metrics(ExpertLatencyDetail detail) const;
  void maybe_dump_locked(double now);
  void write_dump_locked(double now);

  const int64_t num_layers_;
  const int64_t num_experts_;
  const int64_t top_k_;
  const int tp_size_;
  const std::string model_name_;
  const TelemetryConfig options_;
  std::vector<int64_t> moe_layers_;
  std::vector<int64_t> moe_index_;             // [layer] -> index into moe_layers_, -1 if dense
  std::vector<std::vector<int>> expert_rank_;  // [layer][expert] (empty for dense layers)
  const double epoch_;

  mutable std::mutex mutex_;
  // Per (layer, expert): tokens routed, compute-time histogram; per layer: margins, near-ties.
  std::vector<int64_t> expert_tokens_;                      // [layer * E + e]
  std::vector<telemetry::Histogram> expert_seconds_;        // [layer * E + e]
  std::vector<double> expert_seconds_total_;                // [layer * E + e]
  std::vector<telemetry::Histogram> layer_expert_seconds_;  // [moe layer]: all its experts
  std::vector<telemetry::Histogram> router_margin_;         // [moe layer]
  std::vector<int64_t> near_ties_;                          // [moe layer]
  // Per step.
  std::vector<telemetry::Histogram> phase_seconds_;  // [rank * (phases + 2) + phase]
  telemetry::Histogram step_seconds_;
  telemetry::Histogram batch_seqs_;
  telemetry::Histogram batch_tokens_;
  // Per request (vLLM's set).
  telemetry::Histogram queue_time_, ttft_, itl_, tpot_, e2e_, prompt_tokens_, generation_tokens_;
  telemetry::Histogram prefill_time_, decode_time_, inference_time_, max_tokens_;
  int64_t steps_total_ = 0;
  std::deque<StepRecord> steps_;
  std::deque<nlohmann::json> step_details_;  // parallel to steps_: phases and hot experts
  std::deque<RequestRecord> requests_;
  // Tracing.
  bool tracing_ = false;
  bool trace_pending_ = false;  // started and not taken yet
  bool trace_capped_ = false;
  std::vector<telemetry::TraceSpan> trace_spans_;
  // Dumps.
  double last_dump_s_ = 0;
  std::unique_ptr<std::ofstream> dump_file_;
};

}  // namespace keel
