// A serving config file (configs/serve/*.yaml): the deployment plus the server's limits.
//   model: checkpoint directory (relative paths are relative to the file)
//   model_name: NAME or [NAME, ...]: names requests may send, the first the one responses
//       report (default: the directory's name); the model path as written is accepted too
//   tp: 1 | 2 | 4 (thread ranks; under mpirun the process count)
//   threads: 1 (cpu threads per rank; the bits do not depend on it)
//   placement: contiguous | round_robin      combine: fp32 | round_per_expert
//   placement_file: FILE  an explicit placement (keel routes placement, or GET
//       /v1/telemetry/placement from a running server); relative to this file
//   determinism: batch_invariant | fast
//       batch_invariant: fixed_order all-reduce (+ canonical GEMMs on CUDA): a request's tokens
//       and logprobs are bit-identical whatever else is batched with it.
//       fast: the backend's native all-reduce (+ cuBLAS on CUDA): bits may change with batch
//       composition (see README, "Determinism at the API").
//   reduce: native | fixed_order  (default: the determinism mode's; batch_invariant needs
//       fixed_order)
//   seed: N   base of the seeds of requests that bring none (default: random per start)
//   api_key_scope: api | all  with an API key (--api-key or KEEL_API_KEY, never this file):
//       api leaves /health, /ping, /version and /metrics open, all closes them too
//   backend: cpu | cuda
//   host: 127.0.0.1    port: 8000
//   max_model_len: 0 (= max_position_embeddings)
//   block_size: 16     num_kv_blocks: N | kv_cache_mb: M (per rank; one of them)
//   nvfp4_activations: fp32 | w4a4  (NVFP4 checkpoints: weight-only or W4A4 emulation)
//   kv_cache_dtype: auto | fp32 | bf16 | fp8_e4m3  (auto: bf16 for bf16 weights, else fp32;
//       runtime/model/kv_cache.h; kv_cache_mb buys blocks at the dtype's bytes)
//   max_num_seqs: 64   max_num_batched_tokens: 512    prefix_caching: false
//   max_waiting: 256   (queued requests beyond which new ones get 429)
//   drain_timeout_s: 30   http_threads: 2
// Faults (README "Faults"):
//   collective_timeout_ms: 8000  a step's collective waiting longer fails the engine: every
//       in-flight request gets a 503 naming the rank, the job exits non-zero (0: forever)
//   startup_timeout_ms: 300000   process ranks: how long ranks wait for each other to reach
//       the serving loop (weights load at different speeds)
//   health_stall_ms: 1000        a collective wait this long turns /health to 503 (0: off)
//   max_body_kb: 4096
// Connections and slow clients (README, "Connections, timeouts and slow clients"):
//   max_connections: 512         regular connections; when full, the longest-idle kept-alive
//                                one (then one silent or slow for over a second) is closed to
//                                make room; past that: 429. Keep it >= max_num_seqs +
//                                max_waiting, or clients get 429 before the queue is full.
//   reserved_connections: 8      beyond max_connections, answering only /health and /metrics
//                                (anything else 429) when every other connection is busy
//   header_timeout_s: 10         connect (or a kept-alive request's first byte) to full headers
//   body_timeout_s: 30           full headers to full body
//   idle_timeout_s: 30           a kept-alive connection waiting for its next request
//   send_timeout_s: 30           one write to a client that does not read
//   max_unsent_kb: 1024          a stream's output waiting in the server for a client that
//                                stopped reading; past it the request is cancelled (aborted)
// Floats must be finite; telemetry_dump_dir and trace_dir must be existing directories.
// Telemetry (README, "Telemetry"):
//   telemetry: true              per-step phase/expert timings and routing statistics
//   near_tie_epsilon: 1.0e-4     router margins below this count as near-ties
//   telemetry_dump_dir: DIR      periodic JSONL snapshots (keel-telemetry.jsonl); unset: off
//   telemetry_dump_interval_s: 10
//   trace_dir: .                 the directory POST /v1/profile/stop writes traces in (a
//                                request's "path" is a new file under it; must exist)
//   profile_max_spans: 200000    a profile stops by itself at this many spans (~400 B each)
//   routing_capture: FILE        append every finished request's routing record to FILE
// Metrics (README, "Metrics at 397B scale"):
//   telemetry_expert_latency: layer   expert compute time in /metrics: off | layer (one
//       histogram per MoE layer) | expert (one per (layer, expert): ~1 M series at 512 x 60)
//   metrics_names: keel          keel | vllm (request-level metrics also under vLLM's names,
//       vllm: prefix, so vLLM's Grafana dashboard works unchanged)
//   metrics_cache_s: 1           /metrics serves one body to every scraper for this long
//       (0: render on every scrape); in [0, 3600]
// Unknown keys and bad values are errors naming the file and the key.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/server/auth.h"
#include "runtime/server/http_server.h"
#include "runtime/serving/serving_telemetry.h"

