#include "runtime/serving/serving_telemetry.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "kernels/base/check.h"

namespace keel {

namespace {

using telemetry::Histogram;
using telemetry::Labels;
using telemetry::MetricType;

double steady_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Phases recorded per rank: the forward pass's, then the leader's own two.
constexpr int kStepPhases = kNumPhases + 2;
constexpr int kSchedulePhase = kNumPhases;
constexpr int kSamplingPhase = kNumPhases + 1;

std::string step_phase_name(int phase) {
  if (phase == kSchedulePhase) return "schedule";
  if (phase == kSamplingPhase) return "sampling";
  return std::string(phase_name(static_cast<Phase>(phase)));
}

template <typename T>
void push_bounded(std::deque<T>& ring, T value, size_t limit) {
  ring.push_back(std::move(value));
  while (ring.size() > limit) ring.pop_front();
}

std::string category_of(Phase phase) {
  switch (phase) {
    case Phase::kAttention:
    case Phase::kLinearAttention:
      return "attn";
    case Phase::kAllReduce:
      return "comm";
    case Phase::kRouter:
    case Phase::kPack:
    case Phase::kExperts:
    case Phase::kCombine:
      return "moe";
    case Phase::kOther:
      return "other";
  }
  return "other";
}

}  // namespace

std::string_view expert_latency_detail_name(ExpertLatencyDetail detail) {
  switch (detail) {
    case ExpertLatencyDetail::kOff:
      return "off";
    case ExpertLatencyDetail::kLayer:
      return "layer";
    case ExpertLatencyDetail::kExpert:
      return "expert";
  }
  return "layer";
}

ExpertLatencyDetail parse_expert_latency_detail(std::string_view name, std::string_view what) {
  if (name == "off") return ExpertLatencyDetail::kOff;
  if (name == "layer") return ExpertLatencyDetail::kLayer;
  if (name == "expert") return ExpertLatencyDetail::kExpert;
  throw_error(what, " is '", name, "'; expected off, layer or expert");
}

ServingTelemetry::ServingTelemetry(const ModelConfig& config, const ExpertPlacement& placement,
                                   int tp_size, std::string model_name, TelemetryConfig options)
    : num_layers_(config.num_layers),
      num_experts_(config.num_experts),
      top_k_(config.top_k),
      tp_size_(tp_size),
      model_name_(std::move(model_name)),
      options_(std::move(options)),
      epoch_(steady_now()),
      step_seconds_(telemetry::latency_seconds_bounds()),
      batch_seqs_(telemetry::count_bounds()),
      batch_tokens_(telemetry::count_bounds()),
      queue_time_(telemetry::latency_seconds_bounds()),
      ttft_(telemetry::vllm_ttft_seconds_bounds()),
      itl_(telemetry::vllm_tpot_seconds_bounds()),
      tpot_(telemetry::vllm_tpot_seconds_bounds()),
      e2e_(telemetry::vllm_e2e_seconds_bounds()),
      prompt_tokens_(telemetry::count_bounds()),
      generation_tokens_(telemetry::count_bounds()),
      prefill_time_(telemetry::latency_seconds_bounds()),
      decode_time_(telemetry::latency_seconds_bounds()),
      inference_time_(telemetry::latency_seconds_bounds()),
      max_tokens_(telemetry::count_bounds()) {
  const size_t cells = static_cast<size_t>(num_layers_ * num_experts_);
  expert_tokens_.assign(cells, 0);
  expert_seconds_total_.assign(cells, 0.0);
  expert_seconds_.assign(cells, Histogram(telemetry::expert_compute_seconds_bounds()));
  expert_rank_.resize(static_cast<size_t>(num_layers_));
  moe_index_.assign(static_cast<size_t>(num_layers_), -1);
  for (int64_t layer = 0; layer < num_layers_; ++layer) {
    if (!config.layer_is_moe[static_cast<size_t>(layer)]) continue;
    moe_index_[static_cast<size_t>(layer)] = std::ssize(moe_layers_);
    moe_layers_.push_back(layer);
    for (int64_t expert = 0; expert < num_experts_; ++expert)
      expert_rank_[static_cast<size_t>(layer)].push_back(placement.rank_of(layer, expert));
  }
  router_margin_.assign(moe_layers_.size(), Histogram(telemetry::router_margin_bounds()));
  layer_expert_seconds_.assign(moe_layers_.size(),
                               Histogram(telemetry::expert_compute_seconds_bounds()));
  near_ties_.assign(moe_layers_.size(), 0);
  phase_seconds_.assign(static_cast<size_t>(tp_size_ * kStepPhases),
                        Histogram(telemetry::latency_seconds_bounds()));
  if (!options_.dump_dir.empty()) {
    std::filesystem::create_directories(options_.dump_dir);
    const std::string path = options_.dump_dir + "/keel-telemetry.jsonl";
    dump_file_ = std::make_unique<std::ofstream>(path, std::ios::app);
    if (!*dump_file_) throw_error("telemetry dump: cannot open ", path, " for writing");
  }
}

ServingTelemetry::~ServingTelemetry() {
  // A closing line, so the file always ends with the final totals however short the run was.
  if (!dump_file_) return;
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    write_dump_locked(now_s());
  } catch (const std::exception&) {
    // Nothing useful to do with a failed last write while shutting down.
  }
}

