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

double expected_max_standard_normal(int n) {
  if (n <= 1) return 0.0;
  // E[max] = integral of x * n * phi(x) * Phi(x)^(n-1) dx; the integrand is negligible beyond
  // |x| = 12 for any n a TP group has. Midpoint rule, 24000 steps: error < 1e-9.
  constexpr double kLimit = 12.0;
  constexpr int kSteps = 24000;
  const double h = 2.0 * kLimit / kSteps;
  const double inv_sqrt_2pi = 1.0 / std::sqrt(2.0 * M_PI);
  double sum = 0;
  for (int i = 0; i < kSteps; ++i) {
    const double x = -kLimit + (i + 0.5) * h;
    const double phi = inv_sqrt_2pi * std::exp(-0.5 * x * x);
    const double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
    sum += x * n * phi * std::pow(cdf, n - 1);
  }
  return sum * h;
}

double expected_tiles(double trials, double p, int64_t tile) {
  if (trials <= 0 || p <= 0) return 0.0;
  if (tile <= 1) return trials * p;
  // Sum of P(X = x) * ceil(x / tile) over the binomial pmf, trials rounded to a whole count;
  // the terms are summed in log space (lgamma) so large trial counts do not overflow, and the
  // sum stops where the pmf past the mean is below 1e-15 of its peak.
  const int64_t n = std::max<int64_t>(1, std::llround(trials));
  if (p >= 1.0) return std::ceil(static_cast<double>(n) / static_cast<double>(tile));
  const double log_p = std::log(p), log_q = std::log1p(-p);
  const double mean = static_cast<double>(n) * p;
  double expected = 0;
  for (int64_t x = 1; x <= n; ++x) {
    const double xd = static_cast<double>(x);
    const double log_pmf = std::lgamma(static_cast<double>(n) + 1) - std::lgamma(xd + 1) -
                           std::lgamma(static_cast<double>(n - x) + 1) + xd * log_p +
                           static_cast<double>(n - x) * log_q;
    const double pmf = std::exp(log_pmf);
    expected += pmf * std::ceil(xd / static_cast<double>(tile));
    if (xd > mean && pmf < 1e-15) break;
  }
  return expected;
}

double allreduce_seconds(const HardwareSpec& hw, AllReduceAlgorithm algorithm, int ranks,
                         double bytes, AllReduceAlgorithm* chosen) {
  if (ranks <= 1 || bytes <= 0) {
    if (chosen) *chosen = algorithm;
    return 0.0;
  }
  const double n = static_cast<double>(ranks);
  const double link = hw.interconnect.bandwidth_gbs * 1e9 * hw.interconnect.efficiency;
  const double ring =
      2.0 * (n - 1.0) * hw.interconnect.latency_us * 1e-6 + 2.0 * (n - 1.0) / n * bytes / link;
  const double one_shot = hw.interconnect.one_shot_latency_us * 1e-6 + (n - 1.0) * bytes / link;
  const double two_shot =
      hw.interconnect.two_shot_latency_us * 1e-6 + 2.0 * (n - 1.0) / n * bytes / link;
  AllReduceAlgorithm used = algorithm;
  double seconds = ring;
  switch (algorithm) {
    case AllReduceAlgorithm::ring:
      seconds = ring;
      break;
    case AllReduceAlgorithm::one_shot:
      seconds = one_shot;
      break;
    case AllReduceAlgorithm::two_shot:
      seconds = two_shot;
      break;
    case AllReduceAlgorithm::automatic:
      used = AllReduceAlgorithm::ring;
      seconds = ring;
      if (one_shot < seconds) seconds = one_shot, used = AllReduceAlgorithm::one_shot;
      if (two_shot < seconds) seconds = two_shot, used = AllReduceAlgorithm::two_shot;
      break;
  }
  if (chosen) *chosen = used;
  return seconds;
}

