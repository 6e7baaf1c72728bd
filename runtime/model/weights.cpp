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

std::string layer_prefix(const ModelConfig& config, int64_t layer_idx) {
  return config.weight_prefix + "layers." + std::to_string(layer_idx) + ".";
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

// An RMSNorm scale. Zero-centred norms (Qwen3.5 / Qwen3-Next) multiply by (1 + w), which
// transformers forms in fp32 from the stored w: folding the 1 in here gives the same value.
DeviceArray load_norm(Backend& backend, const TensorView& view, int64_t count, bool zero_centered) {
  Buffer vector = load_vector(view, 0, count);
  if (zero_centered)
    for (int64_t i = 0; i < count; ++i) vector.f32()[i] = 1.0f + vector.f32()[i];
  return to_device(backend, vector);
}

// Row ranges of a Gated DeltaNet layer's input projections for one rank, in the order the
// forward pass wants them: [q | k | v | z | b | a] (see LayerWeights::linear_in).
struct LinearHeads {
  int64_t first_k = 0, num_k = 0;  // this rank's key heads
  int64_t first_v = 0, num_v = 0;  // this rank's value heads
  int64_t k_dim = 0, v_dim = 0;
  int64_t total_k = 0, total_v = 0;  // the model's
};

// Qwen3.5: separate in_proj_qkv (rows q | k | v of all heads), in_proj_z, in_proj_b, in_proj_a.
// Qwen3-Next: in_proj_qkvz interleaved per key-head group g as [q_g | k_g | v_g | z_g] (v_g and
// z_g: the group's HV/HK value heads) and in_proj_ba per group as [b_g | a_g].
Matrix load_linear_in(Backend& backend, const Checkpoint& checkpoint, const std::string& prefix,
                      const LinearHeads& heads, int64_t hidden) {
  const int64_t key_dim = heads.total_k * heads.k_dim;
  const int64_t value_dim = heads.total_v * heads.v_dim;
  const int64_t q_rows = heads.num_k * heads.k_dim;
  const int64_t v_rows = heads.num_v * heads.v_dim;
  const int64_t rows = 2 * q_rows + 2 * v_rows + 2 * heads.num_v;
  const int64_t z_row = 2 * q_rows + v_rows;
  const int64_t b_row = z_row + v_rows;
  const int64_t a_row = b_row + heads.num_v;
  if (const TensorView* fused = checkpoint.find(prefix + "in_proj_qkvz.weight")) {
    const int64_t ratio = heads.total_v / heads.total_k;
    const int64_t group_rows = 2 * heads.k_dim + 2 * ratio * heads.v_dim;
    const TensorView& qkvz =
        checkpoint.get(prefix + "in_proj_qkvz.weight", {heads.total_k * group_rows, hidden});
    const TensorView& ba =
        checkpoint.get(prefix + "in_proj_ba.weight", {2 * heads.total_v, hidden});
    HostMatrix matrix = make_matrix(fused->dtype, rows, hidden);
    for (int64_t local = 0; local < heads.num_k; ++local) {
      const int64_t group = heads.first_k + local;
      const int64_t base = group * group_rows;
      const int64_t group_v = ratio * heads.v_dim;
      copy_block(qkvz, 0, base, heads.k_dim, 0, hidden, matrix, local * heads.k_dim);
      copy_block(qkvz, 0, base + heads.k_dim, heads.k_dim, 0, hidden, matrix,
                 q_rows + local * heads.k_dim);
      copy_block(qkvz, 0, base + 2 * heads.k_dim, group_v, 0, hidden, matrix,
                 2 * q_rows + local * group_v);
      copy_block(qkvz, 0, base + 2 * heads.k_dim + group_v, group_v, 0, hidden, matrix,
                 z_row + local * group_v);
      copy_block(ba, 0, group * 2 * ratio, ratio, 0, hidden, matrix, b_row + local * ratio);
      copy_block(ba, 0, group * 2 * ratio + ratio, ratio, 0, hidden, matrix, a_row + local * ratio);
    }
    return to_device(backend, matrix);
  }
  const TensorView& qkv =
      checkpoint.get(prefix + "in_proj_qkv.weight", {2 * key_dim + value_dim, hidden});
  const TensorView& z = checkpoint.get(prefix + "in_proj_z.weight", {value_dim, hidden});
  const TensorView& b = checkpoint.get(prefix + "in_proj_b.weight", {heads.total_v, hidden});
  const TensorView& a = checkpoint.get(prefix + "in_proj_a.weight", {heads.total_v, hidden});
  HostMatrix matrix = make_matrix(qkv.dtype, rows, hidden);
  const int64_t k0 = heads.first_k * heads.k_dim;
  const int64_t v0 = heads.first_v * heads.v_dim;
  copy_block(qkv, 0, k0, q_rows, 0, hidden, matrix, 0);
  copy_block(qkv, 0, key_dim + k0, q_rows, 0, hidden, matrix, q_rows);
  copy_block(qkv, 0, 2 * key_dim + v0, v_rows, 0, hidden, matrix, 2 * q_rows);
  copy_block(z, 0, v0, v_rows, 0, hidden, matrix, z_row);
  copy_block(b, 0, heads.first_v, heads.num_v, 0, hidden, matrix, b_row);
  copy_block(a, 0, heads.first_v, heads.num_v, 0, hidden, matrix, a_row);
  return to_device(backend, matrix);
}

// conv1d.weight [channels, 1, kernel] -> f32 [local channels][kernel], channels q | k | v.
DeviceArray load_conv_weight(Backend& backend, const TensorView& view, const LinearHeads& heads,
                             int64_t kernel) {
  const int64_t key_dim = heads.total_k * heads.k_dim;
  const int64_t q_rows = heads.num_k * heads.k_dim;
  const int64_t v_rows = heads.num_v * heads.v_dim;
  Buffer weight(DType::kF32, static_cast<size_t>((2 * q_rows + v_rows) * kernel));
  auto copy_channels = [&](int64_t src_channel, int64_t count, int64_t dst_channel) {
    for (int64_t c = 0; c < count; ++c)
      for (int64_t j = 0; j < kernel; ++j)
        weight.f32()[(dst_channel + c) * kernel + j] =
            load_as_f32(view.data, view.dtype, static_cast<size_t>((src_channel + c) * kernel + j));
  };
  copy_channels(heads.first_k * heads.k_dim, q_rows, 0);
  copy_channels(key_dim + heads.first_k * heads.k_dim, q_rows, q_rows);
  copy_channels(2 * key_dim + heads.first_v * heads.v_dim, v_rows, 2 * q_rows);
  return to_device(backend, weight);
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

  const std::string& model_prefix = config.weight_prefix;
  const TensorView& embed =
      checkpoint.get(model_prefix + "embed_tokens.weight", {config.vocab_size, hidden});
  embed_ = load_matrix(backend, embed, 0, config.vocab_size, config.vocab_size);
  const TensorView& lm_head = config.tie_word_embeddings
                                  ? embed
                                  : checkpoint.get("lm_head.weight", {config.vocab_size, hidden});
  int64_t vocab_begin = vocab_chunk_ * tp_rank;
  int64_t vocab_rows = std::clamp<int64_t>(config.vocab_size - vocab_begin, 0, vocab_chunk_);
  lm_head_ = load_matrix(backend, lm_head, vocab_begin, vocab_rows, vocab_chunk_);
  const bool zero_centered = config.zero_centered_norm;
  final_norm_ = load_norm(backend, checkpoint.get(model_prefix + "norm.weight", {hidden}), hidden,
                          zero_centered);

  LinearHeads linear;
  if (config.is_hybrid()) {
    if (config.linear_num_key_heads % tp_size != 0 || config.linear_num_value_heads % tp_size != 0)
      throw_error("cannot split the Gated DeltaNet heads (", config.linear_num_key_heads, " key, ",
                  config.linear_num_value_heads, " value) over tp=", tp_size,
                  " ranks (both must be multiples of tp)");
    linear.total_k = config.linear_num_key_heads;
    linear.total_v = config.linear_num_value_heads;
    linear.num_k = linear.total_k / tp_size;
    linear.num_v = linear.total_v / tp_size;
    linear.first_k = linear.num_k * tp_rank;
    linear.first_v = linear.num_v * tp_rank;
    linear.k_dim = config.linear_key_head_dim;
    linear.v_dim = config.linear_value_head_dim;
    linear_k_heads_local_ = linear.num_k;
    linear_v_heads_local_ = linear.num_v;
    linear_first_k_head_ = linear.first_k;
    linear_first_v_head_ = linear.first_v;
    linear_conv_local_ = 2 * linear.num_k * linear.k_dim + linear.num_v * linear.v_dim;
  }
  int64_t num_attention_layers = 0;
  int64_t num_linear_layers = 0;

  for (int64_t layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = layer_prefix(config, layer_idx);
    LayerWeights layer;
    layer.input_norm =
        load_norm(backend, checkpoint.get(prefix + "input_layernorm.weight", {hidden}), hidden,
                  zero_centered);
    layer.post_norm =
        load_norm(backend, checkpoint.get(prefix + "post_attention_layernorm.weight", {hidden}),
                  hidden, zero_centered);
    layer.kind = config.layer_kinds[static_cast<size_t>(layer_idx)];
    if (layer.kind == LayerKind::kLinearAttention) {
      layer.cache_layer = num_linear_layers++;
      const std::string gdn = prefix + "linear_attn.";
      const int64_t kernel = config.linear_conv_kernel;
      layer.linear_in = load_linear_in(backend, checkpoint, gdn, linear, hidden);
      layer.conv_weight = load_conv_weight(
          backend, checkpoint.get(gdn + "conv1d.weight", {config.linear_conv_dim(), 1, kernel}),
          linear, kernel);
      layer.a_log = to_device(backend, load_vector(checkpoint.get(gdn + "A_log", {linear.total_v}),
                                                   linear.first_v, linear.num_v));
      layer.dt_bias =
          to_device(backend, load_vector(checkpoint.get(gdn + "dt_bias", {linear.total_v}),
                                         linear.first_v, linear.num_v));
      layer.linear_norm =
          load_norm(backend, checkpoint.get(gdn + "norm.weight", {linear.v_dim}), linear.v_dim,
                    /*zero_centered=*/false);
      const TensorView& out_proj =
          checkpoint.get(gdn + "out_proj.weight", {hidden, config.linear_value_dim()});
      HostMatrix out_shard = make_matrix(out_proj.dtype, hidden, linear.num_v * linear.v_dim);
      copy_block(out_proj, 0, 0, hidden, linear.first_v * linear.v_dim, linear.num_v * linear.v_dim,
                 out_shard, 0);
      layer.linear_out = to_device(backend, out_shard);
    } else {
      layer.cache_layer = num_attention_layers++;
      load_attention(config, checkpoint, prefix, layer);
    }
    load_mlp_block(config, checkpoint, placement, prefix, layer_idx, layer);
    layers_.push_back(std::move(layer));
  }
  // Ranks that hold no expert still round with the model's expert dtype.
  if (expert_dtype_ == DType::kF32) expert_dtype_ = embed_.dtype();
}

void RankModel::load_attention(const ModelConfig& config, const Checkpoint& checkpoint,
                               const std::string& prefix, LayerWeights& layer) {
  Backend& backend = backend_;
  const int64_t hidden = config.hidden_size;
  const int64_t head_dim = config.head_dim;
  const int64_t q_rows = q_heads_local_ * head_dim;
  const int64_t kv_rows = kv_heads_local_ * head_dim;
  const bool zero_centered = config.zero_centered_norm;
  {
    const std::string attn = prefix + "self_attn.";
    // With attn_output_gate, q_proj holds per head [query_h | gate_h] (2 * head_dim rows);
    // the gate halves move behind K and V so the query heads stay contiguous.
    const bool gated = config.attn_output_gate;
    const int64_t q_head_rows = gated ? 2 * head_dim : head_dim;
    const TensorView& q_proj =
        checkpoint.get(attn + "q_proj.weight", {config.num_heads * q_head_rows, hidden});
    const TensorView& k_proj =
        checkpoint.get(attn + "k_proj.weight", {config.num_kv_heads * head_dim, hidden});
    const TensorView& v_proj =
        checkpoint.get(attn + "v_proj.weight", {config.num_kv_heads * head_dim, hidden});
    HostMatrix qkv = make_matrix(q_proj.dtype, q_rows + 2 * kv_rows + (gated ? q_rows : 0), hidden);
    for (int64_t head = 0; head < q_heads_local_; ++head) {
      const int64_t src = (first_q_head_ + head) * q_head_rows;
      copy_block(q_proj, 0, src, head_dim, 0, hidden, qkv, head * head_dim);
      if (gated)
        copy_block(q_proj, 0, src + head_dim, head_dim, 0, hidden, qkv,
                   q_rows + 2 * kv_rows + head * head_dim);
    }
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
      layer.q_norm = load_norm(backend, checkpoint.get(attn + "q_norm.weight", {head_dim}),
                               head_dim, zero_centered);
      layer.k_norm = load_norm(backend, checkpoint.get(attn + "k_norm.weight", {head_dim}),
                               head_dim, zero_centered);
    }
    const TensorView& o_proj =
        checkpoint.get(attn + "o_proj.weight", {hidden, config.num_heads * head_dim});
    HostMatrix o_shard = make_matrix(o_proj.dtype, hidden, q_rows);
    copy_block(o_proj, 0, 0, hidden, first_q_head_ * head_dim, q_rows, o_shard, 0);
    layer.o_proj = to_device(backend, o_shard);
  }
}

