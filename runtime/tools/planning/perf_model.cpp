// Roofline step-cost model (formulas documented in perf_model.h).
#include "runtime/tools/planning/perf_model.h"

#include <algorithm>
#include <cmath>

#include "kernels/base/check.h"

namespace keel::planning {

double expected_distinct_experts(int64_t num_experts, int64_t top_k, double num_tokens) {
  if (num_experts <= 0 || num_tokens <= 0) return 0.0;
  const double e = static_cast<double>(num_experts);
  const double miss = 1.0 - static_cast<double>(top_k) / e;  // P(a token skips an expert)
  return e * (1.0 - std::pow(miss, num_tokens));
}

RooflineCostModel::RooflineCostModel(const ModelSpec& model, const HardwareSpec& hardware,
                                     const QuantSpec& quant, int tp, const PlanOptions& options)
    : model_(model), hw_(hardware), quant_(quant), tp_(tp), options_(options) {
  if (tp < 1) throw_error("--tp must be >= 1");
  if (options.expert_imbalance < 1.0)
    throw_error("--expert-imbalance must be >= 1.0 (got ", options.expert_imbalance, ")");
  memory_ = plan_memory(model, hardware, quant, tp, options);
  linear_precision_ = hardware.effective_precision(quant.compute);
  peak_bw_ = hardware.memory_bandwidth_gbs * 1e9;
  peak_linear_ = hardware.peak_flops(quant.compute);
  peak_attention_ = hardware.peak_flops(ComputePrecision::bf16);

  const ModelParams& p = memory_.params;
  const double T = static_cast<double>(tp);
  double routed_rank = 0, embeddings_rank = 0;
  for (const MemoryLine& line : memory_.weights) {
    if (line.name == "routed experts") routed_rank = line.bytes;
    if (line.name == "embeddings") embeddings_rank = line.bytes;
  }
  // Non-expert weights read every step; embedding rows are negligible, but a tied embedding is
  // read whole as the lm_head.
  dense_weight_bytes_ = memory_.weight_bytes - routed_rank - embeddings_rank;
  if (model.tie_word_embeddings) dense_weight_bytes_ += embeddings_rank;
  expert_bytes_ = model.is_moe() ? p.expert_params * quant.bytes_per_param / T : 0.0;
  active_expert_params_ = model.is_moe() ? p.expert_params * model.num_experts_per_tok *
                                               static_cast<double>(model.moe_layers())
                                         : 0.0;
  active_dense_params_ = p.active_per_token - active_expert_params_;

  const double full = static_cast<double>(model.full_attention_layers());
  const double swa = static_cast<double>(model.sliding_window_layers);
  const double heads_rank = static_cast<double>(model.num_attention_heads) / T;
  if (model.attention == AttentionType::gqa) {
    const double per_layer = 4.0 * heads_rank * model.head_dim;  // QK^T and PV
    attn_flops_per_pair_ = per_layer * (full - swa);
    window_flops_per_pair_ = per_layer * swa;
  } else {
    attn_flops_per_pair_ =
        full * 2.0 * heads_rank * (2.0 * model.kv_lora_rank + model.qk_rope_head_dim);
  }
  linear_attn_flops_per_token_ = static_cast<double>(model.linear_attention_layers) * 6.0 *
                                 static_cast<double>(model.linear_num_value_heads) / T *
                                 model.linear_key_head_dim * model.linear_value_head_dim;
}

StepBreakdown RooflineCostModel::breakdown(const StepShape& shape) const {
  StepBreakdown b;
  const double tokens = static_cast<double>(shape.num_decode_tokens + shape.num_prefill_tokens);
  if (tokens <= 0) return b;
  const double seqs = static_cast<double>(std::max<int64_t>(shape.num_seqs, 1));
  const double avg_ctx = static_cast<double>(shape.kv_tokens_read) / seqs;
  const double T = static_cast<double>(tp_);

  // Bytes.
  b.weight_bytes = dense_weight_bytes_;
  if (model_.is_moe()) {
    b.distinct_experts =
        expected_distinct_experts(model_.num_experts, model_.num_experts_per_tok, tokens);
    const double per_layer = std::min(static_cast<double>(model_.num_experts),
                                      options_.expert_imbalance * b.distinct_experts);
    b.weight_bytes += static_cast<double>(model_.moe_layers()) * per_layer * expert_bytes_;
  }
  const double window_ctx = memory_.sliding_window > 0
                                ? std::min(avg_ctx, static_cast<double>(memory_.sliding_window))
                                : avg_ctx;
  b.kv_bytes = static_cast<double>(shape.kv_tokens_read) * memory_.kv_bytes_per_token +
               seqs * window_ctx * memory_.kv_window_bytes_per_token +
               2.0 * seqs * memory_.state_bytes_per_seq +  // recurrent state read + write
               tokens * (memory_.kv_bytes_per_token + memory_.kv_window_bytes_per_token);  // new KV

  // FLOPs.
  b.linear_flops =
      2.0 * tokens * (active_dense_params_ + options_.expert_imbalance * active_expert_params_) / T;
  const double decode = static_cast<double>(shape.num_decode_tokens);
  const double prefill = static_cast<double>(shape.num_prefill_tokens);
  // A prefilling sequence's chunk of c tokens ends at its context: its tokens attend on average
  // to context - c/2 positions (causal). c = prefill tokens / prefilling sequences.
  const double prefill_seqs = std::max(1.0, seqs - decode);
  const double chunk = prefill / prefill_seqs;
  const double prefill_ctx = std::max(avg_ctx - chunk / 2.0, chunk / 2.0);
  const double prefill_window = std::min(prefill_ctx, window_ctx);
  const double pairs = decode * avg_ctx + prefill * prefill_ctx;
  const double window_pairs = decode * window_ctx + prefill * prefill_window;
  b.attention_flops = pairs * attn_flops_per_pair_ + window_pairs * window_flops_per_pair_ +
                      tokens * linear_attn_flops_per_token_;

  b.t_bandwidth = b.bytes() / (peak_bw_ * hw_.bandwidth_efficiency);
  b.t_compute = b.linear_flops / (peak_linear_ * hw_.compute_efficiency) +
                b.attention_flops / (peak_attention_ * hw_.compute_efficiency);
  if (tp_ > 1) {
    const double n = T;
    const double link = hw_.interconnect.bandwidth_gbs * 1e9 * hw_.interconnect.efficiency;
    const double lat = hw_.interconnect.latency_us * 1e-6;
    const double ar_bytes = tokens * static_cast<double>(model_.hidden_size) * 2.0;
    const double all_reduce = 2.0 * (n - 1.0) / n * ar_bytes / link + 2.0 * (n - 1.0) * lat;
    const double logits_bytes = seqs * static_cast<double>(model_.vocab_size) * 4.0;
    const double all_gather = (n - 1.0) / n * logits_bytes / link + (n - 1.0) * lat;
    b.t_comm = 2.0 * static_cast<double>(model_.num_layers) * all_reduce + all_gather;
  }
  b.t_overhead = static_cast<double>(model_.num_layers) * hw_.layer_overhead_us * 1e-6;
  b.seconds = std::max(b.t_bandwidth, b.t_compute) + b.t_comm + b.t_overhead;
  double largest = b.t_overhead;
  b.bound = "overhead";
  if (b.t_comm > largest) largest = b.t_comm, b.bound = "interconnect";
  if (b.t_compute > largest) largest = b.t_compute, b.bound = "compute";
  if (b.t_bandwidth > largest) largest = b.t_bandwidth, b.bound = "bandwidth";
  return b;
}

double RooflineCostModel::step_seconds(const StepShape& shape) const {
  return breakdown(shape).seconds;
}

double RooflineCostModel::ttft_seconds(int64_t prompt_len) const {
  const int64_t chunk = std::max<int64_t>(options_.max_num_batched_tokens, 1);
  double total = 0;
  for (int64_t done = 0; done < prompt_len; done += chunk) {
    const int64_t n = std::min(chunk, prompt_len - done);
    total += step_seconds({1, 0, n, done + n});
  }
  return total;
}

std::unique_ptr<StepCostModel> make_roofline_cost_model(const ModelSpec& model,
                                                        const HardwareSpec& hardware,
                                                        const QuantSpec& quant, int tp,
                                                        const PlanOptions& options) {
  return std::make_unique<RooflineCostModel>(model, hardware, quant, tp, options);
}

}  // namespace keel::planning
