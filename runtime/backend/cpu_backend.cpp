// The CPU backend: each op is a loop over rows calling kernels/cpu, in the same order the
// determinism contract fixes (see kernels/cpu/gemm.h and runtime/model/model.cpp).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/host_memory.h"
#include "kernels/cpu/gdn.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qgemm.h"
#include "kernels/math/ops_math.h"
#include "runtime/backend/backend.h"

namespace keel {

std::string_view device_name(Device device) {
  return device == Device::kCpu ? "cpu" : "cuda";
}

Device parse_device(std::string_view name) {
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  throw_error("unknown backend '", name, "' (expected cpu or cuda)");
}

namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads), part_scores_(static_cast<size_t>(threads)) {}

  Device device() const override { return Device::kCpu; }

  DeviceArray allocate(DType dtype, size_t count) override {
    size_t nbytes = count * dtype_size(dtype);
    return DeviceArray(Device::kCpu, dtype, nbytes, allocate_zeroed(nbytes), &free_host);
  }
  DeviceArray allocate_bytes(size_t nbytes) override {
    return DeviceArray(Device::kCpu, DType::kF32, nbytes, allocate_zeroed(nbytes), &free_host);
  }
  void copy_from_host(const void* host, size_t bytes, void* device_dst) override {
    if (bytes > 0) std::memcpy(device_dst, host, bytes);
  }
  void copy_to_host(const void* device_src, size_t bytes, void* host_dst) override {
    if (bytes > 0) std::memcpy(host_dst, device_src, bytes);
  }

  void embed(const void* table, DType table_dtype, int64_t /*vocab*/, int64_t width,
             const int32_t* token_ids, int64_t num_tokens, float* out) override {
    for (int64_t token = 0; token < num_tokens; ++token)
      cpu::to_f32(
          static_cast<const std::byte*>(table) +
              static_cast<size_t>(int64_t{token_ids[token]} * width) * dtype_size(table_dtype),
          table_dtype, width, out + token * width);
  }
  void gemm(const float* x, const void* w, DType w_dtype, float* y, int64_t m, int64_t n,
            int64_t k) override {
    if (n == 0 || k == 0) {
      cpu::gemm(x, w, w_dtype, y, m, n, k);
      return;
    }
    math::WeightView view;
    view.dtype = w_dtype;
    view.data = w;
    view.rows = n;
    view.cols = view.ld = k;
    cpu::matmul(x, k, view, y, n, m, pool_);
  }
  void matmul(const float* x, const math::WeightView& w, float* y, int64_t m) override {
    cpu::matmul(x, w.cols, w, y, w.rows, m, pool_);
  }
  void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
                float* out) override {
    cpu::rms_norm(x, weight, eps, num_rows, width, out);
  }
  void head_norm(float* rows, int64_t row_stride, int64_t first_col, int64_t num_heads,
                 int64_t head_dim, const float* weight, float eps, int64_t num_rows) override {
    for (int64_t row = 0; row < num_rows; ++row) {
      float* heads = rows + row * row_stride + first_col;
      cpu::rms_norm(heads, weight, eps, num_heads, head_dim, heads);
    }
  }
  void add_bias(float* x, const float* bias, int64_t num_rows, int64_t width) override {
    for (int64_t row = 0; row < num_rows; ++row)
      for (int64_t i = 0; i < width; ++i) x[row * width + i] += bias[i];
  }
  void rope(float* rows, int64_t row_stride, int64_t num_q_heads, int64_t k_col,
            int64_t num_k_heads, int64_t head_dim, int64_t rotary_dim, double theta,
            const int32_t* positions, int64_t num_rows, int64_t /*max_positions*/) override {
    cos_sin_.resize(static_cast<size_t>(rotary_dim));
    for (int64_t row = 0; row < num_rows; ++row) {
      float* vectors = rows + row * row_stride;
      cpu::rope_cos_sin(positions[row], theta, rotary_dim, cos_sin_.data());
      cpu::apply_rope(vectors, num_q_heads, head_dim, rotary_dim, cos_sin_.data());
      cpu::apply_rope(vectors + k_col, num_k_heads, head_dim, rotary_dim, cos_sin_.data());
    }
  }
  void kv_append(const float* rows, int64_t row_stride, int64_t k_col, int64_t v_col,
                 const int32_t* positions, const int32_t* cache_idx, int64_t num_rows,
                 int64_t layer_idx, const KvPoolView& pool) override {
    with_kv_format(pool.dtype, [&](auto format) {
      using Kv = decltype(format);
      const float k_scale = pool.k_scale(layer_idx), v_scale = pool.v_scale(layer_idx);
      auto* k = static_cast<typename Kv::Storage*>(pool.k);
      auto* v = static_cast<typename Kv::Storage*>(pool.v);
      for (int64_t row = 0; row < num_rows; ++row) {
        for (int64_t kv_head = 0; kv_head < pool.kv_heads; ++kv_head) {
          const int64_t offset =
              paged_rows<Kv>(pool, pool.k, cache_idx[row], layer_idx, kv_head, 1.0f)
                  .row(positions[row]) -
              k;
          const float* source = rows + row * row_stride + kv_head * pool.head_dim;
          for (int64_t d = 0; d < pool.head_dim; ++d) {
            k[offset + d] = Kv::store(source[k_col + d], k_scale);
            v[offset + d] = Kv::store(source[v_col + d], v_scale);
          }
        }
      }
    });
  }
  void attention(const float* rows, int64_t row_stride, int64_t num_q_heads,
                 const int32_t* kv_head_of_q, const int32_t* positions, const int32_t* cache_idx,
                 int64_t num_rows, int64_t layer_idx, const KvPoolView& pool, float scale,
                 float* out) override {
    const int64_t head_dim = pool.head_dim;
    int64_t max_positions = 0;
    for (int64_t row = 0; row < num_rows; ++row)
      max_positions = std::max<int64_t>(max_positions, int64_t{positions[row]} + 1);
    // Every (row, head) is independent: thread `part` takes items part, part + num_parts, ...
    // (strided, not contiguous ranges: under a causal prompt later rows attend to more positions,
    // and contiguous ranges gave the last thread ~3x the work), each with its own score scratch,
    // and each head is computed exactly as on one thread.
    const int64_t num_items = num_rows * num_q_heads;
    const int num_parts =
        num_items * max_positions * head_dim < (int64_t{1} << 15) ? 1 : pool_.num_threads();
    with_kv_format(pool.dtype, [&](auto format) {
      using Kv = decltype(format);
      const float k_scale = pool.k_scale(layer_idx), v_scale = pool.v_scale(layer_idx);
      auto run_part = [&](int part) {
        std::vector<float>& scores = part_scores_[static_cast<size_t>(part)];
        scores.resize(std::max(scores.size(), static_cast<size_t>(max_positions)));
        for (int64_t item = part; item < num_items; item += num_parts) {
          const int64_t row = item / num_q_heads, head = item % num_q_heads;
          const int32_t kv_head = kv_head_of_q[head];
          math::attention_head_paged<Kv>(
              rows + row * row_stride + head * head_dim,
              paged_rows<Kv>(pool, pool.k, cache_idx[row], layer_idx, kv_head, k_scale),
              paged_rows<Kv>(pool, pool.v, cache_idx[row], layer_idx, kv_head, v_scale),
              int64_t{positions[row]} + 1, scale, scores.data(),
              out + (row * num_q_heads + head) * head_dim);
        }
      };
      if (num_parts == 1)
        run_part(0);
      else
        pool_.run(run_part);
    });
  }
  void route_top_k(const float* logits, int64_t num_rows, int64_t num_experts, int64_t top_k,
                   bool normalize, int32_t* expert_ids, float* expert_weights, float* margins,
                   const int32_t* forced_ids) override {
    probs_.resize(static_cast<size_t>(num_experts));
    for (int64_t row = 0; row < num_rows; ++row)
      margins[row] =
          cpu::route_top_k(logits + row * num_experts, num_experts, top_k, normalize, probs_.data(),
                           expert_ids + row * top_k, expert_weights + row * top_k,
                           forced_ids == nullptr ? nullptr : forced_ids + row * top_k)
              .margin;
  }
  void permute_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows,
                    int64_t width, float* dst) override {
    cpu::gather_rows(src, routes, num_rows, width, dst);
  }
  void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                const int32_t* expert_to_local, int64_t num_experts, int64_t num_local,
                int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows) override {
    cpu::moe_pack(expert_ids, num_tokens, top_k, expert_to_local, num_experts, num_local, offsets,
                  routes, slot_rows);
  }
  void moe_gather(const float* x, int64_t width, const MoeDispatch& dispatch,
                  float* expert_in) override {
    cpu::gather_rows(x, dispatch.routes, dispatch.offsets[dispatch.num_local], width, expert_in);
  }
  void moe_experts(const float* expert_in, const MoeDispatch& dispatch, const ExpertTable& experts,
                   float* mid, float* act, float* expert_out, const ExpertTimes* times) override {
    const int64_t hidden = experts.hidden;
    const int64_t inter = experts.inter;
    auto run_expert = [&](int64_t local, cpu::WorkerPool& pool) {
      const int64_t first = dispatch.offsets[local];
      const int64_t num_rows = dispatch.offsets[local + 1] - first;
      auto run = [&] {
        if (experts.gate_up_views != nullptr) {
          cpu::expert_ffn_views(expert_in + first * hidden, num_rows, experts.gate_up_views[local],
                                experts.down_views[local], mid + first * 2 * inter,
                                act + first * inter, expert_out + first * hidden, pool);
          return;
        }
        cpu::expert_ffn(expert_in + first * hidden, num_rows, hidden, inter, experts.gate_up[local],
                        experts.down[local], experts.dtype, mid + first * 2 * inter,
                        act + first * inter, expert_out + first * hidden, pool);
      };
      if (times == nullptr || num_rows == 0) {
        run();
        if (times != nullptr) record_time(*times, local, 0.0, 0.0);
        return;
      }
      const auto start = std::chrono::steady_clock::now();
      run();
      const auto stop = std::chrono::steady_clock::now();
      record_time(*times, local, std::chrono::duration<double>(start.time_since_epoch()).count(),
                  std::chrono::duration<double>(stop - start).count());
    };
    // Decode-like steps (a few rows per expert): whole experts per thread, one fork-join for the
    // layer instead of two per expert; expert `local` goes to the part its first row falls in,
    // so parts hold about the same number of rows. Otherwise each expert's GEMMs split their
    // output rows over the threads. Either way an expert's rows are computed exactly as on one
    // thread, so the choice changes no bits.
    constexpr int64_t kFewRows = 4;
    const int64_t total_rows = dispatch.offsets[dispatch.num_local];
    int64_t max_rows = 0;
    for (int64_t local = 0; local < dispatch.num_local; ++local)
      max_rows = std::max<int64_t>(max_rows, dispatch.offsets[local + 1] - dispatch.offsets[local]);
    const int num_parts = pool_.num_threads();
    if (num_parts > 1 && total_rows > 0 && max_rows <= kFewRows) {
      pool_.run([&](int part) {
        for (int64_t local = 0; local < dispatch.num_local; ++local)
          if (std::min<int64_t>(num_parts - 1,
                                int64_t{dispatch.offsets[local]} * num_parts / total_rows) == part)
            run_expert(local, serial_);
      });
      return;
    }
    for (int64_t local = 0; local < dispatch.num_local; ++local) run_expert(local, pool_);
  }
  void silu_mul(const float* gate_up, int64_t num_rows, int64_t width, float* out) override {
    for (int64_t row = 0; row < num_rows; ++row)
      cpu::silu_mul(gate_up + row * 2 * width, gate_up + row * 2 * width + width, width,
                    out + row * width);
  }
  void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                   const float* expert_weights, int64_t num_tokens, int64_t top_k,
                   DType round_dtype, const float* shared, const float* shared_gate_logits,
                   float* out) override {
    cpu::moe_combine(expert_out, width, slot_rows, expert_weights, num_tokens, top_k,
                     math::CombinePrecisionArgs{round_dtype != DType::kF32, round_dtype}, shared,
                     shared_gate_logits, out);
  }
  void add(float* dst, const float* src, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
  }
  void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
                int64_t kernel, const RecurrentSeqs& seqs, float* conv_state, float* out) override {
    cpu::gdn_conv(rows, row_stride, channels, weight, kernel, gdn_sequences(seqs), conv_state, out);
  }
  void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
                 int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
                 float* g, float* beta) override {
    cpu::gdn_gates(rows, row_stride, a_col, b_col, num_heads, a_log, dt_bias, num_rows, g, beta);
  }
  void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads,
                      int64_t num_v_heads, int64_t k_dim, int64_t v_dim, float q_scale,
                      const float* g, const float* beta, const RecurrentSeqs& seqs,
                      float* ssm_state, float* out) override {
    KEEL_CHECK(num_k_heads > 0 && num_v_heads % num_k_heads == 0, "gdn_recurrence: ", num_v_heads,
               " value heads over ", num_k_heads, " key heads");
    cpu::gdn_recurrence(qkv, qkv_stride, num_k_heads, num_v_heads, k_dim, v_dim, q_scale, g, beta,
                        gdn_sequences(seqs), ssm_state, out);
  }
  void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                      float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim,
                      float* out) override {
    cpu::gdn_gated_norm(x, z, z_stride, weight, eps, num_rows, num_heads, head_dim, out);
  }
  void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                        int64_t gate_stride) override {
    cpu::sigmoid_gate_mul(x, num_rows, width, gate, gate_stride);
  }
  double timed_seconds(const std::function<void()>& work) override {
    auto start = std::chrono::steady_clock::now();
    work();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

 private:
  // 64-byte aligned so weight rows and activations start on cache lines (AVX-512 loads).
  // Huge pages from 2 MiB up where the kernel offers them (kernels/base/host_memory.h).
  static void* allocate_zeroed(size_t nbytes) {
    try {
      return allocate_host_zeroed(nbytes);
    } catch (const std::bad_alloc&) {
      throw_error("out of host memory allocating ", nbytes, " bytes");
    }
  }
  static void record_time(const ExpertTimes& times, int64_t local, double start_s, double seconds) {
    if (times.start_s != nullptr) times.start_s[local] = start_s;
    if (times.seconds != nullptr) times.seconds[local] = seconds;
  }
  static math::GdnSequences gdn_sequences(const RecurrentSeqs& seqs) {
    return math::GdnSequences{seqs.row_starts, seqs.slots, seqs.fresh, seqs.num_seqs};
  }
  // Runs fn(Kv{}) with the storage format of `dtype` (kernels/math/kv_math.h).
  template <typename Fn>
  static void with_kv_format(math::KvDType dtype, Fn&& fn) {
    switch (dtype) {
      case math::KvDType::kF32:
        return fn(math::KvF32{});
      case math::KvDType::kBF16:
        return fn(math::KvBF16{});
      case math::KvDType::kFp8E4M3:
        return fn(math::KvFp8E4M3{});
    }
    KEEL_CHECK(false, "unknown KV cache dtype ", static_cast<int>(dtype));
  }
  template <typename Kv>
  static math::PagedKvRowsOf<Kv> paged_rows(const KvPoolView& pool, const void* base, int64_t seq,
                                            int64_t layer, int64_t kv_head, float scale) {
    const int64_t block_elements = pool.block_size * pool.head_dim;
    math::PagedKvRowsOf<Kv> rows;
    rows.head_base = static_cast<const typename Kv::Storage*>(base) +
                     (layer * pool.num_blocks * pool.kv_heads + kv_head) * block_elements;
    rows.block_table = pool.block_tables + seq * pool.max_blocks_per_seq;
    rows.block_stride = pool.kv_heads * block_elements;
    rows.block_size = pool.block_size;
    rows.head_dim = pool.head_dim;
    rows.scale = scale;
    return rows;
  }

  cpu::WorkerPool pool_;
  cpu::WorkerPool serial_{1};                    // for work a part of pool_ runs on its own thread
  std::vector<std::vector<float>> part_scores_;  // [thread] attention scores
  std::vector<float> cos_sin_, probs_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  if (threads < 1) throw_error("threads per rank must be at least 1 (got ", threads, ")");
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace keel
