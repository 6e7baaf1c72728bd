// bench/decode: decode throughput of a synthetic gen-model preset on thread ranks, against the
// memory-bandwidth roofline measured in the same run. --preset small (default: 0.48 B
// parameters, 64 experts top-8, bf16) or small-qwen3.5 (0.52 B, hybrid: 12 Gated DeltaNet + 4
// full-attention layers, 32 experts top-8 + a shared expert, bf16), or any checkpoint (--model).
//
// Roofline: the bytes a decode step of B tokens (one per sequence) must move, per layer:
//   full attention    q/k/v/o_proj (q_proj twice as tall with attn_output_gate);
//   linear attention  the GDN in_proj (2*hk*dk + 2*hv*dv + 2*hv rows: q|k|v|z|b|a), out_proj
//                     [H, hv*dv] and the conv weights (fp32 on the device);
//   MoE               the router, every expert at least one of the B tokens picked (top-k of E
//                     routed uniformly: E * (1 - (1 - k/E)^B) distinct experts in expectation),
//                     the shared expert (3 * H * shared_intermediate) and its gate [1, H];
//   dense MLP         3 * H * intermediate;
// plus the lm_head: these are "step_weight_bytes". Hybrid models also touch each sequence's
// recurrent state in every linear layer, read once and written once per token (counted 2x):
// the fp32 SSM state [hv][dk][dv] and conv state [conv channels][kernel - 1]:
// "step_state_bytes" (B sequences' worth). Norms, biases, A_log/dt_bias (under 1 KB a layer)
// and the KV cache (fp32, prompt + decode positions: small next to these at the bench's
// lengths) are left out.
// roofline tok/s = B / ((weight + state bytes) / measured read bandwidth of
// min(tp x threads per rank, cpus) threads), read from a buffer allocated as the engine allocates
// its weights (2 MiB aligned, MADV_HUGEPAGE: kernels/base/host_memory.h). TP convention: the bytes
// are the whole model's (every rank reads its 1/tp shard of the sharded weights and of the per-rank
// state, so together they move the whole; replicated weights such as the router are counted once),
// and the bandwidth is what min(tp x threads, cpus) threads together read: tp ranks (each with
// --threads N splitting its GEMM rows) stream their shards in parallel, but no more than one thread
// per core. The benchmark also checks the determinism promise: with fixed_order, prompt 0's logits
// digest is the same at batch 1 and at batch 16 (exit 1 otherwise); for hybrid models that
// covers the recurrent state too (each sequence owns its slot).
//
// --backend cuda: the same decode on one GPU (TP=1 only; the roofline bandwidth is then the
// GPU's, measured with a device-to-device copy). A single rank needs no NCCL: every collective
// over one rank is the identity, so comm/single_gpu's one-rank communicator stands in for
// NcclCommunicator.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#ifdef KEEL_BENCH_CUDA
#include <cuda_runtime_api.h>

#include "comm/single_gpu/single_gpu_comm.h"
#endif

#include "bench/machine.h"
#include "kernels/base/check.h"
#include "kernels/cpu/gemm.h"
#include "runtime/cli/flags.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"

