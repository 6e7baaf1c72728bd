// Quantized weight formats: the element codes, their decoding to fp32, and the weight view the
// quantized GEMMs (kernels/cpu/qgemm.h, kernels/cuda/qgemm.cu) read. Shared by host and device,
// so the CPU reference and the CUDA twins decode every weight to the same fp32 value.
//
// keel's in-memory layouts (the loader, runtime/model/quant_load.cpp, converts each released
// checkpoint layout into one of these without ever widening the codes). Every format is row-major
// [N = out_features][K = in_features] with its scales per row and per group of K, so a tensor-
// parallel row slice is a slice of rows and a column slice is a slice at a group boundary:
//   kNvfp4    codes  u8 [N][ld bytes], two E2M1 codes per byte, even k in the low nibble;
//             scales u8 E4M3 [N][scale_ld], one per 16 k; row_scales f32 [N] (the global scale,
//             per row so that fused layers keep each source's own);
//             w[n][k] = e2m1(code) * (e4m3(scale[n][k/16]) * row_scale[n])
//   kMxfp4    codes as kNvfp4; scales u8 E8M0 [N][scale_ld], one per 32 k;
//             w[n][k] = e2m1(code) * 2^(scale - 127)
//   kFp8Block codes  u8 E4M3 [N][ld bytes]; scales f32 [N][scale_ld], one per 128 k (the
//             checkpoint's [N/128][K/128] blocks repeated per row; bf16 scales widened exactly);
//             w[n][k] = e4m3(code) * scale[n][k/128]
//   kInt4     codes  u8 [N][ld bytes], unsigned 4-bit, even k in the low nibble; zeros u8
//             [N][scale_ld] (the effective zero point, 0..16: GPTQ v1's stored zero + 1);
//             scales f32 [N][scale_ld]; group g(k) = group_of_k ? group_of_k[k] : k / group_size;
//             w[n][k] = float(code - zero[n][g(k)]) * scale[n][g(k)]     (exact in fp32)
// The products are fp32 multiplies in the order written (IEEE on host and device).
//
// NVFP4 activations (W4A4 emulation, what Blackwell FP4 tensor cores compute): each row of x is
// quantized per 16 k with the checkpoint's input_scale s_in (nvfp4_quantize_activations):
//   block scale b = e4m3_sat(amax(|x| over the 16) / (6 * s_in)),  d = e4m3(b) * s_in
//   x' = e2m1(e2m1_rne_sat(x / d)) * d          (x' = 0 for the whole block when d == 0)
// and the GEMM then multiplies x' by the dequantized weights in the canonical order. A row's
// quantization reads only that row, so W4A4 stays batch-invariant.
#pragma once

#include <cstdint>
#include <string_view>

#include "kernels/base/dtype.h"

namespace keel::math {

enum class WeightFormat : uint8_t { kDense, kNvfp4, kMxfp4, kFp8Block, kInt4 };

constexpr std::string_view weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::kDense:
      return "dense";
    case WeightFormat::kNvfp4:
      return "nvfp4";
    case WeightFormat::kMxfp4:
      return "mxfp4";
    case WeightFormat::kFp8Block:
      return "fp8_block";
    case WeightFormat::kInt4:
      return "int4";
  }
  return "?";
}

// K elements per scale of each format (kInt4: the checkpoint's group size, stored in the view).
inline constexpr int64_t kNvfp4Group = 16;
inline constexpr int64_t kMxfp4Group = 32;
inline constexpr int64_t kFp8BlockGroup = 128;

// ---- element codes ----

// E2M1 (FP4): sign << 3 | magnitude index, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
KEEL_HD inline float e2m1_to_f32(uint8_t code) {
  const uint8_t index = code & 7u;
  // 0.5 * {0, 1, 2, 3, 4, 6, 8, 12}: exact.
  const float magnitude = index < 4 ? 0.5f * static_cast<float>(index)
                                    : static_cast<float>(index == 4   ? 2
                                                         : index == 5 ? 3
                                                         : index == 6 ? 4
                                                                      : 6);
  return (code & 8u) ? -magnitude : magnitude;
}

