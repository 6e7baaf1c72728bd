// gen-model --quant: each format's checkpoint read back with keel's safetensors reader has
// exactly the released names, dtypes and shapes; every tensor left unquantized is byte-identical
// to the bf16 checkpoint of the same (preset, seed); every quantized weight, decoded here from
// the format's definition (independently of gen_quant.cpp and quant_math.h), is within the
// format's worst-case rounding bound of the bf16 weight; the scales follow the published
// formulas; the config keys are the format's; the same (preset, seed, format) gives
// byte-identical files.
//
// Bounds, with s the dequantization scale of an element's block (as stored) and x = |w| / s:
//   E2M1 (nvfp4, nvfp4-ct, mxfp4): |w - deq| <= half the E2M1 spacing around min(x, 6) times s
//     (0.25 below 2, 0.5 in [2, 4), 1 in [4, 6]), plus |w| - 6 s when x > 6 (saturation: the
//     E4M3 block scale rounds by up to 2^-4 relative, so x <= 6 (1 + 2^-4); MX scales are
//     powers of two with x < 8).
//   E4M3 (fp8): half an E4M3 ulp at min(x, 448) times s (2^-10 s in the subnormal range), plus
//     |w| - 448 s when the bf16-rounded scale makes x exceed 448.
//   int4 (awq, gptq): 0.5 s, plus the f16 rounding of s over at most 8 .. 15 steps: 0.51 s.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "kernels/math/quant_math.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/gen_quant.h"
#include "runtime/model/safetensors.h"