namespace keel {

enum class Determinism : uint8_t { kBatchInvariant, kFast };
std::string_view determinism_name(Determinism determinism);
// "batch_invariant" | "fast"; throws keel::Error naming `what` otherwise.
Determinism parse_determinism(std::string_view name, std::string_view what);

// Bounds shared by the config keys and keel serve's flags.
namespace serve_limits {
inline constexpr int kMaxTp = 8;
inline constexpr int64_t kMaxModelLen = int64_t{1} << 30;
inline constexpr int64_t kMaxBlockSize = 1024;
inline constexpr int64_t kMaxKvBlocks = int64_t{1} << 30;
inline constexpr int64_t kMaxKvCacheMb = int64_t{1} << 30;
inline constexpr int64_t kMaxNumSeqs = 1 << 20;
inline constexpr int64_t kMaxBatchedTokens = int64_t{1} << 24;
}  // namespace serve_limits

struct ServeConfig {
  // A serve default of 8 s: a dead or stalled rank is found within the 10 s the README promises
  // (the leader's watchdog reports the stall sooner; this is when the engine gives up).
  ServeConfig() { engine.collective_timeout_ms = 8000; }

  std::string model_dir;                 // resolved (a config file's relative path: from the file)
  std::string model_given;               // as the user wrote it (addressable as a model name)
  std::vector<std::string> model_names;  // empty: the directory's name
  bool tp_given = false;
  EngineOptions engine;
  Determinism determinism = Determinism::kBatchInvariant;
  // The all-reduce asked for; engine.reduce holds the one in effect (resolve_reduce).
  std::optional<comm::ReduceAlgo> reduce;
  std::optional<uint64_t> seed;
  std::string api_key;  // empty: no authentication
  server::ApiKeyScope api_key_scope = server::ApiKeyScope::kApi;
  std::string host = "127.0.0.1";
  int port = 8000;
  int64_t max_model_len = 0;
  int64_t block_size = 16;
  int64_t num_kv_blocks = 0;  // 0: from kv_cache_mb
  int64_t kv_cache_mb = 256;
  int64_t max_num_seqs = 64;
  int64_t max_num_batched_tokens = 512;
  bool prefix_caching = false;
  int64_t max_waiting = 256;
  double drain_timeout_s = 30;
  int64_t startup_timeout_ms = 300000;
  int64_t health_stall_ms = 1000;
  int http_threads = 2;
  int64_t max_body_kb = 4096;
  int64_t max_connections = 512;
  int64_t reserved_connections = 8;
  double header_timeout_s = 10;
  double body_timeout_s = 30;
  double idle_timeout_s = 30;
  double send_timeout_s = 30;
  int64_t max_unsent_kb = 1024;
  bool telemetry = true;
  double near_tie_epsilon = 1e-4;
  std::string telemetry_dump_dir;
  double telemetry_dump_interval_s = 10;
  std::string trace_dir = ".";
  int64_t profile_max_spans = 200000;
  std::string routing_capture;
  ExpertLatencyDetail telemetry_expert_latency = ExpertLatencyDetail::kLayer;
  MetricNames metrics_names = MetricNames::kKeel;
  double metrics_cache_s = 1;
};

// The most spans profile_max_spans (and --profile-max-spans) may ask for: ~40 GB of spans.
inline constexpr int64_t kMaxProfileSpans = int64_t{100} * 1000 * 1000;

// kOptional: the file may leave `model` out (keel serve MODEL_DIR --config FILE).
enum class ModelKey : uint8_t { kRequired, kOptional };
ServeConfig load_serve_config(const std::string& path, ModelKey model_key = ModelKey::kRequired);

// Sets engine.reduce from `reduce` (else the determinism mode's own) and refuses
// batch_invariant with native, naming `where`.
void resolve_reduce(ServeConfig& config, const std::string& where);

// KV blocks per rank from num_kv_blocks or kv_cache_mb at `block_bytes` per block (K and V),
// refused with the key named when the scheduler cannot count them or, for ranks in host memory
// (`host_memory`), when `num_local_ranks` pools would not fit in the machine's memory.
int64_t num_kv_blocks_for(const ServeConfig& config, int64_t block_bytes, int num_local_ranks,
                          bool host_memory);

// The HTTP server's limits from the config: host, port, threads, body size, connections,
// timeouts and the unsent-output bound.
void apply_http_limits(const ServeConfig& config, server::HttpServerConfig& http);

}  // namespace keel