// Nearest E2M1 code, ties to the even code, |x| > 6 saturating to 6 (ModelOpt's searchsorted
// over the midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 with the tie bump at 0.75, 1.75, 3.5).
// NaN encodes as +0.
KEEL_HD inline uint8_t f32_to_e2m1(float x) {
  const float a = x < 0 ? -x : x;
  uint8_t index;
  if (!(a > 0.25f)) {
    index = 0;
  } else if (a < 0.75f) {
    index = 1;
  } else if (a <= 1.25f) {
    index = 2;
  } else if (a < 1.75f) {
    index = 3;
  } else if (a <= 2.5f) {
    index = 4;
  } else if (a < 3.5f) {
    index = 5;
  } else if (a <= 5.0f) {
    index = 6;
  } else {
    index = 7;
  }
  return static_cast<uint8_t>((x < 0 ? 8u : 0u) | index);
}

// E4M3 "fn" (FP8, OCP): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff
// NaN, largest finite 448.
KEEL_HD inline float e4m3_to_f32(uint8_t code) {
  const uint32_t sign = uint32_t{code & 0x80u} << 24;
  const uint32_t exponent = (code >> 3) & 0xfu;
  const uint32_t mantissa = code & 7u;
  if (exponent == 15 && mantissa == 7) return bits_float(sign | 0x7fc00000u);
  if (exponent == 0) {
    // Subnormal: mantissa * 2^-9, exact.
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Nearest E4M3 value, ties to even, saturating: |x| beyond 448 gives +-448 (the "satfinite"
// conversion; quantizers clamp before converting anyway). NaN gives 0x7f.
KEEL_HD inline uint8_t f32_to_e4m3(float x) {
  const uint32_t bits = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  const float a = bits_float(abs_bits);
  if (a >= 448.0f) return static_cast<uint8_t>(sign | 0x7eu);
  if (a < 0.015625f) {
    // Subnormal range (below 2^-6): round a * 2^9 (exact scaling, < 8) to an integer, ties even.
    const float scaled = a * 512.0f;
    uint32_t q = static_cast<uint32_t>(scaled);
    const float fraction = scaled - static_cast<float>(q);
    if (fraction > 0.5f || (fraction == 0.5f && (q & 1u))) ++q;
    return static_cast<uint8_t>(sign | q);  // q == 8 is exactly the smallest normal, 0x08
  }
  int32_t exponent = static_cast<int32_t>(abs_bits >> 23) - 127;  // -6 .. 8
  uint32_t mantissa = (abs_bits >> 20) & 7u;
  const uint32_t rest = abs_bits & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (mantissa & 1u))) ++mantissa;
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  const uint32_t code = (static_cast<uint32_t>(exponent + 7) << 3) | mantissa;
  return static_cast<uint8_t>(sign | (code > 0x7eu ? 0x7eu : code));
}

// E8M0 (MX scales): 2^(code - 127); 0xff is NaN.
KEEL_HD inline float e8m0_to_f32(uint8_t code) {
  if (code == 0xff) return bits_float(0x7fc00000u);
  if (code == 0) return bits_float(0x00400000u);  // 2^-127, an fp32 subnormal
  return bits_float(static_cast<uint32_t>(code) << 23);
}

// ---- the weight view ----

// One quantized (or dense) weight matrix as the GEMMs read it; pointers are device memory of
// the backend that runs the GEMM. Plain data, so expert tables can hold arrays of it on a GPU.
struct WeightView {
  WeightFormat format = WeightFormat::kDense;
  DType dtype = DType::kF32;            // kDense: the element dtype
  const void* data = nullptr;           // kDense elements, or the codes
  const void* scales = nullptr;         // per-group scales (u8 E4M3/E8M0, or f32)
  const uint8_t* zeros = nullptr;       // kInt4
  const int32_t* group_of_k = nullptr;  // kInt4 with act order (GPTQ desc_act), else null
  const float* row_scales = nullptr;    // kNvfp4
  float input_scale = 0;   // kNvfp4: > 0 selects W4A4 (activations quantized per 16), 0 = fp32
  int64_t rows = 0;        // N
  int64_t cols = 0;        // K
  int64_t ld = 0;          // row stride of data: elements (kDense) or bytes (codes)
  int64_t scale_ld = 0;    // scales (and zeros) per row
  int64_t group_size = 0;  // K per scale
};

// What is wrong with a view for the GEMMs (nullptr: nothing): the one check the CPU
// (cpu::qgemm throws it with context) and the CUDA kernels (cuda::qgemm throws it; the grouped
// kernel writes NaN rows for a misfit view it finds on the device) share. Dense views pass
// with allow_dense.
KEEL_HD inline const char* weight_view_problem(const WeightView& w, bool allow_dense) {
  if (w.format == WeightFormat::kDense) {
    if (!allow_dense) return "dense weights go through the dense GEMM";
    if (w.dtype != DType::kF32 && w.dtype != DType::kBF16 && w.dtype != DType::kF16)
      return "unknown dense dtype";
    if (w.rows <= 0 || w.cols <= 0) return "empty weight";
    if (w.data == nullptr) return "null weights";
    if (w.ld < w.cols) return "row stride below the row";
    return nullptr;
  }
  if (w.format != WeightFormat::kNvfp4 && w.format != WeightFormat::kMxfp4 &&
      w.format != WeightFormat::kFp8Block && w.format != WeightFormat::kInt4)
    return "unknown weight format";
  if (w.rows <= 0 || w.cols <= 0) return "empty weight";
  if (w.data == nullptr || w.scales == nullptr) return "null codes or scales";
  const int64_t row_bytes = w.format == WeightFormat::kFp8Block ? w.cols : (w.cols + 1) / 2;
  if (w.ld < row_bytes) return "row stride below the packed row";
  int64_t expected_group = w.group_size;
  switch (w.format) {
    case WeightFormat::kNvfp4:
      expected_group = kNvfp4Group;
      if (w.row_scales == nullptr) return "null row scales";
      break;
    case WeightFormat::kMxfp4:
      expected_group = kMxfp4Group;
      break;
    case WeightFormat::kFp8Block:
      expected_group = kFp8BlockGroup;
      break;
    case WeightFormat::kInt4:
      if (w.zeros == nullptr) return "null zero points";
      if (w.group_size <= 0) return "non-positive group size";
      break;
    case WeightFormat::kDense:
      break;
  }
  if (w.group_size != expected_group) return "group size not the format's";
  if (w.group_of_k == nullptr && w.scale_ld < (w.cols + w.group_size - 1) / w.group_size)
    return "fewer scales per row than groups";
  if (w.format != WeightFormat::kNvfp4 && w.input_scale != 0.0f)
    return "activation quantization is an NVFP4 setting";
  if (!(w.input_scale >= 0.0f)) return "negative input scale";
  return nullptr;
}

// Rows [first, first + count) of `w` as a view of their own (the CPU kernels' row partition across
// threads): codes, scales, zeros and row scales advance by whole rows; columns are unchanged.
inline WeightView weight_rows(const WeightView& w, int64_t first, int64_t count) {
  WeightView rows = w;
  rows.rows = count;
  const auto* data = static_cast<const uint8_t*>(w.data);
  if (w.format == WeightFormat::kDense) {
    rows.data = data + first * w.ld * static_cast<int64_t>(dtype_size(w.dtype));
    return rows;
  }
  rows.data = data + first * w.ld;
  const int64_t scale_bytes =
      (w.format == WeightFormat::kNvfp4 || w.format == WeightFormat::kMxfp4) ? 1 : 4;
  rows.scales = static_cast<const uint8_t*>(w.scales) + first * w.scale_ld * scale_bytes;
  if (w.zeros != nullptr) rows.zeros = w.zeros + first * w.scale_ld;
  if (w.row_scales != nullptr) rows.row_scales = w.row_scales + first;
  return rows;
}

KEEL_HD inline uint8_t packed_nibble(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[k >> 1];
  return (k & 1) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xfu);
}

