// One rank's shard of the model and its forward pass.
//
// Sharding (each weight is replicated, split on an axis, or produces a partial sum):
//   embed_tokens               replicated [V, H]
//   q/k/v_proj (+bias)         column-parallel: rank r holds its query heads and the KV heads
//                              those heads read (KV heads replicated when num_kv_heads < tp)
//   o_proj                     row-parallel: columns of its query heads -> partial [T, H]
//   router (mlp.gate)          replicated; identical input bits on every rank -> identical choice
//   routed experts             whole experts on the rank the placement names
//   shared expert, dense MLP   gate/up column-parallel, down row-parallel -> partial [T, H]
//   lm_head                    vocab-parallel rows, logits all-gathered
// Hybrid models (Qwen3.5 / Qwen3-Next):
//   q_proj with output gate    column-parallel per head: query and gate halves of its heads
//   GDN in_proj (q|k|v|z|b|a)  column-parallel by head: rank r holds key heads
//                              [r*hk, (r+1)*hk) and value heads [r*hv, (r+1)*hv), contiguous,
//                              so each value head's key head is local; conv channels, A_log,
//                              dt_bias follow their heads; the recurrent state is per rank
//   GDN out_proj               row-parallel -> partial [T, H]
// One all-reduce after attention (or the GDN block) and one after the MLP/MoE block turn
// partials into replicated activations; nowhere else.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "comm/communicator.h"
#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/kv_cache.h"
#include "runtime/model/model_config.h"
#include "scheduler/placement.h"

namespace keel {

enum class CombinePrecision : uint8_t { kFp32, kRoundPerExpert };
// How NVFP4 checkpoints meet their activations: fp32 (weight-only, what non-Blackwell GPUs run)
// or W4A4 (activations quantized per 16 with the checkpoint's input_scale, as Blackwell FP4
// tensor cores compute; kernels/math/quant_math.h).
enum class Nvfp4Activations : uint8_t { kFp32, kW4A4 };
std::string_view nvfp4_activations_name(Nvfp4Activations mode);
// "fp32" or "w4a4"; throws keel::Error naming `what` (the key or flag) and the bad value.
Nvfp4Activations parse_nvfp4_activations(std::string_view name, std::string_view what);
std::string_view combine_precision_name(CombinePrecision precision);
CombinePrecision parse_combine_precision(std::string_view name);

// A weight matrix on the backend's device, row-major [rows = out_features, cols = in_features]:
// dense in its storage dtype, or in one of keel's quantized layouts (kernels/math/quant_math.h:
// codes in `data`, per-group scales, int4 zero points and act-order groups, NVFP4 per-row global
// scales and the W4A4 input scale).
struct Matrix {
  DeviceArray data;
  int64_t rows = 0;
  int64_t cols = 0;
  math::WeightFormat format = math::WeightFormat::kDense;
  DeviceArray scales, zeros, group_of_k, row_scales;
  float input_scale = 0;  // NVFP4: the checkpoint's input_scale, used when W4A4 is selected
  bool w4a4 = false;      // NVFP4: quantize activations per 16 with input_scale
  int64_t ld = 0;         // row stride of data (elements dense, bytes packed); 0 means cols
  int64_t scale_ld = 0;
  int64_t group_size = 0;

