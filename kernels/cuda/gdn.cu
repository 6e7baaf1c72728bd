// Gated DeltaNet kernels. Parallel only across independent outputs, every sum sequential in the
// order of kernels/math/gdn_math.h, so the bits equal kernels/cpu/gdn.cpp's:
//  - gdn_conv: one thread per (sequence, channel); threads of a warp take consecutive channels,
//    so their row reads coalesce. The state is read as the history (stride 1) and then
//    overwritten in place (math::gdn_conv_state_update says why that is safe).
//  - gdn_gates, sigmoid_gate_mul: grid-stride over elements.
//  - gdn_recurrence: one block per (sequence, value head), the head's state [DK][DV] updated in
//    place in global memory; thread j owns columns j, j + blockDim, ... (consecutive threads read
//    consecutive floats of a row of S). qn and kn live in shared memory (2 * DK floats).
//    Decode-sized work: a (sequence, head) is one block whatever the sequence length.
//  - gdn_gated_norm: one block per (row, head), as the RMSNorm kernel of ops.cu.
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gdn.h"
#include "kernels/cuda/launch.h"
#include "kernels/math/gdn_math.h"
#include "kernels/math/ops_math.h"

namespace keel::cuda {

namespace {

using detail::grid_for;
using detail::grid_for_rows;
using detail::kThreadsPerBlock;
using detail::require;

__global__ void gdn_conv_kernel(const float* rows, int64_t row_stride, int64_t channels,
                                const float* weight, int64_t kernel, math::GdnSequences seqs,
                                float* conv_state, float* out) {
  const int64_t total = seqs.num_seqs * channels;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t seq = index / channels;
    const int64_t c = index % channels;
    const int64_t first_row = seqs.row_starts[seq];
    const int64_t num_rows = seqs.row_starts[seq + 1] - first_row;
    float* state_c = conv_state + (int64_t{seqs.slots[seq]} * channels + c) * (kernel - 1);
    const float* history_c = seqs.fresh[seq] != 0 ? nullptr : state_c;
    for (int64_t r = 0; r < num_rows; ++r)
      out[(first_row + r) * channels + c] = math::gdn_conv_output(
          rows + c, row_stride, first_row, history_c, 1, weight + c * kernel, kernel, r);
    math::gdn_conv_state_update(rows + c, row_stride, first_row, history_c, 1, kernel, num_rows,
                                state_c);
  }
}

__global__ void gdn_gates_kernel(const float* rows, int64_t row_stride, int64_t a_col,
                                 int64_t b_col, int64_t num_heads, const float* a_log,
                                 const float* dt_bias, int64_t num_rows, float* g, float* beta) {
  const int64_t total = num_rows * num_heads;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = index / num_heads;
    const int64_t h = index % num_heads;
    const float* row = rows + t * row_stride;
    g[index] = math::gdn_gate_g(row[a_col + h], a_log[h], dt_bias[h]);
    beta[index] = math::gdn_gate_beta(row[b_col + h]);
  }
}

struct RecurrenceShape {
  int64_t qkv_stride = 0;
  int64_t num_k_heads = 0;
  int64_t num_v_heads = 0;
  int64_t k_dim = 0;
  int64_t v_dim = 0;
  float q_scale = 1.0f;
};

