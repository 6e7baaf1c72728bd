// Per-GPU memory model (formulas documented in memory_model.h).
#include "runtime/tools/planning/memory_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <sstream>

#include "kernels/base/check.h"

namespace keel::planning {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

double MemoryPlan::seq_bytes(int64_t context) const {
  const double window_tokens = static_cast<double>(
      sliding_window > 0 ? std::min<int64_t>(context, sliding_window) : context);
  return kv_bytes_per_token * static_cast<double>(context) +
         kv_window_bytes_per_token * window_tokens + state_bytes_per_seq;
}

double SpeculativeConfig::tokens_per_step() const {
  double tokens = 1.0;
  for (int64_t i = 0; i < num_draft_tokens && i < static_cast<int64_t>(acceptance.size()); ++i)
    tokens += acceptance[static_cast<size_t>(i)];
  return tokens;
}

SpeculativeConfig parse_speculative(const std::string& method, const std::string& acceptance) {
  SpeculativeConfig spec;
  if (method.empty() || method == "none") {
    if (!acceptance.empty()) throw_error("--acceptance needs --speculative mtp:K");
    return spec;
  }
  if (method.rfind("mtp:", 0) != 0)
    throw_error("--speculative must be none or mtp:K (got '", method, "')");
  const std::string count = method.substr(4);
  char* end = nullptr;
  const long k = std::strtol(count.c_str(), &end, 10);
  if (count.empty() || *end != '\0' || k < 1 || k > 16)
    throw_error("--speculative mtp:K: K must be an integer in [1, 16] (got '", count, "')");
  spec.num_draft_tokens = k;
  if (acceptance.empty()) throw_error("--speculative ", method, " needs --acceptance A");
  std::vector<double> values;
  std::stringstream stream(acceptance);
  for (std::string item; std::getline(stream, item, ',');) {
    char* item_end = nullptr;
    const double value = std::strtod(item.c_str(), &item_end);
    if (item.empty() || *item_end != '\0' || !(value >= 0 && value <= 1))
      throw_error("--acceptance: '", item, "' is not a rate in [0, 1]");
    values.push_back(value);
  }
  if (values.size() == 1) {
    // One conditional rate: position i is accepted when all before it are, A^i.
    double rate = 1.0;
    for (long i = 0; i < k; ++i) spec.acceptance.push_back(rate *= values[0]);
  } else {
    if (static_cast<long>(values.size()) != k)
      throw_error("--acceptance: ", values.size(), " per-position rates for mtp:", k);
    for (size_t i = 1; i < values.size(); ++i)
      if (values[i] > values[i - 1])
        throw_error("--acceptance: per-position rates must not increase (position ", i + 1, ": ",
                    values[i], " > ", values[i - 1], ")");
    spec.acceptance = values;
  }
  return spec;
}

namespace {

// A quantized checkpoint's matrices on rank 0 of `tp` (what Engine::weight_bytes_per_rank()
// reports), by part, each by matrix_bytes() in the shape RankModel holds it
// (runtime/model/weights.cpp), with the formats each part holds for the report.
struct QuantizedMatrices {
  double experts = 0, shared = 0, dense_mlp = 0, attention = 0, linear_attention = 0;
  std::set<std::string> expert_formats, shared_formats, dense_formats, attention_formats,
      linear_formats;
};

std::string format_list(const std::set<std::string>& formats) {
  std::string out;
  for (const std::string& format : formats) out += (out.empty() ? "" : " + ") + format;
  return out;
}

QuantizedMatrices quantized_matrices(const ModelSpec& m, int tp, double wb) {
  if (!m.keel_layout || m.attention != AttentionType::gqa)
    throw_error(m.path, ": per-matrix quantization needs keel's layout (a checkpoint plan)");
  auto split = [&](int64_t value, const char* what) {
    if (value % tp != 0)
      throw_error(m.path, ": cannot split ", what, " ", value, " over tp=", tp,
                  " (keel's loader needs a multiple of tp)");
    return value / tp;
  };
  const int64_t H = m.hidden_size;
  const std::string layer_name = m.path + ": layer ";
  QuantizedMatrices out;
  auto bytes = [&](const MatrixQuant& quant, int64_t rows, int64_t cols, int64_t full_cols,
                   std::set<std::string>& formats) {
    formats.insert(matrix_quant_name(quant, m.dtype));
    return matrix_bytes(quant, rows, cols, full_cols, wb);
  };
  for (size_t layer = 0; layer < m.layer_quant.size(); ++layer) {
    const LayerQuant& lq = m.layer_quant[layer];
    const std::string where = layer_name + std::to_string(layer);
    if (lq.linear_attention) {
      const int64_t k_rows =
          split(m.linear_num_key_heads, "linear_num_key_heads") * m.linear_key_head_dim;
      const int64_t v_heads = split(m.linear_num_value_heads, "linear_num_value_heads");
      const int64_t v_rows = v_heads * m.linear_value_head_dim;
      const int64_t value_dim = m.linear_num_value_heads * m.linear_value_head_dim;
      check_column_slice(lq.linear_out, v_rows, value_dim, tp, where + " linear_attn.out_proj");
      out.linear_attention +=
          bytes(lq.linear_in, 2 * k_rows + 2 * v_rows, H, H, out.linear_formats) +
          bytes(lq.linear_ba, 2 * v_heads, H, H, out.linear_formats) +
          bytes(lq.linear_out, H, v_rows, value_dim, out.linear_formats);
    } else {
      const int64_t q_heads = split(m.num_attention_heads, "num_attention_heads");
      // Rank 0's KV heads: those its query heads read (RankModel::kv_heads_local_).
      const int64_t kv_heads = (q_heads - 1) / (m.num_attention_heads / m.num_kv_heads) + 1;
      const int64_t q_rows = q_heads * m.head_dim;
      const int64_t qkv_rows = q_rows * (m.attn_output_gate ? 2 : 1) + 2 * kv_heads * m.head_dim;
      check_column_slice(lq.o_proj, q_rows, m.num_attention_heads * m.head_dim, tp,
                         where + " self_attn.o_proj");
      out.attention +=
          bytes(lq.qkv, qkv_rows, H, H, out.attention_formats) +
          bytes(lq.o_proj, H, q_rows, m.num_attention_heads * m.head_dim, out.attention_formats);
    }
    if (lq.moe) {
      const int64_t I = m.moe_intermediate_size;
      const double per_expert = bytes(lq.experts_gate_up, 2 * I, H, H, out.expert_formats) +
                                bytes(lq.experts_down, H, I, I, out.expert_formats);
      out.experts += per_expert * static_cast<double>(m.num_experts) / static_cast<double>(tp);
      if (m.num_shared_experts > 0) {
        const int64_t full = m.shared_expert_intermediate_size;
        const int64_t width = split(full, "shared_expert_intermediate_size");
        check_column_slice(lq.mlp_down, width, full, tp, where + " shared_expert.down_proj");
        out.shared += bytes(lq.mlp_gate_up, 2 * width, H, H, out.shared_formats) +
                      bytes(lq.mlp_down, H, width, full, out.shared_formats);
        if (m.shared_expert_gate) out.shared += static_cast<double>(H) * wb;  // [1, H], dense
      }
    } else {
      const int64_t full = m.dense_intermediate_size;
      const int64_t width = split(full, "intermediate_size");
      check_column_slice(lq.mlp_down, width, full, tp, where + " mlp.down_proj");
      out.dense_mlp += bytes(lq.mlp_gate_up, 2 * width, H, H, out.dense_formats) +
                       bytes(lq.mlp_down, H, width, full, out.dense_formats);
    }
  }
  return out;
}

}  // namespace

MemoryPlan plan_memory(const ModelSpec& m, const HardwareSpec& hw, const QuantSpec& quant, int tp,
                       const PlanOptions& options) {
  if (tp < 1) throw_error("--tp must be >= 1");
  if (options.context < 1) throw_error("--context must be >= 1");
  MemoryPlan plan;
  plan.tp = tp;
  plan.params = count_params(m);
  const ModelParams& p = plan.params;
  const double T = static_cast<double>(tp);
  const double H = static_cast<double>(m.hidden_size);
  const double q = quant.bytes_per_param;
  const double a = options.attention_bf16 ? 2.0 : q;  // attention / linear-attention projections
  const double bf16 = 2.0;
  const double full = static_cast<double>(m.full_attention_layers());
  const double kv_b = dtype_bytes(options.kv_dtype, "--kv-dtype");
  // Unquantized tensors at the model's dtype; keel's layout (model_spec.h) keeps the small
  // ones (norms, biases, conv1d, A_log, dt_bias) in fp32.
  const double wb = dtype_bytes(m.dtype, m.path + ": dtype");
  const std::string wn = m.dtype;

  auto add = [&](const std::string& name, double bytes, const std::string& note) {
    if (bytes <= 0) return;
    plan.weights.push_back({name, bytes, note});
  };
  const std::string qn = quant.name;
  const std::string an = options.attention_bf16 ? "bf16" : qn;

  const bool per_matrix = !m.layer_quant.empty();
  QuantizedMatrices qm;
  if (per_matrix) {
    if (options.attention_bf16)
      throw_error(m.path, " is a quantized checkpoint (", m.quant_method,
                  "): its attention is planned as stored; --attention-bf16 does not apply");
    if (!quant.as_stored)
      throw_error(m.path, " is a quantized checkpoint (", m.quant_method,
                  "): keel runs it as stored, so it is planned as stored (--quant none), "
                  "not re-quantized to ",
                  quant.name);
    if (static_cast<int64_t>(m.layer_quant.size()) != m.num_layers)
      throw_error(m.path, ": ", m.layer_quant.size(), " layer formats for ", m.num_layers,
                  " layers");
    qm = quantized_matrices(m, tp, wb);
  }

  if (per_matrix && m.is_moe()) {
    add("routed experts", qm.experts,
        std::to_string(m.num_experts) + " x " + std::to_string(m.moe_layers()) + " layers, " +
            format_list(qm.expert_formats) + ", /tp");
    add("shared experts", qm.shared,
        format_list(qm.shared_formats) + ", /tp; shared-expert gate " + wn + ", replicated");
  } else if (m.is_moe()) {
    add("routed experts", p.routed_experts * q / T,
        std::to_string(m.num_experts) + " x " + std::to_string(m.moe_layers()) + " layers, " + qn +
            ", /tp");
    // keel replicates the shared-expert gate [1, H] at the model's dtype.
    const double shared_gate = m.keel_layout && m.shared_expert_gate && m.num_shared_experts > 0
                                   ? H * static_cast<double>(m.moe_layers())
                                   : 0.0;
    const double shared_b = options.shared_expert_bf16 ? wb : q;
    add("shared experts", (p.shared_experts - shared_gate) * shared_b / T + shared_gate * wb,
        (options.shared_expert_bf16 ? wn : qn) + ", /tp");
  }
  if (per_matrix) {
    add("dense MLP layers", qm.dense_mlp,
        std::to_string(m.dense_layers) + " layers, " + format_list(qm.dense_formats) + ", /tp");
  } else {
    add("dense MLP layers", p.dense_mlp * q / T,
        std::to_string(m.dense_layers) + " layers, " + qn + ", /tp");
  }

  // Full attention per rank: K/V heads ceil(nkv/tp) (replicated when nkv < tp).
  double attn_rank = 0;
  if (m.attention == AttentionType::gqa) {
    const double kvr = static_cast<double>(ceil_div(m.num_kv_heads, tp));
    const double nh = m.num_attention_heads, hd = m.head_dim;
    const double q_out = nh * hd * (m.attn_output_gate ? 2.0 : 1.0);
    attn_rank = full * (H * q_out / T + 2.0 * H * kvr * hd + nh * hd * H / T) * a;
  } else {
    const double nh = m.num_attention_heads;
    const double qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    double replicated = H * (m.kv_lora_rank + m.qk_rope_head_dim);  // kv_a_proj_with_mqa
    double sharded = m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim) +  // kv_b_proj
                     nh * m.v_head_dim * H;                                       // o_proj
    if (m.q_lora_rank > 0) {
      replicated += H * m.q_lora_rank;  // q_a_proj
      sharded += m.q_lora_rank * nh * qk;
    } else {
      sharded += H * nh * qk;
    }
    attn_rank = full * (replicated + sharded / T) * a;
  }
  std::string an_keel = an;  // the attention / linear-attention formats in keel's layout
  if (per_matrix) {
    attn_rank = qm.attention;
    an_keel = format_list(qm.attention_formats);
  }
  if (!m.keel_layout) {
    // Small tensors (norms, biases, sinks) replicated: conservative.
    attn_rank += p.attention_bf16 * wb;
    add("attention (q/k/v/o, norms)", attn_rank,
        std::to_string(m.full_attention_layers()) + " layers, " + an);
    add("linear attention (Gated DeltaNet)",
        (p.linear_attention * a + p.linear_attention_bf16 * wb) / T,
        std::to_string(m.linear_attention_layers) + " layers, " + an + ", /tp");
    add("routers + layer norms", (p.router + p.layer_norms) * wb, wn + ", replicated");
    add("embeddings", p.embeddings * wb / T, wn + ", vocab-parallel /tp");
    add("lm_head", p.lm_head * wb / T, wn + ", vocab-parallel /tp");
  } else {
    const double f32 = 4.0;
    if (m.attention == AttentionType::gqa) {
      const double kvr = static_cast<double>(ceil_div(m.num_kv_heads, tp));
      const double hd = static_cast<double>(m.head_dim);
      double small = 0;  // per full-attention layer, this rank
      if (m.attention_bias)
        small += static_cast<double>(m.num_attention_heads) * hd / T + 2.0 * kvr * hd;
      if (m.attention_bias && m.attention_o_bias) small += H;
      if (m.qk_norm) small += 2.0 * hd;
      if (m.attention_sinks) small += static_cast<double>(m.num_attention_heads) / T;
      attn_rank += full * small * f32;
    } else {
      attn_rank += p.attention_bf16 * f32;
    }
    add("attention (q/k/v/o, norms)", attn_rank,
        std::to_string(m.full_attention_layers()) + " layers, " + an_keel + "; biases, norms fp32");
    if (m.linear_attention_layers > 0) {
      const double nv = static_cast<double>(m.linear_num_value_heads);
      const double channels =
          2.0 * m.linear_num_key_heads * m.linear_key_head_dim + nv * m.linear_value_head_dim;
      // conv1d, A_log, dt_bias split with the heads; the gated norm [head_v_dim] replicated.
      const double small =
          (channels * m.linear_conv_kernel_dim + 2.0 * nv) / T + m.linear_value_head_dim;
      add("linear attention (Gated DeltaNet)",
          (per_matrix ? qm.linear_attention : p.linear_attention * a / T) +
              static_cast<double>(m.linear_attention_layers) * small * f32,
          std::to_string(m.linear_attention_layers) + " layers, " +
              (per_matrix ? format_list(qm.linear_formats) : an) +
              ", /tp; conv1d, A_log, dt_bias, norm fp32");
    }
    add("routers + layer norms", p.router * wb + p.layer_norms * f32,
        "routers " + wn + ", norms fp32, replicated");
    add("embeddings", p.embeddings * wb, wn + ", replicated (keel)");
    add("lm_head", static_cast<double>(ceil_div(m.vocab_size, tp)) * H * wb,
        wn + ", ceil(vocab/tp) rows per rank" +
            (m.tie_word_embeddings ? ", a copy when tied" : ""));
  }
  const int64_t draft_tokens = options.speculative.num_draft_tokens;
  if (draft_tokens > 0) {
    // One draft decoder layer: a full-attention layer and a MoE layer at the plan's formats
    // (per-layer averages of the parts above), plus fc [H, 2H] in bf16 (kept unquantized in the
    // NVFP4 checkpoints), split tp ways.
    double per_layer = 0;
    for (const MemoryLine& line : plan.weights) {
      if (line.name == "attention (q/k/v/o, norms)" && m.full_attention_layers() > 0)
        per_layer += line.bytes / full;
      if ((line.name == "routed experts" || line.name == "shared experts") && m.moe_layers() > 0)
        per_layer += line.bytes / static_cast<double>(m.moe_layers());
    }
    add("speculative draft (MTP) layer", per_layer + 2.0 * H * H * bf16 / T,
        "mtp:" + std::to_string(draft_tokens) + ", one decoder layer + fc");
  }
  for (const MemoryLine& line : plan.weights) plan.weight_bytes += line.bytes;