double ServingTelemetry::now_s() const {
  return steady_now() - epoch_;
}

void ServingTelemetry::on_step(const StepRecord& step, const StepOutput& output) {
  std::lock_guard lock(mutex_);
  ++steps_total_;
  step_seconds_.observe(step.seconds);
  batch_seqs_.observe(static_cast<double>(step.num_seqs));
  batch_tokens_.observe(static_cast<double>(step.num_tokens));
  nlohmann::json details = nlohmann::json::object();
  const StepObservation* observation = output.observation;
  if (observation != nullptr) {
    // Routing: [moe layer][token][slot] ids and [moe layer][token] margins.
    const size_t num_tokens = static_cast<size_t>(step.num_tokens);
    const size_t k = static_cast<size_t>(top_k_);
    std::vector<int64_t> step_tokens(static_cast<size_t>(num_layers_ * num_experts_), 0);
    for (size_t moe_idx = 0; moe_idx < moe_layers_.size(); ++moe_idx) {
      const int64_t layer = moe_layers_[moe_idx];
      for (size_t pair = 0; pair < num_tokens * k; ++pair) {
        const size_t at = moe_idx * num_tokens * k + pair;
        if (at >= observation->route_ids.size()) break;
        const size_t cell = static_cast<size_t>(layer * num_experts_ + observation->route_ids[at]);
        ++expert_tokens_[cell];
        ++step_tokens[cell];
      }
      for (size_t token = 0; token < num_tokens; ++token) {
        const size_t at = moe_idx * num_tokens + token;
        if (at >= observation->margins.size()) break;
        const float margin = observation->margins[at];
        router_margin_[moe_idx].observe(margin);
        if (margin < options_.near_tie_epsilon) ++near_ties_[moe_idx];
      }
    }
    // Expert compute seconds (each expert on its own rank; summed over ranks by the engine).
    struct Hot {
      int64_t layer, expert;
      double seconds;
    };
    std::vector<Hot> hot;
    for (size_t cell = 0; cell < output.expert_seconds.size(); ++cell) {
      const double seconds = output.expert_seconds[cell];
      if (seconds <= 0) continue;
      expert_seconds_[cell].observe(seconds);
      expert_seconds_total_[cell] += seconds;
      const int64_t moe_idx = moe_index_[cell / static_cast<size_t>(num_experts_)];
      if (moe_idx >= 0) layer_expert_seconds_[static_cast<size_t>(moe_idx)].observe(seconds);
      hot.push_back({static_cast<int64_t>(cell) / num_experts_,
                     static_cast<int64_t>(cell) % num_experts_, seconds});
    }
    std::partial_sort(hot.begin(), hot.begin() + std::min<ptrdiff_t>(3, std::ssize(hot)), hot.end(),
                      [](const Hot& a, const Hot& b) { return a.seconds > b.seconds; });
    nlohmann::json hot_json = nlohmann::json::array();
    for (size_t i = 0; i < std::min<size_t>(3, hot.size()); ++i) {
      const Hot& entry = hot[i];
      hot_json.push_back(
          {{"layer", entry.layer},
           {"expert", entry.expert},
           {"rank",
            expert_rank_[static_cast<size_t>(entry.layer)][static_cast<size_t>(entry.expert)]},
           {"seconds", entry.seconds},
           {"tokens",
            step_tokens[static_cast<size_t>(entry.layer * num_experts_ + entry.expert)]}});
    }
    details["hot_experts"] = hot_json;
    nlohmann::json phases = nlohmann::json::object();
    for (int phase = 0; phase < kNumPhases; ++phase) {
      nlohmann::json per_rank = nlohmann::json::array();
      for (size_t rank = 0; rank < output.rank_phase_seconds.size(); ++rank) {
        const double seconds = output.rank_phase_seconds[rank][static_cast<size_t>(phase)];
        phase_seconds_[rank * kStepPhases + static_cast<size_t>(phase)].observe(seconds);
        per_rank.push_back(seconds);
      }
      phases[std::string(phase_name(static_cast<Phase>(phase)))] = per_rank;
    }
    details["phases"] = phases;
    if (tracing_) {
      // Bounded memory: at the cap the profile stops by itself, keeping the spans so far for
      // POST /v1/profile/stop; said once in the log and by trace_status.
      auto keep = [&](telemetry::TraceSpan span) {
        if (!tracing_) return;
        trace_spans_.push_back(std::move(span));
        if (trace_spans_.size() < options_.max_trace_spans) return;
        tracing_ = false;
        trace_capped_ = true;
        spdlog::warn(
            "profile: stopped at step {}: the span cap ({}, profile_max_spans) is reached; POST "
            "/v1/profile/stop writes the spans kept",
            step.id, options_.max_trace_spans);
      };
      for (size_t rank = 0; rank < output.rank_traces.size(); ++rank)
        for (const TraceEvent& event : output.rank_traces[rank]) {
          telemetry::TraceSpan span;
          span.rank = static_cast<int32_t>(rank);
          span.name = event.expert >= 0 ? "expert " + std::to_string(event.expert)
                                        : std::string(phase_name(event.phase));
          span.category = category_of(event.phase);
          span.start_us = (event.start_s - epoch_) * 1e6;
          span.dur_us = event.seconds * 1e6;
          span.args = {{"step", step.id}, {"layer", event.layer}};
          keep(std::move(span));
        }
      telemetry::TraceSpan sampling;
      sampling.rank = 0;
      sampling.name = "sampling";
      sampling.category = "leader";
      sampling.start_us = (step.start_s + step.seconds - step.sampling_s) * 1e6;
      sampling.dur_us = step.sampling_s * 1e6;
      sampling.args = {{"step", step.id}};
      keep(std::move(sampling));
    }
  }
  phase_seconds_[kSchedulePhase].observe(step.schedule_s);
  phase_seconds_[kSamplingPhase].observe(step.sampling_s);
  push_bounded(steps_, step, options_.step_ring);
  push_bounded(step_details_, std::move(details), options_.step_ring);
  maybe_dump_locked(step.start_s + step.seconds);
}