__global__ void gdn_recurrence_kernel(const float* qkv, RecurrenceShape shape, const float* g,
                                      const float* beta, math::GdnSequences seqs, float* ssm_state,
                                      float* out) {
  extern __shared__ float normalized[];  // qn [k_dim], then kn [k_dim]
  __shared__ float inv_norms[2];
  const int64_t k_dim = shape.k_dim;
  const int64_t v_dim = shape.v_dim;
  const int64_t num_v_heads = shape.num_v_heads;
  float* qn = normalized;
  float* kn = normalized + k_dim;
  const int64_t seq = blockIdx.x / num_v_heads;
  const int64_t h = blockIdx.x % num_v_heads;
  const int64_t k_head = h / (num_v_heads / shape.num_k_heads);
  const int64_t first_row = seqs.row_starts[seq];
  const int64_t end_row = seqs.row_starts[seq + 1];
  float* state = ssm_state + (int64_t{seqs.slots[seq]} * num_v_heads + h) * k_dim * v_dim;
  if (seqs.fresh[seq] != 0) {
    for (int64_t index = threadIdx.x; index < k_dim * v_dim; index += blockDim.x)
      state[index] = 0.0f;
  }
  __syncthreads();
  for (int64_t t = first_row; t < end_row; ++t) {
    const float* row = qkv + t * shape.qkv_stride;
    const float* q = row + k_head * k_dim;
    const float* k = row + shape.num_k_heads * k_dim + k_head * k_dim;
    // blockDim.x >= 32, so threads 0 and 1 both exist: the two sequential sums run side by side.
    if (threadIdx.x == 0) inv_norms[0] = math::gdn_l2_inv_norm(q, k_dim);
    if (threadIdx.x == 1) inv_norms[1] = math::gdn_l2_inv_norm(k, k_dim);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < k_dim; i += blockDim.x) {
      qn[i] = math::gdn_normalized_q(q[i], inv_norms[0], shape.q_scale);
      kn[i] = math::gdn_normalized_k(k[i], inv_norms[1]);
    }
    __syncthreads();
    const float decay = math::gdn_decay_factor(g[t * num_v_heads + h]);
    const float beta_t = beta[t * num_v_heads + h];
    const float* v = row + 2 * shape.num_k_heads * k_dim + h * v_dim;
    float* out_head = out + t * num_v_heads * v_dim + h * v_dim;
    for (int64_t j = threadIdx.x; j < v_dim; j += blockDim.x)
      out_head[j] =
          math::gdn_recurrence_column(state + j, v_dim, kn, qn, k_dim, decay, v[j], beta_t);
    __syncthreads();  // the next row overwrites qn, kn and inv_norms
  }
}

__global__ void gdn_gated_norm_kernel(const float* x, const float* z, int64_t z_stride,
                                      const float* weight, float eps, int64_t num_heads,
                                      int64_t head_dim, float* out) {
  __shared__ float inv_rms;
  const int64_t t = blockIdx.x / num_heads;
  const int64_t h = blockIdx.x % num_heads;
  const int64_t offset = t * num_heads * head_dim + h * head_dim;
  const float* x_head = x + offset;
  const float* z_head = z + t * z_stride + h * head_dim;
  float* out_head = out + offset;
  if (threadIdx.x == 0)
    inv_rms = math::rms_inv(math::rms_sum_squares(x_head, head_dim), head_dim, eps);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < head_dim; i += blockDim.x)
    out_head[i] = math::gdn_gated_norm_element(x_head[i], weight[i], inv_rms, z_head[i]);
}

__global__ void sigmoid_gate_mul_kernel(float* x, int64_t num_rows, int64_t width,
                                        const float* gate, int64_t gate_stride) {
  const int64_t total = num_rows * width;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = index / width;
    const int64_t i = index % width;
    x[index] = math::gdn_sigmoid_gate(x[index], gate[t * gate_stride + i]);
  }
}

void require_sequences(const math::GdnSequences& seqs, const char* what) {
  require(seqs.num_seqs >= 0, what, ": negative sequence count ", seqs.num_seqs);
  require(seqs.num_seqs == 0 ||
              (seqs.row_starts != nullptr && seqs.slots != nullptr && seqs.fresh != nullptr),
          what, ": null sequence arrays");
}

}  // namespace

