// Quantization of gen-model's synthetic weights into released checkpoint formats (gen_quant.h).
// Host-only and single-threaded; every code conversion goes through kernels/math/quant_math.h
// (f32_to_e2m1: nearest, ties to the even code, saturating at 6; f32_to_e4m3: RNE, saturating
// at 448). All arithmetic is fp32 in the order the cited source writes it; rounding to an
// integer is round-half-to-even (torch.round) via std::nearbyint in the default rounding mode.
//
// Fused groups: ModelOpt's export gives the Linears that inference engines fuse one shared
// global scale, the max over the shards of amax (weight_scale_2 = max amax / (6 * 448)): gate and
// up of one expert (w1/w3 for Mixtral), and q/k/v when attention is quantized (--quant-scope
// linear); llm-compressor does the same for nvfp4-pack-quantized (update_fused_layer_weight_
// global_scales). keel reads the shards as one weight with one global scale per row, so either
// way works for it; this matches the releases. Other formats' scales are local, so grouping
// changes nothing for them.
#include "runtime/model/gen_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <numeric>
#include <set>

#include "kernels/base/check.h"
#include "kernels/math/quant_math.h"
#include "runtime/model/gen_model.h"

namespace keel {

namespace {

using math::e2m1_to_f32;
using math::e4m3_to_f32;
using math::f32_to_e2m1;
using math::f32_to_e4m3;

constexpr float kE2m1Max = 6.0f;
constexpr float kE4m3Max = 448.0f;

// A weight matrix [rows, cols] widened to fp32, with the module name it belongs to (the tensor
// name without ".weight").
struct FloatMatrix {
  std::string module;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> values;
  float at(int64_t r, int64_t c) const { return values[static_cast<size_t>(r * cols + c)]; }
};

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

std::string strip_suffix(const std::string& name) {
  for (std::string_view suffix : {".weight", ".bias"})
    if (ends_with(name, suffix)) return name.substr(0, name.size() - suffix.size());
  return name;
}

std::vector<float> to_floats(const TensorToWrite& tensor) {
  const size_t count = tensor.bytes.size() / dtype_size(tensor.dtype);
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) values[i] = load_as_f32(tensor.bytes.data(), tensor.dtype, i);
  return values;
}

FloatMatrix matrix_of(const TensorToWrite& tensor) {
  KEEL_CHECK(tensor.shape.size() == 2 && !tensor.raw_type);
  return FloatMatrix{strip_suffix(tensor.name), tensor.shape[0], tensor.shape[1],
                     to_floats(tensor)};
}

template <typename T>
TensorToWrite raw_tensor(std::string name, TensorType type, std::vector<int64_t> shape,
                         const std::vector<T>& values) {
  TensorToWrite tensor;
  tensor.name = std::move(name);
  tensor.raw_type = type;
  tensor.shape = std::move(shape);
  tensor.bytes.resize(values.size() * sizeof(T));
  std::memcpy(tensor.bytes.data(), values.data(), tensor.bytes.size());
  return tensor;
}

TensorToWrite f32_scalar(std::string name, std::vector<int64_t> shape, float value) {
  return raw_tensor(std::move(name), TensorType::kF32, std::move(shape), std::vector<float>{value});
}

float abs_max(const FloatMatrix& w) {
  float amax = 0;
  for (float v : w.values) amax = std::max(amax, std::fabs(v));
  return amax;
}

void require_divisible(const FloatMatrix& w, int64_t k_multiple, int64_t n_multiple,
                       std::string_view format) {
  if (w.cols % k_multiple != 0)
    throw_error("gen-model --quant ", format, ": ", w.module, ".weight [", w.rows, ", ", w.cols,
                "] has K = ", w.cols, ", not a multiple of ", k_multiple);
  if (w.rows % n_multiple != 0)
    throw_error("gen-model --quant ", format, ": ", w.module, ".weight [", w.rows, ", ", w.cols,
                "] has N = ", w.rows, ", not a multiple of ", n_multiple);
}

// Two E2M1 codes per byte, element 2i in the low nibble (ModelOpt NVFP4QTensor.quantize:
// packed = (q[..., 1::2] << 4) | q[..., 0::2]; compressed-tensors pack_fp4_to_uint8 and
// transformers' mxfp4 convert_moe_packed_tensors agree).
void pack_e2m1_row(const uint8_t* codes, int64_t count, uint8_t* out) {
  for (int64_t i = 0; i < count; i += 2)
    out[i / 2] = static_cast<uint8_t>((codes[i + 1] << 4) | codes[i]);
}

// ---- NVFP4 ----------------------------------------------------------------------------------

// The block scales and codes of one weight for a given global (per-tensor) scale, in either
// convention: ModelOpt multiplies by weight_scale_2, compressed-tensors divides by
// weight_global_scale.
struct Nvfp4Codes {
  std::vector<uint8_t> packed;  // [N, K/2]
  std::vector<uint8_t> scales;  // [N, K/16] E4M3
};

// ModelOpt, modelopt/torch/quantization/qtensor/nvfp4_tensor.py, NVFP4QTensor:
//   get_weights_scaling_factor: per_block_scale = per_block_amax / (6 * weight_scale_2);
//     zero blocks -> 1.0; clamp(min = 2^-9); .to(float8_e4m3fn)
//   quantize: scaled = w / (float(per_block_scale) * weight_scale_2); _cast_fp4 (searchsorted
//     over the E2M1 midpoints with the tie bump at 0.75, 1.75, 3.5: f32_to_e2m1)
Nvfp4Codes nvfp4_modelopt_codes(const FloatMatrix& w, float weight_scale_2) {
  const int64_t blocks = w.cols / math::kNvfp4Group;
  Nvfp4Codes out;
  out.packed.resize(static_cast<size_t>(w.rows * w.cols / 2));
  out.scales.resize(static_cast<size_t>(w.rows * blocks));
  std::vector<uint8_t> codes(static_cast<size_t>(w.cols));
  const float denominator = 6.0f * weight_scale_2;
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      float block_amax = 0;
      for (int64_t i = 0; i < math::kNvfp4Group; ++i)
        block_amax = std::max(block_amax, std::fabs(w.at(r, b * math::kNvfp4Group + i)));
      float scale = block_amax / denominator;
      if (scale == 0.0f) scale = 1.0f;
      scale = std::max(scale, 0x1p-9f);
      const uint8_t scale_code = f32_to_e4m3(scale);
      out.scales[static_cast<size_t>(r * blocks + b)] = scale_code;
      const float dequant_scale = e4m3_to_f32(scale_code) * weight_scale_2;
      for (int64_t i = 0; i < math::kNvfp4Group; ++i) {
        const int64_t k = b * math::kNvfp4Group + i;
        codes[static_cast<size_t>(k)] = f32_to_e2m1(w.at(r, k) / dequant_scale);
      }
    }
    pack_e2m1_row(codes.data(), w.cols, out.packed.data() + r * w.cols / 2);
  }
  return out;
}

