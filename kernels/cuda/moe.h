// CUDA launchers for the MoE block: router top-k, permutation of token rows into per-expert
// batches, and the canonical un-permute + combine.
//
// Flow of one MoE layer on the GPU (device pointers throughout):
//   1. router(): logits = gemm_canonical(normed, router weight) (bit-identical to the CPU),
//      then route_top_k() per token -> expert_ids, expert_weights, margins [tokens, top_k].
//   2. Counting sort into per-expert batches: ON THE HOST for now. The engine copies
//      expert_ids back and runs scheduler's pack_routes (a stable counting sort, O(tokens * k));
//      its routes (keel::PackedRoute, same layout as DeviceRoute) and offsets go back up. This
//      costs one small device-to-host copy and sync per MoE layer; a device counting sort can
//      replace it without changing any result, since the packing order is fixed by the sort's
//      stability, not by who runs it.
//   3. moe_permute(): expert_in[r] = normed[routes[r].token_idx] for all packed rows (local
//      experts back to back, in local-expert order: expert e's rows are
//      [offsets[e], offsets[e+1])). Each expert then runs its GEMMs on its row range.
//   4. moe_slot_rows(): slot_rows[t * top_k + s] = packed row of (t, s), or -1 when that
//      slot's expert is not on this rank.
//   5. moe_combine(): per token, math::combine_element over slots in slot order, then the
//      gated shared expert. Bit-identical to the CPU combine, with or without a shared expert
//      (its gate is math::sigmoid_f32 on both sides) and round_per_expert.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/moe_math.h"

namespace keel::cuda {

// One packed (token, slot) pair; the layout of keel::PackedRoute (scheduler/packing.h), so the
// host packing uploads as is.
struct DeviceRoute {
  int32_t token_idx = 0;
  int32_t slot_idx = 0;
};

// forced_ids (device, [tokens, top_k], nullable): router replay, see math::route_top_k_token.
// Per token t: math::route_top_k_token on logits[t, :] (one thread per token; E and k are small).
// probs_scratch: [num_tokens, num_experts]; outputs [num_tokens, top_k] and margins[num_tokens].
// Same operations as cpu::route_top_k, exps included (math::exp_f32): probabilities, selection,
// weights and margins are bit-identical to the CPU's.
void route_top_k(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                 bool normalize, float* probs_scratch, int32_t* expert_ids, float* expert_weights,
                 float* margins, cudaStream_t stream = nullptr,
                 const int32_t* forced_ids = nullptr);

// The router: logits [num_tokens, num_experts] = x [num_tokens, hidden] (row stride hidden) times
// the router weight [num_experts, hidden] in `w_dtype` through gemm_canonical, then route_top_k.
void router(const float* x, int64_t num_tokens, int64_t hidden, const void* router_weight,
            DType w_dtype, int64_t num_experts, int64_t top_k, bool normalize, float* logits,
            float* probs_scratch, int32_t* expert_ids, float* expert_weights, float* margins,
            cudaStream_t stream = nullptr);

// expert_in[r, :] = x[routes[r].token_idx, :] for r in [0, num_rows); x rows at stride x_stride,
// expert_in dense [num_rows, hidden]. A copy: bit-identical.
void moe_permute(const float* x, int64_t x_stride, int64_t hidden, const DeviceRoute* routes,
                 int64_t num_rows, float* expert_in, cudaStream_t stream = nullptr);

// slot_rows [num_tokens * top_k] = -1, then slot_rows[routes[r].token_idx * top_k +
// routes[r].slot_idx] = r. Routes outside [0, num_tokens) x [0, top_k) are ignored.
void moe_slot_rows(const DeviceRoute* routes, int64_t num_rows, int64_t num_tokens, int64_t top_k,
                   int32_t* slot_rows, cudaStream_t stream = nullptr);

// Optional shared expert: out [num_tokens, hidden] and the logits of its sigmoid gate
// [num_tokens] (the [1, H] shared_gate GEMM). Both null when the model has none.
struct SharedExpertOutput {
  const float* out = nullptr;
  const float* gate_logits = nullptr;
};

// out[t, i] = math::combine_element(slot_weights of t, slot_rows of t, expert_out, i) then
// + sigmoid(gate_logits[t]) * shared.out[t, i]. expert_out: packed rows [rows, hidden];
// route_weights [num_tokens, top_k]; out dense [num_tokens, hidden].
void moe_combine(const float* expert_out, int64_t hidden, const int32_t* slot_rows,
                 const float* route_weights, int64_t num_tokens, int64_t top_k,
                 math::CombinePrecisionArgs precision, SharedExpertOutput shared, float* out,
                 cudaStream_t stream = nullptr);

}  // namespace keel::cuda