namespace keel {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// ---- the formats' definitions, written from the specs ----

float e2m1_value(uint32_t code) {
  static const float kMagnitudes[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  return (code & 8u) ? -kMagnitudes[code & 7u] : kMagnitudes[code & 7u];
}

float e4m3_value(uint8_t code) {
  const int exponent = (code >> 3) & 15, mantissa = code & 7;
  if (exponent == 15 && mantissa == 7) return NAN;
  const double magnitude =
      exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
  return static_cast<float>((code & 0x80) ? -magnitude : magnitude);
}

float e2m1_half_step(float x) {
  return x < 2 ? 0.25f : x < 4 ? 0.5f : 1.0f;
}

float e4m3_half_ulp(float x) {
  if (x < 0x1p-6f) return 0x1p-10f;
  return std::ldexp(1.0f, std::ilogb(x) - 4);
}

// |w - deq| <= bound for an E2M1 element of dequantization scale s.
float e2m1_bound(float w, float s) {
  const float x = std::fabs(w) / s;
  return (e2m1_half_step(std::min(x, 6.0f)) * s + std::max(0.0f, std::fabs(w) - 6 * s)) *
             (1 + 1e-6f) +
         1e-12f;
}

// ---- checkpoint access ----

std::string scratch_dir(const std::string& name) {
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = std::string(KEEL_BINARY_DIR) + "/test_gen_quant/" +
                    (test != nullptr ? test->name() : "no_test") + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

json read_json(const std::string& path) {
  return json::parse(read_text(path));
}

std::string generate(const std::string& preset_name, QuantOptions quant, const std::string& name,
                     uint64_t seed = 7) {
  const std::string dir = scratch_dir(name);
  GenModelOptions options;
  options.seed = seed;
  options.quant = quant;
  generate_model(load_model_preset(find_model_preset(preset_name)), options, dir);
  return dir;
}

QuantOptions quant_options(QuantFormat format) {
  QuantOptions options;
  options.format = format;
  return options;
}

template <typename T>
T element(const TensorView& view, int64_t i) {
  T value;
  std::memcpy(&value, view.data + static_cast<size_t>(i) * sizeof(T), sizeof(T));
  return value;
}

float float_element(const TensorView& view, int64_t i) {
  return load_as_f32(view.data, view.dtype, static_cast<size_t>(i));
}

void expect_tensor(const SafetensorsFile& file, const std::string& name, TensorType type,
                   std::vector<int64_t> shape) {
  const TensorView* view = file.find(name);
  ASSERT_NE(view, nullptr) << name;
  EXPECT_EQ(tensor_type_name(view->type), tensor_type_name(type)) << name;
  EXPECT_EQ(view->shape, shape) << name;
}

// The bf16 reference of a 2-D Linear module [N, K]: its own tensor, or Qwen3.5's per-expert
// slice of the fused experts.gate_up_proj / experts.down_proj.
struct Reference {
  std::unique_ptr<SafetensorsFile> file;
  std::vector<float> matrix(const std::string& module, int64_t* rows, int64_t* cols) const {
    if (const TensorView* view = file->find(module + ".weight")) {
      *rows = view->shape[0];
      *cols = view->shape[1];
      std::vector<float> out(static_cast<size_t>(*rows * *cols));
      for (size_t i = 0; i < out.size(); ++i)
        out[i] = float_element(*view, static_cast<int64_t>(i));
      return out;
    }
    const size_t at = module.find(".experts.");
    KEEL_CHECK(at != std::string::npos);
    const std::string prefix = module.substr(0, at + 9);
    const std::string rest = module.substr(at + 9);
    const int64_t expert = std::stoll(rest.substr(0, rest.find('.')));
    const std::string proj = rest.substr(rest.find('.') + 1);
    const bool down = proj == "down_proj";
    const TensorView* fused = file->find(prefix + (down ? "down_proj" : "gate_up_proj"));
    KEEL_CHECK(fused != nullptr);
    const int64_t fused_rows = fused->shape[1];
    *cols = fused->shape[2];
    *rows = down ? fused_rows : fused_rows / 2;
    const int64_t row0 = proj == "up_proj" ? fused_rows / 2 : 0;
    std::vector<float> out(static_cast<size_t>(*rows * *cols));
    for (int64_t r = 0; r < *rows; ++r)
      for (int64_t c = 0; c < *cols; ++c)
        out[static_cast<size_t>(r * *cols + c)] =
            float_element(*fused, (expert * fused_rows + row0 + r) * *cols + c);
    return out;
  }
};

bool is_routed_expert(const std::string& name) {
  return name.find(".experts.") != std::string::npos;
}

// What the Qwen FP8 releases quantize (the default fp8 scope), by module name.
bool is_fp8_linear(const std::string& module) {
  if (is_routed_expert(module)) return true;
  for (const char* suffix :
       {".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
        ".shared_expert.gate_proj", ".shared_expert.up_proj", ".shared_expert.down_proj",
        ".linear_attn.in_proj_qkv", ".linear_attn.in_proj_z", ".linear_attn.in_proj_qkvz",
        ".linear_attn.out_proj"}) {
    const std::string s(suffix);
    if (module.size() >= s.size() && module.compare(module.size() - s.size(), s.size(), s) == 0)
      return true;
  }
  return false;
}

std::string module_of(const std::string& name) {
  for (const std::string suffix : {".weight", ".bias"})
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return name.substr(0, name.size() - suffix.size());
  return name;
}

// The quantized modules of the reference checkpoint, per expert (Qwen3.5's fused experts
// expanded), in the scope the format quantizes by default.
std::vector<std::string> quantized_modules(const SafetensorsFile& reference, bool fp8) {
  std::vector<std::string> modules;
  for (const auto& [name, view] : reference.tensors()) {
    if (view.shape.size() == 3 && is_routed_expert(name)) {
      const std::string prefix = name.substr(0, name.find(".experts.") + 9);
      const bool down = name.substr(prefix.size()) == "down_proj";
      for (int64_t e = 0; e < view.shape[0]; ++e) {
        const std::string base = prefix + std::to_string(e) + ".";
        if (down) {
          modules.push_back(base + "down_proj");
        } else {
          modules.push_back(base + "gate_proj");
          modules.push_back(base + "up_proj");
        }
      }
      continue;
    }
    if (view.shape.size() != 2 || module_of(name) + ".weight" != name) continue;
    if (fp8 ? is_fp8_linear(module_of(name)) : is_routed_expert(name))
      modules.push_back(module_of(name));
  }
  return modules;
}

struct Checkpoint {
  std::string dir;
  std::unique_ptr<SafetensorsFile> file;
  Reference reference;
  json config;
};

Checkpoint load(const std::string& preset_name, QuantOptions quant, const std::string& name) {
  Checkpoint out;
  out.dir = generate(preset_name, quant, name);
  out.file = SafetensorsFile::open(out.dir + "/model.safetensors");
  const std::string bf16_dir =
      generate(preset_name, quant_options(QuantFormat::kNone), name + "-bf16");
  out.reference.file = SafetensorsFile::open(bf16_dir + "/model.safetensors");
  out.config = read_json(out.dir + "/config.json");
  return out;
}

// Every unquantized tensor of the reference is present, byte-identical; every tensor in the
// quantized file is either such a tensor or one of `suffixes` of a quantized module; returns
// the quantized modules.
std::vector<std::string> expect_layout(const Checkpoint& ckpt, bool fp8,
                                       const std::vector<std::string>& suffixes) {
  const std::vector<std::string> modules = quantized_modules(*ckpt.reference.file, fp8);
  const std::set<std::string> quantized(modules.begin(), modules.end());
  std::set<std::string> expected;
  for (const auto& [name, view] : ckpt.reference.file->tensors()) {
    if (quantized.count(module_of(name)) && module_of(name) + ".weight" == name) continue;
    if (view.shape.size() == 3 && is_routed_expert(name)) continue;  // Qwen3.5 fused experts
    expected.insert(name);
    const TensorView* got = ckpt.file->find(name);
    EXPECT_NE(got, nullptr) << name;
    if (got == nullptr) continue;
    EXPECT_EQ(got->type, view.type) << name;
    EXPECT_EQ(got->shape, view.shape) << name;
    EXPECT_TRUE(got->nbytes == view.nbytes && std::memcmp(got->data, view.data, view.nbytes) == 0)
        << name << " differs from the bf16 checkpoint";
  }
  for (const std::string& module : modules)
    for (const std::string& suffix : suffixes) expected.insert(module + suffix);
  std::set<std::string> present;
  for (const auto& [name, view] : ckpt.file->tensors()) present.insert(name);
  EXPECT_EQ(present, expected);
  return modules;
}

// The config's list of unquantized modules: exactly the 2-D Linears left in bf16 (not
// embeddings), or for fp8 every module or parameter left in bf16.
std::set<std::string> expected_ignore(const Checkpoint& ckpt, bool fp8) {
  const std::vector<std::string> modules = quantized_modules(*ckpt.reference.file, fp8);
  const std::set<std::string> quantized(modules.begin(), modules.end());
  std::set<std::string> out;
  for (const auto& [name, view] : ckpt.reference.file->tensors()) {
    if (view.shape.size() == 3 && is_routed_expert(name)) continue;
    const std::string module = module_of(name);
    if (quantized.count(module)) continue;
    if (!fp8 && (view.shape.size() != 2 || module + ".weight" != name ||
                 name.find("embed_tokens") != std::string::npos))
      continue;
    out.insert(module);
  }
  return out;
}

std::set<std::string> as_set(const json& list) {
  std::set<std::string> out;
  for (const json& item : list) out.insert(item.get<std::string>());
  return out;
}

const std::vector<std::string> kPresets = {"tiny", "tiny-qwen2", "tiny-mixtral", "tiny-qwen3.5",
                                           "tiny-qwen3-next"};

// ---- encoders ----

TEST(GenQuant, E2m1TiesToEvenKnownAnswers) {
  const std::vector<std::pair<float, float>> cases = {
      {0.25f, 0.0f}, {0.75f, 1.0f}, {1.25f, 1.0f}, {1.75f, 2.0f}, {2.5f, 2.0f},  {3.5f, 4.0f},
      {5.0f, 4.0f},  {7.0f, 6.0f},  {0.26f, 0.5f}, {2.6f, 3.0f},  {100.f, 6.0f}, {0.0f, 0.0f}};
  for (const auto& [x, expected] : cases) {
    EXPECT_EQ(e2m1_value(math::f32_to_e2m1(x)), expected) << x;
    EXPECT_EQ(e2m1_value(math::f32_to_e2m1(-x)), -expected) << -x;
  }
}

TEST(GenQuant, E4m3RoundTripsEveryCode) {
  for (int code = 0; code < 256; ++code) {
    const uint8_t c = static_cast<uint8_t>(code);
    const float value = e4m3_value(c);
    if (std::isnan(value)) {
      EXPECT_TRUE(c == 0x7f || c == 0xff);
      EXPECT_TRUE(std::isnan(math::e4m3_to_f32(c)));
      continue;
    }
    EXPECT_EQ(math::e4m3_to_f32(c), value) << code;
    EXPECT_EQ(math::f32_to_e4m3(value), c) << code;
  }
  EXPECT_EQ(e4m3_value(math::f32_to_e4m3(1000.0f)), 448.0f);  // saturating
  EXPECT_EQ(e4m3_value(math::f32_to_e4m3(1.0625f)), 1.0f);    // tie to even mantissa
  EXPECT_EQ(e4m3_value(math::f32_to_e4m3(1.1875f)), 1.25f);
}

TEST(GenQuant, ParsesFormatsAndRejectsUnknown) {
  for (const char* name : {"none", "nvfp4", "nvfp4-ct", "fp8", "awq", "gptq", "mxfp4"})
    EXPECT_EQ(quant_format_name(parse_quant_format(name)), name);
  try {
    parse_quant_format("int3");
    FAIL();
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("unknown --quant int3"), std::string::npos);
  }
}

// ---- formats ----

TEST(GenQuant, Nvfp4ModelOpt) {
  for (const std::string& preset_name : kPresets) {
    SCOPED_TRACE(preset_name);
    const Checkpoint ckpt = load(preset_name, quant_options(QuantFormat::kNvfp4), "nvfp4");
    const std::vector<std::string> modules =
        expect_layout(ckpt, false, {".weight", ".weight_scale", ".weight_scale_2", ".input_scale"});
    ASSERT_FALSE(modules.empty());
    for (const std::string& module : modules) {
      int64_t n = 0, k = 0;
      const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
      const SafetensorsFile& f = *ckpt.file;
      expect_tensor(f, module + ".weight", TensorType::kU8, {n, k / 2});
      expect_tensor(f, module + ".weight_scale", TensorType::kF8E4M3, {n, k / 16});
      expect_tensor(f, module + ".weight_scale_2", TensorType::kF32, {});
      expect_tensor(f, module + ".input_scale", TensorType::kF32, {});
      const TensorView& packed = *f.find(module + ".weight");
      const TensorView& scales = *f.find(module + ".weight_scale");
      const float ws2 = element<float>(*f.find(module + ".weight_scale_2"), 0);
      EXPECT_EQ(element<float>(*f.find(module + ".input_scale"), 0), 8.0f / (6.0f * 448.0f));
      // weight_scale_2 = amax / (6 * 448), amax over gate and up of one expert together.
      float amax = 0;
      std::string partner;
      if (module.size() > 9 && module.substr(module.size() - 9) == "gate_proj")
        partner = module.substr(0, module.size() - 9) + "up_proj";
      if (module.size() > 7 && module.substr(module.size() - 7) == "up_proj")
        partner = module.substr(0, module.size() - 7) + "gate_proj";
      if (module.size() > 2 && (module.substr(module.size() - 2) == "w1"))
        partner = module.substr(0, module.size() - 2) + "w3";
      if (module.size() > 2 && (module.substr(module.size() - 2) == "w3"))
        partner = module.substr(0, module.size() - 2) + "w1";
      for (float v : w) amax = std::max(amax, std::fabs(v));
      if (!partner.empty()) {
        int64_t pn = 0, pk = 0;
        for (float v : ckpt.reference.matrix(partner, &pn, &pk))
          amax = std::max(amax, std::fabs(v));
        EXPECT_EQ(ws2, element<float>(*f.find(partner + ".weight_scale_2"), 0)) << module;
      }
      EXPECT_EQ(ws2, amax / (6.0f * 448.0f)) << module;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t b = 0; b < k / 16; ++b) {
          const float block_scale = e4m3_value(element<uint8_t>(scales, r * (k / 16) + b));
          float block_amax = 0;
          for (int64_t i = 0; i < 16; ++i)
            block_amax =
                std::max(block_amax, std::fabs(w[static_cast<size_t>(r * k + b * 16 + i)]));
          const float ideal = std::max(block_amax / (6 * ws2), 0x1p-9f);
          if (ideal >= 0x1p-6f) {
            EXPECT_LE(std::fabs(block_scale - ideal), ideal / 16) << module;
          }
          const float s = block_scale * ws2;
          for (int64_t i = 0; i < 16; ++i) {
            const int64_t kk = b * 16 + i;
            const uint8_t byte = element<uint8_t>(packed, r * (k / 2) + kk / 2);
            const float deq = e2m1_value((kk % 2) ? byte >> 4 : byte & 15) * s;
            const float ref = w[static_cast<size_t>(r * k + kk)];
            ASSERT_LE(std::fabs(deq - ref), e2m1_bound(ref, s)) << module << " " << r << "," << kk;
          }
        }
    }
    const json hf = read_json(ckpt.dir + "/hf_quant_config.json");
    EXPECT_EQ(hf["producer"]["name"], "modelopt");
    EXPECT_EQ(hf["quantization"]["quant_algo"], "NVFP4");
    EXPECT_TRUE(hf["quantization"]["kv_cache_quant_algo"].is_null());
    EXPECT_EQ(hf["quantization"]["group_size"], 16);
    EXPECT_EQ(as_set(hf["quantization"]["exclude_modules"]), expected_ignore(ckpt, false));
    const json& q = ckpt.config["quantization_config"];
    EXPECT_EQ(q["quant_method"], "modelopt");
    EXPECT_EQ(q["quant_algo"], "NVFP4");
    EXPECT_EQ(q["config_groups"]["group_0"]["weights"]["group_size"], 16);
    EXPECT_EQ(q["config_groups"]["group_0"]["weights"]["num_bits"], 4);
    EXPECT_EQ(q["config_groups"]["group_0"]["input_activations"]["type"], "float");
    EXPECT_EQ(as_set(q["ignore"]), expected_ignore(ckpt, false));
    EXPECT_TRUE(as_set(q["ignore"]).count("lm_head") ||
                ckpt.reference.file->find("lm_head.weight") == nullptr);
  }
}

TEST(GenQuant, Nvfp4CompressedTensors) {
  for (const std::string& preset_name : kPresets) {
    SCOPED_TRACE(preset_name);
    const Checkpoint ckpt = load(preset_name, quant_options(QuantFormat::kNvfp4Ct), "nvfp4ct");
    const std::vector<std::string> modules = expect_layout(
        ckpt, false,
        {".weight_packed", ".weight_scale", ".weight_global_scale", ".input_global_scale"});
    for (const std::string& module : modules) {
      int64_t n = 0, k = 0;
      const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
      const SafetensorsFile& f = *ckpt.file;
      expect_tensor(f, module + ".weight_packed", TensorType::kU8, {n, k / 2});
      expect_tensor(f, module + ".weight_scale", TensorType::kF8E4M3, {n, k / 16});
      expect_tensor(f, module + ".weight_global_scale", TensorType::kF32, {1});
      expect_tensor(f, module + ".input_global_scale", TensorType::kF32, {1});
      EXPECT_EQ(element<float>(*f.find(module + ".input_global_scale"), 0), 6.0f * 448.0f / 8.0f);
      const float global = element<float>(*f.find(module + ".weight_global_scale"), 0);
      float amax = 0;
      for (float v : w) amax = std::max(amax, std::fabs(v));
      // A divisor ~ 448 * 6 / amax (amax over the fused gate/up pair: <= this one's).
      EXPECT_LE(global, 448.0f * 6.0f / amax * (1 + 1e-6f)) << module;
      const TensorView& packed = *f.find(module + ".weight_packed");
      const TensorView& scales = *f.find(module + ".weight_scale");
      for (int64_t r = 0; r < n; ++r)
        for (int64_t kk = 0; kk < k; ++kk) {
          const float s = e4m3_value(element<uint8_t>(scales, r * (k / 16) + kk / 16)) / global;
          const uint8_t byte = element<uint8_t>(packed, r * (k / 2) + kk / 2);
          const float deq = e2m1_value((kk % 2) ? byte >> 4 : byte & 15) * s;
          const float ref = w[static_cast<size_t>(r * k + kk)];
          ASSERT_LE(std::fabs(deq - ref), e2m1_bound(ref, s)) << module << " " << r << "," << kk;
        }
    }
    const json& q = ckpt.config["quantization_config"];
    EXPECT_EQ(q["quant_method"], "compressed-tensors");
    EXPECT_EQ(q["format"], "nvfp4-pack-quantized");
    const json& group = q["config_groups"]["group_0"];
    EXPECT_EQ(group["weights"]["strategy"], "tensor_group");
    EXPECT_EQ(group["weights"]["group_size"], 16);
    EXPECT_EQ(group["weights"]["symmetric"], true);
    EXPECT_EQ(group["input_activations"]["dynamic"], "local");
    EXPECT_EQ(group["targets"], json::array({"Linear"}));
    EXPECT_EQ(as_set(q["ignore"]), expected_ignore(ckpt, false));
    EXPECT_FALSE(fs::exists(ckpt.dir + "/hf_quant_config.json"));
  }
}

void check_fp8(const Checkpoint& ckpt, TensorType scale_type) {
  const std::vector<std::string> modules =
      expect_layout(ckpt, true, {".weight", ".weight_scale_inv"});
  for (const std::string& module : modules) {
    int64_t n = 0, k = 0;
    const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
    const int64_t bn = (n + 127) / 128, bk = (k + 127) / 128;
    const SafetensorsFile& f = *ckpt.file;
    expect_tensor(f, module + ".weight", TensorType::kF8E4M3, {n, k});
    expect_tensor(f, module + ".weight_scale_inv", scale_type, {bn, bk});
    const TensorView& codes = *f.find(module + ".weight");
    const TensorView& scales = *f.find(module + ".weight_scale_inv");
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t block = (r / 128) * bk + c / 128;
        const float s = scale_type == TensorType::kBF16
                            ? bf16_to_f32(element<uint16_t>(scales, block))
                            : element<float>(scales, block);
        const float ref = w[static_cast<size_t>(r * k + c)];
        const float deq = e4m3_value(element<uint8_t>(codes, r * k + c)) * s;
        const float x = std::fabs(ref) / s;
        const float bound =
            (e4m3_half_ulp(std::min(x, 448.0f)) * s + std::max(0.0f, std::fabs(ref) - 448 * s)) *
                (1 + 1e-6f) +
            1e-12f;
        ASSERT_LE(std::fabs(deq - ref), bound) << module << " " << r << "," << c;
      }
    // The scale is block_amax / 448 (rounded to the scale dtype).
    float amax = 0;
    for (int64_t r = 0; r < std::min<int64_t>(n, 128); ++r)
      for (int64_t c = 0; c < std::min<int64_t>(k, 128); ++c)
        amax = std::max(amax, std::fabs(w[static_cast<size_t>(r * k + c)]));
    const float s0 = scale_type == TensorType::kBF16 ? bf16_to_f32(element<uint16_t>(scales, 0))
                                                     : element<float>(scales, 0);
    EXPECT_NEAR(s0, amax / 448.0f, amax / 448.0f / 256.0f) << module;
  }
  const json& q = ckpt.config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "fp8");
  EXPECT_EQ(q["fmt"], "e4m3");
  EXPECT_EQ(q["activation_scheme"], "dynamic");
  EXPECT_EQ(q["weight_block_size"], json::array({128, 128}));
  EXPECT_EQ(as_set(q["modules_to_not_convert"]), expected_ignore(ckpt, true));
}