// compressed-tensors (src/compressed_tensors/quantization/utils/helpers.py calculate_qparams,
// strategy tensor_group, FP4 with a global scale):
//   scale = global_scale * (block_amax / 6), clamped to the E4M3 range, cast to float8_e4m3fn;
//   zero scales -> finfo(float8_e4m3fn).eps = 0.125;
// lifecycle/forward.py _quantize: x / (float(scale) / global_scale), cast_to_fp4 (the same
// ties-to-even E2M1 rounding, saturating at 6).
Nvfp4Codes nvfp4_ct_codes(const FloatMatrix& w, float global_scale) {
  const int64_t blocks = w.cols / math::kNvfp4Group;
  Nvfp4Codes out;
  out.packed.resize(static_cast<size_t>(w.rows * w.cols / 2));
  out.scales.resize(static_cast<size_t>(w.rows * blocks));
  std::vector<uint8_t> codes(static_cast<size_t>(w.cols));
  const uint8_t eps_code = f32_to_e4m3(0.125f);
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      float block_amax = 0;
      for (int64_t i = 0; i < math::kNvfp4Group; ++i)
        block_amax = std::max(block_amax, std::fabs(w.at(r, b * math::kNvfp4Group + i)));
      const float scale = std::min(global_scale * (block_amax / kE2m1Max), kE4m3Max);
      uint8_t scale_code = f32_to_e4m3(scale);
      if (e4m3_to_f32(scale_code) == 0.0f) scale_code = eps_code;
      out.scales[static_cast<size_t>(r * blocks + b)] = scale_code;
      const float dequant_scale = e4m3_to_f32(scale_code) / global_scale;
      for (int64_t i = 0; i < math::kNvfp4Group; ++i) {
        const int64_t k = b * math::kNvfp4Group + i;
        codes[static_cast<size_t>(k)] = f32_to_e2m1(w.at(r, k) / dequant_scale);
      }
    }
    pack_e2m1_row(codes.data(), w.cols, out.packed.data() + r * w.cols / 2);
  }
  return out;
}

// ---- FP8 block 128 --------------------------------------------------------------------------

// Block-wise FP8 (DeepSeek-V3 inference/kernel.py weight/act quantization, the scheme of the
// Qwen3.x FP8 releases): per 128 x 128 block (edge blocks ragged: only the elements that exist)
// s = block_amax / 448, stored in the scale dtype; codes = e4m3(w / s_stored), the dequantized
// weight block * weight_scale_inv. A zero block (never drawn here) gets s = 1 and zero codes.
std::vector<TensorToWrite> quantize_fp8(const FloatMatrix& w, DType scale_dtype) {
  const int64_t block = math::kFp8BlockGroup;
  const int64_t block_rows = (w.rows + block - 1) / block,
                block_cols = (w.cols + block - 1) / block;
  std::vector<uint8_t> codes(static_cast<size_t>(w.rows * w.cols));
  std::vector<float> scales(static_cast<size_t>(block_rows * block_cols));
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      const int64_t r_end = std::min(w.rows, (br + 1) * block);
      const int64_t c_end = std::min(w.cols, (bc + 1) * block);
      float amax = 0;
      for (int64_t r = br * block; r < r_end; ++r)
        for (int64_t c = bc * block; c < c_end; ++c) amax = std::max(amax, std::fabs(w.at(r, c)));
      float scale = amax == 0.0f ? 1.0f : amax / kE4m3Max;
      if (scale_dtype == DType::kBF16) scale = bf16_to_f32(f32_to_bf16(scale));
      scales[static_cast<size_t>(br * block_cols + bc)] = scale;
      for (int64_t r = br * block; r < r_end; ++r)
        for (int64_t c = bc * block; c < c_end; ++c)
          codes[static_cast<size_t>(r * w.cols + c)] = f32_to_e4m3(w.at(r, c) / scale);
    }
  }
  std::vector<TensorToWrite> out;
  out.push_back(raw_tensor(w.module + ".weight", TensorType::kF8E4M3, {w.rows, w.cols}, codes));
  if (scale_dtype == DType::kBF16) {
    std::vector<uint16_t> stored(scales.size());
    for (size_t i = 0; i < scales.size(); ++i) stored[i] = f32_to_bf16(scales[i]);
    out.push_back(raw_tensor(w.module + ".weight_scale_inv", TensorType::kBF16,
                             {block_rows, block_cols}, stored));
  } else {
    out.push_back(raw_tensor(w.module + ".weight_scale_inv", TensorType::kF32,
                             {block_rows, block_cols}, scales));
  }
  return out;
}

// ---- int4: AWQ and GPTQ ---------------------------------------------------------------------

int32_t round_even(float x) {
  return static_cast<int32_t>(std::nearbyint(x));
}
int32_t clamp4(int32_t q) {
  return std::clamp(q, 0, 15);
}

