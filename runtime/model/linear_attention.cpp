// The Gated DeltaNet block of one linear-attention layer (Qwen3.5 / Qwen3-Next):
//   proj = x * linear_in^T            one GEMM: [q | k | v | z | b | a] of this rank's heads
//   qkv  = silu(causal conv1d(q|k|v))  per sequence, with the slot's rolling conv state
//   g, beta from a and b               per (token, value head)
//   core = gated delta rule            per (sequence, value head), tokens in position order,
//                                      on the slot's fp32 state
//   core = rmsnorm(core) * w * silu(z) per value head
//   partial = core * linear_out^T      row-parallel: the layer's one all-reduce follows
// Every sum runs in one fixed order per token and per state column (kernels/math/gdn_math.h),
// and a sequence's state is carried token by token, so prefill whole, in chunks of any size,
// or token-by-token decode gives the same bits, whatever else is in the batch.
#include <cmath>

#include "kernels/base/check.h"
#include "runtime/model/model.h"

namespace keel {

Backend::RecurrentSeqs RankModel::upload_recurrent_seqs(const StepBatch& batch,
                                                        const KvPool& pool) {
  const int64_t num_tokens = static_cast<int64_t>(batch.token_ids.size());
  const int64_t num_seqs = static_cast<int64_t>(batch.state_slots.size());
  const int64_t table_rows =
      batch.max_blocks_per_seq > 0
          ? static_cast<int64_t>(batch.block_tables.size()) / batch.max_blocks_per_seq
          : 0;
  if (num_seqs != table_rows)
    throw_error("rank ", tp_rank_, ": a hybrid model's step needs one recurrent-state slot per ",
                "sequence (", table_rows, " sequences, ", num_seqs, " slots)");
  std::vector<int32_t> row_starts(static_cast<size_t>(num_seqs + 1), -1);
  std::vector<int32_t> fresh(static_cast<size_t>(num_seqs), 0);
  // Rows of one sequence must be contiguous and at consecutive positions: the recurrence
  // consumes them in row order.
  for (int64_t row = 0; row < num_tokens; ++row) {
    const int32_t seq = batch.cache_idx[static_cast<size_t>(row)];
    const bool starts = row == 0 || batch.cache_idx[static_cast<size_t>(row - 1)] != seq;
    if (starts) {
      if (row_starts[static_cast<size_t>(seq)] >= 0)
        throw_error("rank ", tp_rank_, ": sequence row ", seq,
                    " has non-contiguous tokens in the step (a hybrid model needs each "
                    "sequence's tokens together, in position order)");
      row_starts[static_cast<size_t>(seq)] = static_cast<int32_t>(row);
      fresh[static_cast<size_t>(seq)] = batch.positions[static_cast<size_t>(row)] == 0 ? 1 : 0;
    } else if (batch.positions[static_cast<size_t>(row)] !=
               batch.positions[static_cast<size_t>(row - 1)] + 1) {
      throw_error("rank ", tp_rank_, ": sequence row ", seq, " jumps from position ",
                  batch.positions[static_cast<size_t>(row - 1)], " to ",
                  batch.positions[static_cast<size_t>(row)],
                  " (the recurrent state needs consecutive positions)");
    }
  }
  // Sequences must be in row order (sequence s's rows before s + 1's) and none empty.
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int32_t start = row_starts[static_cast<size_t>(seq)];
    if (start < 0 || (seq > 0 && start <= row_starts[static_cast<size_t>(seq - 1)]))
      throw_error("rank ", tp_rank_, ": sequence row ", seq,
                  " has no tokens or is out of row order in a hybrid model's step");
    const int32_t slot = batch.state_slots[static_cast<size_t>(seq)];
    if (slot < 0 || slot >= pool.num_state_slots)
      throw_error("rank ", tp_rank_, ": recurrent-state slot ", slot, " of sequence row ", seq,
                  " is outside the pool of ", pool.num_state_slots, " slots");
    for (int64_t other = 0; other < seq; ++other)
      if (batch.state_slots[static_cast<size_t>(other)] == slot)
        throw_error("rank ", tp_rank_, ": recurrent-state slot ", slot,
                    " is used by two sequences of one step");
  }
  row_starts[static_cast<size_t>(num_seqs)] = static_cast<int32_t>(num_tokens);
  Backend::RecurrentSeqs seqs;
  seqs.row_starts = upload(row_starts, seq_row_starts_);
  seqs.slots = upload(batch.state_slots, seq_slots_);
  seqs.fresh = upload(fresh, seq_fresh_);
  seqs.num_seqs = num_seqs;
  seqs.num_rows = num_tokens;
  return seqs;
}