  DType dtype() const { return data.dtype(); }
  bool quantized() const { return format != math::WeightFormat::kDense; }
  // Device bytes of the weight with all its scales.
  int64_t nbytes() const {
    return static_cast<int64_t>(data.nbytes() + scales.nbytes() + zeros.nbytes() +
                                group_of_k.nbytes() + row_scales.nbytes());
  }
  // What the GEMMs read (pointers into this matrix's arrays).
  math::WeightView view() const {
    math::WeightView view;
    view.format = format;
    view.dtype = data.dtype();
    view.data = data.data();
    view.scales = scales.empty() ? nullptr : scales.data();
    view.zeros = zeros.empty() ? nullptr : static_cast<const uint8_t*>(zeros.data());
    view.group_of_k = group_of_k.empty() ? nullptr : group_of_k.i32();
    view.row_scales = row_scales.empty() ? nullptr : row_scales.f32();
    view.input_scale = w4a4 ? input_scale : 0.0f;
    view.rows = rows;
    view.cols = cols;
    view.ld = ld > 0 ? ld : cols;
    view.scale_ld = scale_ld;
    view.group_size = group_size;
    return view;
  }
};

struct ExpertWeights {
  Matrix gate_up;  // [2 * I, H]: gate rows then up rows
  Matrix down;     // [H, I]
};

struct LayerWeights {
  LayerKind kind = LayerKind::kFullAttention;
  // Index among the model's layers of the same kind: the layer's slice of the KV pool (full
  // attention) or of the recurrent-state slots (linear attention).
  int64_t cache_layer = 0;
  DeviceArray input_norm;  // f32 [H] (zero-centred norms: 1 + w, folded in at load)
  DeviceArray post_norm;   // f32 [H]
  // [(q_local + 2 * kv_local (+ q_local gate rows with attn_output_gate)) * head_dim, H]: this
  // rank's query heads, its KV heads, then the query heads' output-gate halves.
  Matrix qkv;
  DeviceArray qkv_bias;  // f32, empty when the model has none
  DeviceArray q_norm;    // f32 [head_dim], empty without qk-norm
  DeviceArray k_norm;
  Matrix o_proj;  // [H, q_local * head_dim]
  // Gated DeltaNet (kLinearAttention), this rank's key heads [k0, k0 + hk) and value heads
  // [v0, v0 + hv) (contiguous, so each value head's key head is local):
  Matrix linear_in;            // rows [q (hk*dk) | k (hk*dk) | v (hv*dv) | z (hv*dv)]
  Matrix linear_ba;            // rows [b (hv) | a (hv)]
  DeviceArray conv_weight;     // f32 [2*hk*dk + hv*dv][kernel], channels as the rows of q|k|v
  DeviceArray a_log, dt_bias;  // f32 [hv]
  DeviceArray linear_norm;     // f32 [dv], the gated norm's plain weight
  Matrix linear_out;           // [H, hv*dv], row-parallel
  bool is_moe = false;
  Matrix router;                          // [E, H]
  std::vector<ExpertWeights> experts;     // local experts, ascending expert id
  std::vector<int32_t> local_expert_ids;  // [num local] -> expert id (host, for telemetry)
  DeviceArray expert_to_local;            // int32 [E] -> local index or -1 (for moe_pack)
  DeviceArray gate_up_table, down_table;  // [num local] device pointers to the experts' weights
  // [num local] math::WeightView of each expert's matrices, when the experts are quantized.
  DeviceArray gate_up_views, down_views;
  ExpertWeights shared;      // shared expert or dense MLP shard (I / tp wide)
  int64_t shared_width = 0;  // local intermediate width of `shared`
  Matrix shared_gate;        // [1, H] sigmoid gate of the shared expert
};

// This rank's sequence caches. The paged KV pool: k and v as [attention layers][num_blocks]
// [kv_local][block_size][head_dim] elements of `dtype` (fp32, bf16 or fp8 e4m3:
// kernels/math/kv_math.h; kernels/math/ops_math.h, PagedKvRowsOf), for the full-attention
// layers only; fp8 pools carry the per-layer k/v scales (host, [attention layers]). Hybrid models
// add recurrent-state slots, one per running sequence: conv_state [linear
// layers][num_state_slots][conv channels local][kernel - 1] and ssm_state [linear
// layers][num_state_slots][v heads local][key head dim][value head dim], fp32. Which blocks and
// slot hold which sequence is the scheduler's business (scheduler/block_manager.h,
// batch_scheduler.h); a step names them in StepBatch.
struct KvPool {
  DeviceArray k;
  DeviceArray v;
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  math::KvDType dtype = math::KvDType::kF32;
  std::vector<float> k_scales, v_scales;  // fp8 only; empty: 1
  DeviceArray conv_state;
  DeviceArray ssm_state;
  int64_t num_state_slots = 0;
};

// What one forward step computes: tokens of several sequences, concatenated (host arrays).
// Sequence i of the step owns row i of block_tables ([num_seqs][max_blocks_per_seq], block ids
// in position order, unused tail entries -1); token t belongs to sequence cache_idx[t] and sits
// at absolute position positions[t].
struct StepBatch {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> positions;
  std::vector<int32_t> cache_idx;    // per token: its sequence's row of block_tables
  std::vector<int32_t> logits_rows;  // token rows whose logits are wanted, in output order
  std::vector<int32_t> block_tables;
  int64_t max_blocks_per_seq = 0;
  // Hybrid models: [block_tables rows] the recurrent-state slot of each sequence. A sequence's
  // tokens must then be contiguous rows at consecutive positions; one whose first token is at
  // position 0 starts from a zero state, any other continues from its slot's state.
  std::vector<int32_t> state_slots;
  // Router replay: when non-empty, [moe layer (increasing)][token][top_k] expert ids every MoE
  // layer must use instead of its own top-k (weights still come from this step's router).
  std::vector<int32_t> forced_routes;