// AutoAWQ GEMM (awq/quantize/quantizer.py AwqQuantizer.pseudo_quantize_tensor, zero_point,
// w_bit 4, then awq/modules/linear/gemm.py WQLinear_GEMM.from_linear and its packing). No
// activation-aware scale search (search_best_scale / clipping): that needs calibration
// activations, and on random weights it would only rescale channels; min/max per group is the
// quantizer AutoAWQ applies after the search. Per output row and group of G along K:
//   scale = clamp(max - min, min = 1e-5) / 15, stored F16 (AutoAWQ computes in the fp16 model
//   dtype; here fp32, then rounded to f16, and the codes use the stored scale);
//   zero = clamp(-round(min / scale), 0, 15); q = clamp(round(w / scale) + zero, 0, 15).
// Packing: qweight [K, N/8], qzeros [K/G, N/8]; word j of a row holds columns 8j .. 8j+7 with
// column 8j + order[i] in bits 4i .. 4i+3, order = [0, 2, 4, 6, 1, 3, 5, 7] (so column 8j + c
// is in nibble [0, 4, 1, 5, 2, 6, 3, 7][c], vLLM's AWQ_REVERSE_ORDER). scales [K/G, N] F16.
std::vector<TensorToWrite> quantize_awq(const FloatMatrix& w, int64_t group_size) {
  const int64_t n = w.rows, k = w.cols, groups = k / group_size;
  std::vector<int32_t> q(static_cast<size_t>(k * n));  // [K, N]
  std::vector<int32_t> zeros(static_cast<size_t>(groups * n));
  std::vector<uint16_t> scales(static_cast<size_t>(groups * n));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float max_val = -INFINITY, min_val = INFINITY;
      for (int64_t c = g * group_size; c < (g + 1) * group_size; ++c) {
        max_val = std::max(max_val, w.at(r, c));
        min_val = std::min(min_val, w.at(r, c));
      }
      const uint16_t scale_f16 = f32_to_f16(std::max(max_val - min_val, 1e-5f) / 15.0f);
      const float scale = f16_to_f32(scale_f16);
      const int32_t zero = clamp4(-round_even(min_val / scale));
      scales[static_cast<size_t>(g * n + r)] = scale_f16;
      zeros[static_cast<size_t>(g * n + r)] = zero;
      for (int64_t c = g * group_size; c < (g + 1) * group_size; ++c)
        q[static_cast<size_t>(c * n + r)] = clamp4(round_even(w.at(r, c) / scale) + zero);
    }
  }
  constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  auto pack_rows = [&](const std::vector<int32_t>& values, int64_t rows) {
    std::vector<int32_t> packed(static_cast<size_t>(rows * n / 8));
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = 0; j < n / 8; ++j) {
        uint32_t word = 0;
        for (int i = 0; i < 8; ++i)
          word |= static_cast<uint32_t>(values[static_cast<size_t>(row * n + 8 * j + kOrder[i])])
                  << (4 * i);
        packed[static_cast<size_t>(row * (n / 8) + j)] = static_cast<int32_t>(word);
      }
    return packed;
  };
  std::vector<TensorToWrite> out;
  out.push_back(raw_tensor(w.module + ".qweight", TensorType::kI32, {k, n / 8}, pack_rows(q, k)));
  out.push_back(raw_tensor(w.module + ".qzeros", TensorType::kI32, {groups, n / 8},
                           pack_rows(zeros, groups)));
  out.push_back(raw_tensor(w.module + ".scales", TensorType::kF16, {groups, n}, scales));
  return out;
}

uint64_t mix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

// GPTQ act order (desc_act): GPTQ quantizes the columns in order of decreasing Hessian
// diagonal, perm = argsort(diag(H), descending), and the column at position i of that order
// belongs to group i / G: g_idx[perm[i]] = i / G (AutoGPTQ gptq.py fasterquant, static_groups
// false). Without activations there is no Hessian; its stand-in is a pseudo-random key per
// column from (the module's input, k), so the order is a fixed, arbitrary permutation, shared
// by the modules keel fuses (which read one input, as in a real GPTQ run).
std::vector<int32_t> gptq_group_of_k(const std::string& module, int64_t k, int64_t group_size,
                                     bool desc_act) {
  std::vector<int32_t> g_idx(static_cast<size_t>(k));
  if (!desc_act) {
    for (int64_t c = 0; c < k; ++c)
      g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(c / group_size);
    return g_idx;
  }
  // Modules that read the same input share its Hessian, hence its order (q/k/v, gate/up,
  // the GDN input projections): key the stand-in on the input, not the module.
  std::string input = module;
  for (const auto& [suffix, shared] :
       std::initializer_list<std::pair<const char*, const char*>>{{"q_proj", "qkv"},
                                                                  {"k_proj", "qkv"},
                                                                  {"v_proj", "qkv"},
                                                                  {"gate_proj", "gate_up"},
                                                                  {"up_proj", "gate_up"},
                                                                  {"w1", "gate_up"},
                                                                  {"w3", "gate_up"},
                                                                  {"in_proj_qkv", "in"},
                                                                  {"in_proj_z", "in"},
                                                                  {"in_proj_b", "in"},
                                                                  {"in_proj_a", "in"},
                                                                  {"in_proj_qkvz", "in"},
                                                                  {"in_proj_ba", "in"}}) {
    const std::string tail = std::string(".") + suffix;
    if (input.size() > tail.size() &&
        input.compare(input.size() - tail.size(), tail.size(), tail) == 0) {
      input = input.substr(0, input.size() - tail.size() + 1) + shared;
      break;
    }
  }
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char ch : input) hash = (hash ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
  std::vector<int64_t> perm(static_cast<size_t>(k));
  std::iota(perm.begin(), perm.end(), 0);
  std::vector<uint64_t> key(static_cast<size_t>(k));
  for (int64_t c = 0; c < k; ++c)
    key[static_cast<size_t>(c)] = mix64(hash + static_cast<uint64_t>(c));
  std::sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    const uint64_t ka = key[static_cast<size_t>(a)], kb = key[static_cast<size_t>(b)];
    return ka != kb ? ka > kb : a < b;
  });
  for (int64_t i = 0; i < k; ++i)
    g_idx[static_cast<size_t>(perm[static_cast<size_t>(i)])] = static_cast<int32_t>(i / group_size);
  return g_idx;
}