void RankModel::load_mlp_block(const ModelConfig& config, const Checkpoint& checkpoint,
                               const ExpertPlacement& placement, const std::string& prefix,
                               int64_t layer_idx, LayerWeights& layer) {
  Backend& backend = backend_;
  const int64_t hidden = config.hidden_size;
  const int tp_rank = tp_rank_;
  const int tp_size = tp_size_;
  {
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
      return;
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
  }
}

// Every weight the rank holds on its device: matrices at the checkpoint's dtype (the whole
// embedding table, lm_head's padded ceil(vocab / tp) rows -- a copy when tied -- q/k/v/o, Gated
// DeltaNet in/out, routers, shared-expert gate, this rank's experts and MLP slices) and the fp32
// vectors made at load (input/post-attention/final norms, q/k norms, q/k/v biases, conv1d, A_log,
// dt_bias, the gated norm). Index tables (expert maps, pointer tables) are not weights. The
// planner's keel_layout (runtime/tools/planning/model_spec.h) counts the same bytes.
int64_t RankModel::weight_bytes() const {
  auto bytes = [](const Matrix& matrix) { return matrix.nbytes(); };
  auto array_bytes = [](const DeviceArray& array) { return static_cast<int64_t>(array.nbytes()); };
  int64_t total = bytes(embed_) + bytes(lm_head_) + array_bytes(final_norm_);
  for (const LayerWeights& layer : layers_) {
    total += array_bytes(layer.input_norm) + array_bytes(layer.post_norm) +
             array_bytes(layer.q_norm) + array_bytes(layer.k_norm) + array_bytes(layer.qkv_bias);
    total += bytes(layer.linear_in) + bytes(layer.linear_out) +
             static_cast<int64_t>(layer.conv_weight.nbytes() + layer.a_log.nbytes() +
                                  layer.dt_bias.nbytes() + layer.linear_norm.nbytes());
    total += bytes(layer.qkv) + bytes(layer.o_proj) + bytes(layer.router) +
             bytes(layer.shared.gate_up) + bytes(layer.shared.down) + bytes(layer.shared_gate);
    for (const ExpertWeights& expert : layer.experts)
      total += bytes(expert.gate_up) + bytes(expert.down);
  }
  return total;
}

}  // namespace keel