  // Gives every one of num_seqs sequences its own run of blocks: sequence s holds blocks
  // [s * blocks_per_seq, (s + 1) * blocks_per_seq), enough for `capacity` positions (what
  // generate() uses; the server takes block tables from the block manager instead).
  void set_contiguous_block_tables(int64_t num_seqs, int64_t capacity, int64_t block_size);
  // state_slots = 0, 1, ..., num_seqs - 1 (generate's layout too).
  void set_identity_state_slots(int64_t num_seqs);
};

// Phases of a forward step, timed per rank when telemetry is on (Backend::timed_seconds: steady
// clock on CPU, CUDA events on GPU). kAttention includes the QKV/O projections; kRouter the
// router GEMM and top-k; kPack the packing (with the slot map) and the gather of expert rows;
// kExperts the expert FFNs; kCombine the shared expert and the combine; kAllReduce
// the two all-reduces per layer and the logits all-gather; kOther embedding, norms, dense MLPs,
// final norm and lm_head; kLinearAttention a Gated DeltaNet layer's projections, conv,
// recurrence, gated norm and out_proj.
enum class Phase : uint8_t {
  kAttention,
  kAllReduce,
  kRouter,
  kPack,
  kExperts,
  kCombine,
  kOther,
  kLinearAttention
};
inline constexpr int kNumPhases = 8;
std::string_view phase_name(Phase phase);

// One timed span of a step on one rank, for traces: layer -1 outside layers, expert -1 unless
// the span is one expert's GEMMs. start_s is on the process's steady clock.
struct TraceEvent {
  Phase phase = Phase::kOther;
  int32_t layer = -1;
  int32_t expert = -1;
  double start_s = 0;
  double seconds = 0;
};

// What one forward step observed on this rank (RankModel::set_observing). Written only by the
// rank's own thread during forward(); read after it (the engine reads other thread ranks' only
// after a collective that orders the writes before the reads).
struct StepObservation {
  std::array<double, kNumPhases> phase_seconds{};
  std::vector<float> expert_seconds;  // [layer * num_experts + expert], experts of this rank
  // This step's routing (identical on every rank): [moe layer][token][top_k] ids and weights,
  // [moe layer][token] margins (k-th minus (k+1)-th router probability). Ids always; weights
  // only with capture_routing; margins always.
  std::vector<int32_t> route_ids;
  std::vector<float> route_weights;
  std::vector<float> margins;
  std::vector<TraceEvent> trace;  // when tracing
};

struct RankOptions {
  comm::ReduceAlgo reduce = comm::ReduceAlgo::kFixedOrder;
  CombinePrecision combine = CombinePrecision::kFp32;
  // The KV pool's storage dtype (resolved: the engine turns `auto` into one) and, for fp8,
  // the checkpoint's per-layer scales (runtime/model/kv_cache.h; empty: 1 for every layer).
  math::KvDType kv_dtype = math::KvDType::kF32;
  KvScales kv_scales;
  // NVFP4 checkpoints: quantize activations per 16 with each layer's input_scale (W4A4, as
  // Blackwell FP4 tensor cores compute) instead of multiplying fp32 activations (weight-only).
  bool nvfp4_w4a4 = false;
};

// Counts of tokens routed to each expert, [layer][expert], accumulated over steps.
using ExpertCounts = std::vector<std::vector<int64_t>>;

class RankModel {
 public:
  // Loads this rank's shard onto `backend`'s device; throws keel::Error (naming file/tensor)
  // on any mismatch. `backend` must outlive the model.
  RankModel(const ModelConfig& config, const Checkpoint& checkpoint,
            const ExpertPlacement& placement, int tp_rank, int tp_size, RankOptions options,
            Backend& backend);

