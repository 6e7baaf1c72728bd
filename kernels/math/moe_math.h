// The MoE block's dispatch and combine: types, layouts and integer/float arithmetic shared by
// kernels/cpu/moe.cpp (the reference) and kernels/cuda/moe.cu.
//
// Dispatch of one MoE layer on one rank, all in the backend's memory (nothing goes to the host):
//   expert_ids [tokens, top_k] (router output)  --pack-->  offsets [num_local + 1],
//   routes [<= tokens * top_k] (PackedRoute), slot_rows [tokens, top_k]
// Pack is a stable counting sort by local expert: count the pairs of each local expert, take
// the exclusive prefix sum (offsets), then place every pair at offsets[e] + (number of earlier
// pairs, in (token, slot) order, of the same expert). Local expert e's rows are therefore
// routes[offsets[e] .. offsets[e + 1]) in increasing token order, whatever else is in the batch;
// slot_rows[t * top_k + s] is the packed row of pair (t, s), or -1 when its expert lives on
// another rank. Each token picks an expert at most once, so an expert has at most `tokens` rows.
// The sort's result is defined by its stability, not by who runs it: the CPU scans in order, the
// GPU computes the same ranks in parallel, and both must give identical arrays.
//
// The combine: a token's output element i is built from +0 by adding, in top-k slot order, each
// slot whose expert is held by this rank: weight[slot] * expert_out[slot][i], rounded to the
// expert dtype first when round_per_expert is on (the knob that mimics frameworks that keep each
// expert's output in bf16); then the gated shared expert, gate * shared[i], always in fp32. The
// order never depends on how tokens were packed per expert, which keeps a token's bits
// independent of its batch. Only *, + and the integer rounding of dtype.h: bit-identical CPU vs
// GPU.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"

namespace keel::math {

// One packed (token, slot) pair: row r of a packing's expert batches holds token
// routes[r].token_idx, which chose the expert in its top-k slot routes[r].slot_idx.
struct PackedRoute {
  int32_t token_idx = 0;
  int32_t slot_idx = 0;
};

// Local index of `expert` on this rank (expert_to_local [num_experts]), -1 when it lives
// elsewhere.
KEEL_HD inline int32_t local_expert_of(const int32_t* expert_to_local, int32_t expert) {
  return expert_to_local[expert];
}

// offsets [num_local + 1] holds each local expert's pair count at [e + 1] (and 0 at [0]); turns
// it into the exclusive prefix sum in place: expert e's rows are [offsets[e], offsets[e + 1]).
KEEL_HD inline void pack_prefix_sum(int32_t* offsets, int64_t num_local) {
  for (int64_t local = 0; local < num_local; ++local) offsets[local + 1] += offsets[local];
}

// The packed route of pair `pair` of a [tokens, top_k] routing.
KEEL_HD inline PackedRoute packed_route_of_pair(int64_t pair, int64_t top_k) {
  return PackedRoute{static_cast<int32_t>(pair / top_k), static_cast<int32_t>(pair % top_k)};
}

struct CombinePrecisionArgs {
  bool round_per_expert = false;
  DType expert_dtype = DType::kF32;  // target of the per-expert rounding
};

// acc + weight * expert_value (rounded to the expert dtype first when asked).
KEEL_HD inline float combine_add_slot(float acc, float weight, float expert_value,
                                      CombinePrecisionArgs precision) {
  const float contribution = weight * expert_value;
  return acc + (precision.round_per_expert ? round_to_dtype(contribution, precision.expert_dtype)
                                           : contribution);
}

KEEL_HD inline float combine_add_shared(float acc, float gate, float shared_value) {
  return acc + gate * shared_value;
}

// Element i of one token's combined output. slot_rows[slot] is the row of `expert_out`
// ([rows, row_stride]) that holds slot's expert output, or -1 when the expert lives on another
// rank. slot_weights are the router weights of the token's top_k slots.
KEEL_HD inline float combine_element(int64_t top_k, const float* slot_weights,
                                     const int32_t* slot_rows, const float* expert_out,
                                     int64_t row_stride, int64_t i,
                                     CombinePrecisionArgs precision) {
  float acc = 0.0f;
  for (int64_t slot = 0; slot < top_k; ++slot) {
    const int32_t row = slot_rows[slot];
    if (row < 0) continue;
    acc = combine_add_slot(acc, slot_weights[slot], expert_out[int64_t{row} * row_stride + i],
                           precision);
  }
  return acc;
}

}  // namespace keel::math
