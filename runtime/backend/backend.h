// The device abstraction the forward pass is written against (STYLE.md lesson 12: move-only
// buffers that know their dtype and device). RankModel calls only these ops; a CPU backend
// runs them with kernels/cpu, a CUDA backend with kernels/cuda. Every pointer an op takes is
// memory of that backend's device (activations fp32, weights in their storage dtype), and the
// communicator a rank uses must take the same kind of pointer (thread/MPI: host, NCCL: device).
//
// The MoE dispatch (pack, gather, expert FFNs, combine) runs on the device too: a forward step
// copies nothing to the host between the embedding and the logits (RankModel::forward copies the
// logits, then the step's routing, once per step).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "kernels/base/dtype.h"
#include "kernels/math/kv_math.h"
#include "kernels/math/moe_math.h"
#include "kernels/math/quant_math.h"

namespace keel {

enum class Device : uint8_t { kCpu, kCuda };
std::string_view device_name(Device device);
// "cpu" or "cuda"; throws keel::Error naming the bad value.
Device parse_device(std::string_view name);

// Memory on one device; move-only; zero-filled when allocated. `dtype` describes the elements
// of weights and activations; index arrays (token ids, positions, routes) are int32 arrays
// allocated by byte count and read through i32().
class DeviceArray {
 public:
  using Deleter = void (*)(void*);
  DeviceArray() = default;
  DeviceArray(Device device, DType dtype, size_t nbytes, void* data, Deleter deleter)
      : device_(device), dtype_(dtype), nbytes_(nbytes), data_(data, deleter) {}

  Device device() const { return device_; }
  DType dtype() const { return dtype_; }
  size_t nbytes() const { return nbytes_; }
  bool empty() const { return nbytes_ == 0; }
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  float* f32() { return static_cast<float*>(data_.get()); }
  const float* f32() const { return static_cast<const float*>(data_.get()); }
  int32_t* i32() { return static_cast<int32_t*>(data_.get()); }
  const int32_t* i32() const { return static_cast<const int32_t*>(data_.get()); }

 private:
  Device device_ = Device::kCpu;
  DType dtype_ = DType::kF32;
  size_t nbytes_ = 0;
  std::unique_ptr<void, Deleter> data_{nullptr, [](void*) {}};
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;

  // `count` elements of `dtype`, or `nbytes` bytes (index arrays), zero-filled.
  virtual DeviceArray allocate(DType dtype, size_t count) = 0;
  virtual DeviceArray allocate_bytes(size_t nbytes) = 0;
  virtual void copy_from_host(const void* host, size_t bytes, void* device_dst) = 0;
  virtual void copy_to_host(const void* device_src, size_t bytes, void* host_dst) = 0;

