// Strict YAML reading for typed config structs: unknown keys are errors (a silently dropped
// typo is a production incident), and every error names the file and the key.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <set>
#include <string>
#include <type_traits>

#include "kernels/base/check.h"

namespace keel {

// Loads a YAML mapping; throws keel::Error naming the file on parse errors or a non-mapping,
// and (check_yaml_strict) on duplicate keys, anchors, aliases, merge keys, non-scalar keys and
// a second document, each with its line.
YAML::Node load_yaml_mapping(const std::string& path);
// The same from text; `where` names its source in errors.
YAML::Node parse_yaml_mapping(const std::string& text, const std::string& where);
void check_yaml_strict(const std::string& text, const std::string& where);

// Throws keel::Error "FILE: unknown key 'x' (known keys: a, b, ...)" for any key not in `known`.
void reject_unknown_keys(const YAML::Node& node, const std::set<std::string>& known,
                         const std::string& where);

// node[key] as T. Floating-point values must be finite: YAML spells NaN and infinity (.nan,
// .inf), and no keel setting means either (drain_timeout_s: .nan once passed every range check).
template <typename T>
T yaml_value(const YAML::Node& node, const std::string& key, const std::string& where) {
  T value{};
  try {
    value = node[key].as<T>();
  } catch (const YAML::Exception&) {
    throw_error(where, ": key '", key, "' has a value of the wrong type (", YAML::Dump(node[key]),
                ")");
  }
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(value))
      throw_error(where, ": key '", key, "' is ", YAML::Dump(node[key]),
                  "; expected a finite number");
  }
  return value;
}

}  // namespace keel
