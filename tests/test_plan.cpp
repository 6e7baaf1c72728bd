// keel plan (issue 6): memory formulas against hand-computed values, quantization byte costs,
// the decode roofline (monotone in batch, never faster than the peaks), the distinct-experts
// formula, fit verdicts, the StepCostModel interface, and the CLI (JSON output, strict YAML,
// bad flags).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/cli/plan_cmd.h"
#include "runtime/tools/planning/plan_report.h"

using namespace keel::planning;

namespace {

std::string config(const std::string& relative) {
  return std::string(KEEL_SOURCE_DIR) + "/configs/" + relative;
}

struct CliResult {
  int code;
  std::string out, err;
};

CliResult run_cli(std::vector<std::string> args) {
  args.insert(args.begin(), {"keel", "plan"});
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  const int code = keel::plan_command(static_cast<int>(argv.size()), argv.data());
  CliResult result{code, testing::internal::GetCapturedStdout(),
                   testing::internal::GetCapturedStderr()};
  return result;
}

}  // namespace

TEST(Quant, BytesPerParamIncludeScales) {
  EXPECT_DOUBLE_EQ(bytes_per_param(QuantKind::bf16), 2.0);
  // fp8: 1 B + one fp32 (4 B) scale per 128 x 128 = 16384 weights.
  EXPECT_DOUBLE_EQ(bytes_per_param(QuantKind::fp8), 1.0 + 4.0 / 16384.0);
  // nvfp4: 4-bit E2M1 + 8-bit E4M3 per 16 -> 4 + 0.5 = 4.5 bits = 0.5625 B.
  EXPECT_DOUBLE_EQ(bytes_per_param(QuantKind::nvfp4), 0.5625);
  // mxfp4: 4 bits + 8-bit E8M0 per 32 -> 4.25 bits = 0.53125 B.
  EXPECT_DOUBLE_EQ(bytes_per_param(QuantKind::mxfp4), 0.53125);
  // int4 group 128: 4 bits + (16-bit scale + 16-bit zero) / 128 = 4.25 bits.
  EXPECT_DOUBLE_EQ(bytes_per_param(QuantKind::int4), 0.53125);
  EXPECT_EQ(quant_from_name("awq").kind, QuantKind::int4);
  EXPECT_THROW(quant_from_name("int3"), keel::Error);
}

TEST(Memory, Mixtral8x7bBf16) {
  const ModelSpec m = load_model_spec(config("models/mixtral-8x7b.yaml"));
  const ModelParams p = count_params(m);
  // One expert: 3 * 4096 * 14336 = 176,160,768; x 8 experts x 32 layers = 45,097,156,608.
  EXPECT_DOUBLE_EQ(p.expert_params, 176160768.0);
  EXPECT_DOUBLE_EQ(p.routed_experts, 45097156608.0);
  // Attention per layer: q 4096*4096 + k,v 2*4096*(8*128) + o 4096*4096 = 41,943,040; x 32.
  EXPECT_DOUBLE_EQ(p.attention, 41943040.0 * 32);
  // Router 4096*8*32 = 1,048,576; norms 2*4096*32 + 4096 = 266,240;
  // embeddings + lm_head 2 * 32000 * 4096 = 262,144,000.
  // Total = 45,097,156,608 + 1,342,177,280 + 1,048,576 + 266,240 + 262,144,000
  //       = 46,702,792,704 (published: 46.7 B).
  EXPECT_DOUBLE_EQ(p.total(), 46702792704.0);

  const HardwareSpec hw = load_hardware_spec(config("hardware/1x-h200.yaml"));
  PlanOptions options;
  options.context = 4096;
  const MemoryPlan plan = plan_memory(m, hw, quant_from_name("bf16"), 1, options);
  // bf16: 2 B per parameter everywhere at TP=1: 93,405,585,408 B = 86.99 GiB.
  EXPECT_DOUBLE_EQ(plan.weight_bytes, 46702792704.0 * 2);
  // KV per token = 2 (K,V) * 32 layers * 8 kv heads * 128 * 2 B = 131,072 B.
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_token, 131072.0);
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_seq, 131072.0 * 4096);
  EXPECT_TRUE(plan.fits);  // 87 GiB of weights in 141 GiB
}

