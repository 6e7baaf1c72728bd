#include "runtime/common/yaml_util.h"

namespace keel {

YAML::Node load_yaml_mapping(const std::string& path) {
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

void reject_unknown_keys(const YAML::Node& node, const std::set<std::string>& known,
                         const std::string& where) {
  for (const auto& entry : node) {
    std::string key = entry.first.as<std::string>();
    if (known.count(key)) continue;
    std::string list;
    for (const std::string& name : known) list += (list.empty() ? "" : ", ") + name;
    throw_error(where, ": unknown key '", key, "' (known keys: ", list, ")");
  }
}

}  // namespace keel
