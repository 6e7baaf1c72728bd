// `keel plan` report: computation and rendering (text and JSON from the same struct).
#include "runtime/tools/planning/plan_report.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "kernels/base/check.h"

namespace keel::planning {

namespace {

std::string fmt(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), format, value);
  return buffer;
}

std::string gib(double bytes) {
  return fmt("%.2f GiB", bytes / kGiB);
}

DecodeRow decode_row(const RooflineCostModel& cost, int64_t batch, int64_t context) {
  DecodeRow row;
  row.batch = batch;
  row.step = cost.breakdown({batch, batch, 0, batch * context});
  row.tokens_per_s = static_cast<double>(batch) * row.step.tokens_per_seq / row.step.seconds;
  row.per_stream_tokens_per_s = row.step.tokens_per_seq / row.step.seconds;
  return row;
}

nlohmann::json step_json(const StepBreakdown& s) {
  return {{"seconds", s.seconds},
          {"bound", s.bound},
          {"t_bandwidth_s", s.t_bandwidth},
          {"t_compute_s", s.t_compute},
          {"t_comm_s", s.t_comm},
          {"t_overhead_s", s.t_overhead},
          {"t_draft_s", s.t_draft},
          {"tokens_per_seq", s.tokens_per_seq},
          {"kernels", s.kernels},
          {"launch_us", s.launch_us},
          {"allreduce_us", s.allreduce_us},
          {"allreduce_algorithm", s.allreduce_algorithm},
          {"weight_bytes", s.weight_bytes},
          {"kv_bytes", s.kv_bytes},
          {"state_bytes", s.state_bytes},
          {"busiest_rank_experts_per_layer", s.busiest_rank_experts},
          {"padded_expert_rows_per_layer", s.padded_expert_rows},
          {"linear_flops", s.linear_flops},
          {"attention_flops", s.attention_flops},
          {"distinct_experts_per_layer", s.distinct_experts}};
}

nlohmann::json row_json(const DecodeRow& row) {
  return {{"batch", row.batch},
          {"tokens_per_s", row.tokens_per_s},
          {"per_stream_tokens_per_s", row.per_stream_tokens_per_s},
          {"step", step_json(row.step)}};
}

}  // namespace

PlanReport build_plan_report(const ModelSpec& model, const HardwareSpec& hardware,
                             const QuantSpec& quant, int tp, const PlanOptions& options) {
  if (tp > hardware.count)
    throw_error("--tp ", tp, " exceeds the ", hardware.count, " GPUs of ", hardware.name,
                " (use --gpus N to change the count)");
  if (options.prompt_len < 1) throw_error("--prompt-len must be >= 1");
  PlanReport r;
  r.model = model;
  r.hardware = hardware;
  r.quant = quant;
  r.tp = tp;
  r.options = options;
  RooflineCostModel cost(model, hardware, quant, tp, options);
  r.memory = cost.memory();
  r.precision = cost.linear_precision();

  // The scheduler runs at most max_num_seqs sequences however many fit (vLLM's --max-num-seqs).
  const int64_t max_batch = std::max<int64_t>(std::min(r.memory.max_seqs, options.max_num_seqs), 1);
  for (int64_t b = 1; b <= max_batch; b *= 2)
    r.decode.push_back(decode_row(cost, b, options.context));
  if (r.decode.back().batch != max_batch)
    r.decode.push_back(decode_row(cost, max_batch, options.context));
  r.single_stream = r.decode.front();
  r.full_batch = r.decode.back();

  const int64_t chunk = std::min(options.prompt_len, options.max_num_batched_tokens);
  r.prefill_chunk = cost.breakdown({1, 0, chunk, chunk});
  r.ttft_s = cost.ttft_seconds(options.prompt_len);
  r.prefill_tokens_per_s = static_cast<double>(options.prompt_len) / r.ttft_s;
  return r;
}

