#include "runtime/serving/serve_config.h"

#include <filesystem>

#include "runtime/common/yaml_util.h"
#include "runtime/engine/deployment.h"

namespace keel {

std::string_view determinism_name(Determinism determinism) {
  return determinism == Determinism::kBatchInvariant ? "batch_invariant" : "fast";
}

namespace {

template <typename T>
T bounded(const YAML::Node& root, const std::string& key, const std::string& path, T low, T high) {
  T value = yaml_value<T>(root, key, path);
  if (!(value >= low && value <= high))  // written so that NaN fails too
    throw_error(path, ": key '", key, "' is ", value, "; expected a value in [", low, ", ", high,
                "]");
  return value;
}

}  // namespace

ServeConfig load_serve_config(const std::string& path) {
  YAML::Node root = load_yaml_mapping(path);
  reject_unknown_keys(root,
                      {"model",
                       "model_name",
                       "tp",
                       "threads",
                       "placement",
                       "placement_file",
                       "combine",
                       "determinism",
                       "backend",
                       "host",
                       "port",
                       "max_model_len",
                       "block_size",
                       "num_kv_blocks",
                       "kv_cache_mb",
                       "kv_cache_dtype",
                       "nvfp4_activations",
                       "max_num_seqs",
                       "max_num_batched_tokens",
                       "prefix_caching",
                       "max_waiting",
                       "drain_timeout_s",
                       "collective_timeout_ms",
                       "http_threads",
                       "max_body_kb",
                       "max_connections",
                       "reserved_connections",
                       "header_timeout_s",
                       "body_timeout_s",
                       "idle_timeout_s",
                       "send_timeout_s",
                       "max_unsent_kb",
                       "profile_max_spans",
                       "telemetry",
                       "near_tie_epsilon",
                       "telemetry_dump_dir",
                       "telemetry_dump_interval_s",
                       "trace_dir",
                       "routing_capture"},
                      path);
  ServeConfig config;
  config.engine.collective_timeout_ms = 120000;
  if (!root["model"]) throw_error(path, ": key 'model' is required (a checkpoint directory)");
  config.model_dir = yaml_value<std::string>(root, "model", path);
  if (std::filesystem::path(config.model_dir).is_relative())
    config.model_dir = (std::filesystem::path(path).parent_path() / config.model_dir).string();
  if (root["model_name"]) config.model_name = yaml_value<std::string>(root, "model_name", path);
  if (root["tp"]) {
    config.engine.tp_size = bounded<int>(root, "tp", path, 1, 8);
    config.tp_given = true;
  }
  try {
    if (root["placement"])
      config.engine.placement.kind =
          parse_placement_kind(yaml_value<std::string>(root, "placement", path));
    if (root["combine"])
      config.engine.combine =
          parse_combine_precision(yaml_value<std::string>(root, "combine", path));
    if (root["backend"])
      config.engine.device = parse_device(yaml_value<std::string>(root, "backend", path));
    if (root["nvfp4_activations"])
      config.engine.nvfp4_activations = parse_nvfp4_activations(
          yaml_value<std::string>(root, "nvfp4_activations", path), "nvfp4_activations");
    if (root["kv_cache_dtype"])
      config.engine.kv_cache_dtype =
          parse_kv_cache_dtype(yaml_value<std::string>(root, "kv_cache_dtype", path));
  } catch (const Error& error) {
    throw_error(path, ": ", error.what());
  }
  if (config.engine.placement.kind == PlacementKind::kExplicit)
    throw_error(path,
                ": placement 'explicit' comes from a file here: set placement_file (e.g. the "
                "output of keel routes placement or GET /v1/telemetry/placement)");
  if (root["threads"]) config.engine.threads_per_rank = threads_value(root, path);
  if (root["placement_file"]) {
    if (root["placement"]) throw_error(path, ": set placement or placement_file, not both");
    std::filesystem::path file = yaml_value<std::string>(root, "placement_file", path);
    if (file.is_relative()) file = std::filesystem::path(path).parent_path() / file;
    config.engine.placement = load_placement_file(file.string());
  }
  if (root["determinism"]) {
    const std::string name = yaml_value<std::string>(root, "determinism", path);
    if (name == "batch_invariant") {
      config.determinism = Determinism::kBatchInvariant;
    } else if (name == "fast") {
      config.determinism = Determinism::kFast;
    } else {
      throw_error(path, ": key 'determinism' is '", name, "'; expected batch_invariant or fast");
    }
  }
  config.engine.reduce = config.determinism == Determinism::kBatchInvariant
                             ? comm::ReduceAlgo::kFixedOrder
                             : comm::ReduceAlgo::kNative;
  if (root["host"]) config.host = yaml_value<std::string>(root, "host", path);
  if (root["port"]) config.port = bounded<int>(root, "port", path, 0, 65535);
  if (root["max_model_len"])
    config.max_model_len = bounded<int64_t>(root, "max_model_len", path, 0, int64_t{1} << 30);
  if (root["block_size"]) config.block_size = bounded<int64_t>(root, "block_size", path, 1, 1024);
  if (root["num_kv_blocks"] && root["kv_cache_mb"])
    throw_error(path, ": set num_kv_blocks or kv_cache_mb, not both");
  if (root["num_kv_blocks"])
    config.num_kv_blocks = bounded<int64_t>(root, "num_kv_blocks", path, 1, int64_t{1} << 30);
  if (root["kv_cache_mb"])
    config.kv_cache_mb = bounded<int64_t>(root, "kv_cache_mb", path, 1, int64_t{1} << 30);
  if (root["max_num_seqs"])
    config.max_num_seqs = bounded<int64_t>(root, "max_num_seqs", path, 1, 1 << 20);
  if (root["max_num_batched_tokens"])
    config.max_num_batched_tokens =
        bounded<int64_t>(root, "max_num_batched_tokens", path, 1, int64_t{1} << 24);
  if (root["prefix_caching"])
    config.prefix_caching = yaml_value<bool>(root, "prefix_caching", path);
  if (root["max_waiting"])
    config.max_waiting = bounded<int64_t>(root, "max_waiting", path, 1, int64_t{1} << 24);
  if (root["drain_timeout_s"])
    config.drain_timeout_s = bounded<double>(root, "drain_timeout_s", path, 0.0, 86400.0);
  if (root["collective_timeout_ms"])
    config.engine.collective_timeout_ms =
        bounded<int64_t>(root, "collective_timeout_ms", path, 0, int64_t{1} << 40);
  if (config.engine.collective_timeout_ms != 0 && config.engine.collective_timeout_ms < 1000)
    throw_error(path,
                ": key 'collective_timeout_ms' must be 0 (forever) or >= 1000: idle ranks "
                "wait up to ~20 ms between heartbeats and a busy step can take longer");
  if (root["http_threads"]) config.http_threads = bounded<int>(root, "http_threads", path, 1, 64);
  if (root["max_body_kb"])
    config.max_body_kb = bounded<int64_t>(root, "max_body_kb", path, 1, int64_t{1} << 20);
  if (root["max_connections"])
    config.max_connections = bounded<int64_t>(root, "max_connections", path, 1, 1 << 20);
  if (root["reserved_connections"])
    config.reserved_connections = bounded<int64_t>(root, "reserved_connections", path, 0, 4096);
  // Timeouts: a millisecond at least (0 would close every connection at once), an hour at most.
  for (auto [key, value] : {std::pair{"header_timeout_s", &config.header_timeout_s},
                            std::pair{"body_timeout_s", &config.body_timeout_s},
                            std::pair{"idle_timeout_s", &config.idle_timeout_s},
                            std::pair{"send_timeout_s", &config.send_timeout_s}})
    if (root[key]) *value = bounded<double>(root, key, path, 0.001, 3600.0);
  if (root["max_unsent_kb"])
    config.max_unsent_kb = bounded<int64_t>(root, "max_unsent_kb", path, 16, 1 << 20);
  if (root["profile_max_spans"])
    config.profile_max_spans =
        bounded<int64_t>(root, "profile_max_spans", path, 1, kMaxProfileSpans);
  if (root["telemetry"]) config.telemetry = yaml_value<bool>(root, "telemetry", path);
  if (root["near_tie_epsilon"])
    config.near_tie_epsilon = bounded<double>(root, "near_tie_epsilon", path, 0.0, 1.0);
  if (root["telemetry_dump_dir"])
    config.telemetry_dump_dir = yaml_value<std::string>(root, "telemetry_dump_dir", path);
  if (root["telemetry_dump_interval_s"])
    config.telemetry_dump_interval_s =
        bounded<double>(root, "telemetry_dump_interval_s", path, 0.01, 86400.0);
  if (root["trace_dir"]) config.trace_dir = yaml_value<std::string>(root, "trace_dir", path);
  if (root["routing_capture"])
    config.routing_capture = yaml_value<std::string>(root, "routing_capture", path);
  return config;
}

}  // namespace keel

namespace keel {

void apply_http_limits(const ServeConfig& config, server::HttpServerConfig& http) {
  auto ms = [](double seconds) {
    return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  };
  http.host = config.host;
  http.port = static_cast<uint16_t>(config.port);
  http.threads = config.http_threads;
  http.max_body_bytes = static_cast<size_t>(config.max_body_kb) * 1024;
  http.max_connections = static_cast<int>(config.max_connections);
  http.reserved_connections = static_cast<int>(config.reserved_connections);
  http.header_timeout = ms(config.header_timeout_s);
  http.body_timeout = ms(config.body_timeout_s);
  http.idle_timeout = ms(config.idle_timeout_s);
  http.send_timeout = ms(config.send_timeout_s);
  http.max_unsent_bytes = static_cast<size_t>(config.max_unsent_kb) * 1024;
}

}  // namespace keel
