// Loading one rank's shard: every weight is cut from the mapped checkpoint into host staging
// and uploaded once (see model.h for which weights are replicated, split or partial). Checkpoint
// names: Qwen2/Qwen3-MoE (mlp.experts.{e}.*_proj or fused 3-D experts.gate_up_proj/down_proj)
// and Mixtral (block_sparse_moe.experts.{e}.w1/w2/w3).
#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>

#include "kernels/base/buffer.h"
#include "kernels/base/check.h"
#include "runtime/model/model.h"
#include "runtime/model/quant_load.h"

namespace keel {

namespace {

std::string layer_prefix(const ModelConfig& config, int64_t layer_idx) {
  return config.weight_prefix + "layers." + std::to_string(layer_idx) + ".";
}

// What the loading helpers share: the device, the checkpoint and how it is quantized.
struct LoadContext {
  Backend& backend;
  const Checkpoint& checkpoint;
  const QuantConfig& quant;
  bool nvfp4_w4a4;

  LinearSource linear(const std::string& module, int64_t rows, int64_t cols) const {
    return find_linear(checkpoint, quant, module, rows, cols);
  }
  Matrix upload(const HostWeight& host) const { return host.to_device(backend, nvfp4_w4a4); }
};

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

// A device array of weight views (what the grouped expert GEMMs index by local expert).
DeviceArray view_table(Backend& backend, const std::vector<math::WeightView>& views) {
  DeviceArray array = backend.allocate_bytes(views.size() * sizeof(math::WeightView));
  backend.copy_from_host(views.data(), views.size() * sizeof(math::WeightView), array.data());
  return array;
}

// A Linear named `module` exists in some layout.
bool has_linear(const Checkpoint& checkpoint, const std::string& module) {
  for (const char* suffix : {".weight", ".qweight", ".weight_packed"})
    if (checkpoint.find(module + suffix) != nullptr) return true;
  return false;
}

// Rows [row0, row0 + num_rows) of a Linear, zero-padded to padded_rows, as a device matrix.
Matrix load_rows(const LoadContext& ctx, const LinearSource& source, int64_t row0, int64_t num_rows,
                 int64_t padded_rows) {
  HostWeight host(source, padded_rows, source.cols);
  if (num_rows > 0) host.copy_rows(source, row0, num_rows, 0, 0);
  return ctx.upload(host);
}

Buffer load_vector(const TensorView& view, int64_t offset, int64_t count) {
  Buffer vector(DType::kF32, static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    vector.f32()[i] = view.f32_at(static_cast<size_t>(offset + i));
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
// Two matrices: [q | k | v | z] and [b | a]. Released FP8 checkpoints keep the narrow b/a
// projections in bf16 while q/k/v/z are quantized, so the two never share one layout.
std::pair<Matrix, Matrix> load_linear_in(const LoadContext& ctx, const std::string& prefix,
                                         const LinearHeads& heads, int64_t hidden) {
  const Checkpoint& checkpoint = ctx.checkpoint;
  const int64_t key_dim = heads.total_k * heads.k_dim;
  const int64_t value_dim = heads.total_v * heads.v_dim;
  const int64_t q_rows = heads.num_k * heads.k_dim;
  const int64_t v_rows = heads.num_v * heads.v_dim;
  const int64_t rows = 2 * q_rows + 2 * v_rows;
  const int64_t z_row = 2 * q_rows + v_rows;
  const int64_t b_row = 0;  // in the [b | a] matrix
  const int64_t a_row = heads.num_v;
  const bool qwen3_next = checkpoint.find(prefix + "in_proj_qkvz.weight") != nullptr ||
                          checkpoint.find(prefix + "in_proj_qkvz.qweight") != nullptr ||
                          checkpoint.find(prefix + "in_proj_qkvz.weight_packed") != nullptr;
  if (qwen3_next) {
    const int64_t ratio = heads.total_v / heads.total_k;
    const int64_t group_rows = 2 * heads.k_dim + 2 * ratio * heads.v_dim;
    const LinearSource qkvz =
        ctx.linear(prefix + "in_proj_qkvz", heads.total_k * group_rows, hidden);
    const LinearSource ba = ctx.linear(prefix + "in_proj_ba", 2 * heads.total_v, hidden);
    HostWeight matrix(qkvz, rows, hidden);
    HostWeight ba_matrix(ba, 2 * heads.num_v, hidden);
    for (int64_t local = 0; local < heads.num_k; ++local) {
      const int64_t group = heads.first_k + local;
      const int64_t base = group * group_rows;
      const int64_t group_v = ratio * heads.v_dim;
      matrix.copy_rows(qkvz, base, heads.k_dim, 0, local * heads.k_dim);
      matrix.copy_rows(qkvz, base + heads.k_dim, heads.k_dim, 0, q_rows + local * heads.k_dim);
      matrix.copy_rows(qkvz, base + 2 * heads.k_dim, group_v, 0, 2 * q_rows + local * group_v);
      matrix.copy_rows(qkvz, base + 2 * heads.k_dim + group_v, group_v, 0, z_row + local * group_v);
      ba_matrix.copy_rows(ba, group * 2 * ratio, ratio, 0, b_row + local * ratio);
      ba_matrix.copy_rows(ba, group * 2 * ratio + ratio, ratio, 0, a_row + local * ratio);
    }
    return {ctx.upload(matrix), ctx.upload(ba_matrix)};
  }
  const LinearSource qkv = ctx.linear(prefix + "in_proj_qkv", 2 * key_dim + value_dim, hidden);
  const LinearSource z = ctx.linear(prefix + "in_proj_z", value_dim, hidden);
  const LinearSource b = ctx.linear(prefix + "in_proj_b", heads.total_v, hidden);
  const LinearSource a = ctx.linear(prefix + "in_proj_a", heads.total_v, hidden);
  HostWeight matrix(qkv, rows, hidden);
  HostWeight ba_matrix(b, 2 * heads.num_v, hidden);
  const int64_t k0 = heads.first_k * heads.k_dim;
  const int64_t v0 = heads.first_v * heads.v_dim;
  matrix.copy_rows(qkv, k0, q_rows, 0, 0);
  matrix.copy_rows(qkv, key_dim + k0, q_rows, 0, q_rows);
  matrix.copy_rows(qkv, 2 * key_dim + v0, v_rows, 0, 2 * q_rows);
  matrix.copy_rows(z, v0, v_rows, 0, z_row);
  ba_matrix.copy_rows(b, heads.first_v, heads.num_v, 0, b_row);
  ba_matrix.copy_rows(a, heads.first_v, heads.num_v, 0, a_row);
  return {ctx.upload(matrix), ctx.upload(ba_matrix)};
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
            view.f32_at(static_cast<size_t>((src_channel + c) * kernel + j));
  };
  copy_channels(heads.first_k * heads.k_dim, q_rows, 0);
  copy_channels(key_dim + heads.first_k * heads.k_dim, q_rows, q_rows);
  copy_channels(2 * key_dim + heads.first_v * heads.v_dim, v_rows, 2 * q_rows);
  return to_device(backend, weight);
}

// The three projections of a SwiGLU MLP, per expert or fused across experts (then `gate` is
// the fused gate_up [2I, H] of one expert and `up` is unset).
struct MlpSources {
  LinearSource gate;  // [I, H] or fused gate_up [2I, H]
  LinearSource up;    // [I, H] (layout unset when fused)
  LinearSource down;  // [H, I]
  bool fused = false;
};

// Gate/up rows [col0, col0 + width) and down columns of the same range: a column-parallel
// slice when width < I, a whole expert when width == I.
ExpertWeights load_mlp(const LoadContext& ctx, const MlpSources& sources, int64_t intermediate,
                       int64_t hidden, int64_t col0, int64_t width) {
  HostWeight gate_up(sources.gate, 2 * width, hidden);
  HostWeight down(sources.down, hidden, width);
  if (sources.fused) {
    gate_up.copy_rows(sources.gate, col0, width, 0, 0);
    gate_up.copy_rows(sources.gate, intermediate + col0, width, 0, width);
  } else {
    gate_up.copy_rows(sources.gate, col0, width, 0, 0);
    gate_up.copy_rows(sources.up, col0, width, 0, width);
  }
  down.copy_rows(sources.down, 0, hidden, col0, 0);
  return ExpertWeights{ctx.upload(gate_up), ctx.upload(down)};
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

  const LoadContext ctx{backend, checkpoint, config.quant, options.nvfp4_w4a4};
  const std::string& model_prefix = config.weight_prefix;
  // The embedding is a row lookup, never a GEMM: it must be stored dense (every format keel
  // reads keeps it so).
  const LinearSource embed = ctx.linear(model_prefix + "embed_tokens", config.vocab_size, hidden);
  if (embed.format() != math::WeightFormat::kDense)
    throw_error("checkpoint ", checkpoint.directory(), ": ", model_prefix,
                "embed_tokens is quantized; keel needs the embedding table in F32/BF16/F16");
  embed_ = load_rows(ctx, embed, 0, config.vocab_size, config.vocab_size);
  const LinearSource lm_head =
      config.tie_word_embeddings ? embed : ctx.linear("lm_head", config.vocab_size, hidden);
  int64_t vocab_begin = vocab_chunk_ * tp_rank;
  int64_t vocab_rows = std::clamp<int64_t>(config.vocab_size - vocab_begin, 0, vocab_chunk_);
  lm_head_ = load_rows(ctx, lm_head, vocab_begin, vocab_rows, vocab_chunk_);
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
      std::tie(layer.linear_in, layer.linear_ba) = load_linear_in(ctx, gdn, linear, hidden);
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
      const LinearSource out_proj = ctx.linear(gdn + "out_proj", hidden, config.linear_value_dim());
      HostWeight out_shard(out_proj, hidden, linear.num_v * linear.v_dim);
      out_shard.copy_rows(out_proj, 0, hidden, linear.first_v * linear.v_dim, 0);
      layer.linear_out = ctx.upload(out_shard);
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
  const LoadContext ctx{backend_, checkpoint, config.quant, options_.nvfp4_w4a4};
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
    const LinearSource q_proj = ctx.linear(attn + "q_proj", config.num_heads * q_head_rows, hidden);
    const LinearSource k_proj = ctx.linear(attn + "k_proj", config.num_kv_heads * head_dim, hidden);
    const LinearSource v_proj = ctx.linear(attn + "v_proj", config.num_kv_heads * head_dim, hidden);
    HostWeight qkv(q_proj, q_rows + 2 * kv_rows + (gated ? q_rows : 0), hidden);
    for (int64_t head = 0; head < q_heads_local_; ++head) {
      const int64_t src = (first_q_head_ + head) * q_head_rows;
      qkv.copy_rows(q_proj, src, head_dim, 0, head * head_dim);
      if (gated)
        qkv.copy_rows(q_proj, src + head_dim, head_dim, 0, q_rows + 2 * kv_rows + head * head_dim);
    }
    qkv.copy_rows(k_proj, first_kv_head_ * head_dim, kv_rows, 0, q_rows);
    qkv.copy_rows(v_proj, first_kv_head_ * head_dim, kv_rows, 0, q_rows + kv_rows);
    layer.qkv = ctx.upload(qkv);
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
    const LinearSource o_proj = ctx.linear(attn + "o_proj", hidden, config.num_heads * head_dim);
    HostWeight o_shard(o_proj, hidden, q_rows);
    o_shard.copy_rows(o_proj, 0, hidden, first_q_head_ * head_dim, 0);
    layer.o_proj = ctx.upload(o_shard);
  }
}

void RankModel::load_mlp_block(const ModelConfig& config, const Checkpoint& checkpoint,
                               const ExpertPlacement& placement, const std::string& prefix,
                               int64_t layer_idx, LayerWeights& layer) {
  Backend& backend = backend_;
  const LoadContext ctx{backend_, checkpoint, config.quant, options_.nvfp4_w4a4};
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
      const MlpSources sources{ctx.linear(mlp + "gate_proj", inter, hidden),
                               ctx.linear(mlp + "up_proj", inter, hidden),
                               ctx.linear(mlp + "down_proj", hidden, inter), false};
      layer.shared_width = inter / tp_size;
      layer.shared =
          load_mlp(ctx, sources, inter, hidden, layer.shared_width * tp_rank, layer.shared_width);
      return;
    }

