// Strict YAML helpers for planning presets (the runtime/yaml_util.h pattern, copied so that
// keel_planning does not link keel_runtime): unknown keys are errors naming the file and key.
#pragma once

#include <yaml-cpp/yaml.h>

#include <set>
#include <string>

#include "kernels/base/check.h"

namespace keel::planning::detail {

inline YAML::Node load_yaml_mapping(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw_error("cannot open YAML file ", path);
  } catch (const YAML::Exception& error) {
    throw_error(path, ": invalid YAML: ", error.what());
  }
  if (!root.IsMap()) throw_error(path, ": expected a mapping of keys to values at the top level");
  return root;
}

inline void reject_unknown_keys(const YAML::Node& node, const std::set<std::string>& known,
                                const std::string& where) {
  for (const auto& entry : node) {
    std::string key = entry.first.as<std::string>();
    if (known.count(key)) continue;
    std::string list;
    for (const std::string& name : known) list += (list.empty() ? "" : ", ") + name;
    throw_error(where, ": unknown key '", key, "' (known keys: ", list, ")");
  }
}

// Reads node[key] into `out` when present; a wrong type is an error naming the file and key.
template <typename T>
void read_optional(const YAML::Node& node, const std::string& key, const std::string& where,
                   T& out) {
  if (!node[key]) return;
  try {
    out = node[key].as<T>();
  } catch (const YAML::Exception&) {
    throw_error(where, ": key '", key, "' has a value of the wrong type (", YAML::Dump(node[key]),
                ")");
  }
}

template <typename T>
void read_required(const YAML::Node& node, const std::string& key, const std::string& where,
                   T& out) {
  if (!node[key]) throw_error(where, ": missing required key '", key, "'");
  read_optional(node, key, where, out);
}

}  // namespace keel::planning::detail
