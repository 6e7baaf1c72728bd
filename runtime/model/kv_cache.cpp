#include "runtime/model/kv_cache.h"

#include <cmath>

#include "kernels/base/check.h"

namespace keel {

std::string_view kv_cache_dtype_name(KvCacheDType dtype) {
  switch (dtype) {
    case KvCacheDType::kAuto:
      return "auto";
    case KvCacheDType::kFp32:
      return "fp32";
    case KvCacheDType::kBF16:
      return "bf16";
    case KvCacheDType::kFp8E4M3:
      return "fp8_e4m3";
  }
  return "auto";
}

std::string_view kv_cache_dtype_name(math::KvDType dtype) {
  switch (dtype) {
    case math::KvDType::kF32:
      return "fp32";
    case math::KvDType::kBF16:
      return "bf16";
    case math::KvDType::kFp8E4M3:
      return "fp8_e4m3";
  }
  return "fp32";
}

KvCacheDType parse_kv_cache_dtype(std::string_view name, std::string_view what) {
  if (name == "auto") return KvCacheDType::kAuto;
  if (name == "fp32") return KvCacheDType::kFp32;
  if (name == "bf16") return KvCacheDType::kBF16;
  if (name == "fp8_e4m3") return KvCacheDType::kFp8E4M3;
  throw_error("unknown ", what, " '", name, "' (expected auto, fp32, bf16 or fp8_e4m3)");
}

math::KvDType resolve_kv_cache_dtype(KvCacheDType setting, DType weight_dtype) {
  switch (setting) {
    case KvCacheDType::kFp32:
      return math::KvDType::kF32;
    case KvCacheDType::kBF16:
      return math::KvDType::kBF16;
    case KvCacheDType::kFp8E4M3:
      return math::KvDType::kFp8E4M3;
    case KvCacheDType::kAuto:
      break;
  }
  return weight_dtype == DType::kBF16 ? math::KvDType::kBF16 : math::KvDType::kF32;
}

namespace {

// The one element of a scalar scale tensor, checked.
float scale_value(const TensorView& view) {
  if (view.num_elements() != 1)
    throw_error(view.file, ": tensor ", view.name, " has shape ", view.shape_string(),
                "; a per-tensor KV scale has one element");
  const float value = view.f32_at(0);
  if (!std::isfinite(value) || value <= 0.0f)
    throw_error(view.file, ": tensor ", view.name, " is ", value,
                "; a KV scale must be finite and positive");
  return value;
}

}  // namespace

KvScales read_kv_scales(const ModelConfig& config, const Checkpoint& checkpoint) {
  KvScales scales;
  int64_t num_missing = 0;
  std::string first_missing, first_found;
  for (int64_t layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    if (config.layer_kinds[static_cast<size_t>(layer_idx)] != LayerKind::kFullAttention) continue;
    const std::string prefix =
        config.weight_prefix + "layers." + std::to_string(layer_idx) + ".self_attn.";
    const TensorView* k = nullptr;
    const TensorView* v = nullptr;
    for (const auto& [k_name, v_name] :
         {std::pair{"k_proj.k_scale", "v_proj.v_scale"}, std::pair{"k_scale", "v_scale"},
          std::pair{"attn.k_scale", "attn.v_scale"}, std::pair{"kv_scale", "kv_scale"}}) {
      k = checkpoint.find(prefix + k_name);
      v = checkpoint.find(prefix + v_name);
      if (k != nullptr || v != nullptr) break;
    }
    if (k == nullptr && v == nullptr) {
      if (num_missing++ == 0) first_missing = prefix + "k_scale";
      continue;
    }
    if (k == nullptr || v == nullptr)
      throw_error("checkpoint ", checkpoint.directory(), ": ", (k != nullptr ? k : v)->name,
                  " has no ", k == nullptr ? "k" : "v", " scale beside it");
    scales.k.push_back(scale_value(*k));
    scales.v.push_back(scale_value(*v));
    scales.sources.push_back(k == v ? k->name : k->name + ", " + v->name);
    if (first_found.empty()) first_found = k->name;
  }
  if (!scales.empty() && num_missing > 0)
    throw_error("checkpoint ", checkpoint.directory(), ": KV scales for some attention layers (",
                first_found, ") but not for others (no ", first_missing, " or its variants)");
  return scales;
}

}  // namespace keel
