// Private to the GEMM translation units: the per-ISA entry points that gemm() dispatches to.
//
// Each ISA file is compiled with its own -m flags, so nothing ISA-specific may live in this
// header as an inline function or template: the linker could pick an AVX-512 instantiation for
// a caller that runs on an AVX2-only CPU. Only declarations and plain constants belong here,
// which is why the two vector files each keep their own small helpers in anonymous namespaces.
#pragma once

#include <cstdint>

#include "kernels/cpu/gemm.h"

namespace keel::cpu::detail {

// Lanes of the canonical reduction (see gemm.h); every path must use exactly this many.
inline constexpr int kCanonicalLanes = 16;

// Bytes of weight rows each vector path keeps resident in L2 while it sweeps all rows of x over
// them. The next group is prefetched meanwhile, so two groups plus the x rows of the current
// tile must fit a 1 MiB L2 (Zen 4; Intel server cores have 1-2 MiB).
inline constexpr int64_t kWeightGroupBytes = 384 * 1024;

// Preconditions for all three (checked by gemm()): m, n, k > 0, pointers valid, ldx >= k,
// ldw >= k, ldy >= n. Each overwrites y[m, 0..n) for every m.
void gemm_scalar(const GemmArgs& args);
void gemm_avx2(const GemmArgs& args);
void gemm_avx512(const GemmArgs& args);

}  // namespace keel::cpu::detail
