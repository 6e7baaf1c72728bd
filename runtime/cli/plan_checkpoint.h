// `keel plan --model DIR`: the planner's ModelSpec from a Hugging Face checkpoint's config.json,
// read by the same ModelConfig the loader uses (runtime/model/model_config.h), so whatever keel
// can load it can plan, with the same refusals (Qwen3-MoE, Qwen2-MoE, Mixtral, Qwen3.5-MoE
// text-only or vision-language with text_config, Qwen3-Next). The spec carries the checkpoint's
// dtype and keel_layout (model_spec.h): the plan counts what RankModel holds -- fp32 norms,
// biases and small Gated DeltaNet tensors, a replicated embedding table, a padded per-rank
// lm_head, fp32 conv state -- so at `--quant none --kv-dtype fp32` its weight, KV and state bytes
// per rank are keel's (tests/test_plan_checkpoint.cpp).
//
// Quantized checkpoints (config.json quantization_config / hf_quant_config.json: ModelOpt and
// compressed-tensors NVFP4, FP8 block 128, AWQ, GPTQ, MXFP4): the spec carries every layer's
// matrix formats (ModelSpec::layer_quant), read from the declared method and its exclusion lists
// by the tensor names the loader uses -- a module is quantized unless module_matches lists it as
// not converted; MXFP4 covers the fused routed experts only; routers, the shared-expert gate,
// embeddings and lm_head are always planned dense (keel refuses a quantized embedding; released
// formats keep the others in high precision). Each matrix is counted in keel's in-memory layout
// (planning::matrix_bytes), so weight bytes per rank equal the loader's, and a tensor-parallel
// split the loader refuses (a row-parallel slice off a group boundary, e.g. FP8 at TP 2 on small
// models) is refused by the planner too. Such a checkpoint is planned as stored: `--quant none`
// (checkpoint_quant_spec); any other --quant is refused rather than re-quantizing its codes.
#pragma once

#include <string>

#include "runtime/tools/planning/model_spec.h"

namespace keel {

// True when `path` names a checkpoint directory or a config.json rather than a planning preset.
bool is_checkpoint_path(const std::string& path);

// Throws keel::Error naming the file and key on anything ModelConfig refuses.
planning::ModelSpec model_spec_from_checkpoint(const std::string& path);

// `--quant none` for a spec read from a checkpoint: quant_as_stored(dtype), or for a quantized
// checkpoint the same marked with its method and format (matmul precision and the expert
// bytes per parameter the perf model reads). Both plan the weights as stored.
planning::QuantSpec checkpoint_quant_spec(const planning::ModelSpec& spec);

}  // namespace keel
