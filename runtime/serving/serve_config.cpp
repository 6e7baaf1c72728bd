#include "runtime/serving/serve_config.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <limits>

#include "runtime/common/yaml_util.h"
#include "runtime/engine/deployment.h"

namespace keel {

std::string_view determinism_name(Determinism determinism) {
  return determinism == Determinism::kBatchInvariant ? "batch_invariant" : "fast";
}

Determinism parse_determinism(std::string_view name, std::string_view what) {
  if (name == "batch_invariant") return Determinism::kBatchInvariant;
  if (name == "fast") return Determinism::kFast;
  throw_error(what, " is '", name, "'; expected batch_invariant or fast");
}

void resolve_reduce(ServeConfig& config, const std::string& where) {
  const comm::ReduceAlgo mode_default = config.determinism == Determinism::kBatchInvariant
                                            ? comm::ReduceAlgo::kFixedOrder
                                            : comm::ReduceAlgo::kNative;
  config.engine.reduce = config.reduce.value_or(mode_default);
  if (config.determinism == Determinism::kBatchInvariant &&
      config.engine.reduce != comm::ReduceAlgo::kFixedOrder)
    throw_error(where,
                ": reduce 'native' contradicts determinism 'batch_invariant', whose promise "
                "needs the fixed_order all-reduce (use determinism: fast for native)");
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

// Directories the server writes into must exist at start-up: creating them would turn a typo
// into a silently new directory, and finding out at the first dump or trace is too late.
void require_directory(const std::string& dir, const std::string& key, const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_directory(dir, error))
    throw_error(path, ": key '", key, "' is '", dir, "', which is not an existing directory");
}

}  // namespace

int64_t num_kv_blocks_for(const ServeConfig& config, int64_t block_bytes, int num_local_ranks,
                          bool host_memory) {
  KEEL_CHECK(block_bytes > 0 && num_local_ranks > 0);
  const int64_t blocks = config.num_kv_blocks > 0
                             ? config.num_kv_blocks
                             : std::max<int64_t>(1, config.kv_cache_mb * 1024 * 1024 / block_bytes);
  const char* key = config.num_kv_blocks > 0 ? "num_kv_blocks" : "kv_cache_mb";
  // The scheduler counts blocks in 32 bits.
  if (blocks > std::numeric_limits<int32_t>::max())
    throw_error(key, " gives ", blocks, " KV blocks per rank, more than the scheduler's limit of ",
                std::numeric_limits<int32_t>::max());
  // Host ranks share this machine's memory: a pool larger than all of it cannot be allocated,
  // and finding that out after announcing the server (or by the OOM killer) is too late.
  if (host_memory) {
    const long pages = ::sysconf(_SC_PHYS_PAGES);
    const long page_bytes = ::sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page_bytes > 0) {
      const double physical = static_cast<double>(pages) * static_cast<double>(page_bytes);
      const double wanted =
          static_cast<double>(blocks) * static_cast<double>(block_bytes) * num_local_ranks;
      if (wanted > physical)
        throw_error(key, " asks for ", wanted / (1024.0 * 1024.0), " MiB of KV cache over ",
                    num_local_ranks, " rank(s) in this process; the machine has ",
                    physical / (1024.0 * 1024.0), " MiB of memory");
    }
  }
  return blocks;
}

