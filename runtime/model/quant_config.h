// The quantization a checkpoint declares: config.json's `quantization_config` and/or ModelOpt's
// legacy hf_quant_config.json beside it. Every key is checked against what keel implements for
// that method; anything else (another method, bit width, group size, block size, format version,
// an unknown key) is a keel::Error naming the file and key, never a silent bf16 guess.
//
// Which modules are quantized is read from the tensors themselves (a Linear with
// `weight_scale`/`weight_packed`/`qweight`/`weight_scale_inv`/`*_blocks` tensors is quantized,
// one with a float `weight` is not); the ignore / exclude lists are kept for messages and must
// agree with the tensors where a module is found in both (runtime/model/quant_load.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

enum class QuantMethod : uint8_t {
  kNone,
  kModelOptNvfp4,    // quant_method modelopt / hf_quant_config.json, quant_algo NVFP4
  kCompressedNvfp4,  // compressed-tensors, format nvfp4-pack-quantized
  kFp8Block,         // quant_method fp8, weight_block_size [128, 128]
  kAwq,              // quant_method awq, version gemm, 4 bits
  kGptq,             // quant_method gptq, 4 bits, checkpoint_format gptq (v1) or gptq_v2
  kMxfp4,            // quant_method mxfp4 (gpt-oss style *_blocks / *_scales experts)
};
std::string_view quant_method_name(QuantMethod method);

struct QuantConfig {
  QuantMethod method = QuantMethod::kNone;
  std::string source;                    // file (and key) it was read from, for messages
  int64_t group_size = 0;                // AWQ / GPTQ
  bool desc_act = false;                 // GPTQ act order (g_idx permuted)
  bool gptq_v2 = false;                  // GPTQ zeros stored as is (v2) rather than minus one (v1)
  bool fp8_activations_dynamic = false;  // FP8: the checkpoint asks for dynamic activations
  std::vector<std::string> not_quantized;  // ignore / exclude_modules / modules_to_not_convert
  bool kv_cache_fp8 = false;               // the checkpoint declares FP8 KV-cache scales

  bool quantized() const { return method != QuantMethod::kNone; }
};

// Parses config.json's quantization_config (JSON text of that object) or, with
// `hf_quant_config` true, the whole hf_quant_config.json.
QuantConfig parse_quant_config(const std::string& json_text, const std::string& source,
                               bool hf_quant_config);

// Both declarations of one checkpoint: they must agree when both are present.
QuantConfig merge_quant_configs(const QuantConfig& from_config_json,
                                const QuantConfig& from_hf_quant_config);

// True when `module` (e.g. "model.layers.3.self_attn.q_proj") matches one of the patterns the
// formats use: an exact name, a prefix ending in '.', a glob with '*', or "re:<regex>"
// (compressed-tensors).
bool module_matches(const std::string& module, const std::vector<std::string>& patterns);

}  // namespace keel
