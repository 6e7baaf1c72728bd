// CPU kernels of the MoE block (the reference for kernels/cuda/moe.cu): the stable counting-sort
// pack, the gather of packed rows, one expert's FFN over its rows, and the canonical combine.
// Types and layouts: kernels/math/moe_math.h. Activations fp32 row-major; expert weights
// row-major [out, in] in their storage dtype.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/cpu/worker_pool.h"
#include "kernels/math/moe_math.h"
#include "kernels/math/quant_math.h"

namespace keel::cpu {

// Packs expert_ids [num_tokens, top_k] for the num_local experts of this rank (expert_to_local
// [num_experts]): writes offsets [num_local + 1], routes [offsets[num_local]] and slot_rows
// [num_tokens * top_k]. Throws keel::Error on an expert id outside [0, num_experts).
void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
              const int32_t* expert_to_local, int64_t num_experts, int64_t num_local,
              int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows);

// dst[r, :] = src[routes[r].token_idx, :] for r in [0, num_rows) (src rows at stride `width`).
void gather_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows, int64_t width,
                 float* dst);

// One expert's FFN over `num_rows` packed rows: mid = x * gate_up^T ([rows, 2 * inter], gate
// columns then up columns), act = silu(gate) * up ([rows, inter]), out = act * down^T
// ([rows, hidden]). Canonical GEMMs, so each row's bits are its own; both GEMMs split their
// output rows over `pool` (kernels/cpu/qgemm.h), which changes no bits.
void expert_ffn(const float* x, int64_t num_rows, int64_t hidden, int64_t inter,
                const void* gate_up, const void* down, DType weight_dtype, float* mid, float* act,
                float* out, WorkerPool& pool);

// expert_ffn with weights in any format (dense or quantized views, kernels/cpu/qgemm.h).
void expert_ffn_views(const float* x, int64_t num_rows, const math::WeightView& gate_up,
                      const math::WeightView& down, float* mid, float* act, float* out,
                      WorkerPool& pool);

// out[t, :] = math combine of token t's local slots (slot order), then + sigmoid(gate_logit[t])
// * shared[t, :] when `shared` is non-null. out [num_tokens, width].
void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                 const float* expert_weights, int64_t num_tokens, int64_t top_k,
                 math::CombinePrecisionArgs precision, const float* shared,
                 const float* shared_gate_logits, float* out);

}  // namespace keel::cpu
