// The keel command line: gen-model, generate, serve, calibrate, plan, simulate, bench serve,
// experts, profile tail and routes (the last ones live in their *_cmd.cpp libraries). Every
// command parses its flags with the one parser (runtime/cli/flags.h); errors print one line
// naming what is wrong and exit non-zero; nothing here aborts on bad input. `generate` and
// `serve` share the engine's step loop, scheduler and sampler (runtime/engine/engine.h).
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/mpi_comm.h"
#ifdef KEEL_WITH_NCCL
#include "comm/nccl/nccl_comm.h"
#endif
#ifdef KEEL_WITH_CUDA
#include "comm/single_gpu/single_gpu_comm.h"
#endif
#include "kernels/base/check.h"
#include "kernels/cpu/gemm.h"
#include "runtime/cli/client_cmds.h"
#include "runtime/cli/flags.h"
#include "runtime/cli/plan_cmd.h"
#include "runtime/cli/routes_cmd.h"
#include "runtime/cli/serve_flags.h"
#include "runtime/cli/simulate_cmd.h"
#include "runtime/common/build_info.h"
#include "runtime/common/logging.h"
#include "runtime/engine/deployment.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/weights_digest.h"
#include "runtime/server/http_server.h"
#include "runtime/serving/calibrate.h"
#include "runtime/serving/http_metrics.h"
#include "runtime/serving/replay.h"
#include "runtime/serving/serve_config.h"
#include "runtime/serving/serving_engine.h"
#include "runtime/serving/system_fingerprint.h"
#include "runtime/telemetry/trace.h"
#include "runtime/tools/loadgen/loadgen.h"

namespace {

using keel::throw_error;

constexpr const char* kUsage = R"(keel: tensor-parallel MoE inference with reproducible routing

usage:
  keel --version
      The build's git revision (12-digit commit, "-dirty" for uncommitted changes).
  keel gen-model --preset NAME --out DIR [--seed N] [--max-shard-mb M] [--quant FORMAT]
      Write a synthetic checkpoint (HF config.json + safetensors) from configs/models/NAME.yaml.
  keel generate --model DIR [--config deployment.yaml] [--tp 1|2|4] [--threads N]
                [--reduce native|fixed_order] [--placement contiguous|round_robin|explicit]
                [--combine fp32|round_per_expert] [--prompt-ids 1,2,3] [--max-tokens N]
                [--batch-with N] [--collective-timeout-ms MS] [--backend cpu|cuda] [--json]
                [--trace FILE] [--verbose]
      Greedy generation on thread ranks, or one rank per process when started by mpirun:
        mpirun -np 4 keel generate --model DIR --reduce fixed_order --json
      A collective that waits over --collective-timeout-ms (default 120000; 0 = forever) for
      its peers ends the run with an error naming the rank instead of hanging.
      --backend cuda: one GPU per process (mpirun -np 4 ... --backend cuda), NCCL collectives;
      without a CUDA device it exits with an error saying why.
      --batch-with N batches the prompt with N synthetic prompts (the prompt goes last);
      tokens and the digest are the prompt's own.
  keel serve MODEL_DIR [--tp N] [--served-model-name NAME ...] [--max-model-len N]
             [--max-num-seqs N] [--max-num-batched-tokens N] [--block-size N]
             [--kv-cache-dtype D] [--api-key KEY] [--host H] [--port P] [--seed N]
             [--determinism batch_invariant|fast] [--placement P] [--reduce R]
             [--metrics-names keel|vllm] [--api-key-scope api|all]
  keel serve --config configs/serve/NAME.yaml [MODEL_DIR] [flags] (see keel serve --help)
      OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
      /tokenize, /detokenize, /version, /health, /ping, /metrics) with continuous batching
      over a paged KV cache; vLLM's flag names, flags over the config file's keys. Prints
      "keel serve: listening on http://HOST:PORT ..." once ready (--port 0: any free port).
      SIGTERM/SIGINT: stop accepting, finish in-flight requests (drain_timeout_s), exit 0.
      Under mpirun (mpirun -np 4 keel serve --config F) rank 0 serves HTTP and leads the steps.
      Telemetry: GET /metrics (Prometheus; --metrics-names vllm adds vLLM's names),
      /v1/telemetry/experts|requests|steps,
      POST /v1/profile/start|stop (Chrome trace); "return_routing": true in a request.
  keel bench serve --url URL (--rate R [--burstiness B] | --concurrency C) --num-prompts N
                   --input-len L|MIN:MAX --output-len L|MIN:MAX [--dataset JSONL] [--seed S]
                   [--goodput ttft:MS tpot:MS] [--save-json F] [--plot PNG] [--ignore-eos]
      Load generator for any OpenAI-compatible server (vLLM's metric names).
  keel experts --url URL [--top N] [--png FILE] [--json]
      Per-layer expert load, balance, near-ties and slowest experts of a running server.
  keel profile tail --url URL [--percentile 99] [--save F] [--json]
      Why the slowest requests were slow: queueing, prefill, slow phases, all-reduce stalls,
      hot experts, preemptions, ranked by contribution.
  keel plan --model configs/models/qwen3.5-397b-a17b.yaml
            --hardware configs/hardware/4x-rtx-pro-6000.yaml --quant nvfp4 --tp 4
            --context 32768 [--kv-dtype fp8] [--prompt-len N] [--json] (see keel plan --help)
      Does it fit, how many sequences at that context, decode tok/s vs batch, prefill/TTFT,
      and the bottleneck of each regime, with the arithmetic shown.
  keel simulate --config serve.yaml (--calibration FILE | --cost roofline --model M --hardware H
                --quant Q | --cost linear ...) (--rate R [--burstiness B] --num-requests N
                --input-len DIST --output-len DIST | --trace FILE) [--zipf S | --routing-trace F]
                [--placement P] [--redundant-experts R] [--slo ttft:MS tpot:MS]
                [--sweep-rate MIN:MAX] [--json] [--save-json F] [--plot PNG]
      Discrete-event serving simulation through keel's own scheduler and KV block manager.
  keel calibrate --config serve.yaml --out FILE [--decode-list 1,2,4,8,16,32]
                 [--prefill-list 0,64,256] [--context-list 64,512] [--repeats 5]
      Measure this deployment's engine step times on a grid of step shapes (the file
      keel simulate --calibration interpolates).
  keel calibrate (--from-url URL | --from-steps FILE) --out FILE [--min-samples 1]
                 [--first-step ID] [--last-step ID]
      The same file from a running keel server's own step records (its steps as served).
  keel routes diff A B | stats FILE | replay FILE [--model DIR]
      Routing records: first divergence and flip counts; per-expert load, co-activation,
      near-tie rate; re-run with the recorded experts forced and check the bits.
)";

