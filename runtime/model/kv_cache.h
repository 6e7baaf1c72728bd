// The KV cache dtype setting (`kv_cache_dtype` in serve configs and deployment files,
// `--kv-cache-dtype` on the command line) and the per-layer fp8 scales a checkpoint may carry.
//
//   auto      bf16 when the checkpoint's weights are bf16 (quantized exports declare bf16 too),
//             fp32 when they are f32 or f16
//   fp32      4 bytes per element, exact
//   bf16      2 bytes, round to nearest even at append
//   fp8_e4m3  1 byte, x / scale rounded to E4M3 (nearest even, saturating at +-448 * scale);
//             scale = the layer's k_scale / v_scale from the checkpoint, else 1 (lossy: warned)
//
// The arithmetic is kernels/math/kv_math.h; the pool layout runtime/model/model.h (KvPool).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "kernels/math/kv_math.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/model_config.h"

namespace keel {

enum class KvCacheDType : uint8_t { kAuto, kFp32, kBF16, kFp8E4M3 };

std::string_view kv_cache_dtype_name(KvCacheDType dtype);
std::string_view kv_cache_dtype_name(math::KvDType dtype);
// "auto" | "fp32" | "bf16" | "fp8_e4m3"; throws keel::Error "unknown <what> 'VALUE' (expected
// ...)" naming the key or flag it came from.
KvCacheDType parse_kv_cache_dtype(std::string_view name, std::string_view what = "kv_cache_dtype");
// The storage dtype `setting` means for a checkpoint whose weights are `weight_dtype`.
math::KvDType resolve_kv_cache_dtype(KvCacheDType setting, DType weight_dtype);

// Per-tensor fp8 scales of every full-attention layer, in cache-layer order (the layer's index
// among the full-attention layers); empty vectors when the checkpoint has none.
struct KvScales {
  std::vector<float> k;
  std::vector<float> v;
  std::vector<std::string> sources;  // [cache layer] the tensor names read (for logs)
  bool empty() const { return k.empty(); }
};

// Reads the optional k/v scales of each full-attention layer from `checkpoint`. For the layer
// prefix P = <weight_prefix>layers.N.self_attn. it looks for, in this order (the names vLLM's
// maybe_remap_kv_scale_name accepts):
//   P k_proj.k_scale + P v_proj.v_scale    ModelOpt FP8 / NVFP4 exports (kv_cache_quant_algo FP8)
//   P k_scale + P v_scale                  compressed-tensors / llm-compressor (kv_cache_scheme)
//   P attn.k_scale + P attn.v_scale        checkpoints saved from vLLM's module names
//   P kv_scale                             deprecated single scale, used for both K and V
// Every scale must be one finite positive element (f32, bf16 or f16). Either every attention
// layer has its pair or none does; anything else throws keel::Error naming the tensor.
KvScales read_kv_scales(const ModelConfig& config, const Checkpoint& checkpoint);

}  // namespace keel