  // num_state_slots: recurrent-state slots, one per sequence that may run at once (hybrid
  // models; ignored by models without linear-attention layers).
  KvPool make_kv_pool(int64_t num_blocks, int64_t block_size, int64_t num_state_slots = 0);
  // Bytes of one KV block on this rank (K and V, every full-attention layer, in the pool's
  // dtype).
  int64_t kv_block_bytes(int64_t block_size) const;
  math::KvDType kv_dtype() const { return options_.kv_dtype; }
  // Bytes of one sequence's recurrent state on this rank (conv + SSM, every linear layer); 0
  // for models without linear-attention layers.
  int64_t state_slot_bytes() const;

  // Runs one step on this rank. `logits` receives [logits_rows, vocab] on the host (identical
  // on all ranks). Collectives go through `comm`, whose pointers are this backend's memory;
  // every rank must call with the same batch.
  void forward(const StepBatch& batch, KvPool& pool, comm::Communicator& comm,
               std::vector<float>& logits);

  const ExpertCounts& expert_counts() const { return expert_counts_; }
  Backend& backend() { return backend_; }
  // Running hash of every routing decision this rank made. The router is replicated, so all
  // ranks must agree; the engine checks this after every generate call.
  uint64_t routing_fingerprint() const { return routing_fingerprint_; }

  // Telemetry for the next steps: phase and expert timings, margins and routing ids (observe),
  // routing weights too (capture_routing), and per-span trace events (trace). Off: forward()
  // takes no clock readings and copies nothing extra.
  void set_observing(bool observe, bool capture_routing, bool trace) {
    observe_ = observe || trace || capture_routing;
    capture_routing_ = capture_routing;
    trace_ = trace;
  }

  // What the last forward() observed (empty fields when not observing).
  const StepObservation& observation() const { return observation_; }
  int64_t weight_bytes() const;

 private:
  // Loading (weights.cpp): one full-attention block, one MLP/MoE block.
  void load_attention(const ModelConfig& config, const Checkpoint& checkpoint,
                      const std::string& prefix, LayerWeights& layer);
  void load_mlp_block(const ModelConfig& config, const Checkpoint& checkpoint,
                      const ExpertPlacement& placement, const std::string& prefix,
                      int64_t layer_idx, LayerWeights& layer);
  // Device scratch of at least `count` elements of fp32 (or int32), grown as needed.
  float* scratch(DeviceArray& array, size_t count);
  int32_t* scratch_i32(DeviceArray& array, size_t count);
  int32_t* upload(const std::vector<int32_t>& host, DeviceArray& array);
  const math::PackedRoute* upload_routes(const std::vector<math::PackedRoute>& host,
                                         DeviceArray& array);

