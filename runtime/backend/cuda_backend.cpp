// The CUDA backend: each Backend op is one launcher of kernels/cuda on the default stream
// (NCCL collectives wait for that stream), over device memory from cudaMalloc. The math of
// every kernel is the shared host-device code in kernels/math; kernels/math/README.md lists
// which ops are bit-identical to the CPU backend. The MoE dispatch (pack, gather, grouped expert
// GEMMs, combine) stays on the device: a step's only device-to-host copies are the logits and,
// after them, the step's routing (runtime/model/model.cpp).
//
// Compiled and linked wherever nvcc exists; run only where a GPU does (not in CI).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/gdn.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/qgemm.h"
#include "runtime/backend/backend.h"

namespace keel {

int cuda_device_count(std::string* reason_if_none) {
  int count = cuda::device_count();
  if (count == 0 && reason_if_none != nullptr) *reason_if_none = cuda::no_device_reason();
  return count;
}

namespace {

void free_device_memory(void* pointer) {
  cudaFree(pointer);
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device_index, GpuGemm gemm_kind)
      : device_index_(device_index), gemm_kind_(gemm_kind) {
    KEEL_CUDA_CHECK(cudaSetDevice(device_index));
    if (gemm_kind_ == GpuGemm::kCublas) cublas_ = std::make_unique<cuda::CublasGemm>();
  }

  Device device() const override { return Device::kCuda; }

  DeviceArray allocate(DType dtype, size_t count) override {
    size_t nbytes = count * dtype_size(dtype);
    return DeviceArray(Device::kCuda, dtype, nbytes, allocate_zeroed(nbytes), &free_device_memory);
  }
  DeviceArray allocate_bytes(size_t nbytes) override {
    return DeviceArray(Device::kCuda, DType::kF32, nbytes, allocate_zeroed(nbytes),
                       &free_device_memory);
  }
  void copy_from_host(const void* host, size_t bytes, void* device_dst) override {
    if (bytes > 0) KEEL_CUDA_CHECK(cudaMemcpy(device_dst, host, bytes, cudaMemcpyHostToDevice));
  }
  void copy_to_host(const void* device_src, size_t bytes, void* host_dst) override {
    if (bytes > 0) KEEL_CUDA_CHECK(cudaMemcpy(host_dst, device_src, bytes, cudaMemcpyDeviceToHost));
  }

