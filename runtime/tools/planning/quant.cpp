// Quantization formats: bytes per parameter with the scale arithmetic written out.
#include "runtime/tools/planning/quant.h"

#include "kernels/base/check.h"

namespace keel::planning {

double bytes_per_param(QuantKind kind) {
  switch (kind) {
    case QuantKind::bf16:
      // 16 bits, no scales.
      return 2.0;
    case QuantKind::fp8:
      // E4M3 (8 bits) + one fp32 scale per 128x128 weight block (DeepSeek-V3 style):
      //   1 B + 4 B / (128 * 128) = 1 + 4/16384 = 1.000244 B.
      return 1.0 + 4.0 / 16384.0;
    case QuantKind::nvfp4:
      // E2M1 (4 bits) + one E4M3 (8-bit) scale per 16 elements + one fp32 per tensor:
      //   4 + 8/16 = 4.5 bits = 0.5625 B (the per-tensor fp32 is negligible).
      return 4.5 / 8.0;
    case QuantKind::mxfp4:
      // E2M1 (4 bits) + one E8M0 (8-bit) shared exponent per 32 elements (OCP MX):
      //   4 + 8/32 = 4.25 bits = 0.53125 B.
      return 4.25 / 8.0;
    case QuantKind::int4:
      // AWQ/GPTQ: 4-bit integers + an fp16 scale and a zero point per group of 128. Counting the
      // zero point as 16 bits (AWQ stores it packed in 4 bits: 4 + 20/128 = 4.16 bits):
      //   4 + (16 + 16)/128 = 4.25 bits = 0.53125 B.
      return 4.25 / 8.0;
  }
  return 2.0;
}

QuantSpec quant_from_name(const std::string& name) {
  QuantSpec spec;
  if (name == "bf16" || name == "fp16") {
    spec = {
        QuantKind::bf16,       "bf16", bytes_per_param(QuantKind::bf16), 16, 0, "bf16, no scales",
        ComputePrecision::bf16};
  } else if (name == "fp8") {
    spec = {QuantKind::fp8,
            "fp8",
            bytes_per_param(QuantKind::fp8),
            8,
            128 * 128,
            "E4M3 + fp32 scale per 128x128 block",
            ComputePrecision::fp8};
  } else if (name == "nvfp4") {
    spec = {QuantKind::nvfp4,
            "nvfp4",
            bytes_per_param(QuantKind::nvfp4),
            4,
            16,
            "E2M1 + E4M3 scale per 16 + fp32 per tensor (4.5 bits)",
            ComputePrecision::fp4};
  } else if (name == "mxfp4") {
    spec = {QuantKind::mxfp4,
            "mxfp4",
            bytes_per_param(QuantKind::mxfp4),
            4,
            32,
            "E2M1 + E8M0 scale per 32 (4.25 bits)",
            ComputePrecision::fp4};
  } else if (name == "int4" || name == "awq" || name == "gptq" || name == "int4-awq" ||
             name == "int4-gptq") {
    // Weight-only: W4A16 kernels dequantize to bf16 and run bf16 tensor cores.
    spec = {QuantKind::int4,
            "int4",
            bytes_per_param(QuantKind::int4),
            4,
            128,
            "int4 + fp16 scale and zero per 128 (4.25 bits), W4A16",
            ComputePrecision::bf16};
  } else {
    throw_error("unknown quantization '", name, "' (known: bf16, fp8, nvfp4, mxfp4, int4)");
  }
  return spec;
}

QuantSpec quant_as_stored(const std::string& dtype) {
  QuantSpec spec;
  spec.kind = QuantKind::bf16;
  spec.name = "none (" + dtype + ")";
  spec.bytes_per_param = dtype_bytes(dtype, "quantization none");
  spec.element_bits = 8.0 * spec.bytes_per_param;
  spec.description = dtype + " as stored, no scales";
  spec.compute = ComputePrecision::bf16;
  spec.as_stored = true;
  return spec;
}

std::string matrix_quant_name(const MatrixQuant& quant, const std::string& dense_name) {
  if (!quant.quantized()) return dense_name;
  std::string name(math::weight_format_name(quant.format));
  if (quant.format == math::WeightFormat::kInt4) {
    name += " g" + std::to_string(quant.group_size);
    if (quant.act_order) name += " act-order";
  }
  return name;
}

double matrix_bytes(const MatrixQuant& quant, int64_t rows, int64_t cols, int64_t full_cols,
                    double dense_bytes) {
  const auto div_up = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const double n = static_cast<double>(rows);
  switch (quant.format) {
    case math::WeightFormat::kDense:
      return n * static_cast<double>(cols) * dense_bytes;
    case math::WeightFormat::kNvfp4:
      return n * static_cast<double>(cols / 2 + cols / math::kNvfp4Group) + n * 4.0;
    case math::WeightFormat::kMxfp4:
      return n * static_cast<double>(cols / 2 + cols / math::kMxfp4Group);
    case math::WeightFormat::kFp8Block:
      return n * static_cast<double>(cols) +
             n * static_cast<double>(div_up(cols, math::kFp8BlockGroup)) * 4.0;
    case math::WeightFormat::kInt4: {
      if (quant.group_size <= 0) throw_error("int4 weight without a group size");
      const bool act_order = quant.act_order && full_cols > quant.group_size;
      const double groups =
          static_cast<double>(div_up(act_order ? full_cols : cols, quant.group_size));
      const double group_of_k = act_order ? static_cast<double>(cols) * 4.0 : 0.0;
      return n * static_cast<double>(div_up(cols, 2)) + n * groups * (1.0 + 4.0) + group_of_k;
    }
  }
  return 0;
}

void check_column_slice(const MatrixQuant& quant, int64_t cols_per_rank, int64_t full_cols, int tp,
                        const std::string& module) {
  if (!quant.quantized() || (quant.act_order && full_cols > quant.group_size) || tp <= 1) return;
  if (cols_per_rank % quant.group_size == 0 && cols_per_rank % 2 == 0) return;
  throw_error(module, " (", matrix_quant_name(quant, "dense"), "): at tp=", tp, " each rank holds ",
              cols_per_rank,
              " of its in_features, a column slice that does not start on a quantization group "
              "boundary (group ",
              quant.group_size,
              "); keel's loader refuses this split (in_features per rank must be a multiple of ",
              quant.group_size, ")");
}

double dtype_bytes(const std::string& dtype, const std::string& where) {
  if (dtype == "bf16" || dtype == "fp16" || dtype == "bfloat16" || dtype == "float16") return 2.0;
  if (dtype == "fp8" || dtype == "fp8_e4m3" || dtype == "fp8_e5m2") return 1.0;
  if (dtype == "fp32" || dtype == "float32") return 4.0;
  throw_error(where, ": unknown dtype '", dtype, "' (known: bf16, fp16, fp8, fp32)");
}

const char* compute_precision_name(ComputePrecision precision) {
  switch (precision) {
    case ComputePrecision::bf16:
      return "bf16";
    case ComputePrecision::fp8:
      return "fp8";
    case ComputePrecision::fp4:
      return "fp4";
  }
  return "bf16";
}

}  // namespace keel::planning