  // out[t, :] = fp32(table[token_ids[t], :]); table [vocab, width] in its dtype.
  virtual void embed(const void* table, DType table_dtype, int64_t vocab, int64_t width,
                     const int32_t* token_ids, int64_t num_tokens, float* out) = 0;
  // y[m, n] = sum_k x[m, k] * w[n, k] in the canonical order of kernels/cpu/gemm.h.
  virtual void gemm(const float* x, const void* w, DType w_dtype, float* y, int64_t m, int64_t n,
                    int64_t k) = 0;
  // y[m, :] = x[m, :] * w^T for a weight in any layout (kernels/math/quant_math.h): dense views
  // through gemm's canonical order, quantized ones through the quantized GEMM, whose canonical
  // order is the same with each weight decoded first (kernels/cpu/qgemm.h). x [m, w.cols] and
  // y [m, w.rows] contiguous.
  virtual void matmul(const float* x, const math::WeightView& w, float* y, int64_t m) = 0;
  // RMSNorm of `num_rows` contiguous rows of `width` (out may alias x).
  virtual void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows,
                        int64_t width, float* out) = 0;
  // Per-head RMSNorm over head_dim (Qwen3's qk-norm), in place, on `num_heads` heads starting
  // at column `first_col` of every row.
  virtual void head_norm(float* rows, int64_t row_stride, int64_t first_col, int64_t num_heads,
                         int64_t head_dim, const float* weight, float eps, int64_t num_rows) = 0;
  // x[t, i] += bias[i]
  virtual void add_bias(float* x, const float* bias, int64_t num_rows, int64_t width) = 0;
  // RoPE at each row's position (all < max_positions) on the query heads (columns from 0) and
  // the key heads (columns from k_col) of every row.
  virtual void rope(float* rows, int64_t row_stride, int64_t num_q_heads, int64_t k_col,
                    int64_t num_k_heads, int64_t head_dim, int64_t rotary_dim, double theta,
                    const int32_t* positions, int64_t num_rows, int64_t max_positions) = 0;
  // The paged KV pool (kernels/math/ops_math.h, PagedKvRowsOf): k and v are
  // [num_layers][num_blocks][kv_heads][block_size][head_dim] elements of `dtype`
  // (kernels/math/kv_math.h: fp32, bf16 or fp8 e4m3 with a per-layer k/v scale). A step's
  // sequences each own a row of block_tables ([num_seqs][max_blocks_per_seq] int32, device
  // memory); a token's cache_idx names its row, and its position p lives at row p % block_size
  // of block block_tables[cache_idx][p / block_size].
  struct KvPoolView {
    void* k = nullptr;
    void* v = nullptr;
    int64_t num_layers = 0;
    int64_t num_blocks = 0;
    int64_t kv_heads = 0;
    int64_t block_size = 0;
    int64_t head_dim = 0;
    const int32_t* block_tables = nullptr;
    int64_t max_blocks_per_seq = 0;
    math::KvDType dtype = math::KvDType::kF32;
    // fp8: host arrays [num_layers] of the per-tensor scales (stored = x / scale); nullptr
    // means 1 for every layer. Unused by fp32 and bf16.
    const float* k_scales = nullptr;
    const float* v_scales = nullptr;
    // Positions one sequence can address.
    int64_t capacity() const { return max_blocks_per_seq * block_size; }
    float k_scale(int64_t layer) const { return k_scales == nullptr ? 1.0f : k_scales[layer]; }
    float v_scale(int64_t layer) const { return v_scales == nullptr ? 1.0f : v_scales[layer]; }
  };
  // Rounds each row's K/V heads (columns [k_col, k_col + kv_width) and [v_col, ...)) to the
  // pool's dtype (math::Kv*::store, element by element) and writes them at (its sequence's
  // block for positions[t], layer, kv head). The engine checked on the host that every
  // position and block id is inside the pool.
  virtual void kv_append(const float* rows, int64_t row_stride, int64_t k_col, int64_t v_col,
                         const int32_t* positions, const int32_t* cache_idx, int64_t num_rows,
                         int64_t layer_idx, const KvPoolView& pool) = 0;
  // Causal attention of each row's query heads (columns [0, num_q_heads * head_dim)) over its
  // sequence's cache positions [0, position], in position order, K/V elements widened to fp32
  // as they are read (math::attention_head_paged); out [num_rows, q_heads*head_dim].
  virtual void attention(const float* rows, int64_t row_stride, int64_t num_q_heads,
                         const int32_t* kv_head_of_q, const int32_t* positions,
                         const int32_t* cache_idx, int64_t num_rows, int64_t layer_idx,
                         const KvPoolView& pool, float scale, float* out) = 0;
  // Router: softmax + top-k (ties to the lower id) [+ renormalise] per row. forced_ids
  // ([rows][top_k], nullable): router replay, the selection is given and only weights and
  // margins are computed (math::route_top_k_token).
  virtual void route_top_k(const float* logits, int64_t num_rows, int64_t num_experts,
                           int64_t top_k, bool normalize, int32_t* expert_ids,
                           float* expert_weights, float* margins, const int32_t* forced_ids) = 0;
  // dst[r, :] = src[routes[r].token_idx, :] for r in [0, num_rows) (a row selection, e.g. the
  // rows whose logits a step wants).
  virtual void permute_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows,
                            int64_t width, float* dst) = 0;

  // MoE dispatch of one layer (kernels/math/moe_math.h). moe_pack sorts the router's choices
  // expert_ids [num_tokens, top_k] stably by local expert (expert_to_local [num_experts], -1 for
  // experts on other ranks, device memory) into offsets [num_local + 1], routes (capacity
  // num_tokens * top_k) and slot_rows [num_tokens * top_k]. How many rows each expert got stays
  // in device memory: the ops below read it there, so no host round trip is needed.
  virtual void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                        const int32_t* expert_to_local, int64_t num_experts, int64_t num_local,
                        int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows) = 0;
  struct MoeDispatch {
    const int32_t* offsets = nullptr;
    const math::PackedRoute* routes = nullptr;
    const int32_t* slot_rows = nullptr;
    int64_t num_local = 0;
    int64_t num_tokens = 0;
    int64_t top_k = 0;
    int64_t max_rows() const { return num_tokens * top_k; }
  };
  // expert_in[r, :] = x[routes[r].token_idx, :] for every packed row r < offsets[num_local].
  virtual void moe_gather(const float* x, int64_t width, const MoeDispatch& dispatch,
                          float* expert_in) = 0;
  // The local experts' weights: device tables [num_local] of pointers to each expert's gate_up
  // [2 * inter, hidden] (gate rows, then up rows) and down [hidden, inter] matrices.
  // Quantized experts (and, where set, dense ones too) come as device arrays [num_local] of
  // weight views instead: gate_up_views / down_views, used whenever they are non-null.
  struct ExpertTable {
    const void* const* gate_up = nullptr;
    const void* const* down = nullptr;
    DType dtype = DType::kF32;
    const math::WeightView* gate_up_views = nullptr;
    const math::WeightView* down_views = nullptr;
    int64_t hidden = 0;
    int64_t inter = 0;
  };
  // Per local expert (host arrays [num_local], filled only when given): seconds in its FFN and
  // the steady-clock second it started (0 for experts without rows).
  struct ExpertTimes {
    double* seconds = nullptr;
    double* start_s = nullptr;
  };
  // Every local expert's FFN over its packed rows: mid = expert_in * gate_up^T, act = silu(gate)
  // * up, expert_out = act * down^T; canonical GEMMs, so every row's bits are its own. mid [max
  // rows, 2 * inter] and act [max rows, inter] are scratch. With `times` the experts are timed
  // one by one (on CUDA: events around each expert's kernels, waited for; telemetry's cost).
  virtual void moe_experts(const float* expert_in, const MoeDispatch& dispatch,
                           const ExpertTable& experts, float* mid, float* act, float* expert_out,
                           const ExpertTimes* times) = 0;
  // out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i]
  virtual void silu_mul(const float* gate_up, int64_t num_rows, int64_t width, float* out) = 0;
  // Canonical MoE combine per token t: out[t] = sum over slots s in order with
  // slot_rows[t, s] >= 0 of weight[t, s] * expert_out[slot_rows[t, s]] (each product rounded to
  // `round_dtype` first unless it is F32), then + sigmoid(shared_gate_logits[t]) * shared[t]
  // when `shared` is non-null.
  virtual void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                           const float* expert_weights, int64_t num_tokens, int64_t top_k,
                           DType round_dtype, const float* shared, const float* shared_gate_logits,
                           float* out) = 0;
  // dst[i] += src[i]
  virtual void add(float* dst, const float* src, int64_t count) = 0;

  // ---- Gated DeltaNet (kernels/math/gdn_math.h) ----
  // The step's sequences as the recurrent ops see them (device arrays): sequence s owns the
  // contiguous rows [row_starts[s], row_starts[s + 1]) in increasing consecutive position order,
  // and recurrent-state slot slots[s]; fresh[s] != 0 means its first row is position 0, so its
  // state starts from zeros, whatever the slot held.
  struct RecurrentSeqs {
    const int32_t* row_starts = nullptr;  // [num_seqs + 1]
    const int32_t* slots = nullptr;       // [num_seqs]
    const int32_t* fresh = nullptr;       // [num_seqs]
    int64_t num_seqs = 0;
    int64_t num_rows = 0;
  };
  // Causal depthwise conv1d (kernel K) + SiLU over channels [0, channels) of each row:
  //   out[t, c] = silu( sum_{j=0..K-1, j increasing} weight[c*K + j] * x(p - K + 1 + j)[c] )
  // where x(q) is rows[row_of(q) * row_stride + c] when position q is in this step, else the
  // slot's conv state (zero for a fresh sequence). conv_state [num_slots][channels][K-1] fp32
  // holds each slot's last K-1 inputs, oldest first, and is left holding the sequence's last K-1
  // inputs (state positions older than position 0 are zeros). weight fp32 [channels][K].
  // out [num_rows][channels] (dense, stride = channels).
  virtual void gdn_conv(const float* rows, int64_t row_stride, int64_t channels,
                        const float* weight, int64_t kernel, const RecurrentSeqs& seqs,
                        float* conv_state, float* out) = 0;
  // Per row t and value head h:
  //   g[t*num_heads + h]    = -exp(a_log[h])
  //                           * softplus(rows[t*row_stride + a_col + h] + dt_bias[h])
  //   beta[t*num_heads + h] = sigmoid(rows[t*row_stride + b_col + h])
  // (exp_f32 / softplus_f32 / sigmoid_f32 of exp_math.h; the product in that order:
  // (-exp(a_log)) * softplus(...)). a_log, dt_bias fp32 [num_heads].
  virtual void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
                         int64_t num_heads, const float* a_log, const float* dt_bias,
                         int64_t num_rows, float* g, float* beta) = 0;
  // The gated delta rule. qkv: [num_rows][qkv_stride], conv output rows with q heads at columns
  // [0, HK*DK), k heads at [HK*DK, 2*HK*DK), v heads at [2*HK*DK, 2*HK*DK + HV*DV)
  // (HK = num_k_heads, HV = num_v_heads, DK = k_dim, DV = v_dim; HV % HK == 0); value head h
  // reads q/k head h / (HV / HK). Per sequence and value head, rows in order:
  //   qn = q * (1 / sqrt(sum_i q_i^2 + 1e-6)) * q_scale     (sum i increasing; then the scale)
  //   kn = k * (1 / sqrt(sum_i k_i^2 + 1e-6))
  //   S  = exp(g[t, h]) * S                                 (S: [DK][DV] fp32)
  //   kv[j] = sum_i S[i][j] * kn[i]                         (i increasing)
  //   d[j]  = (v[j] - kv[j]) * beta[t, h]
  //   S[i][j] = S[i][j] + kn[i] * d[j]
  //   out[t, h*DV + j] = sum_i S[i][j] * qn[i]              (i increasing)
  // ssm_state [num_slots][HV][DK][DV] fp32 (zeros used instead for fresh sequences; left
  // holding the state after the sequence's last row). out [num_rows][HV*DV].
  virtual void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads,
                              int64_t num_v_heads, int64_t k_dim, int64_t v_dim, float q_scale,
                              const float* g, const float* beta, const RecurrentSeqs& seqs,
                              float* ssm_state, float* out) = 0;
  // Gated RMSNorm per row and head (Qwen3.5's linear_attn.norm; weight [head_dim] fp32, plain,
  // not zero-centred):
  //   out[t, h*D + i] = (weight[i] * (x[t, h*D + i] * inv_rms(t, h)))
  //                     * silu(z[t*z_stride + h*D + i])
  // with inv_rms = 1 / sqrt(sum_i x^2 / D + eps) (the rms_* pieces of ops_math.h). out may alias x.
  virtual void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                              float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim,
                              float* out) = 0;
  // The gated attention output: x[t*width + i] *= sigmoid(gate[t*gate_stride + i]), i < width.
  virtual void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                                int64_t gate_stride) = 0;

  // Times device work (an expert's GEMMs) for telemetry: the CPU backend reads the steady
  // clock around `work`, the CUDA backend records events around it and waits for the second.
  // Both feed the same per-(layer, expert) seconds.
  virtual double timed_seconds(const std::function<void()>& work) = 0;
};

