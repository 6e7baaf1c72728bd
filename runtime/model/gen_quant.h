// Quantized synthetic checkpoints for `keel gen-model --quant FORMAT`: the released on-disk
// layout and config of each format, computed by each format's published algorithm from the very
// weights gen-model draws for the bf16 checkpoint (as stored in the preset dtype).
//
// Formats (per quantized Linear with weight [N = out, K = in]):
//   nvfp4     ModelOpt NVFP4: X.weight U8 [N, K/2] (even k in the low nibble), X.weight_scale
//             F8_E4M3 [N, K/16], X.weight_scale_2 F32 [] (0-D), X.input_scale F32 [] (0-D);
//             w = e2m1(code) * (e4m3(weight_scale) * weight_scale_2). hf_quant_config.json plus
//             config.json quantization_config (quant_method "modelopt").
//   nvfp4-ct  compressed-tensors nvfp4-pack-quantized: X.weight_packed U8 [N, K/2],
//             X.weight_scale F8_E4M3 [N, K/16], X.weight_global_scale F32 [1],
//             X.input_global_scale F32 [1]; the global scales are divisors:
//             w = e2m1(code) * (e4m3(weight_scale) / weight_global_scale).
//   fp8       block 128x128 (Qwen / DeepSeek): X.weight F8_E4M3 [N, K], X.weight_scale_inv
//             BF16 (or F32) [ceil(N/128), ceil(K/128)], a multiplier: w = e4m3(code) * scale_inv.
//   awq       AutoAWQ GEMM: X.qweight I32 [K, N/8], X.qzeros I32 [K/G, N/8], X.scales F16
//             [K/G, N]; in each word, column 8j + c sits in nibble [0,4,1,5,2,6,3,7][c];
//             w = (q - z) * s.
//   gptq      AutoGPTQ / GPTQModel v1: X.qweight I32 [K/8, N] (row r holds k = 8r .. 8r+7,
//             k = 8r + i in nibble i), X.qzeros I32 [K/G, N/8] (column 8j + i in nibble i, stored
//             as z - 1), X.scales F16 [K/G, N], X.g_idx I32 [K]; w = (q - z) * s[g_idx[k]].
//   mxfp4     gpt-oss style, routed experts only, fused per layer: experts.gate_up_proj_blocks U8
//             [E, 2I, H/32, 16] (gate rows then up rows), experts.gate_up_proj_scales U8 (E8M0)
//             [E, 2I, H/32], experts.down_proj_blocks U8 [E, H, I/32, 16], experts.down_proj_scales
//             U8 [E, H, I/32]; w = e2m1(code) * 2^(scale - 127).
// The routed experts are written per expert (experts.{e}.{gate,up,down}_proj.*) for every format
// but mxfp4, also for Qwen3.5 whose bf16 release fuses them (as ModelOpt and the Qwen FP8
// release export them). Which Linears are quantized: QuantScope (defaults: fp8 the Qwen FP8
// release's set, everything else the routed experts); everything else stays in the preset dtype
// and is listed in the config's ignore / exclude / modules_to_not_convert list.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kernels/base/dtype.h"
#include "runtime/model/safetensors.h"

namespace keel {

struct ModelPreset;

enum class QuantFormat : uint8_t { kNone, kNvfp4, kNvfp4Ct, kFp8, kAwq, kGptq, kMxfp4 };

std::string_view quant_format_name(QuantFormat format);  // the --quant spelling
// Parses a --quant value; keel::Error listing the choices otherwise.
QuantFormat parse_quant_format(std::string_view text);

enum class QuantScope : uint8_t {
  kDefault,  // fp8: kLinear (the Qwen FP8 releases); every other format: kExperts
  // routed experts (ModelOpt NVFP4 / llm-compressor MoE releases, gpt-oss) and, in dense-MLP
  // layers (ModelPreset::mlp_only_layers), that layer's MLP: the feed-forward either way
  kExperts,
  // kExperts plus attention q/k/v/o, Gated DeltaNet in_proj_qkv / in_proj_z / in_proj_qkvz /
  // out_proj and the shared expert; never the router, shared_expert_gate, in_proj_a / in_proj_b
  // / in_proj_ba, conv1d, norms, embeddings or lm_head (Qwen3-Next / Qwen3.5 FP8 releases).
  kLinear,
};
std::string_view quant_scope_name(QuantScope scope);
QuantScope parse_quant_scope(std::string_view text);

struct QuantOptions {
  QuantFormat format = QuantFormat::kNone;
  QuantScope scope = QuantScope::kDefault;
  // AWQ / GPTQ group size along K. 0: the largest of 128, 64, 32, 16 that divides every
  // quantized K of the preset (the tiny presets have K of 32 .. 64); an explicit G that does not
  // divide some K is an error naming the tensor.
  int64_t group_size = 0;
  bool gptq_desc_act = false;  // GPTQ act order: a permuted g_idx (see gen_quant.cpp)
  bool gptq_sym = true;        // GPTQ symmetric (zero 8) or asymmetric min/max zero points
  DType fp8_scale_dtype = DType::kBF16;  // weight_scale_inv: BF16 (Qwen3.x) or F32 (DeepSeek)
};

// The synthetic NVFP4 activation calibration: every quantized layer's input amax is taken as
// this constant (the MoE / attention inputs are unit-RMS normed activations, whose largest
// elements over thousands of channels sit near 4; 8 leaves headroom), so
//   ModelOpt          input_scale        = 8 / (6 * 448)
//   compressed-tensors input_global_scale = 6 * 448 / 8.
inline constexpr float kSyntheticActivationAmax = 8.0f;

// Turns the tensors gen-model draws, in gen-model's order, into the quantized checkpoint's
// tensors; then writes the format's config keys.
class CheckpointQuantizer {
 public:
  CheckpointQuantizer(const ModelPreset& preset, const QuantOptions& options);
  ~CheckpointQuantizer();
  CheckpointQuantizer(const CheckpointQuantizer&) = delete;
  CheckpointQuantizer& operator=(const CheckpointQuantizer&) = delete;

  // One tensor as gen-model drew it; returns the tensors to store now. Tensors of a fused
  // group (gate/up of one expert, q/k/v, which share NVFP4 global scales) and, for mxfp4, a
  // layer's experts are held until the group is complete.
  std::vector<TensorToWrite> add(TensorToWrite tensor);
  // After the last add(): keel::Error if a group is incomplete.
  std::vector<TensorToWrite> finish();
  // Adds quantization_config to config.json's top level and writes the format's extra files
  // (ModelOpt: hf_quant_config.json) into out_dir.
  void write_config(nlohmann::json& config, const std::string& out_dir) const;

  int64_t group_size() const { return group_size_; }

 private:
  const ModelPreset& preset_;
  QuantOptions options_;
  int64_t group_size_ = 0;
  std::vector<std::string> quantized_modules_;
  // Tensors kept in the preset dtype: name and rank (the ignore lists name their modules).
  std::vector<std::pair<std::string, size_t>> other_tensors_;
  std::map<std::string, std::vector<TensorToWrite>> pending_;
  std::vector<TensorToWrite> quantize_group(const std::vector<TensorToWrite>& group);
  std::vector<TensorToWrite> quantize_mxfp4_layer(const std::string& experts_prefix,
                                                  std::vector<TensorToWrite> tensors);
};

}  // namespace keel