  // KV cache per token (full-attention layers) and sliding-window layers.
  if (m.attention == AttentionType::gqa) {
    const double per_layer =
        2.0 * static_cast<double>(ceil_div(m.num_kv_heads, tp)) * m.head_dim * kv_b;  // K and V
    const double swa = static_cast<double>(m.sliding_window_layers);
    plan.kv_bytes_per_token = per_layer * (full - swa);
    plan.kv_window_bytes_per_token = per_layer * swa;
    plan.sliding_window = m.sliding_window;
  } else {
    // MLA: compressed latent + decoupled rope key, replicated on every rank.
    plan.kv_bytes_per_token = full * (m.kv_lora_rank + m.qk_rope_head_dim) * kv_b;
  }
  if (m.linear_attention_layers > 0) {
    const double state_b = dtype_bytes(m.linear_state_dtype, m.path + ": linear_state_dtype");
    const double nv_rank = static_cast<double>(m.linear_num_value_heads) / T;
    const double recurrent = nv_rank * m.linear_key_head_dim * m.linear_value_head_dim * state_b;
    const double conv_channels =
        (2.0 * m.linear_num_key_heads * m.linear_key_head_dim +
         static_cast<double>(m.linear_num_value_heads) * m.linear_value_head_dim) /
        T;
    const double conv_b =
        dtype_bytes(m.linear_conv_state_dtype, m.path + ": linear_conv_state_dtype");
    const double conv = conv_channels * std::max<int64_t>(m.linear_conv_kernel_dim - 1, 0) * conv_b;
    // Speculative decoding keeps one recurrent state per draft position besides the committed
    // one (vLLM's spec_state_indices_tensor).
    plan.recurrent_state_bytes = static_cast<double>(m.linear_attention_layers) * recurrent;
    plan.conv_state_bytes = static_cast<double>(m.linear_attention_layers) * conv;
    plan.state_bytes_per_seq = static_cast<double>(m.linear_attention_layers) *
                               (recurrent * static_cast<double>(1 + draft_tokens) + conv);
  }
  plan.kv_bytes_per_seq = plan.seq_bytes(options.context);