// AutoGPTQ v1 (auto_gptq/quantization/quantizer.py Quantizer.find_params with bits 4, perchannel,
// then nn_modules/qlinear pack). Round-to-nearest min/max per output row and group (the
// Hessian-based error compensation of GPTQ's solve is not run: it needs calibration
// activations). Per group:
//   xmin = min(min w, 0), xmax = max(max w, 0); sym: xmax = max(|xmin|, xmax), xmin = -xmax
//   when xmin < 0; both zero -> -1, +1; scale = (xmax - xmin) / 15;
//   zero = sym ? 8 : round(-xmin / scale); q = clamp(round(w / scale) + zero, 0, 15).
// Asymmetric zeros are kept >= 1: v1 stores zero - 1 in a nibble, where 0 - 1 cannot be held
// (the reason GPTQ v2 exists); a group whose zero would round to 0 gets 1 instead (all its
// weights >= -scale/2, so its largest codes may clip by one step). scales stored F16.
// Packing: qweight [K/8, N], row r holds k = 8r + i in bits 4i; qzeros [K/G, N/8] holds
// column 8j + i in bits 4i, value zero - 1; g_idx [K] I32.
std::vector<TensorToWrite> quantize_gptq(const FloatMatrix& w, int64_t group_size, bool desc_act,
                                         bool sym) {
  const int64_t n = w.rows, k = w.cols, groups = k / group_size;
  const std::vector<int32_t> g_idx = gptq_group_of_k(w.module, k, group_size, desc_act);
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(groups));
  for (int64_t c = 0; c < k; ++c)
    members[static_cast<size_t>(g_idx[static_cast<size_t>(c)])].push_back(c);
  std::vector<int32_t> q(static_cast<size_t>(k * n));  // [K, N]
  std::vector<int32_t> zeros(static_cast<size_t>(groups * n));
  std::vector<uint16_t> scales(static_cast<size_t>(groups * n));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float xmin = 0, xmax = 0;
      for (int64_t c : members[static_cast<size_t>(g)]) {
        xmin = std::min(xmin, w.at(r, c));
        xmax = std::max(xmax, w.at(r, c));
      }
      if (sym) {
        xmax = std::max(std::fabs(xmin), xmax);
        if (xmin < 0) xmin = -xmax;
      }
      if (xmin == 0 && xmax == 0) {
        xmin = -1;
        xmax = 1;
      }
      const float scale = (xmax - xmin) / 15.0f;
      const int32_t zero = sym ? 8 : std::clamp(round_even(-xmin / scale), 1, 15);
      scales[static_cast<size_t>(g * n + r)] = f32_to_f16(scale);
      zeros[static_cast<size_t>(g * n + r)] = zero;
      for (int64_t c : members[static_cast<size_t>(g)])
        q[static_cast<size_t>(c * n + r)] = clamp4(round_even(w.at(r, c) / scale) + zero);
    }
  }
  std::vector<int32_t> qweight(static_cast<size_t>(k / 8 * n));
  for (int64_t row = 0; row < k / 8; ++row)
    for (int64_t col = 0; col < n; ++col) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i)
        word |= static_cast<uint32_t>(q[static_cast<size_t>((8 * row + i) * n + col)]) << (4 * i);
      qweight[static_cast<size_t>(row * n + col)] = static_cast<int32_t>(word);
    }
  std::vector<int32_t> qzeros(static_cast<size_t>(groups * n / 8));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < n / 8; ++j) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i)
        word |= static_cast<uint32_t>(zeros[static_cast<size_t>(g * n + 8 * j + i)] - 1) << (4 * i);
      qzeros[static_cast<size_t>(g * (n / 8) + j)] = static_cast<int32_t>(word);
    }
  std::vector<TensorToWrite> out;
  out.push_back(raw_tensor(w.module + ".qweight", TensorType::kI32, {k / 8, n}, qweight));
  out.push_back(raw_tensor(w.module + ".qzeros", TensorType::kI32, {groups, n / 8}, qzeros));
  out.push_back(raw_tensor(w.module + ".scales", TensorType::kF16, {groups, n}, scales));
  out.push_back(raw_tensor(w.module + ".g_idx", TensorType::kI32, {k}, g_idx));
  return out;
}

// ---- MXFP4 ----------------------------------------------------------------------------------

// OCP Microscaling Formats (MX) v1.0, section 6.3 (and microsoft/microxcaling mx_ops.py
// _shared_exponents): per block of 32 along K, shared exponent
//   e = floor(log2(block_amax)) - emax_elem, emax_elem = 2 for E2M1, clamped to [-127, 127],
// a zero block treated as amax = 2^-126 (microxcaling's FP32_MIN_NORMAL guard), so e = -127 and
// E8M0 code 0; scale code = e + 127; codes = e2m1(w / 2^e), saturating at 6 (values of
// |w| / 2^e in (6, 8) clip to 6, as the spec's quantization does).
// gpt-oss's own export (triton_kernels downcast_to_mxfp) rounds the scale up instead
// (e = ceil(log2(amax / 6))), which never clips; the spec's rule is what is asked of keel here.
void mxfp4_row(const float* w, int64_t k, uint8_t* packed, uint8_t* scales) {
  std::vector<uint8_t> codes(static_cast<size_t>(k));
  for (int64_t b = 0; b < k / math::kMxfp4Group; ++b) {
    float amax = 0;
    for (int64_t i = 0; i < math::kMxfp4Group; ++i)
      amax = std::max(amax, std::fabs(w[b * math::kMxfp4Group + i]));
    int exponent = 0;
    std::frexp(amax == 0.0f ? 0x1p-126f : amax, &exponent);  // amax = m 2^exponent, m in [.5, 1)
    const int shared = std::clamp(exponent - 1 - 2, -127, 127);
    scales[b] = static_cast<uint8_t>(shared + 127);
    const float inverse = std::ldexp(1.0f, -shared);  // exact: a power of two within fp32 range
    for (int64_t i = 0; i < math::kMxfp4Group; ++i) {
      const int64_t idx = b * math::kMxfp4Group + i;
      codes[static_cast<size_t>(idx)] = f32_to_e2m1(w[idx] * inverse);
    }
  }
  pack_e2m1_row(codes.data(), k, packed);
}