// Flags of one subcommand, parsed by keel_flags (runtime/cli/flags.h) and queried by name;
// fallbacks are given where a value is used because several come from a --config file (so
// the help text states each default itself).
class Flags {
 public:
  enum class Kind { kText, kInteger, kIdList, kSwitch };
  struct Spec {
    const char* name;
    Kind kind;
    const char* metavar;
    const char* help;
  };

  Flags(int argc, char** argv, int first, const std::string& command, const char* summary,
        const std::vector<Spec>& specs)
      : flags_(command, summary) {
    for (const Spec& spec : specs) {
      switch (spec.kind) {
        case Kind::kText:
          flags_.add_string(spec.name, &text_[spec.name], spec.metavar, spec.help);
          break;
        case Kind::kInteger:
          flags_.add_int(spec.name, &integers_[spec.name], spec.metavar, spec.help)
              .shown_default("");
          break;
        case Kind::kIdList:  // token ids and step-shape lists: non-negative int32 values
          flags_.add_int_list(spec.name, &lists_[spec.name], spec.metavar, spec.help)
              .range(0, std::numeric_limits<int32_t>::max())
              .shown_default("");
          break;
        case Kind::kSwitch:
          flags_.add_switch(spec.name, &switches_[spec.name], spec.help);
          break;
      }
    }
    if (!flags_.parse(argc, argv, first)) {
      std::cout << flags_.help();
      std::exit(0);
    }
  }
  bool has(const std::string& name) const { return flags_.given(name); }
  std::string get(const std::string& name, const std::string& fallback = "") const {
    return has(name) ? text_.at(name) : fallback;
  }
  int64_t integer(const std::string& name, int64_t fallback) const {
    return has(name) ? integers_.at(name) : fallback;
  }
  std::vector<int64_t> list(const std::string& name, std::vector<int64_t> fallback) const {
    return has(name) ? lists_.at(name) : fallback;
  }

 private:
  keel::flags::FlagSet flags_;
  // std::map: the parser holds pointers to these values, which must not move.
  std::map<std::string, std::string> text_;
  std::map<std::string, int64_t> integers_;
  std::map<std::string, std::vector<int64_t>> lists_;
  std::map<std::string, bool> switches_;
};

using Kind = Flags::Kind;

// --threads N (cpu threads per rank), range-checked; `fallback` when absent.
int threads_flag(const Flags& flags, int fallback) {
  const int64_t threads = flags.integer("--threads", fallback);
  if (threads < 1 || threads > 256) throw_error("--threads must be in [1, 256], got ", threads);
  return static_cast<int>(threads);
}

// Under mpirun every process is one rank; without it the ranks are threads of this process.
struct ProcessRanks {
  std::unique_ptr<keel::comm::MpiSession> mpi_session;
  std::unique_ptr<keel::comm::Communicator> process_comm;

  // How `serve` sets up its communicator (README "Faults"): collectives wait up to
  // startup_timeout_ms until every rank reached the serving loop (the engine then tightens it);
  // on a timeout the leader throws, so it can answer its clients before ending the job, while
  // the other ranks abort the job as `generate` does.
  struct ServePolicy {
    int64_t startup_timeout_ms = 0;
  };

  // Starts process ranks when launched by mpirun (or for CUDA); false: use thread ranks.
  bool start(keel::EngineOptions& options, std::optional<ServePolicy> serve = std::nullopt) {
    if (!keel::comm::mpi_launched() && options.device != keel::Device::kCuda) return false;
    // CUDA ranks are processes too (one GPU each, NCCL bootstrapped over MPI); a single GPU
    // without mpirun is an MPI singleton of size 1.
    mpi_session = std::make_unique<keel::comm::MpiSession>();
    if (options.device == keel::Device::kCuda) {
#if defined(KEEL_WITH_NCCL)
      options.cuda_device = keel::comm::mpi_node_local_rank(MPI_COMM_WORLD);
      keel::comm::NcclCommOptions nccl_options;
      nccl_options.timeout = std::chrono::milliseconds(serve ? serve->startup_timeout_ms
                                                             : options.collective_timeout_ms);
      process_comm = std::make_unique<keel::comm::NcclCommunicator>(
          MPI_COMM_WORLD, options.cuda_device, nccl_options);
#elif defined(KEEL_WITH_CUDA)
      // Built without NCCL: one GPU is still a complete TP group (every collective over one
      // rank is the identity); more ranks need NCCL.
      int world_size = 1;
      MPI_Comm_size(MPI_COMM_WORLD, &world_size);
      if (world_size != 1)
        keel::throw_error("--backend cuda with ", world_size,
                          " ranks needs NCCL, and this keel was built without it (KEEL_NCCL)");
      options.cuda_device = 0;
      process_comm = std::make_unique<keel::comm::SingleGpuCommunicator>();
#else
      keel::throw_error("--backend cuda: this keel was built without CUDA");
#endif
    } else {
      keel::comm::MpiCommOptions mpi_options;
      mpi_options.timeout = std::chrono::milliseconds(serve ? serve->startup_timeout_ms
                                                            : options.collective_timeout_ms);
      int world_rank = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
      if (serve && world_rank == 0)
        mpi_options.on_timeout = keel::comm::MpiCommOptions::OnTimeout::kThrow;
      process_comm = std::make_unique<keel::comm::MpiCommunicator>(MPI_COMM_WORLD, mpi_options);
    }
    keel::set_current_rank(process_comm->rank());
    options.process_communicator = process_comm.get();
    return true;
  }

