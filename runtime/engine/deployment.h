// A deployment file (configs/deployments/*.yaml): which model, how it is split and reduced.
//   model: path to an HF checkpoint directory
//   tp: 1 | 2 | 4
//   reduce: native | fixed_order
//   placement: contiguous | round_robin | explicit
//   explicit_placement: [[rank of expert 0, rank of expert 1, ...]]   (one list, or one per layer)
//   combine: fp32 | round_per_expert
//   kv_cache_dtype: auto | fp32 | bf16 | fp8_e4m3   (runtime/model/kv_cache.h)
//   nvfp4_activations: fp32 | w4a4   (NVFP4 checkpoints; runtime/model/model.h)
// Unknown keys and bad values are errors naming the file and the key.
#pragma once

#include <string>

#include "runtime/engine/engine.h"

namespace keel {

struct Deployment {
  std::string model_dir;
  bool tp_given = false;  // the file set tp (under mpirun it must then match the process count)
  EngineOptions engine;
};

Deployment load_deployment(const std::string& path);

}  // namespace keel
