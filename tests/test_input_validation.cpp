// Bad input that used to get through (issue 16): each case is refused with an error naming what
// is wrong, or (misaligned checkpoints) handled with the right values.
//  - safetensors data regions at odd offsets: weights load through copies, never misaligned
//    loads (UBSan, in the KEEL_SANITIZE build, aborts on the latter), and give the same bits;
//  - config.json numbers out of range (rms_norm_eps <= 0, a billion layers, 2^64 - 1);
//  - YAML: NaN and infinity, duplicate keys, anchors and aliases, merge keys, second documents;
//    directories that do not exist; KV pools that cannot exist; max_model_len past the model;
//  - request integers past 64 bits, and bodies nested deeper than any recursive walk survives;
//  - the serve loop announces readiness only once every rank holds its KV pool.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/base/check.h"
#include "runtime/common/yaml_util.h"
#include "runtime/engine/deployment.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/model_config.h"
#include "runtime/model/safetensors.h"
#include "runtime/server/api.h"
#include "runtime/serving/serve_config.h"
#include "runtime/serving/serving_engine.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-input-validation/pid-" + std::to_string(::getpid());
  ScratchDir() { fs::create_directories(path); }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

const std::string& scratch() {
  static ScratchDir dir;
  return dir.path;
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

std::string model_dir(const std::string& preset) {
  const std::string dir = scratch() + "/" + preset;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 5;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

std::string read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// ---------------------------------------------------------------------------------------------
// Misaligned safetensors data regions.

// Rewrites a safetensors file with one more space in its header (JSON allows trailing
// whitespace), so the data region starts one byte later; returns the new data offset.
uint64_t pad_header_by_one_byte(const std::string& path) {
  std::string bytes = read_file(path);
  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);  // little-endian, as is this machine
  bytes.insert(8 + header_length, 1, ' ');
  ++header_length;
  std::memcpy(bytes.data(), &header_length, 8);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  return 8 + header_length;
}

// A copy of `preset`'s checkpoint whose every file has its data region at an odd offset.
std::string misaligned_copy(const std::string& preset) {
  const std::string source = model_dir(preset);
  const std::string dir = scratch() + "/" + preset + "-misaligned";
  fs::remove_all(dir);
  fs::copy(source, dir, fs::copy_options::recursive);
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".safetensors") {
      EXPECT_EQ(pad_header_by_one_byte(entry.path().string()) % 2, 1u);
    }
  return dir;
}

TEST(MisalignedCheckpoint, ElementsReadBackExactly) {
  const std::string dir = misaligned_copy("tiny");
  const auto aligned = SafetensorsFile::open(model_dir("tiny") + "/model.safetensors");
  const auto odd = SafetensorsFile::open(dir + "/model.safetensors");
  ASSERT_EQ(aligned->tensors().size(), odd->tensors().size());
  int64_t compared = 0;
  for (const auto& [name, view] : odd->tensors()) {
    ASSERT_TRUE(view.is_float()) << name;
    const TensorView* reference = aligned->find(name);
    ASSERT_NE(reference, nullptr) << name;
    // Every data pointer is one byte past the aligned file's layout: odd for the first tensor.
    EXPECT_EQ(std::memcmp(view.data, reference->data, view.nbytes), 0) << name;
    for (int64_t i = 0; i < view.num_elements(); i += 7) {
      const float a = reference->f32_at(static_cast<size_t>(i));
      const float b = view.f32_at(static_cast<size_t>(i));
      ASSERT_EQ(std::memcmp(&a, &b, sizeof(float)), 0) << name << "[" << i << "]";
      ++compared;
    }
  }
  EXPECT_GT(compared, 1000);
  // One byte later: every tensor's data pointer changed parity (odd ones are misaligned).
  const auto parity = [](const TensorView& view) {
    return reinterpret_cast<uintptr_t>(view.data) % 2;
  };
  EXPECT_NE(parity(odd->tensors().begin()->second), parity(aligned->tensors().begin()->second));
  // An index past the tensor is an invariant violation, not a silent read past it.
  EXPECT_DEATH((void)odd->tensors().begin()->second.f32_at(1u << 30), "past its");
}

// Norms, biases, A_log, dt_bias and conv weights are the vectors load_vector converts element by
// element; the three presets between them have all of them.
class MisalignedModel : public testing::TestWithParam<std::string> {};

