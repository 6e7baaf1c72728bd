// Hardware presets: strict loading, precision fallback, efficiency overrides.
#include "runtime/tools/planning/hardware_spec.h"

#include <set>

#include "runtime/tools/planning/yaml_strict.h"

namespace keel::planning {

using detail::read_optional;
using detail::read_required;

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
  if (h.layer_overhead_us < 0) throw_error(where, ": 'layer_overhead_us' must be >= 0");
  if (h.interconnect.latency_us < 0) throw_error(where, ": 'interconnect.latency_us' must be >= 0");
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
       "layer_overhead_us"},
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
  if (root["interconnect"]) {
    const YAML::Node ic = root["interconnect"];
    const std::string ic_where = where + ": interconnect";
    if (!ic.IsMap()) throw_error(ic_where, ": expected a mapping");
    detail::reject_unknown_keys(ic, {"kind", "bandwidth_gbs", "latency_us", "efficiency"},
                                ic_where);
    read_required(ic, "kind", ic_where, h.interconnect.kind);
    read_required(ic, "bandwidth_gbs", ic_where, h.interconnect.bandwidth_gbs);
    read_required(ic, "latency_us", ic_where, h.interconnect.latency_us);
    read_optional(ic, "efficiency", ic_where, h.interconnect.efficiency);
  }
  validate_hardware_spec(h, where);
  return h;
}

void apply_efficiency_file(HardwareSpec& h, const std::string& path) {
  YAML::Node root = detail::load_yaml_mapping(path);
  detail::reject_unknown_keys(root,
                              {"bandwidth_efficiency", "compute_efficiency", "layer_overhead_us",
                               "allreduce_latency_us", "interconnect_efficiency"},
                              path);
  read_optional(root, "bandwidth_efficiency", path, h.bandwidth_efficiency);
  read_optional(root, "compute_efficiency", path, h.compute_efficiency);
  read_optional(root, "layer_overhead_us", path, h.layer_overhead_us);
  read_optional(root, "allreduce_latency_us", path, h.interconnect.latency_us);
  read_optional(root, "interconnect_efficiency", path, h.interconnect.efficiency);
  validate_hardware_spec(h, path);
}

}  // namespace keel::planning
