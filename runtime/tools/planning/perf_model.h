// Roofline step-cost model: how long one engine step (a batch of decode tokens and/or prefill
// tokens across several sequences) takes on one TP group, and the interface the serving simulator
// (`keel simulate`) uses to cost the steps its scheduler forms.
//
// Design note. One step on the busiest rank costs
//
//   step = max(t_bandwidth, t_compute) + t_comm + t_overhead
//
//   t_bandwidth = (weight bytes read + KV/state bytes read and written) / (peak BW * bw_eff)
//   t_compute   = linear FLOPs / (peak(quant precision) * compute_eff)
//               + attention FLOPs / (peak(bf16) * compute_eff)
//   t_comm      = 2 all-reduces per layer of tokens * hidden * 2 B (bf16), ring model
//                   2(n-1)/n * bytes / (link BW * link_eff) + 2(n-1) * latency
//                 + one all-gather of fp32 logits for the sampled rows (one per sequence)
//                   (n-1)/n * bytes / (link BW * link_eff) + (n-1) * latency;   0 when tp = 1
//   t_overhead  = num_layers * layer_overhead_us
//
// Memory traffic and math overlap (the max), communication and fixed overheads do not (keel's
// all-reduce sits between the attention and MLP halves of a layer; nothing else is in flight).
// Weight bytes read per step: every non-expert weight once (attention, linear attention, shared
// experts, dense MLPs, routers, norms, lm_head; embedding rows are negligible), and for routed
// experts the expected number of DISTINCT experts touched per layer by the step's tokens under
// UNIFORM, independent routing of N tokens with top-k of E:
//
//   D(N) = E * (1 - (1 - k/E)^N)          (D(1) = k, D(N) -> E)
//
// per rank: min(E, imbalance * D(N)) / tp experts' bytes, where imbalance (>= 1, default 1.0,
// --expert-imbalance) is the busiest rank's share over the mean under the expert placement.
// Prefill tokens touch experts too, so N = decode + prefill tokens. FLOPs: 2 * active params per
// token * N / tp (expert part scaled by imbalance) + attention: for each full-attention layer
// 4 * heads/tp * head_dim per (token, attended position) pair (MLA, absorbed:
// 2 * heads/tp * (2 * kv_lora_rank + qk_rope_head_dim)), where decode tokens attend to the
// sequence's whole context (kv_tokens_read / num_seqs on average) and a prefill chunk of c tokens
// ending at that context attends on average to context - c/2 positions (causal), with
// c = prefill tokens / prefilling sequences (num_seqs - num_decode_tokens); sliding-window layers
// attend to at most the window; Gated DeltaNet layers cost 6 * v_heads/tp * dk * dv FLOPs per token
// and read + write their state once per sequence per step. The regime that bounds a step is the
// largest of t_bandwidth, t_compute, t_comm, t_overhead.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "runtime/tools/planning/hardware_spec.h"
#include "runtime/tools/planning/memory_model.h"
#include "runtime/tools/planning/model_spec.h"
#include "runtime/tools/planning/quant.h"

namespace keel::planning {

// One engine step as the scheduler forms it.
struct StepShape {
  int64_t num_seqs;            // sequences in the step (decode + prefilling)
  int64_t num_decode_tokens;   // one per decoding sequence
  int64_t num_prefill_tokens;  // prompt tokens processed this step (chunked prefill)
  int64_t kv_tokens_read;      // sum over sequences of context length
};

// Cost of a step in seconds. Implementations must be deterministic, thread-compatible (const)
// and cheap (the simulator calls this once per step). An empty step costs 0.
class StepCostModel {
 public:
  virtual ~StepCostModel() = default;
  virtual double step_seconds(const StepShape& shape) const = 0;
};

// Everything the roofline computed for one step (per busiest rank).
struct StepBreakdown {
  double distinct_experts = 0;  // D(N) per layer, whole model (not per rank)
  double weight_bytes = 0;
  double kv_bytes = 0;
  double linear_flops = 0;
  double attention_flops = 0;
  double t_bandwidth = 0;
  double t_compute = 0;
  double t_comm = 0;
  double t_overhead = 0;
  double seconds = 0;
  const char* bound = "overhead";  // "bandwidth" | "compute" | "interconnect" | "overhead"
  double bytes() const { return weight_bytes + kv_bytes; }
  double flops() const { return linear_flops + attention_flops; }
};

// E * (1 - (1 - k/E)^n): expected distinct experts touched by n tokens routed uniformly.
double expected_distinct_experts(int64_t num_experts, int64_t top_k, double num_tokens);

class RooflineCostModel : public StepCostModel {
 public:
  RooflineCostModel(const ModelSpec& model, const HardwareSpec& hardware, const QuantSpec& quant,
                    int tp, const PlanOptions& options);
  double step_seconds(const StepShape& shape) const override;
  StepBreakdown breakdown(const StepShape& shape) const;

  const MemoryPlan& memory() const { return memory_; }
  ComputePrecision linear_precision() const { return linear_precision_; }
  double peak_bandwidth() const { return peak_bw_; }         // B/s, per GPU
  double peak_linear_flops() const { return peak_linear_; }  // FLOP/s, per GPU

  // Time to first token for one prompt alone, prefilled in chunks of max_num_batched_tokens.
  double ttft_seconds(int64_t prompt_len) const;

 private:
  ModelSpec model_;
  HardwareSpec hw_;
  QuantSpec quant_;
  int tp_;
  PlanOptions options_;
  MemoryPlan memory_;
  ComputePrecision linear_precision_;
  double peak_bw_ = 0, peak_linear_ = 0, peak_attention_ = 0;
  double dense_weight_bytes_ = 0;    // non-expert weights read per step, per rank
  double expert_bytes_ = 0;          // one routed expert's bytes on one rank (/tp)
  double active_dense_params_ = 0;   // per token, non-routed
  double active_expert_params_ = 0;  // per token, routed (top-k)
  double attn_flops_per_pair_ = 0;   // global full-attention layers, per rank
  double window_flops_per_pair_ = 0;
  double linear_attn_flops_per_token_ = 0;
};

std::unique_ptr<StepCostModel> make_roofline_cost_model(const ModelSpec& model,
                                                        const HardwareSpec& hardware,
                                                        const QuantSpec& quant, int tp,
                                                        const PlanOptions& options);

}  // namespace keel::planning
