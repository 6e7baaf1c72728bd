// Roofline step-cost model: how long one engine step (a batch of decode tokens and/or prefill
// tokens across several sequences) takes on one TP group, and the interface the serving simulator
// (`keel simulate`) uses to cost the steps its scheduler forms.
//
// Design note. One step on the busiest rank costs
//
//   step = max(t_bandwidth, t_compute) + t_comm + t_overhead       (+ K draft steps, below)
//
//   t_bandwidth = (weight bytes + KV bytes + GDN state bytes) / (peak BW * bw_eff)
//   t_compute   = linear FLOPs (MoE rows padded to the tile) / (peak(quant precision) * eff)
//               + attention FLOPs / (peak(bf16) * compute_eff)
//   t_comm      = 2 all-reduces per layer of tokens * hidden * 2 B (bf16), each by the engine's
//                 algorithm (EngineProfile::allreduce; n = tp, S = message bytes, B = link BW *
//                 link_eff):
//                   ring      2(n-1) * latency_us + 2(n-1)/n * S / B     (NCCL ring)
//                   one_shot  one_shot_latency_us + (n-1) * S / B       (each rank reads n-1
//                                                                         peers' whole buffers)
//                   two_shot  two_shot_latency_us + 2(n-1)/n * S / B    (reduce-scatter +
//                                                                         all-gather, direct)
//                   auto      the cheapest of the three for S
//                 + one gather of the sampled rows' logits, seqs * vocab * logits_bytes:
//                   (n-1)/n * bytes / B + (n-1) * latency_us;                0 when tp = 1
//   t_overhead  = kernels * launch_us + num_layers * layer_overhead_us, with
//                 kernels = GDN layers * kernels.linear_attention + full-attention layers *
//                 kernels.full_attention + MoE layers * kernels.moe + dense layers *
//                 kernels.dense_mlp + kernels.per_step, and launch_us = launch_us_graph for a
//                 decode-only step of <= cuda_graph_max_tokens tokens when the engine captures
//                 CUDA graphs, else launch_us_eager. Decode kernels run one after another (a
//                 layer's input is the previous layer's output), so each kernel's fixed cost
//                 adds to the time its bytes take: the sum form, not a max.
//
// Memory traffic and math overlap (the max), communication and fixed overheads do not (the
// all-reduce sits between the attention and MLP halves of a layer; nothing else is in flight).
// Weight bytes read per step: every non-expert weight once (attention, linear attention, shared
// experts, dense MLPs, routers, norms, lm_head; embedding rows are negligible), and for routed
// experts the expected number of DISTINCT experts touched per layer by the step's tokens under
// UNIFORM, independent routing of N tokens with top-k of E:
//
//   D(N) = E * (1 - (1 - k/E)^N)          (D(1) = k, D(N) -> E)
//
// Tensor-parallel experts (default): every rank holds a 1/tp slice of every expert, so every
// rank reads D(N) slices and carries the same load (the busiest rank is the mean rank).
// Expert-parallel (PlanOptions::expert_parallel): rank r holds E/tp whole experts; the busiest
// rank's expected distinct experts and rows are the mean plus c_n standard deviations,
//   D_max = min(E/n, E/n * p + c_n * sqrt(E/n * p * (1-p))),  p = 1 - (1 - k/E)^N
//   rows_max = N*k/n + c_n * sqrt(N*k * (1/n) * (1 - 1/n))
// with c_n = E[max of n iid standard normals] (c_2 = 1/sqrt(pi) = 0.5642, c_4 = 1.0294,
// c_8 = 1.4236): the normal approximation of each rank's sum of independent picks.
// On top, imbalance (>= 1, default 1.0, --expert-imbalance) scales the busiest rank's experts
// for a skewed placement. Prefill tokens touch experts too, so N = decode + prefill tokens.
//
// MoE GEMMs at small M: a grouped GEMM computes whole tiles of moe_tile_m rows per expert, so an
// expert that receives X rows costs ceil(X / tile) * tile rows of FLOPs. X ~ Binomial(N, k/E)
// per expert, so the padded rows of a layer are E * E[ceil(X / tile)] * tile (exact sum over
// the binomial pmf), >= N * k; one row needs 2 * expert_params / tp FLOPs (TP) or
// 2 * expert_params (EP, busiest rank's share). At B = 1 each of the k experts computes one
// tile: tile/1 = 128x the useful FLOPs, still far below the bytes' time; at prefill sizes the
// padding is a few percent.
//
// Linear-attention (Gated DeltaNet) state: each GDN layer reads and writes its fp32 recurrent
// state [v_heads/tp, dk, dv] and its conv state once per sequence per step (45 MiB + conv per
// sequence per rank for Qwen3.5-397B at TP=4): state bytes = seqs * (recurrent + conv) * 2;
// with speculative decoding the kernel writes one state per verified position (K + 1 writes).
//
// FLOPs: 2 * active non-expert params per token * N / tp + the padded expert rows above +
// attention: for each full-attention layer 4 * heads/tp * head_dim per (token, attended
// position) pair (MLA, absorbed: 2 * heads/tp * (2 * kv_lora_rank + qk_rope_head_dim)), where
// decode tokens attend to the sequence's whole context (kv_tokens_read / num_seqs on average)
// and a prefill chunk of c tokens ending at that context attends on average to context - c/2
// positions (causal), with c = prefill tokens / prefilling sequences (num_seqs -
// num_decode_tokens); sliding-window layers attend to at most the window; Gated DeltaNet layers
// cost 6 * v_heads/tp * dk * dv FLOPs per token.
//
// Speculative decoding (PlanOptions::speculative, mtp:K): a decode step verifies K + 1 tokens
// per decoding sequence (the target model runs over (K+1) * decode tokens, KV read once per
// sequence) and first runs the draft K times, each one draft decoder layer over the decoding
// sequences: one full-attention layer's and one MoE layer's weights (D(seqs) experts), fc
// [H, 2H] bf16 and the lm_head; its KV (the context) and FLOPs; kernels.full_attention +
// kernels.moe + kernels.per_step launches; 2 all-reduces and a logits gather. The step yields
// tokens_per_seq = 1 + sum(acceptance) tokens per decoding sequence on average.
// The regime that bounds a step is the largest of t_bandwidth, t_compute, t_comm, t_overhead.
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
  double distinct_experts = 0;      // D(N) per layer, whole model (not per rank)
  double busiest_rank_experts = 0;  // experts (or expert slices) the busiest rank reads per layer
  double padded_expert_rows = 0;    // rows the busiest rank's grouped GEMMs compute, per layer
  double weight_bytes = 0;
  double kv_bytes = 0;     // KV cache read + written
  double state_bytes = 0;  // Gated DeltaNet recurrent + conv state read + written
  double linear_flops = 0;
  double attention_flops = 0;
  double kernels = 0;       // kernel launches in the step (draft steps included)
  double launch_us = 0;     // fixed cost of each (graph replay or eager launch)
  double allreduce_us = 0;  // one all-reduce of the step's hidden states
  const char* allreduce_algorithm = "none";
  double t_bandwidth = 0;
  double t_compute = 0;
  double t_comm = 0;
  double t_overhead = 0;
  double t_draft = 0;         // K draft steps (speculative decoding), inside `seconds`
  double tokens_per_seq = 1;  // tokens a decoding sequence gains per step (1 + accepted drafts)
  double seconds = 0;
  const char* bound = "overhead";  // "bandwidth" | "compute" | "interconnect" | "overhead"
  double bytes() const { return weight_bytes + kv_bytes + state_bytes; }
  double flops() const { return linear_flops + attention_flops; }
};

