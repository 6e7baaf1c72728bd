// GEMM front end: ISA detection and selection, argument checks, and the scalar path.
//
// The scalar path is the canonical reduction of gemm.h, math::canonical_dot of
// kernels/math/gemm_math.h (shared with the CUDA canonical GEMM): 16 lane accumulators per
// output element, each summing k = lane, lane+16, ... in increasing k with std::fma, then the
// fixed folding tree. It is the definition the vector paths (gemm_avx2.cpp,
// gemm_avx512.cpp) are tested against bit for bit, so it favours plainness over speed.
// Layout as in gemm.h: x [M, K] fp32 (stride ldx), w [N, K] in its storage dtype (stride ldw),
// y [M, N] fp32 (stride ldy), all row-major.
#include "kernels/cpu/gemm.h"

#include <cpuid.h>

#include <atomic>

#include "kernels/base/check.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/math/gemm_math.h"

namespace keel::cpu {

namespace {

// The canonical reduction is defined once, in kernels/math/gemm_math.h, for CPU and GPU.
static_assert(detail::kCanonicalLanes == math::kCanonicalLanes);

bool cpu_can_run(Isa isa) {
  return static_cast<int>(isa) <= static_cast<int>(detected_isa());
}

std::atomic<Isa>& active_isa_slot() {
  static std::atomic<Isa> slot{detected_isa()};
  return slot;
}

}  // namespace

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

// F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c".
// The fma check beside it covers the OS enabling the YMM state both need.
namespace {
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
}  // namespace

Isa detected_isa() {
  static const Isa detected = [] {
    __builtin_cpu_init();
    // libgcc's checks include the OS (XGETBV) enabling the wider register state.
    bool has_fma_f16c = __builtin_cpu_supports("fma") && cpu_has_f16c();
    if (has_fma_f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (has_fma_f16c && __builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return detected;
}

Isa active_isa() {
  return active_isa_slot().load(std::memory_order_relaxed);
}

void set_active_isa(Isa isa) {
  if (!cpu_can_run(isa)) {
    throw_error("gemm: ISA ", isa_name(isa), " requested but this CPU only supports up to ",
                isa_name(detected_isa()));
  }
  active_isa_slot().store(isa, std::memory_order_relaxed);
}

float canonical_dot(const float* x, const void* w, DType w_dtype, int64_t k) {
  KEEL_CHECK(w_dtype == DType::kF32 || w_dtype == DType::kBF16 || w_dtype == DType::kF16,
             "canonical_dot: unknown dtype ", static_cast<int>(w_dtype));
  return math::canonical_dot(x, w, w_dtype, k);
}

namespace detail {

void gemm_scalar(const GemmArgs& args) {
  const auto* w_bytes = static_cast<const uint8_t*>(args.w);
  const int64_t w_row_bytes = args.ldw * static_cast<int64_t>(dtype_size(args.w_dtype));
  for (int64_t row = 0; row < args.m; ++row) {
    const float* x_row = args.x + row * args.ldx;
    float* y_row = args.y + row * args.ldy;
    for (int64_t col = 0; col < args.n; ++col) {
      y_row[col] = math::canonical_dot(x_row, w_bytes + col * w_row_bytes, args.w_dtype, args.k);
    }
  }
}

}  // namespace detail

void gemm(const GemmArgs& args) {
  KEEL_CHECK(args.m >= 0 && args.n >= 0 && args.k >= 0, "gemm: negative size m=", args.m,
             " n=", args.n, " k=", args.k);
  KEEL_CHECK(
      args.w_dtype == DType::kF32 || args.w_dtype == DType::kBF16 || args.w_dtype == DType::kF16,
      "gemm: unknown weight dtype ", static_cast<int>(args.w_dtype));
  KEEL_CHECK(args.ldx >= args.k && args.ldw >= args.k, "gemm: leading dimension below k=", args.k,
             " (ldx=", args.ldx, " ldw=", args.ldw, ")");
  KEEL_CHECK(args.ldy >= args.n, "gemm: ldy=", args.ldy, " below n=", args.n);
  if (args.m == 0 || args.n == 0) return;
  KEEL_CHECK(args.y != nullptr, "gemm: null output");
  if (args.k == 0) {
    // An empty reduction: every lane stays +0, and so does the fold.
    for (int64_t row = 0; row < args.m; ++row) {
      for (int64_t col = 0; col < args.n; ++col) args.y[row * args.ldy + col] = 0.0f;
    }
    return;
  }
  KEEL_CHECK(args.x != nullptr && args.w != nullptr, "gemm: null input (x=", args.x, " w=", args.w,
             ")");
  switch (active_isa()) {
    case Isa::kAvx512:
      detail::gemm_avx512(args);
      return;
    case Isa::kAvx2:
      detail::gemm_avx2(args);
      return;
    case Isa::kScalar:
      detail::gemm_scalar(args);
      return;
  }
}

}  // namespace keel::cpu
