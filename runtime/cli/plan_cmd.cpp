// `keel plan`: flags (keel_flags) and dispatch to the planning library.
#include "runtime/cli/plan_cmd.h"

#include <iostream>
#include <string>

#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/cli/plan_checkpoint.h"
#include "runtime/tools/planning/plan_report.h"
#include "runtime/tools/planning/plan_validate.h"

namespace keel {

namespace {

constexpr const char* kUsage =
    "usage: keel plan --model M.yaml|DIR --hardware H.yaml --quant Q --tp N --context TOKENS "
    "[flags]\n"
    "       keel plan --validate TABLE.yaml [--json]\n"
    "Does it fit, how many sequences at that context, decode tok/s vs batch, prefill/TTFT, and\n"
    "the bottleneck of each regime, with the arithmetic shown. --efficiency-file (an engine\n"
    "profile, configs/engines/) excludes --bw-eff/--compute-eff/--layer-overhead-us/\n"
    "--allreduce-latency-us. --validate prints predicted vs published tok/s for every row of a\n"
    "validation table (configs/validation/) with the error of each.\n";

int run(int argc, char** argv) {
  std::string model_path, hardware_path, quant_name, efficiency_file, validate_path, speculative,
      acceptance, allreduce;
  int64_t tp = 0, context = 0, gpus = 0;
  double bw_eff = 0, compute_eff = 0, overhead_us = 0, latency_us = 0, launch_graph_us = 0,
         launch_eager_us = 0;
  bool no_cuda_graphs = false;
  bool json = false;
  planning::PlanOptions options;
  flags::FlagSet flags("keel plan", kUsage);
  flags.add_string("--validate", &validate_path, "TABLE.yaml",
                   "predicted vs published decode tok/s for every row of a validation table");
  flags.add_string("--model", &model_path, "M.yaml|DIR",
                   "planning preset, or a checkpoint directory / config.json (required)");
  flags.add_string("--hardware", &hardware_path, "H.yaml", "hardware preset (required)");
  flags.add_string("--quant", &quant_name, "none|bf16|fp8|nvfp4|mxfp4|int4",
                   "weight quantization (required; none: the model's own dtype, or a quantized "
                   "checkpoint's own formats; a quantized checkpoint takes none only)");
  flags.add_int("--tp", &tp, "N", "tensor-parallel GPUs (required)").range(1, 1024);
  flags.add_int("--context", &context, "TOKENS", "context length (required)").at_least(1);
  options.kv_dtype = "auto";
  flags.add_choice("--kv-dtype", &options.kv_dtype, {"auto", "bf16", "fp8", "fp8_e4m3", "fp32"},
                   "KV cache dtype (keel serve's kv_cache_dtype; auto: bf16 for bf16 or quantized "
                   "weights, else fp32)");
  flags.add_int("--prompt-len", &options.prompt_len, "N", "prompt tokens for prefill/TTFT");
  flags.add_switch("--json", &json, "JSON report");
  flags.add_string("--efficiency-file", &efficiency_file, "F", "measured efficiencies");
  flags.add_double("--bw-eff", &bw_eff, "X", "bandwidth efficiency override");
  flags.add_double("--compute-eff", &compute_eff, "Y", "compute efficiency override");
  flags.add_double("--layer-overhead-us", &overhead_us, "Z", "per-layer overhead override");
  flags.add_double("--allreduce-latency-us", &latency_us, "W", "all-reduce latency override");
  flags.add_int("--gpus", &gpus, "N", "GPUs in the box (default: the hardware file's)").at_least(1);
  flags.add_double("--reserve-gib", &options.reserve_gib, "G", "memory held back per GPU")
      .at_least(0);
  flags
      .add_int("--max-num-batched-tokens", &options.max_num_batched_tokens, "T",
               "scheduler token budget")
      .at_least(1);
  flags.add_int("--max-num-seqs", &options.max_num_seqs, "S", "scheduler sequence cap").at_least(1);
  flags.add_double("--expert-imbalance", &options.expert_imbalance, "F",
                   "busiest rank's expert load over the mean");
  flags.add_switch("--attention-bf16", &options.attention_bf16, "attention weights stay bf16");
  flags.add_switch("--shared-expert-bf16", &options.shared_expert_bf16,
                   "the shared expert stays bf16 (as in the NVFP4 checkpoints)");
  flags.add_switch("--expert-parallel", &options.expert_parallel,
                   "whole experts per rank (EP) instead of tensor-parallel expert slices");
  flags.add_string("--speculative", &speculative, "none|mtp:K",
                   "speculative decoding: K draft tokens per step from the MTP layer");
  flags.add_string("--acceptance", &acceptance, "A|a1,...,aK",
                   "draft acceptance: one conditional rate A (position i: A^i) or K per-position "
                   "rates as vLLM reports them");
  flags.add_double("--launch-us-graph", &launch_graph_us, "US",
                   "fixed cost per kernel in a CUDA graph override");
  flags.add_double("--launch-us-eager", &launch_eager_us, "US",
                   "fixed cost per eagerly launched kernel override");
  flags.add_switch("--no-cuda-graphs", &no_cuda_graphs, "every kernel launched eagerly");
  flags.add_choice("--allreduce", &allreduce, {"ring", "one_shot", "two_shot", "auto"},
                   "all-reduce algorithm override");
  if (!flags.parse(argc, argv, 2)) {
    std::cout << flags.help();
    return 0;
  }
  if (flags.given("--validate")) {
    const planning::ValidationResult result = planning::validate_plan_table(validate_path);
    if (json)
      std::cout << planning::validation_json(result).dump(2) << "\n";
    else
      std::cout << planning::render_validation_text(result);
    return 0;
  }
  for (const char* name : {"--model", "--hardware", "--quant", "--tp", "--context"})
    if (!flags.given(name))
      throw flags::UsageError(std::string(name) + " is required (see keel plan --help)");
  options.speculative = planning::parse_speculative(speculative, acceptance);
  options.context = context;
  const bool efficiency_overrides = flags.given("--bw-eff") || flags.given("--compute-eff") ||
                                    flags.given("--layer-overhead-us") ||
                                    flags.given("--allreduce-latency-us");
  if (!efficiency_file.empty() && efficiency_overrides)
    throw_error(
        "--efficiency-file and --bw-eff/--compute-eff/--layer-overhead-us/"
        "--allreduce-latency-us are exclusive");

  const planning::ModelSpec model = is_checkpoint_path(model_path)
                                        ? model_spec_from_checkpoint(model_path)
                                        : planning::load_model_spec(model_path);
  // keel's `auto` (runtime/model/kv_cache.h): bf16 KV for bf16 (or quantized) weights, else fp32.
  if (options.kv_dtype == "auto")
    options.kv_dtype = quant_name != "none" || model.dtype == "bf16" ? "bf16" : "fp32";
  planning::HardwareSpec hardware = planning::load_hardware_spec(hardware_path);
  // A quantized checkpoint is planned as stored (--quant none); plan_memory refuses another
  // --quant for it rather than re-quantizing its codes.
  const planning::QuantSpec quant =
      quant_name == "none" ? checkpoint_quant_spec(model) : planning::quant_from_name(quant_name);
  if (flags.given("--gpus")) hardware.count = static_cast<int>(gpus);
  if (!efficiency_file.empty()) planning::apply_efficiency_file(hardware, efficiency_file);
  if (flags.given("--bw-eff")) hardware.bandwidth_efficiency = bw_eff;
  if (flags.given("--compute-eff")) hardware.compute_efficiency = compute_eff;
  if (flags.given("--layer-overhead-us")) hardware.layer_overhead_us = overhead_us;
  if (flags.given("--allreduce-latency-us")) hardware.interconnect.latency_us = latency_us;
  if (flags.given("--launch-us-graph")) hardware.launch_us_graph = launch_graph_us;
  if (flags.given("--launch-us-eager")) hardware.launch_us_eager = launch_eager_us;
  if (no_cuda_graphs) hardware.engine.cuda_graphs = false;
  if (flags.given("--allreduce"))
    hardware.engine.allreduce = planning::allreduce_algorithm_from_name(allreduce, "--allreduce");
  planning::validate_hardware_spec(hardware, "command line");

  const planning::PlanReport report =
      planning::build_plan_report(model, hardware, quant, static_cast<int>(tp), options);
  if (json) {
    std::cout << planning::plan_report_json(report).dump(2) << "\n";
  } else {
    std::cout << planning::render_plan_text(report);
  }
  return 0;
}

}  // namespace

int plan_command(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {  // usage errors too: plan exits 1 for every error
    std::cerr << "keel plan: " << error.what() << "\n";
    return 1;
  }
}

}  // namespace keel