TEST(Memory, Qwen3_30bA3bTp2Fp8Kv) {
  const ModelSpec m = load_model_spec(config("models/qwen3-30b-a3b.yaml"));
  const ModelParams p = count_params(m);
  // Expert 3*2048*768 = 4,718,592; x 128 x 48 = 28,991,029,248.
  EXPECT_DOUBLE_EQ(p.routed_experts, 28991029248.0);
  // Attention: q 2048*4096 + k,v 2*2048*512 + o 4096*2048 = 18,874,368 per layer, x 48.
  EXPECT_DOUBLE_EQ(p.attention, 18874368.0 * 48);
  // + qk norms 2*128*48 = 12,288; router 2048*128*48 = 12,582,912; norms 2*2048*48 + 2048 =
  // 198,656; embeddings + lm_head 2 * 151936 * 2048 = 622,329,856 -> 30,532,122,624 (30.5 B).
  EXPECT_DOUBLE_EQ(p.total(), 30532122624.0);

  const HardwareSpec hw = load_hardware_spec(config("hardware/2x-l40s.yaml"));
  PlanOptions options;
  options.kv_dtype = "fp8";
  options.context = 8192;
  const MemoryPlan plan = plan_memory(m, hw, quant_from_name("fp8"), 2, options);
  // KV per token per GPU: 2 * 48 layers * (4 kv heads / 2 ranks) * 128 * 1 B = 24,576 B.
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_token, 24576.0);
  // Routed experts per GPU: 28,991,029,248 * (1 + 4/16384) / 2.
  EXPECT_DOUBLE_EQ(plan.weights.front().bytes, 28991029248.0 * (1.0 + 4.0 / 16384.0) / 2.0);
  EXPECT_TRUE(plan.fits);
}

TEST(Memory, Qwen35HybridStateAndKv) {
  const ModelSpec m = load_model_spec(config("models/qwen3.5-397b-a17b.yaml"));
  EXPECT_EQ(m.full_attention_layers(), 15);
  const ModelParams p = count_params(m);
  // Experts: 3*4096*1024 = 12,582,912 per expert; x 512 x 60 = 386,547,056,640.
  EXPECT_DOUBLE_EQ(p.routed_experts, 386547056640.0);
  EXPECT_NEAR(p.total() / 1e9, 397.0, 2.0);
  // Active per token excludes the embedding table (a lookup): 16.3 B + 1.0 B embeddings = 17.4 B.
  EXPECT_NEAR(p.active_per_token / 1e9, 17.0, 1.0);

  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  PlanOptions options;  // bf16 KV, context 32768
  const MemoryPlan plan = plan_memory(m, hw, quant_from_name("nvfp4"), 4, options);
  // KV per token per GPU: 2 * 15 full layers * ceil(2 kv heads / 4) = 1 * 256 * 2 B = 15,360 B.
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_token, 15360.0);
  // Gated DeltaNet state per sequence per GPU, 45 layers:
  //   recurrent (64/4) v-heads * 128 * 128 * 4 B (fp32) = 1,048,576
  //   conv (2*16*128 + 64*128)/4 = 3072 channels * (4-1) * 2 B = 18,432
  //   45 * 1,067,008 = 48,015,360 B.
  EXPECT_DOUBLE_EQ(plan.state_bytes_per_seq, 48015360.0);
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_seq, 15360.0 * 32768 + 48015360.0);
}

