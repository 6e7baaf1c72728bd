// A deployment file (configs/deployments/*.yaml): which model, how it is split and reduced.
//   model: path to an HF checkpoint directory
//   tp: 1 | 2 | 4
//   threads: cpu threads per rank (default 1; the bits do not depend on it)
//   reduce: native | fixed_order
//   placement: contiguous | round_robin | explicit
//   explicit_placement: [[rank of expert 0, rank of expert 1, ...]]   (one list, or one per layer)
//   combine: fp32 | round_per_expert
//   kv_cache_dtype: auto | fp32 | bf16 | fp8_e4m3   (runtime/model/kv_cache.h)
//   nvfp4_activations: fp32 | w4a4   (NVFP4 checkpoints; runtime/model/model.h)
// Unknown keys and bad values are errors naming the file and the key.
#pragma once

#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "runtime/engine/engine.h"

namespace keel {

struct Deployment {
  std::string model_dir;
  bool tp_given = false;  // the file set tp (under mpirun it must then match the process count)
  EngineOptions engine;
};

Deployment load_deployment(const std::string& path);

// A placement file: `placement: explicit` (optional) and `explicit_placement` (one list of ranks
// per layer, or one for every layer), as `keel routes placement` and GET
// /v1/telemetry/placement write it. Lengths and ranks are checked against the model when the
// engine builds it.
PlacementSpec load_placement_file(const std::string& path);

// Shared by deployment and serve configs: the `threads` key (range-checked) and the
// `explicit_placement` lists (empty when absent).
int threads_value(const YAML::Node& root, const std::string& path);
std::vector<std::vector<int>> explicit_placement_lists(const YAML::Node& root,
                                                       const std::string& path);

}  // namespace keel
