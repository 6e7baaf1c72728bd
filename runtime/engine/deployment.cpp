#include "runtime/engine/deployment.h"

#include <filesystem>

#include "runtime/common/yaml_util.h"

namespace keel {

int threads_value(const YAML::Node& root, const std::string& path) {
  const int threads = yaml_value<int>(root, "threads", path);
  if (threads < 1 || threads > 256)
    throw_error(path, ": key 'threads' is ", threads, "; expected a value in [1, 256]");
  return threads;
}

std::vector<std::vector<int>> explicit_placement_lists(const YAML::Node& root,
                                                       const std::string& path) {
  std::vector<std::vector<int>> lists_out;
  if (!root["explicit_placement"]) return lists_out;
  const YAML::Node& lists = root["explicit_placement"];
  if (!lists.IsSequence()) throw_error(path, ": explicit_placement must be a list of lists");
  for (const auto& list : lists) {
    if (!list.IsSequence()) throw_error(path, ": explicit_placement must be a list of lists");
    std::vector<int> ranks;
    for (const auto& rank : list) {
      try {
        ranks.push_back(rank.as<int>());
      } catch (const YAML::Exception&) {
        throw_error(path, ": explicit_placement entries must be integers (ranks)");
      }
    }
    lists_out.push_back(std::move(ranks));
  }
  return lists_out;
}

PlacementSpec load_placement_file(const std::string& path) {
  YAML::Node root = load_yaml_mapping(path);
  reject_unknown_keys(root, {"placement", "explicit_placement"}, path);
  if (root["placement"] && yaml_value<std::string>(root, "placement", path) != "explicit")
    throw_error(path, ": a placement file holds placement: explicit (got '",
                yaml_value<std::string>(root, "placement", path), "')");
  PlacementSpec spec;
  spec.kind = PlacementKind::kExplicit;
  spec.explicit_ranks = explicit_placement_lists(root, path);
  if (spec.explicit_ranks.empty())
    throw_error(path,
                ": a placement file needs an explicit_placement list (one per layer, or one)");
  return spec;
}

Deployment load_deployment(const std::string& path) {
  YAML::Node root = load_yaml_mapping(path);
  reject_unknown_keys(root,
                      {"model", "tp", "threads", "reduce", "placement", "explicit_placement",
                       "combine", "kv_cache_dtype", "nvfp4_activations"},
                      path);
  Deployment deployment;
  if (root["model"]) {
    deployment.model_dir = yaml_value<std::string>(root, "model", path);
    // Relative model paths are relative to the deployment file.
    if (std::filesystem::path(deployment.model_dir).is_relative() &&
        !std::filesystem::exists(deployment.model_dir))
      deployment.model_dir =
          (std::filesystem::path(path).parent_path() / deployment.model_dir).string();
  }
  if (root["tp"]) {
    deployment.engine.tp_size = yaml_value<int>(root, "tp", path);
    // As a serve config's tp (runtime/serving/serve_config.h).
    if (deployment.engine.tp_size < 1 || deployment.engine.tp_size > 8)
      throw_error(path, ": key 'tp' is ", deployment.engine.tp_size,
                  "; expected a value in [1, 8]");
    deployment.tp_given = true;
  }
  try {
    if (root["reduce"])
      deployment.engine.reduce =
          comm::parse_reduce_algo(yaml_value<std::string>(root, "reduce", path));
    if (root["placement"])
      deployment.engine.placement.kind =
          parse_placement_kind(yaml_value<std::string>(root, "placement", path));
    if (root["combine"])
      deployment.engine.combine =
          parse_combine_precision(yaml_value<std::string>(root, "combine", path));
    if (root["nvfp4_activations"])
      deployment.engine.nvfp4_activations = parse_nvfp4_activations(
          yaml_value<std::string>(root, "nvfp4_activations", path), "nvfp4_activations");
    if (root["kv_cache_dtype"])
      deployment.engine.kv_cache_dtype =
          parse_kv_cache_dtype(yaml_value<std::string>(root, "kv_cache_dtype", path));
  } catch (const Error& error) {
    throw_error(path, ": ", error.what());
  }
  if (root["threads"]) deployment.engine.threads_per_rank = threads_value(root, path);
  deployment.engine.placement.explicit_ranks = explicit_placement_lists(root, path);
  if (deployment.engine.placement.kind == PlacementKind::kExplicit &&
      deployment.engine.placement.explicit_ranks.empty())
    throw_error(path, ": placement 'explicit' needs an explicit_placement list");
  return deployment;
}

}  // namespace keel