TEST(Memory, DeepSeekV3MlaAndDenseLayers) {
  const ModelSpec m = load_model_spec(config("models/deepseek-v3.yaml"));
  const ModelParams p = count_params(m);
  EXPECT_NEAR(p.total() / 1e9, 671.0, 1.0);  // 671.03 B by the formulas
  EXPECT_NEAR(p.active_per_token / 1e9, 37.0, 1.0);
  // 3 dense layers of 3 * 7168 * 18432.
  EXPECT_DOUBLE_EQ(p.dense_mlp, 3.0 * 3 * 7168 * 18432);
  const HardwareSpec hw = load_hardware_spec(config("hardware/8x-h200.yaml"));
  PlanOptions options;
  const MemoryPlan plan = plan_memory(m, hw, quant_from_name("fp8"), 8, options);
  // MLA latent per token: 61 layers * (512 + 64) * 2 B = 70,272 B, replicated on every rank.
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_token, 70272.0);
  EXPECT_TRUE(plan.fits);
}

TEST(Memory, GptOssSlidingWindowCapsKv) {
  const ModelSpec m = load_model_spec(config("models/gpt-oss-120b.yaml"));
  const HardwareSpec hw = load_hardware_spec(config("hardware/1x-h100-sxm.yaml"));
  PlanOptions options;
  options.attention_bf16 = true;
  const MemoryPlan plan = plan_memory(m, hw, quant_from_name("mxfp4"), 1, options);
  // Per layer 2 * 8 * 64 * 2 B = 2048 B; 18 full layers -> 36,864 B per token; 18 sliding
  // layers hold at most 128 tokens: 36,864 * 128 per sequence.
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_token, 36864.0);
  EXPECT_DOUBLE_EQ(plan.kv_bytes_per_seq, 36864.0 * 32768 + 36864.0 * 128);
  EXPECT_TRUE(plan.fits);
}

TEST(Memory, Qwen35FitsOnlyWhenQuantized) {
  const ModelSpec m = load_model_spec(config("models/qwen3.5-397b-a17b.yaml"));
  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  PlanOptions options;
  const MemoryPlan bf16 = plan_memory(m, hw, quant_from_name("bf16"), 4, options);
  EXPECT_FALSE(bf16.fits);
  EXPECT_EQ(bf16.max_seqs, 0);
  // ~198 GB of weights per GPU on 96 GiB: short by ~100 GiB.
  EXPECT_GT(bf16.short_by_bytes / kGiB, 80.0);
  EXPECT_EQ(bf16.biggest.front().rfind("routed experts", 0), 0u);
  const MemoryPlan fp4 = plan_memory(m, hw, quant_from_name("nvfp4"), 4, options);
  EXPECT_TRUE(fp4.fits);
  EXPECT_GT(fp4.max_seqs, 10);
}

TEST(Perf, DistinctExperts) {
  EXPECT_NEAR(expected_distinct_experts(512, 10, 1), 10.0, 1e-9);  // B = 1: exactly k
  EXPECT_NEAR(expected_distinct_experts(8, 2, 1), 2.0, 1e-12);
  EXPECT_NEAR(expected_distinct_experts(512, 10, 10000), 512.0, 1e-6);  // B large: -> E
  // B = 2: E * (1 - (1 - k/E)^2) = 8 * (1 - 0.5625) = 3.5.
  EXPECT_NEAR(expected_distinct_experts(8, 2, 2), 3.5, 1e-12);
}

TEST(Perf, DecodeMonotoneAndBoundedByRoofline) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"models/qwen3.5-397b-a17b.yaml", "hardware/4x-rtx-pro-6000.yaml"},
      {"models/mixtral-8x7b.yaml", "hardware/8x-h100-sxm.yaml"},
      {"models/deepseek-v3.yaml", "hardware/8x-h200.yaml"},
      {"models/olmoe-1b-7b.yaml", "hardware/1x-rtx-pro-6000.yaml"}};
  for (const auto& [model_path, hw_path] : cases) {
    const ModelSpec m = load_model_spec(config(model_path));
    const HardwareSpec hw = load_hardware_spec(config(hw_path));
    const QuantSpec quant = quant_from_name("nvfp4");
    PlanOptions options;
    options.context = 4096;
    RooflineCostModel cost(m, hw, quant, hw.count, options);
    const double peak_flops =
        std::max(cost.peak_linear_flops(), hw.peak_flops(ComputePrecision::bf16));
    double last_step = 0, last_rate = 0;
    for (int64_t b = 1; b <= 2048; b = b < 64 ? b + 1 : b * 2) {
      const StepBreakdown s = cost.breakdown({b, b, 0, b * options.context});
      const double rate = static_cast<double>(b) / s.seconds;
      EXPECT_GE(s.seconds, last_step) << model_path << " B=" << b;
      EXPECT_GE(rate, last_rate * (1 - 1e-12)) << model_path << " B=" << b;
      EXPECT_GE(s.seconds, s.bytes() / cost.peak_bandwidth()) << model_path;
      EXPECT_GE(s.seconds, s.flops() / peak_flops) << model_path;
      last_step = s.seconds;
      last_rate = rate;
    }
  }
}