std::string render_plan_text(const PlanReport& r) {
  std::ostringstream out;
  const MemoryPlan& m = r.memory;
  const ModelParams& p = m.params;
  out << "keel plan: " << r.model.name << " on " << r.hardware.name << " (" << r.hardware.count
      << " GPUs), " << r.quant.name << ", TP=" << r.tp << ", context " << r.options.context
      << ", KV " << r.options.kv_dtype << "\n";
  out << "  model: " << fmt("%.1f", p.total() / 1e9) << " B params ("
      << fmt("%.2f", p.active_per_token / 1e9) << " B active/token incl. lm_head)";
  if (r.model.reference_total_params_b > 0)
    out << "; published " << fmt("%.1f", r.model.reference_total_params_b) << " B / "
        << fmt("%.1f", r.model.reference_active_params_b) << " B";
  out << "\n  quant: " << r.quant.name << " = " << r.quant.description << ", "
      << fmt("%.4f", r.quant.bytes_per_param) << " B/param; embeddings, lm_head, norms, routers "
      << r.model.dtype << (r.model.keel_layout ? " (keel's layout: norms and biases fp32)" : "")
      << (r.options.attention_bf16 ? "; attention bf16 (--attention-bf16)" : "")
      << (r.options.shared_expert_bf16 ? "; shared expert bf16" : "") << "; matmuls at "
      << compute_precision_name(r.precision) << "\n\n";

  out << "Memory per GPU (" << fmt("%.1f", r.hardware.memory_gib) << " GiB):\n";
  for (const MemoryLine& line : m.weights) {
    char row[200];
    std::snprintf(row, sizeof(row), "  %-36s %10s   %s\n", line.name.c_str(),
                  gib(line.bytes).c_str(), line.note.c_str());
    out << row;
  }
  auto line = [&](const std::string& name, double bytes, const std::string& note) {
    char row[200];
    std::snprintf(row, sizeof(row), "  %-36s %10s   %s\n", name.c_str(), gib(bytes).c_str(),
                  note.c_str());
    out << row;
  };
  line("= weights", m.weight_bytes, "");
  line("activations (estimate)", m.activation_bytes,
       "max_num_batched_tokens " + std::to_string(r.options.max_num_batched_tokens));
  line("communication buffers", m.comm_bytes, r.tp > 1 ? "all-reduce staging + NCCL" : "tp=1");
  line("framework reserve", m.reserve_bytes, "--reserve-gib");
  line("left for KV cache", m.available_for_kv, "");
  out << "  KV cache per token:   " << fmt("%.1f", m.kv_bytes_per_token / 1024.0) << " KiB"
      << " (full-attention layers"
      << (m.kv_window_bytes_per_token > 0
              ? "; + " + fmt("%.1f", m.kv_window_bytes_per_token / 1024.0) +
                    " KiB for sliding-window layers, capped at " +
                    std::to_string(m.sliding_window) + " tokens"
              : std::string())
      << ")\n";
  if (m.state_bytes_per_seq > 0)
    out << "  recurrent state/seq:  " << fmt("%.1f", m.state_bytes_per_seq / (1024.0 * 1024.0))
        << " MiB (Gated DeltaNet, " << r.model.linear_state_dtype << " state + "
        << r.model.linear_conv_state_dtype << " conv)\n";
  out << "  KV per sequence:      " << gib(m.kv_bytes_per_seq) << " at " << r.options.context
      << " tokens\n";
  out << "  max concurrent sequences at " << r.options.context << ": " << m.max_seqs << "\n";
  if (m.fits) {
    out << "  verdict: fits\n\n";
  } else {
    out << "  verdict: does not fit: short by " << fmt("%.2f", m.short_by_bytes / kGiB)
        << " GiB per GPU (biggest consumers:";
    for (size_t i = 0; i < m.biggest.size(); ++i) out << (i ? "," : "") << " " << m.biggest[i];
    out << ")\n\n";
  }

  out << "Decode (every sequence at " << r.options.context
      << " tokens; uniform routing: distinct experts/layer = E(1-(1-k/E)^B), imbalance "
      << fmt("%.2f", r.options.expert_imbalance) << "):\n";
  out << "      B   experts/layer  weights GB   KV GB  state GB   GFLOP   bw ms  compute ms"
         "  comm ms  ovh ms  draft ms   step ms    tok/s  bound\n";
  for (const DecodeRow& row : r.decode) {
    char buf[260];
    const StepBreakdown& s = row.step;
    std::snprintf(buf, sizeof(buf),
                  "  %5lld  %13.1f  %10.2f  %6.2f  %8.2f  %6.1f  %6.2f  %10.2f  %7.2f  %6.2f  %8.2f"
                  "  %8.2f  %7.1f  %s\n",
                  static_cast<long long>(row.batch), s.distinct_experts, s.weight_bytes / 1e9,
                  s.kv_bytes / 1e9, s.state_bytes / 1e9, s.flops() / 1e9, s.t_bandwidth * 1e3,
                  s.t_compute * 1e3, s.t_comm * 1e3, s.t_overhead * 1e3, s.t_draft * 1e3,
                  s.seconds * 1e3, row.tokens_per_s, s.bound);
    out << buf;
  }
  if (!m.fits) out << "  (hypothetical: the model does not fit)\n";
  out << "  single stream: " << fmt("%.1f", r.single_stream.tokens_per_s) << " tok/s ("
      << r.single_stream.step.bound << "-bound); at B=" << r.full_batch.batch << ": "
      << fmt("%.0f", r.full_batch.tokens_per_s) << " tok/s total, "
      << fmt("%.1f", r.full_batch.per_stream_tokens_per_s) << " tok/s per stream ("
      << r.full_batch.step.bound << "-bound)\n\n";

  out << "Prefill (prompt " << r.options.prompt_len << " tokens, chunks of "
      << r.options.max_num_batched_tokens << "):\n";
  out << "  TTFT " << fmt("%.1f", r.ttft_s * 1e3) << " ms, " << fmt("%.0f", r.prefill_tokens_per_s)
      << " tok/s; first chunk: compute " << fmt("%.2f", r.prefill_chunk.t_compute * 1e3)
      << " ms, bandwidth " << fmt("%.2f", r.prefill_chunk.t_bandwidth * 1e3) << " ms, comm "
      << fmt("%.2f", r.prefill_chunk.t_comm * 1e3) << " ms, overhead "
      << fmt("%.2f", r.prefill_chunk.t_overhead * 1e3) << " ms (" << r.prefill_chunk.bound
      << "-bound)\n\n";

  out << "Bottlenecks: single-stream decode " << r.single_stream.step.bound
      << ", full-batch decode " << r.full_batch.step.bound << ", prefill " << r.prefill_chunk.bound
      << "\n";
  const HardwareSpec& h = r.hardware;
  const EngineProfile& e = h.engine;
  const StepBreakdown& one = r.single_stream.step;
  out << "Model: step = max(bytes / (" << fmt("%.0f", h.memory_bandwidth_gbs) << " GB/s x "
      << fmt("%.3f", h.bandwidth_efficiency) << "), FLOPs / (peak x "
      << fmt("%.2f", h.compute_efficiency) << ")) + 2 all-reduces/layer ("
      << allreduce_algorithm_name(e.allreduce) << "; " << h.interconnect.kind << " "
      << fmt("%.0f", h.interconnect.bandwidth_gbs) << " GB/s x "
      << fmt("%.2f", h.interconnect.efficiency) << ", ring "
      << fmt("%.1f", h.interconnect.latency_us) << " us/hop, one-shot "
      << fmt("%.1f", h.interconnect.one_shot_latency_us) << " us, two-shot "
      << fmt("%.1f", h.interconnect.two_shot_latency_us)
      << " us; B=1: " << fmt("%.1f", one.allreduce_us) << " us " << one.allreduce_algorithm
      << ") + kernels x launch (" << fmt("%.0f", one.kernels) << " at B=1, "
      << fmt("%.2f", h.launch_us_graph) << " us in a CUDA graph"
      << (e.cuda_graphs ? "" : " (graphs off)") << ", " << fmt("%.2f", h.launch_us_eager)
      << " us eager) + " << fmt("%.1f", h.layer_overhead_us) << " us/layer; MoE tile "
      << e.moe_tile_m << " rows"
      << (r.options.expert_parallel ? ", expert-parallel" : ", tensor-parallel experts");
  if (r.options.speculative.num_draft_tokens > 0)
    out << "; speculative mtp:" << r.options.speculative.num_draft_tokens << ", "
        << fmt("%.3f", r.options.speculative.tokens_per_step()) << " tokens/step";
  out << "\nEngine profile: " << e.name;
  if (!e.source.empty()) out << " (" << e.source << ")";
  out << "\n";
  if (!e.fitted_keys.empty()) {
    out << "  fitted:";
    for (const std::string& key : e.fitted_keys) out << " " << key;
    out << "; to:";
    for (const FitPoint& point : e.fitted_to)
      out << " [" << point.what << ": " << fmt("%.1f", point.published_tokens_per_s) << " tok/s]";
    out << "\n";
  }
  return out.str();
}