TEST(GenQuant, Fp8Block) {
  for (const std::string& preset_name : kPresets) {
    SCOPED_TRACE(preset_name);
    check_fp8(load(preset_name, quant_options(QuantFormat::kFp8), "fp8"), TensorType::kBF16);
  }
  QuantOptions f32 = quant_options(QuantFormat::kFp8);
  f32.fp8_scale_dtype = DType::kF32;
  check_fp8(load("tiny-qwen3.5", f32, "fp8-f32"), TensorType::kF32);
}

TEST(GenQuant, Fp8KeepsQwen35GdnSmallProjectionsInBf16) {
  const Checkpoint ckpt = load("tiny-qwen3.5", quant_options(QuantFormat::kFp8), "fp8");
  const std::string layer = "model.language_model.layers.0.";
  EXPECT_EQ(ckpt.file->find(layer + "linear_attn.in_proj_qkv.weight")->type, TensorType::kF8E4M3);
  EXPECT_EQ(ckpt.file->find(layer + "linear_attn.in_proj_b.weight")->type, TensorType::kBF16);
  EXPECT_EQ(ckpt.file->find(layer + "mlp.gate.weight")->type, TensorType::kBF16);
  EXPECT_EQ(ckpt.file->find(layer + "mlp.shared_expert_gate.weight")->type, TensorType::kBF16);
  EXPECT_EQ(ckpt.file->find(layer + "mlp.experts.0.gate_proj.weight")->type, TensorType::kF8E4M3);
  const std::set<std::string> ignore =
      as_set(ckpt.config["quantization_config"]["modules_to_not_convert"]);
  EXPECT_TRUE(ignore.count(layer + "mlp.gate"));
  EXPECT_TRUE(ignore.count(layer + "linear_attn.in_proj_a"));
  EXPECT_TRUE(ignore.count(layer + "input_layernorm"));
  EXPECT_FALSE(ignore.count(layer + "linear_attn.in_proj_qkv"));
}

