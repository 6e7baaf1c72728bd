// Scalar building blocks of the shared host-device math (see kernels/math/README.md).
//
// Every function here is KEEL_HD (__host__ __device__ under nvcc, plain inline otherwise) and
// picks the host or device spelling of one IEEE operation:
//   fma_f32   std::fma (correctly rounded on every host: an FMA instruction or glibc's exact
//             software fma)              | __fmaf_rn (correctly rounded)     -> same bits
//   sqrt_f32  std::sqrt(float) (sqrtss) | sqrtf (IEEE with nvcc's default -prec-sqrt=true)
//                                                                            -> same bits
//   cos/sin/pow  glibc (< 1 ulp)        | CUDA libdevice (<= 2 ulp cos/sin, <= 4 ulp pow)
//                                                                            -> close, not same
//             (host-only in the forward pass: the RoPE table is built on the host for both)
// exp and what is built on it are not here but in exp_math.h: one polynomial for both sides.
// Plain +, -, *, / are IEEE round-to-nearest on both sides, provided nothing fuses a*b+c on
// its own: CPU code is compiled with -ffp-contract=off and CUDA code with -fmad=false.
// Plain C++17, no CUDA headers: CPU translation units include this as well.
#pragma once

#include <cmath>

#include "kernels/base/dtype.h"

namespace keel::math {

KEEL_HD inline float fma_f32(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

KEEL_HD inline float sqrt_f32(float x) {
#ifdef __CUDA_ARCH__
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

KEEL_HD inline float cos_f32(float x) {
#ifdef __CUDA_ARCH__
  return cosf(x);
#else
  return std::cos(x);
#endif
}

KEEL_HD inline float sin_f32(float x) {
#ifdef __CUDA_ARCH__
  return sinf(x);
#else
  return std::sin(x);
#endif
}

KEEL_HD inline float pow_f32(float base, float exponent) {
#ifdef __CUDA_ARCH__
  return powf(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}

// std::max(a, b) exactly: (a < b) ? b : a. On equal values (+0 vs -0) and on NaN in b it keeps
// a, the first argument, as the CPU kernels always did.
KEEL_HD inline float max_keep_first(float a, float b) {
  return (a < b) ? b : a;
}

// -infinity without <limits> in device code.
KEEL_HD inline float negative_infinity() {
  return bits_float(0xff800000u);
}

}  // namespace keel::math
