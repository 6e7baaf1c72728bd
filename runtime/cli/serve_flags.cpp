#include "runtime/cli/serve_flags.h"

#include <limits>
#include <vector>

#include "runtime/cli/flags.h"
#include "runtime/engine/deployment.h"
#include "runtime/serving/metric_export.h"

namespace keel {
namespace {

using flags::UsageError;

constexpr const char* kSummary =
    "usage: keel serve MODEL_DIR [flags]\n"
    "       keel serve --config configs/serve/NAME.yaml [MODEL_DIR] [flags]\n"
    "OpenAI-compatible HTTP server with continuous batching over a paged KV cache. Flags\n"
    "replace the config file's keys; without a file the defaults are those of a file naming\n"
    "only the model. --served-model-name takes every following word: put MODEL_DIR first.\n";

// What keel serve reads from the command line, each bound to one flag; defaults are the
// config's (shown by --help), applied only for flags that were given.
struct Values {
  explicit Values(const ServeConfig& defaults)
      : host(defaults.host),
        port(defaults.port),
        tp(defaults.engine.tp_size),
        threads(defaults.engine.threads_per_rank),
        max_model_len(defaults.max_model_len),
        max_num_seqs(defaults.max_num_seqs),
        max_num_batched_tokens(defaults.max_num_batched_tokens),
        block_size(defaults.block_size),
        kv_cache_mb(defaults.kv_cache_mb),
        determinism(determinism_name(defaults.determinism)),
        placement(placement_kind_name(defaults.engine.placement.kind)),
        combine(combine_precision_name(defaults.engine.combine)),
        backend(device_name(defaults.engine.device)),
        nvfp4_activations(nvfp4_activations_name(defaults.engine.nvfp4_activations)),
        kv_cache_dtype(kv_cache_dtype_name(defaults.engine.kv_cache_dtype)),
        api_key_scope(server::api_key_scope_name(defaults.api_key_scope)) {}

