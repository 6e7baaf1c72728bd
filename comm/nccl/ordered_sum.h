// The fixed-order sum, written once for the GPU kernel and for the CPU.
//
// Algorithm. Element i of a fixed_order all-reduce is
//     ((p0[i] + p1[i]) + p2[i]) + ... + p{N-1}[i]
// in fp32, rank order, one IEEE round-to-nearest add at a time -- exactly what the host
// backends' kFixedOrder computes (comm/rank_order_sum.h, used by thread_comm and mpi_comm).
// The NCCL backend gathers every rank's partials on the device and evaluates this function per
// element in a CUDA kernel; tests/test_ordered_sum.cpp evaluates the same function on the CPU
// and proves it bit-identical to ThreadGroup's fixed_order. Keeping one definition is what
// makes "CPU bits == GPU bits" a property of this file rather than of two copies kept in sync.
//
// Memory layout. `partials` holds N rows of `stride` floats: rank r's partial of element i is
// partials[r * stride + i]. The all-gather path uses stride = count (N * count * 4 bytes, the
// ncclAllGather output); the reduce-scatter path uses stride = the padded chunk length.
//
// Why the bits match (ordering argument).
//  - The sum starts from p0 itself, not from 0.0f + p0: (+0) + (-0) = +0 would change the sign
//    of an all-negative-zero sum, and with one rank the result must be p0 unchanged, as the
//    thread backend (which does nothing for one rank) leaves it.
//  - Each step is one fp32 add whose operands are fixed by the loop; nothing is reassociated.
//    Host code is compiled with -ffp-contract=off and the kernel with -fmad=false (there are no
//    multiplies, but it keeps any future edit honest). nvcc's defaults keep fp32 adds IEEE:
//    no -ftz (denormals preserved), no --use_fast_math.
//  - x86 SSE/AVX and NVIDIA GPUs both implement fp32 add as IEEE-754 round-to-nearest-even with
//    gradual underflow, so every intermediate is the same float on both.
//  - Not covered: NaN payloads. A sum with a NaN partial (or +inf + -inf) is NaN on both sides,
//    but x86 propagates an operand's payload while the GPU returns the canonical NaN.
//
// Plain C++17 with no CUDA headers: CPU translation units include it too.
#pragma once

#include <cstddef>

#include "kernels/base/dtype.h"

namespace keel::comm {

// ((p0 + p1) + p2) + ... of element `index`, where rank r's partial is
// partials[r * stride + index]. num_ranks >= 1.
KEEL_HD inline float ordered_sum_element(const float* partials, size_t stride, int num_ranks,
                                         size_t index) {
  float sum = partials[index];
  for (int source_rank = 1; source_rank < num_ranks; ++source_rank) {
    // One rounded add per step, in rank order; the explicit form keeps it visibly unfused.
    const float addend = partials[static_cast<size_t>(source_rank) * stride + index];
    sum = sum + addend;
  }
  return sum;
}

// out[i] = ordered_sum_element(partials, stride, num_ranks, i) for i = first, first + step,
// ... < count. The CUDA kernel is this loop with first = its global thread index and step = the
// grid's thread count (a grid-stride loop); the CPU test runs it with several (first, step)
// splits to show that any grid covers every element exactly once. `out` must not overlap
// `partials` (the kernel declares both __restrict__).
KEEL_HD inline void ordered_sum_strided(const float* partials, size_t stride, int num_ranks,
                                        size_t count, size_t first, size_t step, float* out) {
  for (size_t index = first; index < count; index += step) {
    out[index] = ordered_sum_element(partials, stride, num_ranks, index);
  }
}

}  // namespace keel::comm