  template <typename Fn>
  int run_or_abort(const char* command, Fn&& fn) {
    try {
      const int exit_code = fn();
      // A rank that failed after its clients were told (serve's leader) leaves peers inside
      // collectives: end the whole job with its exit code.
      if (exit_code != 0) {
        std::fflush(stdout);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, exit_code);
      }
      return exit_code;
    } catch (const std::exception& error) {
      // Peers are inside collectives waiting for this rank: end the whole job now.
      std::fprintf(stderr, "keel %s: rank %d: error: %s\n", command, process_comm->rank(),
                   error.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
      return 1;
    }
  }
};

int run_generate(const Flags& flags, keel::Deployment& deployment);

int gen_model(int argc, char** argv) {
  Flags flags(argc, argv, 2, "keel gen-model",
              "usage: keel gen-model --preset NAME --out DIR [flags]\n"
              "Write a synthetic checkpoint (HF config.json + safetensors) from "
              "configs/models/NAME.yaml.\n",
              {{"--preset", Kind::kText, "NAME", "model preset (name or YAML path)"},
               {"--out", Kind::kText, "DIR", "checkpoint directory to write"},
               {"--seed", Kind::kInteger, "N", "weights seed (default 0)"},
               {"--max-shard-mb", Kind::kInteger, "M", "split safetensors shards at M MiB"},
               {"--quant", Kind::kText, "none|nvfp4|nvfp4-ct|fp8|awq|gptq|mxfp4",
                "weight format (default none: the preset dtype)"},
               {"--quant-scope", Kind::kText, "default|experts|linear",
                "Linears to quantize (default: fp8 linear, the rest experts)"},
               {"--group-size", Kind::kInteger, "G",
                "awq/gptq group size (default: largest of 128/64/32/16 dividing every K)"},
               {"--gptq-desc-act", Kind::kSwitch, "", "gptq act order (permuted g_idx)"},
               {"--gptq-asym", Kind::kSwitch, "", "gptq asymmetric zero points (default sym)"},
               {"--fp8-scale-dtype", Kind::kText, "bf16|f32",
                "fp8 weight_scale_inv dtype (default bf16, as Qwen3.x)"},
               {"--verbose", Kind::kSwitch, "", "debug logging"}});
  if (!flags.has("--preset") || !flags.has("--out"))
    throw_error("gen-model needs --preset and --out");
  keel::ModelPreset preset =
      keel::load_model_preset(keel::find_model_preset(flags.get("--preset")));
  keel::GenModelOptions options;
  options.seed = static_cast<uint64_t>(flags.integer("--seed", 0));
  options.max_shard_bytes = flags.integer("--max-shard-mb", 0) * 1024 * 1024;
  options.quant.format = keel::parse_quant_format(flags.get("--quant", "none"));
  options.quant.scope = keel::parse_quant_scope(flags.get("--quant-scope", "default"));
  options.quant.group_size = flags.integer("--group-size", 0);
  if (flags.has("--group-size") && options.quant.group_size <= 0)
    throw_error("--group-size must be positive");
  options.quant.gptq_desc_act = flags.has("--gptq-desc-act");
  options.quant.gptq_sym = !flags.has("--gptq-asym");
  const std::string scale_dtype = flags.get("--fp8-scale-dtype", "bf16");
  if (scale_dtype != "bf16" && scale_dtype != "f32")
    throw_error("unknown --fp8-scale-dtype ", scale_dtype, " (choices: bf16, f32)");
  options.quant.fp8_scale_dtype = scale_dtype == "f32" ? keel::DType::kF32 : keel::DType::kBF16;
  keel::generate_model(preset, options, flags.get("--out"));
  std::printf("wrote %s: preset %s, %.3f B parameters, seed %llu\n", flags.get("--out").c_str(),
              preset.name.c_str(), static_cast<double>(preset.num_parameters()) * 1e-9,
              static_cast<unsigned long long>(options.seed));
  if (options.quant.format != keel::QuantFormat::kNone)
    std::printf("quantized: %s\n",
                std::string(keel::quant_format_name(options.quant.format)).c_str());
  return 0;
}

int generate(int argc, char** argv) {
  Flags flags(
      argc, argv, 2, "keel generate",
      "usage: keel generate --model DIR [flags]\n"
      "Greedy generation on thread ranks, or one rank per process when started by mpirun.\n",
      {{"--model", Kind::kText, "DIR", "checkpoint (or model: in --config)"},
       {"--config", Kind::kText, "deployment.yaml", "deployment settings"},
       {"--tp", Kind::kInteger, "1|2|4", "tensor-parallel ranks"},
       {"--threads", Kind::kInteger, "N", "cpu threads per rank (default 1; same bits at any N)"},
       {"--reduce", Kind::kText, "native|fixed_order", "all-reduce algorithm"},
       {"--placement", Kind::kText, "contiguous|round_robin|explicit", "expert placement"},
       {"--combine", Kind::kText, "fp32|round_per_expert", "expert output combine"},
       {"--kv-cache-dtype", Kind::kText, "auto|fp32|bf16|fp8_e4m3",
        "KV cache storage (default auto: bf16 for bf16 weights, else fp32)"},
       {"--nvfp4-activations", Kind::kText, "fp32|w4a4",
        "NVFP4 checkpoints: weight-only fp32 (default) or W4A4 emulation"},
       {"--prompt-ids", Kind::kIdList, "1,2,3", "prompt token ids (default 1,2,3)"},
       {"--max-tokens", Kind::kInteger, "N", "tokens to generate (default 16)"},
       {"--batch-with", Kind::kInteger, "N", "batch with N synthetic prompts, [0, 1024]"},
       {"--collective-timeout-ms", Kind::kInteger, "MS", "0 = forever (default 120000)"},
       {"--backend", Kind::kText, "cpu|cuda", "compute backend (default cpu)"},
       {"--trace", Kind::kText, "FILE", "Chrome trace of the ranks"},
       {"--json", Kind::kSwitch, "", "one JSON object on stdout"},
       {"--verbose", Kind::kSwitch, "", "debug logging"}});
  keel::init_logging(flags.has("--verbose"));
  keel::Deployment deployment;
  if (flags.has("--config")) deployment = keel::load_deployment(flags.get("--config"));
  if (flags.has("--model")) deployment.model_dir = flags.get("--model");
  if (deployment.model_dir.empty())
    throw_error("generate needs --model DIR (or model: in --config)");
  keel::EngineOptions& options = deployment.engine;
  options.tp_size = static_cast<int>(flags.integer("--tp", options.tp_size));
  options.threads_per_rank = threads_flag(flags, options.threads_per_rank);
  options.collective_timeout_ms = flags.integer("--collective-timeout-ms", 120000);
  if (options.collective_timeout_ms < 0) throw_error("--collective-timeout-ms must be >= 0");

  options.device = keel::parse_device(flags.get("--backend", "cpu"));
  if (options.device == keel::Device::kCuda) {
    std::string reason;
    if (keel::cuda_device_count(&reason) == 0)
      throw_error("--backend cuda: no CUDA device: ", reason);
  }

  ProcessRanks ranks;
  if (ranks.start(options)) {
    if (!flags.has("--tp") && !deployment.tp_given) options.tp_size = 0;
    return ranks.run_or_abort("generate", [&] { return run_generate(flags, deployment); });
  }
  return run_generate(flags, deployment);
}

