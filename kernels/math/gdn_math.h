// Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention): the arithmetic of its five ops, shared
// by the CPU kernels (kernels/cpu/gdn.cpp) and the CUDA kernels (kernels/cuda/gdn.cu).
//
// Algorithm, per step (runtime/backend/backend.h states each op's formula):
//  1. gdn_conv: causal depthwise conv1d (kernel K, usually 4) + SiLU over the qkv channels. Each
//     output sums its K taps in increasing j, from +0; inputs before the step come from the
//     slot's conv state (the sequence's last K-1 inputs, oldest first), zeros for a fresh
//     sequence.
//  2. gdn_gates: g = (-exp(A_log)) * softplus(a + dt_bias) (log-space decay, <= 0) and
//     beta = sigmoid(b), elementwise.
//  3. gdn_recurrence: per (sequence, value head), rows in order: l2-normalise q and k, decay the
//     state S [DK][DV] by exp(g), kv = S^T kn, d = (v - kv) * beta, S += kn d^T, out = S^T qn.
//     Every sum over i (the DK axis) runs in increasing i from +0; column j of S only ever
//     meets column j of the other terms, so the DV columns are independent.
//  4. gdn_gated_norm: per (row, head) RMSNorm with a plain weight, times silu(z).
//  5. sigmoid_gate_mul: x *= sigmoid(gate) (the gated full-attention output).
//
// Memory layout (fp32 everywhere, device memory of the backend):
//   conv rows     [num_rows][row_stride], channels [0, channels) used
//   conv_state    [num_slots][channels][K-1]             (K-1) * channels * 4 bytes per slot
//   conv weight   [channels][K]
//   qkv           [num_rows][qkv_stride]: q [HK*DK] | k [HK*DK] | v [HV*DV]
//   ssm_state     [num_slots][HV][DK][DV], S[i][j] at i * DV + j   HV * DK * DV * 4 bytes per
//                 slot (Qwen3.5 397B at TP=4: 16 * 128 * 128 * 4 = 1 MiB per layer)
//   g, beta       [num_rows][HV]
//
// Determinism contract: the pieces below fix every rounding; a kernel may parallelise only
// across independent outputs (channels of the conv, value columns j of a (sequence, head), the
// elements of the elementwise ops) and runs each sum sequentially in the order written here.
// The CPU reorders loops, never sums: the recurrence runs i outer, j inner over a row of S,
// which keeps each column's sum in i order while the j loop vectorises. Only + - * /, sqrt and
// exp_math.h, no fma (the builds' -ffp-contract=off / -fmad=false), so both sides get the same
// bits (kernels/math/README.md).
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/exp_math.h"
#include "kernels/math/ops_math.h"
#include "kernels/math/scalar.h"