namespace {

struct Options {
  std::string model_dir;
  std::string preset = "small";
  std::vector<int> tp_list = {1, 4};
  std::vector<int> batch_list = {1, 16};
  int64_t threads_per_rank = 1;
  int64_t decode_steps = 32;
  int64_t prompt_length = 8;
  keel::comm::ReduceAlgo reduce = keel::comm::ReduceAlgo::kFixedOrder;
  keel::Device device = keel::Device::kCpu;
};

Options parse_options(int argc, char** argv) {
  Options options;
  std::string reduce = "fixed_order";
  std::string backend = "cpu";
  keel::flags::FlagSet flags(
      "bench/decode",
      "usage: decode [flags]\n"
      "Decode throughput of a synthetic preset on thread ranks (or one GPU) against the\n"
      "measured memory-bandwidth roofline; checks fixed_order's batch-invariant digest.\n");
  flags.add_string("--model", &options.model_dir, "DIR",
                   "checkpoint (default: the --preset, generated)");
  flags.add_string("--preset", &options.preset, "NAME",
                   "gen-model preset written to build/bench-models/NAME without --model "
                   "(e.g. small-qwen3.5)");
  flags.add_int_list("--tp-list", &options.tp_list, "N,...", "tensor-parallel sizes").at_least(1);
  flags.add_int_list("--batch-list", &options.batch_list, "B,...", "batch sizes").at_least(1);
  flags
      .add_int("--threads", &options.threads_per_rank, "N",
               "cpu threads per rank (kernels/cpu/worker_pool.h; same bits at any N)")
      .range(1, 256);
  flags.add_int("--decode-steps", &options.decode_steps, "N", "decode steps per run").at_least(1);
  flags.add_int("--prompt-length", &options.prompt_length, "N", "prompt tokens").at_least(1);
  flags.add_choice("--reduce", &reduce, {"native", "fixed_order"}, "all-reduce algorithm");
  flags.add_choice("--backend", &backend, {"cpu", "cuda"},
                   "where the rank computes (cuda: one GPU, --tp-list 1)");
  flags.parse_or_exit(argc, argv);
  options.reduce = keel::comm::parse_reduce_algo(reduce);
  options.device = keel::parse_device(backend);
  if (options.device == keel::Device::kCuda) {
    if (options.tp_list != std::vector<int>{1})
      keel::throw_error("--backend cuda measures one GPU: pass --tp-list 1");
    std::string reason;
    if (keel::cuda_device_count(&reason) == 0)
      keel::throw_error("--backend cuda: no CUDA device: ", reason);
  }
  return options;
}

#ifdef KEEL_BENCH_CUDA
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    keel::throw_error("bench/decode: ", what, ": ", cudaGetErrorString(status));
}

// GB/s of a device-to-device copy of 1 GiB (bytes read + bytes written over the time), best of
// 5: the bandwidth a decode step's weight reads can reach on this GPU.
double measure_device_bandwidth_gbs() {
  const size_t bytes = size_t{1} << 30;
  void* src = nullptr;
  void* dst = nullptr;
  check_cuda(cudaMalloc(&src, bytes), "cudaMalloc");
  check_cuda(cudaMalloc(&dst, bytes), "cudaMalloc");
  check_cuda(cudaMemset(src, 1, bytes), "cudaMemset");
  double best = 0;
  for (int trial = 0; trial < 5; ++trial) {
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    auto start = std::chrono::steady_clock::now();
    check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * static_cast<double>(bytes) / seconds * 1e-9);
  }
  check_cuda(cudaFree(src), "cudaFree");
  check_cuda(cudaFree(dst), "cudaFree");
  return best;
}

std::string gpu_name() {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties");
  return properties.name;
}
#endif

// Bytes one decode step of `batch` sequences moves (see the roofline note at the top).
struct StepBytes {
  double weights = 0;
  double state = 0;
};

