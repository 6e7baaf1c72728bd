// The canonical MoE combine, shared by the CPU forward pass and kernels/cuda/moe.cu.
//
// A token's output element i is built from +0 by adding, in top-k slot order, each slot whose
// expert is held by this rank: weight[slot] * expert_out[slot][i], rounded to the expert dtype
// first when round_per_expert is on (the knob that mimics frameworks that keep each expert's
// output in bf16); then the gated shared expert, gate * shared[i], always in fp32. The order
// never depends on how tokens were packed per expert, which keeps a token's bits independent
// of its batch. Only *, + and the integer rounding of dtype.h: bit-identical CPU vs GPU.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"

namespace keel::math {

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
