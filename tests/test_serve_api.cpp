// keel serve started as a vLLM user starts it, on real sockets (127.0.0.1), with the synthetic
// tiny-chat model:
//  - `keel serve MODEL_DIR --tp 2 --served-model-name a b --api-key KEY` with no config file:
//    every name and the path address the model, /v1/* (telemetry and profiling included)
//    answer 401 without the key, the probes stay open;
//  - x-request-id names the request in /v1/telemetry/requests and in routing records;
//  - system_fingerprint carries the build revision (keel --version), the TP size and the
//    checkpoint digest; /tokenize and /detokenize agree with the model's tokenizer;
//  - a config file with flags over it (flags win), KEEL_API_KEY, api_key_scope all;
//  - --host 0.0.0.0 without a key warns; unsupported flag values exit 1 naming the value.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/model/gen_model.h"
#include "runtime/model/weights_digest.h"
#include "runtime/routing/routing_file.h"
#include "runtime/tokenizer/tokenizer.h"
#include "serve_test_util.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace keel::serve_test;

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";
const std::string kKey = "sk-e2e-4f1c";

struct Scratch {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-serve-api/pid-" + std::to_string(::getpid());
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

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string out = scratch() + "/tiny-chat";
    keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), {}, out);
    return out;
  }();
  return dir;
}

const std::vector<std::string> kAuth = {"Authorization: Bearer " + kKey};

std::string greedy(const std::string& model) {
  return json{{"model", model}, {"prompt", "The river"}, {"max_tokens", 6}, {"temperature", 0}}
      .dump();
}

// The value after `key` in the server's output, up to the end of its line.
std::string output_line_after(const ServerProcess& server, const std::string& key) {
  const std::string output = server.output();
  const size_t at = output.find(key);
  if (at == std::string::npos) return "";
  const size_t start = at + key.size();
  return output.substr(start, output.find('\n', start) - start);
}

class ServeApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ =
        new ServerProcess({kKeel, "serve", model_dir(), "--tp", "2", "--port", "0", "--api-key",
                           kKey, "--seed", "9", "--served-model-name", "a", "b"});
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static int port() { return server_->port(); }
  static ServerProcess* server_;
};
ServerProcess* ServeApi::server_ = nullptr;

TEST_F(ServeApi, NoConfigFileTwoRanksAndEveryNameAndThePathAddressTheModel) {
  EXPECT_NE(server_->output().find("model a, tp 2, thread ranks"), std::string::npos)
      << server_->output();
  HttpResponse models = http(port(), "GET", "/v1/models", "", kAuth);
  ASSERT_EQ(models.status, 200) << models.body;
  std::vector<std::string> ids;
  const json cards = json::parse(models.body)["data"];
  for (const json& card : cards) ids.push_back(card["id"]);
  EXPECT_EQ(ids, (std::vector<std::string>{"a", "b", model_dir()}));
  HttpResponse card = http(port(), "GET", "/v1/models/b", "", kAuth);
  ASSERT_EQ(card.status, 200) << card.body;
  EXPECT_EQ(json::parse(card.body)["root"], model_dir());
  EXPECT_EQ(http(port(), "GET", "/v1/models/c", "", kAuth).status, 404);

  std::string first_text;
  for (const std::string& name : {std::string("a"), std::string("b"), model_dir()}) {
    HttpResponse reply = http(port(), "POST", "/v1/completions", greedy(name), kAuth);
    ASSERT_EQ(reply.status, 200) << name << ": " << reply.body;
    json body = json::parse(reply.body);
    EXPECT_EQ(body["model"], "a");  // responses report the first name
    if (first_text.empty()) first_text = body["choices"][0]["text"];
    EXPECT_EQ(body["choices"][0]["text"], first_text) << name;
  }
  HttpResponse unknown = http(port(), "POST", "/v1/completions", greedy("c"), kAuth);
  EXPECT_EQ(unknown.status, 404) << unknown.body;
  EXPECT_EQ(json::parse(unknown.body)["error"]["code"], "model_not_found");
}