// Cost of one all-reduce of `bytes` over `ranks` ranks on `hardware`'s interconnect with
// `algorithm` (formulas above), in seconds; 0 when ranks = 1. `chosen` (may be null) receives
// the algorithm used (the cheapest when automatic).
double allreduce_seconds(const HardwareSpec& hardware, AllReduceAlgorithm algorithm, int ranks,
                         double bytes, AllReduceAlgorithm* chosen = nullptr);

// E[max of n iid standard normal variables] (c_1 = 0, c_2 = 1/sqrt(pi)), by quadrature.
double expected_max_standard_normal(int n);

// E[ceil(X / tile)] for X ~ Binomial(trials, p): the tiles one expert's grouped GEMM computes.
double expected_tiles(double trials, double p, int64_t tile);

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

  // Tokens gained per decoding sequence per step (1 without speculative decoding).
  double tokens_per_seq() const { return tokens_per_seq_; }

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
  double draft_layer_bytes_ = 0;    // speculative: one draft layer's dense weights + fc + lm_head
  double draft_active_params_ = 0;  // per token, per rank, non-expert part of the draft
  double tokens_per_seq_ = 1;
  double max_normal_ = 0;  // expected_max_standard_normal(tp), for expert parallelism

  // The target model's step (no draft); `verify_tokens` tokens per decoding sequence.
  StepBreakdown target_step(const StepShape& shape, double verify_tokens) const;
  // One draft step over `seqs` decoding sequences at average context `context`.
  double draft_step_seconds(double seqs, double context, double* kernels) const;
  // Rows and experts the busiest rank handles per MoE layer for `tokens` routed tokens.
  void expert_load(double tokens, StepBreakdown& b) const;
};

// The roofline's speculative-decoding cost for the serving simulator, which advances every
// decoding sequence one token per step: the decode part of a step is charged 1/tokens_per_seq of
// its speculative cost (its tokens arrive tokens_per_seq at a time), the prefill part in full.
class SpeculativeStepCost : public StepCostModel {
 public:
  explicit SpeculativeStepCost(std::unique_ptr<RooflineCostModel> roofline);
  double step_seconds(const StepShape& shape) const override;

 private:
  std::unique_ptr<RooflineCostModel> roofline_;
};

std::unique_ptr<StepCostModel> make_roofline_cost_model(const ModelSpec& model,
                                                        const HardwareSpec& hardware,
                                                        const QuantSpec& quant, int tp,
                                                        const PlanOptions& options);

}  // namespace keel::planning
