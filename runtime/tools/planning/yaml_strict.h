// Strict YAML helpers for planning presets: runtime/common/yaml_util.h's loader and unknown-key
// check (keel_yaml, which keel_planning links without the engine), plus optional/required readers.
#pragma once

#include <yaml-cpp/yaml.h>

#include <set>
#include <string>

#include "kernels/base/check.h"
#include "runtime/common/yaml_util.h"

namespace keel::planning::detail {

using keel::load_yaml_mapping;
using keel::reject_unknown_keys;

// Reads node[key] into `out` when present; a wrong type is an error naming the file and key.
template <typename T>
void read_optional(const YAML::Node& node, const std::string& key, const std::string& where,
                   T& out) {
  if (!node[key]) return;
  out = keel::yaml_value<T>(node, key, where);
}

template <typename T>
void read_required(const YAML::Node& node, const std::string& key, const std::string& where,
                   T& out) {
  if (!node[key]) throw_error(where, ": missing required key '", key, "'");
  read_optional(node, key, where, out);
}

}  // namespace keel::planning::detail
