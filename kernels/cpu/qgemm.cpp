// Quantized GEMM front end: view checks, W4A4 activation quantization, ISA dispatch, and the
// scalar path (math::canonical_dot_with over the format's scalar decoder; the definition the
// vector paths match bit for bit). Layout as in kernels/math/quant_math.h.
#include "kernels/cpu/qgemm.h"

#include <vector>

#include "kernels/base/check.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/qgemm_internal.h"
#include "kernels/math/gemm_math.h"

namespace keel::cpu {

namespace {

using math::WeightFormat;

void check_view(const math::WeightView& w) {
  const char* problem = math::weight_view_problem(w, /*allow_dense=*/false);
  KEEL_CHECK(problem == nullptr, "qgemm(", math::weight_format_name(w.format), "): ", problem, " (",
             w.rows, " x ", w.cols, ", ld ", w.ld, ", scale_ld ", w.scale_ld, ", group ",
             w.group_size, ", input scale ", w.input_scale, ")");
}

}  // namespace

float canonical_qdot(const float* x, const math::WeightView& w, int64_t n) {
  const int64_t k = w.cols;
  const auto* codes = static_cast<const uint8_t*>(w.data) + n * w.ld;
  switch (w.format) {
    case WeightFormat::kNvfp4:
      return math::canonical_dot_with(
          x, k,
          math::LoadNvfp4{codes, static_cast<const uint8_t*>(w.scales) + n * w.scale_ld,
                          w.row_scales[n]});
    case WeightFormat::kMxfp4:
      return math::canonical_dot_with(
          x, k, math::LoadMxfp4{codes, static_cast<const uint8_t*>(w.scales) + n * w.scale_ld});
    case WeightFormat::kFp8Block:
      return math::canonical_dot_with(
          x, k, math::LoadFp8Block{codes, static_cast<const float*>(w.scales) + n * w.scale_ld});
    case WeightFormat::kInt4:
      return math::canonical_dot_with(
          x, k,
          math::LoadInt4{codes, w.zeros + n * w.scale_ld,
                         static_cast<const float*>(w.scales) + n * w.scale_ld, w.group_of_k,
                         w.group_size});
    case WeightFormat::kDense:
      break;
  }
  KEEL_CHECK(false, "canonical_qdot: dense weights");
  return 0.0f;
}

namespace detail {

const CodeTables& code_tables() {
  static const CodeTables tables = [] {
    CodeTables built{};
    for (int code = 0; code < 16; ++code)
      built.e2m1[code] = math::e2m1_to_f32(static_cast<uint8_t>(code));
    for (int code = 0; code < 256; ++code) {
      built.e4m3[code] = math::e4m3_to_f32(static_cast<uint8_t>(code));
      built.e8m0[code] = math::e8m0_to_f32(static_cast<uint8_t>(code));
    }
    return built;
  }();
  return tables;
}

void qgemm_scalar(const QGemmArgs& args) {
  for (int64_t row = 0; row < args.m; ++row) {
    const float* x_row = args.x + row * args.ldx;
    float* y_row = args.y + row * args.ldy;
    for (int64_t col = 0; col < args.w.rows; ++col) y_row[col] = canonical_qdot(x_row, args.w, col);
  }
}

}  // namespace detail

void qgemm(const QGemmArgs& args) {
  check_view(args.w);
  KEEL_CHECK(args.m >= 0, "qgemm: negative m=", args.m);
  KEEL_CHECK(args.ldx >= args.w.cols && args.ldy >= args.w.rows, "qgemm: ldx=", args.ldx,
             " ldy=", args.ldy, " below k=", args.w.cols, " / n=", args.w.rows);
  if (args.m == 0) return;
  KEEL_CHECK(args.x != nullptr && args.y != nullptr, "qgemm: null x or y");

  QGemmArgs run = args;
  // W4A4: the rows as an FP4 tensor core would see them, quantized once per call.
  thread_local std::vector<float> quantized_x;
  if (args.w.format == math::WeightFormat::kNvfp4 && args.w.input_scale > 0.0f) {
    const int64_t k = args.w.cols;
    quantized_x.resize(static_cast<size_t>(args.m * k));
    for (int64_t row = 0; row < args.m; ++row) {
      math::nvfp4_quantize_activation_row(args.x + row * args.ldx, k, args.w.input_scale,
                                          quantized_x.data() + row * k);
    }
    run.x = quantized_x.data();
    run.ldx = k;
  }
  switch (active_isa()) {
    case Isa::kAvx512:
      detail::qgemm_avx512(run);
      return;
    case Isa::kAvx2:
      detail::qgemm_avx2(run);
      return;
    case Isa::kScalar:
      detail::qgemm_scalar(run);
      return;
  }
}

void matmul(const float* x, int64_t ldx, const math::WeightView& w, float* y, int64_t ldy,
            int64_t m) {
  if (w.format == math::WeightFormat::kDense) {
    gemm(GemmArgs{x, ldx, w.data, w.dtype, w.ld, y, ldy, m, w.rows, w.cols});
    return;
  }
  qgemm(QGemmArgs{x, ldx, w, y, ldy, m});
}

void matmul(const float* x, int64_t ldx, const math::WeightView& w, float* y, int64_t ldy,
            int64_t m, WorkerPool& pool) {
  // Below ~32k multiply-adds per thread the fork-join (~1 us) is a noticeable share.
  constexpr int64_t kMinMacsPerThread = int64_t{1} << 15;
  const int num_threads = pool.num_threads();
  if (num_threads == 1 || w.rows < 2 * kMatmulRowAlign ||
      m * w.rows * w.cols < kMinMacsPerThread * num_threads) {
    matmul(x, ldx, w, y, ldy, m);
    return;
  }
  pool.run([&](int part) {
    const RowRange range = partition_rows(w.rows, num_threads, part, kMatmulRowAlign);
    if (range.count() > 0)
      matmul(x, ldx, math::weight_rows(w, range.first, range.count()), y + range.first, ldy, m);
  });
}

}  // namespace keel::cpu
