// keel serve's start-up without a server: the command line over a config file
// (runtime/cli/serve_flags.h), the config keys it shares with it, the system_fingerprint's
// format (runtime/serving/system_fingerprint.h) and the weights digest it carries
// (runtime/model/weights_digest.h).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/cli/flags.h"
#include "runtime/cli/serve_flags.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/weights_digest.h"
#include "runtime/serving/system_fingerprint.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

struct Scratch {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-serve-cli/pid-" + std::to_string(::getpid());
  Scratch() { fs::create_directories(path); }
  ~Scratch() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

const std::string& scratch() {
  static Scratch dir;
  return dir.path;
}

std::string write_file(const std::string& name, const std::string& text) {
  const std::string path = scratch() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

ServeCommand parse(const std::vector<std::string>& words, const char* env_api_key = nullptr) {
  std::vector<const char*> argv = {"keel", "serve"};
  for (const std::string& word : words) argv.push_back(word.c_str());
  return parse_serve_command(static_cast<int>(argv.size()), argv.data(), 2, env_api_key);
}

// The message of the error parsing `words` throws ("" when it parses).
std::string usage_error(const std::vector<std::string>& words) {
  try {
    (void)parse(words);
  } catch (const flags::UsageError& error) {
    return error.what();
  } catch (const Error& error) {
    return std::string("not a usage error: ") + error.what();
  }
  return "";
}

TEST(ServeCli, ModelDirAloneGivesWhatAFileNamingOnlyTheModelGives) {
  const ServeConfig cli = parse({"/models/tiny"}).config;
  const ServeConfig file =
      load_serve_config(write_file("only-model.yaml", "model: /models/tiny\n"));
  EXPECT_EQ(cli.model_dir, "/models/tiny");
  EXPECT_EQ(cli.model_given, "/models/tiny");
  EXPECT_EQ(file.model_given, "/models/tiny");
  for (const ServeConfig* config : {&cli, &file}) {
    EXPECT_EQ(config->model_dir, "/models/tiny");
    EXPECT_TRUE(config->model_names.empty());
    EXPECT_EQ(config->engine.tp_size, 1);
    EXPECT_FALSE(config->tp_given);
    EXPECT_EQ(config->host, "127.0.0.1");
    EXPECT_EQ(config->port, 8000);
    EXPECT_EQ(config->block_size, 16);
    EXPECT_EQ(config->kv_cache_mb, 256);
    EXPECT_EQ(config->max_num_seqs, 64);
    EXPECT_EQ(config->max_num_batched_tokens, 512);
    EXPECT_EQ(config->max_model_len, 0);
    EXPECT_EQ(config->determinism, Determinism::kBatchInvariant);
    EXPECT_EQ(config->engine.reduce, comm::ReduceAlgo::kFixedOrder);
    EXPECT_EQ(config->engine.collective_timeout_ms, 8000);
    EXPECT_EQ(config->engine.kv_cache_dtype, KvCacheDType::kAuto);
    EXPECT_FALSE(config->seed.has_value());
    EXPECT_TRUE(config->api_key.empty());
    EXPECT_EQ(config->api_key_scope, server::ApiKeyScope::kApi);
  }
}

TEST(ServeCli, FlagsReplaceTheConfigFilesKeysAndLeaveTheRest) {
  const std::string config = write_file("full.yaml",
                                        "model: /models/from-file\n"
                                        "model_name: file-name\n"
                                        "tp: 4\n"
                                        "determinism: fast\n"
                                        "host: 127.0.0.2\n"
                                        "port: 9000\n"
                                        "block_size: 32\n"
                                        "num_kv_blocks: 100\n"
                                        "max_num_seqs: 8\n"
                                        "max_num_batched_tokens: 256\n"
                                        "max_model_len: 2048\n"
                                        "prefix_caching: true\n"
                                        "placement: round_robin\n"
                                        "seed: 11\n");
  const ServeConfig file = parse({"--config", config}).config;
  EXPECT_EQ(file.engine.tp_size, 4);
  EXPECT_EQ(file.engine.reduce, comm::ReduceAlgo::kNative);  // fast's own
  EXPECT_EQ(file.model_names, std::vector<std::string>{"file-name"});
  EXPECT_EQ(file.seed, 11u);

  const ServeConfig both = parse({"/models/from-cli",
                                  "--config",
                                  config,
                                  "--tp",
                                  "2",
                                  "--served-model-name",
                                  "a",
                                  "b",
                                  "--port",
                                  "0",
                                  "--block-size",
                                  "8",
                                  "--max-num-seqs",
                                  "3",
                                  "--max-num-batched-tokens",
                                  "64",
                                  "--max-model-len",
                                  "100",
                                  "--kv-cache-mb",
                                  "64",
                                  "--no-enable-prefix-caching",
                                  "--seed",
                                  "5",
                                  "--reduce",
                                  "fixed_order",
                                  "--placement",
                                  "contiguous",
                                  "--kv-cache-dtype",
                                  "fp8"})
                               .config;
  EXPECT_EQ(both.model_dir, "/models/from-cli");
  EXPECT_EQ(both.model_given, "/models/from-cli");
  EXPECT_EQ(both.model_names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(both.engine.tp_size, 2);
  EXPECT_TRUE(both.tp_given);
  EXPECT_EQ(both.port, 0);
  EXPECT_EQ(both.block_size, 8);
  EXPECT_EQ(both.max_num_seqs, 3);
  EXPECT_EQ(both.max_num_batched_tokens, 64);
  EXPECT_EQ(both.max_model_len, 100);
  EXPECT_EQ(both.kv_cache_mb, 64);
  EXPECT_EQ(both.num_kv_blocks, 0);  // --kv-cache-mb replaces the file's num_kv_blocks
  EXPECT_FALSE(both.prefix_caching);
  EXPECT_EQ(both.seed, 5u);
  EXPECT_EQ(both.engine.reduce, comm::ReduceAlgo::kFixedOrder);
  EXPECT_EQ(both.engine.placement.kind, PlacementKind::kContiguous);
  EXPECT_EQ(both.engine.kv_cache_dtype, KvCacheDType::kFp8E4M3);  // vLLM's fp8
  // What no flag named stays as the file has it.
  EXPECT_EQ(both.determinism, Determinism::kFast);
  EXPECT_EQ(both.host, "127.0.0.2");

  // --tp is --tensor-parallel-size; --determinism batch_invariant brings fixed_order with it.
  const ServeConfig alias = parse({"/m", "--tensor-parallel-size", "4"}).config;
  EXPECT_EQ(alias.engine.tp_size, 4);
  const ServeConfig strict = parse({"--config", config, "--determinism", "batch_invariant"}).config;
  EXPECT_EQ(strict.engine.reduce, comm::ReduceAlgo::kFixedOrder);
  EXPECT_EQ(parse({"/m", "--kv-cache-dtype", "bfloat16"}).config.engine.kv_cache_dtype,
            KvCacheDType::kBF16);
  EXPECT_TRUE(parse({"/m", "--enable-prefix-caching"}).config.prefix_caching);
}

TEST(ServeCli, UnknownAndUnsupportedValuesAreRefusedByName) {
  struct Case {
    std::vector<std::string> words;
    std::vector<std::string> message_parts;
  };
  const std::vector<Case> cases = {
      {{"/m", "--kv-cache-dtype", "fp8_e5m2"}, {"--kv-cache-dtype", "fp8_e5m2", "not implemented"}},
      {{"/m", "--kv-cache-dtype", "int4"}, {"--kv-cache-dtype", "int4", "fp8_e4m3"}},
      {{"/m", "--determinism", "exact"}, {"--determinism", "exact", "batch_invariant"}},
      {{"/m", "--reduce", "ring"}, {"--reduce", "ring"}},
      {{"/m", "--reduce", "native"}, {"native", "batch_invariant", "fixed_order"}},
      {{"/m", "--placement", "explicit"}, {"--placement", "explicit"}},
      {{"/m", "--placement", "contiguous", "--placement-file", "p.yaml"}, {"--placement-file"}},
      {{"/m", "--tp", "0"}, {"--tensor-parallel-size", "'0'", ">= 1"}},
      {{"/m", "--tp", "9"}, {"--tensor-parallel-size", "<= 8"}},
      {{"/m", "--port", "70000"}, {"--port", "<= 65535"}},
      {{"/m", "--block-size", "0"}, {"--block-size"}},
      {{"/m", "--max-num-seqs", "x"}, {"--max-num-seqs", "'x'"}},
      {{"/m", "--api-key-scope", "none"}, {"--api-key-scope", "none"}},
      {{"/m", "--api-key", ""}, {"--api-key", "empty"}},
      {{"/m", "--gpu-memory-utilization", "0.9"}, {"unknown flag", "--gpu-memory-utilization"}},
      {{"/m", "/n"}, {"one MODEL_DIR", "/n"}},
      {{"/m", "--model", "/n"}, {"twice", "/m", "/n"}},
      {{}, {"MODEL_DIR"}},
      {{"--tp", "2"}, {"MODEL_DIR"}}};
  for (const Case& test : cases) {
    const std::string message = usage_error(test.words);
    std::string command;
    for (const std::string& word : test.words) command += " " + word;
    ASSERT_FALSE(message.empty()) << "keel serve" << command << " was accepted";
    EXPECT_EQ(message.find("not a usage error"), std::string::npos) << message;
    for (const std::string& part : test.message_parts)
      EXPECT_NE(message.find(part), std::string::npos)
          << "keel serve" << command << ": '" << message << "' does not name " << part;
  }
  EXPECT_TRUE(parse({"--help"}).help);
  EXPECT_NE(parse({"--help"}).help_text.find("--tensor-parallel-size, --tp N"), std::string::npos);
}

TEST(ServeCli, ApiKeyFromTheFlagElseTheEnvironment) {
  EXPECT_EQ(parse({"/m"}).config.api_key, "");
  EXPECT_EQ(parse({"/m"}, "").config.api_key, "");
  EXPECT_EQ(parse({"/m"}, "env-key").config.api_key, "env-key");
  EXPECT_EQ(parse({"/m", "--api-key", "flag-key"}, "env-key").config.api_key, "flag-key");
  EXPECT_EQ(parse({"/m", "--api-key-scope", "all"}).config.api_key_scope,
            server::ApiKeyScope::kAll);
}

TEST(ServeConfigFile, NewKeysAndTheirErrors) {
  const ServeConfig names = load_serve_config(
      write_file("names.yaml",
                 "model: m\nmodel_name: [a, b]\nreduce: fixed_order\ndeterminism: fast\n"
                 "seed: 3\napi_key_scope: all\n"));
  EXPECT_EQ(names.model_names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(names.engine.reduce, comm::ReduceAlgo::kFixedOrder);  // asked for, under fast
  EXPECT_EQ(names.seed, 3u);
  EXPECT_EQ(names.api_key_scope, server::ApiKeyScope::kAll);
  EXPECT_EQ(names.model_given, "m");
  EXPECT_EQ(names.model_dir, (fs::path(scratch()) / "m").string());  // relative to the file
  const ServeConfig no_model =
      load_serve_config(write_file("no-model.yaml", "tp: 2\n"), ModelKey::kOptional);
  EXPECT_TRUE(no_model.model_dir.empty());
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"model: m\nreduce: native\n", "contradicts"},
      {"model: m\nreduce: ring\n", "ring"},
      {"model: m\nmodel_name: []\n", "model_name"},
      {"model: m\nmodel_name: ['']\n", "model_name"},
      {"model: m\nseed: -1\n", "seed"},
      {"model: m\napi_key_scope: none\n", "api_key_scope"},
      {"model: m\napi_key: secret\n", "unknown key 'api_key'"},
      {"tp: 2\n", "'model' is required"}};
  for (const auto& [text, part] : bad) {
    const std::string path = write_file("bad.yaml", text);
    try {
      (void)load_serve_config(path);
      ADD_FAILURE() << text << " was accepted";
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(part), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find(path), std::string::npos) << error.what();
    }
  }
  // A file without `model` is fine when the command line names it.
  EXPECT_EQ(parse({"/m", "--config", write_file("settings.yaml", "tp: 2\n")}).config.engine.tp_size,
            2);
}

FingerprintInputs reference_inputs() {
  FingerprintInputs inputs;
  inputs.build_revision = "0123456789ab";
  inputs.determinism = Determinism::kBatchInvariant;
  inputs.reduce = comm::ReduceAlgo::kFixedOrder;
  inputs.tp_size = 4;
  inputs.placement.kind = PlacementKind::kRoundRobin;
  inputs.combine = CombinePrecision::kFp32;
  inputs.kv_cache_dtype = "bf16";
  inputs.nvfp4_activations = Nvfp4Activations::kFp32;
  inputs.backend = Device::kCpu;
  inputs.weights_digest = std::string(64, 'e');
  return inputs;
}

TEST(SystemFingerprint, FormatIsTheDocumentedOneAndEveryFieldCounts) {
  EXPECT_EQ(system_fingerprint(reference_inputs()),
            "keel1;rev=0123456789ab;det=batch_invariant;reduce=fixed_order;tp=4;"
            "placement=round_robin;combine=fp32;kv=bf16;act=fp32;backend=cpu;"
            "weights=eeeeeeeeeeeeeeee");
  std::vector<FingerprintInputs> changed(10, reference_inputs());
  changed[0].build_revision = "0123456789ab-dirty";
  changed[1].determinism = Determinism::kFast;
  changed[2].reduce = comm::ReduceAlgo::kNative;
  changed[3].tp_size = 2;
  changed[4].placement.kind = PlacementKind::kContiguous;
  changed[5].combine = CombinePrecision::kRoundPerExpert;
  changed[6].kv_cache_dtype = "fp8_e4m3";
  changed[7].nvfp4_activations = Nvfp4Activations::kW4A4;
  changed[8].backend = Device::kCuda;
  changed[9].weights_digest = "f" + std::string(63, 'e');
  std::set<std::string> seen = {system_fingerprint(reference_inputs())};
  for (const FingerprintInputs& inputs : changed)
    EXPECT_TRUE(seen.insert(system_fingerprint(inputs)).second) << system_fingerprint(inputs);
  // Explicit placements: which rank holds which expert is part of the bits.
  FingerprintInputs explicit_a = reference_inputs(), explicit_b = reference_inputs();
  explicit_a.placement = {PlacementKind::kExplicit, {{0, 1, 2, 3}}};
  explicit_b.placement = {PlacementKind::kExplicit, {{1, 0, 2, 3}}};
  const std::string a = system_fingerprint(explicit_a);
  EXPECT_NE(a.find(";placement=explicit-"), std::string::npos) << a;
  EXPECT_NE(a, system_fingerprint(explicit_b));
  EXPECT_EQ(a, system_fingerprint(explicit_a));
}

// Copies `from` into a fresh directory `name`.
std::string copy_dir(const std::string& from, const std::string& name) {
  const std::string to = scratch() + "/" + name;
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
  return to;
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekg(static_cast<std::streamoff>(offset));
  char byte = 0;
  file.read(&byte, 1);
  byte = static_cast<char>(byte ^ 0x40);
  file.seekp(static_cast<std::streamoff>(offset));
  file.write(&byte, 1);
}

TEST(WeightsDigest, SeesOtherWeightsConfigAndTokenizer) {
  const std::string tiny = scratch() + "/tiny-chat-seed1";
  GenModelOptions seed1;
  seed1.seed = 1;
  generate_model(load_model_preset(find_model_preset("tiny-chat")), seed1, tiny);
  const std::string digest = checkpoint_digest(tiny);
  EXPECT_EQ(digest.size(), 64u);
  EXPECT_EQ(checkpoint_digest(copy_dir(tiny, "same")), digest);
  // Other weights of the same shapes (another seed): a different digest.
  GenModelOptions seed2;
  seed2.seed = 2;
  const std::string other = scratch() + "/tiny-chat-seed2";
  generate_model(load_model_preset(find_model_preset("tiny-chat")), seed2, other);
  EXPECT_NE(checkpoint_digest(other), digest);
  // One byte of the last tensor's data (the last window always holds the file's end).
  const std::string data = copy_dir(tiny, "data");
  flip_byte(data + "/model.safetensors", fs::file_size(data + "/model.safetensors") - 3);
  EXPECT_NE(checkpoint_digest(data), digest);
  const std::string config = copy_dir(tiny, "config");
  std::ofstream(config + "/config.json", std::ios::app) << " ";
  EXPECT_NE(checkpoint_digest(config), digest);
  const std::string tokenizer = copy_dir(tiny, "tokenizer");
  std::ofstream(tokenizer + "/tokenizer_config.json", std::ios::app) << " ";
  EXPECT_NE(checkpoint_digest(tokenizer), digest);
  // Files keel does not read do not count.
  const std::string readme = copy_dir(tiny, "readme");
  std::ofstream(readme + "/README.md") << "notes\n";
  EXPECT_EQ(checkpoint_digest(readme), digest);
  EXPECT_THROW(checkpoint_digest(scratch() + "/absent"), Error);
}

TEST(WeightsDigest, LargeShardsCountTheirHeaderAndSixtyFourWindows) {
  // One F32 tensor of 1 MiB: its data region is 4x the sampled 256 KiB.
  const std::string dir = scratch() + "/large";
  fs::create_directories(dir);
  TensorToWrite tensor;
  tensor.name = "w";
  tensor.dtype = DType::kF32;
  tensor.shape = {256, 1024};
  tensor.bytes.resize(256 * 1024 * 4);
  for (size_t i = 0; i < tensor.bytes.size(); ++i) tensor.bytes[i] = std::byte(i * 7 % 251);
  write_safetensors(dir + "/model.safetensors", {tensor});
  const std::string digest = checkpoint_digest(dir);
  const uint64_t size = fs::file_size(dir + "/model.safetensors");
  const uint64_t data_start = size - tensor.bytes.size();
  const uint64_t data_bytes = tensor.bytes.size();
  const uint64_t stride = (data_bytes - kDigestWindowBytes) / (kDigestWindows - 1);
  // Inside a window (the first, one in the middle, the last byte): seen.
  for (uint64_t offset : {uint64_t{0}, 10 * stride + 100, data_bytes - 1}) {
    const std::string copy = copy_dir(dir, "window");
    flip_byte(copy + "/model.safetensors", data_start + offset);
    EXPECT_NE(checkpoint_digest(copy), digest) << "data byte " << offset;
  }
  // Between two windows: not seen, as documented (the digest is a sample, not a hash of all).
  const uint64_t gap = 10 * stride + kDigestWindowBytes + 10;
  ASSERT_LT(gap, 11 * stride);
  const std::string between = copy_dir(dir, "between");
  flip_byte(between + "/model.safetensors", data_start + gap);
  EXPECT_EQ(checkpoint_digest(between), digest);
  // The header (here the shape's digits) always counts.
  const std::string header = copy_dir(dir, "header");
  TensorToWrite reshaped = tensor;
  reshaped.shape = {1024, 256};
  write_safetensors(header + "/model.safetensors", {reshaped});
  EXPECT_NE(checkpoint_digest(header), digest);
  // A shard whose data fits the sample (at most 256 KiB) counts every byte.
  const std::string small = scratch() + "/small";
  fs::create_directories(small);
  TensorToWrite part = tensor;
  part.shape = {64, 1024};
  part.bytes.resize(64 * 1024 * 4);
  write_safetensors(small + "/model.safetensors", {part});
  const std::string small_digest = checkpoint_digest(small);
  const uint64_t small_size = fs::file_size(small + "/model.safetensors");
  for (uint64_t back : {uint64_t{1}, part.bytes.size() / 2 + 1, part.bytes.size() - 7}) {
    const std::string copy = copy_dir(small, "small-copy");
    flip_byte(copy + "/model.safetensors", small_size - back);
    EXPECT_NE(checkpoint_digest(copy), small_digest) << "byte " << back << " from the end";
  }
}

}  // namespace
}  // namespace keel
