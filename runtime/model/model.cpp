// The rank model's step: embedding, the layer loop, final norm and the vocab-parallel head, and
// the one copy of the step's routing after the logits. The layers' blocks live in attention.cpp
// and moe.cpp, the loading of the shard in weights.cpp; model.h has the sharding table.
//
// Canonical orders that make a token's bits independent of its batch (batch_invariant):
//  - every GEMM row uses the canonical 16-lane K order (kernels/cpu/gemm.h);
//  - attention for a token runs over its own cache prefix in position order;
//  - the MoE combine adds a token's local expert outputs in top-k slot order, then the
//    shared expert, whatever the packing of other tokens;
//  - partial sums cross ranks only through the communicator's all-reduce.
#include "runtime/model/model.h"

#include <algorithm>
#include <cstring>

#include "kernels/base/check.h"
#include "runtime/model/timed.h"

namespace keel {

std::string_view nvfp4_activations_name(Nvfp4Activations mode) {
  return mode == Nvfp4Activations::kW4A4 ? "w4a4" : "fp32";
}

Nvfp4Activations parse_nvfp4_activations(std::string_view name, std::string_view what) {
  if (name == "fp32") return Nvfp4Activations::kFp32;
  if (name == "w4a4") return Nvfp4Activations::kW4A4;
  throw_error("unknown ", what, " '", name, "' (expected fp32 or w4a4)");
}

std::string_view combine_precision_name(CombinePrecision precision) {
  return precision == CombinePrecision::kFp32 ? "fp32" : "round_per_expert";
}

CombinePrecision parse_combine_precision(std::string_view name) {
  if (name == "fp32") return CombinePrecision::kFp32;
  if (name == "round_per_expert") return CombinePrecision::kRoundPerExpert;
  throw_error("unknown expert-combine precision '", name, "' (expected fp32 or round_per_expert)");
}

std::string_view phase_name(Phase phase) {
  switch (phase) {
    case Phase::kAttention:
      return "attention";
    case Phase::kAllReduce:
      return "allreduce";
    case Phase::kRouter:
      return "router";
    case Phase::kPack:
      return "pack";
    case Phase::kExperts:
      return "experts";
    case Phase::kCombine:
      return "combine";
    case Phase::kOther:
      return "other";
    case Phase::kLinearAttention:
      return "linear_attention";
  }
  return "other";
}

void StepBatch::set_contiguous_block_tables(int64_t num_seqs, int64_t capacity,
                                            int64_t block_size) {
  max_blocks_per_seq = (capacity + block_size - 1) / block_size;
  block_tables.resize(static_cast<size_t>(num_seqs * max_blocks_per_seq));
  for (size_t i = 0; i < block_tables.size(); ++i) block_tables[i] = static_cast<int32_t>(i);
}

void StepBatch::set_identity_state_slots(int64_t num_seqs) {
  state_slots.resize(static_cast<size_t>(num_seqs));
  for (size_t i = 0; i < state_slots.size(); ++i) state_slots[i] = static_cast<int32_t>(i);
}

int64_t RankModel::kv_block_bytes(int64_t block_size) const {
  return 2 * config_.num_attention_layers() * kv_heads_local_ * block_size * config_.head_dim *
         math::kv_element_bytes(options_.kv_dtype);
}

namespace {
// Elements of one slot's state in one linear layer.
int64_t conv_state_elements(const ModelConfig& config, int64_t conv_channels) {
  return conv_channels * (config.linear_conv_kernel - 1);
}
}  // namespace

int64_t RankModel::state_slot_bytes() const {
  const int64_t per_layer =
      conv_state_elements(config_, linear_conv_local_) +
      linear_v_heads_local_ * config_.linear_key_head_dim * config_.linear_value_head_dim;
  return config_.num_linear_layers() * per_layer * static_cast<int64_t>(sizeof(float));
}

KvPool RankModel::make_kv_pool(int64_t num_blocks, int64_t block_size, int64_t num_state_slots) {
  KEEL_CHECK(num_blocks > 0 && block_size > 0, "KV pool of ", num_blocks, " blocks of ",
             block_size);
  KvPool pool;
  pool.num_blocks = num_blocks;
  pool.block_size = block_size;
  size_t elements = static_cast<size_t>(num_blocks * config_.num_attention_layers() *
                                        kv_heads_local_ * block_size * config_.head_dim);
  // Allocated by bytes: the elements are the pool dtype's (kernels/math/kv_math.h).
  const size_t nbytes = std::max<size_t>(elements, 1) *
                        static_cast<size_t>(math::kv_element_bytes(options_.kv_dtype));
  pool.k = backend_.allocate_bytes(nbytes);
  pool.v = backend_.allocate_bytes(nbytes);
  pool.dtype = options_.kv_dtype;
  if (pool.dtype == math::KvDType::kFp8E4M3 && !options_.kv_scales.empty()) {
    KEEL_CHECK(static_cast<int64_t>(options_.kv_scales.k.size()) ==
                   config_.num_attention_layers() &&
               options_.kv_scales.v.size() == options_.kv_scales.k.size());
    pool.k_scales = options_.kv_scales.k;
    pool.v_scales = options_.kv_scales.v;
  }
  if (config_.is_hybrid()) {
    KEEL_CHECK(num_state_slots > 0, "rank ", tp_rank_,
               ": a hybrid model needs recurrent-state slots (0 given)");
    const int64_t linear_layers = config_.num_linear_layers();
    pool.num_state_slots = num_state_slots;
    pool.conv_state = backend_.allocate(
        DType::kF32, static_cast<size_t>(linear_layers * num_state_slots *
                                         conv_state_elements(config_, linear_conv_local_)) +
                         1);
    pool.ssm_state = backend_.allocate(
        DType::kF32,
        static_cast<size_t>(linear_layers * num_state_slots * linear_v_heads_local_ *
                            config_.linear_key_head_dim * config_.linear_value_head_dim));
  }
  return pool;
}

float* RankModel::scratch(DeviceArray& array, size_t count) {
  if (array.nbytes() < count * sizeof(float)) array = backend_.allocate(DType::kF32, count);
  return array.f32();
}

int32_t* RankModel::scratch_i32(DeviceArray& array, size_t count) {
  if (array.nbytes() < count * sizeof(int32_t))
    array = backend_.allocate_bytes(count * sizeof(int32_t));
  return array.i32();
}

const math::PackedRoute* RankModel::upload_routes(const std::vector<math::PackedRoute>& host,
                                                  DeviceArray& array) {
  static_assert(sizeof(math::PackedRoute) == 2 * sizeof(int32_t));
  int32_t* device = scratch_i32(array, 2 * host.size());
  backend_.copy_from_host(host.data(), host.size() * sizeof(math::PackedRoute), device);
  return reinterpret_cast<const math::PackedRoute*>(device);
}

int32_t* RankModel::upload(const std::vector<int32_t>& host, DeviceArray& array) {
  int32_t* device = scratch_i32(array, host.size());
  backend_.copy_from_host(host.data(), host.size() * sizeof(int32_t), device);
  return device;
}

void RankModel::forward(const StepBatch& batch, KvPool& pool, comm::Communicator& comm,
                        std::vector<float>& logits) {
  const int64_t num_tokens = static_cast<int64_t>(batch.token_ids.size());
  const int64_t hidden = config_.hidden_size;
  const size_t activations = static_cast<size_t>(num_tokens * hidden);
  KEEL_CHECK(batch.positions.size() == batch.token_ids.size() &&
             batch.cache_idx.size() == batch.token_ids.size());
  for (int32_t token_id : batch.token_ids)
    if (token_id < 0 || token_id >= config_.vocab_size)
      throw_error("token id ", token_id, " is outside the vocabulary [0, ", config_.vocab_size,
                  ")");
  // Every KV address a token will touch must be inside the pool: the kernels trust it.
  const int64_t max_blocks = batch.max_blocks_per_seq;
  const int64_t num_table_rows =
      max_blocks > 0 ? static_cast<int64_t>(batch.block_tables.size()) / max_blocks : 0;
  KEEL_CHECK(num_table_rows * max_blocks == static_cast<int64_t>(batch.block_tables.size()),
             "block_tables holds ", batch.block_tables.size(), " entries, not a multiple of ",
             max_blocks);
  for (size_t token = 0; token < batch.positions.size(); ++token) {
    const int64_t position = batch.positions[token];
    const int64_t seq = batch.cache_idx[token];
    if (position < 0 || position >= max_blocks * pool.block_size || seq < 0 ||
        seq >= num_table_rows)
      throw_error("rank ", tp_rank_, ": token ", token, " at position ", position,
                  " of sequence row ", seq, " is outside the step's block tables (", num_table_rows,
                  " rows x ", max_blocks, " blocks of ", pool.block_size, ")");
    for (int64_t block = 0; block <= position / pool.block_size; ++block) {
      const int32_t block_id = batch.block_tables[static_cast<size_t>(seq * max_blocks + block)];
      if (block_id < 0 || block_id >= pool.num_blocks)
        throw_error("rank ", tp_rank_, ": token ", token, " at position ", position,
                    " reads KV block ", block_id, " outside the pool of ", pool.num_blocks,
                    " blocks");
    }
  }
  float* hidden_states = scratch(hidden_, activations);
  float* normed = scratch(normed_, activations);
  float* partial = scratch(partial_, activations);
  const int32_t* token_ids = upload(batch.token_ids, token_ids_);
  upload(batch.positions, positions_);
  upload(batch.cache_idx, cache_idx_);
  const Backend::KvPoolView view{pool.k.data(),
                                 pool.v.data(),
                                 config_.num_attention_layers(),
                                 pool.num_blocks,
                                 kv_heads_local_,
                                 pool.block_size,
                                 config_.head_dim,
                                 upload(batch.block_tables, block_tables_),
                                 max_blocks,
                                 pool.dtype,
                                 pool.k_scales.empty() ? nullptr : pool.k_scales.data(),
                                 pool.v_scales.empty() ? nullptr : pool.v_scales.data()};

  // Router replay: the forced choices of every MoE layer, checked here so kernels can trust them.
  const int32_t* forced_routes = nullptr;
  if (!batch.forced_routes.empty()) {
    const size_t expected = static_cast<size_t>(num_moe_layers_ * num_tokens * config_.top_k);
    if (batch.forced_routes.size() != expected)
      throw_error("rank ", tp_rank_, ": router replay gives ", batch.forced_routes.size(),
                  " expert ids for ", num_tokens, " tokens x ", num_moe_layers_,
                  " MoE layers x top_k ", config_.top_k, " (", expected, " expected)");
    for (size_t pair = 0; pair < batch.forced_routes.size(); ++pair) {
      const int32_t expert = batch.forced_routes[pair];
      const size_t first_slot = pair - pair % static_cast<size_t>(config_.top_k);
      bool repeated = false;
      for (size_t slot = first_slot; slot < pair; ++slot)
        repeated |= batch.forced_routes[slot] == expert;
      if (expert < 0 || expert >= config_.num_experts || repeated)
        throw_error("rank ", tp_rank_, ": router replay: expert id ", expert,
                    " is out of range or repeated within a token's top-k");
    }
    forced_routes = upload(batch.forced_routes, forced_routes_);
  }
  if (observe_) {
    observation_.phase_seconds.fill(0.0);
    observation_.expert_seconds.assign(
        static_cast<size_t>(config_.num_layers * config_.num_experts), 0.0f);
    observation_.route_ids.clear();
    observation_.route_weights.clear();
    observation_.margins.clear();
    observation_.trace.clear();
  }

  timed(Phase::kOther, -1, [&] {
    backend_.embed(embed_.data.data(), embed_.dtype(), config_.vocab_size, hidden, token_ids,
                   num_tokens, hidden_states);
  });
  const Backend::RecurrentSeqs recurrent_seqs =
      config_.is_hybrid() ? upload_recurrent_seqs(batch, pool) : Backend::RecurrentSeqs{};
  const float eps = static_cast<float>(config_.rms_norm_eps);
  int64_t moe_idx = 0;
  for (int64_t layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
    timed(Phase::kOther, layer_idx, [&] {
      backend_.rms_norm(hidden_states, layer.input_norm.f32(), eps, num_tokens, hidden, normed);
    });
    if (layer.kind == LayerKind::kLinearAttention) {
      timed(Phase::kLinearAttention, layer_idx,
            [&] { linear_attention(layer_idx, num_tokens, recurrent_seqs, pool); });
    } else {
      timed(Phase::kAttention, layer_idx, [&] { attention(layer_idx, num_tokens, view); });
    }
    timed(Phase::kAllReduce, layer_idx,
          [&] { comm.all_reduce(partial, activations, options_.reduce); });
    timed(Phase::kOther, layer_idx, [&] {
      backend_.add(hidden_states, partial, static_cast<int64_t>(activations));
      backend_.rms_norm(hidden_states, layer.post_norm.f32(), eps, num_tokens, hidden, normed);
    });
    if (layer.is_moe) {
      moe(layer_idx, moe_idx, num_tokens,
          forced_routes == nullptr ? nullptr
                                   : forced_routes + moe_idx * num_tokens * config_.top_k);
      ++moe_idx;
    } else {
      timed(Phase::kOther, layer_idx,
            [&] { dense_mlp(layer.shared, layer.shared_width, num_tokens, partial); });
    }
    timed(Phase::kAllReduce, layer_idx,
          [&] { comm.all_reduce(partial, activations, options_.reduce); });
    timed(Phase::kOther, layer_idx,
          [&] { backend_.add(hidden_states, partial, static_cast<int64_t>(activations)); });
  }

  // Final norm and vocab-parallel lm_head only on the rows whose logits are wanted.
  const int64_t num_rows = static_cast<int64_t>(batch.logits_rows.size());
  for (int32_t row : batch.logits_rows)
    KEEL_CHECK(row >= 0 && row < num_tokens, "logits row ", row);
  host_logits_routes_.resize(batch.logits_rows.size());
  for (size_t row = 0; row < batch.logits_rows.size(); ++row)
    host_logits_routes_[row] = math::PackedRoute{batch.logits_rows[row], 0};
  float* lm_in = scratch(lm_in_, static_cast<size_t>(num_rows * hidden));
  float* local_logits = scratch(local_logits_, static_cast<size_t>(num_rows * vocab_chunk_));
  timed(Phase::kOther, -1, [&] {
    const math::PackedRoute* rows = upload_routes(host_logits_routes_, logits_rows_);
    backend_.permute_rows(hidden_states, rows, num_rows, hidden, lm_in);
    backend_.rms_norm(lm_in, final_norm_.f32(), eps, num_rows, hidden, lm_in);
    backend_.matmul(lm_in, lm_head_.view(), local_logits, num_rows);
  });
  const size_t gathered_count = static_cast<size_t>(num_rows * vocab_chunk_ * tp_size_);
  float* gathered = scratch(gathered_logits_, gathered_count);
  timed(Phase::kAllReduce, -1, [&] {
    comm.all_gather(local_logits, static_cast<size_t>(num_rows * vocab_chunk_), gathered);
  });
  host_gathered_logits_.resize(gathered_count);
  backend_.copy_to_host(gathered, gathered_count * sizeof(float), host_gathered_logits_.data());
  const int64_t vocab = config_.vocab_size;
  logits.resize(static_cast<size_t>(num_rows * vocab));
  for (int rank = 0; rank < tp_size_; ++rank) {
    int64_t vocab_begin = vocab_chunk_ * rank;
    int64_t count = std::clamp<int64_t>(vocab - vocab_begin, 0, vocab_chunk_);
    for (int64_t row = 0; row < num_rows; ++row)
      std::copy_n(host_gathered_logits_.data() + (rank * num_rows + row) * vocab_chunk_, count,
                  logits.data() + row * vocab + vocab_begin);
  }
  fold_step_routing(num_tokens);
}

void RankModel::fold_step_routing(int64_t num_tokens) {
  const size_t num_pairs = static_cast<size_t>(num_tokens * config_.top_k);
  const size_t slab_pairs = static_cast<size_t>(num_moe_layers_) * num_pairs;
  host_route_ids_.resize(slab_pairs);
  if (slab_pairs == 0) return;
  backend_.copy_to_host(route_ids_.data(), slab_pairs * sizeof(int32_t), host_route_ids_.data());
  for (int64_t moe_idx = 0; moe_idx < num_moe_layers_; ++moe_idx) {
    std::vector<int64_t>& counts =
        expert_counts_[static_cast<size_t>(moe_layer_ids_[static_cast<size_t>(moe_idx)])];
    for (size_t pair = 0; pair < num_pairs; ++pair) {
      const int32_t expert = host_route_ids_[static_cast<size_t>(moe_idx) * num_pairs + pair];
      ++counts[static_cast<size_t>(expert)];
      routing_fingerprint_ =
          (routing_fingerprint_ ^ static_cast<uint64_t>(expert)) * 0x100000001b3ull;
    }
  }
  if (!observe_) return;
  // [moe layer][token][slot], as the slabs hold them.
  observation_.route_ids = host_route_ids_;
  observation_.margins.resize(static_cast<size_t>(num_moe_layers_ * num_tokens));
  backend_.copy_to_host(route_margins_.data(), observation_.margins.size() * sizeof(float),
                        observation_.margins.data());
  if (capture_routing_) {
    observation_.route_weights.resize(slab_pairs);
    backend_.copy_to_host(route_weights_.data(), slab_pairs * sizeof(float),
                          observation_.route_weights.data());
  }
}

}  // namespace keel
