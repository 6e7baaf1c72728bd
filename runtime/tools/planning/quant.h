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

#include <string>

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
};

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
