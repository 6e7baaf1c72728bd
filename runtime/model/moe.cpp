// The MLP block of one layer: a dense MLP shard, or the MoE block (replicated router into the
// step's routing slabs, device pack and gather, the local experts' FFNs, the shared expert and
// the canonical combine into the partial sum). Nothing here copies to the host.
#include "kernels/base/check.h"
#include "runtime/model/model.h"
#include "runtime/model/timed.h"

namespace keel {

void RankModel::dense_mlp(const ExpertWeights& weights, int64_t width, int64_t num_tokens,
                          float* out) {
  float* mid = scratch(expert_mid_, static_cast<size_t>(num_tokens * 2 * width));
  float* act = scratch(expert_act_, static_cast<size_t>(num_tokens * width));
  backend_.matmul(normed_.f32(), weights.gate_up.view(), mid, num_tokens);
  backend_.silu_mul(mid, num_tokens, width, act);
  backend_.matmul(act, weights.down.view(), out, num_tokens);
}

void RankModel::moe(int64_t layer_idx, int64_t moe_idx, int64_t num_tokens,
                    const int32_t* forced_routes) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t hidden = config_.hidden_size;
  const int64_t num_experts = config_.num_experts;
  const int64_t top_k = config_.top_k;
  const int64_t inter = config_.moe_intermediate_size;
  const int64_t num_local = static_cast<int64_t>(layer.experts.size());
  const size_t num_pairs = static_cast<size_t>(num_tokens * top_k);
  const size_t slab_pairs = static_cast<size_t>(num_moe_layers_) * num_pairs;

  // Router: replicated, and its input rows are all-reduced bits, so every rank picks the same.
  // Its choices go into this layer's slice of the step's routing slabs, on the device.
  float* router_logits = scratch(router_logits_, static_cast<size_t>(num_tokens * num_experts));
  int32_t* route_ids = scratch_i32(route_ids_, slab_pairs) + moe_idx * num_pairs;
  float* route_weights = scratch(route_weights_, slab_pairs) + moe_idx * num_pairs;
  float* margins = scratch(route_margins_, static_cast<size_t>(num_moe_layers_ * num_tokens)) +
                   moe_idx * num_tokens;
  timed(Phase::kRouter, layer_idx, [&] {
    backend_.matmul(normed_.f32(), layer.router.view(), router_logits, num_tokens);
    backend_.route_top_k(router_logits, num_tokens, num_experts, top_k, config_.norm_topk_prob,
                         route_ids, route_weights, margins, forced_routes);
  });

  // Pack this rank's (token, slot) pairs per local expert on the device, gather their rows, then
  // every local expert runs once over its contiguous row range: gate_up, silu*mul, down.
  Backend::MoeDispatch dispatch;
  dispatch.num_local = num_local;
  dispatch.num_tokens = num_tokens;
  dispatch.top_k = top_k;
  const int64_t max_rows = dispatch.max_rows();
  float* expert_in = scratch(expert_in_, static_cast<size_t>(max_rows * hidden));
  timed(Phase::kPack, layer_idx, [&] {
    int32_t* offsets = scratch_i32(pack_offsets_, static_cast<size_t>(num_local + 1));
    auto* routes = reinterpret_cast<math::PackedRoute*>(scratch_i32(packed_routes_, 2 * num_pairs));
    int32_t* slot_rows = scratch_i32(slot_rows_, num_pairs);
    backend_.moe_pack(route_ids, num_tokens, top_k, layer.expert_to_local.i32(), num_experts,
                      num_local, offsets, routes, slot_rows);
    dispatch.offsets = offsets;
    dispatch.routes = routes;
    dispatch.slot_rows = slot_rows;
    backend_.moe_gather(normed_.f32(), hidden, dispatch, expert_in);
  });
  float* mid = scratch(expert_mid_, static_cast<size_t>(max_rows * 2 * inter));
  float* act = scratch(expert_act_, static_cast<size_t>(max_rows * inter));
  float* expert_out = scratch(expert_out_, static_cast<size_t>(max_rows * hidden));
  Backend::ExpertTable table;
  table.gate_up = static_cast<const void* const*>(layer.gate_up_table.data());
  table.down = static_cast<const void* const*>(layer.down_table.data());
  table.dtype = num_local > 0 ? layer.experts.front().gate_up.dtype() : expert_dtype_;
  table.hidden = hidden;
  table.inter = inter;
  if (!layer.gate_up_views.empty()) {
    table.gate_up_views = static_cast<const math::WeightView*>(layer.gate_up_views.data());
    table.down_views = static_cast<const math::WeightView*>(layer.down_views.data());
  }
  if (observe_) {
    host_expert_seconds_.assign(static_cast<size_t>(num_local), 0.0);
    host_expert_starts_.assign(static_cast<size_t>(num_local), 0.0);
    const Backend::ExpertTimes times{host_expert_seconds_.data(), host_expert_starts_.data()};
    backend_.moe_experts(expert_in, dispatch, table, mid, act, expert_out, &times);
    for (int64_t local = 0; local < num_local; ++local) {
      const double seconds = host_expert_seconds_[static_cast<size_t>(local)];
      if (seconds == 0.0) continue;
      const int32_t expert_id = layer.local_expert_ids[static_cast<size_t>(local)];
      observation_.expert_seconds[static_cast<size_t>(layer_idx * num_experts + expert_id)] +=
          static_cast<float>(seconds);
      observation_.phase_seconds[static_cast<size_t>(Phase::kExperts)] += seconds;
      if (trace_)
        observation_.trace.push_back({Phase::kExperts, static_cast<int32_t>(layer_idx), expert_id,
                                      host_expert_starts_[static_cast<size_t>(local)], seconds});
    }
  } else {
    backend_.moe_experts(expert_in, dispatch, table, mid, act, expert_out, nullptr);
  }

  timed(Phase::kCombine, layer_idx, [&] {
    const float* shared = nullptr;
    const float* shared_gate_logits = nullptr;
    if (config_.shared_expert_intermediate_size > 0) {
      float* shared_out = scratch(shared_out_, static_cast<size_t>(num_tokens * hidden));
      dense_mlp(layer.shared, layer.shared_width, num_tokens, shared_out);
      float* gate_logits = scratch(shared_gate_logits_, static_cast<size_t>(num_tokens));
      backend_.matmul(normed_.f32(), layer.shared_gate.view(), gate_logits, num_tokens);
      shared = shared_out;
      shared_gate_logits = gate_logits;
    }
    // Canonical combine: per token, local experts in slot order, then the gated shared expert.
    DType round_dtype =
        options_.combine == CombinePrecision::kRoundPerExpert ? expert_dtype_ : DType::kF32;
    backend_.moe_combine(expert_out, hidden, dispatch.slot_rows, route_weights, num_tokens, top_k,
                         round_dtype, shared, shared_gate_logits, partial_.f32());
  });
}

}  // namespace keel