nlohmann::json plan_report_json(const PlanReport& r) {
  const MemoryPlan& m = r.memory;
  nlohmann::json weights = nlohmann::json::array();
  for (const MemoryLine& line : m.weights)
    weights.push_back({{"part", line.name}, {"bytes", line.bytes}, {"note", line.note}});
  nlohmann::json decode = nlohmann::json::array();
  for (const DecodeRow& row : r.decode) decode.push_back(row_json(row));
  const ModelParams& p = m.params;
  return {{"model",
           {{"name", r.model.name},
            {"path", r.model.path},
            {"total_params", p.total()},
            {"active_params_per_token", p.active_per_token}}},
          {"hardware",
           {{"name", r.hardware.name},
            {"path", r.hardware.path},
            {"count", r.hardware.count},
            {"memory_gib", r.hardware.memory_gib},
            {"memory_bandwidth_gbs", r.hardware.memory_bandwidth_gbs},
            {"interconnect", r.hardware.interconnect.kind},
            {"bandwidth_efficiency", r.hardware.bandwidth_efficiency},
            {"compute_efficiency", r.hardware.compute_efficiency},
            {"layer_overhead_us", r.hardware.layer_overhead_us},
            {"launch_us_graph", r.hardware.launch_us_graph},
            {"launch_us_eager", r.hardware.launch_us_eager},
            {"allreduce_latency_us", r.hardware.interconnect.latency_us},
            {"one_shot_latency_us", r.hardware.interconnect.one_shot_latency_us},
            {"two_shot_latency_us", r.hardware.interconnect.two_shot_latency_us}}},
          {"engine",
           {{"name", r.hardware.engine.name},
            {"source", r.hardware.engine.source},
            {"cuda_graphs", r.hardware.engine.cuda_graphs},
            {"cuda_graph_max_tokens", r.hardware.engine.cuda_graph_max_tokens},
            {"allreduce", allreduce_algorithm_name(r.hardware.engine.allreduce)},
            {"moe_tile_m", r.hardware.engine.moe_tile_m},
            {"logits_bytes", r.hardware.engine.logits_bytes},
            {"kernels",
             {{"linear_attention", r.hardware.engine.kernels.linear_attention},
              {"full_attention", r.hardware.engine.kernels.full_attention},
              {"moe", r.hardware.engine.kernels.moe},
              {"dense_mlp", r.hardware.engine.kernels.dense_mlp},
              {"per_step", r.hardware.engine.kernels.per_step}}},
            {"fitted", r.hardware.engine.fitted_keys}}},
          {"speculative",
           {{"num_draft_tokens", r.options.speculative.num_draft_tokens},
            {"acceptance", r.options.speculative.acceptance},
            {"tokens_per_step", r.options.speculative.tokens_per_step()}}},
          {"expert_parallel", r.options.expert_parallel},
          {"quant",
           {{"name", r.quant.name},
            {"bytes_per_param", r.quant.bytes_per_param},
            {"compute_precision", compute_precision_name(r.precision)},
            {"attention_bf16", r.options.attention_bf16},
            {"shared_expert_bf16", r.options.shared_expert_bf16}}},
          {"tp", r.tp},
          {"context", r.options.context},
          {"kv_dtype", r.options.kv_dtype},
          {"memory",
           {{"capacity_bytes", m.capacity_bytes},
            {"weights", weights},
            {"weight_bytes", m.weight_bytes},
            {"activation_bytes", m.activation_bytes},
            {"comm_bytes", m.comm_bytes},
            {"reserve_bytes", m.reserve_bytes},
            {"available_for_kv_bytes", m.available_for_kv},
            {"kv_bytes_per_token", m.kv_bytes_per_token},
            {"kv_window_bytes_per_token", m.kv_window_bytes_per_token},
            {"state_bytes_per_seq", m.state_bytes_per_seq},
            {"kv_bytes_per_seq", m.kv_bytes_per_seq},
            {"max_concurrent_seqs", m.max_seqs},
            {"fits", m.fits},
            {"verdict", m.fits ? std::string("fits")
                               : "does not fit: short by " + fmt("%.2f", m.short_by_bytes / kGiB) +
                                     " GiB per GPU"},
            {"short_by_bytes", m.short_by_bytes},
            {"biggest_consumers", m.biggest}}},
          {"decode", decode},
          {"single_stream", row_json(r.single_stream)},
          {"full_batch", row_json(r.full_batch)},
          {"prefill",
           {{"prompt_len", r.options.prompt_len},
            {"ttft_s", r.ttft_s},
            {"tokens_per_s", r.prefill_tokens_per_s},
            {"chunk_step", step_json(r.prefill_chunk)}}},
          {"bottlenecks",
           {{"single_stream_decode", r.single_stream.step.bound},
            {"full_batch_decode", r.full_batch.step.bound},
            {"prefill", r.prefill_chunk.bound}}}};
}

}  // namespace keel::planning
