// Batch-invariant GEMM: y[m, n] = sum_k x[m, k] * w[n, k]   (x fp32, w f32/bf16/f16, y fp32)
//
// Layout: x is row-major [M, K] with row stride ldx; w is row-major [N, K] (the nn.Linear
// layout, out_features x in_features) with row stride ldw, read in its storage dtype; y is
// row-major [M, N] with row stride ldy. Nothing is accumulated into y: it is overwritten.
//
// The canonical reduction (the determinism contract): every output element is computed by
// 16 lanes; lane j accumulates, with one fused multiply-add per step and in increasing k,
// the products x[m,k]*w[n,k] for k = j, j+16, j+32, ... (k >= K contributes fma(0,0,acc)).
// The 16 lanes are then folded by a fixed tree: lane i += lane i+8 (i<8), then i += i+4 (i<4),
// then i += i+2 (i<2), then lane 0 + lane 1. Every ISA path (scalar, AVX2 as two 8-lane
// registers, AVX-512 as one 16-lane register) implements exactly this, so results are
// bit-identical across ISAs, across M (no split-K, no M-dependent tiling of K) and across N.
#pragma once

#include <cstdint>
#include <string_view>

#include "kernels/base/dtype.h"
#include "kernels/math/gemm_math.h"

namespace keel::cpu {

enum class Isa : uint8_t { kScalar, kAvx2, kAvx512 };

std::string_view isa_name(Isa isa);
// Best ISA this CPU supports (checked once with cpuid).
Isa detected_isa();
// ISA used by gemm(); defaults to detected_isa(). Tests force each path to compare bits.
Isa active_isa();
// Throws keel::Error if the CPU cannot run `isa`.
void set_active_isa(Isa isa);

using GemmArgs = math::GemmArgs;

void gemm(const GemmArgs& args);

// Convenience for contiguous operands (ldx = ldw = k, ldy = n).
inline void gemm(const float* x, const void* w, DType w_dtype, float* y, int64_t m, int64_t n,
                 int64_t k) {
  gemm(GemmArgs{x, k, w, w_dtype, k, y, n, m, n, k});
}

// The canonical reduction for one output element, written plainly (scalar std::fma). It is the
// definition the vector paths must match bit for bit.
float canonical_dot(const float* x, const void* w, DType w_dtype, int64_t k);

}  // namespace keel::cpu
