// keel plan (issue 6): memory formulas against hand-computed values, quantization byte costs,
// the decode roofline (monotone in batch, never faster than the peaks), the distinct-experts
// formula, fit verdicts, the StepCostModel interface, and the CLI (JSON output, strict YAML,
// bad flags). Issue 15: each term of the measured-GPU model by hand arithmetic (kernel
// launches by layer kind with and without CUDA graphs, all-reduce per algorithm, MoE tile
// padding, expert-parallel busiest rank, GDN state traffic, MTP speculative decoding), the
// engine profile's fit to its two published points, and the validation table.
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
#include "runtime/tools/planning/plan_validate.h"

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

// --max-num-seqs caps the running batch as the scheduler does: at 2048 tokens of context the
// 397B fits several hundred sequences on 4x RTX PRO 6000, but a scheduler of 128 runs 128.
TEST(Report, DecodeTableStopsAtMaxNumSeqs) {
  const ModelSpec m = load_model_spec(config("models/qwen3.5-397b-a17b.yaml"));
  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  PlanOptions options;
  options.context = 2048;
  options.max_num_seqs = 128;
  const PlanReport r = build_plan_report(m, hw, quant_from_name("nvfp4"), 4, options);
  ASSERT_GT(r.memory.max_seqs, 128);
  EXPECT_EQ(r.decode.back().batch, 128);
  EXPECT_EQ(r.full_batch.batch, 128);
  options.max_num_seqs = 100;  // not a power of two: the table still ends at the cap
  const PlanReport capped = build_plan_report(m, hw, quant_from_name("nvfp4"), 4, options);
  EXPECT_EQ(capped.decode.back().batch, 100);
  EXPECT_EQ(capped.decode[capped.decode.size() - 2].batch, 64);
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

namespace {

// The published deployment of issue 15: Qwen3.5-397B-A17B, routed experts NVFP4, attention, GDN
// and the shared expert bf16, FP8 KV, 4x RTX PRO 6000 at TP=4.
struct Deployment {
  ModelSpec model = load_model_spec(config("models/qwen3.5-397b-a17b.yaml"));
  HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  QuantSpec quant = quant_from_name("nvfp4");
  PlanOptions options;
  Deployment() {
    apply_efficiency_file(hw, config("engines/vllm-4x-rtx-pro-6000-pcie.yaml"));
    options.kv_dtype = "fp8";
    options.attention_bf16 = true;
    options.shared_expert_bf16 = true;
    options.reserve_gib = 9.6;
    options.context = 256;
  }
};

StepShape decode(int64_t batch, int64_t context) {
  return {batch, batch, 0, batch * context};
}

}  // namespace

TEST(Launch, KernelsByLayerKindWithAndWithoutGraphs) {
  Deployment d;
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  const StepBreakdown one = cost.breakdown(decode(1, 256));
  // 45 GDN layers x 9 + 15 full-attention layers x 10 + 60 MoE layers x 15 + 7 per step
  // = 405 + 150 + 900 + 7 = 1462 kernels.
  EXPECT_DOUBLE_EQ(one.kernels, 1462.0);
  // Decode of 1 token replays the CUDA graph: 1462 x 5.21 us = 7.61702 ms (layer_overhead 0).
  EXPECT_DOUBLE_EQ(one.launch_us, 5.21);
  EXPECT_NEAR(one.t_overhead, 1462 * 5.21e-6, 1e-12);
  // Graphs off: every kernel launched eagerly, 1462 x 8.0 us = 11.696 ms.
  HardwareSpec eager = d.hw;
  eager.engine.cuda_graphs = false;
  RooflineCostModel no_graph(d.model, eager, d.quant, 4, d.options);
  EXPECT_NEAR(no_graph.breakdown(decode(1, 256)).t_overhead, 1462 * 8.0e-6, 1e-12);
  // A prefill step never replays a decode graph; a decode batch above the capture size (512)
  // runs eagerly too.
  EXPECT_DOUBLE_EQ(cost.breakdown({1, 0, 2048, 2048}).launch_us, 8.0);
  EXPECT_DOUBLE_EQ(cost.breakdown(decode(512, 256)).launch_us, 5.21);
  EXPECT_DOUBLE_EQ(cost.breakdown(decode(513, 256)).launch_us, 8.0);
  // A dense model counts dense MLP layers: Mixtral has none (all 32 MoE, full attention):
  // 32 x (10 + 15) + 7 = 807.
  const ModelSpec mixtral = load_model_spec(config("models/mixtral-8x7b.yaml"));
  RooflineCostModel mix(mixtral, d.hw, quant_from_name("fp8"), 4, PlanOptions{});
  EXPECT_DOUBLE_EQ(mix.breakdown(decode(1, 256)).kernels, 32 * 25 + 7);
}

TEST(AllReduce, LatencyAndBandwidthPerAlgorithm) {
  // 4x RTX PRO 6000 preset: 64 GB/s x 0.8 = 51.2 GB/s; ring 4.0 us/hop; one-shot 7.5 us;
  // two-shot 15.0 us. One decode token's hidden state: 4096 x 2 B = 8192 B.
  const HardwareSpec hw = load_hardware_spec(config("hardware/4x-rtx-pro-6000.yaml"));
  const double link = 51.2e9;
  // ring: 2(n-1) x 4 us + 2(n-1)/n x S / B = 24 us + 1.5 x 8192 / 51.2e9 = 24.24 us.
  EXPECT_NEAR(allreduce_seconds(hw, AllReduceAlgorithm::ring, 4, 8192), 24e-6 + 1.5 * 8192 / link,
              1e-15);
  // one-shot: 7.5 us + (n-1) x S / B = 7.5 + 0.48 = 7.98 us.
  EXPECT_NEAR(allreduce_seconds(hw, AllReduceAlgorithm::one_shot, 4, 8192),
              7.5e-6 + 3.0 * 8192 / link, 1e-15);
  // two-shot: 15 us + 1.5 x S / B = 15.24 us.
  EXPECT_NEAR(allreduce_seconds(hw, AllReduceAlgorithm::two_shot, 4, 8192),
              15e-6 + 1.5 * 8192 / link, 1e-15);
  // auto takes the cheapest: one-shot at 8 KB; at 1 MiB one-shot is 7.5 + 61.44 = 68.94 us,
  // ring 24 + 30.72 = 54.72 us, two-shot 15 + 30.72 = 45.72 us -> two-shot.
  AllReduceAlgorithm used = AllReduceAlgorithm::ring;
  allreduce_seconds(hw, AllReduceAlgorithm::automatic, 4, 8192, &used);
  EXPECT_EQ(used, AllReduceAlgorithm::one_shot);
  EXPECT_NEAR(allreduce_seconds(hw, AllReduceAlgorithm::automatic, 4, 1048576, &used),
              15e-6 + 1.5 * 1048576 / link, 1e-15);
  EXPECT_EQ(used, AllReduceAlgorithm::two_shot);
  EXPECT_EQ(allreduce_seconds(hw, AllReduceAlgorithm::ring, 1, 8192), 0.0);

  // Two calls per layer plus the logits gather. The vLLM profile: ring, 4.0 us/hop, link
  // 64 x 0.614 = 39.296 GB/s, bf16 logits. B = 1: 120 x (24 + 1.5 x 8192 / 39.296e9 us) +
  // (3/4 x 248320 x 2 / 39.296e9 + 3 x 4 us).
  Deployment d;
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  const double vlink = 64e9 * 0.614;
  const double ar = 24e-6 + 1.5 * 8192 / vlink;
  const double gather = 0.75 * 248320 * 2 / vlink + 3 * 4e-6;
  EXPECT_NEAR(cost.breakdown(decode(1, 256)).t_comm, 120 * ar + gather, 1e-12);
  EXPECT_STREQ(cost.breakdown(decode(1, 256)).allreduce_algorithm, "ring");
}

TEST(Moe, TilePaddingAtSmallM) {
  // E[ceil(X / tile)] for X ~ Binomial(n, p). n = 1: P(X = 1) = p.
  EXPECT_NEAR(expected_tiles(1, 10.0 / 512, 128), 10.0 / 512, 1e-15);
  // n = 2, p = 1/2: P(X=1) = 1/2, P(X=2) = 1/4. Tile 1: E[X] = 1; tile 2: 1/2 + 1/4 = 3/4.
  EXPECT_NEAR(expected_tiles(2, 0.5, 1), 1.0, 1e-12);
  EXPECT_NEAR(expected_tiles(2, 0.5, 2), 0.75, 1e-12);
  // Tile 2, n = 3, p = 1/2: P(1) = 3/8 -> 1 tile, P(2) = 3/8 -> 1, P(3) = 1/8 -> 2 tiles:
  // 3/8 + 3/8 + 2/8 = 1.
  EXPECT_NEAR(expected_tiles(3, 0.5, 2), 1.0, 1e-12);

  Deployment d;
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  // B = 1: the 10 routed experts each compute one 128-row tile: 512 x (10/512) x 128 = 1280
  // rows per layer for 10 useful rows.
  const StepBreakdown one = cost.breakdown(decode(1, 256));
  EXPECT_NEAR(one.padded_expert_rows, 1280.0, 1e-9);
  // Their FLOPs: 60 layers x 1280 rows x 2 x 12,582,912 / 4 params, + 2 x non-expert active.
  const ModelParams& p = cost.memory().params;
  const double dense_active = p.active_per_token - p.expert_params * 10 * 60;
  EXPECT_NEAR(one.linear_flops, 60 * 1280 * 2.0 * 12582912 / 4 + 2.0 * dense_active / 4, 1e3);
  // Padded rows never fall below the useful rows and grow with the batch.
  double last = 0;
  for (int64_t b : {1, 2, 4, 16, 64, 128, 512, 2048, 8192}) {
    const double rows = cost.breakdown(decode(b, 256)).padded_expert_rows;
    EXPECT_GE(rows, 10.0 * b * (1 - 1e-9)) << b;
    EXPECT_GE(rows, last) << b;
    last = rows;
  }
}

TEST(Moe, ExpertParallelBusiestRank) {
  // c_n = E[max of n standard normals]: c_1 = 0, c_2 = 1/sqrt(pi), c_3 = 3/(2 sqrt(pi)).
  EXPECT_NEAR(expected_max_standard_normal(1), 0.0, 1e-12);
  EXPECT_NEAR(expected_max_standard_normal(2), 1.0 / std::sqrt(M_PI), 1e-7);
  EXPECT_NEAR(expected_max_standard_normal(3), 1.5 / std::sqrt(M_PI), 1e-7);
  EXPECT_NEAR(expected_max_standard_normal(4), 1.0293754, 1e-6);

  Deployment d;
  d.options.expert_parallel = true;
  RooflineCostModel ep(d.model, d.hw, d.quant, 4, d.options);
  // B = 1, 128 experts per rank, p = 10/512: mean 2.5 experts, variance 128 p (1-p) =
  // 2.5 x 502/512; busiest rank 2.5 + c_4 sqrt(2.451171875) = 2.5 + 1.0293754 x 1.5656219.
  const StepBreakdown one = ep.breakdown(decode(1, 256));
  EXPECT_NEAR(one.busiest_rank_experts, 2.5 + 1.0293754 * std::sqrt(2.5 * 502.0 / 512), 1e-5);
  // Those are whole experts (12,582,912 x 0.5625 B each), not 1/4 slices.
  RooflineCostModel tp(d.model, d.hw, d.quant, 4, Deployment().options);
  const double expert = 12582912 * 0.5625;
  EXPECT_NEAR(one.weight_bytes - tp.breakdown(decode(1, 256)).weight_bytes,
              60 * (one.busiest_rank_experts * expert - 10 * expert / 4), 1.0);
  // Large batches: every rank reads all its 128 experts, no more.
  EXPECT_NEAR(ep.breakdown(decode(4096, 256)).busiest_rank_experts, 128.0, 1e-9);
  // Tensor-parallel experts: every rank carries the mean (D(1) = 10 slices).
  EXPECT_NEAR(tp.breakdown(decode(1, 256)).busiest_rank_experts, 10.0, 1e-12);
}

TEST(Gdn, StateTrafficPerDecodeStep) {
  Deployment d;
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  // Per sequence per rank: recurrent 45 x (64/4) x 128 x 128 x 4 B = 47,185,920 B (45 MiB),
  // conv 45 x 3072 x 3 x 2 B = 829,440 B; each read and written once per step.
  EXPECT_DOUBLE_EQ(cost.memory().recurrent_state_bytes, 47185920.0);
  EXPECT_DOUBLE_EQ(cost.memory().conv_state_bytes, 829440.0);
  EXPECT_DOUBLE_EQ(cost.breakdown(decode(1, 256)).state_bytes, 2 * (47185920.0 + 829440.0));
  // B = 128: 12.29 GB, 22% of the 54.6 GB of weights the step reads.
  const StepBreakdown full = cost.breakdown(decode(128, 256));
  EXPECT_DOUBLE_EQ(full.state_bytes, 128 * 2 * (47185920.0 + 829440.0));
  EXPECT_GT(full.state_bytes, 0.2 * full.weight_bytes);
  // MTP with K = 2: the state is written after each of the 3 verified positions, read once.
  Deployment spec;
  spec.options.speculative = parse_speculative("mtp:2", "0.926");
  RooflineCostModel mtp(spec.model, spec.hw, spec.quant, 4, spec.options);
  EXPECT_DOUBLE_EQ(mtp.breakdown(decode(1, 256)).state_bytes, 47185920.0 * (1 + 3) + 2 * 829440.0);
  // And holds 2 extra recurrent slots per sequence: 45 x (3 x 1,048,576 + 18,432).
  EXPECT_DOUBLE_EQ(mtp.memory().state_bytes_per_seq, 45.0 * (3 * 1048576 + 18432));
}

TEST(Speculative, TokensPerStepAndVerifyCost) {
  // One conditional rate: position i accepted with A^i: 1 + 0.926 + 0.926^2 = 2.783476.
  const SpeculativeConfig a = parse_speculative("mtp:2", "0.926");
  EXPECT_NEAR(a.tokens_per_step(), 1 + 0.926 + 0.926 * 0.926, 1e-12);
  // Per-position rates as vLLM reports them: 1 + 0.85 + 0.67 + 0.51 = 3.03.
  EXPECT_NEAR(parse_speculative("mtp:3", "0.85,0.67,0.51").tokens_per_step(), 3.03, 1e-12);
  EXPECT_THROW(parse_speculative("mtp:2", "0.5,0.7"), keel::Error);  // rates must not increase
  EXPECT_THROW(parse_speculative("mtp:2", "0.5,0.4,0.3"), keel::Error);
  EXPECT_THROW(parse_speculative("mtp:2", ""), keel::Error);
  EXPECT_THROW(parse_speculative("eagle:2", "0.5"), keel::Error);
  EXPECT_THROW(parse_speculative("none", "0.5"), keel::Error);
  EXPECT_EQ(parse_speculative("none", "").num_draft_tokens, 0);

  Deployment base, spec;
  spec.options.speculative = a;
  RooflineCostModel off(base.model, base.hw, base.quant, 4, base.options);
  RooflineCostModel on(spec.model, spec.hw, spec.quant, 4, spec.options);
  for (int64_t b : {1, 8, 64}) {
    const StepBreakdown s0 = off.breakdown(decode(b, 256));
    const StepBreakdown s1 = on.breakdown(decode(b, 256));
    // The verify step runs 3 tokens per sequence: 2 more new KV entries each, 7680 B per token
    // per rank (15 layers x K,V x 1 head x 256 x 1 B fp8), and 3x the attention pairs.
    EXPECT_NEAR(s1.kv_bytes - s0.kv_bytes, 2.0 * b * 7680, 1e-3) << b;
    EXPECT_GT(s1.linear_flops, s0.linear_flops) << b;
    // K = 2 draft steps, each one decoder layer's launches (10 + 15 + 7 = 32 kernels).
    EXPECT_DOUBLE_EQ(s1.kernels, s0.kernels + 2 * 32) << b;
    EXPECT_GT(s1.t_draft, 0) << b;
    EXPECT_NEAR(s1.seconds,
                std::max(s1.t_bandwidth, s1.t_compute) + s1.t_comm + s1.t_overhead + s1.t_draft,
                1e-15);
    // A step costs more, and yields 2.78 tokens per sequence: faster per token at these sizes.
    EXPECT_GT(s1.seconds, s0.seconds) << b;
    EXPECT_DOUBLE_EQ(s1.tokens_per_seq, a.tokens_per_step());
    EXPECT_GT(s1.tokens_per_seq / s1.seconds, 1.0 / s0.seconds) << b;
  }
  // The simulator's view: a pure decode step costs the speculative step / 2.783476 per token.
  std::unique_ptr<StepCostModel> sim =
      make_roofline_cost_model(spec.model, spec.hw, spec.quant, 4, spec.options);
  EXPECT_NEAR(sim->step_seconds(decode(8, 256)),
              on.breakdown(decode(8, 256)).seconds / a.tokens_per_step(), 1e-15);
  // A prefill-only step has no draft.
  EXPECT_DOUBLE_EQ(sim->step_seconds({1, 0, 512, 512}), off.step_seconds({1, 0, 512, 512}));
}

TEST(Calibration, ProfileReproducesItsTwoPublishedPoints) {
  Deployment d;
  ASSERT_EQ(d.hw.engine.fitted_to.size(), 2u);
  EXPECT_DOUBLE_EQ(d.hw.engine.fitted_to[0].published_tokens_per_s, 71.6);
  EXPECT_DOUBLE_EQ(d.hw.engine.fitted_to[1].published_tokens_per_s, 2276.5);
  EXPECT_EQ(d.hw.engine.fitted_keys,
            (std::vector<std::string>{"launch_us_graph", "bandwidth_efficiency"}));
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  // Context 256 = short prompt + half of 512 generated tokens.
  const double one = 1.0 / cost.step_seconds(decode(1, 256));
  const double full = 128.0 / cost.step_seconds(decode(128, 256));
  EXPECT_NEAR(one / 71.6, 1.0, 0.01);  // goal: within 10%; the fit is within 1%
  EXPECT_NEAR(full / 2276.5, 1.0, 0.01);
  // The single stream is launch-bound: 1462 kernels x 5.21 us = 7.6 ms of the 14.0 ms step.
  EXPECT_STREQ(cost.breakdown(decode(1, 256)).bound, "overhead");
}

TEST(Calibration, MonotoneInBatchAndContextNeverAboveRoofline) {
  std::vector<Deployment> cases(3);
  cases[1].options.speculative = parse_speculative("mtp:2", "0.926");
  cases[2].options.expert_parallel = true;
  for (const Deployment& d : cases) {
    RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
    const double peak_flops =
        std::max(cost.peak_linear_flops(), d.hw.peak_flops(ComputePrecision::bf16));
    for (int64_t context : {256, 4096, 32768, 131072}) {
      double last_step = 0, last_rate = 0, last_launch = 0;
      for (int64_t b = 1; b <= 2048; b = b < 64 ? b + 1 : b * 2) {
        const StepBreakdown s = cost.breakdown(decode(b, context));
        const double rate = static_cast<double>(b) * s.tokens_per_seq / s.seconds;
        EXPECT_GE(s.seconds, last_step) << b << " " << context;
        // Throughput grows with the batch within a launch regime; past the CUDA-graph capture
        // size (512) the engine launches eagerly and loses the launch difference once.
        if (s.launch_us == last_launch) {
          EXPECT_GE(rate, last_rate * (1 - 1e-12)) << b << " " << context;
        }
        EXPECT_GE(s.seconds, s.bytes() / cost.peak_bandwidth()) << b;
        EXPECT_GE(s.seconds, s.flops() / peak_flops) << b;
        // And a longer context never makes a step faster.
        if (context > 256) {
          EXPECT_GE(s.seconds, cost.breakdown(decode(b, context / 8)).seconds) << b;
        }
        last_step = s.seconds;
        last_rate = rate;
        last_launch = s.launch_us;
      }
    }
  }
  // The one drop, at the capture size: B = 512 -> 513 adds 1462 x (8.0 - 5.21) us = 4.08 ms.
  Deployment d;
  RooflineCostModel cost(d.model, d.hw, d.quant, 4, d.options);
  EXPECT_NEAR(
      cost.breakdown(decode(513, 256)).t_overhead - cost.breakdown(decode(512, 256)).t_overhead,
      1462 * (8.0 - 5.21) * 1e-6, 1e-12);
}

TEST(Calibration, ValidationTableRowsAndErrors) {
  const ValidationResult r = validate_plan_table(config("validation/qwen3.5-397b-a17b.yaml"));
  ASSERT_GE(r.rows.size(), 40u);
  int fitted = 0;
  for (const ValidationRow& row : r.rows) {
    EXPECT_NEAR(row.error, row.predicted / row.published - 1.0, 1e-12);
    EXPECT_GE(row.batch, 1);
    EXPECT_LE(row.batch, row.concurrency);
    if (row.fit) ++fitted;
  }
  EXPECT_EQ(fitted, 2);
  EXPECT_LT(r.max_abs_error_fit, 0.01);
  // The first row is the 71.6 tok/s single stream it was fitted to.
  EXPECT_DOUBLE_EQ(r.rows.front().published, 71.6);
  EXPECT_NEAR(r.rows.front().predicted, 71.6, 0.716);
  const std::string text = render_validation_text(r);
  EXPECT_NE(text.find("(fitted)"), std::string::npos);
  EXPECT_NE(text.find("within 25%"), std::string::npos);
}

TEST(Cli, ValidateAndEngineProfileErrors) {
  CliResult table = run_cli({"--validate", config("validation/qwen3.5-397b-a17b.yaml"), "--json"});
  ASSERT_EQ(table.code, 0) << table.err;
  const nlohmann::json j = nlohmann::json::parse(table.out);
  EXPECT_GE(j["rows"].size(), 40u);
  EXPECT_EQ(j["rows"][0]["published_tokens_per_s"], 71.6);

  const std::string dir = testing::TempDir();
  const std::string bad_table = dir + "plan_bad_table.yaml";
  {
    std::ofstream out(bad_table);
    out << "kind: plan_validation\ngroups:\n  - name: x\n    source: y\n    model: m\n"
           "    hardware: h\n    quant: nvfp4\n    tp: 4\n    colour: red\n    rows: []\n";
  }
  CliResult unknown = run_cli({"--validate", bad_table});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_NE(unknown.err.find("unknown key 'colour'"), std::string::npos) << unknown.err;
  std::remove(bad_table.c_str());

  const std::string bad_engine = dir + "plan_bad_engine.yaml";
  {
    std::ofstream out(bad_engine);
    out << "kind: engine\nkernels:\n  moe: 15\n  attention: 3\n";
  }
  const std::vector<std::string> base = {"--model",    config("models/qwen3.5-397b-a17b.yaml"),
                                         "--hardware", config("hardware/4x-rtx-pro-6000.yaml"),
                                         "--quant",    "nvfp4",
                                         "--tp",       "4",
                                         "--context",  "2048"};
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--efficiency-file", bad_engine});
  CliResult engine = run_cli(args);
  EXPECT_EQ(engine.code, 1);
  EXPECT_NE(engine.err.find("unknown key 'attention'"), std::string::npos) << engine.err;
  std::remove(bad_engine.c_str());

  args = base;
  args.insert(args.end(), {"--efficiency-file", config("engines/vllm-4x-rtx-pro-6000-pcie.yaml"),
                           "--speculative", "mtp:2", "--acceptance", "0.926", "--json"});
  CliResult spec = run_cli(args);
  ASSERT_EQ(spec.code, 0) << spec.err;
  const nlohmann::json plan = nlohmann::json::parse(spec.out);
  EXPECT_NEAR(plan["speculative"]["tokens_per_step"].get<double>(), 2.783476, 1e-6);
  EXPECT_EQ(plan["engine"]["fitted"].size(), 2u);
  args = base;
  args.insert(args.end(), {"--speculative", "mtp:2"});
  CliResult no_rate = run_cli(args);
  EXPECT_EQ(no_rate.code, 1);
  EXPECT_NE(no_rate.err.find("needs --acceptance"), std::string::npos) << no_rate.err;
}
