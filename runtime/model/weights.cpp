// Loading one rank's shard: every weight is cut from the mapped checkpoint into host staging
// and uploaded once (see model.h for which weights are replicated, split or partial). Checkpoint
// names: Qwen2/Qwen3-MoE (mlp.experts.{e}.*_proj or fused 3-D experts.gate_up_proj/down_proj)
// and Mixtral (block_sparse_moe.experts.{e}.w1/w2/w3).
#include <algorithm>
#include <cstring>

#include "kernels/base/buffer.h"
#include "kernels/base/check.h"
#include "runtime/model/model.h"

namespace keel {

namespace {

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

}  // namespace keel
