// Strict YAML reading for typed config structs: unknown keys are errors (a silently dropped
// typo is a production incident), and every error names the file and the key.
#pragma once

#include <yaml-cpp/yaml.h>

#include <set>
#include <string>

#include "kernels/base/check.h"

namespace keel {

// Loads a YAML mapping; throws keel::Error naming the file on parse errors or a non-mapping.
YAML::Node load_yaml_mapping(const std::string& path);

// Throws keel::Error "FILE: unknown key 'x' (known keys: a, b, ...)" for any key not in `known`.
void reject_unknown_keys(const YAML::Node& node, const std::set<std::string>& known,
                         const std::string& where);

template <typename T>
T yaml_value(const YAML::Node& node, const std::string& key, const std::string& where) {
  try {
    return node[key].as<T>();
  } catch (const YAML::Exception&) {
    throw_error(where, ": key '", key, "' has a value of the wrong type (", YAML::Dump(node[key]),
                ")");
  }
}

}  // namespace keel
