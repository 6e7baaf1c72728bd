// CPU reference of the Gated DeltaNet ops. The arithmetic is kernels/math/gdn_math.h, the
// functions the CUDA kernels call; this file only orders the loops so that they vectorise.
// Loop interchanges never reorder a sum: every output's sum still runs over its own terms in
// the order gdn_math.h fixes, so the bits equal the GPU's one-thread-per-output kernels.
//  - conv: rows outer, then taps j, then channels c innermost (one accumulator per channel);
//    the conv state is transposed into a [K-1][channels] history and the weight into
//    [K][channels], so that the channel loop reads contiguous floats.
//  - recurrence: per (sequence, value head), rows in order; within a row i outer, j inner over
//    a row of S, with one kv / out accumulator per column j.
#include "kernels/cpu/gdn.h"

#include <algorithm>
#include <vector>

#include "kernels/math/ops_math.h"

// As in kernels/cpu/ops.cpp: AVX2 / AVX-512 clones of the vectorisable loops, chosen when the
// program loads; each clone runs the same IEEE operations per element (no fma), so the bits do
// not depend on which one runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KEEL_GDN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KEEL_GDN_VECTOR_CLONES
#endif

namespace keel::cpu {

namespace {

size_t to_size(int64_t value) {
  return static_cast<size_t>(value);
}

// acc[c] = acc[c] + weight_j[c] * inputs[c] for every channel: one tap of the conv.
KEEL_GDN_VECTOR_CLONES void conv_tap_channels(float* __restrict__ acc,
                                              const float* __restrict__ weight_j,
                                              const float* __restrict__ inputs, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c)
    acc[c] = math::gdn_conv_tap(acc[c], weight_j[c], inputs[c]);
}

KEEL_GDN_VECTOR_CLONES void conv_activate_channels(const float* __restrict__ acc, int64_t channels,
                                                   float* __restrict__ out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = math::gdn_conv_activate(acc[c]);
}

// One row's step on the whole state S [k_dim][v_dim] of a (sequence, value head): the
// operations of math::gdn_recurrence_column for every column j at once, row i of S at a time.
// kv_scratch holds v_dim floats.
KEEL_GDN_VECTOR_CLONES void recurrence_step(float* __restrict__ state, int64_t k_dim, int64_t v_dim,
                                            const float* __restrict__ kn,
                                            const float* __restrict__ qn, float decay,
                                            const float* __restrict__ v, float beta,
                                            float* __restrict__ kv_scratch,
                                            float* __restrict__ out) {
  float* kv = kv_scratch;
  for (int64_t j = 0; j < v_dim; ++j) kv[j] = 0.0f;
  for (int64_t i = 0; i < k_dim; ++i) {
    float* s_row = state + i * v_dim;
    const float kn_i = kn[i];
    for (int64_t j = 0; j < v_dim; ++j) {
      const float s = math::gdn_decay(decay, s_row[j]);
      s_row[j] = s;
      kv[j] = math::gdn_column_dot_step(kv[j], s, kn_i);
    }
  }
  float* d = kv_scratch;  // d[j] needs only kv[j]
  for (int64_t j = 0; j < v_dim; ++j) d[j] = math::gdn_delta(v[j], kv[j], beta);
  for (int64_t j = 0; j < v_dim; ++j) out[j] = 0.0f;
  for (int64_t i = 0; i < k_dim; ++i) {
    float* s_row = state + i * v_dim;
    const float kn_i = kn[i];
    const float qn_i = qn[i];
    for (int64_t j = 0; j < v_dim; ++j) {
      const float s = math::gdn_rank_one_update(s_row[j], kn_i, d[j]);
      s_row[j] = s;
      out[j] = math::gdn_column_dot_step(out[j], s, qn_i);
    }
  }
}

KEEL_GDN_VECTOR_CLONES void gated_norm_head(const float* x, const float* __restrict__ z,
                                            const float* __restrict__ weight, float inv_rms,
                                            int64_t head_dim, float* out) {
  // out may alias x: element i reads x[i] before writing out[i].
  for (int64_t i = 0; i < head_dim; ++i)
    out[i] = math::gdn_gated_norm_element(x[i], weight[i], inv_rms, z[i]);
}

KEEL_GDN_VECTOR_CLONES void sigmoid_gate_row(float* __restrict__ x, const float* __restrict__ gate,
                                             int64_t width) {
  for (int64_t i = 0; i < width; ++i) x[i] = math::gdn_sigmoid_gate(x[i], gate[i]);
}

}  // namespace

