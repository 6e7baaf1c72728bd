// `keel plan`: argument parsing and dispatch to the planning library.
#include "runtime/cli/plan_cmd.h"

#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>

#include "kernels/base/check.h"
#include "runtime/planning/plan_report.h"

namespace keel {

namespace {

constexpr const char* kUsage =
    "usage: keel plan --model M.yaml --hardware H.yaml --quant bf16|fp8|nvfp4|mxfp4|int4\n"
    "                 --tp N --context TOKENS [--kv-dtype bf16|fp8] [--prompt-len N] [--json]\n"
    "                 [--efficiency-file F | --bw-eff X --compute-eff Y --layer-overhead-us Z\n"
    "                  --allreduce-latency-us W] [--gpus N] [--reserve-gib G]\n"
    "                 [--max-num-batched-tokens T] [--max-num-seqs S] [--expert-imbalance F]\n"
    "                 [--attention-bf16]\n";

double parse_double(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || end == nullptr || *end != '\0')
    throw_error(flag, ": expected a number, got '", text, "'");
  return value;
}

int64_t parse_int(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || end == nullptr || *end != '\0')
    throw_error(flag, ": expected an integer, got '", text, "'");
  return value;
}

int run(int argc, char** argv) {
  std::string model_path, hardware_path, quant_name, efficiency_file;
  std::optional<int64_t> tp, context, gpus;
  std::optional<double> bw_eff, compute_eff, overhead_us, latency_us;
  bool json = false;
  planning::PlanOptions options;
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw_error(flag, " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (flag == "--model") {
      model_path = value();
    } else if (flag == "--hardware") {
      hardware_path = value();
    } else if (flag == "--quant") {
      quant_name = value();
    } else if (flag == "--tp") {
      tp = parse_int(flag, value());
    } else if (flag == "--context") {
      context = parse_int(flag, value());
    } else if (flag == "--kv-dtype") {
      options.kv_dtype = value();
      if (options.kv_dtype != "bf16" && options.kv_dtype != "fp8")
        throw_error("--kv-dtype must be bf16 or fp8 (got '", options.kv_dtype, "')");
    } else if (flag == "--prompt-len") {
      options.prompt_len = parse_int(flag, value());
    } else if (flag == "--json") {
      json = true;
    } else if (flag == "--efficiency-file") {
      efficiency_file = value();
    } else if (flag == "--bw-eff") {
      bw_eff = parse_double(flag, value());
    } else if (flag == "--compute-eff") {
      compute_eff = parse_double(flag, value());
    } else if (flag == "--layer-overhead-us") {
      overhead_us = parse_double(flag, value());
    } else if (flag == "--allreduce-latency-us") {
      latency_us = parse_double(flag, value());
    } else if (flag == "--gpus") {
      gpus = parse_int(flag, value());
    } else if (flag == "--reserve-gib") {
      options.reserve_gib = parse_double(flag, value());
      if (options.reserve_gib < 0) throw_error("--reserve-gib must be >= 0");
    } else if (flag == "--max-num-batched-tokens") {
      options.max_num_batched_tokens = parse_int(flag, value());
      if (options.max_num_batched_tokens < 1) throw_error("--max-num-batched-tokens must be >= 1");
    } else if (flag == "--max-num-seqs") {
      options.max_num_seqs = parse_int(flag, value());
      if (options.max_num_seqs < 1) throw_error("--max-num-seqs must be >= 1");
    } else if (flag == "--expert-imbalance") {
      options.expert_imbalance = parse_double(flag, value());
    } else if (flag == "--attention-bf16") {
      options.attention_bf16 = true;
    } else {
      throw_error("unknown flag '", flag, "'\n", kUsage);
    }
  }
  if (model_path.empty()) throw_error("--model is required\n", kUsage);
  if (hardware_path.empty()) throw_error("--hardware is required\n", kUsage);
  if (quant_name.empty()) throw_error("--quant is required\n", kUsage);
  if (!tp) throw_error("--tp is required\n", kUsage);
  if (!context) throw_error("--context is required\n", kUsage);
  if (*tp < 1 || *tp > 1024) throw_error("--tp must be in [1, 1024] (got ", *tp, ")");
  if (*context < 1) throw_error("--context must be >= 1 (got ", *context, ")");
  options.context = *context;
  if (!efficiency_file.empty() && (bw_eff || compute_eff || overhead_us || latency_us))
    throw_error(
        "--efficiency-file and --bw-eff/--compute-eff/--layer-overhead-us/"
        "--allreduce-latency-us are exclusive");

  const planning::ModelSpec model = planning::load_model_spec(model_path);
  planning::HardwareSpec hardware = planning::load_hardware_spec(hardware_path);
  const planning::QuantSpec quant = planning::quant_from_name(quant_name);
  if (gpus) {
    if (*gpus < 1) throw_error("--gpus must be >= 1");
    hardware.count = static_cast<int>(*gpus);
  }
  if (!efficiency_file.empty()) planning::apply_efficiency_file(hardware, efficiency_file);
  if (bw_eff) hardware.bandwidth_efficiency = *bw_eff;
  if (compute_eff) hardware.compute_efficiency = *compute_eff;
  if (overhead_us) hardware.layer_overhead_us = *overhead_us;
  if (latency_us) hardware.interconnect.latency_us = *latency_us;
  planning::validate_hardware_spec(hardware, "command line");

  const planning::PlanReport report =
      planning::build_plan_report(model, hardware, quant, static_cast<int>(*tp), options);
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
  } catch (const std::exception& error) {
    std::cerr << "keel plan: " << error.what() << "\n";
    return 1;
  }
}

}  // namespace keel