TEST_F(ServeApi, EveryV1EndpointNeedsTheKeyAndTheProbesDoNot) {
  const std::vector<std::pair<std::string, std::string>> guarded = {
      {"GET", "/v1/models"},
      {"POST", "/v1/completions"},
      {"POST", "/v1/chat/completions"},
      {"GET", "/v1/telemetry/requests"},
      {"GET", "/v1/telemetry/experts"},
      {"GET", "/v1/telemetry/steps"},
      {"POST", "/v1/profile/start"},
      {"POST", "/v1/profile/stop"},
      {"POST", "/tokenize"},
      {"POST", "/detokenize"}};
  for (const auto& [method, path] : guarded) {
    for (const std::vector<std::string>& headers :
         {std::vector<std::string>{}, std::vector<std::string>{"Authorization: Bearer nope"}}) {
      HttpResponse reply = http(port(), method, path, "{}", headers);
      EXPECT_EQ(reply.status, 401) << method << " " << path << ": " << reply.body;
      EXPECT_EQ(reply.headers["www-authenticate"], "Bearer");
    }
  }
  // The profiler was never started by those: stopping it with the key says so (not 401).
  HttpResponse stop = http(port(), "POST", "/v1/profile/stop", "{}", kAuth);
  EXPECT_NE(stop.status, 401) << stop.body;
  EXPECT_EQ(http(port(), "GET", "/v1/telemetry/experts", "", kAuth).status, 200);
  for (const char* probe : {"/health", "/ping", "/version", "/metrics"})
    EXPECT_EQ(http(port(), "GET", probe).status, 200) << probe;
}

TEST_F(ServeApi, RequestIdNamesTheRequestInTelemetry) {
  std::vector<std::string> headers = kAuth;
  headers.push_back("x-request-id: e2e-trace-1");
  HttpResponse reply = http(port(), "POST", "/v1/completions", greedy("a"), headers);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.headers["x-request-id"], "e2e-trace-1");
  EXPECT_EQ(json::parse(reply.body)["id"], "cmpl-e2e-trace-1");
  HttpResponse requests = http(port(), "GET", "/v1/telemetry/requests", "", kAuth);
  ASSERT_EQ(requests.status, 200);
  EXPECT_NE(requests.body.find("\"id\":\"e2e-trace-1\""), std::string::npos) << requests.body;
  HttpResponse steps = http(port(), "GET", "/v1/telemetry/steps", "", kAuth);
  EXPECT_NE(steps.body.find("\"e2e-trace-1\""), std::string::npos);
}