TEST(Perf, StepCostModelInterface) {
  const ModelSpec m = load_model_spec(config("models/qwen3-30b-a3b.yaml"));
  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  PlanOptions options;
  std::unique_ptr<StepCostModel> cost =
      make_roofline_cost_model(m, hw, quant_from_name("fp8"), 4, options);
  EXPECT_EQ(cost->step_seconds({0, 0, 0, 0}), 0.0);
  const double decode = cost->step_seconds({8, 8, 0, 8 * 1000});
  // Adding a 2048-token prefill chunk to the same step only adds time.
  const double mixed = cost->step_seconds({9, 8, 2048, 8 * 1000 + 2048});
  EXPECT_GT(mixed, decode);
  // A large prefill on one GPU is compute-bound; at TP=4 over PCIe the two all-reduces per layer
  // of 8192 x 2048 bf16 activations (~1 ms each) dominate instead.
  const HardwareSpec one = load_hardware_spec(config("hardware/1x-rtx-pro-6000.yaml"));
  RooflineCostModel single(m, one, quant_from_name("fp8"), 1, options);
  EXPECT_STREQ(single.breakdown({1, 0, 8192, 8192}).bound, "compute");
  RooflineCostModel roofline(m, hw, quant_from_name("fp8"), 4, options);
  EXPECT_STREQ(roofline.breakdown({1, 0, 8192, 8192}).bound, "interconnect");
  EXPECT_GT(roofline.ttft_seconds(16384), roofline.ttft_seconds(8192));
  // NVLink beats PCIe on communication for the same step.
  const HardwareSpec h100 = load_hardware_spec(config("hardware/4x-h100-sxm.yaml"));
  RooflineCostModel nvlink(m, h100, quant_from_name("fp8"), 4, options);
  EXPECT_LT(nvlink.breakdown({64, 64, 0, 64 * 1000}).t_comm,
            roofline.breakdown({64, 64, 0, 64 * 1000}).t_comm);
}

TEST(Report, DecodeTableEndsAtMemoryFill) {
  const ModelSpec m = load_model_spec(config("models/qwen3.5-397b-a17b.yaml"));
  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  PlanOptions options;
  const PlanReport r = build_plan_report(m, hw, quant_from_name("nvfp4"), 4, options);
  ASSERT_FALSE(r.decode.empty());
  EXPECT_EQ(r.decode.front().batch, 1);
  EXPECT_EQ(r.decode.back().batch, r.memory.max_seqs);
  EXPECT_GE(r.full_batch.tokens_per_s, r.single_stream.tokens_per_s);
  EXPECT_THROW(build_plan_report(m, hw, quant_from_name("nvfp4"), 8, options), keel::Error);
}