void ServingTelemetry::on_request(const RequestRecord& request) {
  std::lock_guard lock(mutex_);
  queue_time_.observe(request.queue_s);
  ttft_.observe(request.ttft_s);
  e2e_.observe(request.e2e_s);
  prompt_tokens_.observe(static_cast<double>(request.prompt_tokens));
  generation_tokens_.observe(static_cast<double>(request.completion_tokens));
  max_tokens_.observe(static_cast<double>(request.max_tokens));
  prefill_time_.observe(request.ttft_s - request.queue_s);
  decode_time_.observe(request.e2e_s - request.ttft_s);
  inference_time_.observe(request.e2e_s - request.queue_s);
  for (size_t i = 1; i < request.token_times_s.size(); ++i)
    itl_.observe(request.token_times_s[i] - request.token_times_s[i - 1]);
  if (request.completion_tokens > 1)
    tpot_.observe((request.e2e_s - request.ttft_s) /
                  static_cast<double>(request.completion_tokens - 1));
  RequestRecord kept = request;
  kept.token_times_s.clear();  // the ring keeps the summary only
  push_bounded(requests_, std::move(kept), options_.request_ring);
}

void ServingTelemetry::start_trace() {
  std::lock_guard lock(mutex_);
  tracing_ = true;
  trace_pending_ = true;
  trace_capped_ = false;
  trace_spans_.clear();
}