int run_generate(const Flags& flags, keel::Deployment& deployment) {
  keel::EngineOptions& options = deployment.engine;
  if (flags.has("--reduce")) options.reduce = keel::comm::parse_reduce_algo(flags.get("--reduce"));
  if (flags.has("--placement"))
    options.placement.kind = keel::parse_placement_kind(flags.get("--placement"));
  if (flags.has("--combine"))
    options.combine = keel::parse_combine_precision(flags.get("--combine"));
  if (flags.has("--kv-cache-dtype"))
    options.kv_cache_dtype =
        keel::parse_kv_cache_dtype(flags.get("--kv-cache-dtype"), "--kv-cache-dtype");
  if (flags.has("--nvfp4-activations"))
    options.nvfp4_activations =
        keel::parse_nvfp4_activations(flags.get("--nvfp4-activations"), "--nvfp4-activations");
  if (options.placement.kind == keel::PlacementKind::kExplicit &&
      options.placement.explicit_ranks.empty())
    throw_error("--placement explicit needs explicit_placement in a --config file");
  int64_t batch_with = flags.integer("--batch-with", 0);
  if (batch_with < 0 || batch_with > 1024) throw_error("--batch-with must be in [0, 1024]");

  keel::Engine engine(deployment.model_dir, options);
  keel::GenerateRequest request;
  request.max_new_tokens = flags.integer("--max-tokens", 16);
  // The prompt joins its batch-mates last, as a request joining a running batch would: its rows
  // then sit at the end of every activation message, where message-size-dependent reductions
  // (native all-reduce chunking) treat them differently from a batch of one.
  request.prompts = keel::synthetic_prompts(batch_with, engine.config().vocab_size, 7);
  const std::vector<int64_t> prompt_ids = flags.list("--prompt-ids", {1, 2, 3});
  request.prompts.emplace_back(prompt_ids.begin(), prompt_ids.end());
  request.digest_prompt_idx = batch_with;
  request.trace = flags.has("--trace");
  spdlog::info("model {} on tp={} reduce={} placement={}", deployment.model_dir, engine.tp_size(),
               keel::comm::reduce_algo_name(options.reduce),
               keel::placement_kind_name(options.placement.kind));
  keel::GenerateResult result = engine.generate(request);
  if (request.trace) {
    // One file per process: thread ranks all land in it; under mpirun each rank writes
    // FILE.rankN.json with its own track.
    std::vector<keel::telemetry::TraceSpan> spans;
    for (size_t rank = 0; rank < result.rank_traces.size(); ++rank)
      for (const keel::TraceEvent& event : result.rank_traces[rank]) {
        keel::telemetry::TraceSpan span;
        span.rank = static_cast<int32_t>(rank);
        span.name = event.expert >= 0 ? "expert " + std::to_string(event.expert)
                                      : std::string(keel::phase_name(event.phase));
        span.category = event.phase == keel::Phase::kAllReduce ? "comm" : "compute";
        span.start_us = event.start_s * 1e6;
        span.dur_us = event.seconds * 1e6;
        span.args = {{"layer", event.layer}};
        spans.push_back(std::move(span));
      }
    std::string path = flags.get("--trace");
    if (options.process_communicator != nullptr)
      path += ".rank" + std::to_string(options.process_communicator->rank()) + ".json";
    keel::telemetry::write_chrome_trace(path, spans, "keel generate");
    spdlog::info("wrote {} trace spans to {}", spans.size(), path);
  }
  if (!result.is_leader) return 0;  // process ranks other than 0 print nothing

  double decode_tokens =
      static_cast<double>(result.num_decode_steps) * static_cast<double>(request.prompts.size());
  nlohmann::json out;
  out["model"] = deployment.model_dir;
  out["architecture"] = engine.config().architecture_name;
  out["tp"] = engine.tp_size();
  out["ranks"] = options.process_communicator != nullptr ? "mpi" : "threads";
  out["backend"] = keel::device_name(options.device);
  out["reduce"] = keel::comm::reduce_algo_name(options.reduce);
  out["placement"] = keel::placement_kind_name(options.placement.kind);
  out["combine"] = keel::combine_precision_name(options.combine);
  out["kv_cache_dtype"] = keel::kv_cache_dtype_name(engine.kv_dtype());
  out["nvfp4_activations"] = keel::nvfp4_activations_name(options.nvfp4_activations);
  out["quantization"] = keel::quant_method_name(engine.config().quant.method);
  out["isa"] = keel::cpu::isa_name(keel::cpu::active_isa());
  out["batch_size"] = request.prompts.size();
  out["prompt_ids"] = request.prompts.back();
  out["tokens"] = result.tokens.back();
  out["logits_digest"] = result.logits_digest;
  out["expert_token_counts"] = result.expert_counts;
  out["expert_seconds"] = result.expert_seconds;
  out["weight_bytes_rank0"] = engine.weight_bytes_per_rank();
  out["timings"] = {{"prefill_seconds", result.prefill_seconds},
                    {"decode_seconds", result.decode_seconds},
                    {"prompt_tokens", result.num_prompt_tokens},
                    {"decode_steps", result.num_decode_steps},
                    {"decode_tokens_per_second",
                     result.decode_seconds > 0 ? decode_tokens / result.decode_seconds : 0.0}};
  if (flags.has("--json")) {
    std::cout << out.dump() << std::endl;
    return 0;
  }
  std::printf("model %s (%s), tp=%d, reduce=%s, placement=%s, combine=%s, batch=%zu\n",
              deployment.model_dir.c_str(), engine.config().architecture_name.c_str(),
              engine.tp_size(), std::string(keel::comm::reduce_algo_name(options.reduce)).c_str(),
              std::string(keel::placement_kind_name(options.placement.kind)).c_str(),
              std::string(keel::combine_precision_name(options.combine)).c_str(),
              request.prompts.size());
  std::printf("tokens:");
  for (int32_t token : result.tokens.back()) std::printf(" %d", token);
  std::printf("\nlogits_digest: %s\n", result.logits_digest.c_str());
  std::printf("tokens per expert (all prompts, all steps):\n");
  for (size_t layer = 0; layer < result.expert_counts.size(); ++layer) {
    std::printf("  layer %2zu:", layer);
    for (int64_t count : result.expert_counts[layer])
      std::printf(" %lld", static_cast<long long>(count));
    std::printf("\n");
  }
  std::printf("prefill %.1f ms, decode %.1f ms (%.1f tok/s)\n", result.prefill_seconds * 1e3,
              result.decode_seconds * 1e3,
              out["timings"]["decode_tokens_per_second"].get<double>());
  return 0;
}

