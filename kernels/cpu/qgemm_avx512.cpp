// AVX-512 path of the quantized GEMM (qgemm.h). The native AVX-512 decoder (one zmm per chunk,
// vpermps over the 16-entry group tables) is not written yet; meanwhile this path runs the
// AVX2 decoder of qgemm_avx2.cpp, which every CPU that detected_isa() calls AVX-512 can run
// (AVX-512F/BW/VL/DQ plus FMA and F16C imply AVX2), so its bits are already the canonical ones.
#include "kernels/cpu/qgemm_internal.h"

namespace keel::cpu::detail {

void qgemm_avx512(const QGemmArgs& args) {
  qgemm_avx2(args);
}

}  // namespace keel::cpu::detail