// Int4 words: AWQ column 8j + c in nibble kAwqNibble[c]; GPTQ element i in nibble i.
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
uint32_t nibble(uint32_t word, int position) {
  return (word >> (4 * position)) & 15u;
}

TEST(GenQuant, AwqGemm) {
  for (const std::string& preset_name : kPresets) {
    SCOPED_TRACE(preset_name);
    const Checkpoint ckpt = load(preset_name, quant_options(QuantFormat::kAwq), "awq");
    const int64_t g = ckpt.config["quantization_config"]["group_size"].get<int64_t>();
    EXPECT_TRUE(g == 16 || g == 32 || g == 64) << g;  // tiny K: 32 .. 64
    const std::vector<std::string> modules =
        expect_layout(ckpt, false, {".qweight", ".qzeros", ".scales"});
    for (const std::string& module : modules) {
      int64_t n = 0, k = 0;
      const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
      const SafetensorsFile& f = *ckpt.file;
      expect_tensor(f, module + ".qweight", TensorType::kI32, {k, n / 8});
      expect_tensor(f, module + ".qzeros", TensorType::kI32, {k / g, n / 8});
      expect_tensor(f, module + ".scales", TensorType::kF16, {k / g, n});
      const TensorView& qweight = *f.find(module + ".qweight");
      const TensorView& qzeros = *f.find(module + ".qzeros");
      const TensorView& scales = *f.find(module + ".scales");
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t c = 0; c < n; ++c) {
          const uint32_t word = element<uint32_t>(qweight, kk * (n / 8) + c / 8);
          const uint32_t zword = element<uint32_t>(qzeros, (kk / g) * (n / 8) + c / 8);
          const float s = f16_to_f32(element<uint16_t>(scales, (kk / g) * n + c));
          const int q = static_cast<int>(nibble(word, kAwqNibble[c % 8]));
          const int z = static_cast<int>(nibble(zword, kAwqNibble[c % 8]));
          const float deq = static_cast<float>(q - z) * s;
          const float ref = w[static_cast<size_t>(c * k + kk)];
          ASSERT_LE(std::fabs(deq - ref), 0.51f * s) << module << " " << c << "," << kk;
        }
      // One known word: qweight[0][0] holds columns 0..7 of k = 0 in nibbles 0,4,1,5,2,6,3,7,
      // each round(w / s) + z with AutoAWQ's min/max scale and zero of its group.
      const uint32_t word = element<uint32_t>(qweight, 0);
      for (int c = 0; c < 8; ++c) {
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t kk = 0; kk < g; ++kk) {
          lo = std::min(lo, w[static_cast<size_t>(c * k + kk)]);
          hi = std::max(hi, w[static_cast<size_t>(c * k + kk)]);
        }
        const float s = f16_to_f32(f32_to_f16((hi - lo) / 15.0f));
        const int z = std::clamp(static_cast<int>(-std::nearbyint(lo / s)), 0, 15);
        const int q = std::clamp(
            static_cast<int>(std::nearbyint(w[static_cast<size_t>(c * k)] / s)) + z, 0, 15);
        EXPECT_EQ(nibble(word, kAwqNibble[c]), static_cast<uint32_t>(q))
            << module << " column " << c;
      }
    }
    const json& q = ckpt.config["quantization_config"];
    EXPECT_EQ(q["quant_method"], "awq");
    EXPECT_EQ(q["bits"], 4);
    EXPECT_EQ(q["zero_point"], true);
    EXPECT_EQ(q["version"], "gemm");
    EXPECT_EQ(as_set(q["modules_to_not_convert"]), expected_ignore(ckpt, false));
  }
}

