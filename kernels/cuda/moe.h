// CUDA launchers for the MoE block: router top-k, the device pack (stable counting sort), the
// gather of packed rows, SiLU*mul over packed rows, and the canonical un-permute + combine. Types
// and layouts: kernels/math/moe_math.h; the CPU reference: kernels/cpu/moe.h.
//
// Flow of one MoE layer on the GPU (device pointers throughout, no host round trip):
//   1. router(): logits = gemm_canonical(normed, router weight) (bit-identical to the CPU),
//      then route_top_k() per token -> expert_ids, expert_weights, margins [tokens, top_k].
//   2. moe_pack(): expert_ids -> offsets [num_local + 1], routes, slot_rows; the same arrays as
//      cpu::moe_pack (stability fixes them), computed in one block.
//   3. moe_gather(): expert_in[r] = normed[routes[r].token_idx] for every packed row, the row
//      count read from offsets on the device.
//   4. The experts: gemm_canonical_grouped (gate_up), moe_silu_mul, gemm_canonical_grouped (down).
//   5. moe_combine(): per token, math::combine_element over slots in slot order, then the gated
//      shared expert. Bit-identical to the CPU combine, with or without a shared expert (its
//      gate is math::sigmoid_f32 on both sides) and round_per_expert.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/moe_math.h"

namespace keel::cuda {

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

// The stable counting sort of kernels/math/moe_math.h in one block: expert_ids [num_tokens,
// top_k], expert_to_local [num_experts] -> offsets [num_local + 1], routes (capacity num_tokens *
// top_k), slot_rows [num_tokens * top_k]. Identical arrays to cpu::moe_pack. Expert ids must be
// in range (the router's output or a replay checked on the host).
void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
              const int32_t* expert_to_local, int64_t num_local, int32_t* offsets,
              math::PackedRoute* routes, int32_t* slot_rows, cudaStream_t stream = nullptr);

// expert_in[r, :] = x[routes[r].token_idx, :] for r in [offsets[0], offsets[num_groups]) (read on
// the device; at most max_rows rows). x rows at stride x_stride, expert_in dense [rows, width]
// indexed by the packed row. A copy: bit-identical.
// out[r, :] = x[routes[r].token_idx, :] for r in [0, num_rows) (a host-known row selection, e.g.
// the rows whose logits a step wants). A copy: bit-identical.
void gather_rows(const float* x, int64_t x_stride, int64_t width, const math::PackedRoute* routes,
                 int64_t num_rows, float* out, cudaStream_t stream = nullptr);

void moe_gather(const float* x, int64_t x_stride, int64_t width, const math::PackedRoute* routes,
                const int32_t* offsets, int64_t num_groups, int64_t max_rows, float* expert_in,
                cudaStream_t stream = nullptr);

// act[r, i] = silu(mid[r, i]) * mid[r, width + i] for packed rows r in [offsets[0],
// offsets[num_groups]) (at most max_rows); mid [rows, 2 * width], act [rows, width].
void moe_silu_mul(const float* mid, const int32_t* offsets, int64_t num_groups, int64_t max_rows,
                  int64_t width, float* act, cudaStream_t stream = nullptr);

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