  void embed(const void* table, DType table_dtype, int64_t vocab, int64_t width,
             const int32_t* token_ids, int64_t num_tokens, float* out) override {
    cuda::embedding_gather(table, table_dtype, vocab, width, token_ids, num_tokens, out);
  }
  void gemm(const float* x, const void* w, DType w_dtype, float* y, int64_t m, int64_t n,
            int64_t k) override {
    cuda::GemmArgs args{x, k, w, w_dtype, k, y, n, m, n, k};
    if (gemm_kind_ == GpuGemm::kCublas) {
      cublas_->gemm(args, cuda::CublasInputs::kWidenWeights);
    } else {
      cuda::gemm_canonical(args);
    }
  }
  void matmul(const float* x, const math::WeightView& w, float* y, int64_t m) override {
    if (w.format == math::WeightFormat::kDense) {
      cuda::GemmArgs args{x, w.cols, w.data, w.dtype, w.ld, y, w.rows, m, w.rows, w.cols};
      if (gemm_kind_ == GpuGemm::kCublas) {
        cublas_->gemm(args, cuda::CublasInputs::kWidenWeights);
      } else {
        cuda::gemm_canonical(args);
      }
      return;
    }
    // Quantized weights always take the canonical quantized GEMM (bits equal to the CPU's),
    // whatever gemm_kind_ says: there is no cuBLAS path for keel's layouts.
    cuda::qgemm(cuda::QGemmArgs{x, w.cols, w, y, w.rows, m});
  }
  void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
                float* out) override {
    cuda::rms_norm(x, weight, eps, num_rows, width, out);
  }
  void head_norm(float* rows, int64_t row_stride, int64_t first_col, int64_t num_heads,
                 int64_t head_dim, const float* weight, float eps, int64_t num_rows) override {
    cuda::rms_norm_heads(rows + first_col, num_rows, row_stride, num_heads, head_dim, weight, eps);
  }
  void add_bias(float* x, const float* bias, int64_t num_rows, int64_t width) override {
    cuda::add_bias(x, num_rows, width, width, bias);
  }
  void rope(float* rows, int64_t row_stride, int64_t num_q_heads, int64_t k_col,
            int64_t num_k_heads, int64_t head_dim, int64_t rotary_dim, double theta,
            const int32_t* positions, int64_t num_rows, int64_t max_positions) override {
    // cos/sin come from a host-computed table (the CPU's own values), grown as contexts grow.
    if (rope_theta_ != theta || rope_rotary_dim_ != rotary_dim || rope_positions_ < max_positions) {
      std::vector<float> table = cuda::rope_cos_sin_table(max_positions, theta, rotary_dim);
      rope_table_ = cuda::DeviceBuffer(table.size() * sizeof(float));
      rope_table_.upload(table.data(), table.size() * sizeof(float));
      rope_theta_ = theta;
      rope_rotary_dim_ = rotary_dim;
      rope_positions_ = max_positions;
    }
    const float* table = rope_table_.as<float>();
    cuda::rope(rows, num_rows, row_stride, num_q_heads, head_dim, rotary_dim, positions, table,
               rope_positions_);
    cuda::rope(rows + k_col, num_rows, row_stride, num_k_heads, head_dim, rotary_dim, positions,
               table, rope_positions_);
  }
  void kv_append(const float* rows, int64_t row_stride, int64_t k_col, int64_t v_col,
                 const int32_t* positions, const int32_t* cache_idx, int64_t num_rows,
                 int64_t layer_idx, const KvPoolView& pool) override {
    cuda::kv_cache_append(rows + k_col, rows + v_col, row_stride, num_rows, positions, cache_idx,
                          layer_pool(pool, layer_idx));
  }
  void attention(const float* rows, int64_t row_stride, int64_t num_q_heads,
                 const int32_t* kv_head_of_q, const int32_t* positions, const int32_t* cache_idx,
                 int64_t num_rows, int64_t layer_idx, const KvPoolView& pool, float scale,
                 float* out) override {
    float* scores = scratch(scores_, static_cast<size_t>(num_rows * num_q_heads * pool.capacity()));
    cuda::attention(rows, row_stride, num_rows, num_q_heads, kv_head_of_q,
                    layer_pool(pool, layer_idx), positions, cache_idx, scale, scores, out,
                    num_q_heads * pool.head_dim);
  }
  void route_top_k(const float* logits, int64_t num_rows, int64_t num_experts, int64_t top_k,
                   bool normalize, int32_t* expert_ids, float* expert_weights, float* margins,
                   const int32_t* forced_ids) override {
    float* probs = scratch(probs_, static_cast<size_t>(num_rows * num_experts));
    cuda::route_top_k(logits, num_rows, num_experts, top_k, normalize, probs, expert_ids,
                      expert_weights, margins, nullptr, forced_ids);
  }
  void permute_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows,
                    int64_t width, float* dst) override {
    cuda::gather_rows(src, width, width, routes, num_rows, dst);
  }
  void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                const int32_t* expert_to_local, int64_t /*num_experts*/, int64_t num_local,
                int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows) override {
    cuda::moe_pack(expert_ids, num_tokens, top_k, expert_to_local, num_local, offsets, routes,
                   slot_rows);
  }
  void moe_gather(const float* x, int64_t width, const MoeDispatch& dispatch,
                  float* expert_in) override {
    cuda::moe_gather(x, width, width, dispatch.routes, dispatch.offsets, dispatch.num_local,
                     dispatch.max_rows(), expert_in);
  }
  // Untimed: three launches for all local experts, row counts read on the device. Timed
  // (telemetry asked): the offsets come to the host (a copy and a wait telemetry pays for) and
  // each non-empty expert runs the same kernels alone between events. Same kernels, same bits.
  void moe_experts(const float* expert_in, const MoeDispatch& dispatch, const ExpertTable& experts,
                   float* mid, float* act, float* expert_out, const ExpertTimes* times) override {
    if (times == nullptr) {
      run_experts(expert_in, dispatch, experts, 0, dispatch.num_local, mid, act, expert_out);
      return;
    }
    host_offsets_.resize(static_cast<size_t>(dispatch.num_local + 1));
    copy_to_host(dispatch.offsets, host_offsets_.size() * sizeof(int32_t), host_offsets_.data());
    for (int64_t local = 0; local < dispatch.num_local; ++local) {
      double start_s = 0, seconds = 0;
      if (host_offsets_[static_cast<size_t>(local) + 1] >
          host_offsets_[static_cast<size_t>(local)]) {
        start_s = steady_seconds();
        seconds = timed_seconds(
            [&] { run_experts(expert_in, dispatch, experts, local, 1, mid, act, expert_out); });
      }
      if (times->start_s != nullptr) times->start_s[local] = start_s;
      if (times->seconds != nullptr) times->seconds[local] = seconds;
    }
  }
  void silu_mul(const float* gate_up, int64_t num_rows, int64_t width, float* out) override {
    cuda::silu_mul(gate_up, gate_up + width, 2 * width, num_rows, width, out, width);
  }
  void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                   const float* expert_weights, int64_t num_tokens, int64_t top_k,
                   DType round_dtype, const float* shared, const float* shared_gate_logits,
                   float* out) override {
    math::CombinePrecisionArgs precision{round_dtype != DType::kF32, round_dtype};
    cuda::moe_combine(expert_out, width, slot_rows, expert_weights, num_tokens, top_k, precision,
                      cuda::SharedExpertOutput{shared, shared_gate_logits}, out);
  }
  void add(float* dst, const float* src, int64_t count) override {
    cuda::add_in_place(dst, src, count);
  }
  void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
                int64_t kernel, const RecurrentSeqs& seqs, float* conv_state, float* out) override {
    cuda::gdn_conv(rows, row_stride, channels, weight, kernel, gdn_sequences(seqs), conv_state,
                   out);
  }
  void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
                 int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
                 float* g, float* beta) override {
    cuda::gdn_gates(rows, row_stride, a_col, b_col, num_heads, a_log, dt_bias, num_rows, g, beta);
  }
  void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads,
                      int64_t num_v_heads, int64_t k_dim, int64_t v_dim, float q_scale,
                      const float* g, const float* beta, const RecurrentSeqs& seqs,
                      float* ssm_state, float* out) override {
    cuda::gdn_recurrence(qkv, qkv_stride, num_k_heads, num_v_heads, k_dim, v_dim, q_scale, g, beta,
                         gdn_sequences(seqs), ssm_state, out);
  }
  void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                      float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim,
                      float* out) override {
    cuda::gdn_gated_norm(x, z, z_stride, weight, eps, num_rows, num_heads, head_dim, out);
  }
  void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                        int64_t gate_stride) override {
    cuda::sigmoid_gate_mul(x, num_rows, width, gate, gate_stride);
  }
  double timed_seconds(const std::function<void()>& work) override {
    if (start_event_ == nullptr) {
      KEEL_CUDA_CHECK(cudaEventCreate(&start_event_));
      KEEL_CUDA_CHECK(cudaEventCreate(&stop_event_));
    }
    KEEL_CUDA_CHECK(cudaEventRecord(start_event_));
    work();
    KEEL_CUDA_CHECK(cudaEventRecord(stop_event_));
    KEEL_CUDA_CHECK(cudaEventSynchronize(stop_event_));
    float milliseconds = 0;
    KEEL_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, start_event_, stop_event_));
    return milliseconds * 1e-3;
  }
  ~CudaBackend() override {
    if (start_event_ != nullptr) cudaEventDestroy(start_event_);
    if (stop_event_ != nullptr) cudaEventDestroy(stop_event_);
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

 private:
  static void* allocate_zeroed(size_t nbytes) {
    void* data = nullptr;
    KEEL_CUDA_CHECK(cudaMalloc(&data, std::max<size_t>(nbytes, 64)));
    KEEL_CUDA_CHECK(cudaMemset(data, 0, std::max<size_t>(nbytes, 64)));
    return data;
  }
  static double steady_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static math::GdnSequences gdn_sequences(const RecurrentSeqs& seqs) {
    return math::GdnSequences{seqs.row_starts, seqs.slots, seqs.fresh, seqs.num_seqs};
  }
  // Local experts [first, first + count): gate_up, silu*mul and down over their packed rows;
  // through the grouped quantized GEMM when the table has weight views (device arrays, read by
  // the kernel), else the dense grouped GEMM over the pointer tables.
  void run_experts(const float* expert_in, const MoeDispatch& dispatch, const ExpertTable& experts,
                   int64_t first, int64_t count, float* mid, float* act, float* expert_out) {
    const int64_t hidden = experts.hidden;
    const int64_t inter = experts.inter;
    const int32_t* offsets = dispatch.offsets + first;
    if (experts.gate_up_views != nullptr) {
      cuda::GroupedQGemmArgs gate_up{expert_in,
                                     hidden,
                                     experts.gate_up_views + first,
                                     mid,
                                     2 * inter,
                                     offsets,
                                     count,
                                     dispatch.num_tokens,
                                     dispatch.max_rows(),
                                     2 * inter,
                                     hidden};
      cuda::qgemm_grouped(gate_up);
      cuda::moe_silu_mul(mid, offsets, count, dispatch.max_rows(), inter, act);
      cuda::GroupedQGemmArgs down{
          act,     inter, experts.down_views + first, expert_out,          hidden,
          offsets, count, dispatch.num_tokens,        dispatch.max_rows(), hidden,
          inter};
      cuda::qgemm_grouped(down);
      return;
    }
    cuda::GroupedGemmArgs gate_up{expert_in,
                                  hidden,
                                  experts.gate_up + first,
                                  experts.dtype,
                                  hidden,
                                  mid,
                                  2 * inter,
                                  offsets,
                                  count,
                                  dispatch.num_tokens,
                                  dispatch.max_rows(),
                                  2 * inter,
                                  hidden};
    cuda::gemm_canonical_grouped(gate_up);
    cuda::moe_silu_mul(mid, offsets, count, dispatch.max_rows(), inter, act);
    cuda::GroupedGemmArgs down{
        act,     inter, experts.down + first, experts.dtype,       inter,  expert_out, hidden,
        offsets, count, dispatch.num_tokens,  dispatch.max_rows(), hidden, inter};
    cuda::gemm_canonical_grouped(down);
  }
  int32_t* scratch_i32(cuda::DeviceBuffer& buffer, size_t count) {
    if (buffer.bytes() < count * sizeof(int32_t))
      buffer = cuda::DeviceBuffer(count * sizeof(int32_t));
    return buffer.as<int32_t>();
  }
  // One layer of the engine's paged pool [layer][block][kv_heads][block_size][head_dim] in the
  // kernels' per-layer view.
  static cuda::KvPool layer_pool(const KvPoolView& pool, int64_t layer_idx) {
    const int64_t block_elements = pool.kv_heads * pool.block_size * pool.head_dim;
    const int64_t layer_bytes =
        layer_idx * pool.num_blocks * block_elements * math::kv_element_bytes(pool.dtype);
    cuda::KvPool view;
    view.k = static_cast<char*>(pool.k) + layer_bytes;
    view.v = static_cast<char*>(pool.v) + layer_bytes;
    view.num_blocks = pool.num_blocks;
    view.block_stride = block_elements;
    view.block_size = pool.block_size;
    view.num_kv_heads = pool.kv_heads;
    view.head_dim = pool.head_dim;
    view.block_tables = pool.block_tables;
    view.max_blocks_per_seq = pool.max_blocks_per_seq;
    view.dtype = pool.dtype;
    view.k_scale = pool.k_scale(layer_idx);
    view.v_scale = pool.v_scale(layer_idx);
    return view;
  }
  float* scratch(cuda::DeviceBuffer& buffer, size_t count) {
    if (buffer.bytes() < count * sizeof(float)) buffer = cuda::DeviceBuffer(count * sizeof(float));
    return buffer.as<float>();
  }

  int device_index_;
  GpuGemm gemm_kind_;
  std::unique_ptr<cuda::CublasGemm> cublas_;
  cudaEvent_t start_event_ = nullptr;
  cudaEvent_t stop_event_ = nullptr;
  cuda::DeviceBuffer scores_, probs_, rope_table_;
  std::vector<int32_t> host_offsets_;
  double rope_theta_ = 0;
  int64_t rope_rotary_dim_ = 0;
  int64_t rope_positions_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device_index, GpuGemm gemm) {
  std::string reason;
  int count = cuda_device_count(&reason);
  if (count == 0) throw_error("--backend cuda: no CUDA device: ", reason);
  if (device_index < 0 || device_index >= count)
    throw_error("--backend cuda: rank wants GPU ", device_index, " but this node has ", count);
  return std::make_unique<CudaBackend>(device_index, gemm);
}

}  // namespace keel