int run_serve(keel::ServeConfig& config);

int serve(int argc, char** argv) {
  keel::ServeCommand command =
      keel::parse_serve_command(argc, argv, 2, std::getenv("KEEL_API_KEY"));
  if (command.help) {
    std::cout << command.help_text;
    return 0;
  }
  keel::init_logging(command.verbose);
  keel::ServeConfig& config = command.config;
  keel::EngineOptions& options = config.engine;
  if (options.device == keel::Device::kCuda) {
    std::string reason;
    if (keel::cuda_device_count(&reason) == 0)
      throw_error("backend cuda: no CUDA device: ", reason);
  }
  ProcessRanks ranks;
  if (ranks.start(options, ProcessRanks::ServePolicy{config.startup_timeout_ms})) {
    if (!config.tp_given) options.tp_size = 0;
    return ranks.run_or_abort("serve", [&] { return run_serve(config); });
  }
  return run_serve(config);
}

// How long a failed server keeps answering 503 before it exits (README "Faults").
constexpr auto kFailureLinger = std::chrono::milliseconds(1000);

int run_serve(keel::ServeConfig& config) {
  keel::Engine engine(config.model_dir, config.engine);
  keel::ServeOptions serve_options;
  serve_options.block_size = config.block_size;
  serve_options.num_kv_blocks =
      keel::num_kv_blocks_for(config, engine.kv_block_bytes(config.block_size),
                              config.engine.process_communicator != nullptr ? 1 : engine.tp_size(),
                              config.engine.device == keel::Device::kCpu);
  // Hybrid models: a recurrent-state slot for every sequence that may run at once (beside the
  // KV blocks, not out of kv_cache_mb).
  const bool hybrid = engine.config().is_hybrid();
  if (hybrid) serve_options.num_state_slots = config.max_num_seqs;
  serve_options.stall_ms = config.health_stall_ms;
  serve_options.step_timeout_ms = config.engine.collective_timeout_ms;
  if (!engine.is_leader_process()) {
    // mpirun forwards SIGTERM to every rank; only the leader drains, the others follow its
    // steps until it broadcasts the stop.
    std::signal(SIGTERM, SIG_IGN);
    std::signal(SIGINT, SIG_IGN);
    engine.serve(nullptr, serve_options);
    return 0;
  }
  keel::ServingConfig serving_config;
  // The first served name is the one responses report; the others and the path as given
  // are accepted in requests too (as vLLM accepts its model path).
  if (!config.model_names.empty()) serving_config.model_name = config.model_names.front();
  serving_config.model_aliases.assign(config.model_names.begin() + !config.model_names.empty(),
                                      config.model_names.end());
  if (!config.model_given.empty()) serving_config.model_aliases.push_back(config.model_given);
  serving_config.max_model_len = config.max_model_len;
  serving_config.scheduler.num_kv_blocks = static_cast<int32_t>(serve_options.num_kv_blocks);
  serving_config.scheduler.block_size = static_cast<int32_t>(config.block_size);
  serving_config.scheduler.max_num_batched_tokens = config.max_num_batched_tokens;
  serving_config.scheduler.max_num_seqs = config.max_num_seqs;
  serving_config.scheduler.enable_prefix_caching = config.prefix_caching;
  if (hybrid) {
    serving_config.scheduler.num_state_slots = static_cast<int32_t>(config.max_num_seqs);
    if (config.prefix_caching) {
      // A cached prefix's KV blocks do not hold the Gated DeltaNet state at the prefix's end, so
      // a hit could not resume the recurrence; state checkpoints at block boundaries are not
      // built yet. Said at start-up, not silently.
      spdlog::warn(
          "prefix caching is off for {}: a hybrid (Gated DeltaNet) model's cached prefix would "
          "need the recurrent state at the prefix end, which keel does not checkpoint yet",
          engine.config().architecture_name);
      serving_config.scheduler.enable_prefix_caching = false;
    }
  }
  serving_config.max_waiting = config.max_waiting;
  serving_config.seed_base = config.seed.value_or(std::random_device{}());
  serving_config.telemetry = config.telemetry;
  serving_config.telemetry_options.near_tie_epsilon = config.near_tie_epsilon;
  serving_config.telemetry_options.dump_dir = config.telemetry_dump_dir;
  serving_config.telemetry_options.dump_interval_s = config.telemetry_dump_interval_s;
  serving_config.telemetry_options.reduce_algorithm =
      std::string(keel::comm::reduce_algo_name(config.engine.reduce));
  serving_config.telemetry_options.metrics = {config.telemetry_expert_latency,
                                              config.metrics_names};
  serving_config.metrics_cache_s = config.metrics_cache_s;
  serving_config.trace_dir = config.trace_dir;
  serving_config.telemetry_options.max_trace_spans = static_cast<size_t>(config.profile_max_spans);
  serving_config.routing_capture_path = config.routing_capture;
  {
    keel::RoutingFileHeader& header = serving_config.routing_header;
    header.model_dir = config.model_dir;
    header.architecture = engine.config().architecture_name;
    header.placement = std::string(keel::placement_kind_name(config.engine.placement.kind));
    // An explicit placement is part of the bits (which rank sums which expert): replay needs it.
    if (config.engine.placement.kind == keel::PlacementKind::kExplicit)
      header.extra["explicit_placement"] = config.engine.placement.explicit_ranks;
    header.reduce = std::string(keel::comm::reduce_algo_name(config.engine.reduce));
    header.determinism = std::string(keel::determinism_name(config.determinism));
    header.dtype = std::string(keel::dtype_name(engine.config().dtype));
    header.combine = std::string(keel::combine_precision_name(config.engine.combine));
    header.quantization = std::string(keel::quant_method_name(engine.config().quant.method));
    header.nvfp4_activations =
        std::string(keel::nvfp4_activations_name(config.engine.nvfp4_activations));
    header.kv_cache_dtype = std::string(keel::kv_cache_dtype_name(engine.kv_dtype()));
    header.git_revision = std::string(keel::build_revision());
  }
  keel::ServingEngine serving(engine, config.model_dir, serving_config);

  keel::server::HttpServerConfig http_config;
  keel::apply_http_limits(config, http_config);
  if (config.max_connections < config.max_num_seqs + config.max_waiting)
    spdlog::warn(
        "max_connections {} < max_num_seqs {} + max_waiting {}: clients past {} connections get "
        "429 before the queue is full",
        config.max_connections, config.max_num_seqs, config.max_waiting, config.max_connections);
  http_config.chat_template = serving.chat_template();
  http_config.chat_capabilities = serving.chat_capabilities();
  http_config.auth = {config.api_key, config.api_key_scope};
  keel::FingerprintInputs fingerprint;
  fingerprint.build_revision = std::string(keel::build_revision());
  fingerprint.determinism = config.determinism;
  fingerprint.reduce = config.engine.reduce;
  fingerprint.tp_size = engine.tp_size();
  fingerprint.placement = config.engine.placement;
  fingerprint.combine = config.engine.combine;
  fingerprint.kv_cache_dtype = std::string(keel::kv_cache_dtype_name(engine.kv_dtype()));
  fingerprint.nvfp4_activations = config.engine.nvfp4_activations;
  fingerprint.backend = config.engine.device;
  fingerprint.weights_digest = keel::checkpoint_digest(config.model_dir);
  http_config.system_fingerprint = keel::system_fingerprint(fingerprint);
  if (auto warning = keel::server::open_bind_warning(config.host, http_config.auth))
    std::fprintf(stderr, "keel serve: warning: %s\n", warning->c_str());
  const std::string model_name = serving.model_name();
  // Set before start(): /metrics is first called on a server thread, after it.
  const keel::server::HttpServer* http_server = nullptr;
  http_config.metrics = [&serving, &http_server, model_name] {
    std::string text = serving.prometheus();
    if (http_server != nullptr) text += keel::http_prometheus(http_server->stats(), model_name);
    return text;
  };
  http_config.extra_routes = [&serving](const std::string& method, const std::string& path,
                                        const std::string& query, const std::string& body) {
    return serving.handle_route(method, path, query, body);
  };
  keel::server::HttpServer http(http_config, serving);
  http_server = &http;
  http.start();
  http.catch_signals();
  // Announced only once every rank holds its KV pool: a client (or a script waiting for this
  // line) never sees a server that then fails to allocate.
  serve_options.on_ready = [&] {
    std::printf("keel serve: system_fingerprint %s\n", http_config.system_fingerprint.c_str());
    std::printf(
        "keel serve: listening on http://%s:%u (pid %d, model %s, tp %d, %s ranks, determinism "
        "%s, %lld KV blocks of %lld per rank, kv_cache_dtype %s)\n",
        config.host.c_str(), static_cast<unsigned>(http.port()), static_cast<int>(::getpid()),
        model_name.c_str(), engine.tp_size(),
        config.engine.process_communicator != nullptr ? "mpi" : "thread",
        std::string(keel::determinism_name(config.determinism)).c_str(),
        static_cast<long long>(serve_options.num_kv_blocks),
        static_cast<long long>(config.block_size),
        std::string(keel::kv_cache_dtype_name(engine.kv_dtype())).c_str());
    std::fflush(stdout);
  };

  const auto drain_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(config.drain_timeout_s * 1000));
  std::thread signal_waiter([&] {
    http.run_until_signal(drain_timeout);
    serving.request_stop();
  });
  int exit_code = 0;
  try {
    engine.serve(&serving, serve_options);
  } catch (const std::exception& error) {
    spdlog::error("the engine failed: {}", error.what());
    std::fprintf(stderr, "keel serve: error: the engine failed: %s\n", error.what());
    serving.set_failed(error.what());
    exit_code = 1;
    // Every request in flight has its 503 now. Keep answering a moment longer, so a health
    // checker polling /health (and a client arriving now) sees the 503 naming the rank rather
    // than a refused connection; a SIGTERM meanwhile (mpirun's teardown) just drains earlier.
    std::this_thread::sleep_for(kFailureLinger);
    std::raise(SIGTERM);  // ends run_until_signal: drain what can be drained, then exit
  }
  signal_waiter.join();
  std::printf("keel serve: stopped\n");
  return exit_code;
}