    // Mixtral publishes block_sparse_moe.experts.{e}.w1/w3/w2 (gate/up/down); Qwen uses
    // mlp.experts.{e}.gate_proj/up_proj/down_proj, or fused 3-D gate_up_proj/down_proj.
    std::string moe = prefix + "mlp.";
    if (checkpoint.find(prefix + "block_sparse_moe.gate.weight") != nullptr)
      moe = prefix + "block_sparse_moe.";
    const int64_t num_experts = config.num_experts;
    const int64_t inter = config.moe_intermediate_size;
    const LinearSource router = ctx.linear(moe + "gate", num_experts, hidden);
    layer.router = load_rows(ctx, router, 0, num_experts, num_experts);

    std::vector<int32_t> expert_to_local(static_cast<size_t>(num_experts), -1);
    const bool fused_experts = has_fused_expert(checkpoint, moe + "experts.gate_up_proj");
    for (int32_t expert : placement.local_experts(layer_idx, tp_rank)) {
      expert_to_local[static_cast<size_t>(expert)] = static_cast<int32_t>(layer.experts.size());
      layer.local_expert_ids.push_back(expert);
      MlpSources sources;
      if (fused_experts) {
        sources.gate = find_fused_expert(checkpoint, config.quant, moe + "experts.gate_up_proj",
                                         num_experts, expert, 2 * inter, hidden);
        sources.down = find_fused_expert(checkpoint, config.quant, moe + "experts.down_proj",
                                         num_experts, expert, hidden, inter);
        sources.fused = true;
      } else {
        std::string name = moe + "experts." + std::to_string(expert) + ".";
        bool mixtral_names = has_linear(checkpoint, name + "w1");
        sources.gate = ctx.linear(name + (mixtral_names ? "w1" : "gate_proj"), inter, hidden);
        sources.up = ctx.linear(name + (mixtral_names ? "w3" : "up_proj"), inter, hidden);
        sources.down = ctx.linear(name + (mixtral_names ? "w2" : "down_proj"), hidden, inter);
      }
      layer.experts.push_back(load_mlp(ctx, sources, inter, hidden, 0, inter));
      // The combine rounds expert products to the experts' activation dtype (bf16 for
      // quantized experts, whose checkpoints run their activations in bf16).
      expert_dtype_ = layer.experts.back().gate_up.quantized()
                          ? config.dtype
                          : layer.experts.back().gate_up.dtype();
    }
    layer.expert_to_local = to_device(backend, expert_to_local);
    std::vector<const void*> gate_up_pointers, down_pointers;
    for (const ExpertWeights& expert : layer.experts) {
      gate_up_pointers.push_back(expert.gate_up.data.data());
      down_pointers.push_back(expert.down.data.data());
    }
    layer.gate_up_table = pointer_table(backend, gate_up_pointers);
    layer.down_table = pointer_table(backend, down_pointers);
    if (!layer.experts.empty() && layer.experts.front().gate_up.quantized()) {
      std::vector<math::WeightView> gate_up_views, down_views;
      for (const ExpertWeights& expert : layer.experts) {
        gate_up_views.push_back(expert.gate_up.view());
        down_views.push_back(expert.down.view());
      }
      layer.gate_up_views = view_table(backend, gate_up_views);
      layer.down_views = view_table(backend, down_views);
    }

    if (config.shared_expert_intermediate_size > 0) {
      const int64_t shared_inter = config.shared_expert_intermediate_size;
      if (shared_inter % tp_size != 0)
        throw_error("cannot split shared_expert_intermediate_size ", shared_inter,
                    " over tp=", tp_size);
      const std::string shared = moe + "shared_expert.";
      const MlpSources sources{ctx.linear(shared + "gate_proj", shared_inter, hidden),
                               ctx.linear(shared + "up_proj", shared_inter, hidden),
                               ctx.linear(shared + "down_proj", hidden, shared_inter), false};
      layer.shared_width = shared_inter / tp_size;
      layer.shared = load_mlp(ctx, sources, shared_inter, hidden, layer.shared_width * tp_rank,
                              layer.shared_width);
      layer.shared_gate =
          load_rows(ctx, ctx.linear(moe + "shared_expert_gate", 1, hidden), 0, 1, 1);
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
    total += bytes(layer.linear_in) + bytes(layer.linear_ba) + bytes(layer.linear_out) +
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
