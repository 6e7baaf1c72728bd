// `keel plan --model DIR`: the planner's ModelSpec from a Hugging Face checkpoint's config.json,
// read by the same ModelConfig the loader uses (runtime/model/model_config.h), so whatever keel
// can load it can plan, with the same refusals (Qwen3-MoE, Qwen2-MoE, Mixtral, Qwen3.5-MoE
// text-only or vision-language with text_config, Qwen3-Next). The spec carries the checkpoint's
// dtype and keel_layout (model_spec.h): the plan counts what RankModel holds -- fp32 norms,
// biases and small Gated DeltaNet tensors, a replicated embedding table, a padded per-rank
// lm_head, fp32 conv state -- so at `--quant none --kv-dtype fp32` its weight, KV and state bytes
// per rank are keel's (tests/test_plan_checkpoint.cpp).
#pragma once

#include <string>

#include "runtime/tools/planning/model_spec.h"

namespace keel {

// True when `path` names a checkpoint directory or a config.json rather than a planning preset.
bool is_checkpoint_path(const std::string& path);

// Throws keel::Error naming the file and key on anything ModelConfig refuses.
planning::ModelSpec model_spec_from_checkpoint(const std::string& path);

}  // namespace keel