  std::vector<std::string> positionals;
  std::string config_path;
  std::string model;
  std::vector<std::string> served_model_names;
  std::string host;
  int64_t port;
  int tp;
  int threads;
  int64_t max_model_len;
  int64_t max_num_seqs;
  int64_t max_num_batched_tokens;
  int64_t block_size;
  int64_t kv_cache_mb;
  bool prefix_caching = false;
  int64_t seed = 0;
  std::string determinism;
  std::string reduce;
  std::string placement;
  std::string placement_file;
  std::string combine;
  std::string backend;
  std::string nvfp4_activations;
  std::string kv_cache_dtype;
  std::string api_key;
  std::string api_key_scope;
  std::string metrics_names;
  int64_t profile_max_spans = 0;
  bool verbose = false;
};

void register_flags(flags::FlagSet& set, Values& v) {
  using namespace serve_limits;
  set.add_positionals(&v.positionals, "MODEL_DIR");
  set.add_string("--config", &v.config_path, "FILE", "serve config (configs/serve/)");
  set.add_string("--model", &v.model, "DIR", "checkpoint, as MODEL_DIR (config: model)");
  set.add_words("--served-model-name", &v.served_model_names, "NAME",
                "names requests may use, the first reported (config: model_name; default: the "
                "directory's name; the path given is always accepted)");
  set.add_int("--tensor-parallel-size", &v.tp, "N", "tensor-parallel ranks (config: tp)")
      .range(1, kMaxTp);
  set.add_alias("--tp", "--tensor-parallel-size");
  set.add_int("--threads", &v.threads, "N", "cpu threads per rank (config: threads)").range(1, 256);
  set.add_string("--host", &v.host, "H", "listen address (config: host)");
  set.add_int("--port", &v.port, "P", "listen port, 0 = any free (config: port)").range(0, 65535);
  set.add_int("--max-model-len", &v.max_model_len, "N",
              "context limit, 0 = the model's (config: max_model_len)")
      .range(0, static_cast<double>(kMaxModelLen));
  set.add_int("--max-num-seqs", &v.max_num_seqs, "N",
              "sequences running at once (config: max_num_seqs)")
      .range(1, static_cast<double>(kMaxNumSeqs));
  set.add_int("--max-num-batched-tokens", &v.max_num_batched_tokens, "N",
              "tokens per step; prefill is chunked to fit (config: max_num_batched_tokens)")
      .range(1, static_cast<double>(kMaxBatchedTokens));
  set.add_int("--block-size", &v.block_size, "N", "KV block tokens (config: block_size)")
      .range(1, static_cast<double>(kMaxBlockSize));
  set.add_int("--kv-cache-mb", &v.kv_cache_mb, "M", "KV pool per rank in MiB (config: kv_cache_mb)")
      .range(1, static_cast<double>(kMaxKvCacheMb));
  set.add_string("--kv-cache-dtype", &v.kv_cache_dtype, "auto|fp32|bf16|fp8_e4m3",
                 "KV cache storage; vLLM's fp8 and bfloat16 are fp8_e4m3 and bf16 "
                 "(config: kv_cache_dtype)");
  set.add_switch("--enable-prefix-caching", &v.prefix_caching,
                 "reuse cached prompt prefixes (config: prefix_caching)");
  set.add_switch("--no-enable-prefix-caching", &v.prefix_caching, "no prefix cache", false);
  set.add_int("--seed", &v.seed, "N",
              "base of the seeds of requests that bring none (config: seed; default random)")
      .at_least(0)
      .shown_default("");
  set.add_choice("--determinism", &v.determinism, {"batch_invariant", "fast"},
                 "reproducibility contract (config: determinism)");
  set.add_choice("--reduce", &v.reduce, {"native", "fixed_order"},
                 "all-reduce; batch_invariant needs fixed_order (config: reduce; default: the "
                 "determinism's)")
      .shown_default("");
  set.add_choice("--placement", &v.placement, {"contiguous", "round_robin"},
                 "expert placement (config: placement)");
  set.add_string("--placement-file", &v.placement_file, "FILE",
                 "explicit expert placement YAML (config: placement_file)");
  set.add_choice("--combine", &v.combine, {"fp32", "round_per_expert"},
                 "expert output combine (config: combine)");
  set.add_choice("--backend", &v.backend, {"cpu", "cuda"}, "compute backend (config: backend)");
  set.add_choice("--nvfp4-activations", &v.nvfp4_activations, {"fp32", "w4a4"},
                 "NVFP4 activations (config: nvfp4_activations)");
  set.add_string("--api-key", &v.api_key, "KEY",
                 "require 'Authorization: Bearer KEY' (or env KEEL_API_KEY; a flag shows in ps)");
  set.add_choice("--api-key-scope", &v.api_key_scope, {"api", "all"},
                 "api: /health, /ping, /version, /metrics stay open; all: closed too "
                 "(config: api_key_scope)");
  set.add_choice("--metrics-names", &v.metrics_names, {"keel", "vllm"},
                 "request metrics also under vLLM's names (config: metrics_names)");
  set.add_int("--profile-max-spans", &v.profile_max_spans, "N",
              "a profile stops by itself at N spans (config: profile_max_spans)")
      .range(1, kMaxProfileSpans);
  set.add_switch("--verbose", &v.verbose, "debug logging");
}

// keel's KV dtypes, with vLLM's spellings of the same ones; vLLM's others are refused by name.
KvCacheDType kv_cache_dtype_flag(const std::string& value) {
  if (value == "fp8") return KvCacheDType::kFp8E4M3;
  if (value == "bfloat16") return KvCacheDType::kBF16;
  if (value == "fp8_e5m2" || value == "fp8_inc" || value == "fp8_ds_mla")
    throw UsageError("--kv-cache-dtype: '" + value +
                     "' is not implemented by keel (it stores auto, fp32, bf16 or fp8_e4m3)");
  try {
    return parse_kv_cache_dtype(value, "--kv-cache-dtype");
  } catch (const Error& error) {
    throw UsageError(error.what());
  }
}

std::string model_from_command_line(const flags::FlagSet& set, const Values& v) {
  if (v.positionals.size() > 1)
    throw UsageError("keel serve takes one MODEL_DIR, got " + std::to_string(v.positionals.size()) +
                     " words ('" + v.positionals[1] +
                     "' ...); --served-model-name takes every word after it, so put MODEL_DIR "
                     "first");
  const std::string positional = v.positionals.empty() ? "" : v.positionals.front();
  if (!positional.empty() && set.given("--model") && positional != v.model)
    throw UsageError("keel serve: the model is given twice ('" + positional + "' and --model '" +
                     v.model + "')");
  return positional.empty() ? v.model : positional;
}

}  // namespace

ServeCommand parse_serve_command(int argc, const char* const* argv, int first,
                                 const char* env_api_key) {
  ServeCommand command;
  Values v(command.config);
  flags::FlagSet set("keel serve", kSummary);
  register_flags(set, v);
  if (!set.parse(argc, argv, first)) {
    command.help = true;
    command.help_text = set.help();
    return command;
  }
  command.verbose = v.verbose;
  const std::string model = model_from_command_line(set, v);
  if (set.given("--config")) {
    command.config =
        load_serve_config(v.config_path, model.empty() ? ModelKey::kRequired : ModelKey::kOptional);
  } else if (model.empty()) {
    throw UsageError("keel serve needs MODEL_DIR (or --config FILE naming model:); see --help");
  }
  ServeConfig& config = command.config;
  if (!model.empty()) config.model_dir = config.model_given = model;
  auto given = [&](const char* name) { return set.given(name); };
  if (given("--served-model-name")) config.model_names = v.served_model_names;
  if (given("--tensor-parallel-size")) {
    config.engine.tp_size = v.tp;
    config.tp_given = true;
  }
  if (given("--threads")) config.engine.threads_per_rank = v.threads;
  if (given("--host")) config.host = v.host;
  if (given("--port")) config.port = static_cast<int>(v.port);
  if (given("--max-model-len")) config.max_model_len = v.max_model_len;
  if (given("--max-num-seqs")) config.max_num_seqs = v.max_num_seqs;
  if (given("--max-num-batched-tokens")) config.max_num_batched_tokens = v.max_num_batched_tokens;
  if (given("--block-size")) config.block_size = v.block_size;
  if (given("--kv-cache-mb")) {
    config.kv_cache_mb = v.kv_cache_mb;
    config.num_kv_blocks = 0;  // the flag replaces the file's num_kv_blocks as well
  }
  if (given("--kv-cache-dtype"))
    config.engine.kv_cache_dtype = kv_cache_dtype_flag(v.kv_cache_dtype);
  if (given("--enable-prefix-caching") || given("--no-enable-prefix-caching"))
    config.prefix_caching = v.prefix_caching;
  if (given("--seed")) config.seed = static_cast<uint64_t>(v.seed);
  if (given("--determinism"))
    config.determinism = parse_determinism(v.determinism, "--determinism");
  if (given("--reduce")) config.reduce = comm::parse_reduce_algo(v.reduce);
  if (given("--determinism") || given("--reduce")) {
    try {
      resolve_reduce(config, "keel serve");
    } catch (const Error& error) {
      throw UsageError(error.what());
    }
  }
  if (given("--placement") && given("--placement-file"))
    throw UsageError("give --placement or --placement-file, not both");
  if (given("--placement")) config.engine.placement = {parse_placement_kind(v.placement), {}};
  if (given("--placement-file")) config.engine.placement = load_placement_file(v.placement_file);
  if (given("--combine")) config.engine.combine = parse_combine_precision(v.combine);
  if (given("--backend")) config.engine.device = parse_device(v.backend);
  if (given("--nvfp4-activations"))
    config.engine.nvfp4_activations =
        parse_nvfp4_activations(v.nvfp4_activations, "--nvfp4-activations");
  if (given("--profile-max-spans")) config.profile_max_spans = v.profile_max_spans;
  if (given("--metrics-names"))
    config.metrics_names = parse_metric_names(v.metrics_names, "--metrics-names");
  if (given("--api-key-scope"))
    config.api_key_scope = server::parse_api_key_scope(v.api_key_scope, "--api-key-scope");
  if (given("--api-key")) {
    if (v.api_key.empty()) throw UsageError("--api-key is empty");
    config.api_key = v.api_key;
  } else if (env_api_key != nullptr && *env_api_key != '\0') {
    config.api_key = env_api_key;
  }
  for (const std::string& name : config.model_names)
    if (name.empty()) throw UsageError("--served-model-name: a name is empty");
  return command;
}

}  // namespace keel
