// The keel command line as users run it: gen-model + generate --json, the determinism promise
// at the CLI, and bad input (corrupt weights, unknown architecture, YAML typos, bad flags)
// giving one clear error line and a non-zero exit, never a crash.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

RunResult run_keel(const std::string& args) {
  std::string command = std::string(KEEL_BINARY_DIR) + "/bin/keel " + args + " 2>&1";
  RunResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t bytes;
  while ((bytes = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, bytes);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

// One scratch directory per test process (ctest runs tests as parallel processes), removed at exit.
struct ScratchDir {
  std::string path = std::string(KEEL_BINARY_DIR) + "/test-cli/pid-" + std::to_string(::getpid());
  ScratchDir() { fs::create_directories(path); }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string work_dir() {
  static ScratchDir dir;
  return dir.path;
}

const std::string& tiny_model() {
  static const std::string dir = [] {
    std::string path = work_dir() + "/tiny";
    RunResult result = run_keel("gen-model --preset tiny --seed 5 --out " + path);
    EXPECT_EQ(result.exit_code, 0) << result.output;
    return path;
  }();
  return dir;
}

nlohmann::json generate_json(const std::string& args) {
  RunResult result = run_keel("generate --model " + tiny_model() + " --json " + args);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  // The JSON object is the last line (stderr log lines, e.g. fp8 KV's warning, come first).
  const size_t end = result.output.find_last_not_of('\n');
  const size_t start = end == std::string::npos ? 0 : result.output.rfind('\n', end);
  return nlohmann::json::parse(result.output.substr(start == std::string::npos ? 0 : start + 1),
                               nullptr, false);
}

TEST(Cli, GenerateJsonHasTokensDigestCountsAndTimings) {
  nlohmann::json out = generate_json(
      "--tp 4 --reduce fixed_order --placement round_robin --prompt-ids 1,2,3 --max-tokens 6");
  ASSERT_FALSE(out.is_discarded());
  EXPECT_EQ(out["tokens"].size(), 6u);
  EXPECT_EQ(out["logits_digest"].get<std::string>().size(), 64u);
  ASSERT_EQ(out["expert_token_counts"].size(), 2u);  // tiny has 2 layers
  EXPECT_EQ(out["expert_token_counts"][0].size(), 16u);
  int64_t routed = 0;
  for (const auto& count : out["expert_token_counts"][0]) routed += count.get<int64_t>();
  EXPECT_EQ(routed, (3 + 5) * 4);  // (3 prompt tokens + 5 decode steps) x top-4
  // Expert timings come from the rank that holds each expert and are merged across ranks:
  // time where tokens went, none where none did.
  ASSERT_EQ(out["expert_seconds"].size(), 2u);
  for (size_t layer = 0; layer < 2; ++layer)
    for (size_t expert = 0; expert < 16; ++expert) {
      bool has_tokens = out["expert_token_counts"][layer][expert].get<int64_t>() > 0;
      double seconds = out["expert_seconds"][layer][expert].get<double>();
      EXPECT_EQ(seconds > 0, has_tokens) << "layer " << layer << " expert " << expert;
      EXPECT_LT(seconds, 1.0);
    }
  EXPECT_TRUE(out["timings"].contains("decode_tokens_per_second"));
  // Rank 0 of 4 holds a quarter of attention, 4 of 16 experts (round_robin), a quarter of the
  // lm_head and the whole replicated embedding: less than the 755 KB checkpoint, more than 1/4.
  EXPECT_GT(out["weight_bytes_rank0"].get<int64_t>(), 755008 / 4);
  EXPECT_LT(out["weight_bytes_rank0"].get<int64_t>(), 755008);
  EXPECT_EQ(out["reduce"], "fixed_order");
}

TEST(Cli, FixedOrderDigestIgnoresBatchComposition) {
  for (const char* placement : {"contiguous", "round_robin"}) {
    std::string common = std::string("--tp 4 --reduce fixed_order --placement ") + placement +
                         " --prompt-ids 9,8,7,6 --max-tokens 8";
    nlohmann::json alone = generate_json(common + " --batch-with 0");
    nlohmann::json batched = generate_json(common + " --batch-with 7");
    EXPECT_EQ(alone["logits_digest"], batched["logits_digest"]) << placement;
    EXPECT_EQ(alone["tokens"], batched["tokens"]) << placement;
    EXPECT_EQ(batched["batch_size"], 8);
    EXPECT_EQ(batched["kv_cache_dtype"], "bf16") << "auto on a bf16 checkpoint";
  }
  // Every KV cache dtype keeps the promise (rounding at append, per element).
  for (const char* kv_dtype : {"fp32", "bf16", "fp8_e4m3"}) {
    std::string common = std::string("--tp 4 --reduce fixed_order --kv-cache-dtype ") + kv_dtype +
                         " --prompt-ids 9,8,7,6 --max-tokens 8";
    nlohmann::json alone = generate_json(common + " --batch-with 0");
    nlohmann::json batched = generate_json(common + " --batch-with 7");
    EXPECT_EQ(alone["logits_digest"], batched["logits_digest"]) << kv_dtype;
    EXPECT_EQ(alone["tokens"], batched["tokens"]) << kv_dtype;
    EXPECT_EQ(alone["kv_cache_dtype"], kv_dtype);
  }
}

TEST(Cli, ExplicitPlacementFromDeploymentYaml) {
  nlohmann::json out = generate_json(std::string("--config ") + KEEL_SOURCE_DIR +
                                     "/configs/deployments/explicit-tiny.yaml --max-tokens 4");
  EXPECT_EQ(out["placement"], "explicit");
  EXPECT_EQ(out["tp"], 4);
  EXPECT_EQ(out["tokens"].size(), 4u);
}

// Copies the tiny model and lets `corrupt` damage the copy.
std::string corrupted_copy(const std::string& name,
                           const std::function<void(const std::string&)>& corrupt) {
  std::string dir = work_dir() + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(tiny_model()))
    fs::copy_file(entry.path(), dir + "/" + entry.path().filename().string());
  corrupt(dir);
  return dir;
}

void expect_clean_failure(const std::string& args, const std::string& expected_text) {
  RunResult result = run_keel(args);
  EXPECT_EQ(result.exit_code, 1) << result.output;
  EXPECT_NE(result.output.find(expected_text), std::string::npos)
      << "expected '" << expected_text << "' in:\n"
      << result.output;
  EXPECT_EQ(result.output.find("FATAL"), std::string::npos) << result.output;
}

TEST(CliErrors, TruncatedSafetensors) {
  std::string dir = corrupted_copy("truncated", [](const std::string& path) {
    fs::resize_file(path + "/model.safetensors", fs::file_size(path + "/model.safetensors") / 2);
  });
  expect_clean_failure("generate --model " + dir, "model.safetensors");
  expect_clean_failure("generate --model " + dir, "outside the file");
}

TEST(CliErrors, HeaderPointingOutsideTheFile) {
  std::string dir = corrupted_copy("outside", [](const std::string& path) {
    std::string file_path = path + "/model.safetensors";
    std::ifstream in(file_path, std::ios::binary);
    uint64_t header_length = 0;
    in.read(reinterpret_cast<char*>(&header_length), 8);
    std::string header(header_length, ' ');
    in.read(header.data(), static_cast<std::streamsize>(header_length));
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    in.close();
    // Shift the last tensor 900 KB past the end: its size stays consistent with its shape,
    // only its offsets point outside the file.
    nlohmann::json json = nlohmann::json::parse(header);
    std::string victim;
    uint64_t last_end = 0;
    for (auto& [name, entry] : json.items())
      if (name != "__metadata__" && entry["data_offsets"][1].get<uint64_t>() > last_end) {
        last_end = entry["data_offsets"][1].get<uint64_t>();
        victim = name;
      }
    auto& offsets = json[victim]["data_offsets"];
    offsets = {offsets[0].get<uint64_t>() + 900000, offsets[1].get<uint64_t>() + 900000};
    std::string new_header = json.dump();
    uint64_t new_length = new_header.size();
    std::ofstream out(file_path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&new_length), 8);
    out << new_header << data;
  });
  expect_clean_failure("generate --model " + dir, "outside the file");
}

TEST(CliErrors, UnknownArchitecture) {
  std::string dir = corrupted_copy("unknown-arch", [](const std::string& path) {
    nlohmann::json config = nlohmann::json::parse(std::ifstream(path + "/config.json"));
    config["architectures"] = {"GPT2LMHeadModel"};
    std::ofstream(path + "/config.json") << config.dump();
  });
  expect_clean_failure("generate --model " + dir, "unsupported architecture 'GPT2LMHeadModel'");
}

TEST(CliErrors, WrongShapeInConfig) {
  std::string dir = corrupted_copy("wrong-shape", [](const std::string& path) {
    nlohmann::json config = nlohmann::json::parse(std::ifstream(path + "/config.json"));
    config["vocab_size"] = 300;
    std::ofstream(path + "/config.json") << config.dump();
  });
  expect_clean_failure("generate --model " + dir,
                       "model.embed_tokens.weight: expected shape [300, 64], found [256, 64]");
}

TEST(CliErrors, UnknownYamlKeyAndBadFlags) {
  std::string yaml = work_dir() + "/typo.yaml";
  std::ofstream(yaml) << "model: " << tiny_model() << "\ntp: 4\nplacment: round_robin\n";
  expect_clean_failure("generate --config " + yaml, "unknown key 'placment'");
  expect_clean_failure("generate --model " + tiny_model() + " --tp 4 --reduce ring",
                       "unknown all-reduce algorithm 'ring'");
  expect_clean_failure("generate --model " + tiny_model() + " --bogus 1", "unknown flag '--bogus'");
  expect_clean_failure("generate --model " + tiny_model() + " --prompt-ids 1,x",
                       "'x' is not a non-negative integer");
  expect_clean_failure("generate --model " + tiny_model() + " --backend tpu",
                       "unknown backend 'tpu' (expected cpu or cuda)");
  expect_clean_failure("generate --model " + tiny_model() + " --kv-cache-dtype fp16",
                       "unknown --kv-cache-dtype 'fp16' (expected auto, fp32, bf16 or fp8_e4m3)");
  // No GPU here (CI, dev machines): the CUDA backend must say so, not crash.
  expect_clean_failure("generate --model " + tiny_model() + " --backend cuda",
                       "--backend cuda: no CUDA device: ");
  // Every command parses with keel_flags: typed values are checked when parsed, named with
  // the flag, and --name=value is the same as --name value.
  expect_clean_failure("generate --model " + tiny_model() + " --max-tokens=many",
                       "--max-tokens: 'many' is not an integer");
  expect_clean_failure("generate --model " + tiny_model() + " --tp", "--tp needs a value");
  expect_clean_failure("serve --config x.yaml --port 99999999999999999999",
                       "--port: '99999999999999999999' must be <= 65535");
  expect_clean_failure("gen-model --preset=nope --out=" + work_dir() + "/nope",
                       "unknown model preset 'nope'");
  expect_clean_failure("gen-model --preset nope --out " + work_dir() + "/nope",
                       "unknown model preset 'nope'");
  std::string preset = work_dir() + "/bad-preset.yaml";
  std::ofstream(preset) << "vocab_size: 10\nhiden_size: 8\n";
  expect_clean_failure("gen-model --preset " + preset + " --out " + work_dir() + "/bad",
                       "unknown key 'hiden_size'");
}

// Start-up refusals of `keel serve` (issue 16): each one exits 1 naming the key, and the server
// never announces itself first (a script waiting for "listening on" must not see a server that
// then exits).
TEST(CliErrors, ServeRefusesBadConfigsBeforeAnnouncingItself) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      // A petabyte of KV cache: past the scheduler's 32-bit block count; 2^30 blocks of the
      // model's are past this machine's memory.
      {"kv_cache_mb: 1073741824\n", "kv_cache_mb gives"},
      {"num_kv_blocks: 1073741824\n", "num_kv_blocks asks for"},
      {"drain_timeout_s: .nan\n", "key 'drain_timeout_s'"},
      {"port: 0\nport: 0\n", "key 'port' appears twice"},
      {"port: &a 0\ntp: *a\n", "anchor"},
      {"port: 0\ntelemetry_dump_dir: " + work_dir() + "/no-such-dir\n", "key 'telemetry_dump_dir'"},
      {"port: 0\nmax_model_len: 1073741824\n", "max_position_embeddings"},
  };
  const std::string model = work_dir() + "/tiny-chat";  // serving needs its tokenizer
  const RunResult generated = run_keel("gen-model --preset tiny-chat --seed 5 --out " + model);
  ASSERT_EQ(generated.exit_code, 0) << generated.output;
  int index = 0;
  for (const auto& [yaml, expected] : cases) {
    const std::string config = work_dir() + "/serve-bad-" + std::to_string(index++) + ".yaml";
    std::ofstream(config) << "model: " << model << "\n" << yaml;
    const RunResult result = run_keel("serve --config " + config + " --port 0");
    EXPECT_EQ(result.exit_code, 1) << yaml << result.output;
    EXPECT_NE(result.output.find(expected), std::string::npos)
        << "expected '" << expected << "' for\n"
        << yaml << "in:\n"
        << result.output;
    EXPECT_EQ(result.output.find("listening on"), std::string::npos) << yaml << result.output;
  }
}

