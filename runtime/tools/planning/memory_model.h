// Per-GPU memory model: weights by part (quantization scales included), KV cache per token and
// per sequence, Gated DeltaNet recurrent state, activations and communication buffers, framework
// reserve, what is left for KV, max concurrent sequences, and the fit verdict.
//
// Design note. Everything is per GPU of a TP group of `tp` ranks, in bytes:
//   - Sharded by TP (divided by tp): routed/shared experts and dense MLPs (column/row parallel or
//     expert-parallel placement: the same bytes per rank on average), q/o projections, MLA
//     up-projections, Gated DeltaNet projections and state (heads split), vocab-parallel
//     embeddings and lm_head.
//   - KV heads: ceil(kv_heads / tp) per rank, so with fewer KV heads than ranks each rank keeps a
//     replica (Qwen3.5: 2 KV heads on TP=4 -> 1 head per rank, K/V projections replicated too).
//   - Replicated: MLA latent cache (kv_lora_rank + qk_rope_head_dim per token per layer, every
//     rank needs it), MLA down-projections (q_a, kv_a), norms, routers, attention sinks.
//   - KV per token counts full-attention layers only; sliding-window layers hold at most
//     `sliding_window` tokens per sequence; Gated DeltaNet layers hold a fixed state per sequence:
//     num_v_heads/tp * head_k_dim * head_v_dim in linear_state_dtype, plus the conv state
//     (2*nk*dk + nv*dv)/tp channels * (kernel - 1) in linear_conv_state_dtype (bf16; fp32, keel's
//     own layout, for a plan read from a checkpoint).
//   - Activations (estimate from T = max_num_batched_tokens): 6 hidden-sized bf16 buffers
//     (residual, normed input, attention out, MLP out, two all-reduce staging) = 6*T*H*2 B, plus
//     the widest per-rank MLP intermediate (gate and up, bf16): T * max(top_k*I_moe, I_shared,
//     I_dense)/tp * 2 * 2 B, plus fp32 logits for max_num_seqs sampled rows: rows * V * 4 B.
//   - Communication buffers: all-reduce in/out 2*T*H*2 B plus a fixed NCCL allowance
//     (comm_fixed_mib, default 256 MiB) when tp > 1.
//   - keel_layout (a plan read from a checkpoint): what keel's RankModel holds instead (see
//     model_spec.h), at the checkpoint's dtype: equal to RankModel::weight_bytes() per rank.
//     A quantized checkpoint (ModelSpec::layer_quant) has every projection counted by its own
//     format in keel's in-memory layout (matrix_bytes in quant.h: codes, scales, zeros, row
//     scales, group_of_k) at rank 0's shape; planned as stored only (QuantSpec::as_stored), and
//     a tensor-parallel split the loader refuses (a quantized column slice off a group boundary)
//     is a keel::Error.
//   - Speculative decoding (options.speculative, K draft tokens): the draft (MTP) layer's weights
//     (one full-attention decoder layer with its MoE, plus fc [H, 2H] bf16, at the plan's
//     formats) and K extra recurrent-state slots per sequence: vLLM's GDN kernel stores the state
//     after each draft token in its own slot (spec_state_indices_tensor).
//   - Framework reserve (default 2 GiB, --reserve-gib): CUDA context, cuBLAS/cuBLASLt workspaces,
//     CUDA-graph pools and allocator fragmentation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tools/planning/hardware_spec.h"
#include "runtime/tools/planning/model_spec.h"
#include "runtime/tools/planning/quant.h"

namespace keel::planning {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Speculative decoding with a draft of num_draft_tokens tokens per step (MTP: the model's own
// multi-token-prediction layer run K times). acceptance[i] is the fraction of steps whose draft
// position i+1 is accepted (vLLM's per-position acceptance rate: unconditional, so
// non-increasing); a step then yields 1 + sum(acceptance) tokens per sequence on average.
struct SpeculativeConfig {
  int64_t num_draft_tokens = 0;  // 0: off
  std::vector<double> acceptance;
  double tokens_per_step() const;
};

// "mtp:K" with A (one conditional acceptance, position i accepted with A^i) or "a1,a2,..."
// (per-position rates as vLLM reports them). Throws keel::Error naming the flag.
SpeculativeConfig parse_speculative(const std::string& method, const std::string& acceptance);

struct PlanOptions {
  int64_t context = 32768;                // tokens per sequence for KV sizing and the decode table
  int64_t prompt_len = 2048;              // TTFT prompt
  std::string kv_dtype = "bf16";          // "bf16" | "fp8" (= "fp8_e4m3") | "fp32"
  int64_t max_num_batched_tokens = 8192;  // prefill chunk / activation sizing
  int64_t max_num_seqs = 256;             // sampled logits rows in the activation estimate
  double reserve_gib = 2.0;               // framework reserve
  double comm_fixed_mib = 256.0;          // NCCL buffers when tp > 1
  double expert_imbalance = 1.0;    // busiest rank's share of expert reads / mean share (>= 1)
  bool attention_bf16 = false;      // keep attention / linear-attention projections in bf16
  bool shared_expert_bf16 = false;  // keep the shared expert in bf16 (the NVFP4 checkpoints)
  // Expert parallelism: each rank holds num_experts/tp whole experts (else every expert is
  // split tp ways, tensor-parallel, and every rank carries the same expert load).
  bool expert_parallel = false;
  SpeculativeConfig speculative;
};

struct MemoryLine {
  std::string name;
  double bytes = 0;
  std::string note;
};

struct MemoryPlan {
  ModelParams params;
  int tp = 1;
  std::vector<MemoryLine> weights;  // per GPU, by part
  double weight_bytes = 0;
  double activation_bytes = 0;
  double comm_bytes = 0;
  double reserve_bytes = 0;
  double capacity_bytes = 0;

  double kv_bytes_per_token = 0;         // full (global) attention layers, per GPU
  double kv_window_bytes_per_token = 0;  // sliding-window layers, per GPU (capped at window)
  int64_t sliding_window = 0;
  double state_bytes_per_seq = 0;    // Gated DeltaNet recurrent + conv state, per GPU (all slots)
  double recurrent_state_bytes = 0;  // one recurrent-state slot of one sequence, all GDN layers
  double conv_state_bytes = 0;       // the conv state of one sequence, all GDN layers
  double kv_bytes_per_seq = 0;       // at options.context, state included
  double available_for_kv = 0;       // may be negative
  int64_t max_seqs = 0;              // concurrent sequences at options.context
  bool fits = false;
  double short_by_bytes = 0;         // when !fits
  std::vector<std::string> biggest;  // largest consumers, "name (X GiB)"

  // KV + state bytes per GPU for one sequence of `context` tokens.
  double seq_bytes(int64_t context) const;
};

int64_t ceil_div(int64_t a, int64_t b);

MemoryPlan plan_memory(const ModelSpec& model, const HardwareSpec& hardware, const QuantSpec& quant,
                       int tp, const PlanOptions& options);

}  // namespace keel::planning