TEST_F(ServeApi, SystemFingerprintCarriesRevisionTpDeterminismAndTheWeightsDigest) {
  int exit_code = 0;
  std::string version = run_command(kKeel + " --version", &exit_code);
  ASSERT_EQ(exit_code, 0);
  ASSERT_EQ(version.rfind("keel ", 0), 0u) << version;
  const std::string revision = version.substr(5, version.find('\n') - 5);
  EXPECT_EQ(json::parse(http(port(), "GET", "/version").body)["version"], revision);

  const std::string expected = "keel1;rev=" + revision +
                               ";det=batch_invariant;reduce=fixed_order;tp=2;placement=contiguous;"
                               "combine=fp32;kv=bf16;act=fp32;backend=cpu;weights=" +
                               keel::checkpoint_digest(model_dir()).substr(0, 16);
  EXPECT_EQ(output_line_after(*server_, "keel serve: system_fingerprint "), expected);
  json body = json::parse(http(port(), "POST", "/v1/completions", greedy("a"), kAuth).body);
  EXPECT_EQ(body["system_fingerprint"], expected);
  json chat = {
      {"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 3}, {"stream", true}};
  HttpResponse stream = http(port(), "POST", "/v1/chat/completions", chat.dump(), kAuth);
  ASSERT_EQ(stream.status, 200);
  std::vector<std::string> events = sse_events(stream.body);
  ASSERT_GE(events.size(), 2u);
  for (const std::string& event : events)
    EXPECT_EQ(json::parse(event)["system_fingerprint"], expected) << event;
}

TEST_F(ServeApi, TokenizeAndDetokenizeAgreeWithTheModelsTokenizer) {
  const keel::Tokenizer tokenizer = keel::Tokenizer::load(model_dir() + "/tokenizer.json");
  const std::string text = "The river runs past the mill.";
  HttpResponse reply =
      http(port(), "POST", "/tokenize",
           json{{"model", "b"}, {"prompt", text}, {"return_token_strs", true}}.dump(), kAuth);
  ASSERT_EQ(reply.status, 200) << reply.body;
  json body = json::parse(reply.body);
  const std::vector<int32_t> ids = tokenizer.encode(text, /*add_special_tokens=*/true);
  EXPECT_EQ(body["tokens"], json(ids));
  EXPECT_EQ(body["count"], ids.size());
  EXPECT_EQ(body["max_model_len"],
            json::parse(http(port(), "GET", "/v1/models/a", "", kAuth).body)["max_model_len"]);
  ASSERT_EQ(body["token_strs"].size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i)
    EXPECT_EQ(body["token_strs"][i], *tokenizer.id_to_token(ids[i]));
  HttpResponse back = http(port(), "POST", "/detokenize", json{{"tokens", ids}}.dump(), kAuth);
  ASSERT_EQ(back.status, 200) << back.body;
  EXPECT_EQ(json::parse(back.body)["prompt"], tokenizer.decode(ids));
  // A chat tokenizes to the prompt a chat completion counts.
  json messages = {{{"role", "user"}, {"content", "hi"}}};
  HttpResponse chat_ids =
      http(port(), "POST", "/tokenize", json{{"messages", messages}}.dump(), kAuth);
  HttpResponse chat = http(port(), "POST", "/v1/chat/completions",
                           json{{"messages", messages}, {"max_tokens", 1}}.dump(), kAuth);
  ASSERT_EQ(chat_ids.status, 200) << chat_ids.body;
  EXPECT_EQ(json::parse(chat_ids.body)["count"], json::parse(chat.body)["usage"]["prompt_tokens"]);
  EXPECT_EQ(http(port(), "POST", "/detokenize", json{{"tokens", {1 << 30}}}.dump(), kAuth).status,
            400);
}

TEST(ServeApiAlone, ConfigFileWithFlagsOverItAndTheKeyFromTheEnvironment) {
  const std::string capture = scratch() + "/capture.jsonl";
  const std::string config = scratch() + "/serve.yaml";
  std::ofstream(config) << "model: " << model_dir()
                        << "\nmodel_name: from-file\ntp: 4\nport: 0\nmax_num_seqs: 8\n"
                        << "routing_capture: " << capture << "\n";
  setenv("KEEL_API_KEY", "env-key-77", 1);
  ServerProcess server({kKeel, "serve", "--config", config, "--tp", "1", "--api-key-scope", "all"});
  unsetenv("KEEL_API_KEY");
  // Flags win (tp 1, not the file's 4); what no flag names stays (the file's name).
  EXPECT_NE(server.output().find("model from-file, tp 1,"), std::string::npos) << server.output();
  // Scope all: the probes need the key too; the key came from KEEL_API_KEY.
  EXPECT_EQ(http(server.port(), "GET", "/health").status, 401);
  EXPECT_EQ(http(server.port(), "GET", "/metrics").status, 401);
  const std::vector<std::string> auth = {"Authorization: Bearer env-key-77",
                                         "x-request-id: captured-1"};
  EXPECT_EQ(http(server.port(), "GET", "/health", "", auth).status, 200);
  HttpResponse reply = http(server.port(), "POST", "/v1/completions", greedy(""), auth);
  ASSERT_EQ(reply.status, 200) << reply.body;
  server.terminate();
  EXPECT_EQ(server.wait(), 0) << server.output();
  // The routing record names the request by its x-request-id.
  const keel::RoutingFile file = keel::read_routing_file(capture);
  ASSERT_EQ(file.records.size(), 1u);
  EXPECT_EQ(file.records[0].request_id, "captured-1");
}

TEST(ServeApiAlone, AnOpenBindWithoutAKeyWarns) {
  ServerProcess server({kKeel, "serve", model_dir(), "--host", "0.0.0.0", "--port", "0"},
                       std::chrono::seconds(120), "0.0.0.0");
  EXPECT_NE(server.output().find("keel serve: warning: listening on 0.0.0.0 (not a loopback "
                                 "address) without an API key"),
            std::string::npos)
      << server.output();
  EXPECT_EQ(http(server.port(), "GET", "/health").status, 200);
}

TEST(ServeApiAlone, UnsupportedValuesExitOneNamingThem) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--kv-cache-dtype fp8_e5m2", "'fp8_e5m2' is not implemented"},
      {"--determinism exact", "--determinism: 'exact' is not one of batch_invariant, fast"},
      {"--reduce native", "contradicts determinism 'batch_invariant'"},
      {"--tp 16", "--tensor-parallel-size: '16' must be <= 8"},
      {"--swap-space 4", "unknown flag '--swap-space'"}};
  for (const auto& [flags, message] : cases) {
    int exit_code = 0;
    const std::string output =
        run_command(kKeel + " serve " + model_dir() + " --port 0 " + flags, &exit_code);
    EXPECT_EQ(exit_code, 1) << flags << ": " << output;
    EXPECT_NE(output.find(message), std::string::npos) << flags << ": " << output;
    EXPECT_EQ(output.find("listening"), std::string::npos) << flags << ": " << output;
  }
  int exit_code = 0;
  const std::string output = run_command(kKeel + " serve", &exit_code);
  EXPECT_EQ(exit_code, 1);
  EXPECT_NE(output.find("MODEL_DIR"), std::string::npos) << output;
}

}  // namespace