// Scalar weight loaders for math::canonical_dot_with (kernels/math/gemm_math.h): element k of
// row n, decoded to fp32 by the definitions above. The vector paths must equal these exactly.
struct LoadNvfp4 {
  const uint8_t* codes;
  const uint8_t* scales;
  float row_scale;
  KEEL_HD float operator()(int64_t k) const {
    const float block_scale = e4m3_to_f32(scales[k / kNvfp4Group]) * row_scale;
    return e2m1_to_f32(packed_nibble(codes, k)) * block_scale;
  }
};
struct LoadMxfp4 {
  const uint8_t* codes;
  const uint8_t* scales;
  KEEL_HD float operator()(int64_t k) const {
    return e2m1_to_f32(packed_nibble(codes, k)) * e8m0_to_f32(scales[k / kMxfp4Group]);
  }
};
struct LoadFp8Block {
  const uint8_t* codes;
  const float* scales;
  KEEL_HD float operator()(int64_t k) const {
    return e4m3_to_f32(codes[k]) * scales[k / kFp8BlockGroup];
  }
};
struct LoadInt4 {
  const uint8_t* codes;
  const uint8_t* zeros;
  const float* scales;
  const int32_t* group_of_k;
  int64_t group_size;
  KEEL_HD float operator()(int64_t k) const {
    const int64_t group = group_of_k ? group_of_k[k] : k / group_size;
    const int32_t centred = static_cast<int32_t>(packed_nibble(codes, k)) - zeros[group];
    return static_cast<float>(centred) * scales[group];
  }
};

