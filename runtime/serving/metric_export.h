// The names /metrics exports keel's request-level metrics under: keel's own (keel_ prefix) and,
// with `metrics_names: vllm` (keel serve --metrics-names vllm), vLLM's as well (vllm: prefix,
// the same model_name label), so that dashboards built for vLLM, its published Grafana
// dashboard first (the query list in tests/fixtures/vllm_grafana/), work unchanged.
//
// Design: one MetricSpec per family names its keel name and its vLLM names (several where vLLM
// renamed a metric and dashboards still query the old name, e.g. vllm:gpu_cache_usage_perc
// beside vllm:kv_cache_usage_perc). MetricWriter declares and fills every name from the same
// value, so the aliases can never disagree. Expert, router and step metrics have no vLLM
// counterpart and keep their keel names only.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "runtime/telemetry/metrics.h"

namespace keel {

enum class MetricNames : uint8_t { kKeel, kVllm };
std::string_view metric_names_name(MetricNames names);
// Throws keel::Error naming `what` (the flag or key) and the accepted values.
MetricNames parse_metric_names(std::string_view name, std::string_view what);

struct MetricSpec {
  const char* name;  // keel's
  telemetry::MetricType type;
  const char* help;
  std::vector<const char*> vllm_names;  // empty: no vLLM counterpart
};

// Writes each sample under keel's name and, with MetricNames::kVllm, under every vLLM name.
class MetricWriter {
 public:
  MetricWriter(telemetry::PromText& out, MetricNames names) : out_(out), names_(names) {}

  void value(const MetricSpec& spec, const telemetry::Labels& labels, double v);
  void value(const MetricSpec& spec, const telemetry::Labels& labels, int64_t v);
  void histogram(const MetricSpec& spec, const telemetry::Labels& labels,
                 const telemetry::Histogram& h);

  bool vllm() const { return names_ == MetricNames::kVllm; }
  telemetry::PromText& out() { return out_; }

 private:
  template <typename Emit>
  void each_name(const MetricSpec& spec, Emit emit);

  telemetry::PromText& out_;
  const MetricNames names_;
};

// The request-level families (serving counters and gauges, per-request histograms).
namespace request_metrics {
using telemetry::MetricType;
inline const MetricSpec kRunning{"keel_num_requests_running",
                                 MetricType::kGauge,
                                 "Requests in the running batch.",
                                 {"vllm:num_requests_running"}};
inline const MetricSpec kWaiting{"keel_num_requests_waiting",
                                 MetricType::kGauge,
                                 "Requests waiting for admission.",
                                 {"vllm:num_requests_waiting"}};
inline const MetricSpec kKvCacheUsage{"keel_kv_cache_usage_perc",
                                      MetricType::kGauge,
                                      "Fraction of KV blocks in use (0 to 1).",
                                      {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"}};
inline const MetricSpec kPreemptions{"keel_num_preemptions_total",
                                     MetricType::kCounter,
                                     "Sequences preempted (recompute).",
                                     {"vllm:num_preemptions_total"}};
inline const MetricSpec kPromptTokens{"keel_prompt_tokens_total",
                                      MetricType::kCounter,
                                      "Prompt tokens admitted.",
                                      {"vllm:prompt_tokens_total"}};
inline const MetricSpec kGenerationTokens{"keel_generation_tokens_total",
                                          MetricType::kCounter,
                                          "Tokens generated.",
                                          {"vllm:generation_tokens_total"}};
inline const MetricSpec kQueueTime{"keel_request_queue_time_seconds",
                                   MetricType::kHistogram,
                                   "Time from arrival to the first scheduled step.",
                                   {"vllm:request_queue_time_seconds"}};
inline const MetricSpec kTimeToFirstToken{"keel_time_to_first_token_seconds",
                                          MetricType::kHistogram,
                                          "Time from arrival to the first token.",
                                          {"vllm:time_to_first_token_seconds"}};
// vLLM's time_per_output_token_seconds was this same per-token interval before it was renamed
// inter_token_latency_seconds; its published dashboard still queries the old name.
inline const MetricSpec kInterTokenLatency{
    "keel_inter_token_latency_seconds",
    MetricType::kHistogram,
    "Time between consecutive tokens of a request.",
    {"vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"}};
inline const MetricSpec kTimePerOutputToken{"keel_request_time_per_output_token_seconds",
                                            MetricType::kHistogram,
                                            "(e2e - TTFT) / (output tokens - 1) per request.",
                                            {"vllm:request_time_per_output_token_seconds"}};
inline const MetricSpec kE2eLatency{"keel_e2e_request_latency_seconds",
                                    MetricType::kHistogram,
                                    "Time from arrival to the last token.",
                                    {"vllm:e2e_request_latency_seconds"}};
inline const MetricSpec kPrefillTime{"keel_request_prefill_time_seconds",
                                     MetricType::kHistogram,
                                     "Time from the first scheduled step to the first token.",
                                     {"vllm:request_prefill_time_seconds"}};
inline const MetricSpec kDecodeTime{"keel_request_decode_time_seconds",
                                    MetricType::kHistogram,
                                    "Time from the first token to the last.",
                                    {"vllm:request_decode_time_seconds"}};
inline const MetricSpec kInferenceTime{"keel_request_inference_time_seconds",
                                       MetricType::kHistogram,
                                       "Time from the first scheduled step to the last token.",
                                       {"vllm:request_inference_time_seconds"}};
inline const MetricSpec kPromptTokensPerRequest{"keel_request_prompt_tokens",
                                                MetricType::kHistogram,
                                                "Prompt tokens per finished request.",
                                                {"vllm:request_prompt_tokens"}};
inline const MetricSpec kGenerationTokensPerRequest{"keel_request_generation_tokens",
                                                    MetricType::kHistogram,
                                                    "Generated tokens per finished request.",
                                                    {"vllm:request_generation_tokens"}};
inline const MetricSpec kMaxTokensPerRequest{
    "keel_request_max_num_generation_tokens",
    MetricType::kHistogram,
    "The generation limit (max_tokens, capped by the context) per finished request.",
    {"vllm:request_max_num_generation_tokens"}};
}  // namespace request_metrics

}  // namespace keel