void check_gptq(const Checkpoint& ckpt, bool desc_act, bool sym) {
  const json& q = ckpt.config["quantization_config"];
  const int64_t g = q["group_size"].get<int64_t>();
  EXPECT_EQ(q["quant_method"], "gptq");
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["desc_act"], desc_act);
  EXPECT_EQ(q["sym"], sym);
  EXPECT_EQ(q["checkpoint_format"], "gptq");
  const std::vector<std::string> modules =
      expect_layout(ckpt, false, {".qweight", ".qzeros", ".scales", ".g_idx"});
  bool any_permuted = false;
  for (const std::string& module : modules) {
    int64_t n = 0, k = 0;
    const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
    const SafetensorsFile& f = *ckpt.file;
    expect_tensor(f, module + ".qweight", TensorType::kI32, {k / 8, n});
    expect_tensor(f, module + ".qzeros", TensorType::kI32, {k / g, n / 8});
    expect_tensor(f, module + ".scales", TensorType::kF16, {k / g, n});
    expect_tensor(f, module + ".g_idx", TensorType::kI32, {k});
    const TensorView& qweight = *f.find(module + ".qweight");
    const TensorView& qzeros = *f.find(module + ".qzeros");
    const TensorView& scales = *f.find(module + ".scales");
    const TensorView& g_idx = *f.find(module + ".g_idx");
    std::vector<int64_t> group_count(static_cast<size_t>(k / g));
    for (int64_t kk = 0; kk < k; ++kk) {
      const int32_t group = element<int32_t>(g_idx, kk);
      ASSERT_TRUE(group >= 0 && group < k / g);
      ++group_count[static_cast<size_t>(group)];
      if (group != kk / g) any_permuted = true;
    }
    for (int64_t count : group_count) EXPECT_EQ(count, g) << module;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int32_t group = element<int32_t>(g_idx, kk);
      for (int64_t c = 0; c < n; ++c) {
        const int qv =
            static_cast<int>(nibble(element<uint32_t>(qweight, (kk / 8) * n + c), kk % 8));
        const int z =
            static_cast<int>(nibble(element<uint32_t>(qzeros, group * (n / 8) + c / 8), c % 8)) + 1;
        const float s = f16_to_f32(element<uint16_t>(scales, group * n + c));
        if (sym) {
          ASSERT_EQ(z, 8);
        }
        const float deq = static_cast<float>(qv - z) * s;
        const float ref = w[static_cast<size_t>(c * k + kk)];
        ASSERT_LE(std::fabs(deq - ref), (z == 1 ? 1.01f : 0.51f) * s)
            << module << " " << c << "," << kk;
      }
    }
    if (sym) {
      EXPECT_EQ(element<uint32_t>(qzeros, 0), 0x77777777u) << "v1 zeros: 8 - 1 in each nibble";
    }
  }
  EXPECT_EQ(any_permuted, desc_act);
}

