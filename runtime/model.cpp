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
#include <cmath>
#include <cstring>

#include "kernels/base/check.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops.h"

namespace keel {

std::string_view combine_precision_name(CombinePrecision precision) {
  return precision == CombinePrecision::kFp32 ? "fp32" : "round_per_expert";
}

CombinePrecision parse_combine_precision(std::string_view name) {
  if (name == "fp32") return CombinePrecision::kFp32;
  if (name == "round_per_expert") return CombinePrecision::kRoundPerExpert;
  throw_error("unknown expert-combine precision '", name, "' (expected fp32 or round_per_expert)");
}

namespace {

template <typename T>
void ensure_size(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
}

std::string layer_prefix(int64_t layer_idx) {
  return "model.layers." + std::to_string(layer_idx) + ".";
}

Matrix make_matrix(DType dtype, int64_t rows, int64_t cols) {
  Matrix matrix;
  matrix.data = Buffer(dtype, static_cast<size_t>(rows * cols));
  matrix.rows = rows;
  matrix.cols = cols;
  return matrix;
}

// Copies rows [row0, row0 + num_rows) and columns [col0, col0 + num_cols) of a matrix view
// (for a 3-D view, of its slice `outer`) into `dst` starting at row `dst_row`.
void copy_block(const TensorView& view, int64_t outer, int64_t row0, int64_t num_rows, int64_t col0,
                int64_t num_cols, Matrix& dst, int64_t dst_row) {
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
ExpertWeights load_mlp(const MlpViews& views, int64_t intermediate, int64_t hidden, int64_t col0,
                       int64_t width) {
  ExpertWeights weights;
  weights.gate_up = make_matrix(views.gate->dtype, 2 * width, hidden);
  weights.down = make_matrix(views.down->dtype, hidden, width);
  if (views.up == nullptr) {
    copy_block(*views.gate, views.outer, col0, width, 0, hidden, weights.gate_up, 0);
    copy_block(*views.gate, views.outer, intermediate + col0, width, 0, hidden, weights.gate_up,
               width);
  } else {
    copy_block(*views.gate, 0, col0, width, 0, hidden, weights.gate_up, 0);
    copy_block(*views.up, 0, col0, width, 0, hidden, weights.gate_up, width);
  }
  copy_block(*views.down, views.outer, 0, hidden, col0, width, weights.down, 0);
  return weights;
}

}  // namespace

RankModel::RankModel(const ModelConfig& config, const Checkpoint& checkpoint,
                     const ExpertPlacement& placement, int tp_rank, int tp_size,
                     RankOptions options)
    : config_(config), tp_rank_(tp_rank), tp_size_(tp_size), options_(options) {
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
  for (int64_t q_head = 0; q_head < q_heads_local_; ++q_head)
    kv_head_of_q_.push_back(
        static_cast<int32_t>((first_q_head_ + q_head) / group - first_kv_head_));

  vocab_chunk_ = (config.vocab_size + tp_size - 1) / tp_size;
  expert_counts_.assign(static_cast<size_t>(config.num_layers),
                        std::vector<int64_t>(static_cast<size_t>(config.num_experts), 0));

  const TensorView& embed =
      checkpoint.get("model.embed_tokens.weight", {config.vocab_size, hidden});
  embed_ = make_matrix(embed.dtype, config.vocab_size, hidden);
  copy_block(embed, 0, 0, config.vocab_size, 0, hidden, embed_, 0);

  const TensorView& lm_head = config.tie_word_embeddings
                                  ? embed
                                  : checkpoint.get("lm_head.weight", {config.vocab_size, hidden});
  lm_head_ = make_matrix(lm_head.dtype, vocab_chunk_, hidden);
  int64_t vocab_begin = vocab_chunk_ * tp_rank;
  int64_t vocab_rows = std::clamp<int64_t>(config.vocab_size - vocab_begin, 0, vocab_chunk_);
  if (vocab_rows > 0) copy_block(lm_head, 0, vocab_begin, vocab_rows, 0, hidden, lm_head_, 0);
  final_norm_ = load_vector(checkpoint.get("model.norm.weight", {hidden}), 0, hidden);

  const int64_t q_rows = q_heads_local_ * head_dim;
  const int64_t kv_rows = kv_heads_local_ * head_dim;
  for (int64_t layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = layer_prefix(layer_idx);
    LayerWeights layer;
    layer.input_norm =
        load_vector(checkpoint.get(prefix + "input_layernorm.weight", {hidden}), 0, hidden);
    layer.post_norm = load_vector(
        checkpoint.get(prefix + "post_attention_layernorm.weight", {hidden}), 0, hidden);

    const std::string attn = prefix + "self_attn.";
    const TensorView& q_proj =
        checkpoint.get(attn + "q_proj.weight", {config.num_heads * head_dim, hidden});
    const TensorView& k_proj =
        checkpoint.get(attn + "k_proj.weight", {config.num_kv_heads * head_dim, hidden});
    const TensorView& v_proj =
        checkpoint.get(attn + "v_proj.weight", {config.num_kv_heads * head_dim, hidden});
    layer.qkv = make_matrix(q_proj.dtype, q_rows + 2 * kv_rows, hidden);
    copy_block(q_proj, 0, first_q_head_ * head_dim, q_rows, 0, hidden, layer.qkv, 0);
    copy_block(k_proj, 0, first_kv_head_ * head_dim, kv_rows, 0, hidden, layer.qkv, q_rows);
    copy_block(v_proj, 0, first_kv_head_ * head_dim, kv_rows, 0, hidden, layer.qkv,
               q_rows + kv_rows);
    if (config.attention_bias) {
      layer.qkv_bias = Buffer(DType::kF32, static_cast<size_t>(q_rows + 2 * kv_rows));
      Buffer q_bias =
          load_vector(checkpoint.get(attn + "q_proj.bias", {config.num_heads * head_dim}),
                      first_q_head_ * head_dim, q_rows);
      Buffer k_bias =
          load_vector(checkpoint.get(attn + "k_proj.bias", {config.num_kv_heads * head_dim}),
                      first_kv_head_ * head_dim, kv_rows);
      Buffer v_bias =
          load_vector(checkpoint.get(attn + "v_proj.bias", {config.num_kv_heads * head_dim}),
                      first_kv_head_ * head_dim, kv_rows);
      float* bias = layer.qkv_bias.f32();
      std::copy_n(q_bias.f32(), q_rows, bias);
      std::copy_n(k_bias.f32(), kv_rows, bias + q_rows);
      std::copy_n(v_bias.f32(), kv_rows, bias + q_rows + kv_rows);
      if (checkpoint.find(attn + "o_proj.bias") != nullptr)
        throw_error("checkpoint ", checkpoint.directory(), ": ", attn,
                    "o_proj.bias is not supported (attention_bias on o_proj)");
    }
    if (config.qk_norm) {
      layer.q_norm = load_vector(checkpoint.get(attn + "q_norm.weight", {head_dim}), 0, head_dim);
      layer.k_norm = load_vector(checkpoint.get(attn + "k_norm.weight", {head_dim}), 0, head_dim);
    }
    const TensorView& o_proj =
        checkpoint.get(attn + "o_proj.weight", {hidden, config.num_heads * head_dim});
    layer.o_proj = make_matrix(o_proj.dtype, hidden, q_rows);
    copy_block(o_proj, 0, 0, hidden, first_q_head_ * head_dim, q_rows, layer.o_proj, 0);

    layer.is_moe = config.layer_is_moe[static_cast<size_t>(layer_idx)];
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
          load_mlp(views, inter, hidden, layer.shared_width * tp_rank, layer.shared_width);
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
    layer.router = make_matrix(router.dtype, num_experts, hidden);
    copy_block(router, 0, 0, num_experts, 0, hidden, layer.router, 0);

    layer.expert_to_local.assign(static_cast<size_t>(num_experts), -1);
    const TensorView* fused_gate_up = checkpoint.find(moe + "experts.gate_up_proj");
    const TensorView* fused_down = nullptr;
    if (fused_gate_up != nullptr) {
      fused_gate_up =
          &checkpoint.get(moe + "experts.gate_up_proj", {num_experts, 2 * inter, hidden});
      fused_down = &checkpoint.get(moe + "experts.down_proj", {num_experts, hidden, inter});
    }
    for (int32_t expert : placement.local_experts(layer_idx, tp_rank)) {
      layer.expert_to_local[static_cast<size_t>(expert)] =
          static_cast<int32_t>(layer.experts.size());
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
      layer.experts.push_back(load_mlp(views, inter, hidden, 0, inter));
      expert_dtype_ = layer.experts.back().gate_up.dtype();
    }

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
      layer.shared =
          load_mlp(views, shared_inter, hidden, layer.shared_width * tp_rank, layer.shared_width);
      const TensorView& gate = checkpoint.get(moe + "shared_expert_gate.weight", {1, hidden});
      layer.shared_gate = make_matrix(gate.dtype, 1, hidden);
      copy_block(gate, 0, 0, 1, 0, hidden, layer.shared_gate, 0);
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

KvCache RankModel::make_cache(int64_t capacity) const {
  KvCache cache;
  cache.capacity = capacity;
  size_t elements =
      static_cast<size_t>(config_.num_layers * kv_heads_local_ * capacity * config_.head_dim);
  cache.k = Buffer(DType::kF32, elements);
  cache.v = Buffer(DType::kF32, elements);
  return cache;
}

void RankModel::forward(const StepBatch& batch, std::vector<KvCache>& caches,
                        comm::Communicator& comm, std::vector<float>& logits) {
  const int64_t num_tokens = static_cast<int64_t>(batch.token_ids.size());
  const int64_t hidden = config_.hidden_size;
  KEEL_CHECK(batch.positions.size() == batch.token_ids.size() &&
             batch.cache_idx.size() == batch.token_ids.size());
  ensure_size(hidden_, static_cast<size_t>(num_tokens * hidden));
  ensure_size(normed_, static_cast<size_t>(num_tokens * hidden));
  ensure_size(partial_, static_cast<size_t>(num_tokens * hidden));

  for (int64_t token = 0; token < num_tokens; ++token) {
    int32_t token_id = batch.token_ids[static_cast<size_t>(token)];
    if (token_id < 0 || token_id >= config_.vocab_size)
      throw_error("token id ", token_id, " is outside the vocabulary [0, ", config_.vocab_size,
                  ")");
    cpu::to_f32(static_cast<const std::byte*>(embed_.data.data()) +
                    static_cast<size_t>(token_id * hidden) * dtype_size(embed_.dtype()),
                embed_.dtype(), hidden, hidden_.data() + token * hidden);
  }

  for (int64_t layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
    cpu::rms_norm(hidden_.data(), layer.input_norm.f32(), static_cast<float>(config_.rms_norm_eps),
                  num_tokens, hidden, normed_.data());
    attention(layer_idx, batch, caches);
    comm.all_reduce(partial_.data(), static_cast<size_t>(num_tokens * hidden), options_.reduce);
    for (int64_t i = 0; i < num_tokens * hidden; ++i) hidden_[i] += partial_[i];

    cpu::rms_norm(hidden_.data(), layer.post_norm.f32(), static_cast<float>(config_.rms_norm_eps),
                  num_tokens, hidden, normed_.data());
    if (layer.is_moe) {
      moe(layer_idx, num_tokens);
    } else {
      dense_mlp(layer.shared, layer.shared_width, num_tokens, partial_.data());
    }
    comm.all_reduce(partial_.data(), static_cast<size_t>(num_tokens * hidden), options_.reduce);
    for (int64_t i = 0; i < num_tokens * hidden; ++i) hidden_[i] += partial_[i];
  }

  // Final norm and vocab-parallel lm_head only on the rows whose logits are wanted.
  const int64_t num_rows = static_cast<int64_t>(batch.logits_rows.size());
  ensure_size(lm_in_, static_cast<size_t>(num_rows * hidden));
  for (int64_t row = 0; row < num_rows; ++row) {
    int32_t token = batch.logits_rows[static_cast<size_t>(row)];
    KEEL_CHECK(token >= 0 && token < num_tokens, "logits row ", token);
    cpu::rms_norm(hidden_.data() + token * hidden, final_norm_.f32(),
                  static_cast<float>(config_.rms_norm_eps), 1, hidden,
                  lm_in_.data() + row * hidden);
  }
  ensure_size(local_logits_, static_cast<size_t>(num_rows * vocab_chunk_));
  cpu::gemm(lm_in_.data(), lm_head_.data.data(), lm_head_.dtype(), local_logits_.data(), num_rows,
            vocab_chunk_, hidden);
  ensure_size(gathered_logits_, static_cast<size_t>(num_rows * vocab_chunk_ * tp_size_));
  comm.all_gather(local_logits_.data(), static_cast<size_t>(num_rows * vocab_chunk_),
                  gathered_logits_.data());
  const int64_t vocab = config_.vocab_size;
  logits.resize(static_cast<size_t>(num_rows * vocab));
  for (int rank = 0; rank < tp_size_; ++rank) {
    int64_t vocab_begin = vocab_chunk_ * rank;
    int64_t count = std::clamp<int64_t>(vocab - vocab_begin, 0, vocab_chunk_);
    for (int64_t row = 0; row < num_rows; ++row)
      std::copy_n(gathered_logits_.data() + (rank * num_rows + row) * vocab_chunk_, count,
                  logits.data() + row * vocab + vocab_begin);
  }
}

void RankModel::attention(int64_t layer_idx, const StepBatch& batch, std::vector<KvCache>& caches) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t num_tokens = static_cast<int64_t>(batch.token_ids.size());
  const int64_t head_dim = config_.head_dim;
  const int64_t q_width = q_heads_local_ * head_dim;
  const int64_t kv_width = kv_heads_local_ * head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  ensure_size(qkv_, static_cast<size_t>(num_tokens * qkv_width));
  ensure_size(attn_out_, static_cast<size_t>(num_tokens * q_width));
  ensure_size(cos_sin_, static_cast<size_t>(config_.rotary_dim));
  cpu::gemm(normed_.data(), layer.qkv.data.data(), layer.qkv.dtype(), qkv_.data(), num_tokens,
            qkv_width, config_.hidden_size);

  // Pass 1: bias, qk-norm, RoPE, and append K/V to each token's cache, so that pass 2 sees
  // every earlier position of the same sequence, including those in this step.
  for (int64_t token = 0; token < num_tokens; ++token) {
    float* row = qkv_.data() + token * qkv_width;
    if (!layer.qkv_bias.empty())
      for (int64_t i = 0; i < qkv_width; ++i) row[i] += layer.qkv_bias.f32()[i];
    if (config_.qk_norm) {
      cpu::rms_norm(row, layer.q_norm.f32(), eps, q_heads_local_, head_dim, row);
      cpu::rms_norm(row + q_width, layer.k_norm.f32(), eps, kv_heads_local_, head_dim,
                    row + q_width);
    }
    int64_t position = batch.positions[static_cast<size_t>(token)];
    cpu::rope_cos_sin(position, config_.rope_theta, config_.rotary_dim, cos_sin_.data());
    cpu::apply_rope(row, q_heads_local_, head_dim, config_.rotary_dim, cos_sin_.data());
    cpu::apply_rope(row + q_width, kv_heads_local_, head_dim, config_.rotary_dim, cos_sin_.data());
    KvCache& cache = caches[static_cast<size_t>(batch.cache_idx[static_cast<size_t>(token)])];
    if (position >= cache.capacity)
      throw_error("rank ", tp_rank_, ": position ", position, " exceeds KV cache capacity ",
                  cache.capacity);
    for (int64_t kv_head = 0; kv_head < kv_heads_local_; ++kv_head) {
      size_t offset = static_cast<size_t>(
          ((layer_idx * kv_heads_local_ + kv_head) * cache.capacity + position) * head_dim);
      std::copy_n(row + q_width + kv_head * head_dim, head_dim, cache.k.f32() + offset);
      std::copy_n(row + q_width + kv_width + kv_head * head_dim, head_dim, cache.v.f32() + offset);
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int64_t token = 0; token < num_tokens; ++token) {
    KvCache& cache = caches[static_cast<size_t>(batch.cache_idx[static_cast<size_t>(token)])];
    int64_t num_positions = batch.positions[static_cast<size_t>(token)] + 1;
    ensure_size(scores_, static_cast<size_t>(num_positions));
    size_t layer_offset =
        static_cast<size_t>(layer_idx * kv_heads_local_ * cache.capacity * head_dim);
    cpu::attention_decode(qkv_.data() + token * qkv_width, q_heads_local_, kv_head_of_q_.data(),
                          cache.k.f32() + layer_offset, cache.v.f32() + layer_offset,
                          cache.capacity, head_dim, num_positions, scale, scores_.data(),
                          attn_out_.data() + token * q_width);
  }
  cpu::gemm(attn_out_.data(), layer.o_proj.data.data(), layer.o_proj.dtype(), partial_.data(),
            num_tokens, config_.hidden_size, q_width);
}

void RankModel::dense_mlp(const ExpertWeights& weights, int64_t width, int64_t num_tokens,
                          float* out) {
  ensure_size(expert_mid_, static_cast<size_t>(num_tokens * 2 * width));
  ensure_size(expert_act_, static_cast<size_t>(num_tokens * width));
  cpu::gemm(normed_.data(), weights.gate_up.data.data(), weights.gate_up.dtype(),
            expert_mid_.data(), num_tokens, 2 * width, config_.hidden_size);
  for (int64_t token = 0; token < num_tokens; ++token)
    cpu::silu_mul(expert_mid_.data() + token * 2 * width,
                  expert_mid_.data() + token * 2 * width + width, width,
                  expert_act_.data() + token * width);
  cpu::gemm(expert_act_.data(), weights.down.data.data(), weights.down.dtype(), out, num_tokens,
            config_.hidden_size, width);
}

void RankModel::moe(int64_t layer_idx, int64_t num_tokens) {
  LayerWeights& layer = layers_[static_cast<size_t>(layer_idx)];
  const int64_t hidden = config_.hidden_size;
  const int64_t num_experts = config_.num_experts;
  const int64_t top_k = config_.top_k;
  const int64_t inter = config_.moe_intermediate_size;

  // Router: replicated, and its input rows are all-reduced bits, so every rank picks the same.
  ensure_size(router_logits_, static_cast<size_t>(num_tokens * num_experts));
  ensure_size(probs_, static_cast<size_t>(num_experts));
  ensure_size(route_ids_, static_cast<size_t>(num_tokens * top_k));
  ensure_size(route_weights_, static_cast<size_t>(num_tokens * top_k));
  cpu::gemm(normed_.data(), layer.router.data.data(), layer.router.dtype(), router_logits_.data(),
            num_tokens, num_experts, hidden);
  std::vector<int64_t>& counts = expert_counts_[static_cast<size_t>(layer_idx)];
  for (int64_t token = 0; token < num_tokens; ++token) {
    cpu::route_top_k(router_logits_.data() + token * num_experts, num_experts, top_k,
                     config_.norm_topk_prob, probs_.data(), route_ids_.data() + token * top_k,
                     route_weights_.data() + token * top_k);
    for (int64_t slot = 0; slot < top_k; ++slot) {
      int32_t expert = route_ids_[token * top_k + slot];
      ++counts[static_cast<size_t>(expert)];
      routing_fingerprint_ =
          (routing_fingerprint_ ^ static_cast<uint64_t>(expert)) * 0x100000001b3ull;
    }
  }

  // Pack this rank's (token, slot) pairs per expert and run each expert once over its batch.
  pack_routes(route_ids_.data(), num_tokens, top_k, layer.expert_to_local, packing_);
  ensure_size(slot_out_, static_cast<size_t>(num_tokens * top_k * hidden));
  for (size_t local = 0; local < layer.experts.size(); ++local) {
    int64_t batch_rows = packing_.num_tokens_of(local);
    if (batch_rows == 0) continue;
    const PackedRoute* routes = packing_.routes.data() + packing_.offsets[local];
    ensure_size(expert_in_, static_cast<size_t>(batch_rows * hidden));
    ensure_size(expert_mid_, static_cast<size_t>(batch_rows * 2 * inter));
    ensure_size(expert_act_, static_cast<size_t>(batch_rows * inter));
    ensure_size(expert_out_, static_cast<size_t>(batch_rows * hidden));
    for (int64_t row = 0; row < batch_rows; ++row)
      std::copy_n(normed_.data() + int64_t{routes[row].token_idx} * hidden, hidden,
                  expert_in_.data() + row * hidden);
    const ExpertWeights& expert = layer.experts[local];
    cpu::gemm(expert_in_.data(), expert.gate_up.data.data(), expert.gate_up.dtype(),
              expert_mid_.data(), batch_rows, 2 * inter, hidden);
    for (int64_t row = 0; row < batch_rows; ++row)
      cpu::silu_mul(expert_mid_.data() + row * 2 * inter,
                    expert_mid_.data() + row * 2 * inter + inter, inter,
                    expert_act_.data() + row * inter);
    cpu::gemm(expert_act_.data(), expert.down.data.data(), expert.down.dtype(), expert_out_.data(),
              batch_rows, hidden, inter);
    for (int64_t row = 0; row < batch_rows; ++row) {
      int64_t pair = int64_t{routes[row].token_idx} * top_k + routes[row].slot_idx;
      std::copy_n(expert_out_.data() + row * hidden, hidden, slot_out_.data() + pair * hidden);
    }
  }

  const bool has_shared = config_.shared_expert_intermediate_size > 0;
  if (has_shared) {
    ensure_size(shared_out_, static_cast<size_t>(num_tokens * hidden));
    dense_mlp(layer.shared, layer.shared_width, num_tokens, shared_out_.data());
  }
  // Canonical combine: per token, local experts in slot order, then the gated shared expert.
  const bool round = options_.combine == CombinePrecision::kRoundPerExpert;
  for (int64_t token = 0; token < num_tokens; ++token) {
    float* out = partial_.data() + token * hidden;
    std::fill(out, out + hidden, 0.0f);
    for (int64_t slot = 0; slot < top_k; ++slot) {
      int32_t expert = route_ids_[token * top_k + slot];
      if (layer.expert_to_local[static_cast<size_t>(expert)] < 0) continue;
      float weight = route_weights_[token * top_k + slot];
      const float* expert_row = slot_out_.data() + (token * top_k + slot) * hidden;
      if (round) {
        for (int64_t i = 0; i < hidden; ++i)
          out[i] += round_to_dtype(weight * expert_row[i], expert_dtype_);
      } else {
        for (int64_t i = 0; i < hidden; ++i) out[i] += weight * expert_row[i];
      }
    }
    if (has_shared) {
      float gate_logit = 0.0f;
      cpu::gemm(normed_.data() + token * hidden, layer.shared_gate.data.data(),
                layer.shared_gate.dtype(), &gate_logit, 1, 1, hidden);
      float gate = cpu::sigmoid(gate_logit);
      const float* shared_row = shared_out_.data() + token * hidden;
      for (int64_t i = 0; i < hidden; ++i) out[i] += gate * shared_row[i];
    }
  }
}

}  // namespace keel
