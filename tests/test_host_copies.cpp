// The forward pass copies nothing to the host between the embedding and the logits: the MoE
// dispatch (pack, gather, expert FFNs, combine) reads its routing where the router wrote it. A
// backend wrapper records every op of a step in order; the test asserts that
//  - no device-to-host copy happens before the step's last compute op (the lm_head GEMM), with
//    and without telemetry observing the step, at TP=1 and TP=2, on models with dense layers,
//    shared experts and several MoE layers;
//  - the number of device-to-host copies per step does not grow with the number of layers: 2
//    without telemetry (logits, then the step's routing ids), and only telemetry's extras when
//    observing.
// A copy inside the layer loop (the old host-side packing did one per MoE layer) fails both.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/thread_comm.h"
#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/model.h"
#include "runtime/model/model_config.h"
#include "scheduler/placement.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

enum class OpKind { kCopyToHost, kCopyFromHost, kEmbed, kCompute };

// Forwards every op to the CPU backend and logs what kind of op it was.
class RecordingBackend final : public Backend {
 public:
  RecordingBackend() : inner_(make_cpu_backend()) {}
  std::vector<OpKind> ops;

  Device device() const override { return inner_->device(); }
  DeviceArray allocate(DType dtype, size_t count) override {
    return inner_->allocate(dtype, count);
  }
  DeviceArray allocate_bytes(size_t nbytes) override { return inner_->allocate_bytes(nbytes); }
  void copy_from_host(const void* host, size_t bytes, void* device_dst) override {
    ops.push_back(OpKind::kCopyFromHost);
    inner_->copy_from_host(host, bytes, device_dst);
  }
  void copy_to_host(const void* device_src, size_t bytes, void* host_dst) override {
    ops.push_back(OpKind::kCopyToHost);
    inner_->copy_to_host(device_src, bytes, host_dst);
  }
  void embed(const void* table, DType table_dtype, int64_t vocab, int64_t width,
             const int32_t* token_ids, int64_t num_tokens, float* out) override {
    ops.push_back(OpKind::kEmbed);
    inner_->embed(table, table_dtype, vocab, width, token_ids, num_tokens, out);
  }
  void gemm(const float* x, const void* w, DType w_dtype, float* y, int64_t m, int64_t n,
            int64_t k) override {
    compute();
    inner_->gemm(x, w, w_dtype, y, m, n, k);
  }
  void matmul(const float* x, const math::WeightView& w, float* y, int64_t m) override {
    compute();
    inner_->matmul(x, w, y, m);
  }
  void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
                float* out) override {
    compute();
    inner_->rms_norm(x, weight, eps, num_rows, width, out);
  }
  void head_norm(float* rows, int64_t row_stride, int64_t first_col, int64_t num_heads,
                 int64_t head_dim, const float* weight, float eps, int64_t num_rows) override {
    compute();
    inner_->head_norm(rows, row_stride, first_col, num_heads, head_dim, weight, eps, num_rows);
  }
  void add_bias(float* x, const float* bias, int64_t num_rows, int64_t width) override {
    compute();
    inner_->add_bias(x, bias, num_rows, width);
  }
  void rope(float* rows, int64_t row_stride, int64_t num_q_heads, int64_t k_col,
            int64_t num_k_heads, int64_t head_dim, int64_t rotary_dim, double theta,
            const int32_t* positions, int64_t num_rows, int64_t max_positions) override {
    compute();
    inner_->rope(rows, row_stride, num_q_heads, k_col, num_k_heads, head_dim, rotary_dim, theta,
                 positions, num_rows, max_positions);
  }
  void kv_append(const float* rows, int64_t row_stride, int64_t k_col, int64_t v_col,
                 const int32_t* positions, const int32_t* cache_idx, int64_t num_rows,
                 int64_t layer_idx, const KvPoolView& pool) override {
    compute();
    inner_->kv_append(rows, row_stride, k_col, v_col, positions, cache_idx, num_rows, layer_idx,
                      pool);
  }
  void attention(const float* rows, int64_t row_stride, int64_t num_q_heads,
                 const int32_t* kv_head_of_q, const int32_t* positions, const int32_t* cache_idx,
                 int64_t num_rows, int64_t layer_idx, const KvPoolView& pool, float scale,
                 float* out) override {
    compute();
    inner_->attention(rows, row_stride, num_q_heads, kv_head_of_q, positions, cache_idx, num_rows,
                      layer_idx, pool, scale, out);
  }
  void route_top_k(const float* logits, int64_t num_rows, int64_t num_experts, int64_t top_k,
                   bool normalize, int32_t* expert_ids, float* expert_weights, float* margins,
                   const int32_t* forced_ids) override {
    compute();
    inner_->route_top_k(logits, num_rows, num_experts, top_k, normalize, expert_ids, expert_weights,
                        margins, forced_ids);
  }
  void permute_rows(const float* src, const math::PackedRoute* routes, int64_t num_rows,
                    int64_t width, float* dst) override {
    compute();
    inner_->permute_rows(src, routes, num_rows, width, dst);
  }
  void moe_pack(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                const int32_t* expert_to_local, int64_t num_experts, int64_t num_local,
                int32_t* offsets, math::PackedRoute* routes, int32_t* slot_rows) override {
    compute();
    inner_->moe_pack(expert_ids, num_tokens, top_k, expert_to_local, num_experts, num_local,
                     offsets, routes, slot_rows);
  }
  void moe_gather(const float* x, int64_t width, const MoeDispatch& dispatch,
                  float* expert_in) override {
    compute();
    inner_->moe_gather(x, width, dispatch, expert_in);
  }
  void moe_experts(const float* expert_in, const MoeDispatch& dispatch, const ExpertTable& experts,
                   float* mid, float* act, float* expert_out, const ExpertTimes* times) override {
    compute();
    inner_->moe_experts(expert_in, dispatch, experts, mid, act, expert_out, times);
  }
  void silu_mul(const float* gate_up, int64_t num_rows, int64_t width, float* out) override {
    compute();
    inner_->silu_mul(gate_up, num_rows, width, out);
  }
  void moe_combine(const float* expert_out, int64_t width, const int32_t* slot_rows,
                   const float* expert_weights, int64_t num_tokens, int64_t top_k,
                   DType round_dtype, const float* shared, const float* shared_gate_logits,
                   float* out) override {
    compute();
    inner_->moe_combine(expert_out, width, slot_rows, expert_weights, num_tokens, top_k,
                        round_dtype, shared, shared_gate_logits, out);
  }
  void add(float* dst, const float* src, int64_t count) override {
    compute();
    inner_->add(dst, src, count);
  }
  void gdn_conv(const float* rows, int64_t row_stride, int64_t channels, const float* weight,
                int64_t kernel, const RecurrentSeqs& seqs, float* conv_state, float* out) override {
    compute();
    inner_->gdn_conv(rows, row_stride, channels, weight, kernel, seqs, conv_state, out);
  }
  void gdn_gates(const float* rows, int64_t row_stride, int64_t a_col, int64_t b_col,
                 int64_t num_heads, const float* a_log, const float* dt_bias, int64_t num_rows,
                 float* g, float* beta) override {
    compute();
    inner_->gdn_gates(rows, row_stride, a_col, b_col, num_heads, a_log, dt_bias, num_rows, g, beta);
  }
  void gdn_recurrence(const float* qkv, int64_t qkv_stride, int64_t num_k_heads,
                      int64_t num_v_heads, int64_t k_dim, int64_t v_dim, float q_scale,
                      const float* g, const float* beta, const RecurrentSeqs& seqs,
                      float* ssm_state, float* out) override {
    compute();
    inner_->gdn_recurrence(qkv, qkv_stride, num_k_heads, num_v_heads, k_dim, v_dim, q_scale, g,
                           beta, seqs, ssm_state, out);
  }
  void gdn_gated_norm(const float* x, const float* z, int64_t z_stride, const float* weight,
                      float eps, int64_t num_rows, int64_t num_heads, int64_t head_dim,
                      float* out) override {
    compute();
    inner_->gdn_gated_norm(x, z, z_stride, weight, eps, num_rows, num_heads, head_dim, out);
  }
  void sigmoid_gate_mul(float* x, int64_t num_rows, int64_t width, const float* gate,
                        int64_t gate_stride) override {
    compute();
    inner_->sigmoid_gate_mul(x, num_rows, width, gate, gate_stride);
  }
  double timed_seconds(const std::function<void()>& work) override {
    return inner_->timed_seconds(work);
  }

 private:
  void compute() { ops.push_back(OpKind::kCompute); }
  std::unique_ptr<Backend> inner_;
};