TEST(GenQuant, GptqV1) {
  for (const std::string& preset_name : kPresets) {
    SCOPED_TRACE(preset_name);
    check_gptq(load(preset_name, quant_options(QuantFormat::kGptq), "gptq"), false, true);
  }
  QuantOptions act_order = quant_options(QuantFormat::kGptq);
  act_order.gptq_desc_act = true;
  check_gptq(load("tiny-qwen3-next", act_order, "gptq-desc-act"), true, true);
  QuantOptions asym = quant_options(QuantFormat::kGptq);
  asym.gptq_sym = false;
  asym.gptq_desc_act = true;
  asym.group_size = 16;  // tiny-mixtral's K are all 64: the automatic 64 is a single group
  check_gptq(load("tiny-mixtral", asym, "gptq-asym"), true, false);
}

TEST(GenQuant, GptqKnownWord) {
  // qweight[0][0] holds k = 0..7 of output 0 in nibbles 0..7 (sequential along K).
  const Checkpoint ckpt = load("tiny", quant_options(QuantFormat::kGptq), "gptq");
  const std::string module = "model.layers.0.mlp.experts.0.gate_proj";
  int64_t n = 0, k = 0;
  const std::vector<float> w = ckpt.reference.matrix(module, &n, &k);
  const int64_t g = ckpt.config["quantization_config"]["group_size"].get<int64_t>();
  float amax = 0;
  for (int64_t kk = 0; kk < g; ++kk) amax = std::max(amax, std::fabs(w[static_cast<size_t>(kk)]));
  const float scale = 2 * amax / 15;
  const uint32_t word = element<uint32_t>(*ckpt.file->find(module + ".qweight"), 0);
  for (int i = 0; i < 8; ++i) {
    const int q =
        std::clamp(static_cast<int>(std::nearbyint(w[static_cast<size_t>(i)] / scale)) + 8, 0, 15);
    EXPECT_EQ(nibble(word, i), static_cast<uint32_t>(q)) << i;
  }
}

