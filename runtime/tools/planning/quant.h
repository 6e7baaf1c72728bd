// Weight quantization formats for capacity planning: bytes per parameter including scales, which
// model parts a format applies to, and which tensor-core precision the matmuls then run at.
//
// Design note. A quantization is reduced to three numbers the planner needs: the storage cost of
// a quantized parameter (element bits + amortized scale bits), the storage cost of the parts left
// in bf16, and the compute precision (for the FLOPs roofline). Block/group scales are amortized
// exactly (the arithmetic is in quant.cpp); per-tensor scales are a few bytes per tensor and are
// ignored. What a format covers is explicit in QuantSpec and reported by `keel plan`:
//   quantized:  routed experts, shared experts, dense MLP layers, attention projections
//               (q/k/v/o, MLA down/up projections) and Gated DeltaNet in/out projections;
//   bf16:       embeddings, lm_head, norms, biases, routers, conv1d, attention sinks.
// Real checkpoints: NVIDIA ModelOpt NVFP4 checkpoints (e.g. nvidia/DeepSeek-R1-FP4,
// nvidia/Qwen3-235B-A22B-FP4) quantize the linear layers inside the transformer blocks and keep
// embeddings and lm_head in bf16; gpt-oss ships MXFP4 for the MoE experts only (attention, router,
// embeddings and lm_head bf16) -- use --attention-bf16 to model that; FP8 block checkpoints
// (DeepSeek-V3, Qwen3-*-FP8) likewise leave embeddings, lm_head, norms and routers in bf16.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/math/quant_math.h"

namespace keel::planning {

enum class QuantKind { bf16, fp8, nvfp4, mxfp4, int4 };

// Tensor-core precision the quantized matmuls run at (activations x weights).
enum class ComputePrecision { bf16, fp8, fp4 };

struct QuantSpec {
  QuantKind kind = QuantKind::bf16;
  std::string name = "bf16";
  double bytes_per_param = 2.0;  // quantized parts, scales included
  double element_bits = 16.0;    // the value alone, without scales
  int group_size = 0;            // elements sharing one scale (0: none)
  std::string description;       // "E2M1 + E4M3 scale per 16 + fp32 per tensor"
  // Preferred compute precision; the planner falls back to a precision the hardware has
  // (fp4 -> bf16 for weight-only dequant kernels, fp8 -> bf16).
  ComputePrecision compute = ComputePrecision::bf16;
  // quant_as_stored / a quantized checkpoint's own formats (checkpoint_quant_spec in
  // runtime/cli/plan_checkpoint.h): the weights are planned as the checkpoint holds them, never
  // re-quantized. A plan of a quantized checkpoint (ModelSpec::layer_quant) needs this.
  bool as_stored = false;
};

// One weight matrix of a quantized checkpoint as keel's loader holds it: the format of keel's
// in-memory layout (kernels/math/quant_math.h) and, for int4, the checkpoint's group size and act
// order (GPTQ desc_act: a permuted g_idx, kept as group_of_k).
struct MatrixQuant {
  math::WeightFormat format = math::WeightFormat::kDense;
  int64_t group_size = 0;  // K per scale: math::kNvfp4Group, kMxfp4Group, kFp8BlockGroup, or int4's
  bool act_order = false;  // int4 only
  bool quantized() const { return format != math::WeightFormat::kDense; }
  bool operator==(const MatrixQuant&) const = default;
};

// "nvfp4", "mxfp4", "fp8_block", "int4 g64", "int4 g64 act-order", or `dense_name` when dense.
std::string matrix_quant_name(const MatrixQuant& quant, const std::string& dense_name);

// The bytes keel holds for a [rows, cols] matrix (a tensor-parallel slice of a checkpoint matrix
// of in_features `full_cols`), exactly as runtime/model/quant_load.cpp's HostWeight lays it out
// and Matrix::nbytes() counts it:
//   dense     rows * cols * dense_bytes (the checkpoint dtype)
//   nvfp4     codes rows * cols/2 + E4M3 scales rows * cols/16 + fp32 row scales rows * 4
//   mxfp4     codes rows * cols/2 + E8M0 scales rows * cols/32
//   fp8_block codes rows * cols + fp32 scales rows * ceil(cols/128) * 4 (blocks repeated per row)
//   int4      codes rows * ceil(cols/2) + u8 zeros rows * G + fp32 scales rows * G * 4, with
//             G = ceil(cols / group); act order keeps every group of the source row
//             (G = ceil(full_cols / group)) plus group_of_k cols * 4
// (nvfp4 / mxfp4 in_features are multiples of their group wherever keel loads them). Act order
// with a single group (full_cols <= group) is a trivial g_idx, which keel does not keep.
double matrix_bytes(const MatrixQuant& quant, int64_t rows, int64_t cols, int64_t full_cols,
                    double dense_bytes);

// A row-parallel weight (o_proj, down_proj, Gated DeltaNet out_proj) keeps `cols_per_rank`
// columns on each of `tp` ranks, rank r from column r * cols_per_rank. keel's loader refuses a
// quantized slice that starts off a group boundary (quant_load.cpp HostWeight::copy_rows); this
// throws keel::Error naming `module` in the same case.
void check_column_slice(const MatrixQuant& quant, int64_t cols_per_rank, int64_t full_cols, int tp,
                        const std::string& module);

// Bytes per parameter for a format, scales included (see quant.cpp for the arithmetic).
double bytes_per_param(QuantKind kind);

// "bf16", "fp8", "nvfp4", "mxfp4", "int4" (aliases: "awq", "gptq", "int4-awq", "int4-gptq").
// Throws keel::Error listing the known names.
QuantSpec quant_from_name(const std::string& name);

// No quantization: every weight at the model's storage dtype `dtype` (bf16 | fp16 | fp32; e.g. a
// checkpoint's torch_dtype), named "none (<dtype>)"; matmuls at bf16 (fp16/fp32 checkpoints are
// planned at the bf16 tensor-core rate).
QuantSpec quant_as_stored(const std::string& dtype);

// Bytes per element of a KV-cache / state dtype: "bf16"/"fp16" 2, "fp8" 1, "fp32" 4.
double dtype_bytes(const std::string& dtype, const std::string& where);

const char* compute_precision_name(ComputePrecision precision);

}  // namespace keel::planning
