// The CPU MoE kernels. The pack is the sequential form of the stable counting sort of
// kernels/math/moe_math.h: one pass counts, the shared prefix sum gives offsets, a second pass
// in (token, slot) order places each pair at its expert's cursor. The combine runs slot-outer
// and element-inner (a contiguous, vectorisable row update) but every element sees exactly the
// sequence of math::combine_add_slot / combine_add_shared calls of math::combine_element.
#include "kernels/cpu/moe.h"

#include <algorithm>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qgemm.h"

namespace keel::cpu {

void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
              const int32_t* expert_to_local, int64_t num_experts, int64_t num_local,
              int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows) {
  const int64_t num_pairs = num_tokens * top_k;
  std::fill(offsets, offsets + num_local + 1, 0);
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const int32_t expert = expert_ids[pair];
    KEEL_CHECK(expert >= 0 && expert < num_experts, "expert id ", expert, " out of range [0, ",
               num_experts, ")");
    const int32_t local = math::local_expert_of(expert_to_local, expert);
    if (local >= 0) ++offsets[local + 1];
  }
  math::pack_prefix_sum(offsets, num_local);
  thread_local std::vector<int32_t> cursor;
  cursor.assign(offsets, offsets + num_local);
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const int32_t local = math::local_expert_of(expert_to_local, expert_ids[pair]);
    if (local < 0) {
      slot_rows[pair] = -1;
      continue;
    }
    const int32_t row = cursor[static_cast<size_t>(local)]++;
    routes[row] = math::packed_route_of_pair(pair, top_k);
    slot_rows[pair] = row;
  }
}

void gather_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows, int64_t width,
                 float* dst) {
  for (int64_t row = 0; row < num_rows; ++row)
    std::copy_n(src + int64_t{routes[row].token_idx} * width, width, dst + row * width);
}

void expert_ffn(const float* x, int64_t num_rows, int64_t hidden, int64_t inter,
                const void* gate_up, const void* down, DType weight_dtype, float* mid, float* act,
                float* out, WorkerPool& pool) {
  math::WeightView gate_up_view;
  gate_up_view.dtype = weight_dtype;
  gate_up_view.data = gate_up;
  gate_up_view.rows = 2 * inter;
  gate_up_view.cols = gate_up_view.ld = hidden;
  math::WeightView down_view = gate_up_view;
  down_view.data = down;
  down_view.rows = hidden;
  down_view.cols = down_view.ld = inter;
  expert_ffn_views(x, num_rows, gate_up_view, down_view, mid, act, out, pool);
}

void expert_ffn_views(const float* x, int64_t num_rows, const math::WeightView& gate_up,
                      const math::WeightView& down, float* mid, float* act, float* out,
                      WorkerPool& pool) {
  if (num_rows == 0) return;
  const int64_t inter = down.cols;
  KEEL_CHECK(gate_up.rows == 2 * inter && gate_up.cols == down.rows, "expert_ffn: gate_up ",
             gate_up.rows, "x", gate_up.cols, " and down ", down.rows, "x", down.cols,
             " do not fit");
  matmul(x, gate_up.cols, gate_up, mid, gate_up.rows, num_rows, pool);
  for (int64_t row = 0; row < num_rows; ++row)
    silu_mul(mid + row * 2 * inter, mid + row * 2 * inter + inter, inter, act + row * inter);
  matmul(act, inter, down, out, down.rows, num_rows, pool);
}

void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                 const float* expert_weights, int64_t num_tokens, int64_t top_k,
                 math::CombinePrecisionArgs precision, const float* shared,
                 const float* shared_gate_logits, float* out) {
  for (int64_t token = 0; token < num_tokens; ++token) {
    float* out_row = out + token * width;
    std::fill(out_row, out_row + width, 0.0f);
    for (int64_t slot = 0; slot < top_k; ++slot) {
      const int32_t row = slot_rows[token * top_k + slot];
      if (row < 0) continue;
      const float weight = expert_weights[token * top_k + slot];
      const float* expert_row = expert_out + int64_t{row} * width;
      for (int64_t i = 0; i < width; ++i)
        out_row[i] = math::combine_add_slot(out_row[i], weight, expert_row[i], precision);
    }
    if (shared != nullptr) {
      const float gate = sigmoid(shared_gate_logits[token]);
      const float* shared_row = shared + token * width;
      for (int64_t i = 0; i < width; ++i)
        out_row[i] = math::combine_add_shared(out_row[i], gate, shared_row[i]);
    }
  }
}

}  // namespace keel::cpu
