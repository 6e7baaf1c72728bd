// GPU server description for capacity planning (configs/hardware/*.yaml): per-GPU memory,
// bandwidth and dense tensor throughput, the GPU-to-GPU interconnect, and the efficiency factors
// that turn datasheet peaks into achievable rates; plus the engine profile (how a serving engine
// drives that hardware: kernels per layer, CUDA graphs, all-reduce algorithm, MoE tile).
//
// Design note. Peaks come from vendor datasheets (cited in each YAML file) and are DENSE
// (no 2:4 sparsity). A peak of 0 means the precision has no tensor-core path on that GPU; the
// planner then runs those matmuls at the next supported precision (fp4 -> fp8 -> bf16 for
// W4A4/W8A8; weight-only formats always use bf16). Efficiencies are explicit knobs, documented in
// the YAML and overridable from the command line or an efficiency file:
//   bandwidth_efficiency   achieved / peak HBM or GDDR read bandwidth in decode GEMVs
//   compute_efficiency     achieved / peak dense tensor FLOP/s in large GEMMs
//   layer_overhead_us      fixed time per decoder layer per step on top of the kernel launches
//                          the engine profile counts (0 when the profile's counts cover it)
//   launch_us_graph        fixed time per kernel replayed from a CUDA graph (launch gap plus the
//                          ramp-up and drain of a kernel too small to fill the GPU)
//   launch_us_eager        the same for a kernel launched one by one from the host
//   interconnect.latency_us          per ring hop of an all-reduce (NCCL ring: 2(n-1) hops)
//   interconnect.one_shot_latency_us one-shot all-reduce (every rank reads all peers' buffers)
//   interconnect.two_shot_latency_us two-shot all-reduce (reduce-scatter + all-gather, direct)
//   interconnect.efficiency          achieved / peak link bandwidth (NCCL bus bandwidth)
// `count` is the number of GPUs in the box; `keel plan --gpus N` overrides it.
//
// An efficiency file (--efficiency-file, configs/engines/*.yaml) overrides any of the
// efficiencies above and sets the engine profile (EngineProfile below); it records the points its
// fitted values were fitted to (`fitted_to`), which the planner prints with the plan.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tools/planning/quant.h"

namespace keel::planning {

struct Interconnect {
  std::string kind;          // "pcie-gen5", "pcie-gen4", "nvlink4"
  double bandwidth_gbs = 0;  // per GPU, per direction, GB/s (1e9 B/s)
  double latency_us = 0;     // per ring step
  double efficiency = 1.0;   // achieved fraction of bandwidth_gbs
  // Fixed cost of one call of the direct (non-ring) algorithms. Defaults: the custom one-shot
  // all-reduce measured on 4x RTX PRO 6000 over PCIe, 6.1-7.5 us at 1 KB
  // (local-inference-lab/rtx6kpro hardware/pcie-bandwidth.md, asus-esc8000a-e13p-...md);
  // two-shot is two such exchanges (derived, no published measurement).
  double one_shot_latency_us = 7.5;
  double two_shot_latency_us = 15.0;
};

// How an engine reduces a partial sum across the TP group (runtime/comm in keel; NCCL or a
// custom all-reduce in vLLM/SGLang). `automatic` takes the cheapest for each message size, as
// engines that switch algorithms by size do.
enum class AllReduceAlgorithm { ring, one_shot, two_shot, automatic };
const char* allreduce_algorithm_name(AllReduceAlgorithm algorithm);
AllReduceAlgorithm allreduce_algorithm_from_name(const std::string& name, const std::string& where);

// Kernels an engine launches per decode step, by layer kind, excluding collectives (costed by
// the all-reduce model). Defaults count vLLM's Qwen3-Next/Qwen3.5 decode path op by op from its
// model code (vllm/model_executor/models/qwen3_next.py, layers/mamba/gdn_linear_attn.py,
// fused_moe), not from a profiler trace, so fusions a given build does are not seen:
//   linear_attention  add+RMSNorm, in_proj_qkvz, in_proj_ba, conv1d update, fused gating +
//                     delta-rule update, gated RMSNorm, out_proj, 2 layout copies        = 9
//   full_attention    add+RMSNorm, qkv_proj, q/k norm, rope, KV-cache write, decode attention
//                     (2: split-KV + merge), sigmoid gate, o_proj                         = 10
//   moe               add+RMSNorm, router, top-k softmax, align/permute (2), activation quant,
//                     grouped GEMM 1, SiLU*mul+quant, grouped GEMM 2, unpermute/reduce, shared
//                     gate_up, SiLU*mul, shared down, shared-expert gate, gate*add       = 15
//   dense_mlp         add+RMSNorm, gate_up, SiLU*mul, down                                = 4
//   per_step          embedding, final norm, lm_head, logits copy, sampler (3)            = 7
struct KernelCounts {
  double linear_attention = 9;
  double full_attention = 10;
  double moe = 15;
  double dense_mlp = 4;
  double per_step = 7;
};

// One published measurement an engine profile was fitted to (recorded, printed, not used).
struct FitPoint {
  std::string what;  // "c=1, short prompts"
  double published_tokens_per_s = 0;
  std::string source;
};

struct EngineProfile {
  std::string name = "generic (built-in defaults)";
  std::string source;
  KernelCounts kernels;
  // Decode steps of at most cuda_graph_max_tokens tokens replay a captured graph
  // (launch_us_graph per kernel); larger or prefill steps launch eagerly (launch_us_eager).
  // vLLM captures decode batches up to 512 by default (max_cudagraph_capture_size).
  bool cuda_graphs = true;
  int64_t cuda_graph_max_tokens = 512;
  AllReduceAlgorithm allreduce = AllReduceAlgorithm::ring;
  // Rows of one tile of the MoE grouped GEMM: an expert that receives n rows computes and
  // stages ceil(n / tile) * tile (CUTLASS grouped GEMM tiles are 64-128 rows).
  int64_t moe_tile_m = 128;
  // Logits gathered to the sampler per sequence: vocab * logits_bytes (bf16 in vLLM's
  // LogitsProcessor gather; keel gathers fp32).
  double logits_bytes = 4.0;
  std::vector<FitPoint> fitted_to;
  std::vector<std::string> fitted_keys;  // which values of the file the fit produced
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
  double layer_overhead_us = 0.0;
  double launch_us_graph = 3.0;
  double launch_us_eager = 6.0;
  EngineProfile engine;

  // Peak dense FLOP/s for matmuls in `precision`, falling back to a supported precision.
  double peak_flops(ComputePrecision precision) const;
  // The precision actually used after fallback.
  ComputePrecision effective_precision(ComputePrecision precision) const;
};

// Loads and validates a hardware preset. Throws keel::Error naming the file and key.
HardwareSpec load_hardware_spec(const std::string& path);

// Efficiency overrides and the engine profile from a YAML file (configs/engines/*.yaml): any of
// bandwidth_efficiency, compute_efficiency, layer_overhead_us, launch_us_graph,
// launch_us_eager, allreduce_latency_us, one_shot_latency_us, two_shot_latency_us,
// interconnect_efficiency, and name, source, kernels {linear_attention, full_attention, moe,
// dense_mlp, per_step}, cuda_graphs, cuda_graph_max_tokens, allreduce
// (ring|one_shot|two_shot|auto), moe_tile_m, logits_bytes, fitted (list of keys), fitted_to
// (list of {what, published_tokens_per_s, source}). Unknown keys are refused by name.
void apply_efficiency_file(HardwareSpec& hardware, const std::string& path);

void validate_hardware_spec(const HardwareSpec& hardware, const std::string& where);

}  // namespace keel::planning
