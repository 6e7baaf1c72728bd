// `keel plan`: flags (keel_flags) and dispatch to the planning library.
#include "runtime/cli/plan_cmd.h"

#include <iostream>
#include <string>

#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/cli/plan_checkpoint.h"
#include "runtime/tools/planning/plan_report.h"

namespace keel {

namespace {

constexpr const char* kUsage =
    "usage: keel plan --model M.yaml|DIR --hardware H.yaml --quant Q --tp N --context TOKENS "
    "[flags]\n"
    "Does it fit, how many sequences at that context, decode tok/s vs batch, prefill/TTFT, and\n"
    "the bottleneck of each regime, with the arithmetic shown. --efficiency-file excludes\n"
    "--bw-eff/--compute-eff/--layer-overhead-us/--allreduce-latency-us.\n";

int run(int argc, char** argv) {
  std::string model_path, hardware_path, quant_name, efficiency_file;
  int64_t tp = 0, context = 0, gpus = 0;
  double bw_eff = 0, compute_eff = 0, overhead_us = 0, latency_us = 0;
  bool json = false;
  planning::PlanOptions options;
  flags::FlagSet flags("keel plan", kUsage);
  flags
      .add_string("--model", &model_path, "M.yaml|DIR",
                  "planning preset, or a checkpoint directory / config.json")
      .required();
  flags.add_string("--hardware", &hardware_path, "H.yaml", "hardware preset").required();
  flags
      .add_string("--quant", &quant_name, "none|bf16|fp8|nvfp4|mxfp4|int4",
                  "weight quantization (none: the model's own dtype, or a quantized checkpoint's "
                  "own formats; a quantized checkpoint takes none only)")
      .required();
  flags.add_int("--tp", &tp, "N", "tensor-parallel GPUs").range(1, 1024).required();
  flags.add_int("--context", &context, "TOKENS", "context length").at_least(1).required();
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
  if (!flags.parse(argc, argv, 2)) {
    std::cout << flags.help();
    return 0;
  }
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