TEST_P(MisalignedModel, LoadsWithTheSameLogitsBits) {
  const std::string preset = GetParam();
  const std::string dir = misaligned_copy(preset);
  EngineOptions options;
  options.tp_size = 2;
  Engine aligned(model_dir(preset), options);
  Engine odd(dir, options);
  GenerateRequest request;
  request.prompts = {{1, 5, 9, 42, 7, 3}};
  request.max_new_tokens = 4;
  const GenerateResult a = aligned.generate(request);
  const GenerateResult b = odd.generate(request);
  EXPECT_EQ(a.logits_digest, b.logits_digest);
  EXPECT_EQ(a.tokens, b.tokens);
}

INSTANTIATE_TEST_SUITE_P(Presets, MisalignedModel,
                         testing::Values("tiny", "tiny-qwen2", "tiny-qwen3.5"),
                         [](const testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (c == '-' || c == '.') c = '_';
                           return name;
                         });

// ---------------------------------------------------------------------------------------------
// config.json numbers.

std::string config_error(const std::string& field, const std::string& value) {
  nlohmann::json config = {{"architectures", {"Qwen3MoeForCausalLM"}},
                           {"hidden_size", 64},
                           {"num_hidden_layers", 2},
                           {"num_attention_heads", 4},
                           {"vocab_size", 128},
                           {"num_experts", 4},
                           {"num_experts_per_tok", 2},
                           {"moe_intermediate_size", 32}};
  config.erase(field);
  // Spliced in as text: nlohmann would not write 1e400 or keep 2^64 - 1's spelling.
  std::string text = config.dump();
  text.insert(text.size() - 1, ",\"" + field + "\":" + value);
  return error_of([&] { ModelConfig::parse(text, "test/config.json"); });
}

TEST(ModelConfigRanges, NormEpsMustBePositiveAndFinite) {
  // (1e400 never gets here: the JSON parser refuses a number a double cannot hold.)
  for (const char* value : {"-1", "0", "0.0", "2", "1.7e308"}) {
    const std::string message = config_error("rms_norm_eps", value);
    EXPECT_NE(message.find("rms_norm_eps"), std::string::npos) << value << ": " << message;
  }
  EXPECT_EQ(config_error("rms_norm_eps", "1e-5"), "(no error)");
}