// [E, rows, cols] -> NAME_blocks U8 [E, rows, cols/32, 16], NAME_scales U8 [E, rows, cols/32].
std::vector<TensorToWrite> quantize_mxfp4_3d(const std::string& name, int64_t experts, int64_t rows,
                                             int64_t cols, const std::vector<float>& values) {
  if (cols % math::kMxfp4Group != 0)
    throw_error("gen-model --quant mxfp4: ", name, " [", experts, ", ", rows, ", ", cols,
                "] has K = ", cols, ", not a multiple of ", math::kMxfp4Group);
  const int64_t blocks = cols / math::kMxfp4Group;
  std::vector<uint8_t> packed(static_cast<size_t>(experts * rows * cols / 2));
  std::vector<uint8_t> scales(static_cast<size_t>(experts * rows * blocks));
  for (int64_t row = 0; row < experts * rows; ++row)
    mxfp4_row(values.data() + row * cols, cols, packed.data() + row * cols / 2,
              scales.data() + row * blocks);
  std::vector<TensorToWrite> out;
  out.push_back(raw_tensor(name + "_blocks", TensorType::kU8, {experts, rows, blocks, 16}, packed));
  out.push_back(raw_tensor(name + "_scales", TensorType::kU8, {experts, rows, blocks}, scales));
  return out;
}

// ---- which tensors ----------------------------------------------------------------------------

enum class Role { kOther, kExpertGate, kExpertUp, kExpertDown, kFusedGateUp, kFusedDown, kLinear };

struct TensorRole {
  Role role = Role::kOther;
  std::string group;  // fused-group key ("" when alone); for experts the "...experts." prefix
  int64_t group_members = 1;
  std::string experts_prefix;
};

TensorRole role_of(const std::string& name, size_t rank, QuantScope scope) {
  TensorRole out;
  const size_t experts_at = name.find(".experts.");
  if (experts_at != std::string::npos) {
    out.experts_prefix = name.substr(0, experts_at + 9);  // "...mlp.experts."
    const std::string rest = name.substr(experts_at + 9);
    if (rank == 3 && rest == "gate_up_proj") {
      out.role = Role::kFusedGateUp;
    } else if (rank == 3 && rest == "down_proj") {
      out.role = Role::kFusedDown;
    } else if (rank == 2) {
      const size_t dot = rest.find('.');
      const std::string proj = rest.substr(dot + 1);
      const std::string expert_prefix = name.substr(0, experts_at + 9 + dot + 1);
      if (proj == "gate_proj.weight" || proj == "w1.weight") out.role = Role::kExpertGate;
      if (proj == "up_proj.weight" || proj == "w3.weight") out.role = Role::kExpertUp;
      if (proj == "down_proj.weight" || proj == "w2.weight") out.role = Role::kExpertDown;
      if (out.role == Role::kExpertGate || out.role == Role::kExpertUp) {
        out.group = expert_prefix + "gate_up";
        out.group_members = 2;
      }
    }
    return out;
  }
  // A dense-MLP layer's MLP is that layer's feed-forward: quantized with the experts.
  if (rank == 2 && name.find(".shared_expert.") == std::string::npos) {
    for (std::string_view proj : {"gate_proj", "up_proj"}) {
      if (ends_with(name, std::string(".mlp.") + std::string(proj) + ".weight")) {
        out.role = Role::kLinear;
        out.group = name.substr(0, name.rfind(".mlp.") + 5) + "gate_up";
        out.group_members = 2;
        return out;
      }
    }
    if (ends_with(name, ".mlp.down_proj.weight")) {
      out.role = Role::kLinear;
      return out;
    }
  }
  if (scope != QuantScope::kLinear || rank != 2) return out;
  for (std::string_view proj : {"q_proj", "k_proj", "v_proj"}) {
    if (ends_with(name, std::string(".self_attn.") + std::string(proj) + ".weight")) {
      out.role = Role::kLinear;
      out.group = name.substr(0, name.rfind(".self_attn.") + 11) + "qkv";
      out.group_members = 3;
      return out;
    }
  }
  for (std::string_view proj : {"gate_proj", "up_proj"}) {
    if (ends_with(name, std::string(".shared_expert.") + std::string(proj) + ".weight")) {
      out.role = Role::kLinear;
      out.group = name.substr(0, name.rfind(".shared_expert.") + 15) + "gate_up";
      out.group_members = 2;
      return out;
    }
  }
  for (std::string_view suffix :
       {".self_attn.o_proj.weight", ".shared_expert.down_proj.weight",
        ".linear_attn.in_proj_qkv.weight", ".linear_attn.in_proj_z.weight",
        ".linear_attn.in_proj_qkvz.weight", ".linear_attn.out_proj.weight"}) {
    if (ends_with(name, suffix)) out.role = Role::kLinear;
  }
  return out;
}

// 2-D slice [rows, cols] starting at row `row0` of expert `expert` in a fused [E, R, C] tensor.
TensorToWrite slice_expert(const TensorToWrite& fused, std::string name, int64_t expert,
                           int64_t row0, int64_t rows) {
  const int64_t fused_rows = fused.shape[1], cols = fused.shape[2];
  const size_t element = dtype_size(fused.dtype);
  TensorToWrite out{std::move(name), fused.dtype, {rows, cols}, {}};
  out.bytes.resize(static_cast<size_t>(rows * cols) * element);
  std::memcpy(
      out.bytes.data(),
      fused.bytes.data() + static_cast<size_t>((expert * fused_rows + row0) * cols) * element,
      out.bytes.size());
  return out;
}

}  // namespace