RooflineCostModel::RooflineCostModel(const ModelSpec& model, const HardwareSpec& hardware,
                                     const QuantSpec& quant, int tp, const PlanOptions& options)
    : model_(model), hw_(hardware), quant_(quant), tp_(tp), options_(options) {
  if (tp < 1) throw_error("--tp must be >= 1");
  if (options.expert_imbalance < 1.0)
    throw_error("--expert-imbalance must be >= 1.0 (got ", options.expert_imbalance, ")");
  if (options.expert_parallel && model.is_moe() && model.num_experts % tp != 0)
    throw_error("expert parallelism needs num_experts (", model.num_experts,
                ") to be a multiple of --tp ", tp);
  memory_ = plan_memory(model, hardware, quant, tp, options);
  if (options.expert_parallel) max_normal_ = expected_max_standard_normal(tp);
  linear_precision_ = hardware.effective_precision(quant.compute);
  peak_bw_ = hardware.memory_bandwidth_gbs * 1e9;
  peak_linear_ = hardware.peak_flops(quant.compute);
  peak_attention_ = hardware.peak_flops(ComputePrecision::bf16);

  const ModelParams& p = memory_.params;
  const double T = static_cast<double>(tp);
  double routed_rank = 0, embeddings_rank = 0, draft_rank = 0, attention_rank = 0, shared_rank = 0,
         lm_head_rank = 0, router_rank = 0;
  for (const MemoryLine& line : memory_.weights) {
    if (line.name == "routed experts") routed_rank = line.bytes;
    if (line.name == "embeddings") embeddings_rank = line.bytes;
    if (line.name == "speculative draft (MTP) layer") draft_rank = line.bytes;
    if (line.name == "attention (q/k/v/o, norms)") attention_rank = line.bytes;
    if (line.name == "shared experts") shared_rank = line.bytes;
    if (line.name == "lm_head") lm_head_rank = line.bytes;
    if (line.name == "routers + layer norms") router_rank = line.bytes;
  }
  // Non-expert weights read every step; embedding rows are negligible, but a tied embedding is
  // read whole as the lm_head. The draft layer is read by the draft steps only.
  dense_weight_bytes_ = memory_.weight_bytes - routed_rank - embeddings_rank - draft_rank;
  if (model.tie_word_embeddings) dense_weight_bytes_ += embeddings_rank;
  if (model.tie_word_embeddings && lm_head_rank == 0) lm_head_rank = embeddings_rank;
  // One routed expert's bytes on one rank: a 1/tp slice (TP) or the whole expert (EP).
  const double expert_full = model.is_moe() ? p.expert_params * quant.bytes_per_param : 0.0;
  expert_bytes_ = options.expert_parallel ? expert_full : expert_full / T;
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

  const SpeculativeConfig& spec = options.speculative;
  if (spec.num_draft_tokens > 0) {
    tokens_per_seq_ = spec.tokens_per_step();
    // The draft layer's non-routed weights: one full-attention layer, the shared expert and the
    // router of one MoE layer, fc [H, 2H] bf16 (/tp), and the shared lm_head.
    const double moe_layers = std::max<double>(1.0, static_cast<double>(model.moe_layers()));
    const double H = static_cast<double>(model.hidden_size);
    draft_layer_bytes_ = (full > 0 ? attention_rank / full : 0.0) + shared_rank / moe_layers +
                         router_rank / static_cast<double>(model.num_layers) +
                         2.0 * H * H * 2.0 / T + lm_head_rank;
    draft_active_params_ = ((full > 0 ? p.attention / full : 0.0) + p.shared_experts / moe_layers +
                            2.0 * H * H + static_cast<double>(model.vocab_size) * H) /
                           T;
  }
}

void RooflineCostModel::expert_load(double tokens, StepBreakdown& b) const {
  const double E = static_cast<double>(model_.num_experts);
  const double k = static_cast<double>(model_.num_experts_per_tok);
  const double pick = k / E;  // P(a token routes to a given expert)
  const int64_t tile = hw_.engine.moe_tile_m;
  b.distinct_experts =
      expected_distinct_experts(model_.num_experts, model_.num_experts_per_tok, tokens);
  // Padded rows summed over all experts of a layer: E * E[ceil(X / tile)] * tile.
  const double padded_all = E * expected_tiles(tokens, pick, tile) * static_cast<double>(tile);
  if (!options_.expert_parallel || tp_ == 1) {
    b.busiest_rank_experts = b.distinct_experts;
    b.padded_expert_rows = padded_all;
  } else {
    const double n = static_cast<double>(tp_);
    const double c = max_normal_;
    const double owned = E / n;
    const double touched = 1.0 - std::pow(1.0 - pick, tokens);
    const double mean = owned * touched;
    b.busiest_rank_experts =
        std::min(owned, mean + c * std::sqrt(owned * touched * (1.0 - touched)));
    const double rows_mean = tokens * k / n;
    const double rows_max = rows_mean + c * std::sqrt(tokens * k * (1.0 / n) * (1.0 - 1.0 / n));
    // The busiest rank's padding grows with its rows: its share of the padded rows scaled by
    // its rows over the mean rank's.
    b.padded_expert_rows = padded_all / n * (rows_max / rows_mean);
  }
  b.busiest_rank_experts = std::min(options_.expert_parallel ? E / static_cast<double>(tp_) : E,
                                    options_.expert_imbalance * b.busiest_rank_experts);
  b.padded_expert_rows *= options_.expert_imbalance;
}