TEST(CliHelp, EveryCommandListsItsFlags) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> commands = {
      {"gen-model --help", {"--preset NAME", "--out DIR", "--max-shard-mb M"}},
      {"generate --help", {"--model DIR", "--prompt-ids 1,2,3", "--collective-timeout-ms MS"}},
      {"serve -h", {"--config FILE", "--port P"}},
      {"calibrate --help", {"--decode-list", "--from-url URL", "--last-step ID"}},
      {"routes replay --help", {"--no-force", "--tp N"}},
      {"simulate --help", {"--num-kv-blocks N", "--slo KEY:MS ...", "--sweep-rate"}},
      {"plan --help", {"--model M.yaml", "(required)", "--attention-bf16"}},
      {"bench serve --help", {"--url URL", "--goodput KEY:MS ...", "--ignore-eos"}},
      {"experts --help", {"--top N", "--png FILE"}},
      {"profile tail --help", {"--percentile P", "[0, 100]"}},
      {"routes stats --help", {"--epsilon E", "--top-pairs N"}}};
  for (const auto& [args, expected] : commands) {
    RunResult result = run_keel(args);
    EXPECT_EQ(result.exit_code, 0) << args << ":\n" << result.output;
    for (const std::string& text : expected)
      EXPECT_NE(result.output.find(text), std::string::npos)
          << args << ": no '" << text << "' in:\n"
          << result.output;
  }
}

}  // namespace