bool ServingTelemetry::tracing() const {
  std::lock_guard lock(mutex_);
  return tracing_;
}

bool ServingTelemetry::trace_pending() const {
  std::lock_guard lock(mutex_);
  return trace_pending_;
}

bool ServingTelemetry::take_trace(TakenTrace& out) {
  std::lock_guard lock(mutex_);
  if (!trace_pending_) return false;
  out.spans.clear();
  out.spans.swap(trace_spans_);
  out.stopped_by_cap = trace_capped_;
  tracing_ = false;
  trace_pending_ = false;
  trace_capped_ = false;
  return true;
}

nlohmann::json ServingTelemetry::trace_status() const {
  std::lock_guard lock(mutex_);
  return {{"tracing", tracing_},
          {"spans", trace_spans_.size()},
          {"max_spans", options_.max_trace_spans},
          {"stopped_by_cap", trace_capped_}};
}

// Copies of everything the exposition prints, taken under the mutex in one go.
struct ServingTelemetry::MetricsSnapshot {
  std::vector<int64_t> expert_tokens;  // [layer * E + e]
  // kLayer: [moe layer]; kExpert: [moe layer * E + e]; kOff: empty.
  std::vector<Histogram> expert_seconds;
  std::vector<Histogram> router_margin;  // [moe layer]
  std::vector<int64_t> near_ties;        // [moe layer]
  std::vector<Histogram> phase_seconds;  // [rank * (phases + 2) + phase]
  Histogram step_seconds, batch_seqs, batch_tokens;
  Histogram queue_time, ttft, itl, tpot, e2e, prefill_time, decode_time, inference_time,
      prompt_tokens, generation_tokens, max_tokens;
};

ServingTelemetry::MetricsSnapshot ServingTelemetry::snapshot_metrics(
    ExpertLatencyDetail detail) const {
  std::lock_guard lock(mutex_);
  std::vector<Histogram> expert_seconds;
  if (detail == ExpertLatencyDetail::kLayer) expert_seconds = layer_expert_seconds_;
  if (detail == ExpertLatencyDetail::kExpert) {
    expert_seconds.reserve(moe_layers_.size() * static_cast<size_t>(num_experts_));
    for (const int64_t layer : moe_layers_) {
      const auto begin = expert_seconds_.begin() + layer * num_experts_;
      expert_seconds.insert(expert_seconds.end(), begin, begin + num_experts_);
    }
  }
  return MetricsSnapshot{expert_tokens_, std::move(expert_seconds),
                         router_margin_, near_ties_,
                         phase_seconds_, step_seconds_,
                         batch_seqs_,    batch_tokens_,
                         queue_time_,    ttft_,
                         itl_,           tpot_,
                         e2e_,           prefill_time_,
                         decode_time_,   inference_time_,
                         prompt_tokens_, generation_tokens_,
                         max_tokens_};
}