TEST(Cli, JsonParsesAndTextHasVerdict) {
  const std::vector<std::string> base = {"--model",    config("models/qwen3.5-397b-a17b.yaml"),
                                         "--hardware", config("hardware/4x-rtx-pro-6000.yaml"),
                                         "--tp",       "4",
                                         "--context",  "32768"};
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--quant", "nvfp4", "--json", "--kv-dtype", "fp8"});
  CliResult json = run_cli(args);
  ASSERT_EQ(json.code, 0) << json.err;
  const nlohmann::json j = nlohmann::json::parse(json.out);
  EXPECT_TRUE(j["memory"]["fits"].get<bool>());
  EXPECT_EQ(j["kv_dtype"], "fp8");
  EXPECT_GT(j["memory"]["max_concurrent_seqs"].get<int64_t>(), 0);
  EXPECT_FALSE(j["decode"].empty());
  EXPECT_TRUE(j["prefill"].contains("ttft_s"));

  args = base;
  args.insert(args.end(), {"--quant", "bf16"});
  CliResult text = run_cli(args);
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("does not fit: short by"), std::string::npos) << text.out;

  args = base;
  args.insert(args.end(), {"--quant", "nvfp4", "--bw-eff", "0.5", "--compute-eff", "0.4",
                           "--layer-overhead-us", "30"});
  CliResult overridden = run_cli(args);
  ASSERT_EQ(overridden.code, 0) << overridden.err;
  EXPECT_NE(overridden.out.find("verdict: fits"), std::string::npos);
}

TEST(Cli, ErrorsExitOne) {
  const std::string model = config("models/mixtral-8x7b.yaml");
  const std::string hw = config("hardware/2x-rtx-pro-6000.yaml");
  CliResult bad_flag = run_cli({"--model", model, "--hardware", hw, "--quant", "bf16", "--tp", "2",
                                "--context", "4096", "--frobnicate"});
  EXPECT_EQ(bad_flag.code, 1);
  EXPECT_NE(bad_flag.err.find("unknown flag '--frobnicate'"), std::string::npos);
  CliResult bad_number = run_cli(
      {"--model", model, "--hardware", hw, "--quant", "bf16", "--tp", "two", "--context", "4096"});
  EXPECT_EQ(bad_number.code, 1);
  EXPECT_NE(bad_number.err.find("--tp: 'two' is not a positive integer"), std::string::npos)
      << bad_number.err;
  CliResult missing = run_cli({"--model", model, "--hardware", hw, "--tp=2", "--context=4096"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.err.find("--quant is required"), std::string::npos) << missing.err;
  CliResult bad_quant = run_cli(
      {"--model", model, "--hardware", hw, "--quant", "int3", "--tp", "2", "--context", "4096"});
  EXPECT_EQ(bad_quant.code, 1);
  CliResult exclusive =
      run_cli({"--model", model, "--hardware", hw, "--quant", "bf16", "--tp", "2", "--context",
               "4096", "--efficiency-file", "x.yaml", "--bw-eff", "0.5"});
  EXPECT_EQ(exclusive.code, 1);

  // Unknown YAML keys name the file and the key.
  const std::string path = testing::TempDir() + "plan_bad_model.yaml";
  {
    std::ifstream in(model);
    std::ofstream out(path);
    out << in.rdbuf() << "num_experts_per_token: 2\n";
  }
  CliResult unknown = run_cli(
      {"--model", path, "--hardware", hw, "--quant", "bf16", "--tp", "2", "--context", "4096"});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_NE(unknown.err.find(path), std::string::npos) << unknown.err;
  EXPECT_NE(unknown.err.find("unknown key 'num_experts_per_token'"), std::string::npos);
  std::remove(path.c_str());

  const std::string hw_path = testing::TempDir() + "plan_bad_hw.yaml";
  {
    std::ifstream in(hw);
    std::ofstream out(hw_path);
    out << in.rdbuf() << "nvlink: true\n";
  }
  CliResult unknown_hw = run_cli({"--model", model, "--hardware", hw_path, "--quant", "bf16",
                                  "--tp", "2", "--context", "4096"});
  EXPECT_EQ(unknown_hw.code, 1);
  EXPECT_NE(unknown_hw.err.find("unknown key 'nvlink'"), std::string::npos);
  std::remove(hw_path.c_str());

  // A gen-model preset is not a planning preset.
  CliResult gen = run_cli({"--model", config("models/small.yaml"), "--hardware", hw, "--quant",
                           "bf16", "--tp", "2", "--context", "4096"});
  EXPECT_EQ(gen.code, 1);
}