StepBytes step_bytes(const keel::ModelConfig& config, int64_t batch, size_t weight_size) {
  const double hidden = static_cast<double>(config.hidden_size);
  const double head_dim = static_cast<double>(config.head_dim);
  const double f32 = 4.0;
  // Full attention: q (twice as tall with the output gate), k, v, o.
  const double q_heads =
      static_cast<double>(config.num_heads) * (config.attn_output_gate ? 2.0 : 1.0);
  const double attention = hidden * head_dim *
                           (q_heads + 2.0 * static_cast<double>(config.num_kv_heads) +
                            static_cast<double>(config.num_heads));
  // Gated DeltaNet: in_proj q|k|v|z|b|a, out_proj, conv weights (fp32).
  const double key_dim = static_cast<double>(config.linear_key_dim());
  const double value_dim = static_cast<double>(config.linear_value_dim());
  const double v_heads = static_cast<double>(config.linear_num_value_heads);
  const double conv_dim = static_cast<double>(config.linear_conv_dim());
  const double kernel = static_cast<double>(config.linear_conv_kernel);
  const double linear_weights =
      (2.0 * key_dim + 2.0 * value_dim + 2.0 * v_heads) * hidden + hidden * value_dim;
  const double conv_weight_bytes = conv_dim * kernel * f32;
  // Per sequence: SSM state [hv][dk][dv] and conv state [channels][kernel - 1], fp32, read and
  // written once per token.
  const double state_per_sequence = 2.0 *
                                    (v_heads * static_cast<double>(config.linear_key_head_dim) *
                                         static_cast<double>(config.linear_value_head_dim) +
                                     conv_dim * std::max(0.0, kernel - 1.0)) *
                                    f32;
  // MoE: router, experts touched, shared expert and its gate.
  const double experts = static_cast<double>(config.num_experts);
  const double experts_touched =
      experts > 0 ? experts * (1.0 - std::pow(1.0 - static_cast<double>(config.top_k) / experts,
                                              static_cast<double>(batch)))
                  : 0.0;
  const double expert = 3.0 * hidden * static_cast<double>(config.moe_intermediate_size);
  const double shared =
      config.shared_expert_intermediate_size > 0
          ? 3.0 * hidden * static_cast<double>(config.shared_expert_intermediate_size) + hidden
          : 0.0;
  const double moe = hidden * experts + experts_touched * expert + shared;
  const double dense = 3.0 * hidden * static_cast<double>(config.intermediate_size);

  StepBytes bytes;
  double elements = static_cast<double>(config.vocab_size) * hidden;  // lm_head
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    const bool linear =
        static_cast<size_t>(layer) < config.layer_kinds.size() &&
        config.layer_kinds[static_cast<size_t>(layer)] == keel::LayerKind::kLinearAttention;
    if (linear) {
      elements += linear_weights;
      bytes.weights += conv_weight_bytes;
      bytes.state += static_cast<double>(batch) * state_per_sequence;
    } else {
      elements += attention;
    }
    const bool is_moe = static_cast<size_t>(layer) >= config.layer_is_moe.size() ||
                        config.layer_is_moe[static_cast<size_t>(layer)];
    elements += is_moe ? moe : dense;
  }
  bytes.weights += elements * static_cast<double>(weight_size);
  return bytes;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options = parse_options(argc, argv);
    std::string report_preset;  // empty with --model
    if (options.model_dir.empty()) {
      if (options.preset.empty() || options.preset.find('/') != std::string::npos)
        keel::throw_error("--preset: '", options.preset, "' is not a preset name");
      options.model_dir = std::string(KEEL_BINARY_DIR) + "/bench-models/" + options.preset;
      if (!std::filesystem::exists(options.model_dir + "/config.json")) {
        keel::ModelPreset preset = keel::load_model_preset(keel::find_model_preset(options.preset));
        std::cerr << "bench/decode: writing the " << options.preset << " preset to "
                  << options.model_dir << "\n";
        keel::GenModelOptions gen_options;
        gen_options.seed = 1;
        keel::generate_model(preset, gen_options, options.model_dir);
      }
      report_preset = options.preset;
    }
    const int cpus = static_cast<int>(std::thread::hardware_concurrency());
    nlohmann::json report;
    report["benchmark"] = "decode";
    report["machine"] = keel::bench::machine_name();
    report["isa"] = keel::cpu::isa_name(keel::cpu::active_isa());
    report["load_average_1min"] = keel::bench::one_minute_load_average();
    report["model"] = options.model_dir;
    if (!report_preset.empty()) report["preset"] = report_preset;
    report["reduce"] = keel::comm::reduce_algo_name(options.reduce);
    report["backend"] = keel::device_name(options.device);
    const bool on_gpu = options.device == keel::Device::kCuda;
    report["bandwidth_measure"] = on_gpu ? "gpu device-to-device copy" : "host memory read";
#ifdef KEEL_BENCH_CUDA
    keel::comm::SingleGpuCommunicator gpu_communicator;
    if (on_gpu) report["gpu"] = gpu_name();