void RankModel::linear_attention(int64_t layer_idx, int64_t num_tokens,
                                 const Backend::RecurrentSeqs& seqs, KvPool& pool) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t k_dim = config_.linear_key_head_dim;
  const int64_t v_dim = config_.linear_value_head_dim;
  const int64_t num_k = linear_k_heads_local_;
  const int64_t num_v = linear_v_heads_local_;
  const int64_t conv_channels = linear_conv_local_;
  const int64_t value_width = num_v * v_dim;
  const int64_t z_col = conv_channels;
  const int64_t proj_width = z_col + value_width;  // [q | k | v | z]
  const int64_t ba_width = 2 * num_v;              // [b | a]
  const int64_t kernel = config_.linear_conv_kernel;
  KEEL_CHECK(layer.linear_in.rows == proj_width, "rank ", tp_rank_, ": layer ", layer_idx,
             " linear_in has ", layer.linear_in.rows, " rows, expected ", proj_width);
  KEEL_CHECK(layer.linear_ba.rows == ba_width, "rank ", tp_rank_, ": layer ", layer_idx,
             " linear_ba has ", layer.linear_ba.rows, " rows, expected ", ba_width);

  float* proj = scratch(linear_proj_, static_cast<size_t>(num_tokens * (proj_width + ba_width)));
  float* ba = proj + num_tokens * proj_width;
  float* conv_out = scratch(linear_conv_, static_cast<size_t>(num_tokens * conv_channels));
  float* g = scratch(linear_g_, static_cast<size_t>(num_tokens * num_v));
  float* beta = scratch(linear_beta_, static_cast<size_t>(num_tokens * num_v));
  float* core = scratch(linear_core_, static_cast<size_t>(num_tokens * value_width));
  const int64_t slots = pool.num_state_slots;
  float* conv_state =
      pool.conv_state.f32() + layer.cache_layer * slots * conv_channels * (kernel - 1);
  float* ssm_state = pool.ssm_state.f32() + layer.cache_layer * slots * num_v * k_dim * v_dim;

  backend_.matmul(normed_.f32(), layer.linear_in.view(), proj, num_tokens);
  backend_.matmul(normed_.f32(), layer.linear_ba.view(), ba, num_tokens);
  backend_.gdn_conv(proj, proj_width, conv_channels, layer.conv_weight.f32(), kernel, seqs,
                    conv_state, conv_out);
  backend_.gdn_gates(ba, ba_width, /*a_col=*/num_v, /*b_col=*/0, num_v, layer.a_log.f32(),
                     layer.dt_bias.f32(), num_tokens, g, beta);
  // transformers scales q by 1 / sqrt(d_k), a Python double applied to an fp32 tensor.
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k_dim)));
  backend_.gdn_recurrence(conv_out, conv_channels, num_k, num_v, k_dim, v_dim, q_scale, g, beta,
                          seqs, ssm_state, core);
  backend_.gdn_gated_norm(core, proj + z_col, proj_width, layer.linear_norm.f32(),
                          static_cast<float>(config_.rms_norm_eps), num_tokens, num_v, v_dim, core);
  backend_.matmul(core, layer.linear_out.view(), partial_.f32(), num_tokens);
}

}  // namespace keel
