// keel's metric names and vLLM's aliases (see metric_export.h).
#include "runtime/serving/metric_export.h"

#include "kernels/base/check.h"

namespace keel {

std::string_view metric_names_name(MetricNames names) {
  return names == MetricNames::kVllm ? "vllm" : "keel";
}

MetricNames parse_metric_names(std::string_view name, std::string_view what) {
  if (name == "keel") return MetricNames::kKeel;
  if (name == "vllm") return MetricNames::kVllm;
  throw_error(what, " is '", name, "'; expected keel or vllm");
}

template <typename Emit>
void MetricWriter::each_name(const MetricSpec& spec, Emit emit) {
  out_.family(spec.name, spec.type, spec.help);
  emit(spec.name);
  if (!vllm()) return;
  for (const char* alias : spec.vllm_names) {
    out_.family(alias, spec.type, spec.help);
    emit(alias);
  }
}

void MetricWriter::value(const MetricSpec& spec, const telemetry::Labels& labels, double v) {
  each_name(spec, [&](const char* name) { out_.value(name, labels, v); });
}

void MetricWriter::value(const MetricSpec& spec, const telemetry::Labels& labels, int64_t v) {
  each_name(spec, [&](const char* name) { out_.value(name, labels, v); });
}

void MetricWriter::histogram(const MetricSpec& spec, const telemetry::Labels& labels,
                             const telemetry::Histogram& h) {
  each_name(spec, [&](const char* name) { out_.histogram(name, labels, h); });
}

}  // namespace keel