void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
              int64_t kernel, const math::GdnSequences& seqs, float* conv_state, float* out,
              cudaStream_t stream) {
  require(channels > 0 && kernel > 0 && row_stride >= channels,
          "gdn_conv: bad shape channels=", channels, " kernel=", kernel,
          " row_stride=", row_stride);
  require_sequences(seqs, "gdn_conv");
  if (seqs.num_seqs == 0) return;
  require(rows != nullptr && weight != nullptr && out != nullptr &&
              (conv_state != nullptr || kernel == 1),
          "gdn_conv: null pointer");
  gdn_conv_kernel<<<grid_for(seqs.num_seqs * channels), kThreadsPerBlock, 0, stream>>>(
      rows, row_stride, channels, weight, kernel, seqs, conv_state, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
               int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
               float* g, float* beta, cudaStream_t stream) {
  require(num_rows >= 0 && num_heads > 0 && a_col >= 0 && b_col >= 0 &&
              a_col + num_heads <= row_stride && b_col + num_heads <= row_stride,
          "gdn_gates: bad shape rows=", num_rows, " heads=", num_heads, " a_col=", a_col,
          " b_col=", b_col, " row_stride=", row_stride);
  if (num_rows == 0) return;
  require(
      rows != nullptr && a_log != nullptr && dt_bias != nullptr && g != nullptr && beta != nullptr,
      "gdn_gates: null pointer");
  gdn_gates_kernel<<<grid_for(num_rows * num_heads), kThreadsPerBlock, 0, stream>>>(
      rows, row_stride, a_col, b_col, num_heads, a_log, dt_bias, num_rows, g, beta);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads, int64_t num_v_heads,
                    int64_t k_dim, int64_t v_dim, float q_scale, const float* g, const float* beta,
                    const math::GdnSequences& seqs, float* ssm_state, float* out,
                    cudaStream_t stream) {
  require(num_k_heads > 0 && num_v_heads > 0 && num_v_heads % num_k_heads == 0 && k_dim > 0 &&
              v_dim > 0 && qkv_stride >= 2 * num_k_heads * k_dim + num_v_heads * v_dim,
          "gdn_recurrence: bad shape k_heads=", num_k_heads, " v_heads=", num_v_heads,
          " k_dim=", k_dim, " v_dim=", v_dim, " qkv_stride=", qkv_stride);
  // Two float arrays of k_dim in shared memory; 48 KiB is the default limit of a block.
  require(2 * k_dim * int64_t{sizeof(float)} <= 48 * 1024, "gdn_recurrence: k_dim ", k_dim,
          " exceeds the shared-memory buffers");
  require_sequences(seqs, "gdn_recurrence");
  if (seqs.num_seqs == 0) return;
  require(
      qkv != nullptr && g != nullptr && beta != nullptr && ssm_state != nullptr && out != nullptr,
      "gdn_recurrence: null pointer");
  // One thread per value column up to 256, at least a warp (the kernel needs threads 0 and 1).
  const int threads = static_cast<int>(std::clamp<int64_t>((v_dim + 31) / 32 * 32, 32, 256));
  const RecurrenceShape shape{qkv_stride, num_k_heads, num_v_heads, k_dim, v_dim, q_scale};
  gdn_recurrence_kernel<<<grid_for_rows(seqs.num_seqs * num_v_heads, "gdn_recurrence"), threads,
                          static_cast<size_t>(2 * k_dim) * sizeof(float), stream>>>(
      qkv, shape, g, beta, seqs, ssm_state, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                    float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim, float* out,
                    cudaStream_t stream) {
  require(num_rows >= 0 && num_heads > 0 && head_dim > 0 && z_stride >= num_heads * head_dim,
          "gdn_gated_norm: bad shape rows=", num_rows, " heads=", num_heads, " head_dim=", head_dim,
          " z_stride=", z_stride);
  if (num_rows == 0) return;
  require(x != nullptr && z != nullptr && weight != nullptr && out != nullptr,
          "gdn_gated_norm: null pointer");
  gdn_gated_norm_kernel<<<grid_for_rows(num_rows * num_heads, "gdn_gated_norm"), 128, 0, stream>>>(
      x, z, z_stride, weight, eps, num_heads, head_dim, out);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                      int64_t gate_stride, cudaStream_t stream) {
  require(num_rows >= 0 && width > 0 && gate_stride >= width,
          "sigmoid_gate_mul: bad shape rows=", num_rows, " width=", width,
          " gate_stride=", gate_stride);
  if (num_rows == 0) return;
  require(x != nullptr && gate != nullptr, "sigmoid_gate_mul: null pointer");
  sigmoid_gate_mul_kernel<<<grid_for(num_rows * width), kThreadsPerBlock, 0, stream>>>(
      x, num_rows, width, gate, gate_stride);
  KEEL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace keel::cuda