// keel calibrate --config serve.yaml --out FILE [--decode-list ..] [--prefill-list ..]
//                [--context-list ..] [--repeats N]
// keel calibrate --from-url URL --out FILE: the calibration from a live server's own step
// records (/v1/telemetry/steps): what its steps really took under the load it just served,
// sampling, streaming and every thread competing for the cores included.
// keel calibrate --from-steps FILE: the same from a saved /v1/telemetry/steps answer.
int calibrate_from_server(const Flags& flags) {
  std::string source, text;
  if (flags.has("--from-url")) {
    source = flags.get("--from-url") + "/v1/telemetry/steps";
    keel::loadgen::HttpResponse response = keel::loadgen::http_get(source);
    if (response.status != 200)
      throw_error("calibrate: GET ", source, " answered ", response.status);
    text = std::move(response.body);
  } else {
    source = flags.get("--from-steps");
    std::ifstream file(source);
    if (!file) throw_error("calibrate: cannot read ", source);
    text.assign(std::istreambuf_iterator<char>(file), {});
  }
  const nlohmann::json body = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.contains("steps") || !body["steps"].is_array())
    throw_error("calibrate: ", source, " is not a /v1/telemetry/steps answer (no \"steps\" array)");
  const int64_t first_step = flags.integer("--first-step", 0);
  const int64_t last_step = flags.integer("--last-step", std::numeric_limits<int64_t>::max());
  nlohmann::json steps = nlohmann::json::array();
  for (const auto& step : body["steps"]) {
    const int64_t id = step.value("id", int64_t{-1});
    if (id >= first_step && id <= last_step) steps.push_back(step);
  }
  nlohmann::json calibration =
      keel::calibration_from_served_steps(steps, flags.integer("--min-samples", 1));
  calibration["source"] = source;
  calibration["first_step"] = first_step;
  std::ofstream out(flags.get("--out"));
  out << calibration.dump(1) << "\n";
  if (!out) throw_error("calibrate: cannot write ", flags.get("--out"));
  std::printf("wrote %s: %zu step shapes from %zu served steps%s\n", flags.get("--out").c_str(),
              calibration["points"].size(), steps.size(),
              calibration.contains("step_jitter") ? " (with step jitter)" : "");
  return 0;
}