std::string_view quant_format_name(QuantFormat format) {
  switch (format) {
    case QuantFormat::kNone:
      return "none";
    case QuantFormat::kNvfp4:
      return "nvfp4";
    case QuantFormat::kNvfp4Ct:
      return "nvfp4-ct";
    case QuantFormat::kFp8:
      return "fp8";
    case QuantFormat::kAwq:
      return "awq";
    case QuantFormat::kGptq:
      return "gptq";
    case QuantFormat::kMxfp4:
      return "mxfp4";
  }
  return "?";
}

QuantFormat parse_quant_format(std::string_view text) {
  for (QuantFormat format :
       {QuantFormat::kNone, QuantFormat::kNvfp4, QuantFormat::kNvfp4Ct, QuantFormat::kFp8,
        QuantFormat::kAwq, QuantFormat::kGptq, QuantFormat::kMxfp4})
    if (quant_format_name(format) == text) return format;
  throw_error("unknown --quant ", text, " (choices: none, nvfp4, nvfp4-ct, fp8, awq, gptq, mxfp4)");
}

std::string_view quant_scope_name(QuantScope scope) {
  switch (scope) {
    case QuantScope::kDefault:
      return "default";
    case QuantScope::kExperts:
      return "experts";
    case QuantScope::kLinear:
      return "linear";
  }
  return "?";
}

QuantScope parse_quant_scope(std::string_view text) {
  for (QuantScope scope : {QuantScope::kDefault, QuantScope::kExperts, QuantScope::kLinear})
    if (quant_scope_name(scope) == text) return scope;
  throw_error("unknown --quant-scope ", text, " (choices: default, experts, linear)");
}

CheckpointQuantizer::CheckpointQuantizer(const ModelPreset& preset, const QuantOptions& options)
    : preset_(preset), options_(options) {
  KEEL_CHECK(options_.format != QuantFormat::kNone);
  if (options_.scope == QuantScope::kDefault)
    options_.scope =
        options_.format == QuantFormat::kFp8 ? QuantScope::kLinear : QuantScope::kExperts;
  if (options_.format == QuantFormat::kMxfp4 && options_.scope != QuantScope::kExperts)
    throw_error(
        "gen-model --quant mxfp4 quantizes the routed experts only (gpt-oss layout); "
        "--quant-scope linear is not available for it");
  if (options_.format == QuantFormat::kMxfp4 && !preset.mlp_only_layers.empty())
    throw_error(
        "gen-model --quant mxfp4 quantizes fused routed experts only (gpt-oss layout); "
        "preset ",
        preset.name, " has dense MLP layers (mlp_only_layers)");
  if (options_.format != QuantFormat::kAwq && options_.format != QuantFormat::kGptq) return;
  // The K of every Linear the scope quantizes.
  std::vector<int64_t> ks = {preset.hidden_size, preset.moe_intermediate_size};
  if (!preset.mlp_only_layers.empty()) ks.push_back(preset.intermediate_size);
  if (options_.scope == QuantScope::kLinear) {
    ks.push_back(preset.num_attention_heads * preset.head_dim);  // o_proj
    if (preset.shared_expert_intermediate_size > 0)
      ks.push_back(preset.shared_expert_intermediate_size);
    if (std::find(preset.layer_types.begin(), preset.layer_types.end(), "linear_attention") !=
        preset.layer_types.end())
      ks.push_back(preset.linear_num_value_heads * preset.linear_value_head_dim);  // out_proj
  }
  if (options_.group_size > 0) {
    group_size_ = options_.group_size;
    return;
  }
  for (int64_t candidate : {128, 64, 32, 16}) {
    if (std::all_of(ks.begin(), ks.end(), [&](int64_t k) { return k % candidate == 0; })) {
      group_size_ = candidate;
      return;
    }
  }
  throw_error("gen-model --quant ", quant_format_name(options_.format), ": preset ", preset.name,
              " has a quantized K not divisible by 16; give --group-size");
}

CheckpointQuantizer::~CheckpointQuantizer() = default;

std::vector<TensorToWrite> CheckpointQuantizer::add(TensorToWrite tensor) {
  const TensorRole role = role_of(tensor.name, tensor.shape.size(), options_.scope);
  std::vector<TensorToWrite> out;
  if (role.role == Role::kOther || tensor.raw_type) {
    other_tensors_.emplace_back(tensor.name, tensor.shape.size());
    out.push_back(std::move(tensor));
    return out;
  }
  const bool mxfp4 = options_.format == QuantFormat::kMxfp4;
  if (mxfp4) {
    // The whole layer's experts, then one fused pair of tensors.
    auto& pending = pending_[role.experts_prefix];
    pending.push_back(std::move(tensor));
    const bool fused = role.role == Role::kFusedGateUp || role.role == Role::kFusedDown;
    const size_t expected = fused ? 2 : static_cast<size_t>(3 * preset_.num_experts);
    if (pending.size() < expected) return out;
    std::vector<TensorToWrite> layer = std::move(pending);
    pending_.erase(role.experts_prefix);
    return quantize_mxfp4_layer(role.experts_prefix, std::move(layer));
  }
  if (role.role == Role::kFusedGateUp || role.role == Role::kFusedDown) {
    // Qwen3.5's fused experts, written per expert as the quantized releases have them.
    const int64_t experts = tensor.shape[0], rows = tensor.shape[1];
    for (int64_t e = 0; e < experts; ++e) {
      const std::string prefix = role.experts_prefix + std::to_string(e) + ".";
      std::vector<TensorToWrite> group;
      if (role.role == Role::kFusedGateUp) {
        group.push_back(slice_expert(tensor, prefix + "gate_proj.weight", e, 0, rows / 2));
        group.push_back(slice_expert(tensor, prefix + "up_proj.weight", e, rows / 2, rows / 2));
      } else {
        group.push_back(slice_expert(tensor, prefix + "down_proj.weight", e, 0, rows));
      }
      for (TensorToWrite& t : quantize_group(group)) out.push_back(std::move(t));
    }
    return out;
  }
  if (role.group.empty()) return quantize_group({std::move(tensor)});
  auto& pending = pending_[role.group];
  pending.push_back(std::move(tensor));
  if (static_cast<int64_t>(pending.size()) < role.group_members) return out;
  std::vector<TensorToWrite> group = std::move(pending);
  pending_.erase(role.group);
  return quantize_group(group);
}

