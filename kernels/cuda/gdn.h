// CUDA launchers of the Gated DeltaNet ops: conv1d + SiLU, the gates, the gated delta rule, the
// gated RMSNorm and the sigmoid output gate. Formulas, layouts and summation orders:
// kernels/math/gdn_math.h (the functions kernels/cpu/gdn.cpp calls too) and the Backend ops in
// runtime/backend/backend.h. Every launcher is bit-identical to its kernels/cpu/gdn.h twin.
//
// All pointers are device pointers, `seqs` included (its arrays live on the device; num_seqs is
// the host's). Each launcher checks its shapes (throwing keel::Error), enqueues on `stream` and
// checks the launch. C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/math/gdn_math.h"

namespace keel::cuda {

// One thread per (sequence, channel), walking the sequence's rows in order, then writing the
// channel's conv state (conv_state [num_slots][channels][kernel - 1]). out [num_rows][channels].
void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
              int64_t kernel, const math::GdnSequences& seqs, float* conv_state, float* out,
              cudaStream_t stream = nullptr);

// One thread per (row, head): g, beta [num_rows][num_heads].
void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
               int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
               float* g, float* beta, cudaStream_t stream = nullptr);

// One block per (sequence, value head), rows in order: two threads compute the l2 norms of q and
// k (sequential sums), the block normalises them into shared memory, then one thread per value
// column j runs math::gdn_recurrence_column on column j of the head's state in place.
// ssm_state [num_slots][HV][DK][DV]; out [num_rows][HV * DV].
void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads, int64_t num_v_heads,
                    int64_t k_dim, int64_t v_dim, float q_scale, const float* g, const float* beta,
                    const math::GdnSequences& seqs, float* ssm_state, float* out,
                    cudaStream_t stream = nullptr);

// One block per (row, head): thread 0 sums the squares, then the block scales. out may alias x.
void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                    float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim, float* out,
                    cudaStream_t stream = nullptr);

// x[t*width + i] *= sigmoid(gate[t*gate_stride + i]); grid-stride over elements.
void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                      int64_t gate_stride, cudaStream_t stream = nullptr);

}  // namespace keel::cuda
