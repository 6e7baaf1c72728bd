// `keel plan --model DIR`: the planner's ModelSpec from a Hugging Face checkpoint's config.json,
// read by the same ModelConfig the loader uses (runtime/model/model_config.h), so whatever keel
// can load it can plan, with the same refusals. The spec describes keel's own layout where the
// planner has a choice (the Gated DeltaNet conv state in fp32).
#pragma once

#include <string>

#include "runtime/tools/planning/model_spec.h"

namespace keel {

// True when `path` names a checkpoint directory or a config.json rather than a planning preset.
bool is_checkpoint_path(const std::string& path);

// Throws keel::Error naming the file and key on anything ModelConfig refuses.
planning::ModelSpec model_spec_from_checkpoint(const std::string& path);

}  // namespace keel