std::vector<TensorToWrite> CheckpointQuantizer::finish() {
  if (!pending_.empty())
    throw_error("gen-model --quant: incomplete fused group ", pending_.begin()->first);
  return {};
}

std::vector<TensorToWrite> CheckpointQuantizer::quantize_group(
    const std::vector<TensorToWrite>& group) {
  std::vector<FloatMatrix> matrices;
  for (const TensorToWrite& tensor : group) matrices.push_back(matrix_of(tensor));
  // The shared global amax of a fused group (ModelOpt / llm-compressor: max over the shards).
  float group_amax = 0;
  for (const FloatMatrix& w : matrices) group_amax = std::max(group_amax, abs_max(w));
  if (group_amax == 0.0f) group_amax = 1.0f;  // all-zero weights are never drawn; stay finite
  const std::string_view name = quant_format_name(options_.format);
  std::vector<TensorToWrite> out;
  auto append = [&](std::vector<TensorToWrite> tensors) {
    for (TensorToWrite& t : tensors) out.push_back(std::move(t));
  };
  for (const FloatMatrix& w : matrices) {
    quantized_modules_.push_back(w.module);
    switch (options_.format) {
      case QuantFormat::kNvfp4: {
        require_divisible(w, math::kNvfp4Group, 1, name);
        // get_weights_scaling_factor_2: amax / (6 * 448); activation: amax / (maxbound * 448).
        const float weight_scale_2 = group_amax / (6.0f * 448.0f);
        const Nvfp4Codes codes = nvfp4_modelopt_codes(w, weight_scale_2);
        out.push_back(
            raw_tensor(w.module + ".weight", TensorType::kU8, {w.rows, w.cols / 2}, codes.packed));
        out.push_back(raw_tensor(w.module + ".weight_scale", TensorType::kF8E4M3,
                                 {w.rows, w.cols / math::kNvfp4Group}, codes.scales));
        out.push_back(f32_scalar(w.module + ".weight_scale_2", {}, weight_scale_2));
        out.push_back(
            f32_scalar(w.module + ".input_scale", {}, kSyntheticActivationAmax / (6.0f * 448.0f)));
        break;
      }
      case QuantFormat::kNvfp4Ct: {
        require_divisible(w, math::kNvfp4Group, 1, name);
        // compressed-tensors generate_gparam: 448 * 6 / amax, float32, shape [1]. Python's
        // `2688.0 / tensor` is torch's __rtruediv__, reciprocal() * 2688, which can differ from
        // a division by one ulp: computed that way for identical bits.
        const float global_scale = (1.0f / group_amax) * (448.0f * 6.0f);
        const Nvfp4Codes codes = nvfp4_ct_codes(w, global_scale);
        out.push_back(raw_tensor(w.module + ".weight_packed", TensorType::kU8, {w.rows, w.cols / 2},
                                 codes.packed));
        out.push_back(raw_tensor(w.module + ".weight_scale", TensorType::kF8E4M3,
                                 {w.rows, w.cols / math::kNvfp4Group}, codes.scales));
        out.push_back(f32_scalar(w.module + ".weight_global_scale", {1}, global_scale));
        out.push_back(f32_scalar(w.module + ".input_global_scale", {1},
                                 448.0f * 6.0f / kSyntheticActivationAmax));
        break;
      }
      case QuantFormat::kFp8:
        append(quantize_fp8(w, options_.fp8_scale_dtype));
        break;
      case QuantFormat::kAwq:
        require_divisible(w, group_size_, 8, name);
        append(quantize_awq(w, group_size_));
        break;
      case QuantFormat::kGptq:
        require_divisible(w, std::lcm(group_size_, int64_t{8}), 8, name);
        append(quantize_gptq(w, group_size_, options_.gptq_desc_act, options_.gptq_sym));
        break;
      case QuantFormat::kNone:
      case QuantFormat::kMxfp4:
        KEEL_CHECK(false);
    }
  }
  return out;
}

// gpt-oss layout: one gate_up [E, 2I, H] (gate rows then up rows, the bf16 fused layout of keel's
// architectures; gpt-oss itself interleaves gate and up rows, which its SwiGLU reads as
// [..., ::2] and [..., 1::2]) and one down [E, H, I] per layer.
std::vector<TensorToWrite> CheckpointQuantizer::quantize_mxfp4_layer(
    const std::string& experts_prefix, std::vector<TensorToWrite> tensors) {
  const int64_t experts = preset_.num_experts, inter = preset_.moe_intermediate_size;
  const int64_t hidden = preset_.hidden_size;
  std::vector<float> gate_up(static_cast<size_t>(experts * 2 * inter * hidden));
  std::vector<float> down(static_cast<size_t>(experts * hidden * inter));
  for (const TensorToWrite& tensor : tensors) {
    const TensorRole role = role_of(tensor.name, tensor.shape.size(), QuantScope::kExperts);
    const std::vector<float> values = to_floats(tensor);
    if (role.role == Role::kFusedGateUp) {
      gate_up = values;
    } else if (role.role == Role::kFusedDown) {
      down = values;
    } else {
      const std::string rest = tensor.name.substr(experts_prefix.size());
      const int64_t e = std::stoll(rest.substr(0, rest.find('.')));
      if (role.role == Role::kExpertDown) {
        std::copy(values.begin(), values.end(), down.begin() + e * hidden * inter);
      } else {
        const int64_t row0 = (e * 2 + (role.role == Role::kExpertUp ? 1 : 0)) * inter;
        std::copy(values.begin(), values.end(), gate_up.begin() + row0 * hidden);
      }
    }
  }
  quantized_modules_.push_back(experts_prefix + "gate_up_proj");
  quantized_modules_.push_back(experts_prefix + "down_proj");
  std::vector<TensorToWrite> out =
      quantize_mxfp4_3d(experts_prefix + "gate_up_proj", experts, 2 * inter, hidden, gate_up);
  for (TensorToWrite& t :
       quantize_mxfp4_3d(experts_prefix + "down_proj", experts, hidden, inter, down))
    out.push_back(std::move(t));
  return out;
}

