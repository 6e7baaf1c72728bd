// Hardware presets: strict loading, precision fallback, efficiency overrides.
#include "runtime/tools/planning/hardware_spec.h"

#include <set>

#include "runtime/tools/planning/yaml_strict.h"

namespace keel::planning {

using detail::read_optional;
using detail::read_required;

const char* allreduce_algorithm_name(AllReduceAlgorithm algorithm) {
  switch (algorithm) {
    case AllReduceAlgorithm::ring:
      return "ring";
    case AllReduceAlgorithm::one_shot:
      return "one_shot";
    case AllReduceAlgorithm::two_shot:
      return "two_shot";
    case AllReduceAlgorithm::automatic:
      return "auto";
  }
  return "ring";
}

AllReduceAlgorithm allreduce_algorithm_from_name(const std::string& name,
                                                 const std::string& where) {
  if (name == "ring") return AllReduceAlgorithm::ring;
  if (name == "one_shot") return AllReduceAlgorithm::one_shot;
  if (name == "two_shot") return AllReduceAlgorithm::two_shot;
  if (name == "auto") return AllReduceAlgorithm::automatic;
  throw_error(where, ": 'allreduce' must be ring, one_shot, two_shot or auto (got '", name, "')");
}

ComputePrecision HardwareSpec::effective_precision(ComputePrecision precision) const {
  if (precision == ComputePrecision::fp4) {
    if (tflops_fp4 > 0) return ComputePrecision::fp4;
    // No fp4 tensor cores (Hopper, Ada): weight-only fp4 kernels (Marlin-style) dequantize to
    // bf16 and run bf16 tensor cores.
    return ComputePrecision::bf16;
  }
  if (precision == ComputePrecision::fp8 && tflops_fp8 <= 0) return ComputePrecision::bf16;
  return precision;
}

double HardwareSpec::peak_flops(ComputePrecision precision) const {
  switch (effective_precision(precision)) {
    case ComputePrecision::fp4:
      return tflops_fp4 * 1e12;
    case ComputePrecision::fp8:
      return tflops_fp8 * 1e12;
    case ComputePrecision::bf16:
      return tflops_bf16 * 1e12;
  }
  return tflops_bf16 * 1e12;
}

void validate_hardware_spec(const HardwareSpec& h, const std::string& where) {
  if (h.count < 1) throw_error(where, ": 'count' must be >= 1");
  if (h.memory_gib <= 0) throw_error(where, ": 'memory_gib' must be positive");
  if (h.memory_bandwidth_gbs <= 0) throw_error(where, ": 'memory_bandwidth_gbs' must be positive");
  if (h.tflops_bf16 <= 0) throw_error(where, ": 'tflops_bf16' must be positive");
  if (h.tflops_fp8 < 0 || h.tflops_fp4 < 0) throw_error(where, ": TFLOPS must be >= 0");
  auto fraction = [&](double value, const char* key) {
    if (!(value > 0 && value <= 1))
      throw_error(where, ": '", key, "' must be in (0, 1] (got ", value, ")");
  };
  fraction(h.bandwidth_efficiency, "bandwidth_efficiency");
  fraction(h.compute_efficiency, "compute_efficiency");
  fraction(h.interconnect.efficiency, "interconnect.efficiency");
  auto non_negative = [&](double value, const char* key) {
    if (!(value >= 0)) throw_error(where, ": '", key, "' must be >= 0 (got ", value, ")");
  };
  non_negative(h.layer_overhead_us, "layer_overhead_us");
  non_negative(h.launch_us_graph, "launch_us_graph");
  non_negative(h.launch_us_eager, "launch_us_eager");
  non_negative(h.interconnect.latency_us, "interconnect.latency_us");
  non_negative(h.interconnect.one_shot_latency_us, "interconnect.one_shot_latency_us");
  non_negative(h.interconnect.two_shot_latency_us, "interconnect.two_shot_latency_us");
  const KernelCounts& k = h.engine.kernels;
  non_negative(k.linear_attention, "kernels.linear_attention");
  non_negative(k.full_attention, "kernels.full_attention");
  non_negative(k.moe, "kernels.moe");
  non_negative(k.dense_mlp, "kernels.dense_mlp");
  non_negative(k.per_step, "kernels.per_step");
  if (h.engine.moe_tile_m < 1) throw_error(where, ": 'moe_tile_m' must be >= 1");
  if (h.engine.cuda_graph_max_tokens < 0)
    throw_error(where, ": 'cuda_graph_max_tokens' must be >= 0");
  if (!(h.engine.logits_bytes > 0)) throw_error(where, ": 'logits_bytes' must be positive");
  if (h.count > 1 && h.interconnect.bandwidth_gbs <= 0)
    throw_error(where, ": 'interconnect.bandwidth_gbs' must be positive for count > 1");
}

HardwareSpec load_hardware_spec(const std::string& path) {
  YAML::Node root = detail::load_yaml_mapping(path);
  const std::string& where = path;
  detail::reject_unknown_keys(
      root,
      {"kind", "name", "source", "count", "memory_gib", "memory_bandwidth_gbs", "tflops_bf16",
       "tflops_fp8", "tflops_fp4", "interconnect", "bandwidth_efficiency", "compute_efficiency",
       "layer_overhead_us", "launch_us_graph", "launch_us_eager"},
      where);
  std::string kind;
  read_required(root, "kind", where, kind);
  if (kind != "hardware")
    throw_error(where, ": key 'kind' must be 'hardware' for a hardware preset (got '", kind, "')");
  HardwareSpec h;
  h.path = path;
  read_required(root, "name", where, h.name);
  read_optional(root, "source", where, h.source);
  read_required(root, "count", where, h.count);
  read_required(root, "memory_gib", where, h.memory_gib);
  read_required(root, "memory_bandwidth_gbs", where, h.memory_bandwidth_gbs);
  read_required(root, "tflops_bf16", where, h.tflops_bf16);
  read_optional(root, "tflops_fp8", where, h.tflops_fp8);
  read_optional(root, "tflops_fp4", where, h.tflops_fp4);
  read_optional(root, "bandwidth_efficiency", where, h.bandwidth_efficiency);
  read_optional(root, "compute_efficiency", where, h.compute_efficiency);
  read_optional(root, "layer_overhead_us", where, h.layer_overhead_us);
  read_optional(root, "launch_us_graph", where, h.launch_us_graph);
  read_optional(root, "launch_us_eager", where, h.launch_us_eager);
  if (root["interconnect"]) {
    const YAML::Node ic = root["interconnect"];
    const std::string ic_where = where + ": interconnect";
    if (!ic.IsMap()) throw_error(ic_where, ": expected a mapping");
    detail::reject_unknown_keys(ic,
                                {"kind", "bandwidth_gbs", "latency_us", "efficiency",
                                 "one_shot_latency_us", "two_shot_latency_us"},
                                ic_where);
    read_required(ic, "kind", ic_where, h.interconnect.kind);
    read_required(ic, "bandwidth_gbs", ic_where, h.interconnect.bandwidth_gbs);
    read_required(ic, "latency_us", ic_where, h.interconnect.latency_us);
    read_optional(ic, "efficiency", ic_where, h.interconnect.efficiency);
    read_optional(ic, "one_shot_latency_us", ic_where, h.interconnect.one_shot_latency_us);
    read_optional(ic, "two_shot_latency_us", ic_where, h.interconnect.two_shot_latency_us);
  }
  validate_hardware_spec(h, where);
  return h;
}

void apply_efficiency_file(HardwareSpec& h, const std::string& path) {
  YAML::Node root = detail::load_yaml_mapping(path);
  detail::reject_unknown_keys(root,
                              {"kind",
                               "name",
                               "source",
                               "bandwidth_efficiency",
                               "compute_efficiency",
                               "layer_overhead_us",
                               "launch_us_graph",
                               "launch_us_eager",
                               "allreduce_latency_us",
                               "one_shot_latency_us",
                               "two_shot_latency_us",
                               "interconnect_efficiency",
                               "kernels",
                               "cuda_graphs",
                               "cuda_graph_max_tokens",
                               "allreduce",
                               "moe_tile_m",
                               "logits_bytes",
                               "fitted",
                               "fitted_to"},
                              path);
  if (root["kind"]) {
    std::string kind;
    read_optional(root, "kind", path, kind);
    if (kind != "engine")
      throw_error(path, ": key 'kind' must be 'engine' for an efficiency file (got '", kind, "')");
  }
  EngineProfile& e = h.engine;
  read_optional(root, "name", path, e.name);
  read_optional(root, "source", path, e.source);
  read_optional(root, "bandwidth_efficiency", path, h.bandwidth_efficiency);
  read_optional(root, "compute_efficiency", path, h.compute_efficiency);
  read_optional(root, "layer_overhead_us", path, h.layer_overhead_us);
  read_optional(root, "launch_us_graph", path, h.launch_us_graph);
  read_optional(root, "launch_us_eager", path, h.launch_us_eager);
  read_optional(root, "allreduce_latency_us", path, h.interconnect.latency_us);
  read_optional(root, "one_shot_latency_us", path, h.interconnect.one_shot_latency_us);
  read_optional(root, "two_shot_latency_us", path, h.interconnect.two_shot_latency_us);
  read_optional(root, "interconnect_efficiency", path, h.interconnect.efficiency);
  if (root["kernels"]) {
    const YAML::Node k = root["kernels"];
    const std::string where = path + ": kernels";
    if (!k.IsMap()) throw_error(where, ": expected a mapping");
    detail::reject_unknown_keys(
        k, {"linear_attention", "full_attention", "moe", "dense_mlp", "per_step"}, where);
    read_optional(k, "linear_attention", where, e.kernels.linear_attention);
    read_optional(k, "full_attention", where, e.kernels.full_attention);
    read_optional(k, "moe", where, e.kernels.moe);
    read_optional(k, "dense_mlp", where, e.kernels.dense_mlp);
    read_optional(k, "per_step", where, e.kernels.per_step);
  }
  read_optional(root, "cuda_graphs", path, e.cuda_graphs);
  read_optional(root, "cuda_graph_max_tokens", path, e.cuda_graph_max_tokens);
  if (root["allreduce"]) {
    std::string name;
    read_optional(root, "allreduce", path, name);
    e.allreduce = allreduce_algorithm_from_name(name, path);
  }
  read_optional(root, "moe_tile_m", path, e.moe_tile_m);
  read_optional(root, "logits_bytes", path, e.logits_bytes);
  read_optional(root, "fitted", path, e.fitted_keys);
  if (root["fitted_to"]) {
    const YAML::Node points = root["fitted_to"];
    if (!points.IsSequence()) throw_error(path, ": 'fitted_to' must be a list");
    for (size_t i = 0; i < points.size(); ++i) {
      const std::string where = path + ": fitted_to[" + std::to_string(i) + "]";
      if (!points[i].IsMap()) throw_error(where, ": expected a mapping");
      detail::reject_unknown_keys(points[i], {"what", "published_tokens_per_s", "source"}, where);
      FitPoint point;
      read_required(points[i], "what", where, point.what);
      read_required(points[i], "published_tokens_per_s", where, point.published_tokens_per_s);
      read_optional(points[i], "source", where, point.source);
      e.fitted_to.push_back(point);
    }
  }
  validate_hardware_spec(h, path);
}

}  // namespace keel::planning