// Per-process checkpoints (ctest runs test processes in parallel), removed at exit.
struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-models/host-copies-" + std::to_string(::getpid());
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string model_dir(const std::string& preset) {
  static ScratchDir scratch;
  const std::string dir = scratch.path + "/" + preset;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 5;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

struct StepCopies {
  int64_t copies_before_last_compute = 0;
  int64_t copies_after_last_compute = 0;
};

// Splits one step's op log at its last compute op.
StepCopies count_copies(const std::vector<OpKind>& ops) {
  size_t last_compute = 0;
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i] == OpKind::kCompute) last_compute = i;
  StepCopies copies;
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i] == OpKind::kCopyToHost)
      ++(i < last_compute ? copies.copies_before_last_compute : copies.copies_after_last_compute);
  return copies;
}

// Runs a prefill step and three decode steps on tp_size thread ranks, each rank on its own
// RecordingBackend; returns every rank's copies per step.
std::vector<std::vector<StepCopies>> run_steps(const std::string& preset, int tp_size,
                                               bool observe) {
  const std::string dir = model_dir(preset);
  const ModelConfig config = ModelConfig::load(dir + "/config.json");
  const Checkpoint checkpoint = Checkpoint::open(dir);
  const ExpertPlacement placement =
      ExpertPlacement::build(PlacementSpec{}, config.num_layers, config.num_experts, tp_size);
  comm::ThreadGroup group(tp_size);
  std::vector<std::vector<StepCopies>> per_rank(static_cast<size_t>(tp_size));
  std::vector<std::thread> threads;
  std::mutex errors_mutex;
  std::vector<std::string> errors;
  for (int tp_rank = 0; tp_rank < tp_size; ++tp_rank) {
    threads.emplace_back([&, tp_rank] {
      try {
        auto communicator = group.communicator(tp_rank);
        RecordingBackend backend;
        RankModel model(config, checkpoint, placement, tp_rank, tp_size, RankOptions{}, backend);
        model.set_observing(observe, observe, observe);
        StepBatch batch;
        batch.token_ids = {3, 1, 4, 1, 5, 9, 2, 6};
        batch.positions = {0, 1, 2, 3, 0, 1, 2, 3};
        batch.cache_idx = {0, 0, 0, 0, 1, 1, 1, 1};
        batch.logits_rows = {3, 7};
        batch.set_contiguous_block_tables(2, 16, 4);
        KvPool pool = model.make_kv_pool(static_cast<int64_t>(batch.block_tables.size()), 4);
        std::vector<float> logits;
        for (int step = 0; step < 4; ++step) {
          backend.ops.clear();
          model.forward(batch, pool, *communicator, logits);
          per_rank[static_cast<size_t>(tp_rank)].push_back(count_copies(backend.ops));
          batch.token_ids = {7 + step, 8 + step};
          batch.positions = {4 + step, 4 + step};
          batch.cache_idx = {0, 1};
          batch.logits_rows = {0, 1};
        }
      } catch (const std::exception& error) {
        std::lock_guard<std::mutex> lock(errors_mutex);
        errors.push_back(error.what());
        group.abort(error.what());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_TRUE(errors.empty()) << errors.front();
  return per_rank;
}

class HostCopies : public ::testing::TestWithParam<std::string> {};

TEST_P(HostCopies, NoCopyToTheHostBeforeTheStepsComputeIsQueued) {
  const ModelConfig config = ModelConfig::load(model_dir(GetParam()) + "/config.json");
  int64_t num_moe_layers = 0;
  for (bool is_moe : config.layer_is_moe) num_moe_layers += is_moe ? 1 : 0;
  ASSERT_GE(num_moe_layers, 2) << "the preset must have several MoE layers to tell per-layer "
                                  "copies from per-step ones";
  for (int tp_size : {1, 2}) {
    for (bool observe : {false, true}) {
      SCOPED_TRACE(testing::Message() << GetParam() << " tp " << tp_size << " observe " << observe);
      const auto per_rank = run_steps(GetParam(), tp_size, observe);
      for (size_t rank = 0; rank < per_rank.size(); ++rank) {
        ASSERT_EQ(per_rank[rank].size(), 4u);
        for (size_t step = 0; step < per_rank[rank].size(); ++step) {
          const StepCopies& copies = per_rank[rank][step];
          EXPECT_EQ(copies.copies_before_last_compute, 0) << "rank " << rank << " step " << step;
          // Logits + routing ids; observing adds margins and weights (capture_routing).
          EXPECT_EQ(copies.copies_after_last_compute, observe ? 4 : 2)
              << "rank " << rank << " step " << step;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, HostCopies,
                         ::testing::Values("tiny", "tiny-qwen2", "tiny-mixtral"));

}  // namespace
}  // namespace keel
