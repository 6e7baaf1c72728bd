// Storage dtypes and their conversions to and from fp32.
//
// keel stores weights in the checkpoint's dtype (f32, bf16, f16) and computes in fp32. The
// conversions are __host__ __device__ so the CUDA kernels (kernels/cuda) and the CPU reference
// share one definition of rounding: round-to-nearest-even, NaN kept quiet, as PyTorch does.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#ifdef __CUDACC__
#define KEEL_HD __host__ __device__
#else
#define KEEL_HD
#endif

namespace keel {

enum class DType : uint8_t { kF32, kBF16, kF16 };

constexpr size_t dtype_size(DType dtype) {
  return dtype == DType::kF32 ? 4 : 2;
}

constexpr std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
  }
  return "?";
}

KEEL_HD inline uint32_t float_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

KEEL_HD inline float bits_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

KEEL_HD inline float bf16_to_f32(uint16_t bf16) {
  return bits_float(uint32_t{bf16} << 16);
}

KEEL_HD inline uint16_t f32_to_bf16(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

KEEL_HD inline float f16_to_f32(uint16_t half) {
  uint32_t sign = uint32_t{half & 0x8000u} << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal: value = mantissa * 2^-24, exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

KEEL_HD inline uint16_t f32_to_f16(float value) {
  uint32_t bits = float_bits(value);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs_bits < 0x38800000u) {
    // Result is subnormal or zero in f16: scale so the integer part is the f16 mantissa and
    // let the fp32 addition with 0.5 * 2^24 ... do round-to-nearest-even for us.
    float magnitude = bits_float(abs_bits);
    float shifted = magnitude * 16777216.0f;  // 2^24: f16 subnormal ulp becomes 1.0
    // Round half to even on a value < 1024, exact in fp32 arithmetic.
    float floor_value = static_cast<float>(static_cast<uint32_t>(shifted));
    float fraction = shifted - floor_value;
    uint32_t mantissa = static_cast<uint32_t>(floor_value);
    if (fraction > 0.5f || (fraction == 0.5f && (mantissa & 1u))) ++mantissa;
    return static_cast<uint16_t>(sign | mantissa);
  }
  uint32_t rounding_bias = 0xfffu + ((abs_bits >> 13) & 1u);
  uint32_t rounded = abs_bits + rounding_bias;
  return static_cast<uint16_t>(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu));
}

// Round an fp32 value to the nearest value representable in `dtype` (identity for f32).
KEEL_HD inline float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return bf16_to_f32(f32_to_bf16(value));
    case DType::kF16:
      return f16_to_f32(f32_to_f16(value));
    default:
      return value;
  }
}

// Load element `index` of a buffer in `dtype` as fp32.
KEEL_HD inline float load_as_f32(const void* data, DType dtype, size_t index) {
  switch (dtype) {
    case DType::kBF16:
      return bf16_to_f32(static_cast<const uint16_t*>(data)[index]);
    case DType::kF16:
      return f16_to_f32(static_cast<const uint16_t*>(data)[index]);
    default:
      return static_cast<const float*>(data)[index];
  }
}

}  // namespace keel