// Weight [n][k] of `view`, decoded (the definition every path and test refers to).
KEEL_HD inline float dequantized_weight(const WeightView& view, int64_t n, int64_t k) {
  const auto* codes = static_cast<const uint8_t*>(view.data) + n * view.ld;
  switch (view.format) {
    case WeightFormat::kDense:
      return load_as_f32(view.data, view.dtype, static_cast<size_t>(n * view.ld + k));
    case WeightFormat::kNvfp4:
      return LoadNvfp4{codes, static_cast<const uint8_t*>(view.scales) + n * view.scale_ld,
                       view.row_scales[n]}(k);
    case WeightFormat::kMxfp4:
      return LoadMxfp4{codes, static_cast<const uint8_t*>(view.scales) + n * view.scale_ld}(k);
    case WeightFormat::kFp8Block:
      return LoadFp8Block{codes, static_cast<const float*>(view.scales) + n * view.scale_ld}(k);
    case WeightFormat::kInt4:
      return LoadInt4{codes, view.zeros + n * view.scale_ld,
                      static_cast<const float*>(view.scales) + n * view.scale_ld, view.group_of_k,
                      view.group_size}(k);
  }
  return bits_float(0x7fc00000u);
}

// ---- NVFP4 activation quantization (W4A4 emulation) ----

// Quantizes x[0, count) (count <= 16, one block; the rest of a row's last block is absent)
// into out (may alias x) as defined at the top of this file.
KEEL_HD inline void nvfp4_quantize_activation_block(const float* x, int64_t count,
                                                    float input_scale, float* out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float a = x[i] < 0 ? -x[i] : x[i];
    amax = a > amax ? a : amax;  // NaN inputs are not expected in activations
  }
  const float block_scale = e4m3_to_f32(f32_to_e4m3(amax / (6.0f * input_scale)));
  const float dequant_scale = block_scale * input_scale;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = dequant_scale == 0.0f ? 0.0f
                                   : e2m1_to_f32(f32_to_e2m1(x[i] / dequant_scale)) * dequant_scale;
  }
}

// One row of K activations, block by block from k = 0.
KEEL_HD inline void nvfp4_quantize_activation_row(const float* x, int64_t k, float input_scale,
                                                  float* out) {
  for (int64_t start = 0; start < k; start += kNvfp4Group) {
    const int64_t count = k - start < kNvfp4Group ? k - start : kNvfp4Group;
    nvfp4_quantize_activation_block(x + start, count, input_scale, out + start);
  }
}

}  // namespace keel::math