ServeConfig load_serve_config(const std::string& path, ModelKey model_key) {
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
                       "reduce",
                       "seed",
                       "api_key_scope",
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
                       "startup_timeout_ms",
                       "health_stall_ms",
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
                       "routing_capture",
                       "telemetry_expert_latency",
                       "metrics_names",
                       "metrics_cache_s"},
                      path);
  ServeConfig config;
  if (!root["model"] && model_key == ModelKey::kRequired)
    throw_error(path, ": key 'model' is required (a checkpoint directory)");
  if (root["model"]) {
    config.model_given = yaml_value<std::string>(root, "model", path);
    config.model_dir = config.model_given;
    if (std::filesystem::path(config.model_dir).is_relative())
      config.model_dir = (std::filesystem::path(path).parent_path() / config.model_dir).string();
  }
  if (root["model_name"]) {
    if (root["model_name"].IsSequence()) {
      config.model_names = yaml_value<std::vector<std::string>>(root, "model_name", path);
      if (config.model_names.empty()) throw_error(path, ": key 'model_name' is an empty list");
    } else {
      config.model_names = {yaml_value<std::string>(root, "model_name", path)};
    }
    for (const std::string& name : config.model_names)
      if (name.empty()) throw_error(path, ": key 'model_name' has an empty name");
  }
  if (root["tp"]) {
    config.engine.tp_size = bounded<int>(root, "tp", path, 1, serve_limits::kMaxTp);
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
  try {
    if (root["determinism"])
      config.determinism = parse_determinism(yaml_value<std::string>(root, "determinism", path),
                                             "key 'determinism'");
    if (root["reduce"])
      config.reduce = comm::parse_reduce_algo(yaml_value<std::string>(root, "reduce", path));
    if (root["api_key_scope"])
      config.api_key_scope = server::parse_api_key_scope(
          yaml_value<std::string>(root, "api_key_scope", path), "key 'api_key_scope'");
  } catch (const Error& error) {
    throw_error(path, ": ", error.what());
  }
  resolve_reduce(config, path);
  if (root["seed"])
    config.seed = static_cast<uint64_t>(
        bounded<int64_t>(root, "seed", path, 0, std::numeric_limits<int64_t>::max()));
  if (root["host"]) config.host = yaml_value<std::string>(root, "host", path);
  if (root["port"]) config.port = bounded<int>(root, "port", path, 0, 65535);
  using namespace serve_limits;
  if (root["max_model_len"])
    config.max_model_len = bounded<int64_t>(root, "max_model_len", path, 0, kMaxModelLen);
  if (root["block_size"])
    config.block_size = bounded<int64_t>(root, "block_size", path, 1, kMaxBlockSize);
  if (root["num_kv_blocks"] && root["kv_cache_mb"])
    throw_error(path, ": set num_kv_blocks or kv_cache_mb, not both");
  if (root["num_kv_blocks"])
    config.num_kv_blocks = bounded<int64_t>(root, "num_kv_blocks", path, 1, kMaxKvBlocks);
  if (root["kv_cache_mb"])
    config.kv_cache_mb = bounded<int64_t>(root, "kv_cache_mb", path, 1, kMaxKvCacheMb);
  if (root["max_num_seqs"])
    config.max_num_seqs = bounded<int64_t>(root, "max_num_seqs", path, 1, kMaxNumSeqs);
  if (root["max_num_batched_tokens"])
    config.max_num_batched_tokens =
        bounded<int64_t>(root, "max_num_batched_tokens", path, 1, kMaxBatchedTokens);
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
  if (root["startup_timeout_ms"])
    config.startup_timeout_ms =
        bounded<int64_t>(root, "startup_timeout_ms", path, 1000, int64_t{1} << 40);
  if (root["health_stall_ms"])
    config.health_stall_ms = bounded<int64_t>(root, "health_stall_ms", path, 0, int64_t{1} << 40);
  if (config.health_stall_ms != 0 && config.health_stall_ms < 100)
    throw_error(path,
                ": key 'health_stall_ms' must be 0 (off) or >= 100: the watchdog looks "
                "every 100 ms");
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
  if (root["telemetry_dump_dir"]) {
    config.telemetry_dump_dir = yaml_value<std::string>(root, "telemetry_dump_dir", path);
    require_directory(config.telemetry_dump_dir, "telemetry_dump_dir", path);
  }
  if (root["telemetry_dump_interval_s"])
    config.telemetry_dump_interval_s =
        bounded<double>(root, "telemetry_dump_interval_s", path, 0.01, 86400.0);
  if (root["trace_dir"]) {
    config.trace_dir = yaml_value<std::string>(root, "trace_dir", path);
    require_directory(config.trace_dir, "trace_dir", path);
  }
  if (root["routing_capture"])
    config.routing_capture = yaml_value<std::string>(root, "routing_capture", path);
  try {
    if (root["telemetry_expert_latency"])
      config.telemetry_expert_latency = parse_expert_latency_detail(
          yaml_value<std::string>(root, "telemetry_expert_latency", path),
          "key 'telemetry_expert_latency'");
    if (root["metrics_names"])
      config.metrics_names = parse_metric_names(
          yaml_value<std::string>(root, "metrics_names", path), "key 'metrics_names'");
  } catch (const Error& error) {
    throw_error(path, ": ", error.what());
  }
  if (root["metrics_cache_s"])
    config.metrics_cache_s = bounded<double>(root, "metrics_cache_s", path, 0.0, 3600.0);
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
