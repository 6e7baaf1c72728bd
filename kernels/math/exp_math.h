// exp and the functions built on it (sigmoid, SiLU, log1p, softplus), shared by the CPU
// reference and the CUDA kernels so that both get the same bits (kernels/math/README.md).
//
// Only correctly rounded + - * / and exact integer bit work, never a libm call: glibc's expf
// and CUDA's expf are different approximations, so calling "the" exp on each side gives
// different bits. No fma either: outside code compiled for FMA hardware std::fma is a library
// call per operation, which would also stop the compiler from vectorising the loops around
// it; plain operations keep exp inlinable and branch-free, so silu_mul and softmax vectorise
// (bench/exp.cpp measures it). The build's -ffp-contract=off (CPU) and -fmad=false (CUDA)
// keep the compilers from fusing these operations on their own.
//
// Accuracy, measured against double-precision references over every float (the ExpMathSweep
// tests of tests/test_exp_math.cpp with KEEL_MATH_SWEEP_STRIDE=1; the default suite runs a
// strided subset and asserts these bounds). The double references are within a few double
// ulps of the true values, ~1e-7 float ulp, so the figures are the functions' own errors.
// An ulp is the spacing of floats at the reference value (2^-149 for subnormal results).
//   exp_f32       max 0.79 ulp (0.7804, at a subnormal result, which is rounded twice; normal
//                 results <= 0.68 on a stride-37 sweep; glibc expf < 0.51, CUDA expf <= 2)
//   sigmoid_f32   max 2.49 ulp (2.4807)
//   silu_f32      max 2.39 ulp (2.3813)
//   log1p_f32     max 0.86 ulp (0.8580)
//   softplus_f32  max 1.55 ulp (1.5497)
// Monotone over every float: exp, sigmoid, log1p, softplus; SiLU from 0 up (its minimum is at
// -1.278).
// Special values: exp(-inf) = +0, exp(+inf) = +inf, exp(+-0) = 1; results below 2^-126 are
// rounded subnormals (no flush to zero); exp overflows to +inf from x = 0x1.62e430p+6
// (88.7228394) and is +0 below x = -0x1.9fe368p+6 (-103.972076), as a correctly rounded exp.
// A NaN input is returned unchanged by all five functions (the same bits on both sides).
// C++17, no CUDA headers (included from CPU and CUDA translation units alike).
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"