StepBreakdown RooflineCostModel::target_step(const StepShape& shape, double verify_tokens) const {
  StepBreakdown b;
  const double decode_seqs = static_cast<double>(shape.num_decode_tokens);
  const double decode = decode_seqs * verify_tokens;  // tokens the target model verifies
  const double prefill = static_cast<double>(shape.num_prefill_tokens);
  const double tokens = decode + prefill;
  if (tokens <= 0) return b;
  const double seqs = static_cast<double>(std::max<int64_t>(shape.num_seqs, 1));
  const double avg_ctx = static_cast<double>(shape.kv_tokens_read) / seqs;
  const double T = static_cast<double>(tp_);
  const double expert_params_rank =
      model_.is_moe() ? memory_.params.expert_params / (options_.expert_parallel ? 1.0 : T) : 0.0;

  // Bytes.
  b.weight_bytes = dense_weight_bytes_;
  double expert_row_flops = 0;
  if (model_.is_moe()) {
    expert_load(tokens, b);
    const double layers = static_cast<double>(model_.moe_layers());
    b.weight_bytes += layers * b.busiest_rank_experts * expert_bytes_;
    expert_row_flops = layers * b.padded_expert_rows * 2.0 * expert_params_rank;
  }
  const double window_ctx = memory_.sliding_window > 0
                                ? std::min(avg_ctx, static_cast<double>(memory_.sliding_window))
                                : avg_ctx;
  b.kv_bytes = static_cast<double>(shape.kv_tokens_read) * memory_.kv_bytes_per_token +
               seqs * window_ctx * memory_.kv_window_bytes_per_token +
               tokens * (memory_.kv_bytes_per_token + memory_.kv_window_bytes_per_token);  // new KV
  // Gated DeltaNet state: read once, written once per verified position (one slot each under
  // speculative decoding); the conv state read and written once.
  b.state_bytes = seqs * (memory_.recurrent_state_bytes * (1.0 + verify_tokens) +
                          2.0 * memory_.conv_state_bytes);

  // FLOPs.
  const double dense_flops = 2.0 * tokens * active_dense_params_ / T;
  b.linear_flops = dense_flops + expert_row_flops;
  // A prefilling sequence's chunk of c tokens ends at its context: its tokens attend on average
  // to context - c/2 positions (causal). c = prefill tokens / prefilling sequences.
  const double prefill_seqs = std::max(1.0, seqs - decode_seqs);
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
    AllReduceAlgorithm used = hw_.engine.allreduce;
    const double all_reduce = allreduce_seconds(hw_, hw_.engine.allreduce, tp_, ar_bytes, &used);
    b.allreduce_us = all_reduce * 1e6;
    b.allreduce_algorithm = allreduce_algorithm_name(used);
    const double logits_bytes =
        seqs * verify_tokens * static_cast<double>(model_.vocab_size) * hw_.engine.logits_bytes;
    const double gather = (n - 1.0) / n * logits_bytes / link + (n - 1.0) * lat;
    b.t_comm = 2.0 * static_cast<double>(model_.num_layers) * all_reduce + gather;
  }
  const KernelCounts& k = hw_.engine.kernels;
  const double dense_layers = static_cast<double>(model_.num_layers - model_.moe_layers());
  b.kernels = static_cast<double>(model_.linear_attention_layers) * k.linear_attention +
              static_cast<double>(model_.full_attention_layers()) * k.full_attention +
              static_cast<double>(model_.moe_layers()) * k.moe + dense_layers * k.dense_mlp +
              k.per_step;
  const bool graph = hw_.engine.cuda_graphs && prefill == 0 &&
                     tokens <= static_cast<double>(hw_.engine.cuda_graph_max_tokens);
  b.launch_us = graph ? hw_.launch_us_graph : hw_.launch_us_eager;
  b.t_overhead = b.kernels * b.launch_us * 1e-6 +
                 static_cast<double>(model_.num_layers) * hw_.layer_overhead_us * 1e-6;
  return b;
}