TEST(GenQuant, Mxfp4) {
  for (const std::string preset_name :
       {"tiny-qwen2", "tiny-mixtral", "tiny-qwen3.5", "tiny-qwen3-next"}) {
    SCOPED_TRACE(preset_name);
    const Checkpoint ckpt = load(preset_name, quant_options(QuantFormat::kMxfp4), "mxfp4");
    const ModelPreset preset = load_model_preset(find_model_preset(preset_name));
    const int64_t e_count = preset.num_experts, inter = preset.moe_intermediate_size,
                  hidden = preset.hidden_size;
    std::set<std::string> prefixes;
    for (const std::string& module : quantized_modules(*ckpt.reference.file, false))
      prefixes.insert(module.substr(0, module.find(".experts.") + 9));
    EXPECT_EQ(static_cast<int64_t>(prefixes.size()), preset.num_hidden_layers);
    std::set<std::string> expected;
    for (const auto& [name, view] : ckpt.reference.file->tensors())
      if (!is_routed_expert(name)) expected.insert(name);
    for (const std::string& prefix : prefixes) {
      for (const char* suffix :
           {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"})
        expected.insert(prefix + suffix);
      const SafetensorsFile& f = *ckpt.file;
      expect_tensor(f, prefix + "gate_up_proj_blocks", TensorType::kU8,
                    {e_count, 2 * inter, hidden / 32, 16});
      expect_tensor(f, prefix + "gate_up_proj_scales", TensorType::kU8,
                    {e_count, 2 * inter, hidden / 32});
      expect_tensor(f, prefix + "down_proj_blocks", TensorType::kU8,
                    {e_count, hidden, inter / 32, 16});
      expect_tensor(f, prefix + "down_proj_scales", TensorType::kU8, {e_count, hidden, inter / 32});
      const bool mixtral = preset_name == "tiny-mixtral";
      for (int64_t e = 0; e < e_count; ++e) {
        const std::string base = prefix + std::to_string(e) + ".";
        // gate rows, then up rows, then down: [rows of this projection, K, row offset]
        const std::vector<std::tuple<std::string, std::string, int64_t>> parts = {
            {mixtral ? "w1" : "gate_proj", "gate_up_proj", 0},
            {mixtral ? "w3" : "up_proj", "gate_up_proj", inter},
            {mixtral ? "w2" : "down_proj", "down_proj", 0}};
        for (const auto& [proj, fused, row0] : parts) {
          int64_t n = 0, k = 0;
          const std::vector<float> w = ckpt.reference.matrix(base + proj, &n, &k);
          const TensorView& blocks = *f.find(prefix + fused + "_blocks");
          const TensorView& scales = *f.find(prefix + fused + "_scales");
          const int64_t fused_rows = blocks.shape[1];
          for (int64_t r = 0; r < n; ++r) {
            const int64_t row = e * fused_rows + row0 + r;
            for (int64_t b = 0; b < k / 32; ++b) {
              float amax = 0;
              for (int64_t i = 0; i < 32; ++i)
                amax = std::max(amax, std::fabs(w[static_cast<size_t>(r * k + b * 32 + i)]));
              const int scale_code = element<uint8_t>(scales, row * (k / 32) + b);
              ASSERT_EQ(scale_code, std::ilogb(amax) - 2 + 127) << base << proj;
              const float s = std::ldexp(1.0f, scale_code - 127);
              for (int64_t i = 0; i < 32; ++i) {
                const uint8_t byte = element<uint8_t>(blocks, (row * (k / 32) + b) * 16 + i / 2);
                const float deq = e2m1_value((i % 2) ? byte >> 4 : byte & 15) * s;
                const float ref = w[static_cast<size_t>(r * k + b * 32 + i)];
                ASSERT_LE(std::fabs(deq - ref), e2m1_bound(ref, s)) << base << proj;
              }
            }
          }
        }
      }
    }
    std::set<std::string> present;
    for (const auto& [name, view] : ckpt.file->tensors()) present.insert(name);
    EXPECT_EQ(present, expected);
    const json& q = ckpt.config["quantization_config"];
    EXPECT_EQ(q["quant_method"], "mxfp4");
    EXPECT_EQ(as_set(q["modules_to_not_convert"]), expected_ignore(ckpt, false));
  }
}

TEST(GenQuant, ConstraintErrorsNameTheTensor) {
  // tiny's experts have K = 48 in down_proj: not a multiple of MXFP4's 32.
  try {
    generate("tiny", quant_options(QuantFormat::kMxfp4), "mxfp4-tiny");
    FAIL();
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("down_proj"), std::string::npos) << message;
    EXPECT_NE(message.find("not a multiple of 32"), std::string::npos) << message;
  }
  QuantOptions awq = quant_options(QuantFormat::kAwq);
  awq.group_size = 128;
  try {
    generate("tiny", awq, "awq-128");
    FAIL();
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("experts.0.gate_proj.weight"), std::string::npos) << message;
    EXPECT_NE(message.find("not a multiple of 128"), std::string::npos) << message;
  }
}

TEST(GenQuant, LinearScopeNvfp4SharesQkvGlobalScale) {
  QuantOptions options = quant_options(QuantFormat::kNvfp4);
  options.scope = QuantScope::kLinear;
  const std::string dir = generate("tiny", options, "nvfp4-linear");
  const auto file = SafetensorsFile::open(dir + "/model.safetensors");
  const std::string attn = "model.layers.1.self_attn.";
  const float q = element<float>(*file->find(attn + "q_proj.weight_scale_2"), 0);
  EXPECT_EQ(q, element<float>(*file->find(attn + "k_proj.weight_scale_2"), 0));
  EXPECT_EQ(q, element<float>(*file->find(attn + "v_proj.weight_scale_2"), 0));
  EXPECT_EQ(file->find(attn + "o_proj.weight")->type, TensorType::kU8);
  EXPECT_EQ(file->find("model.layers.1.mlp.gate.weight")->type, TensorType::kBF16);
}