TEST(ModelConfigRanges, SizeFieldsAreBoundedBeforeAnythingIsSized) {
  EXPECT_NE(config_error("num_hidden_layers", "1000000000").find("num_hidden_layers is 1000000000"),
            std::string::npos);
  // A float spelling is not an integer.
  EXPECT_NE(config_error("num_hidden_layers", "1e9").find("'num_hidden_layers' must be an integer"),
            std::string::npos);
  // 2^64 - 1 must not wrap to -1 (the message would then say "must be > 0, found -1").
  const std::string huge = config_error("vocab_size", "18446744073709551615");
  EXPECT_NE(huge.find("'vocab_size' is 18446744073709551615, out of range"), std::string::npos)
      << huge;
  for (const char* field : {"hidden_size", "num_attention_heads", "head_dim", "num_experts",
                            "moe_intermediate_size", "max_position_embeddings"}) {
    const std::string message = config_error(field, "4611686018427387904");  // 2^62
    EXPECT_NE(message.find(field), std::string::npos) << field << ": " << message;
    EXPECT_NE(message.find("expected a value in [1, "), std::string::npos) << message;
  }
  EXPECT_NE(config_error("intermediate_size", "-4")
                .find("intermediate_size is -4; expected a value in [0, "),
            std::string::npos);
  EXPECT_NE(config_error("partial_rotary_factor", "3").find("partial_rotary_factor is 3"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// YAML configs.

std::string write(const std::string& name, const std::string& text) {
  const std::string path = scratch() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

std::string serve_error(const std::string& extra) {
  return error_of([&] { load_serve_config(write("serve.yaml", "model: /m\n" + extra)); });
}

TEST(YamlConfigs, NonFiniteNumbersAreRefused) {
  for (const char* value : {".nan", ".NaN", ".inf", "-.inf"}) {
    const std::string message = serve_error(std::string("drain_timeout_s: ") + value + "\n");
    EXPECT_NE(message.find("key 'drain_timeout_s'"), std::string::npos) << message;
    EXPECT_NE(message.find("expected a finite number"), std::string::npos) << message;
  }
  EXPECT_NE(serve_error("near_tie_epsilon: .nan\n").find("near_tie_epsilon"), std::string::npos);
  EXPECT_NE(serve_error("drain_timeout_s: -1\n").find("expected a value in [0, 86400]"),
            std::string::npos);
  EXPECT_EQ(serve_error("drain_timeout_s: 2.5\n"), "(no error)");
}

TEST(YamlConfigs, DuplicateKeysAreRefusedWithTheirLine) {
  const std::string message = serve_error("tp: 2\nport: 8000\ntp: 4\n");
  EXPECT_NE(message.find("line 4: key 'tp' appears twice"), std::string::npos) << message;
  // In nested mappings too (a deployment's explicit placement is a list; a planning preset nests).
  EXPECT_NE(error_of([&] {
              parse_yaml_mapping("a:\n  b: 1\n  b: 2\n", "nested.yaml");
            }).find("key 'b' appears twice"),
            std::string::npos);
  // The same key in two different mappings is fine.
  EXPECT_NO_THROW(parse_yaml_mapping("a:\n  b: 1\nc:\n  b: 2\n", "ok.yaml"));
}

TEST(YamlConfigs, AnchorsAliasesAndMergesAreRefused) {
  EXPECT_NE(serve_error("port: &a 2\ntp: *a\n").find("anchor"), std::string::npos);
  EXPECT_NE(error_of([&] { parse_yaml_mapping("tp: *a\n", "alias.yaml"); }).find("alias.yaml"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_yaml_mapping("base: &b {x: 1}\nderived:\n  <<: *b\n", "merge.yaml");
            }).find("not accepted"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_yaml_mapping("a: 1\n---\nb: 2\n", "docs.yaml");
            }).find("a second YAML document"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_yaml_mapping("? [a, b]\n: 1\n", "key.yaml");
            }).find("mapping keys must be plain names"),
            std::string::npos);
}

TEST(YamlConfigs, DeploymentTpIsRangeChecked) {
  for (const char* tp : {"0", "-2", "1000000000", "99999999999999999999"}) {
    const std::string message = error_of(
        [&] { load_deployment(write("deployment.yaml", std::string("tp: ") + tp + "\n")); });
    EXPECT_NE(message.find("key 'tp'"), std::string::npos) << tp << ": " << message;
  }
}

TEST(YamlConfigs, MissingDirectoriesAreRefusedAtStartUp) {
  const std::string missing = scratch() + "/no-such-dir";
  std::string message = serve_error("telemetry_dump_dir: " + missing + "\n");
  EXPECT_NE(message.find("key 'telemetry_dump_dir' is '" + missing + "'"), std::string::npos)
      << message;
  EXPECT_NE(message.find("not an existing directory"), std::string::npos);
  message = serve_error("trace_dir: " + missing + "\n");
  EXPECT_NE(message.find("key 'trace_dir'"), std::string::npos) << message;
  EXPECT_EQ(serve_error("telemetry_dump_dir: " + scratch() + "\n"), "(no error)");
}

TEST(KvPool, ImpossibleSizesAreRefusedNamingTheKey) {
  ServeConfig config;
  config.kv_cache_mb = int64_t{1} << 30;  // a petabyte
  std::string message = error_of([&] { num_kv_blocks_for(config, 1 << 20, 1, true); });
  EXPECT_NE(message.find("kv_cache_mb asks for"), std::string::npos) << message;
  EXPECT_NE(message.find("the machine has"), std::string::npos) << message;
  config.num_kv_blocks = int64_t{1} << 31;
  message = error_of([&] { num_kv_blocks_for(config, 16, 1, false); });
  EXPECT_NE(message.find("num_kv_blocks gives 2147483648 KV blocks"), std::string::npos) << message;
  config.num_kv_blocks = 0;
  config.kv_cache_mb = 64;
  EXPECT_EQ(num_kv_blocks_for(config, 1 << 16, 2, true), 1024);
}

TEST(ServingEngine, MaxModelLenPastTheModelIsRefused) {
  const std::string dir = model_dir("tiny-chat");
  EngineOptions options;
  Engine engine(dir, options);
  ServingConfig config;
  config.scheduler.num_kv_blocks = 8;
  config.max_model_len = engine.config().max_position_embeddings + 1;
  const std::string message = error_of([&] { ServingEngine serving(engine, dir, config); });
  EXPECT_NE(
      message.find("max_model_len " + std::to_string(config.max_model_len) + " exceeds model"),
      std::string::npos)
      << message;
  EXPECT_NE(message.find("max_position_embeddings (" +
                         std::to_string(engine.config().max_position_embeddings) + ")"),
            std::string::npos);
  config.max_model_len = engine.config().max_position_embeddings;
  EXPECT_NO_THROW({ ServingEngine serving(engine, dir, config); });
}

// ---------------------------------------------------------------------------------------------
// The serve loop's readiness.

// Stops at once, recording whether readiness was announced before the first step was asked for.
class StopAtOnce : public StepSource {
 public:
  explicit StopAtOnce(const int& ready_calls) : ready_calls_(ready_calls) {}
  void next_step(ServeStep& step) override {
    ready_before_first_step = ready_calls_ == 1;
    step.kind = ServeStep::Kind::kStop;
  }
  void on_step_done(const StepOutput&) override {}
  bool ready_before_first_step = false;

 private:
  const int& ready_calls_;
};

TEST(ServeReadiness, AnnouncedOnceAfterEveryRankHoldsItsPool) {
  EngineOptions options;
  options.tp_size = 2;
  Engine engine(model_dir("tiny"), options);
  int ready_calls = 0;
  StopAtOnce source(ready_calls);
  ServeOptions serve;
  serve.num_kv_blocks = 4;
  serve.on_ready = [&] { ++ready_calls; };
  engine.serve(&source, serve);
  EXPECT_EQ(ready_calls, 1);
  EXPECT_TRUE(source.ready_before_first_step);

  // A pool that cannot be allocated: the error, and no announcement.
  ready_calls = 0;
  serve.num_kv_blocks = int64_t{1} << 40;
  const std::string message = error_of([&] { engine.serve(&source, serve); });
  EXPECT_NE(message.find("out of host memory"), std::string::npos) << message;
  EXPECT_EQ(ready_calls, 0);
}

// ---------------------------------------------------------------------------------------------
// Request fields.

std::optional<server::RequestError> parse(const std::string& body) {
  server::CompletionRequest request;
  return server::parse_completion_request(body, server::Endpoint::kCompletions, 4096, request);
}

TEST(RequestFields, IntegersPast64BitsDoNotWrap) {
  for (const char* field : {"max_tokens", "top_k", "n", "min_tokens", "logprobs"}) {
    const auto error =
        parse(std::string("{\"prompt\": \"hi\", \"") + field + "\": 18446744073709551615}");
    ASSERT_TRUE(error) << field;
    EXPECT_EQ(error->status, 400);
    EXPECT_EQ(error->param, field);
    EXPECT_NE(error->message.find("got 18446744073709551615"), std::string::npos) << error->message;
    EXPECT_EQ(error->message.find("got -1"), std::string::npos) << error->message;
  }
  const auto seed = parse(R"({"prompt": "hi", "seed": 18446744073709551615})");
  ASSERT_TRUE(seed);
  EXPECT_EQ(seed->param, "seed");
  EXPECT_NE(seed->message.find("[-2^63, 2^63 - 1]"), std::string::npos) << seed->message;
  // The largest signed value is an ordinary out-of-range number.
  const auto big = parse(R"({"prompt": "hi", "max_tokens": 9223372036854775807})");
  ASSERT_TRUE(big);
  EXPECT_NE(big->message.find("must be between 1 and 4096"), std::string::npos) << big->message;
  EXPECT_FALSE(parse(R"({"prompt": "hi", "max_tokens": 16, "top_k": 40})"));
}

TEST(RequestFields, DeeplyNestedBodiesAreRefusedBeforeAnyRecursiveWalk) {
  constexpr size_t kDepth = 1'000'000;
  const std::string nested = std::string(kDepth, '[') + std::string(kDepth, ']');
  // best_of quotes the value it refuses: dumping two million levels recursively overflowed the
  // stack of the server thread.
  const auto error = parse("{\"prompt\": \"hi\", \"best_of\": " + nested + "}");
  ASSERT_TRUE(error);
  EXPECT_EQ(error->status, 400);
  EXPECT_NE(error->message.find("nests deeper than 256 levels"), std::string::npos)
      << error->message;
  // Brackets inside strings are text, not nesting.
  EXPECT_FALSE(parse("{\"prompt\": \"" + std::string(10000, '[') + "\", \"max_tokens\": 1}"));
}

}  // namespace
}  // namespace keel
