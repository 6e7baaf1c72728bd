// AVX2 path of the quantized GEMM (qgemm.h). Placeholder until the vectorised decoder
// lands: it runs the scalar definition, so its bits are already the canonical ones.
#include "kernels/cpu/qgemm_internal.h"

namespace keel::cpu::detail {

void qgemm_avx2(const QGemmArgs& args) {
  qgemm_scalar(args);
}

}  // namespace keel::cpu::detail