#else
    if (on_gpu) keel::throw_error("--backend cuda: bench/decode was built without CUDA");
#endif
    report["decode_steps"] = options.decode_steps;
    report["prompt_length"] = options.prompt_length;
    std::map<int, double> bandwidth_by_threads;
    bool deterministic = true;
    for (int tp : options.tp_list) {
      int threads = std::min(tp * static_cast<int>(options.threads_per_rank), std::max(1, cpus));
      if (!bandwidth_by_threads.count(threads)) {
#ifdef KEEL_BENCH_CUDA
        if (on_gpu) bandwidth_by_threads[threads] = measure_device_bandwidth_gbs();
#endif
        if (!on_gpu)
          bandwidth_by_threads[threads] =
              keel::bench::measure_read_bandwidth_gbs(size_t{1} << 30, threads);
      }
      keel::EngineOptions engine_options;
      engine_options.tp_size = tp;
      engine_options.threads_per_rank = static_cast<int>(options.threads_per_rank);
#ifdef KEEL_BENCH_CUDA
      if (on_gpu) {
        engine_options.device = keel::Device::kCuda;
        engine_options.tp_size = 0;  // process ranks: the communicator's size (1)
        engine_options.process_communicator = &gpu_communicator;
      }
#endif
      engine_options.reduce = options.reduce;
      engine_options.placement.kind = keel::PlacementKind::kRoundRobin;
      keel::Engine engine(options.model_dir, engine_options);
      const keel::ModelConfig& config = engine.config();
      report["num_linear_layers"] = config.num_linear_layers();
      report["num_attention_layers"] = config.num_attention_layers();
      std::string batch_one_digest;
      for (int batch : options.batch_list) {
        keel::GenerateRequest request;
        request.max_new_tokens = options.decode_steps + 1;
        request.time_experts = false;  // a speed run: no per-step telemetry
        for (int prompt = 0; prompt < batch; ++prompt) {
          std::vector<int32_t> ids;
          for (int64_t i = 0; i < options.prompt_length; ++i)
            ids.push_back(
                static_cast<int32_t>((prompt * 7919 + i * 104729 + 13) % config.vocab_size));
          request.prompts.push_back(std::move(ids));
        }
        keel::GenerateResult result = engine.generate(request);
        double tokens_per_second =
            static_cast<double>(batch * options.decode_steps) / result.decode_seconds;
        StepBytes step = step_bytes(config, batch, keel::dtype_size(config.dtype));
        double bytes = step.weights + step.state;
        double roofline =
            static_cast<double>(batch) / (bytes / (bandwidth_by_threads[threads] * 1e9));
        if (batch == 1) batch_one_digest = result.logits_digest;
        bool same_bits = batch_one_digest.empty() || result.logits_digest == batch_one_digest;
        if (options.reduce == keel::comm::ReduceAlgo::kFixedOrder && !same_bits)
          deterministic = false;
        report["results"].push_back({{"tp", tp},
                                     {"threads_per_rank", options.threads_per_rank},
                                     {"batch", batch},
                                     {"decode_tokens_per_second", tokens_per_second},
                                     {"ms_per_step", 1e3 * result.decode_seconds /
                                                         static_cast<double>(options.decode_steps)},
                                     {"step_weight_bytes", step.weights},
                                     {"step_state_bytes", step.state},
                                     {"read_bandwidth_gbs", bandwidth_by_threads[threads]},
                                     {"bandwidth_threads", threads},
                                     {"roofline_tokens_per_second", roofline},
                                     {"fraction_of_roofline", tokens_per_second / roofline},
                                     {"prompt0_digest_matches_batch1", same_bits}});
        std::cerr << "tp=" << tp << " batch=" << batch << ": " << tokens_per_second << " tok/s ("
                  << 100.0 * tokens_per_second / roofline << "% of roofline)\n";
      }
    }
    report["fixed_order_batch_invariant"] = deterministic;
    std::cout << report.dump(2) << std::endl;
    return deterministic ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "bench/decode: error: " << error.what() << "\n";
    return 2;
  }
}