  // Activations and communication buffers.
  const double tokens = static_cast<double>(options.max_num_batched_tokens);
  double widest = 0;
  if (m.is_moe()) {
    widest = std::max(widest, static_cast<double>(m.num_experts_per_tok) * m.moe_intermediate_size);
    widest = std::max(widest, static_cast<double>(m.shared_expert_intermediate_size));
  }
  widest = std::max(widest, static_cast<double>(m.dense_intermediate_size));
  const double logits_rows =
      static_cast<double>(std::min(options.max_num_seqs, options.max_num_batched_tokens));
  plan.activation_bytes = 6.0 * tokens * H * bf16 + tokens * widest / T * 2.0 * bf16 +
                          logits_rows * static_cast<double>(m.vocab_size) * 4.0;
  plan.comm_bytes =
      tp > 1 ? 2.0 * tokens * H * bf16 + options.comm_fixed_mib * 1024.0 * 1024.0 : 0.0;
  plan.reserve_bytes = options.reserve_gib * kGiB;
  plan.capacity_bytes = hw.memory_gib * kGiB;

  plan.available_for_kv = plan.capacity_bytes - plan.weight_bytes - plan.activation_bytes -
                          plan.comm_bytes - plan.reserve_bytes;
  plan.max_seqs =
      plan.available_for_kv > 0 && plan.kv_bytes_per_seq > 0
          ? static_cast<int64_t>(std::floor(plan.available_for_kv / plan.kv_bytes_per_seq))
          : 0;
  plan.fits = plan.max_seqs >= 1;
  if (!plan.fits) plan.short_by_bytes = plan.kv_bytes_per_seq - plan.available_for_kv;

  std::vector<MemoryLine> consumers = plan.weights;
  consumers.push_back({"activations", plan.activation_bytes, ""});
  consumers.push_back({"communication buffers", plan.comm_bytes, ""});
  consumers.push_back({"framework reserve", plan.reserve_bytes, ""});
  consumers.push_back({"KV + state for one sequence", plan.kv_bytes_per_seq, ""});
  std::sort(consumers.begin(), consumers.end(),
            [](const MemoryLine& x, const MemoryLine& y) { return x.bytes > y.bytes; });
  for (size_t i = 0; i < consumers.size() && i < 3; ++i) {
    std::ostringstream line;
    line.precision(1);
    line << std::fixed << consumers[i].name << " (" << consumers[i].bytes / kGiB << " GiB)";
    plan.biggest.push_back(line.str());
  }
  return plan;
}

}  // namespace keel::planning