double RooflineCostModel::draft_step_seconds(double seqs, double context, double* kernels) const {
  const double T = static_cast<double>(tp_);
  double bytes = draft_layer_bytes_;
  double flops = 2.0 * seqs * draft_active_params_;
  if (model_.is_moe()) {
    StepBreakdown load;
    expert_load(seqs, load);
    bytes += load.busiest_rank_experts * expert_bytes_;
    const double expert_params_rank =
        memory_.params.expert_params / (options_.expert_parallel ? 1.0 : T);
    flops += load.padded_expert_rows * 2.0 * expert_params_rank;
  }
  const double full = static_cast<double>(std::max<int64_t>(model_.full_attention_layers(), 1));
  bytes += seqs * (context + 1.0) * memory_.kv_bytes_per_token / full;  // its own KV
  const double t_bw = bytes / (peak_bw_ * hw_.bandwidth_efficiency);
  const double t_compute = flops / (peak_linear_ * hw_.compute_efficiency);
  const KernelCounts& k = hw_.engine.kernels;
  const double launches = k.full_attention + k.moe + k.per_step;
  if (kernels) *kernels += launches;
  const bool graph =
      hw_.engine.cuda_graphs && seqs <= static_cast<double>(hw_.engine.cuda_graph_max_tokens);
  const double t_launch = launches * (graph ? hw_.launch_us_graph : hw_.launch_us_eager) * 1e-6 +
                          hw_.layer_overhead_us * 1e-6;
  double t_comm = 0;
  if (tp_ > 1) {
    const double n = T;
    const double link = hw_.interconnect.bandwidth_gbs * 1e9 * hw_.interconnect.efficiency;
    const double ar_bytes = seqs * static_cast<double>(model_.hidden_size) * 2.0;
    const double logits_bytes =
        seqs * static_cast<double>(model_.vocab_size) * hw_.engine.logits_bytes;
    t_comm = 2.0 * allreduce_seconds(hw_, hw_.engine.allreduce, tp_, ar_bytes) +
             (n - 1.0) / n * logits_bytes / link + (n - 1.0) * hw_.interconnect.latency_us * 1e-6;
  }
  return std::max(t_bw, t_compute) + t_comm + t_launch;
}

StepBreakdown RooflineCostModel::breakdown(const StepShape& shape) const {
  const int64_t draft = options_.speculative.num_draft_tokens;
  const bool speculative = draft > 0 && shape.num_decode_tokens > 0;
  StepBreakdown b = target_step(shape, speculative ? static_cast<double>(draft + 1) : 1.0);
  if (shape.num_decode_tokens + shape.num_prefill_tokens <= 0) return b;
  if (speculative) {
    const double seqs = static_cast<double>(shape.num_decode_tokens);
    const double context = static_cast<double>(shape.kv_tokens_read) /
                           static_cast<double>(std::max<int64_t>(shape.num_seqs, 1));
    double draft_kernels = 0;
    b.t_draft = static_cast<double>(draft) * draft_step_seconds(seqs, context, &draft_kernels);
    b.kernels += static_cast<double>(draft) * draft_kernels;
    b.tokens_per_seq = tokens_per_seq_;
  }
  b.seconds = std::max(b.t_bandwidth, b.t_compute) + b.t_comm + b.t_overhead + b.t_draft;
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

SpeculativeStepCost::SpeculativeStepCost(std::unique_ptr<RooflineCostModel> roofline)
    : roofline_(std::move(roofline)) {}

double SpeculativeStepCost::step_seconds(const StepShape& shape) const {
  const double full = roofline_->step_seconds(shape);
  if (shape.num_decode_tokens == 0 || roofline_->tokens_per_seq() <= 1.0) return full;
  // The decode part: the same step without its prefill tokens (and their sequences' context).
  const int64_t prefill_seqs = shape.num_seqs - shape.num_decode_tokens;
  const double avg_ctx = static_cast<double>(shape.kv_tokens_read) /
                         static_cast<double>(std::max<int64_t>(shape.num_seqs, 1));
  StepShape decode_only = shape;
  decode_only.num_seqs = shape.num_decode_tokens;
  decode_only.num_prefill_tokens = 0;
  decode_only.kv_tokens_read =
      static_cast<int64_t>(std::llround(avg_ctx * static_cast<double>(shape.num_decode_tokens)));
  const double decode = prefill_seqs > 0 || shape.num_prefill_tokens > 0
                            ? roofline_->step_seconds(decode_only)
                            : full;
  return full - decode + decode / roofline_->tokens_per_seq();
}

std::unique_ptr<StepCostModel> make_roofline_cost_model(const ModelSpec& model,
                                                        const HardwareSpec& hardware,
                                                        const QuantSpec& quant, int tp,
                                                        const PlanOptions& options) {
  auto roofline = std::make_unique<RooflineCostModel>(model, hardware, quant, tp, options);
  if (options.speculative.num_draft_tokens > 0)
    return std::make_unique<SpeculativeStepCost>(std::move(roofline));
  return roofline;
}

}  // namespace keel::planning