namespace keel::math {

// The step's sequences as the recurrent kernels see them (arrays in the kernel's memory):
// sequence s owns rows [row_starts[s], row_starts[s + 1]) in position order and state slot
// slots[s]; fresh[s] != 0 means it starts at position 0, from zero state.
struct GdnSequences {
  const int32_t* row_starts = nullptr;  // [num_seqs + 1]
  const int32_t* slots = nullptr;       // [num_seqs]
  const int32_t* fresh = nullptr;       // [num_seqs]
  int64_t num_seqs = 0;
};

// ---------------------------------------------------------------------------------------------
// Causal depthwise conv1d + SiLU.
//
// For one channel c of a sequence whose first row is first_row, the input at local position q
// (q = 0 the sequence's first row in this step, q < 0 the positions before it):
//   q >= 0            rows_c[(first_row + q) * row_stride]     (rows_c = rows + c)
//   -(K-1) <= q < 0   history_c[(K - 1 + q) * history_stride]  (the conv state, oldest first)
//                     or +0 when history_c is null (a fresh sequence)
// The GPU reads the state itself as history (stride 1); the CPU a transposed copy of it
// ([K-1][channels], stride channels), so that its channel loops run over contiguous floats.
KEEL_HD inline float gdn_conv_input(const float* rows_c, int64_t row_stride, int64_t first_row,
                                    const float* history_c, int64_t history_stride, int64_t kernel,
                                    int64_t q) {
  if (q >= 0) return rows_c[(first_row + q) * row_stride];
  if (history_c == nullptr) return 0.0f;
  return history_c[(kernel - 1 + q) * history_stride];
}

// One tap of the conv sum: acc + weight * x (j increasing, from acc = +0).
KEEL_HD inline float gdn_conv_tap(float acc, float weight, float x) {
  return acc + weight * x;
}

KEEL_HD inline float gdn_conv_activate(float acc) {
  return silu_f32(acc);
}

// Output of channel c at local row r: silu(sum_j weight_c[j] * x(r - K + 1 + j)).
KEEL_HD inline float gdn_conv_output(const float* rows_c, int64_t row_stride, int64_t first_row,
                                     const float* history_c, int64_t history_stride,
                                     const float* weight_c, int64_t kernel, int64_t r) {
  float acc = 0.0f;
  for (int64_t j = 0; j < kernel; ++j)
    acc = gdn_conv_tap(acc, weight_c[j],
                       gdn_conv_input(rows_c, row_stride, first_row, history_c, history_stride,
                                      kernel, r - kernel + 1 + j));
  return gdn_conv_activate(acc);
}

// The channel's conv state after a sequence of num_rows rows: the inputs at local positions
// num_rows - (K-1) .. num_rows - 1, oldest first. state_c may be history_c itself (stride 1):
// entry m reads position num_rows - (K-1) + m, which is a row or history entry m + num_rows
// >= m, not yet overwritten when m increases.
KEEL_HD inline void gdn_conv_state_update(const float* rows_c, int64_t row_stride,
                                          int64_t first_row, const float* history_c,
                                          int64_t history_stride, int64_t kernel, int64_t num_rows,
                                          float* state_c) {
  for (int64_t m = 0; m < kernel - 1; ++m)
    state_c[m] = gdn_conv_input(rows_c, row_stride, first_row, history_c, history_stride, kernel,
                                num_rows - (kernel - 1) + m);
}

// ---------------------------------------------------------------------------------------------
// Gates: g = (-exp(a_log)) * softplus(a + dt_bias), beta = sigmoid(b).

KEEL_HD inline float gdn_gate_g(float a, float a_log, float dt_bias) {
  return (-exp_f32(a_log)) * softplus_f32(a + dt_bias);
}

KEEL_HD inline float gdn_gate_beta(float b) {
  return sigmoid_f32(b);
}

// ---------------------------------------------------------------------------------------------
// The gated delta rule.

inline constexpr float kGdnL2NormEps = 1e-6f;

// 1 / sqrt(sum_i x_i^2 + 1e-6), the sum sequential in increasing i from +0.
KEEL_HD inline float gdn_l2_inv_norm(const float* x, int64_t width) {
  float sum_squares = 0.0f;
  for (int64_t i = 0; i < width; ++i) sum_squares += x[i] * x[i];
  return 1.0f / sqrt_f32(sum_squares + kGdnL2NormEps);
}

// qn = (q * inv_norm) * q_scale; kn = k * inv_norm.
KEEL_HD inline float gdn_normalized_q(float q, float inv_norm, float q_scale) {
  return (q * inv_norm) * q_scale;
}

KEEL_HD inline float gdn_normalized_k(float k, float inv_norm) {
  return k * inv_norm;
}

KEEL_HD inline float gdn_decay_factor(float g) {
  return exp_f32(g);
}

// S = exp(g) * S, element by element.
KEEL_HD inline float gdn_decay(float decay, float s) {
  return decay * s;
}

// One step of a sum over i: acc + s * x (kv with x = kn[i], out with x = qn[i]).
KEEL_HD inline float gdn_column_dot_step(float acc, float s, float x) {
  return acc + s * x;
}

// d = (v - kv) * beta
KEEL_HD inline float gdn_delta(float v, float kv, float beta) {
  return (v - kv) * beta;
}

// S[i][j] + kn[i] * d[j]
KEEL_HD inline float gdn_rank_one_update(float s, float kn_i, float d_j) {
  return s + kn_i * d_j;
}

// One row's step on column j of S (the column at s_col[i * col_stride], i < k_dim): decays it,
// applies the delta rule with v_j and returns out[j]. The GPU runs one thread per column; the
// CPU runs the same operations row by row over S (kernels/cpu/gdn.cpp), same bits.
KEEL_HD inline float gdn_recurrence_column(float* s_col, int64_t col_stride, const float* kn,
                                           const float* qn, int64_t k_dim, float decay, float v_j,
                                           float beta) {
  float kv = 0.0f;
  for (int64_t i = 0; i < k_dim; ++i) {
    const float s = gdn_decay(decay, s_col[i * col_stride]);
    s_col[i * col_stride] = s;
    kv = gdn_column_dot_step(kv, s, kn[i]);
  }
  const float d = gdn_delta(v_j, kv, beta);
  float out = 0.0f;
  for (int64_t i = 0; i < k_dim; ++i) {
    const float s = gdn_rank_one_update(s_col[i * col_stride], kn[i], d);
    s_col[i * col_stride] = s;
    out = gdn_column_dot_step(out, s, qn[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Gated RMSNorm (linear_attn.norm): (weight * (x * inv_rms)) * silu(z), inv_rms from
// ops_math.h's rms_sum_squares / rms_inv over the head.

KEEL_HD inline float gdn_gated_norm_element(float x, float weight, float inv_rms, float z) {
  return rms_scale(x, weight, inv_rms) * silu_f32(z);
}

// ---------------------------------------------------------------------------------------------
// Sigmoid output gate of the gated full attention: x * sigmoid(gate).

KEEL_HD inline float gdn_sigmoid_gate(float x, float gate) {
  return x * sigmoid_f32(gate);
}

}  // namespace keel::math
