// CPU kernels of the Gated DeltaNet layer (the bit-exact reference): conv1d + SiLU, the gates,
// the gated delta rule, the gated RMSNorm and the sigmoid output gate. Formulas, layouts and
// summation orders: kernels/math/gdn_math.h and the Backend ops in runtime/backend/backend.h.
// All pointers are host memory; `seqs` holds host arrays.
#pragma once

#include <cstdint>

#include "kernels/math/gdn_math.h"

namespace keel::cpu {

// out [num_rows][channels] = silu(causal depthwise conv of rows' channels [0, channels));
// conv_state [num_slots][channels][kernel - 1] is read (unless fresh) and left holding each
// sequence's last kernel - 1 inputs. out must not overlap rows or conv_state.
void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
              int64_t kernel, const math::GdnSequences& seqs, float* conv_state, float* out);

// g, beta [num_rows][num_heads] from columns a_col.., b_col.. of rows.
void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
               int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
               float* g, float* beta);

// The gated delta rule over each sequence's rows; ssm_state [num_slots][HV][DK][DV].
// out [num_rows][HV * DV] must not overlap qkv or the state.
void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads, int64_t num_v_heads,
                    int64_t k_dim, int64_t v_dim, float q_scale, const float* g, const float* beta,
                    const math::GdnSequences& seqs, float* ssm_state, float* out);

// out[t, h*D + i] = (weight[i] * (x * inv_rms(t, h))) * silu(z[t*z_stride + h*D + i]); x rows
// dense [num_rows][num_heads * head_dim]; out may alias x.
void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                    float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim, float* out);

// x[t*width + i] *= sigmoid(gate[t*gate_stride + i])
void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                      int64_t gate_stride);

}  // namespace keel::cpu