  void attention(int64_t layer_idx, int64_t num_tokens, const Backend::KvPoolView& view);
  void linear_attention(int64_t layer_idx, int64_t num_tokens, const Backend::RecurrentSeqs& seqs,
                        KvPool& pool);
  // The step's sequences for the recurrent ops: checks contiguity, positions and slots on the
  // host and uploads row starts, slots and fresh flags.
  Backend::RecurrentSeqs upload_recurrent_seqs(const StepBatch& batch, const KvPool& pool);
  // forced_routes: this layer's [token][top_k] replayed choices (device), or nullptr. moe_idx:
  // the layer's index among MoE layers (its slice of the step's routing slabs).
  void moe(int64_t layer_idx, int64_t moe_idx, int64_t num_tokens, const int32_t* forced_routes);
  // After the logits: the step's routing to the host, once (counts, fingerprint, observation).
  void fold_step_routing(int64_t num_tokens);
  // Runs `work`, timed into `phase` (and a trace event) when observing.
  template <typename Fn>
  void timed(Phase phase, int64_t layer, Fn&& work);
  void dense_mlp(const ExpertWeights& weights, int64_t width, int64_t num_tokens, float* out);

  const ModelConfig& config_;
  Backend& backend_;
  int tp_rank_;
  int tp_size_;
  RankOptions options_;
  DType expert_dtype_ = DType::kF32;

  int64_t q_heads_local_ = 0;
  int64_t first_q_head_ = 0;
  int64_t kv_heads_local_ = 0;
  int64_t first_kv_head_ = 0;
  DeviceArray kv_head_of_q_;  // int32 [q_heads_local]: local q head -> local kv head
  int64_t vocab_chunk_ = 0;   // padded rows of lm_head per rank
  // Gated DeltaNet heads of this rank (contiguous: key heads first_k_head_ + [0, k_heads_local_)).
  int64_t linear_k_heads_local_ = 0;
  int64_t linear_v_heads_local_ = 0;
  int64_t linear_first_k_head_ = 0;
  int64_t linear_first_v_head_ = 0;
  int64_t linear_conv_local_ = 0;  // conv channels: 2 * hk * dk + hv * dv

  Matrix embed_;
  std::vector<LayerWeights> layers_;
  DeviceArray final_norm_;
  Matrix lm_head_;  // [vocab_chunk, H], rows past the vocab are zero

  ExpertCounts expert_counts_;
  uint64_t routing_fingerprint_ = 0;
  bool observe_ = false;
  bool capture_routing_ = false;
  bool trace_ = false;
  StepObservation observation_;
  int64_t num_moe_layers_ = 0;
  std::vector<int64_t> moe_layer_ids_;  // [moe idx] -> layer idx

  // Device scratch, grown as needed and reused across steps.
  // route_ids_, route_weights_ and route_margins_ are the step's routing slabs: [moe layer]
  // [token][top_k] (margins [moe layer][token]), copied to the host once after the logits.
  DeviceArray hidden_, normed_, qkv_, attn_out_, partial_, router_logits_, route_weights_,
      route_margins_, expert_in_, expert_mid_, expert_act_, expert_out_, shared_out_,
      shared_gate_logits_, lm_in_, local_logits_, gathered_logits_, linear_proj_, linear_conv_,
      linear_g_, linear_beta_, linear_core_;
  DeviceArray forced_routes_;
  DeviceArray token_ids_, positions_, cache_idx_, block_tables_, logits_rows_, route_ids_,
      pack_offsets_, packed_routes_, slot_rows_, seq_row_starts_, seq_slots_, seq_fresh_;
  // Host copies: the logits, and the step's routing for counts, fingerprint and telemetry.
  std::vector<int32_t> host_route_ids_;
  std::vector<math::PackedRoute> host_logits_routes_;
  std::vector<float> host_gathered_logits_;
  std::vector<double> host_expert_seconds_, host_expert_starts_;
};

}  // namespace keel
