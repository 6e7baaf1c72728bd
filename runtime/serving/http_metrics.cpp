// Prometheus text for HttpServerStats (see http_metrics.h).
#include "runtime/serving/http_metrics.h"

#include "runtime/telemetry/metrics.h"

namespace keel {

std::string http_prometheus(const server::HttpServerStats& stats, const std::string& model_name) {
  telemetry::PromText out;
  const telemetry::Labels labels = {{"model_name", model_name}};
  auto add = [&](const char* name, telemetry::MetricType type, const char* help, auto value) {
    out.family(name, type, help);
    out.value(name, labels, value);
  };
  using telemetry::MetricType;
  add("keel_http_open_connections", MetricType::kGauge,
      "Open client connections (the reserve included).", stats.open_connections);
  add("keel_http_reserve_connections", MetricType::kGauge,
      "Open connections in the reserve kept for /health and /metrics.", stats.reserve_connections);
  add("keel_http_evicted_idle_total", MetricType::kCounter,
      "Kept-alive idle connections closed to make room at the connection cap.", stats.evicted_idle);
  add("keel_http_evicted_slow_total", MetricType::kCounter,
      "Silent or slow-request connections closed to make room at the connection cap.",
      stats.evicted_slow);
  add("keel_http_refused_total", MetricType::kCounter,
      "Connections answered 429 unread: the cap and the reserve were full.", stats.refused);
  add("keel_http_reserve_refused_total", MetricType::kCounter,
      "Requests on reserve connections answered 429 (not /health or /metrics).",
      stats.reserve_refused);
  add("keel_http_slow_reader_aborts_total", MetricType::kCounter,
      "Streams cancelled because the client stopped reading past max_unsent_kb.",
      stats.slow_reader_aborts);
  return out.str();
}

}  // namespace keel