// Dense-MLP layers (ModelPreset::mlp_only_layers, configs/models/flip-dense.yaml): gen-model
// writes mlp.{gate,up,down}_proj instead of router and experts, lists the layers in config.json,
// and --quant quantizes that MLP as the layer's feed-forward (gate and up sharing NVFP4's global
// scale); the engine loads both checkpoints, and the NVFP4 one holds fewer weight bytes by the
// packed size of the MLP (codes K/2 + E4M3 scales K/16 + an fp32 row scale per row, against
// 2 bytes per bf16 element). Bad mlp_only_layers entries are refused naming the key.
TEST(GenQuant, DenseMlpLayers) {
  const std::string bf16 = generate("flip-dense", QuantOptions{}, "dense-bf16");
  const std::string nvfp4 =
      generate("flip-dense", quant_options(QuantFormat::kNvfp4), "dense-nvfp4");
  const json config = read_json(nvfp4 + "/config.json");
  EXPECT_EQ(config["mlp_only_layers"], json::array({0, 1, 2, 3}));
  const auto dense = SafetensorsFile::open(bf16 + "/model.safetensors");
  const auto packed = SafetensorsFile::open(nvfp4 + "/model.safetensors");
  const std::string mlp = "model.layers.2.mlp.";
  EXPECT_EQ(dense->find(mlp + "gate.weight"), nullptr);
  EXPECT_EQ(dense->find(mlp + "experts.0.gate_proj.weight"), nullptr);
  expect_tensor(*dense, mlp + "gate_proj.weight", TensorType::kBF16, {2048, 128});
  expect_tensor(*dense, mlp + "down_proj.weight", TensorType::kBF16, {128, 2048});
  expect_tensor(*packed, mlp + "gate_proj.weight", TensorType::kU8, {2048, 64});
  expect_tensor(*packed, mlp + "down_proj.weight", TensorType::kU8, {128, 1024});
  expect_tensor(*packed, mlp + "down_proj.weight_scale", TensorType::kF8E4M3, {128, 128});
  EXPECT_EQ(element<float>(*packed->find(mlp + "gate_proj.weight_scale_2"), 0),
            element<float>(*packed->find(mlp + "up_proj.weight_scale_2"), 0));
  expect_tensor(*packed, "model.layers.2.self_attn.q_proj.weight", TensorType::kBF16, {128, 128});

  EngineOptions options;
  options.tp_size = 2;
  Engine dense_engine(bf16, options);
  Engine packed_engine(nvfp4, options);
  // Per rank: 4 layers x 3 matrices of 2048 x 128 split in two.
  const int64_t elements = 4 * 3 * 2048 * 128 / 2;
  const int64_t rows = 4 * (2 * 1024 + 128);  // gate+up rows, down rows (a column slice)
  const int64_t packed_bytes = elements / 2 + elements / 16 + rows * 4;
  EXPECT_EQ(dense_engine.weight_bytes_per_rank() - packed_engine.weight_bytes_per_rank(),
            elements * 2 - packed_bytes);
  GenerateRequest request;
  request.prompts = {{5, 6, 7, 8}};
  request.max_new_tokens = 4;
  EXPECT_EQ(packed_engine.generate(request).tokens[0].size(), 4u);

  const std::string yaml_dir = scratch_dir("presets");
  auto refused = [&](const std::string& extra, const std::string& expected) {
    std::string text = read_text(find_model_preset("flip-dense"));
    text = text.substr(0, text.find("mlp_only_layers")) + extra;
    const std::string path = yaml_dir + "/bad.yaml";
    std::ofstream(path) << text;
    try {
      load_model_preset(path);
      ADD_FAILURE() << "accepted: " << extra;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos) << error.what();
    }
  };
  refused("mlp_only_layers: [4]\n", "mlp_only_layers entry 4 is not in [0, num_hidden_layers)");
  refused("mlp_only_layers: [1, 1]\n", "lists layer 1 twice");
  refused("mlp_only_layers: 3\n", "must be a list");
  refused("mlp_only_layers: [a]\n", "entries must be integers");
  try {
    generate("flip-dense", quant_options(QuantFormat::kMxfp4), "dense-mxfp4");
    ADD_FAILURE() << "mxfp4 with dense layers accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("dense MLP layers"), std::string::npos)
        << error.what();
  }
}

TEST(GenQuant, DeterministicFiles) {
  for (QuantFormat format : {QuantFormat::kNvfp4, QuantFormat::kNvfp4Ct, QuantFormat::kFp8,
                             QuantFormat::kAwq, QuantFormat::kGptq, QuantFormat::kMxfp4}) {
    const std::string name(quant_format_name(format));
    QuantOptions options = quant_options(format);
    options.gptq_desc_act = true;
    const std::string a = generate("tiny-qwen3.5", options, name + "-a");
    const std::string b = generate("tiny-qwen3.5", options, name + "-b");
    std::set<std::string> files;
    for (const auto& entry : fs::directory_iterator(a)) files.insert(entry.path().filename());
    for (const std::string& file : files)
      EXPECT_TRUE(read_text(a + "/" + file) == read_text(b + "/" + file)) << name << " " << file;
    EXPECT_FALSE(files.empty());
    const std::string other = generate("tiny-qwen3.5", options, name + "-seed", 8);
    EXPECT_FALSE(read_text(a + "/model.safetensors") == read_text(other + "/model.safetensors"));
  }
}

}  // namespace
}  // namespace keel
