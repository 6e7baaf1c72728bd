#include "runtime/cli/plan_checkpoint.h"

#include <filesystem>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/math/quant_math.h"
#include "runtime/model/model_config.h"

namespace keel {

namespace {

using math::WeightFormat;
using planning::MatrixQuant;

// The format keel's loader holds the Linear `module` in (runtime/model/quant_load.cpp), read
// from the checkpoint's declared quantization: the method's format unless the module is in its
// ignore / exclude / modules_to_not_convert list (QuantConfig::not_quantized, module_matches).
// MXFP4 covers the fused routed experts only (gpt-oss layout; mxfp4_experts below).
MatrixQuant linear_format(const QuantConfig& quant, const std::string& module) {
  if (!quant.quantized() || module_matches(module, quant.not_quantized)) return {};
  switch (quant.method) {
    case QuantMethod::kModelOptNvfp4:
    case QuantMethod::kCompressedNvfp4:
      return {WeightFormat::kNvfp4, math::kNvfp4Group, false};
    case QuantMethod::kFp8Block:
      return {WeightFormat::kFp8Block, math::kFp8BlockGroup, false};
    case QuantMethod::kAwq:
      return {WeightFormat::kInt4, quant.group_size, false};
    case QuantMethod::kGptq:
      // desc_act: a permuted g_idx, which keel keeps as group_of_k.
      return {WeightFormat::kInt4, quant.group_size, quant.desc_act};
    case QuantMethod::kNone:
    case QuantMethod::kMxfp4:
      break;
  }
  return {};
}

// The parts keel fuses into one matrix (q|k|v, gate|up, the Gated DeltaNet [q|k|v|z] and [b|a])
// must share a format, as the loader requires (HostWeight::check_same_format).
MatrixQuant fused_format(const QuantConfig& quant, const std::string& config_path,
                         const std::vector<std::string>& modules) {
  const MatrixQuant first = linear_format(quant, modules.front());
  for (const std::string& module : modules)
    if (linear_format(quant, module) != first)
      throw_error(config_path, ": ", quant.source, " quantizes ", module, " as ",
                  planning::matrix_quant_name(linear_format(quant, module), "dense"), " but ",
                  modules.front(), " as ", planning::matrix_quant_name(first, "dense"),
                  "; keel fuses them into one weight, which needs one format");
  return first;
}

MatrixQuant mxfp4_experts(const QuantConfig& quant, const std::string& fused_name) {
  if (quant.method != QuantMethod::kMxfp4 || module_matches(fused_name, quant.not_quantized))
    return {};
  return {WeightFormat::kMxfp4, math::kMxfp4Group, false};
}

// Every decoder layer's matrix formats, by the tensor names weights.cpp loads.
std::vector<planning::LayerQuant> layer_formats(const ModelConfig& config,
                                                const std::string& config_path) {
  const QuantConfig& quant = config.quant;
  std::vector<planning::LayerQuant> layers;
  for (int64_t layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = config.weight_prefix + "layers." + std::to_string(layer_idx) + ".";
    planning::LayerQuant layer;
    layer.linear_attention =
        config.layer_kinds[static_cast<size_t>(layer_idx)] == LayerKind::kLinearAttention;
    layer.moe = config.layer_is_moe[static_cast<size_t>(layer_idx)];
    if (layer.linear_attention) {
      const std::string gdn = prefix + "linear_attn.";
      if (config.architecture == Architecture::kQwen3Next) {
        layer.linear_in = linear_format(quant, gdn + "in_proj_qkvz");
        layer.linear_ba = linear_format(quant, gdn + "in_proj_ba");
      } else {
        layer.linear_in =
            fused_format(quant, config_path, {gdn + "in_proj_qkv", gdn + "in_proj_z"});
        layer.linear_ba = fused_format(quant, config_path, {gdn + "in_proj_b", gdn + "in_proj_a"});
      }
      layer.linear_out = linear_format(quant, gdn + "out_proj");
    } else {
      const std::string attn = prefix + "self_attn.";
      layer.qkv =
          fused_format(quant, config_path, {attn + "q_proj", attn + "k_proj", attn + "v_proj"});
      layer.o_proj = linear_format(quant, attn + "o_proj");
    }
    if (!layer.moe) {
      const std::string mlp = prefix + "mlp.";
      layer.mlp_gate_up = fused_format(quant, config_path, {mlp + "gate_proj", mlp + "up_proj"});
      layer.mlp_down = linear_format(quant, mlp + "down_proj");
      layers.push_back(layer);
      continue;
    }
    const bool mixtral = config.architecture == Architecture::kMixtral;
    const std::string moe = prefix + (mixtral ? "block_sparse_moe." : "mlp.");
    if (quant.method == QuantMethod::kMxfp4) {
      layer.experts_gate_up = mxfp4_experts(quant, moe + "experts.gate_up_proj");
      layer.experts_down = mxfp4_experts(quant, moe + "experts.down_proj");
    } else {
      for (int64_t expert = 0; expert < config.num_experts; ++expert) {
        const std::string name = moe + "experts." + std::to_string(expert) + ".";
        const MatrixQuant gate_up = fused_format(
            quant, config_path,
            {name + (mixtral ? "w1" : "gate_proj"), name + (mixtral ? "w3" : "up_proj")});
        const MatrixQuant down = linear_format(quant, name + (mixtral ? "w2" : "down_proj"));
        if (expert == 0) {
          layer.experts_gate_up = gate_up;
          layer.experts_down = down;
        } else if (gate_up != layer.experts_gate_up || down != layer.experts_down) {
          throw_error(config_path, ": ", quant.source, " stores expert ", expert, " of layer ",
                      layer_idx,
                      " in another format than expert 0; the planner needs one "
                      "format per layer's routed experts");
        }
      }
    }
    if (config.shared_expert_intermediate_size > 0) {
      const std::string shared = moe + "shared_expert.";
      layer.mlp_gate_up =
          fused_format(quant, config_path, {shared + "gate_proj", shared + "up_proj"});
      layer.mlp_down = linear_format(quant, shared + "down_proj");
    }
    layers.push_back(layer);
  }
  return layers;
}

}  // namespace

bool is_checkpoint_path(const std::string& path) {
  return std::filesystem::is_directory(path) || path.ends_with(".json");
}

planning::ModelSpec model_spec_from_checkpoint(const std::string& path) {
  const std::string config_path =
      std::filesystem::is_directory(path) ? path + "/config.json" : path;
  const ModelConfig config = ModelConfig::load(config_path);
  planning::ModelSpec spec;
  spec.name = config.architecture_name;
  spec.source = config_path;
  spec.path = config_path;
  spec.vocab_size = config.vocab_size;
  spec.hidden_size = config.hidden_size;
  spec.num_layers = config.num_layers;
  spec.tie_word_embeddings = config.tie_word_embeddings;
  switch (config.dtype) {
    case DType::kF32:
      spec.dtype = "fp32";
      break;
    case DType::kBF16:
      spec.dtype = "bf16";
      break;
    case DType::kF16:
      spec.dtype = "fp16";
      break;
  }
  spec.keel_layout = true;  // count what RankModel holds (model_spec.h lists the differences)
  spec.attention = planning::AttentionType::gqa;
  spec.num_attention_heads = config.num_heads;
  spec.num_kv_heads = config.num_kv_heads;
  spec.head_dim = config.head_dim;
  spec.attention_bias = config.attention_bias;  // Qwen2-MoE: q/k/v only (keel refuses o_proj.bias)
  spec.attention_o_bias = false;
  spec.attn_output_gate = config.attn_output_gate;  // Qwen3.5 / Qwen3-Next: q_proj 2x wide
  spec.qk_norm = config.qk_norm;
  spec.linear_attention_layers = config.num_linear_layers();
  if (config.is_hybrid()) {
    spec.linear_num_key_heads = config.linear_num_key_heads;
    spec.linear_num_value_heads = config.linear_num_value_heads;
    spec.linear_key_head_dim = config.linear_key_head_dim;
    spec.linear_value_head_dim = config.linear_value_head_dim;
    spec.linear_conv_kernel_dim = config.linear_conv_kernel;
    spec.linear_state_dtype = "fp32";
    spec.linear_conv_state_dtype = "fp32";
  }
  spec.num_experts = config.num_experts;
  spec.num_experts_per_tok = config.top_k;
  spec.moe_intermediate_size = config.moe_intermediate_size;
  if (config.shared_expert_intermediate_size > 0) {
    spec.num_shared_experts = 1;
    spec.shared_expert_intermediate_size = config.shared_expert_intermediate_size;
    spec.shared_expert_gate = true;  // Qwen2-MoE, Qwen3.5, Qwen3-Next: a sigmoid gate [1, H]
  }
  // Dense-MLP layers (mlp_only_layers / decoder_sparse_step): the planner counts them, wherever
  // they sit in the stack.
  spec.dense_layers = config.num_layers - config.num_moe_layers();
  if (spec.dense_layers > 0) spec.dense_intermediate_size = config.intermediate_size;
  if (config.quant.quantized()) {
    spec.quant_method = std::string(quant_method_name(config.quant.method));
    spec.layer_quant = layer_formats(config, config_path);
  }
  planning::validate_model_spec(spec, config_path);
  return spec;
}

planning::QuantSpec checkpoint_quant_spec(const planning::ModelSpec& spec) {
  planning::QuantSpec quant = planning::quant_as_stored(spec.dtype);
  if (spec.layer_quant.empty()) return quant;
  // The report's summary figure: the routed experts' format (the bulk of a MoE checkpoint),
  // else the first quantized matrix's; the weight lines count every matrix by its own format.
  MatrixQuant summary;
  for (const planning::LayerQuant& layer : spec.layer_quant) {
    for (const MatrixQuant& matrix :
         {layer.experts_gate_up, layer.experts_down, layer.qkv, layer.linear_in, layer.mlp_gate_up})
      if (!summary.quantized() && matrix.quantized()) summary = matrix;
    if (summary.quantized()) break;
  }
  const double wb = planning::dtype_bytes(spec.dtype, spec.path + ": dtype");
  quant.name = "as stored (" + spec.quant_method + ")";
  quant.description = planning::matrix_quant_name(summary, spec.dtype) +
                      " where the checkpoint quantizes, " + spec.dtype + " elsewhere";
  if (spec.moe_intermediate_size > 0 && summary.quantized()) {
    // One routed expert's bytes per parameter (the perf model's expert reads).
    const int64_t H = spec.hidden_size, I = spec.moe_intermediate_size;
    const double expert_bytes = planning::matrix_bytes(summary, 2 * I, H, H, wb) +
                                planning::matrix_bytes(summary, H, I, I, wb);
    quant.bytes_per_param = expert_bytes / (3.0 * static_cast<double>(H * I));
  }
  switch (summary.format) {
    case WeightFormat::kNvfp4:
      quant.kind = planning::QuantKind::nvfp4;
      quant.element_bits = 4;
      quant.compute = planning::ComputePrecision::fp4;
      break;
    case WeightFormat::kMxfp4:
      quant.kind = planning::QuantKind::mxfp4;
      quant.element_bits = 4;
      quant.compute = planning::ComputePrecision::fp4;
      break;
    case WeightFormat::kFp8Block:
      quant.kind = planning::QuantKind::fp8;
      quant.element_bits = 8;
      quant.compute = planning::ComputePrecision::fp8;
      break;
    case WeightFormat::kInt4:
      quant.kind = planning::QuantKind::int4;  // W4A16: bf16 matmuls
      quant.element_bits = 4;
      break;
    case WeightFormat::kDense:
      break;
  }
  quant.group_size = static_cast<int>(summary.group_size);
  return quant;
}

}  // namespace keel
