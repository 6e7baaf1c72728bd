// GPU server description for capacity planning (configs/hardware/*.yaml): per-GPU memory,
// bandwidth and dense tensor throughput, the GPU-to-GPU interconnect, and the efficiency factors
// that turn datasheet peaks into achievable rates.
//
// Design note. Peaks come from vendor datasheets (cited in each YAML file) and are DENSE
// (no 2:4 sparsity). A peak of 0 means the precision has no tensor-core path on that GPU; the
// planner then runs those matmuls at the next supported precision (fp4 -> fp8 -> bf16 for
// W4A4/W8A8; weight-only formats always use bf16). Efficiencies are explicit knobs, documented in
// the YAML and overridable from the command line or an efficiency file:
//   bandwidth_efficiency   achieved / peak HBM or GDDR read bandwidth in decode GEMVs
//   compute_efficiency     achieved / peak dense tensor FLOP/s in large GEMMs
//   layer_overhead_us      fixed time per decoder layer per step (kernel launches, small ops,
//                          norms, routing, synchronization) that neither roofline captures
//   interconnect.latency_us     per ring hop of an all-reduce (NCCL ring: 2(n-1) hops)
//   interconnect.efficiency     achieved / peak link bandwidth (NCCL bus bandwidth)
// `count` is the number of GPUs in the box; `keel plan --gpus N` overrides it.
#pragma once

#include <string>

#include "runtime/tools/planning/quant.h"

namespace keel::planning {

struct Interconnect {
  std::string kind;          // "pcie-gen5", "pcie-gen4", "nvlink4"
  double bandwidth_gbs = 0;  // per GPU, per direction, GB/s (1e9 B/s)
  double latency_us = 0;     // per ring step
  double efficiency = 1.0;   // achieved fraction of bandwidth_gbs
};

struct HardwareSpec {
  std::string name;
  std::string source;
  std::string path;
  int count = 1;
  double memory_gib = 0;            // per GPU, GiB (2^30 B)
  double memory_bandwidth_gbs = 0;  // per GPU, GB/s (1e9 B/s)
  double tflops_bf16 = 0;           // dense
  double tflops_fp8 = 0;            // dense, 0 = none
  double tflops_fp4 = 0;            // dense, 0 = none
  Interconnect interconnect;
  double bandwidth_efficiency = 0.8;
  double compute_efficiency = 0.6;
  double layer_overhead_us = 10.0;

  // Peak dense FLOP/s for matmuls in `precision`, falling back to a supported precision.
  double peak_flops(ComputePrecision precision) const;
  // The precision actually used after fallback.
  ComputePrecision effective_precision(ComputePrecision precision) const;
};

// Loads and validates a hardware preset. Throws keel::Error naming the file and key.
HardwareSpec load_hardware_spec(const std::string& path);

// Efficiency overrides from a YAML file with any of the keys bandwidth_efficiency,
// compute_efficiency, layer_overhead_us, allreduce_latency_us, interconnect_efficiency.
void apply_efficiency_file(HardwareSpec& hardware, const std::string& path);

void validate_hardware_spec(const HardwareSpec& hardware, const std::string& where);

}  // namespace keel::planning