void ServingTelemetry::append_prometheus(telemetry::PromText& text,
                                         const MetricsOptions& options) const {
  const MetricsSnapshot snapshot = snapshot_metrics(options.expert_latency);
  if (options_.after_metrics_snapshot) options_.after_metrics_snapshot();
  // From here on only the snapshot and what never changes after construction (layers, ranks).
  MetricWriter out(text, options.names);
  const Labels model = {{"model_name", model_name_}};
  auto with = [&](Labels labels) {
    labels.insert(labels.begin(), model.front());
    return labels;
  };
  text.family("keel_expert_tokens_total", MetricType::kCounter,
              "Tokens routed to each expert (each (token, slot) pair counts once); the rank "
              "holding it is the placement's (GET /v1/telemetry/experts: expert_rank).");
  for (const int64_t layer : moe_layers_)
    for (int64_t expert = 0; expert < num_experts_; ++expert)
      text.value("keel_expert_tokens_total",
                 with({{"layer", std::to_string(layer)}, {"expert", std::to_string(expert)}}),
                 snapshot.expert_tokens[static_cast<size_t>(layer * num_experts_ + expert)]);
  if (options.expert_latency != ExpertLatencyDetail::kOff) {
    const bool per_expert = options.expert_latency == ExpertLatencyDetail::kExpert;
    text.family("keel_expert_seconds", MetricType::kHistogram,
                per_expert ? "Compute time of one expert's GEMMs in one step, on the rank that "
                             "holds it."
                           : "Compute time of one expert's GEMMs in one step, on the rank that "
                             "holds it, over every expert of the layer.");
    for (size_t moe_idx = 0; moe_idx < moe_layers_.size(); ++moe_idx) {
      const std::string layer = std::to_string(moe_layers_[moe_idx]);
      if (!per_expert) {
        text.histogram("keel_expert_seconds", with({{"layer", layer}}),
                       snapshot.expert_seconds[moe_idx]);
        continue;
      }
      for (int64_t expert = 0; expert < num_experts_; ++expert)
        text.histogram("keel_expert_seconds",
                       with({{"layer", layer}, {"expert", std::to_string(expert)}}),
                       snapshot.expert_seconds[moe_idx * static_cast<size_t>(num_experts_) +
                                               static_cast<size_t>(expert)]);
    }
  }
  text.family("keel_moe_rank_tokens_total", MetricType::kCounter,
              "Tokens routed to the experts each rank holds, per MoE layer.");
  text.family("keel_moe_balancedness", MetricType::kGauge,
              "Mean over max tokens per rank since start, per MoE layer (1 = perfectly balanced).");
  text.family("keel_moe_imbalance", MetricType::kGauge,
              "(max - mean) / mean tokens per rank since start, per MoE layer.");
  text.family("keel_router_margin", MetricType::kHistogram,
              "Router probability gap between the k-th and (k+1)-th expert per token and layer: "
              "the flip risk of a routing decision.");
  text.family("keel_router_near_ties_total", MetricType::kCounter,
              "Routing decisions whose margin was below the near-tie epsilon.");
  for (size_t moe_idx = 0; moe_idx < moe_layers_.size(); ++moe_idx) {
    const int64_t layer = moe_layers_[moe_idx];
    std::vector<int64_t> per_rank(static_cast<size_t>(tp_size_), 0);
    for (int64_t expert = 0; expert < num_experts_; ++expert)
      per_rank[static_cast<size_t>(
          expert_rank_[static_cast<size_t>(layer)][static_cast<size_t>(expert)])] +=
          snapshot.expert_tokens[static_cast<size_t>(layer * num_experts_ + expert)];
    double total = 0, max_tokens = 0;
    for (int rank = 0; rank < tp_size_; ++rank) {
      const int64_t tokens = per_rank[static_cast<size_t>(rank)];
      text.value("keel_moe_rank_tokens_total",
                 with({{"layer", std::to_string(layer)}, {"rank", std::to_string(rank)}}), tokens);
      total += static_cast<double>(tokens);
      max_tokens = std::max(max_tokens, static_cast<double>(tokens));
    }
    const double mean = total / tp_size_;
    const Labels layer_labels = with({{"layer", std::to_string(layer)}});
    text.value("keel_moe_balancedness", layer_labels, max_tokens > 0 ? mean / max_tokens : 1.0);
    text.value("keel_moe_imbalance", layer_labels, mean > 0 ? (max_tokens - mean) / mean : 0.0);
    text.histogram("keel_router_margin", layer_labels, snapshot.router_margin[moe_idx]);
    text.value("keel_router_near_ties_total", layer_labels, snapshot.near_ties[moe_idx]);
  }
  text.family("keel_step_phase_seconds", MetricType::kHistogram,
              "Time per step in each phase, per rank (schedule and sampling: the leader).");
  for (int rank = 0; rank < tp_size_; ++rank)
    for (int phase = 0; phase < kStepPhases; ++phase) {
      if (rank != 0 && phase >= kNumPhases) continue;
      Labels labels = with({{"rank", std::to_string(rank)}, {"phase", step_phase_name(phase)}});
      // The all-reduce phase carries its algorithm (the "all-reduce by algorithm").
      if (phase == static_cast<int>(Phase::kAllReduce) && !options_.reduce_algorithm.empty())
        labels.push_back({"algo", options_.reduce_algorithm});
      text.histogram("keel_step_phase_seconds", labels,
                     snapshot.phase_seconds[static_cast<size_t>(rank * kStepPhases + phase)]);
    }
  text.family("keel_step_seconds", MetricType::kHistogram, "Wall time of one engine step.");
  text.histogram("keel_step_seconds", model, snapshot.step_seconds);
  text.family("keel_step_batch_size", MetricType::kHistogram, "Sequences per engine step.");
  text.histogram("keel_step_batch_size", model, snapshot.batch_seqs);
  text.family("keel_step_tokens", MetricType::kHistogram, "Tokens per engine step.");
  text.histogram("keel_step_tokens", model, snapshot.batch_tokens);
  namespace rm = request_metrics;
  const std::pair<const MetricSpec*, const Histogram*> request_histograms[] = {
      {&rm::kQueueTime, &snapshot.queue_time},
      {&rm::kTimeToFirstToken, &snapshot.ttft},
      {&rm::kInterTokenLatency, &snapshot.itl},
      {&rm::kTimePerOutputToken, &snapshot.tpot},
      {&rm::kE2eLatency, &snapshot.e2e},
      {&rm::kPrefillTime, &snapshot.prefill_time},
      {&rm::kDecodeTime, &snapshot.decode_time},
      {&rm::kInferenceTime, &snapshot.inference_time},
      {&rm::kPromptTokensPerRequest, &snapshot.prompt_tokens},
      {&rm::kGenerationTokensPerRequest, &snapshot.generation_tokens},
      {&rm::kMaxTokensPerRequest, &snapshot.max_tokens},
  };
  for (const auto& [spec, histogram] : request_histograms) out.histogram(*spec, model, *histogram);
}