void CheckpointQuantizer::write_config(nlohmann::json& config, const std::string& out_dir) const {
  // What stays in the preset dtype, as module names. The Qwen FP8 releases list every such
  // module and parameter (norms, embeddings, router, conv1d, A_log ...); the other formats list
  // the Linear modules (2-D weights) that are not quantized, as ModelOpt's exclude_modules,
  // llm-compressor's ignore and gpt-oss's modules_to_not_convert do (exact names here, no
  // wildcards; AutoAWQ matches them as substrings of module names, which exact full names
  // satisfy only for themselves in these architectures).
  const std::set<std::string> quantized(quantized_modules_.begin(), quantized_modules_.end());
  std::vector<std::string> kept;
  std::set<std::string> seen;
  const bool all_modules = options_.format == QuantFormat::kFp8;
  for (const auto& [name, rank] : other_tensors_) {
    if (!all_modules && (rank != 2 || !ends_with(name, ".weight") ||
                         name.find("embed_tokens") != std::string::npos))
      continue;
    const std::string module = strip_suffix(name);
    if (quantized.count(module) || !seen.insert(module).second) continue;
    kept.push_back(module);
  }
  const nlohmann::json producer = {{"name", "modelopt"}, {"version", "0.37.0"}};
  nlohmann::json q;
  switch (options_.format) {
    case QuantFormat::kNvfp4: {
      // hf_quant_config.json (modelopt/torch/export/unified_export_hf.py) and its
      // convert_hf_quant_config_format form in config.json (convert_hf_config.py).
      nlohmann::json hf;
      hf["producer"] = producer;
      hf["quantization"] = {{"quant_algo", "NVFP4"},
                            {"kv_cache_quant_algo", nullptr},
                            {"group_size", math::kNvfp4Group},
                            {"exclude_modules", kept}};
      std::ofstream file(out_dir + "/hf_quant_config.json");
      file << hf.dump(4) << "\n";
      if (!file) throw_error("cannot write ", out_dir, "/hf_quant_config.json");
      const nlohmann::json args = {
          {"dynamic", false}, {"num_bits", 4}, {"type", "float"}, {"group_size", 16}};
      q = {{"quant_method", "modelopt"},
           {"quant_algo", "NVFP4"},
           {"producer", producer},
           {"config_groups",
            {{"group_0",
              {{"weights", args}, {"input_activations", args}, {"targets", {"Linear"}}}}}},
           {"ignore", kept}};
      break;
    }
    case QuantFormat::kNvfp4Ct: {
      auto args = [](nlohmann::json dynamic) {
        return nlohmann::json{{"actorder", nullptr},   {"block_structure", nullptr},
                              {"dynamic", dynamic},    {"group_size", 16},
                              {"num_bits", 4},         {"observer", "minmax"},
                              {"observer_kwargs", {}}, {"strategy", "tensor_group"},
                              {"symmetric", true},     {"type", "float"}};
      };
      q = {{"quant_method", "compressed-tensors"},
           {"format", "nvfp4-pack-quantized"},
           {"quantization_status", "compressed"},
           {"config_groups",
            {{"group_0",
              {{"format", "nvfp4-pack-quantized"},
               {"targets", {"Linear"}},
               {"weights", args(false)},
               {"input_activations", args("local")},
               {"output_activations", nullptr}}}}},
           {"ignore", kept},
           {"kv_cache_scheme", nullptr},
           {"global_compression_ratio", nullptr},
           {"sparsity_config", nlohmann::json::object()},
           {"version", "0.12.2"}};
      break;
    }
    case QuantFormat::kFp8:
      q = {{"quant_method", "fp8"},
           {"fmt", "e4m3"},
           {"activation_scheme", "dynamic"},
           {"weight_block_size", {128, 128}},
           {"modules_to_not_convert", kept}};
      break;
    case QuantFormat::kAwq:
      q = {{"quant_method", "awq"}, {"bits", 4},         {"group_size", group_size_},
           {"zero_point", true},    {"version", "gemm"}, {"modules_to_not_convert", kept}};
      break;
    case QuantFormat::kGptq: {
      // GPTQModel's "dynamic" negative rules ("-:" + regex) name the Linears left unquantized.
      nlohmann::json dynamic = nlohmann::json::object();
      for (const std::string& module : kept) {
        std::string pattern = "-:^";
        for (char c : module) {
          if (c == '.') pattern += '\\';
          pattern += c;
        }
        dynamic[pattern + "$"] = nlohmann::json::object();
      }
      q = {{"quant_method", "gptq"},    {"bits", 4},
           {"group_size", group_size_}, {"desc_act", options_.gptq_desc_act},
           {"sym", options_.gptq_sym},  {"checkpoint_format", "gptq"},
           {"static_groups", false},    {"true_sequential", true},
           {"damp_percent", 0.01},      {"dynamic", dynamic}};
      break;
    }
    case QuantFormat::kMxfp4:
      q = {{"quant_method", "mxfp4"}, {"modules_to_not_convert", kept}};
      break;
    case QuantFormat::kNone:
      return;
  }
  config["quantization_config"] = std::move(q);
}

}  // namespace keel
