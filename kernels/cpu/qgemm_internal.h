// Private to the quantized GEMM translation units (see gemm_internal.h for why nothing
// ISA-specific may live here).
#pragma once

#include "kernels/cpu/qgemm.h"

namespace keel::cpu::detail {

// Preconditions (checked by qgemm()): m, n, k > 0, the view valid for its format, and for W4A4
// x already quantized (the paths read w.input_scale only through qgemm()). Each overwrites
// y[m, 0..n) for every m.
void qgemm_scalar(const QGemmArgs& args);
void qgemm_avx2(const QGemmArgs& args);
void qgemm_avx512(const QGemmArgs& args);

}  // namespace keel::cpu::detail