std::vector<LayerLoad> ServingTelemetry::layer_loads() const {
  std::lock_guard lock(mutex_);
  std::vector<LayerLoad> loads;
  for (const int64_t layer : moe_layers_) {
    const auto begin = expert_tokens_.begin() + layer * num_experts_;
    loads.push_back(LayerLoad{layer, std::vector<int64_t>(begin, begin + num_experts_),
                              expert_rank_[static_cast<size_t>(layer)]});
  }
  return loads;
}

nlohmann::json ServingTelemetry::experts_json() const {
  std::lock_guard lock(mutex_);
  nlohmann::json layers = nlohmann::json::array();
  for (size_t moe_idx = 0; moe_idx < moe_layers_.size(); ++moe_idx) {
    const int64_t layer = moe_layers_[moe_idx];
    std::vector<int64_t> tokens(static_cast<size_t>(num_experts_));
    std::vector<int64_t> per_rank(static_cast<size_t>(tp_size_), 0);
    std::vector<double> total(static_cast<size_t>(num_experts_)), p50(total.size()),
        p99(total.size());
    for (int64_t expert = 0; expert < num_experts_; ++expert) {
      const size_t cell = static_cast<size_t>(layer * num_experts_ + expert);
      tokens[static_cast<size_t>(expert)] = expert_tokens_[cell];
      per_rank[static_cast<size_t>(
          expert_rank_[static_cast<size_t>(layer)][static_cast<size_t>(expert)])] +=
          expert_tokens_[cell];
      total[static_cast<size_t>(expert)] = expert_seconds_total_[cell];
      p50[static_cast<size_t>(expert)] =
          expert_seconds_[cell].count() > 0 ? expert_seconds_[cell].quantile(0.5) : 0.0;
      p99[static_cast<size_t>(expert)] =
          expert_seconds_[cell].count() > 0 ? expert_seconds_[cell].quantile(0.99) : 0.0;
    }
    double sum = 0, max_tokens = 0;
    for (int64_t count : per_rank) {
      sum += static_cast<double>(count);
      max_tokens = std::max(max_tokens, static_cast<double>(count));
    }
    const double mean = sum / tp_size_;
    const Histogram& margins = router_margin_[moe_idx];
    layers.push_back({{"layer", layer},
                      {"moe", true},
                      {"tokens", tokens},
                      {"tokens_per_rank", per_rank},
                      {"balancedness", max_tokens > 0 ? mean / max_tokens : 1.0},
                      {"imbalance", mean > 0 ? (max_tokens - mean) / mean : 0.0},
                      {"near_ties", near_ties_[moe_idx]},
                      {"margin",
                       {{"p50", margins.count() > 0 ? margins.quantile(0.5) : 0.0},
                        {"p99", margins.count() > 0 ? margins.quantile(0.99) : 0.0},
                        {"count", margins.count()}}},
                      {"expert_seconds", {{"total", total}, {"p50", p50}, {"p99", p99}}}});
  }
  return {{"model", model_name_},
          {"num_layers", num_layers_},
          {"num_experts", num_experts_},
          {"top_k", top_k_},
          {"tp", tp_size_},
          {"near_tie_epsilon", options_.near_tie_epsilon},
          {"expert_rank", expert_rank_},
          {"layers", layers}};
}