void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
              int64_t kernel, const math::GdnSequences& seqs, float* conv_state, float* out) {
  const int64_t history_len = kernel - 1;
  std::vector<float> weight_by_tap(to_size(kernel * channels));
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t j = 0; j < kernel; ++j)
      weight_by_tap[to_size(j * channels + c)] = weight[c * kernel + j];
  std::vector<float> history(to_size(history_len * channels));
  std::vector<float> acc(to_size(channels));
  for (int64_t seq = 0; seq < seqs.num_seqs; ++seq) {
    const int64_t first_row = seqs.row_starts[seq];
    const int64_t num_rows = seqs.row_starts[seq + 1] - first_row;
    float* state = conv_state + int64_t{seqs.slots[seq]} * channels * history_len;
    if (seqs.fresh[seq] != 0) {
      std::fill(history.begin(), history.end(), 0.0f);
    } else {
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t m = 0; m < history_len; ++m)
          history[to_size(m * channels + c)] = state[c * history_len + m];
    }
    for (int64_t r = 0; r < num_rows; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < kernel; ++j) {
        const int64_t q = r - kernel + 1 + j;
        const float* inputs = q >= 0 ? rows + (first_row + q) * row_stride
                                     : history.data() + (history_len + q) * channels;
        conv_tap_channels(acc.data(), weight_by_tap.data() + j * channels, inputs, channels);
      }
      conv_activate_channels(acc.data(), channels, out + (first_row + r) * channels);
    }
    for (int64_t c = 0; c < channels; ++c)
      math::gdn_conv_state_update(rows + c, row_stride, first_row, history.data() + c, channels,
                                  kernel, num_rows, state + c * history_len);
  }
}

void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
               int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
               float* g, float* beta) {
  for (int64_t t = 0; t < num_rows; ++t) {
    const float* row = rows + t * row_stride;
    for (int64_t h = 0; h < num_heads; ++h) {
      g[t * num_heads + h] = math::gdn_gate_g(row[a_col + h], a_log[h], dt_bias[h]);
      beta[t * num_heads + h] = math::gdn_gate_beta(row[b_col + h]);
    }
  }
}

void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads, int64_t num_v_heads,
                    int64_t k_dim, int64_t v_dim, float q_scale, const float* g, const float* beta,
                    const math::GdnSequences& seqs, float* ssm_state, float* out) {
  const int64_t v_heads_per_k_head = num_v_heads / num_k_heads;
  const int64_t k_offset = num_k_heads * k_dim;
  const int64_t v_offset = 2 * num_k_heads * k_dim;
  const int64_t head_state = k_dim * v_dim;
  const int64_t out_stride = num_v_heads * v_dim;
  std::vector<float> qn(to_size(k_dim)), kn(to_size(k_dim)), kv(to_size(v_dim));
  for (int64_t seq = 0; seq < seqs.num_seqs; ++seq) {
    const int64_t first_row = seqs.row_starts[seq];
    const int64_t end_row = seqs.row_starts[seq + 1];
    float* slot_state = ssm_state + int64_t{seqs.slots[seq]} * num_v_heads * head_state;
    if (seqs.fresh[seq] != 0) std::fill_n(slot_state, num_v_heads * head_state, 0.0f);
    for (int64_t h = 0; h < num_v_heads; ++h) {
      float* state = slot_state + h * head_state;
      const int64_t k_head = h / v_heads_per_k_head;
      for (int64_t t = first_row; t < end_row; ++t) {
        const float* row = qkv + t * qkv_stride;
        const float* q = row + k_head * k_dim;
        const float* k = row + k_offset + k_head * k_dim;
        const float inv_q = math::gdn_l2_inv_norm(q, k_dim);
        const float inv_k = math::gdn_l2_inv_norm(k, k_dim);
        for (int64_t i = 0; i < k_dim; ++i) {
          qn[to_size(i)] = math::gdn_normalized_q(q[i], inv_q, q_scale);
          kn[to_size(i)] = math::gdn_normalized_k(k[i], inv_k);
        }
        recurrence_step(state, k_dim, v_dim, kn.data(), qn.data(),
                        math::gdn_decay_factor(g[t * num_v_heads + h]), row + v_offset + h * v_dim,
                        beta[t * num_v_heads + h], kv.data(), out + t * out_stride + h * v_dim);
      }
    }
  }
}

void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                    float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim, float* out) {
  const int64_t width = num_heads * head_dim;
  for (int64_t t = 0; t < num_rows; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t offset = t * width + h * head_dim;
      const float inv_rms =
          math::rms_inv(math::rms_sum_squares(x + offset, head_dim), head_dim, eps);
      gated_norm_head(x + offset, z + t * z_stride + h * head_dim, weight, inv_rms, head_dim,
                      out + offset);
    }
  }
}

void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                      int64_t gate_stride) {
  for (int64_t t = 0; t < num_rows; ++t)
    sigmoid_gate_row(x + t * width, gate + t * gate_stride, width);
}

}  // namespace keel::cpu
