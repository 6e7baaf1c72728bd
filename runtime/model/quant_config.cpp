// Quantization configs: one parser per method, each listing the keys it accepts. Sources of the
// key sets: /work/shared/reference/qwen35-gdn-and-formats.md section 2 (ModelOpt exports,
// compressed-tensors configs, Qwen/DeepSeek FP8, AutoAWQ / AutoGPTQ configs, gpt-oss MXFP4).
#include "runtime/model/quant_config.h"
#include "runtime/common/json_depth.h"

// GCC 12 reports std::regex's std::function members as maybe-uninitialized once inlined under
// the sanitizers (a false positive inside libstdc++'s <functional> and <regex>); silence it for
// the standard headers' lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <functional>
#include <regex>
#pragma GCC diagnostic pop
#include <nlohmann/json.hpp>
#include <set>

#include "kernels/base/check.h"

namespace keel {

namespace {

using json = nlohmann::json;

// Keys that describe how a checkpoint was produced or compressed on disk and do not change
// what the model computes.
const std::set<std::string> kProvenanceKeys = {"producer",
                                               "quantization_status",
                                               "global_compression_ratio",
                                               "version",
                                               "model_name_or_path",
                                               "model_file_base_name",
                                               "meta",
                                               "damp_percent",
                                               "true_sequential",
                                               "static_groups",
                                               "backend",
                                               "pack_dtype"};

void refuse_unknown_keys(const json& object, const std::set<std::string>& known,
                         const std::string& source, std::string_view method) {
  for (const auto& [key, value] : object.items()) {
    if (known.count(key) == 0 && kProvenanceKeys.count(key) == 0)
      throw_error(source, ": quantization key '", key, "' (", value.dump(),
                  ") is not implemented by keel for ", method);
  }
}

std::vector<std::string> string_list(const json& object, const char* key,
                                     const std::string& source) {
  std::vector<std::string> list;
  if (!object.contains(key) || object[key].is_null()) return list;
  if (!object[key].is_array()) throw_error(source, ": '", key, "' must be a list of strings");
  for (const json& item : object[key]) {
    if (!item.is_string()) throw_error(source, ": '", key, "' must be a list of strings");
    list.push_back(item.get<std::string>());
  }
  return list;
}

std::string string_field(const json& object, const char* key, const std::string& source,
                         const std::string& fallback = "") {
  if (!object.contains(key) || object[key].is_null()) return fallback;
  if (!object[key].is_string()) throw_error(source, ": '", key, "' must be a string");
  return object[key].get<std::string>();
}

void require_value(const json& object, const char* key, const json& expected,
                   const std::string& source, bool required = true) {
  if (!object.contains(key) || object[key].is_null()) {
    if (required) throw_error(source, ": missing quantization key '", key, "'");
    return;
  }
  if (object[key] != expected)
    throw_error(source, ": quantization key '", key, "' is ", object[key].dump(),
                "; keel implements only ", expected.dump());
}

// A compressed-tensors style scheme {num_bits, type, group_size, strategy, symmetric, dynamic}.
void check_fp4_scheme(const json& scheme, const std::string& source, bool weights) {
  if (!scheme.is_object()) throw_error(source, ": must be an object");
  refuse_unknown_keys(
      scheme,
      {"num_bits", "type", "group_size", "strategy", "symmetric", "dynamic", "block_structure",
       "actorder", "observer", "observer_kwargs", "scale_dtype", "zp_dtype"},
      source, "NVFP4");
  require_value(scheme, "num_bits", 4, source);
  require_value(scheme, "type", "float", source);
  require_value(scheme, "group_size", 16, source);
  if (scheme.contains("strategy")) require_value(scheme, "strategy", "tensor_group", source);
  if (weights) {
    if (scheme.contains("symmetric")) require_value(scheme, "symmetric", true, source);
    if (scheme.contains("dynamic")) require_value(scheme, "dynamic", false, source);
  }
  if (scheme.contains("actorder") && !scheme["actorder"].is_null())
    throw_error(source, ": actorder ", scheme["actorder"].dump(), " is not implemented for NVFP4");
}

void parse_config_groups(const json& root, const std::string& source) {
  if (!root.contains("config_groups") || root["config_groups"].is_null()) return;
  const json& groups = root["config_groups"];
  if (!groups.is_object()) throw_error(source, ": config_groups must be an object");
  for (const auto& [name, group] : groups.items()) {
    const std::string where = source + " config_groups." + name;
    if (!group.is_object()) throw_error(where, ": must be an object");
    refuse_unknown_keys(group,
                        {"targets", "weights", "input_activations", "output_activations", "format"},
                        where, "NVFP4");
    if (!group.contains("weights")) throw_error(where, ": missing 'weights'");
    check_fp4_scheme(group["weights"], where + ".weights", true);
    if (group.contains("input_activations") && !group["input_activations"].is_null())
      check_fp4_scheme(group["input_activations"], where + ".input_activations", false);
    if (group.contains("output_activations") && !group["output_activations"].is_null())
      throw_error(where, ": output_activations quantization is not implemented");
    if (group.contains("format") && !group["format"].is_null() &&
        group["format"] != "nvfp4-pack-quantized")
      throw_error(where, ": format ", group["format"].dump(),
                  " is not implemented (nvfp4-pack-quantized only)");
  }
}

// kv_cache_scheme {num_bits: 8, type: float, ...} or kv_cache_quant_algo "FP8".
bool parse_kv_scheme(const json& root, const std::string& source) {
  bool fp8 = false;
  if (root.contains("kv_cache_scheme") && !root["kv_cache_scheme"].is_null()) {
    const json& scheme = root["kv_cache_scheme"];
    const std::string where = source + " kv_cache_scheme";
    if (!scheme.is_object()) throw_error(where, ": must be an object");
    refuse_unknown_keys(scheme,
                        {"num_bits", "type", "dynamic", "strategy", "symmetric", "group_size",
                         "observer", "observer_kwargs"},
                        where, "the KV cache");
    require_value(scheme, "num_bits", 8, where);
    require_value(scheme, "type", "float", where);
    if (scheme.contains("dynamic")) require_value(scheme, "dynamic", false, where);
    fp8 = true;
  }
  const std::string algo = string_field(root, "kv_cache_quant_algo", source);
  if (!algo.empty()) {
    if (algo != "FP8")
      throw_error(source, ": kv_cache_quant_algo '", algo, "' is not implemented (FP8 only)");
    fp8 = true;
  }
  return fp8;
}

QuantConfig parse_modelopt(const json& root, const std::string& source) {
  QuantConfig config;
  config.method = QuantMethod::kModelOptNvfp4;
  config.source = source;
  refuse_unknown_keys(root,
                      {"quant_method", "quant_algo", "group_size", "exclude_modules", "ignore",
                       "config_groups", "kv_cache_scheme", "kv_cache_quant_algo", "format"},
                      source, "ModelOpt");
  const std::string algo = string_field(root, "quant_algo", source);
  if (algo != "NVFP4")
    throw_error(source, ": quant_algo '", algo,
                "' is not implemented (ModelOpt NVFP4 only; MIXED_PRECISION and per-tensor FP8 "
                "are not)");
  if (root.contains("group_size")) require_value(root, "group_size", 16, source);
  parse_config_groups(root, source);
  config.not_quantized = string_list(root, "exclude_modules", source);
  for (const std::string& name : string_list(root, "ignore", source))
    config.not_quantized.push_back(name);
  config.kv_cache_fp8 = parse_kv_scheme(root, source);
  return config;
}

QuantConfig parse_compressed_tensors(const json& root, const std::string& source) {
  QuantConfig config;
  config.method = QuantMethod::kCompressedNvfp4;
  config.source = source;
  refuse_unknown_keys(root,
                      {"quant_method", "format", "config_groups", "ignore", "kv_cache_scheme",
                       "sparsity_config", "transform_config"},
                      source, "compressed-tensors");
  require_value(root, "format", "nvfp4-pack-quantized", source);
  for (const char* key : {"sparsity_config", "transform_config"}) {
    if (root.contains(key) && !root[key].is_null() && !root[key].empty())
      throw_error(source, ": ", key, " ", root[key].dump(), " is not implemented");
  }
  parse_config_groups(root, source);
  config.not_quantized = string_list(root, "ignore", source);
  config.kv_cache_fp8 = parse_kv_scheme(root, source);
  return config;
}

QuantConfig parse_fp8(const json& root, const std::string& source) {
  QuantConfig config;
  config.method = QuantMethod::kFp8Block;
  config.source = source;
  refuse_unknown_keys(root,
                      {"quant_method", "fmt", "activation_scheme", "weight_block_size",
                       "modules_to_not_convert", "ignored_layers"},
                      source, "FP8");
  require_value(root, "fmt", "e4m3", source, /*required=*/false);
  require_value(root, "weight_block_size", json::array({128, 128}), source);
  const std::string scheme = string_field(root, "activation_scheme", source, "dynamic");
  if (scheme != "dynamic")
    throw_error(source, ": activation_scheme '", scheme,
                "' is not implemented (dynamic only: keel runs FP8 block checkpoints "
                "weight-only)");
  config.fp8_activations_dynamic = true;
  config.not_quantized = string_list(root, "modules_to_not_convert", source);
  for (const std::string& name : string_list(root, "ignored_layers", source))
    config.not_quantized.push_back(name);
  return config;
}

QuantConfig parse_int4(const json& root, const std::string& source, bool awq) {
  QuantConfig config;
  config.method = awq ? QuantMethod::kAwq : QuantMethod::kGptq;
  config.source = source;
  if (awq) {
    refuse_unknown_keys(
        root,
        {"quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"},
        source, "AWQ");
    require_value(root, "zero_point", true, source);
    const std::string version = string_field(root, "version", source, "gemm");
    if (version != "gemm" && version != "GEMM")
      throw_error(source, ": AWQ version '", version, "' is not implemented (gemm only)");
    config.not_quantized = string_list(root, "modules_to_not_convert", source);
  } else {
    refuse_unknown_keys(
        root,
        {"quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "format",
         "lm_head", "modules_to_not_convert", "dynamic"},
        source, "GPTQ");
    // GPTQModel's per-module rules: "-:<regex>" skips matching modules (left unquantized);
    // any other rule overrides bits/group size per module, which keel does not implement.
    if (root.contains("dynamic") && !root["dynamic"].is_null()) {
      if (!root["dynamic"].is_object()) throw_error(source, ": 'dynamic' must be an object");
      for (const auto& [rule, settings] : root["dynamic"].items()) {
        if (rule.rfind("-:", 0) != 0 || !(settings.is_object() && settings.empty()))
          throw_error(source, ": dynamic rule '", rule, "' ", settings.dump(),
                      " is not implemented (only \"-:<regex>\": {} exclusions are)");
        config.not_quantized.push_back("re:" + rule.substr(2));
      }
    }
    if (root.contains("lm_head")) require_value(root, "lm_head", false, source);
    if (root.contains("desc_act")) {
      if (!root["desc_act"].is_boolean()) throw_error(source, ": desc_act must be a boolean");
      config.desc_act = root["desc_act"].get<bool>();
    }
    if (root.contains("sym") && !root["sym"].is_boolean())
      throw_error(source, ": sym must be a boolean");
    std::string format = string_field(root, "checkpoint_format", source, "");
    if (format.empty()) format = string_field(root, "format", source, "gptq");
    if (format == "gptq_v2") {
      config.gptq_v2 = true;
    } else if (format != "gptq") {
      throw_error(source, ": GPTQ checkpoint_format '", format,
                  "' is not implemented (gptq, gptq_v2)");
    }
    // Appended: the dynamic "-:" exclusions above are kept.
    for (const std::string& name : string_list(root, "modules_to_not_convert", source))
      config.not_quantized.push_back(name);
  }
  require_value(root, "bits", 4, source);
  if (!root.contains("group_size") || !root["group_size"].is_number_integer())
    throw_error(source, ": missing integer quantization key 'group_size'");
  // Above INT64_MAX nlohmann keeps it unsigned, and get<int64_t> would wrap it negative.
  if (root["group_size"].is_number_unsigned() && root["group_size"].get<uint64_t>() > uint64_t{1}
                                                                                          << 20)
    throw_error(source, ": group_size ", root["group_size"].dump(),
                " is out of range (at most 2^20)");
  config.group_size = root["group_size"].get<int64_t>();
  if (config.group_size <= 0)
    throw_error(source, ": group_size ", config.group_size,
                " is not implemented (per-channel -1 is not; a positive group size is)");
  return config;
}

QuantConfig parse_mxfp4(const json& root, const std::string& source) {
  QuantConfig config;
  config.method = QuantMethod::kMxfp4;
  config.source = source;
  refuse_unknown_keys(root, {"quant_method", "modules_to_not_convert", "dequantize"}, source,
                      "MXFP4");
  if (root.contains("dequantize")) require_value(root, "dequantize", false, source);
  config.not_quantized = string_list(root, "modules_to_not_convert", source);
  return config;
}

}  // namespace

std::string_view quant_method_name(QuantMethod method) {
  switch (method) {
    case QuantMethod::kNone:
      return "none";
    case QuantMethod::kModelOptNvfp4:
      return "modelopt-nvfp4";
    case QuantMethod::kCompressedNvfp4:
      return "compressed-tensors-nvfp4";
    case QuantMethod::kFp8Block:
      return "fp8-block";
    case QuantMethod::kAwq:
      return "awq";
    case QuantMethod::kGptq:
      return "gptq";
    case QuantMethod::kMxfp4:
      return "mxfp4";
  }
  return "?";
}

QuantConfig parse_quant_config(const std::string& json_text, const std::string& source,
                               bool hf_quant_config) {
  check_json_depth(json_text, source);
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object())
    throw_error(source, ": quantization config is not a JSON object");
  if (hf_quant_config) {
    refuse_unknown_keys(root, {"quantization"}, source, "hf_quant_config.json");
    if (!root.contains("quantization") || !root["quantization"].is_object())
      throw_error(source, ": missing 'quantization' object");
    return parse_modelopt(root["quantization"], source + " quantization");
  }
  const std::string method = string_field(root, "quant_method", source);
  if (method == "modelopt") return parse_modelopt(root, source);
  if (method == "compressed-tensors") return parse_compressed_tensors(root, source);
  if (method == "fp8") return parse_fp8(root, source);
  if (method == "awq") return parse_int4(root, source, /*awq=*/true);
  if (method == "gptq") return parse_int4(root, source, /*awq=*/false);
  if (method == "mxfp4") return parse_mxfp4(root, source);
  throw_error(source, ": quant_method '", method,
              "' is not implemented (modelopt NVFP4, compressed-tensors nvfp4-pack-quantized, "
              "fp8 block-128, awq, gptq, mxfp4)");
}

