// Private to the quantized GEMM translation units (see gemm_internal.h for why nothing
// ISA-specific may live here: only declarations and plain data).
#pragma once

#include <cstdint>

#include "kernels/cpu/qgemm.h"

namespace keel::cpu::detail {

// The exact fp32 value of every element and scale code, built once (in qgemm.cpp, compiled
// without ISA flags) from the scalar decoders of kernels/math/quant_math.h, so the vector paths
// look codes up instead of re-deriving the formats: e2m1[c] = e2m1_to_f32(c), e4m3[c] =
// e4m3_to_f32(c) (subnormals and the NaN codes 0x7f / 0xff included), e8m0[c] = e8m0_to_f32(c).
struct CodeTables {
  alignas(64) float e2m1[16];
  alignas(64) float e4m3[256];
  alignas(64) float e8m0[256];
};
const CodeTables& code_tables();

// Preconditions (checked by qgemm()): m, n, k > 0, the view valid for its format, and for W4A4
// x already quantized (the paths read w.input_scale only through qgemm()). Each overwrites
// y[m, 0..n) for every m.
void qgemm_scalar(const QGemmArgs& args);
void qgemm_avx2(const QGemmArgs& args);
void qgemm_avx512(const QGemmArgs& args);

// The AVX2 matrix-vector path (qgemv_avx2.cpp): every row of x on its own, the same bits as
// the paths above. For the formats and layouts qgemv_avx2_handles() accepts.
bool qgemv_avx2_handles(const math::WeightView& w);
void qgemv_avx2(const QGemmArgs& args);

}  // namespace keel::cpu::detail