nlohmann::json ServingTelemetry::requests_json(size_t limit) const {
  std::lock_guard lock(mutex_);
  nlohmann::json requests = nlohmann::json::array();
  const size_t first = requests_.size() > limit ? requests_.size() - limit : 0;
  for (size_t i = first; i < requests_.size(); ++i) {
    const RequestRecord& request = requests_[i];
    requests.push_back({{"id", request.id},
                        {"seq_id", request.seq_id},
                        {"arrival_s", request.arrival_s},
                        {"queue_s", request.queue_s},
                        {"ttft_s", request.ttft_s},
                        {"e2e_s", request.e2e_s},
                        {"prompt_tokens", request.prompt_tokens},
                        {"completion_tokens", request.completion_tokens},
                        {"preemptions", request.preemptions},
                        {"first_step", request.first_step},
                        {"last_step", request.last_step},
                        {"finish_reason", request.finish_reason}});
  }
  return {{"requests", requests}};
}

nlohmann::json ServingTelemetry::steps_json(int64_t first, int64_t last) const {
  std::lock_guard lock(mutex_);
  nlohmann::json steps = nlohmann::json::array();
  for (size_t i = 0; i < steps_.size(); ++i) {
    const StepRecord& step = steps_[i];
    if (step.id < first || step.id > last) continue;
    nlohmann::json entry = {
        {"id", step.id},
        {"start_s", step.start_s},
        {"seconds", step.seconds},
        {"num_seqs", step.num_seqs},
        {"num_tokens", step.num_tokens},
        {"num_prefill_tokens", step.num_prefill_tokens},
        {"num_decode_tokens", step.num_decode_tokens},
        {"kv_tokens_read", step.kv_tokens_read},
        {"kv_blocks_used", step.kv_blocks_used},
        {"preemptions", step.preemptions},
        {"sampling_s", step.sampling_s},
        {"schedule_s", step.schedule_s},
        {"gap_before_s",
         step.gap_before_s >= 0 ? nlohmann::json(step.gap_before_s) : nlohmann::json(nullptr)},
        {"seq_ids", step.seq_ids},
        {"request_ids", step.request_ids}};
    const nlohmann::json& details = step_details_[i];
    entry["phases"] = details.contains("phases") ? details["phases"] : nlohmann::json::object();
    entry["hot_experts"] =
        details.contains("hot_experts") ? details["hot_experts"] : nlohmann::json::array();
    steps.push_back(std::move(entry));
  }
  return {{"steps", steps}};
}

void ServingTelemetry::maybe_dump_locked(double now) {
  if (!dump_file_ || now - last_dump_s_ < options_.dump_interval_s) return;
  write_dump_locked(now);
}

void ServingTelemetry::write_dump_locked(double now) {
  last_dump_s_ = now;
  // One JSON line per interval: cumulative expert counts, margins and request latencies.
  nlohmann::json line = {{"time_s", now},
                         {"steps_total", steps_total_},
                         {"expert_tokens", expert_tokens_},
                         {"near_ties", near_ties_},
                         {"ttft", telemetry::histogram_json(ttft_)},
                         {"itl", telemetry::histogram_json(itl_)},
                         {"e2e", telemetry::histogram_json(e2e_)},
                         {"step_seconds", telemetry::histogram_json(step_seconds_)}};
  *dump_file_ << line.dump() << '\n';
  dump_file_->flush();
}

}  // namespace keel