QuantConfig merge_quant_configs(const QuantConfig& from_config_json,
                                const QuantConfig& from_hf_quant_config) {
  if (!from_hf_quant_config.quantized()) return from_config_json;
  if (!from_config_json.quantized()) return from_hf_quant_config;
  if (from_config_json.method != from_hf_quant_config.method)
    throw_error(from_config_json.source, " declares ", quant_method_name(from_config_json.method),
                " but ", from_hf_quant_config.source, " declares ",
                quant_method_name(from_hf_quant_config.method));
  QuantConfig merged = from_config_json;
  for (const std::string& name : from_hf_quant_config.not_quantized)
    merged.not_quantized.push_back(name);
  merged.kv_cache_fp8 = merged.kv_cache_fp8 || from_hf_quant_config.kv_cache_fp8;
  return merged;
}

bool module_matches(const std::string& module, const std::vector<std::string>& patterns) {
  for (const std::string& pattern : patterns) {
    if (pattern.rfind("re:", 0) == 0) {
      if (std::regex_match(module, std::regex(pattern.substr(3)))) return true;
      continue;
    }
    if (pattern.find('*') != std::string::npos) {
      // Glob: '*' matches any run of characters.
      std::string regex;
      for (char c : pattern) {
        if (c == '*') {
          regex += ".*";
        } else if (std::string("\\^$.|?+()[]{}").find(c) != std::string::npos) {
          regex += '\\';
          regex += c;
        } else {
          regex += c;
        }
      }
      if (std::regex_match(module, std::regex(regex))) return true;
      continue;
    }
    if (module == pattern) return true;
    // A listed parent module covers its children; a bare name ("lm_head", "gate") matches the
    // last component(s) of the module name, as AutoAWQ's modules_to_not_convert does.
    if (module.rfind(pattern + ".", 0) == 0) return true;
    if (module.size() > pattern.size() &&
        module.compare(module.size() - pattern.size(), pattern.size(), pattern) == 0 &&
        module[module.size() - pattern.size() - 1] == '.')
      return true;
  }
  return false;
}

}  // namespace keel