// The CPU backend (kernels/cpu): the bit-exact reference. `threads` per rank split each GEMM's
// output rows and attention's heads by a fixed partition (kernels/cpu/worker_pool.h): the bits
// are the same at any thread count.
std::unique_ptr<Backend> make_cpu_backend(int threads = 1);
// Usable CUDA devices; 0 with the reason (no driver, no device, built without CUDA) otherwise.
int cuda_device_count(std::string* reason_if_none);
// How the CUDA backend multiplies (the GEMM modes; kernels/math/README.md):
//  - kCanonical: the 16-lane canonical order, bit-identical to the CPU GEMM, hence batch-
//    invariant too. batch_invariant deployments use it: GPU-served bits replay on a CPU.
//  - kTiledBatchInvariant (named, not built yet): a tensor-core GEMM with one fixed tiling and
//    no split-K for every M, batch-invariant but with GPU-only bits (a row's result depends on
//    neither its batch nor its position in it, only on the tiling, so runs on one GPU model
//    reproduce but a CPU replay does not). It will sit beside kCanonical, not replace it.
//  - kCublas: cuBLAS with fp32 compute, the default algorithm and no workspace (so no split-K),
//    faster but neither CPU-identical nor batch-invariant (cuBLAS picks kernels by shape); used
//    by `fast` deployments for dense GEMMs. MoE experts always run the grouped canonical GEMM.
enum class GpuGemm : uint8_t { kCanonical, kCublas };
// The CUDA backend on `device_index`; throws keel::Error with a clear message where CUDA
// support was not built or no device exists.
std::unique_ptr<Backend> make_cuda_backend(int device_index, GpuGemm gemm = GpuGemm::kCanonical);

}  // namespace keel