int calibrate(int argc, char** argv) {
  Flags flags(
      argc, argv, 2, "keel calibrate",
      "usage: keel calibrate --config serve.yaml --out FILE [grid flags]\n"
      "       keel calibrate (--from-url URL | --from-steps FILE) --out FILE [step flags]\n"
      "Engine step times on a grid of step shapes, or from a server's own step records (the\n"
      "file keel simulate --calibration interpolates).\n",
      {{"--config", Kind::kText, "serve.yaml", "the deployment to measure"},
       {"--out", Kind::kText, "FILE", "calibration file to write"},
       {"--model", Kind::kText, "DIR", "checkpoint (config: model)"},
       {"--decode-list", Kind::kIdList, "1,2,4,8,16,32", "decode rows per step"},
       {"--prefill-list", Kind::kIdList, "0,64,256", "prefill tokens per step"},
       {"--context-list", Kind::kIdList, "64,512", "context tokens"},
       {"--repeats", Kind::kInteger, "N", "timed repeats per shape (default 5)"},
       {"--block-size", Kind::kInteger, "N", "KV block tokens (config: block_size)"},
       {"--from-url", Kind::kText, "URL", "a running keel server's /v1/telemetry/steps"},
       {"--from-steps", Kind::kText, "FILE", "a saved /v1/telemetry/steps answer"},
       {"--min-samples", Kind::kInteger, "N", "steps a shape needs (default 1)"},
       {"--first-step", Kind::kInteger, "ID", "first step id used"},
       {"--last-step", Kind::kInteger, "ID", "last step id used"},
       {"--verbose", Kind::kSwitch, "", "debug logging"}});
  keel::init_logging(flags.has("--verbose"));
  if (flags.has("--from-url") || flags.has("--from-steps")) {
    if (flags.has("--from-url") && flags.has("--from-steps"))
      throw_error("calibrate: give --from-url or --from-steps, not both");
    if (!flags.has("--out")) throw_error("calibrate --from-url/--from-steps needs --out FILE");
    return calibrate_from_server(flags);
  }
  if (!flags.has("--config") || !flags.has("--out"))
    throw_error("calibrate needs --config serve.yaml (the deployment to measure) and --out FILE");
  keel::ServeConfig config = keel::load_serve_config(flags.get("--config"));
  if (flags.has("--model")) config.model_dir = flags.get("--model");
  keel::CalibrationGrid grid;
  grid.decode = flags.list("--decode-list", grid.decode);
  grid.prefill = flags.list("--prefill-list", grid.prefill);
  grid.context = flags.list("--context-list", grid.context);
  grid.repeats = flags.integer("--repeats", grid.repeats);
  grid.block_size = flags.integer("--block-size", config.block_size);
  auto run = [&]() -> int {
    keel::Engine engine(config.model_dir, config.engine);
    nlohmann::json calibration = keel::calibrate_engine(engine, grid);
    if (!engine.is_leader_process()) return 0;
    calibration["serve_config"] = flags.get("--config");
    calibration["determinism"] = std::string(keel::determinism_name(config.determinism));
    std::ofstream out(flags.get("--out"));
    out << calibration.dump(1) << "\n";
    if (!out) throw_error("calibrate: cannot write ", flags.get("--out"));
    std::printf("wrote %s: %zu step shapes, expert share %.3f\n", flags.get("--out").c_str(),
                calibration["points"].size(), calibration.value("expert_fraction", 0.0));
    return 0;
  };
  ProcessRanks ranks;
  if (ranks.start(config.engine)) {
    if (!config.tp_given) config.engine.tp_size = 0;
    return ranks.run_or_abort("calibrate", run);
  }
  return run();
}

