// Per-rank weights and forward pass. See model.h for the sharding table.
//
// Canonical orders that make a token's bits independent of its batch (batch_invariant):
//  - every GEMM row uses the canonical 16-lane K order (kernels/cpu/gemm.h);
//  - attention for a token runs over its own cache prefix in position order;
//  - the MoE combine adds a token's local expert outputs in top-k slot order, then the
//    shared expert, whatever the packing of other tokens;
//  - partial sums cross ranks only through the communicator's all-reduce.
#include "runtime/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "kernels/base/buffer.h"
#include "kernels/base/check.h"

namespace keel {

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
  }
  return "other";
}

namespace {

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename T>
void ensure_size(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
}

std::string layer_prefix(int64_t layer_idx) {
  return "model.layers." + std::to_string(layer_idx) + ".";
}

// Host staging for one weight: shards are cut from the mapped checkpoint into this, then
// uploaded to the backend's device in one copy.
struct HostMatrix {
  Buffer data;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype() const { return data.dtype(); }
};

HostMatrix make_matrix(DType dtype, int64_t rows, int64_t cols) {
  HostMatrix matrix;
  matrix.data = Buffer(dtype, static_cast<size_t>(rows * cols));
  matrix.rows = rows;
  matrix.cols = cols;
  return matrix;
}

Matrix to_device(Backend& backend, const HostMatrix& host) {
  Matrix matrix;
  matrix.data = backend.allocate(host.dtype(), host.data.size());
  backend.copy_from_host(host.data.data(), host.data.nbytes(), matrix.data.data());
  matrix.rows = host.rows;
  matrix.cols = host.cols;
  return matrix;
}

DeviceArray to_device(Backend& backend, const Buffer& host) {
  DeviceArray array = backend.allocate(host.dtype(), host.size());
  backend.copy_from_host(host.data(), host.nbytes(), array.data());
  return array;
}

DeviceArray to_device(Backend& backend, const std::vector<int32_t>& host) {
  DeviceArray array = backend.allocate_bytes(host.size() * sizeof(int32_t));
  backend.copy_from_host(host.data(), host.size() * sizeof(int32_t), array.data());
  return array;
}

// A table of device pointers in device memory (what the grouped expert kernels index by local
// expert); the pointers are the backend's own, so the table is only read there.
DeviceArray pointer_table(Backend& backend, const std::vector<const void*>& pointers) {
  DeviceArray array = backend.allocate_bytes(pointers.size() * sizeof(const void*));
  backend.copy_from_host(pointers.data(), pointers.size() * sizeof(const void*), array.data());
  return array;
}

// Copies rows [row0, row0 + num_rows) and columns [col0, col0 + num_cols) of a matrix view
// (for a 3-D view, of its slice `outer`) into `dst` starting at row `dst_row`.
void copy_block(const TensorView& view, int64_t outer, int64_t row0, int64_t num_rows, int64_t col0,
                int64_t num_cols, HostMatrix& dst, int64_t dst_row) {
  if (view.dtype != dst.dtype())
    throw_error("file ", view.file, ", tensor ", view.name, ": dtype ", dtype_name(view.dtype),
                " differs from the other parts of the same weight (", dtype_name(dst.dtype()), ")");
  int64_t view_rows = view.shape[view.shape.size() - 2];
  int64_t view_cols = view.shape.back();
  KEEL_CHECK(row0 + num_rows <= view_rows && col0 + num_cols <= view_cols && num_cols == dst.cols);
  size_t element_size = dtype_size(view.dtype);
  const std::byte* base =
      view.data + static_cast<size_t>(outer * view_rows * view_cols) * element_size;
  auto* out = static_cast<std::byte*>(dst.data.data());
  for (int64_t row = 0; row < num_rows; ++row) {
    const std::byte* src =
        base + static_cast<size_t>((row0 + row) * view_cols + col0) * element_size;
    std::memcpy(out + static_cast<size_t>((dst_row + row) * dst.cols) * element_size, src,
                static_cast<size_t>(num_cols) * element_size);
  }
}

// A whole 2-D tensor (or a row range of it) as a device matrix.
Matrix load_matrix(Backend& backend, const TensorView& view, int64_t row0, int64_t num_rows,
                   int64_t padded_rows) {
  HostMatrix host = make_matrix(view.dtype, padded_rows, view.shape.back());
  if (num_rows > 0) copy_block(view, 0, row0, num_rows, 0, view.shape.back(), host, 0);
  return to_device(backend, host);
}

Buffer load_vector(const TensorView& view, int64_t offset, int64_t count) {
  Buffer vector(DType::kF32, static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    vector.f32()[i] = load_as_f32(view.data, view.dtype, static_cast<size_t>(offset + i));
  return vector;
}

// The three projections of a SwiGLU MLP, per expert or fused across experts.
struct MlpViews {
  const TensorView* gate = nullptr;  // [I, H] or fused gate_up [E, 2I, H]
  const TensorView* up = nullptr;    // [I, H] (nullptr when fused)
  const TensorView* down = nullptr;  // [H, I] or fused [E, H, I]
  int64_t outer = 0;                 // expert index into fused tensors
};

// Gate/up rows [col0, col0 + width) and down columns of the same range: a column-parallel
// slice when width < I, a whole expert when width == I.
ExpertWeights load_mlp(Backend& backend, const MlpViews& views, int64_t intermediate,
                       int64_t hidden, int64_t col0, int64_t width) {
  HostMatrix gate_up = make_matrix(views.gate->dtype, 2 * width, hidden);
  HostMatrix down = make_matrix(views.down->dtype, hidden, width);
  if (views.up == nullptr) {
    copy_block(*views.gate, views.outer, col0, width, 0, hidden, gate_up, 0);
    copy_block(*views.gate, views.outer, intermediate + col0, width, 0, hidden, gate_up, width);
  } else {
    copy_block(*views.gate, 0, col0, width, 0, hidden, gate_up, 0);
    copy_block(*views.up, 0, col0, width, 0, hidden, gate_up, width);
  }
  copy_block(*views.down, views.outer, 0, hidden, col0, width, down, 0);
  return ExpertWeights{to_device(backend, gate_up), to_device(backend, down)};
}

}  // namespace

RankModel::RankModel(const ModelConfig& config, const Checkpoint& checkpoint,
                     const ExpertPlacement& placement, int tp_rank, int tp_size,
                     RankOptions options, Backend& backend)
    : config_(config), backend_(backend), tp_rank_(tp_rank), tp_size_(tp_size), options_(options) {
  const int64_t hidden = config.hidden_size;
  const int64_t head_dim = config.head_dim;
  if (config.num_heads % tp_size != 0)
    throw_error("cannot split ", config.num_heads, " attention heads over tp=", tp_size,
                " ranks (num_attention_heads must be a multiple of tp)");
  q_heads_local_ = config.num_heads / tp_size;
  first_q_head_ = q_heads_local_ * tp_rank;
  // The KV heads this rank's query heads read: one group of (num_heads / num_kv_heads) query
  // heads shares a KV head, so with fewer KV heads than ranks a KV head is held by several.
  const int64_t group = config.num_heads / config.num_kv_heads;
  first_kv_head_ = first_q_head_ / group;
  int64_t last_kv_head = (first_q_head_ + q_heads_local_ - 1) / group;
  kv_heads_local_ = last_kv_head - first_kv_head_ + 1;
  std::vector<int32_t> kv_head_of_q;
  for (int64_t q_head = 0; q_head < q_heads_local_; ++q_head)
    kv_head_of_q.push_back(static_cast<int32_t>((first_q_head_ + q_head) / group - first_kv_head_));
  kv_head_of_q_ = to_device(backend, kv_head_of_q);

  vocab_chunk_ = (config.vocab_size + tp_size - 1) / tp_size;
  expert_counts_.assign(static_cast<size_t>(config.num_layers),
                        std::vector<int64_t>(static_cast<size_t>(config.num_experts), 0));
  expert_seconds_.assign(static_cast<size_t>(config.num_layers),
                         std::vector<double>(static_cast<size_t>(config.num_experts), 0.0));

  const TensorView& embed =
      checkpoint.get("model.embed_tokens.weight", {config.vocab_size, hidden});
  embed_ = load_matrix(backend, embed, 0, config.vocab_size, config.vocab_size);
  const TensorView& lm_head = config.tie_word_embeddings
                                  ? embed
                                  : checkpoint.get("lm_head.weight", {config.vocab_size, hidden});
  int64_t vocab_begin = vocab_chunk_ * tp_rank;
  int64_t vocab_rows = std::clamp<int64_t>(config.vocab_size - vocab_begin, 0, vocab_chunk_);
  lm_head_ = load_matrix(backend, lm_head, vocab_begin, vocab_rows, vocab_chunk_);
  final_norm_ =
      to_device(backend, load_vector(checkpoint.get("model.norm.weight", {hidden}), 0, hidden));

  const int64_t q_rows = q_heads_local_ * head_dim;
  const int64_t kv_rows = kv_heads_local_ * head_dim;
  for (int64_t layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = layer_prefix(layer_idx);
    LayerWeights layer;
    layer.input_norm = to_device(
        backend,
        load_vector(checkpoint.get(prefix + "input_layernorm.weight", {hidden}), 0, hidden));
    layer.post_norm = to_device(
        backend, load_vector(checkpoint.get(prefix + "post_attention_layernorm.weight", {hidden}),
                             0, hidden));

    const std::string attn = prefix + "self_attn.";
    const TensorView& q_proj =
        checkpoint.get(attn + "q_proj.weight", {config.num_heads * head_dim, hidden});
    const TensorView& k_proj =
        checkpoint.get(attn + "k_proj.weight", {config.num_kv_heads * head_dim, hidden});
    const TensorView& v_proj =
        checkpoint.get(attn + "v_proj.weight", {config.num_kv_heads * head_dim, hidden});
    HostMatrix qkv = make_matrix(q_proj.dtype, q_rows + 2 * kv_rows, hidden);
    copy_block(q_proj, 0, first_q_head_ * head_dim, q_rows, 0, hidden, qkv, 0);
    copy_block(k_proj, 0, first_kv_head_ * head_dim, kv_rows, 0, hidden, qkv, q_rows);
    copy_block(v_proj, 0, first_kv_head_ * head_dim, kv_rows, 0, hidden, qkv, q_rows + kv_rows);
    layer.qkv = to_device(backend, qkv);
    if (config.attention_bias) {
      Buffer bias(DType::kF32, static_cast<size_t>(q_rows + 2 * kv_rows));
      Buffer q_bias =
          load_vector(checkpoint.get(attn + "q_proj.bias", {config.num_heads * head_dim}),
                      first_q_head_ * head_dim, q_rows);
      Buffer k_bias =
          load_vector(checkpoint.get(attn + "k_proj.bias", {config.num_kv_heads * head_dim}),
                      first_kv_head_ * head_dim, kv_rows);
      Buffer v_bias =
          load_vector(checkpoint.get(attn + "v_proj.bias", {config.num_kv_heads * head_dim}),
                      first_kv_head_ * head_dim, kv_rows);
      std::copy_n(q_bias.f32(), q_rows, bias.f32());
      std::copy_n(k_bias.f32(), kv_rows, bias.f32() + q_rows);
      std::copy_n(v_bias.f32(), kv_rows, bias.f32() + q_rows + kv_rows);
      layer.qkv_bias = to_device(backend, bias);
      if (checkpoint.find(attn + "o_proj.bias") != nullptr)
        throw_error("checkpoint ", checkpoint.directory(), ": ", attn,
                    "o_proj.bias is not supported (attention_bias on o_proj)");
    }
    if (config.qk_norm) {
      layer.q_norm = to_device(
          backend, load_vector(checkpoint.get(attn + "q_norm.weight", {head_dim}), 0, head_dim));
      layer.k_norm = to_device(
          backend, load_vector(checkpoint.get(attn + "k_norm.weight", {head_dim}), 0, head_dim));
    }
    const TensorView& o_proj =
        checkpoint.get(attn + "o_proj.weight", {hidden, config.num_heads * head_dim});
    HostMatrix o_shard = make_matrix(o_proj.dtype, hidden, q_rows);
    copy_block(o_proj, 0, 0, hidden, first_q_head_ * head_dim, q_rows, o_shard, 0);
    layer.o_proj = to_device(backend, o_shard);

    layer.is_moe = config.layer_is_moe[static_cast<size_t>(layer_idx)];
    if (layer.is_moe) {
      ++num_moe_layers_;
      moe_layer_ids_.push_back(layer_idx);
    }
    if (!layer.is_moe) {
      const std::string mlp = prefix + "mlp.";
      const int64_t inter = config.intermediate_size;
      if (inter % tp_size != 0)
        throw_error("cannot split dense MLP intermediate_size ", inter, " over tp=", tp_size);
      MlpViews views{&checkpoint.get(mlp + "gate_proj.weight", {inter, hidden}),
                     &checkpoint.get(mlp + "up_proj.weight", {inter, hidden}),
                     &checkpoint.get(mlp + "down_proj.weight", {hidden, inter}), 0};
      layer.shared_width = inter / tp_size;
      layer.shared =
          load_mlp(backend, views, inter, hidden, layer.shared_width * tp_rank, layer.shared_width);
      layers_.push_back(std::move(layer));
      continue;
    }

    // Mixtral publishes block_sparse_moe.experts.{e}.w1/w3/w2 (gate/up/down); Qwen uses
    // mlp.experts.{e}.gate_proj/up_proj/down_proj, or fused 3-D gate_up_proj/down_proj.
    std::string moe = prefix + "mlp.";
    if (checkpoint.find(prefix + "block_sparse_moe.gate.weight") != nullptr)
      moe = prefix + "block_sparse_moe.";
    const int64_t num_experts = config.num_experts;
    const int64_t inter = config.moe_intermediate_size;
    const TensorView& router = checkpoint.get(moe + "gate.weight", {num_experts, hidden});
    layer.router = load_matrix(backend, router, 0, num_experts, num_experts);

    std::vector<int32_t> expert_to_local(static_cast<size_t>(num_experts), -1);
    const TensorView* fused_gate_up = checkpoint.find(moe + "experts.gate_up_proj");
    const TensorView* fused_down = nullptr;
    if (fused_gate_up != nullptr) {
      fused_gate_up =
          &checkpoint.get(moe + "experts.gate_up_proj", {num_experts, 2 * inter, hidden});
      fused_down = &checkpoint.get(moe + "experts.down_proj", {num_experts, hidden, inter});
    }
    for (int32_t expert : placement.local_experts(layer_idx, tp_rank)) {
      expert_to_local[static_cast<size_t>(expert)] = static_cast<int32_t>(layer.experts.size());
      layer.local_expert_ids.push_back(expert);
      MlpViews views;
      if (fused_gate_up != nullptr) {
        views = MlpViews{fused_gate_up, nullptr, fused_down, expert};
      } else {
        std::string name = moe + "experts." + std::to_string(expert) + ".";
        bool mixtral_names = checkpoint.find(name + "w1.weight") != nullptr;
        views.gate = &checkpoint.get(name + (mixtral_names ? "w1.weight" : "gate_proj.weight"),
                                     {inter, hidden});
        views.up = &checkpoint.get(name + (mixtral_names ? "w3.weight" : "up_proj.weight"),
                                   {inter, hidden});
        views.down = &checkpoint.get(name + (mixtral_names ? "w2.weight" : "down_proj.weight"),
                                     {hidden, inter});
      }
      layer.experts.push_back(load_mlp(backend, views, inter, hidden, 0, inter));
      expert_dtype_ = layer.experts.back().gate_up.dtype();
    }
    layer.expert_to_local = to_device(backend, expert_to_local);
    std::vector<const void*> gate_up_pointers, down_pointers;
    for (const ExpertWeights& expert : layer.experts) {
      gate_up_pointers.push_back(expert.gate_up.data.data());
      down_pointers.push_back(expert.down.data.data());
    }
    layer.gate_up_table = pointer_table(backend, gate_up_pointers);
    layer.down_table = pointer_table(backend, down_pointers);

    if (config.shared_expert_intermediate_size > 0) {
      const int64_t shared_inter = config.shared_expert_intermediate_size;
      if (shared_inter % tp_size != 0)
        throw_error("cannot split shared_expert_intermediate_size ", shared_inter,
                    " over tp=", tp_size);
      const std::string shared = moe + "shared_expert.";
      MlpViews views{&checkpoint.get(shared + "gate_proj.weight", {shared_inter, hidden}),
                     &checkpoint.get(shared + "up_proj.weight", {shared_inter, hidden}),
                     &checkpoint.get(shared + "down_proj.weight", {hidden, shared_inter}), 0};
      layer.shared_width = shared_inter / tp_size;
      layer.shared = load_mlp(backend, views, shared_inter, hidden, layer.shared_width * tp_rank,
                              layer.shared_width);
      layer.shared_gate = load_matrix(
          backend, checkpoint.get(moe + "shared_expert_gate.weight", {1, hidden}), 0, 1, 1);
    }
    layers_.push_back(std::move(layer));
  }
  // Ranks that hold no expert still round with the model's expert dtype.
  if (expert_dtype_ == DType::kF32) expert_dtype_ = embed_.dtype();
}

int64_t RankModel::weight_bytes() const {
  auto bytes = [](const Matrix& matrix) { return static_cast<int64_t>(matrix.data.nbytes()); };
  int64_t total = bytes(embed_) + bytes(lm_head_);
  for (const LayerWeights& layer : layers_) {
    total += bytes(layer.qkv) + bytes(layer.o_proj) + bytes(layer.router) +
             bytes(layer.shared.gate_up) + bytes(layer.shared.down) + bytes(layer.shared_gate);
    for (const ExpertWeights& expert : layer.experts)
      total += bytes(expert.gate_up) + bytes(expert.down);
  }
  return total;
}

void StepBatch::set_contiguous_block_tables(int64_t num_seqs, int64_t capacity,
                                            int64_t block_size) {
  max_blocks_per_seq = (capacity + block_size - 1) / block_size;
  block_tables.resize(static_cast<size_t>(num_seqs * max_blocks_per_seq));
  for (size_t i = 0; i < block_tables.size(); ++i) block_tables[i] = static_cast<int32_t>(i);
}

int64_t RankModel::kv_block_bytes(int64_t block_size) const {
  return 2 * config_.num_layers * kv_heads_local_ * block_size * config_.head_dim *
         static_cast<int64_t>(sizeof(float));
}

KvPool RankModel::make_kv_pool(int64_t num_blocks, int64_t block_size) {
  KEEL_CHECK(num_blocks > 0 && block_size > 0, "KV pool of ", num_blocks, " blocks of ",
             block_size);
  KvPool pool;
  pool.num_blocks = num_blocks;
  pool.block_size = block_size;
  size_t elements = static_cast<size_t>(num_blocks * config_.num_layers * kv_heads_local_ *
                                        block_size * config_.head_dim);
  pool.k = backend_.allocate(DType::kF32, elements);
  pool.v = backend_.allocate(DType::kF32, elements);
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
  const Backend::KvPoolView view{pool.k.f32(),       pool.v.f32(),
                                 config_.num_layers, pool.num_blocks,
                                 kv_heads_local_,    pool.block_size,
                                 config_.head_dim,   upload(batch.block_tables, block_tables_),
                                 max_blocks};

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
  const float eps = static_cast<float>(config_.rms_norm_eps);
  int64_t moe_idx = 0;
  for (int64_t layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
    timed(Phase::kOther, layer_idx, [&] {
      backend_.rms_norm(hidden_states, layer.input_norm.f32(), eps, num_tokens, hidden, normed);
    });
    timed(Phase::kAttention, layer_idx, [&] { attention(layer_idx, num_tokens, view); });
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
    backend_.gemm(lm_in, lm_head_.data.data(), lm_head_.dtype(), local_logits, num_rows,
                  vocab_chunk_, hidden);
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

void RankModel::attention(int64_t layer_idx, int64_t num_tokens, const Backend::KvPoolView& view) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t head_dim = config_.head_dim;
  const int64_t q_width = q_heads_local_ * head_dim;
  const int64_t kv_width = kv_heads_local_ * head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  float* qkv = scratch(qkv_, static_cast<size_t>(num_tokens * qkv_width));
  float* attn_out = scratch(attn_out_, static_cast<size_t>(num_tokens * q_width));
  backend_.gemm(normed_.f32(), layer.qkv.data.data(), layer.qkv.dtype(), qkv, num_tokens, qkv_width,
                config_.hidden_size);
  // Bias, qk-norm, RoPE, then append K/V to each token's cache before any attention, so every
  // token sees every earlier position of its sequence, including those in this step.
  if (!layer.qkv_bias.empty()) backend_.add_bias(qkv, layer.qkv_bias.f32(), num_tokens, qkv_width);
  if (config_.qk_norm) {
    backend_.head_norm(qkv, qkv_width, 0, q_heads_local_, head_dim, layer.q_norm.f32(), eps,
                       num_tokens);
    backend_.head_norm(qkv, qkv_width, q_width, kv_heads_local_, head_dim, layer.k_norm.f32(), eps,
                       num_tokens);
  }
  backend_.rope(qkv, qkv_width, q_heads_local_, q_width, kv_heads_local_, head_dim,
                config_.rotary_dim, config_.rope_theta, positions_.i32(), num_tokens,
                view.capacity());
  backend_.kv_append(qkv, qkv_width, q_width, q_width + kv_width, positions_.i32(),
                     cache_idx_.i32(), num_tokens, layer_idx, view);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  backend_.attention(qkv, qkv_width, q_heads_local_, kv_head_of_q_.i32(), positions_.i32(),
                     cache_idx_.i32(), num_tokens, layer_idx, view, scale, attn_out);
  backend_.gemm(attn_out, layer.o_proj.data.data(), layer.o_proj.dtype(), partial_.f32(),
                num_tokens, config_.hidden_size, q_width);
}

void RankModel::dense_mlp(const ExpertWeights& weights, int64_t width, int64_t num_tokens,
                          float* out) {
  float* mid = scratch(expert_mid_, static_cast<size_t>(num_tokens * 2 * width));
  float* act = scratch(expert_act_, static_cast<size_t>(num_tokens * width));
  backend_.gemm(normed_.f32(), weights.gate_up.data.data(), weights.gate_up.dtype(), mid,
                num_tokens, 2 * width, config_.hidden_size);
  backend_.silu_mul(mid, num_tokens, width, act);
  backend_.gemm(act, weights.down.data.data(), weights.down.dtype(), out, num_tokens,
                config_.hidden_size, width);
}

void RankModel::moe(int64_t layer_idx, int64_t moe_idx, int64_t num_tokens,
                    const int32_t* forced_routes) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t hidden = config_.hidden_size;
  const int64_t num_experts = config_.num_experts;
  const int64_t top_k = config_.top_k;
  const int64_t inter = config_.moe_intermediate_size;
  const int64_t num_local = static_cast<int64_t>(layer.experts.size());
  const size_t num_pairs = static_cast<size_t>(num_tokens * top_k);
  const size_t slab_pairs = static_cast<size_t>(num_moe_layers_) * num_pairs;

  // Router: replicated, and its input rows are all-reduced bits, so every rank picks the same.
  // Its choices go into this layer's slice of the step's routing slabs, on the device.
  float* router_logits = scratch(router_logits_, static_cast<size_t>(num_tokens * num_experts));
  int32_t* route_ids = scratch_i32(route_ids_, slab_pairs) + moe_idx * num_pairs;
  float* route_weights = scratch(route_weights_, slab_pairs) + moe_idx * num_pairs;
  float* margins = scratch(route_margins_, static_cast<size_t>(num_moe_layers_ * num_tokens)) +
                   moe_idx * num_tokens;
  timed(Phase::kRouter, layer_idx, [&] {
    backend_.gemm(normed_.f32(), layer.router.data.data(), layer.router.dtype(), router_logits,
                  num_tokens, num_experts, hidden);
    backend_.route_top_k(router_logits, num_tokens, num_experts, top_k, config_.norm_topk_prob,
                         route_ids, route_weights, margins, forced_routes);
  });

  // Pack this rank's (token, slot) pairs per local expert on the device, gather their rows, then
  // every local expert runs once over its contiguous row range: gate_up, silu*mul, down.
  Backend::MoeDispatch dispatch;
  dispatch.num_local = num_local;
  dispatch.num_tokens = num_tokens;
  dispatch.top_k = top_k;
  const int64_t max_rows = dispatch.max_rows();
  float* expert_in = scratch(expert_in_, static_cast<size_t>(max_rows * hidden));
  timed(Phase::kPack, layer_idx, [&] {
    int32_t* offsets = scratch_i32(pack_offsets_, static_cast<size_t>(num_local + 1));
    auto* routes = reinterpret_cast<math::PackedRoute*>(scratch_i32(packed_routes_, 2 * num_pairs));
    int32_t* slot_rows = scratch_i32(slot_rows_, num_pairs);
    backend_.moe_pack(route_ids, num_tokens, top_k, layer.expert_to_local.i32(), num_experts,
                      num_local, offsets, routes, slot_rows);
    dispatch.offsets = offsets;
    dispatch.routes = routes;
    dispatch.slot_rows = slot_rows;
    backend_.moe_gather(normed_.f32(), hidden, dispatch, expert_in);
  });
  float* mid = scratch(expert_mid_, static_cast<size_t>(max_rows * 2 * inter));
  float* act = scratch(expert_act_, static_cast<size_t>(max_rows * inter));
  float* expert_out = scratch(expert_out_, static_cast<size_t>(max_rows * hidden));
  Backend::ExpertTable table;
  table.gate_up = static_cast<const void* const*>(layer.gate_up_table.data());
  table.down = static_cast<const void* const*>(layer.down_table.data());
  table.dtype = num_local > 0 ? layer.experts.front().gate_up.dtype() : expert_dtype_;
  table.hidden = hidden;
  table.inter = inter;
  if (observe_ || time_experts_) {
    host_expert_seconds_.assign(static_cast<size_t>(num_local), 0.0);
    host_expert_starts_.assign(static_cast<size_t>(num_local), 0.0);
    const Backend::ExpertTimes times{host_expert_seconds_.data(), host_expert_starts_.data()};
    backend_.moe_experts(expert_in, dispatch, table, mid, act, expert_out, &times);
    for (int64_t local = 0; local < num_local; ++local) {
      const double seconds = host_expert_seconds_[static_cast<size_t>(local)];
      if (seconds == 0.0) continue;
      const int32_t expert_id = layer.local_expert_ids[static_cast<size_t>(local)];
      expert_seconds_[static_cast<size_t>(layer_idx)][static_cast<size_t>(expert_id)] += seconds;
      if (!observe_) continue;
      observation_.expert_seconds[static_cast<size_t>(layer_idx * num_experts + expert_id)] +=
          static_cast<float>(seconds);
      observation_.phase_seconds[static_cast<size_t>(Phase::kExperts)] += seconds;
      if (trace_)
        observation_.trace.push_back({Phase::kExperts, static_cast<int32_t>(layer_idx), expert_id,
                                      host_expert_starts_[static_cast<size_t>(local)], seconds});
    }
  } else {
    backend_.moe_experts(expert_in, dispatch, table, mid, act, expert_out, nullptr);
  }

  timed(Phase::kCombine, layer_idx, [&] {
    const float* shared = nullptr;
    const float* shared_gate_logits = nullptr;
    if (config_.shared_expert_intermediate_size > 0) {
      float* shared_out = scratch(shared_out_, static_cast<size_t>(num_tokens * hidden));
      dense_mlp(layer.shared, layer.shared_width, num_tokens, shared_out);
      float* gate_logits = scratch(shared_gate_logits_, static_cast<size_t>(num_tokens));
      backend_.gemm(normed_.f32(), layer.shared_gate.data.data(), layer.shared_gate.dtype(),
                    gate_logits, num_tokens, 1, hidden);
      shared = shared_out;
      shared_gate_logits = gate_logits;
    }
    // Canonical combine: per token, local experts in slot order, then the gated shared expert.
    DType round_dtype =
        options_.combine == CombinePrecision::kRoundPerExpert ? expert_dtype_ : DType::kF32;
    backend_.moe_combine(expert_out, hidden, dispatch.slot_rows, route_weights, num_tokens, top_k,
                         round_dtype, shared, shared_gate_logits, partial_.f32());
  });
}

template <typename Fn>
void RankModel::timed(Phase phase, int64_t layer, Fn&& work) {
  if (!observe_) {
    work();
    return;
  }
  const double start = steady_seconds();
  const double seconds = backend_.timed_seconds(work);
  observation_.phase_seconds[static_cast<size_t>(phase)] += seconds;
  if (trace_)
    observation_.trace.push_back({phase, static_cast<int32_t>(layer), -1, start, seconds});
}

}  // namespace keel