namespace keel::math {

namespace exp_detail {

// 2^k for k in [-126, 127], from its exponent bits.
KEEL_HD inline float power_of_two(int32_t k) {
  return bits_float(static_cast<uint32_t>(k + 127) << 23);
}

// m * 2^n for n in [-252, 254] as (m * 2^(n/2)) * 2^(n - n/2): both powers are normal floats,
// and for m in [0.5, 256) the first product is exact, so the result is rounded once, also when
// it is subnormal or overflows to inf.
KEEL_HD inline float scale_by_power_of_two(float m, int32_t n) {
  const int32_t half_n = n / 2;
  return (m * power_of_two(half_n)) * power_of_two(n - half_n);
}

// ln 2 = kLn2Hi + kLn2Lo: kLn2Hi has 16 significant bits, so n * kLn2Hi is exact for |n| < 2^8.
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;  // ln 2 - kLn2Hi to 5.5e-14

// e^x = mantissa * 2^exponent, mantissa in [0.70, 1.42] rounded once, for x in [-120, 89]
// (not NaN: converting n to an integer would be undefined).
//  1. n = round(x / ln 2): adding 1.5 * 2^23 leaves no fraction bits, so the FPU's round to
//     nearest does the rounding (|x / ln 2| < 2^22).
//  2. r + r_lo = x - n ln 2 with |r| <= ln(2)/2 (+2^-14 from rounding x * log2(e)):
//     x - n * ln2_hi is exact (n * ln2_hi is, and the difference is a multiple of ulp(x) or
//     2^-15 below 0.5); r_lo is r's rounding error (Fast2Sum; where |r| < 5e-4 it may be
//     inexact, but is then below 1e-11).
//  3. e^(r + r_lo) = 1 + r + r_lo + r r_lo + r^2 q(r), q the degree-4 minimax fit of
//     (e^r - 1 - r) / r^2 on |r| <= 0.3466 (Remez; relative error of e^r 3.1e-9, 0.05 ulp),
//     Horner form. 1 + r is split into its rounded value and exact error, so the only
//     rounding of full size is the last addition: ~0.5 ulp, plus ~0.05 from the small terms.
struct ExpParts {
  float mantissa;
  int32_t exponent;
};

KEEL_HD inline ExpParts exp_parts(float x) {
  constexpr float kLog2e = 0x1.715476p+0f;
  constexpr float kRoundToInteger = 0x1.8p23f;
  constexpr float kQ0 = 0x1.fffffcp-2f;
  constexpr float kQ1 = 0x1.555492p-3f;
  constexpr float kQ2 = 0x1.5558f2p-5f;
  constexpr float kQ3 = 0x1.1239dcp-7f;
  constexpr float kQ4 = 0x1.6a243ep-10f;
  const float n_float = (x * kLog2e + kRoundToInteger) - kRoundToInteger;
  const float r_hi = x - n_float * kLn2Hi;
  const float n_ln2_lo = n_float * kLn2Lo;
  const float r = r_hi - n_ln2_lo;
  const float r_lo = (r_hi - r) - n_ln2_lo;
  const float q = kQ0 + r * (kQ1 + r * (kQ2 + r * (kQ3 + r * kQ4)));
  const float one_plus_r = 1.0f + r;
  const float one_plus_r_error = (1.0f - one_plus_r) + r;
  const float tail = one_plus_r_error + (r_lo + r * (r_lo + r * q));
  return {one_plus_r + tail, static_cast<int32_t>(n_float)};
}

}  // namespace exp_detail

// The clamps and selects below work on integers, not floats: with GCC's default
// -ftrapping-math a float comparison or a select of floats becomes a branch (the float
// operations under it may trap, so they are not executed speculatively), and the vectoriser
// then refuses the loop. Integer min/max and bitwise blends give the same answers branch-free.
namespace exp_detail {

KEEL_HD inline bool is_nan(uint32_t bits) {
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

KEEL_HD inline bool is_negative(uint32_t bits) {
  return (bits >> 31) != 0;
}

// A signed integer in the order of the floats (-0 just below +0, NaNs beyond the infinities);
// its own inverse.
KEEL_HD inline int32_t order_key(uint32_t bits) {
  const uint32_t flip = (0u - (bits >> 31)) & 0x7fffffffu;
  return static_cast<int32_t>(bits ^ flip);
}

KEEL_HD inline float from_order_key(int32_t key) {
  return bits_float(static_cast<uint32_t>(order_key(static_cast<uint32_t>(key))));
}

// condition ? if_true : if_false as a bitwise blend: a select of floats would let GCC move the
// computation of one side into a branch, which stops vectorisation.
KEEL_HD inline float blend(bool condition, float if_true, float if_false) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return bits_float((float_bits(if_true) & mask) | (float_bits(if_false) & ~mask));
}

// x clamped to [low, high]; a NaN becomes low or high (callers return NaN inputs themselves).
KEEL_HD inline float clamp_by_key(uint32_t bits, float low, float high) {
  const int32_t key = order_key(bits);
  const int32_t low_key = order_key(float_bits(low));
  const int32_t high_key = order_key(float_bits(high));
  const int32_t above_low = key < low_key ? low_key : key;
  return from_order_key(above_low > high_key ? high_key : above_low);
}

}  // namespace exp_detail

// e^x: clamped to [-104, 89] (below, e^x < 2^-150 rounds to +0; above, it overflows anyway),
// then exp_parts and one scaling. A NaN input is returned as it is (the same bits on both
// sides).
KEEL_HD inline float exp_f32(float x) {
  const uint32_t bits = float_bits(x);
  const float clamped = exp_detail::clamp_by_key(bits, -104.0f, 89.0f);
  const exp_detail::ExpParts parts = exp_detail::exp_parts(clamped);
  const float result = exp_detail::scale_by_power_of_two(parts.mantissa, parts.exponent);
  return exp_detail::blend(exp_detail::is_nan(bits), x, result);
}

namespace exp_detail {

// x < -88 (or x = -inf, or a negative NaN): there e^-x may overflow, while e^x < 2^-126 is
// below half an ulp of 1, so 1 + e^x = 1 exactly.
KEEL_HD inline bool below_minus_88(uint32_t bits) {
  return bits > float_bits(-88.0f);
}

}  // namespace exp_detail

// 1 / (1 + e^-x), the formula torch uses, for x >= -88; e^x below, where 1 + e^x = 1 exactly
// and e^-x could overflow (1 / (1 + inf) would give 0, not the subnormal results down to
// 2^-149 at x ~ -103.3). Both branches share one exp. Monotone: each operation is monotone in
// its input, and at -88 the two branches agree to far less than the step between neighbours.
KEEL_HD inline float sigmoid_f32(float x) {
  const uint32_t bits = float_bits(x);
  const bool tail = exp_detail::below_minus_88(bits);
  const float e = exp_f32(bits_float(tail ? bits : bits ^ 0x80000000u));
  const float result = exp_detail::blend(tail, e, 1.0f / (1.0f + e));
  return exp_detail::blend(exp_detail::is_nan(bits), x, result);
}

// x * sigmoid(x) = x / (1 + e^-x) for x >= -88; x e^x below, with the product formed on the
// mantissa of e^x before its scaling, so a subnormal result is rounded once rather than
// amplified from a subnormal e^x. It reaches 0 at x ~ -108.8 and is -0 for x = -inf (the
// limit; x / (1 + e^-x) would give NaN).
KEEL_HD inline float silu_f32(float x) {
  const uint32_t bits = float_bits(x);
  const bool tail = exp_detail::below_minus_88(bits);
  const float exponent = exp_detail::clamp_by_key(tail ? bits : bits ^ 0x80000000u, -120.0f, 89.0f);
  const exp_detail::ExpParts parts = exp_detail::exp_parts(exponent);
  const float e = exp_detail::scale_by_power_of_two(parts.mantissa, parts.exponent);
  const float x_e = exp_detail::scale_by_power_of_two(exponent * parts.mantissa, parts.exponent);
  const float result = exp_detail::blend(tail, x_e, x / (1.0f + e));
  return exp_detail::blend(exp_detail::is_nan(bits), x, result);
}

// log(1 + x), accurate for small |x| where log(1 + x) would lose x's low bits.
//  1. For 1 + x in [sqrt(1/2), sqrt(2)) take f = x exactly (k = 0, c = 0). Otherwise round
//     u = 1 + x, keep its rounding error c = (1 + x) - u exactly (Fast2Sum, larger operand
//     first) and split u = 2^k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)) by exponent bits;
//     1 + f - 1 is exact (Sterbenz). log(1 + x) = k ln 2 + log(1 + f) + c / u to first order.
//  2. log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: 2s + s R(s^2) with R the
//     atanh series to s^8 (truncation 2e-9 relative, 0.03 ulp), and 2s rewritten as
//     f - f^2/2 + s f^2/2 so that f itself is the leading term and the roundings (including
//     that of the division) only touch the small correction.
//  3. k ln 2 as k * ln2_hi (exact) plus k * ln2_lo, added last-to-first from the smallest term.
KEEL_HD inline float log1p_f32(float x) {
  constexpr float kSqrtHalfMinusOne = -0x1.2bec34p-2f;  // sqrt(1/2) - 1, rounded down
  constexpr float kSqrtTwoMinusOne = 0x1.a8279ap-2f;    // sqrt(2) - 1, rounded up
  constexpr float kSqrtTwo = 0x1.6a09e6p+0f;
  constexpr float kR1 = 0x1.555556p-1f;            // 2/3
  constexpr float kR2 = 0x1.99999ap-2f;            // 2/5
  constexpr float kR3 = 0x1.24924ap-2f;            // 2/7
  constexpr float kR4 = 0x1.c71c72p-3f;            // 2/9
  if (x != x) return x;                            // NaN
  if (x < -1.0f) return bits_float(0x7fc00000u);   // log of a negative number
  if (x == -1.0f) return bits_float(0xff800000u);  // -inf
  if (x == bits_float(0x7f800000u)) return x;      // +inf
  int32_t k = 0;
  float f = x;
  float c = 0.0f;
  if (!(x > kSqrtHalfMinusOne && x < kSqrtTwoMinusOne)) {
    const float u = 1.0f + x;
    c = x > 1.0f ? 1.0f - (u - x) : x - (u - 1.0f);
    const uint32_t u_bits = float_bits(u);
    k = static_cast<int32_t>(u_bits >> 23) - 127;  // u >= 2^-24 (x >= -1 + 2^-24): normal
    float mantissa = bits_float((u_bits & 0x007fffffu) | 0x3f800000u);  // in [1, 2)
    if (mantissa >= kSqrtTwo) {
      mantissa *= 0.5f;
      ++k;
    }
    f = mantissa - 1.0f;
    c /= u;
  }
  const float half_f_squared = 0.5f * (f * f);
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float series = z * (kR1 + z * (kR2 + z * (kR3 + z * kR4)));
  if (k == 0) return f - (half_f_squared - (s * (half_f_squared + series) + c));
  const float k_float = static_cast<float>(k);
  return k_float * exp_detail::kLn2Hi -
         ((half_f_squared - (s * (half_f_squared + series) + (k_float * exp_detail::kLn2Lo + c))) -
          f);
}

// log(1 + e^x) with torch's default threshold: x itself above 20, where log(1 + e^-x) < 2.1e-9
// is below half an ulp of x (ulp(20) = 1.9e-6), so x is the correctly rounded value there.
KEEL_HD inline float softplus_f32(float x) {
  return x > 20.0f ? x : log1p_f32(exp_f32(x));
}

}  // namespace keel::math