// keel routes replay FILE --model DIR [--tp N] [--no-force] [--json]
int routes_replay(int argc, char** argv) {
  if (argc < 4)
    throw_error("routes replay needs a routing file: keel routes replay FILE --model DIR");
  const std::string path = argv[3];
  // `keel routes replay --help` (what `keel routes` points to): the help, not a file named so.
  const bool help_first = path == "--help" || path == "-h";
  Flags flags(argc, argv, help_first ? 3 : 4, "keel routes replay",
              "usage: keel routes replay FILE [--model DIR] [flags]\n"
              "Re-run recorded requests with the recorded experts forced; check the bits.\n",
              {{"--model", Kind::kText, "DIR", "checkpoint (default: the file's model_dir)"},
               {"--tp", Kind::kInteger, "N", "ranks (default: the file's tp)"},
               {"--collective-timeout-ms", Kind::kInteger, "MS", "0 = forever (default 120000)"},
               {"--no-force", Kind::kSwitch, "", "route freely instead of forcing"},
               {"--json", Kind::kSwitch, "", "one JSON object on stdout"},
               {"--verbose", Kind::kSwitch, "", "debug logging"}});
  keel::init_logging(flags.has("--verbose"));
  keel::RoutingFile file = keel::read_routing_file(path);
  const keel::RoutingFileHeader& header = file.header;
  std::string model_dir = flags.get("--model", header.model_dir);
  if (model_dir.empty())
    throw_error("routes replay: ", path, " names no model_dir; pass --model DIR");
  keel::EngineOptions options;
  options.tp_size = static_cast<int>(flags.integer("--tp", header.tp));
  options.collective_timeout_ms = flags.integer("--collective-timeout-ms", 120000);
  // Replay on the recorded configuration: the reduction and placement are part of the bits.
  if (!header.reduce.empty()) options.reduce = keel::comm::parse_reduce_algo(header.reduce);
  if (!header.placement.empty())
    options.placement.kind = keel::parse_placement_kind(header.placement);
  if (options.placement.kind == keel::PlacementKind::kExplicit) {
    const nlohmann::json lists = header.extra.is_object()
                                     ? header.extra.value("explicit_placement", nlohmann::json())
                                     : nlohmann::json();
    try {
      options.placement.explicit_ranks = lists.get<std::vector<std::vector<int>>>();
    } catch (const nlohmann::json::exception&) {
      throw_error("routes replay: ", path,
                  " was recorded with an explicit placement but its header carries no "
                  "extra.explicit_placement lists of ranks");
    }
    if (options.placement.explicit_ranks.empty())
      throw_error("routes replay: ", path, " names an explicit placement with no lists");
  }
  if (!header.combine.empty()) options.combine = keel::parse_combine_precision(header.combine);
  if (!header.nvfp4_activations.empty())
    options.nvfp4_activations =
        keel::parse_nvfp4_activations(header.nvfp4_activations, path + ": nvfp4_activations");
  if (!header.kv_cache_dtype.empty())
    options.kv_cache_dtype =
        keel::parse_kv_cache_dtype(header.kv_cache_dtype, path + ": kv_cache_dtype");
  if (!header.quantization.empty()) {
    const std::string quantization(
        keel::quant_method_name(keel::ModelConfig::load(model_dir + "/config.json").quant.method));
    if (header.quantization != quantization)
      throw_error("routes replay: ", path, " was recorded on a checkpoint quantized '",
                  header.quantization, "', ", model_dir, " is '", quantization, "'");
  }
  auto run = [&]() -> int {
    keel::Engine engine(model_dir, options);
    keel::ReplayOptions replay_options;
    replay_options.force_routes = !flags.has("--no-force");
    replay_options.masked_ids = keel::untokenizable_ids(model_dir, engine.config().vocab_size);
    std::vector<keel::ReplayOutcome> outcomes = keel::replay_routing(engine, file, replay_options);
    if (!engine.is_leader_process()) return 0;
    int reproduced = 0;
    nlohmann::json requests = nlohmann::json::array();
    for (const keel::ReplayOutcome& outcome : outcomes) {
      const bool ok = outcome.tokens_match && outcome.digest_match;
      reproduced += ok ? 1 : 0;
      requests.push_back({{"request_id", outcome.request_id},
                          {"tokens_match", outcome.tokens_match},
                          {"logits_digest_match", outcome.digest_match},
                          {"first_mismatch", outcome.first_mismatch},
                          {"reproduced", ok}});
    }
    const bool all = reproduced == static_cast<int>(outcomes.size());
    if (flags.has("--json")) {
      std::cout << nlohmann::json{{"file", path},
                                  {"forced_routes", replay_options.force_routes},
                                  {"requests", requests},
                                  {"reproduced", reproduced},
                                  {"total", outcomes.size()},
                                  {"all_reproduced", all}}
                       .dump()
                << std::endl;
    } else {
      for (const auto& request : requests)
        std::printf("%-28s tokens %s, logits %s%s\n",
                    request["request_id"].get<std::string>().c_str(),
                    request["tokens_match"].get<bool>() ? "identical" : "DIFFER",
                    request["logits_digest_match"].get<bool>() ? "bit-identical" : "DIFFER",
                    request["first_mismatch"].get<int64_t>() >= 0
                        ? (" (first differing token " +
                           std::to_string(request["first_mismatch"].get<int64_t>()) + ")")
                              .c_str()
                        : "");
      std::printf("%d of %zu requests reproduced bit for bit (%s routes)\n", reproduced,
                  outcomes.size(), replay_options.force_routes ? "forced" : "free");
    }
    return all ? 0 : 1;
  };
  ProcessRanks ranks;
  if (ranks.start(options)) {
    options.tp_size = 0;
    return ranks.run_or_abort("routes replay", run);
  }
  return run();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  std::string command = argv[1];
  try {
    if (command == "gen-model") return gen_model(argc, argv);
    if (command == "generate") return generate(argc, argv);
    if (command == "serve") return serve(argc, argv);
    if (command == "bench") return keel::bench_serve_command(argc, argv);
    if (command == "experts") return keel::experts_command(argc, argv);
    if (command == "profile") return keel::profile_command(argc, argv);
    if (command == "calibrate") return calibrate(argc, argv);
    if (command == "plan") return keel::plan_command(argc, argv);
    if (command == "simulate") return keel::simulate_command(argc, argv);
    if (command == "routes" && argc > 2 && std::string(argv[2]) == "replay")
      return routes_replay(argc, argv);
    if (command == "routes") return keel::routes_command(argc, argv);
    if (command == "--version" || command == "version") {
      std::cout << "keel " << keel::build_revision() << "\n";
      return 0;
    }
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "keel: unknown command '" << command << "'\n" << kUsage;
    return 2;
  } catch (const keel::Error& error) {
    std::cerr << "keel " << command << ": error: " << error.what() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "keel " << command << ": error: " << error.what() << "\n";
    return 1;
  }
}
