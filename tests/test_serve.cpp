// `keel serve` end to end, on real sockets (127.0.0.1), with the synthetic tiny-chat model:
//  - batch_invariant determinism at the API: one seeded, sampled request with logprobs returns
//    the same text, tokens and logprob bits alone, amid 16 concurrent requests, with a different
//    chunked-prefill budget and block size, streamed, and on 4 MPI ranks instead of 4 threads;
//  - errors only the backend can judge (prompt longer than the context, ids outside the vocab);
//  - stop strings; chat through the model's template; a client disconnect frees the request's
//    KV blocks; overload answers 429 with Retry-After and drops nothing it accepted; SIGTERM
//    drains in-flight streams and exits 0; curl as an independent client.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/engine/deployment.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/model_config.h"
#include "runtime/routing/routing_file.h"
#include "runtime/serving/calibrate.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/tools/simulation/cost_model.h"
#include "scratch_files.h"
#include "serve_test_util.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace keel::serve_test;

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";

const std::string& scratch() {
  static const keel::test::ScratchDir dir("test-serve");
  static const std::string path = dir.path();
  return path;
}

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string out = scratch() + "/tiny-chat";
    keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), {}, out);
    return out;
  }();
  return dir;
}

// A serve config: the tiny-chat model on 4 ranks, batch_invariant, plus `extra` YAML lines.
// metrics_cache_s 0: these tests read /metrics right after acting and need it fresh (the cache
// has its own test, MetricsUnderVllmNamesAreCachedAndServeVllmsDashboard).
std::string write_config(const std::string& name, const std::string& extra) {
  std::string path = scratch() + "/" + name + ".yaml";
  std::ofstream file(path);
  file << "model: " << model_dir() << "\nmodel_name: tiny\ntp: 4\nplacement: round_robin\n"
       << "determinism: batch_invariant\nport: 0\ncollective_timeout_ms: 60000\n"
       << "drain_timeout_s: 60\n"
       << (extra.find("metrics_cache_s") == std::string::npos ? "metrics_cache_s: 0\n" : "")
       << extra;
  return path;
}

std::vector<std::string> serve_args(const std::string& config) {
  return {kKeel, "serve", "--config", config};
}

// The probe: sampled (temperature, top-p, seed), with top logprobs, a prompt long enough to be
// cut into several prefill chunks by a small budget.
const std::string kProbe = json{
    {"prompt",
     "The river runs past the mill and under the old stone bridge, where the town keeps its "
     "boats in winter and its lanterns in summer."},
    {"max_tokens", 24},
    {"temperature", 0.9},
    {"top_p", 0.95},
    {"seed", 1234},
    {"logprobs", 3},
    {"ignore_eos", true}}.dump();

// The probe with every logits processor on: penalties over its own prompt and output, min_p,
// logit_bias, min_tokens. They depend only on the request's own tokens, so its bits must not
// depend on its batch either.
const std::string kPenalisedProbe = [] {
  json probe = json::parse(kProbe);
  probe["presence_penalty"] = 0.6;
  probe["frequency_penalty"] = 0.4;
  probe["repetition_penalty"] = 1.3;
  probe["min_p"] = 0.02;
  probe["logit_bias"] = {{"300", 2.0}, {"301", -5.0}};
  probe["min_tokens"] = 8;
  return probe.dump();
}();

// A batch-mate: a different prompt, length, seed and sampling each.
std::string mate_request(int index, bool stream) {
  std::string prompt;
  for (int word = 0; word <= index % 7; ++word)
    prompt += "stone water lantern " + std::to_string(index);
  return json{{"prompt", prompt},
              {"max_tokens", 16 + index % 3 * 8},
              {"temperature", index % 2 == 0 ? 0.0 : 0.7},
              {"seed", index},
              {"stream", stream},
              {"ignore_eos", true}}
      .dump();
}

// The probe amid 16 concurrent requests: the mates start first, the probe joins a running batch.
std::string probe_amid_mates(int port, const std::string& probe_request = kProbe) {
  std::vector<std::thread> mates;
  std::atomic<int> mate_ok{0};
  for (int index = 0; index < 16; ++index)
    mates.emplace_back([&, index] {
      HttpResponse response = post(port, "/v1/completions", mate_request(index, index % 3 == 0));
      if (response.status == 200) ++mate_ok;
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  HttpResponse probe = post(port, "/v1/completions", probe_request);
  for (std::thread& mate : mates) mate.join();
  EXPECT_EQ(mate_ok.load(), 16);
  return completion_essence(probe);
}

class Serve : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    fs::create_directories(scratch() + "/traces");
    server_ = new ServerProcess(serve_args(write_config(
        "main", "max_num_batched_tokens: 256\ntrace_dir: " + scratch() + "/traces\n")));
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static int port() { return server_->port(); }
  static ServerProcess* server_;
};
ServerProcess* Serve::server_ = nullptr;

TEST_F(Serve, SameSeededRequestHasIdenticalBitsAloneAmidSixteenAndStreamed) {
  const std::string alone = completion_essence(post(port(), "/v1/completions", kProbe));
  ASSERT_NE(alone.find("\"length\""), std::string::npos) << alone;
  EXPECT_EQ(completion_essence(post(port(), "/v1/completions", kProbe)), alone)
      << "same request twice";
  EXPECT_EQ(probe_amid_mates(port()), alone) << "amid 16 concurrent requests";

  // Streaming: the deltas concatenate to the same text, with the same token logprobs.
  json streamed = json::parse(kProbe);
  streamed["stream"] = true;
  HttpResponse response = post(port(), "/v1/completions", streamed.dump());
  ASSERT_EQ(response.status, 200);
  bool done = false;
  std::string text;
  json token_logprobs = json::array();
  for (const std::string& event : sse_events(response.body, &done)) {
    json chunk = json::parse(event);
    for (const json& choice : chunk["choices"]) {
      text += choice["text"].get<std::string>();
      if (choice.contains("logprobs") && !choice["logprobs"].is_null())
        for (const json& logprob : choice["logprobs"]["token_logprobs"])
          token_logprobs.push_back(logprob);
    }
  }
  EXPECT_TRUE(done);
  json reference = json::parse(post(port(), "/v1/completions", kProbe).body)["choices"][0];
  EXPECT_EQ(text, reference["text"].get<std::string>());
  EXPECT_EQ(token_logprobs.dump(), reference["logprobs"]["token_logprobs"].dump());
}

TEST_F(Serve, PenalisedRequestHasIdenticalBitsAloneTwiceAndAmidSixteen) {
  const std::string alone = completion_essence(post(port(), "/v1/completions", kPenalisedProbe));
  ASSERT_NE(alone.find("\"length\""), std::string::npos) << alone;
  EXPECT_NE(alone, completion_essence(post(port(), "/v1/completions", kProbe)))
      << "the processors change what is sampled";
  EXPECT_EQ(completion_essence(post(port(), "/v1/completions", kPenalisedProbe)), alone);
  EXPECT_EQ(probe_amid_mates(port(), kPenalisedProbe), alone) << "amid 16 concurrent requests";
}

// prompt_logprobs of a probe: the bits of every prompt position's logprobs.
const std::string kPromptLogprobsProbe = [] {
  json probe = json::parse(kPenalisedProbe);
  probe["prompt_logprobs"] = 3;
  return probe.dump();
}();

std::string prompt_logprobs_essence(const HttpResponse& response) {
  if (response.status != 200)
    return "HTTP " + std::to_string(response.status) + ": " + response.body;
  return json::parse(response.body)["choices"][0]["prompt_logprobs"].dump() + "\n" +
         completion_essence(response);
}

TEST_F(Serve, DifferentPrefillBudgetBlockSizeAndMpiRanksGiveIdenticalBits) {
  const std::string alone = completion_essence(post(port(), "/v1/completions", kProbe));
  const std::string penalised =
      completion_essence(post(port(), "/v1/completions", kPenalisedProbe));
  const std::string prompt_logprobs =
      prompt_logprobs_essence(post(port(), "/v1/completions", kPromptLogprobsProbe));
  {
    // Prefill cut into chunks of at most 5 tokens, blocks of 4 positions: chunk and block
    // boundaries fall elsewhere; attention still sums positions in order.
    // Prefix caching on: the second run reuses the first run's cached prompt blocks instead of
    // recomputing them, which must not change a bit either.
    ServerProcess chunked(serve_args(write_config(
        "chunked",
        "max_num_batched_tokens: 5\nblock_size: 4\nnum_kv_blocks: 512\nprefix_caching: true\n")));
    EXPECT_EQ(completion_essence(post(chunked.port(), "/v1/completions", kProbe)), alone)
        << "budget 5";
    EXPECT_EQ(completion_essence(post(chunked.port(), "/v1/completions", kProbe)), alone)
        << "budget 5, prompt blocks from the prefix cache";
    EXPECT_EQ(probe_amid_mates(chunked.port()), alone) << "budget 5, amid 16";
    EXPECT_EQ(probe_amid_mates(chunked.port(), kPenalisedProbe), penalised)
        << "penalised, budget 5, amid 16";
    // Prompt logprobs come from every prefill chunk's rows; the prompt's blocks are in the
    // prefix cache by now, which such a request must not use (its logits are wanted).
    EXPECT_EQ(
        prompt_logprobs_essence(post(chunked.port(), "/v1/completions", kPromptLogprobsProbe)),
        prompt_logprobs)
        << "prompt logprobs, budget 5";
  }
  {
    std::vector<std::string> command = mpirun_command(KEEL_MPIEXEC, 4);
    command.insert(command.end(), {kKeel, "serve", "--config", write_config("mpi", "")});
    ServerProcess mpi(command);
    EXPECT_EQ(completion_essence(post(mpi.port(), "/v1/completions", kProbe)), alone)
        << "4 MPI ranks";
    EXPECT_EQ(probe_amid_mates(mpi.port()), alone) << "4 MPI ranks, amid 16";
    mpi.terminate();
    EXPECT_EQ(mpi.wait(), 0) << mpi.output();
  }
}

TEST_F(Serve, BackendRejectsWhatOnlyItCanJudgeWith400) {
  std::string long_prompt;
  for (int i = 0; i < 1500; ++i) long_prompt += "lantern ";
  HttpResponse too_long =
      post(port(), "/v1/completions", json{{"prompt", long_prompt}, {"max_tokens", 4}}.dump());
  EXPECT_EQ(too_long.status, 400) << too_long.body;
  EXPECT_EQ(json::parse(too_long.body)["error"]["param"], "prompt");
  EXPECT_NE(too_long.body.find("context is 4096"), std::string::npos) << too_long.body;

  HttpResponse bad_id =
      post(port(), "/v1/completions", json{{"prompt", {1, 2, 5000}}, {"max_tokens", 4}}.dump());
  EXPECT_EQ(bad_id.status, 400) << bad_id.body;
  EXPECT_NE(bad_id.body.find("5000"), std::string::npos);

  HttpResponse wrong_model =
      post(port(), "/v1/completions", json{{"prompt", "hi"}, {"model", "gpt-9"}}.dump());
  EXPECT_EQ(wrong_model.status, 404);
  // The server is still fine.
  EXPECT_EQ(post(port(), "/v1/completions", kProbe).status, 200);
}

TEST_F(Serve, StopStringEndsTheTextBeforeIt) {
  json greedy = {
      {"prompt", "the bridge"}, {"max_tokens", 40}, {"temperature", 0}, {"ignore_eos", true}};
  HttpResponse full = post(port(), "/v1/completions", greedy.dump());
  ASSERT_EQ(full.status, 200);
  const std::string text = json::parse(full.body)["choices"][0]["text"];
  ASSERT_GT(text.size(), 12u) << text;
  const std::string stop = text.substr(text.size() / 2, 3);
  greedy["stop"] = stop;
  json stopped = json::parse(post(port(), "/v1/completions", greedy.dump()).body)["choices"][0];
  EXPECT_EQ(stopped["text"], text.substr(0, text.find(stop)));
  EXPECT_EQ(stopped["finish_reason"], "stop");
  // vLLM's include_stop_str_in_output keeps the stop string.
  greedy["include_stop_str_in_output"] = true;
  json kept = json::parse(post(port(), "/v1/completions", greedy.dump()).body)["choices"][0];
  EXPECT_EQ(kept["text"], text.substr(0, text.find(stop) + stop.size()));
  // min_tokens past the stop string's end: it is not looked for until then (vLLM).
  greedy["include_stop_str_in_output"] = false;
  greedy["min_tokens"] = 39;
  json late = json::parse(post(port(), "/v1/completions", greedy.dump()).body)["choices"][0];
  EXPECT_EQ(late["text"].get<std::string>().rfind(text.substr(0, text.find(stop) + stop.size()), 0),
            0u)
      << "the text runs past the first occurrence";
}

TEST_F(Serve, ChatUsesTheModelTemplateAndModelsListsTheModel) {
  HttpResponse models = http(port(), "GET", "/v1/models");
  ASSERT_EQ(models.status, 200);
  EXPECT_EQ(json::parse(models.body)["data"][0]["id"], "tiny");
  HttpResponse chat = post(port(), "/v1/chat/completions",
                           json{{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                                {"max_tokens", 5},
                                {"temperature", 0}}
                               .dump());
  ASSERT_EQ(chat.status, 200) << chat.body;
  json body = json::parse(chat.body);
  EXPECT_EQ(body["object"], "chat.completion");
  // ChatML: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n with the special tokens as
  // single ids: more than the 2 tokens "hi" alone would be, fewer than spelling them in bytes.
  const int prompt_tokens = body["usage"]["prompt_tokens"];
  EXPECT_GE(prompt_tokens, 7);
  EXPECT_LE(prompt_tokens, 16);
}

TEST_F(Serve, ClientDisconnectMidStreamFreesItsBlocks) {
  int fd = connect_to(port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd, request_text("POST", "/v1/completions",
                                        json{{"prompt", "a long walk"},
                                             {"max_tokens", 3000},
                                             {"stream", true},
                                             {"ignore_eos", true}}
                                            .dump())));
  char buffer[4096];
  std::string seen;
  while (seen.find("data: ") == std::string::npos) {
    ssize_t bytes = recv(fd, buffer, sizeof(buffer), 0);
    ASSERT_GT(bytes, 0);
    seen.append(buffer, static_cast<size_t>(bytes));
  }
  const double aborted_before = metric_value(port(), "keel_request_aborted_total");
  EXPECT_GT(metric_value(port(), "keel_kv_cache_usage_perc"), 0.0)
      << seen << "\n"
      << http(port(), "GET", "/metrics").body.substr(0, 2000);
  close(fd);
  // The next steps notice the hang-up, abort the request and free its blocks.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline &&
         (metric_value(port(), "keel_kv_cache_usage_perc") != 0.0 ||
          metric_value(port(), "keel_num_requests_running") != 0.0))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(metric_value(port(), "keel_kv_cache_usage_perc"), 0.0);
  EXPECT_EQ(metric_value(port(), "keel_num_requests_running"), 0.0);
  EXPECT_EQ(metric_value(port(), "keel_request_aborted_total"), aborted_before + 1)
      << seen << "\n"
      << http(port(), "GET", "/metrics").body.substr(0, 2000);
}

// Counters are published before the client hears: read right after a response, /metrics
// already counts it (no polling; the engine publishes before it hands the response over).
TEST_F(Serve, MetricsCountAResponseBeforeItsClientHasIt) {
  for (int round = 0; round < 3; ++round) {
    const double success_before = metric_value(port(), "keel_request_success_total");
    const double generated_before = metric_value(port(), "keel_generation_tokens_total");
    HttpResponse response =
        post(port(), "/v1/completions",
             json{{"prompt", "count me"}, {"max_tokens", 4}, {"ignore_eos", true}}.dump());
    ASSERT_EQ(response.status, 200) << response.body;
    EXPECT_EQ(metric_value(port(), "keel_request_success_total"), success_before + 1);
    EXPECT_EQ(metric_value(port(), "keel_generation_tokens_total"), generated_before + 4);
  }
}

// A batch of prompts in one request: choice i is bit for bit what prompt i returns alone with
// the same seed (sampling keyed by (seed, position), batch-invariant kernels), and each prompt
// is a request of its own in the telemetry, under the response's id with "-i".
TEST_F(Serve, PromptBatchGivesEachPromptsOwnBits) {
  const std::vector<std::string> prompts = {"the mill by the river", "lanterns in summer",
                                            "a stone bridge and its boats"};
  json request = {{"max_tokens", 12},
                  {"temperature", 0.8},
                  {"seed", 77},
                  {"logprobs", 2},
                  {"ignore_eos", true}};
  std::vector<json> alone;
  for (const std::string& prompt : prompts) {
    json single = request;
    single["prompt"] = prompt;
    HttpResponse response = post(port(), "/v1/completions", single.dump());
    ASSERT_EQ(response.status, 200) << response.body;
    alone.push_back(json::parse(response.body));
  }
  json batch = request;
  batch["prompt"] = prompts;
  HttpResponse response = post(port(), "/v1/completions", batch.dump());
  ASSERT_EQ(response.status, 200) << response.body;
  const json body = json::parse(response.body);
  ASSERT_EQ(body["choices"].size(), prompts.size());
  int64_t prompt_tokens = 0;
  for (size_t index = 0; index < prompts.size(); ++index) {
    const json& choice = body["choices"][index];
    const json& single = alone[index]["choices"][0];
    EXPECT_EQ(choice["index"], index);
    EXPECT_EQ(choice["text"], single["text"]) << "prompt " << index;
    // nlohmann prints floats round-trip exactly, so equal dumps are equal bits.
    EXPECT_EQ(choice["logprobs"].dump(), single["logprobs"].dump()) << "prompt " << index;
    prompt_tokens += alone[index]["usage"]["prompt_tokens"].get<int64_t>();
  }
  EXPECT_EQ(body["usage"]["prompt_tokens"], prompt_tokens);
  EXPECT_EQ(body["usage"]["completion_tokens"], 12 * 3);
  const std::string id = body["id"];
  const json requests = json::parse(http(port(), "GET", "/v1/telemetry/requests?limit=3").body);
  std::set<std::string> ids;
  for (const json& record : requests["requests"]) ids.insert(record["id"].get<std::string>());
  EXPECT_EQ(ids, (std::set<std::string>{id + "-0", id + "-1", id + "-2"}));
}

// "token_id:N" (return_tokens_as_token_ids) -> N.
int32_t id_of(const json& name) {
  const std::string text = name.get<std::string>();
  EXPECT_EQ(text.rfind("token_id:", 0), 0u) << text;
  return std::stoi(text.substr(9));
}

std::vector<int32_t> generated_ids(const json& choice) {
  std::vector<int32_t> ids;
  for (const json& token : choice["logprobs"]["tokens"]) ids.push_back(id_of(token));
  return ids;
}

TEST_F(Serve, StopTokenIdsMinTokensAndLogitBiasActOnTheGeneratedTokens) {
  const json greedy = {{"prompt", "the bridge"}, {"max_tokens", 12},
                       {"temperature", 0},       {"ignore_eos", true},
                       {"logprobs", 1},          {"return_tokens_as_token_ids", true}};
  const json full = json::parse(post(port(), "/v1/completions", greedy.dump()).body)["choices"][0];
  const std::vector<int32_t> ids = generated_ids(full);
  ASSERT_EQ(ids.size(), 12u) << full.dump();
  for (const json& alternatives : full["logprobs"]["top_logprobs"])
    for (const auto& [name, logprob] : alternatives.items())
      EXPECT_EQ(name.rfind("token_id:", 0), 0u);

  // stop_token_ids: generation ends right after the id's first occurrence, even with
  // ignore_eos.
  const int32_t stop_id = ids[3];
  const size_t first =
      static_cast<size_t>(std::find(ids.begin(), ids.end(), stop_id) - ids.begin());
  json stop = greedy;
  stop["stop_token_ids"] = {stop_id};
  const json stopped = json::parse(post(port(), "/v1/completions", stop.dump()).body)["choices"][0];
  EXPECT_EQ(stopped["finish_reason"], "stop");
  EXPECT_EQ(generated_ids(stopped), std::vector<int32_t>(ids.begin(), ids.begin() + first + 1));

  // min_tokens: the stop id is masked until min_tokens tokens are out.
  const size_t min_tokens = first + 3;
  stop["min_tokens"] = min_tokens;
  const json held = json::parse(post(port(), "/v1/completions", stop.dump()).body)["choices"][0];
  const std::vector<int32_t> held_ids = generated_ids(held);
  ASSERT_GE(held_ids.size(), min_tokens) << held.dump();
  for (size_t i = 0; i < min_tokens; ++i) EXPECT_NE(held_ids[i], stop_id) << "token " << i;
  EXPECT_EQ(held["finish_reason"] == "stop", held_ids.back() == stop_id) << held.dump();

  // logit_bias: +100 makes one token the greedy choice at every position; -100 removes the
  // first greedy token from the first position.
  json biased = greedy;
  const int32_t favoured = ids[5];
  biased["logit_bias"] = {{std::to_string(favoured), 100}};
  const json all_favoured =
      json::parse(post(port(), "/v1/completions", biased.dump()).body)["choices"][0];
  EXPECT_EQ(generated_ids(all_favoured), std::vector<int32_t>(12, favoured));
  biased["logit_bias"] = {{std::to_string(ids[0]), -100}};
  const json avoided =
      json::parse(post(port(), "/v1/completions", biased.dump()).body)["choices"][0];
  EXPECT_NE(generated_ids(avoided)[0], ids[0]);

  // Ids outside the vocabulary are the client's error, by name.
  json outside = greedy;
  outside["stop_token_ids"] = {5000};
  HttpResponse refused = post(port(), "/v1/completions", outside.dump());
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(json::parse(refused.body)["error"]["param"], "stop_token_ids");
  outside = greedy;
  outside["logit_bias"] = {{"1024", 1}};
  refused = post(port(), "/v1/completions", outside.dump());
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(json::parse(refused.body)["error"]["param"], "logit_bias");
}

// n > 1: choice j is bit for bit the same request with n = 1 and seed + j, streamed or not.
TEST_F(Serve, NChoicesAreEachTheRequestWithItsDerivedSeed) {
  json request = {{"prompt", "lanterns in summer"},
                  {"max_tokens", 10},
                  {"temperature", 0.9},
                  {"seed", 500},
                  {"logprobs", 2},
                  {"ignore_eos", true},
                  {"presence_penalty", 0.5}};
  std::vector<json> alone;
  for (int sample = 0; sample < 3; ++sample) {
    json single = request;
    single["seed"] = 500 + sample;
    HttpResponse response = post(port(), "/v1/completions", single.dump());
    ASSERT_EQ(response.status, 200) << response.body;
    alone.push_back(json::parse(response.body));
  }
  request["n"] = 3;
  HttpResponse response = post(port(), "/v1/completions", request.dump());
  ASSERT_EQ(response.status, 200) << response.body;
  const json body = json::parse(response.body);
  ASSERT_EQ(body["choices"].size(), 3u);
  std::set<std::string> texts;
  for (size_t index = 0; index < 3; ++index) {
    const json& choice = body["choices"][index];
    EXPECT_EQ(choice["index"], index);
    EXPECT_EQ(choice["text"], alone[index]["choices"][0]["text"]) << index;
    EXPECT_EQ(choice["logprobs"].dump(), alone[index]["choices"][0]["logprobs"].dump()) << index;
    texts.insert(choice["text"].get<std::string>());
  }
  EXPECT_EQ(texts.size(), 3u) << "three seeds, three samples";
  EXPECT_EQ(body["usage"]["prompt_tokens"], alone[0]["usage"]["prompt_tokens"]) << "counted once";
  EXPECT_EQ(body["usage"]["completion_tokens"], 30);

  request["stream"] = true;
  HttpResponse streamed = post(port(), "/v1/completions", request.dump());
  ASSERT_EQ(streamed.status, 200);
  bool done = false;
  std::map<size_t, std::string> streamed_text;
  for (const std::string& event : sse_events(streamed.body, &done)) {
    const json chunk = json::parse(event);
    for (const json& choice : chunk["choices"])
      streamed_text[choice["index"].get<size_t>()] += choice["text"].get<std::string>();
  }
  EXPECT_TRUE(done);
  ASSERT_EQ(streamed_text.size(), 3u);
  for (size_t index = 0; index < 3; ++index)
    EXPECT_EQ(streamed_text[index], body["choices"][index]["text"]) << index;
}

// echo puts the prompt (text and, with logprobs, its tokens) before the completion;
// prompt_logprobs reports each prompt token under the previous position's distribution. The
// last prompt token's logprob is bit for bit what the request one token shorter reported when
// it generated that token (the same row of logits: batch-invariant kernels).
TEST_F(Serve, EchoAndPromptLogprobsReportThePromptTokens) {
  const std::string prompt = "the mill by the river";
  const json plain = {{"prompt", prompt},
                      {"max_tokens", 3},
                      {"temperature", 0},
                      {"ignore_eos", true},
                      {"logprobs", 2}};
  const json reference = json::parse(post(port(), "/v1/completions", plain.dump()).body);
  const json& generated = reference["choices"][0];
  const int prompt_tokens = reference["usage"]["prompt_tokens"];

  json echoed = plain;
  echoed["echo"] = true;
  echoed["prompt_logprobs"] = 2;
  echoed["return_tokens_as_token_ids"] = true;
  HttpResponse response = post(port(), "/v1/completions", echoed.dump());
  ASSERT_EQ(response.status, 200) << response.body;
  const json choice = json::parse(response.body)["choices"][0];
  EXPECT_EQ(choice["text"], prompt + generated["text"].get<std::string>());
  const json& logprobs = choice["logprobs"];
  ASSERT_EQ(logprobs["tokens"].size(), static_cast<size_t>(prompt_tokens + 3));
  EXPECT_TRUE(logprobs["token_logprobs"][0].is_null());
  EXPECT_TRUE(logprobs["top_logprobs"][0].is_null());
  EXPECT_EQ(logprobs["text_offset"][0], 0);
  const json& prompt_logprobs = choice["prompt_logprobs"];
  ASSERT_EQ(prompt_logprobs.size(), static_cast<size_t>(prompt_tokens));
  EXPECT_TRUE(prompt_logprobs[0].is_null());
  std::vector<int32_t> prompt_ids;
  for (int position = 0; position < prompt_tokens; ++position) {
    const int32_t id = id_of(logprobs["tokens"][position]);
    prompt_ids.push_back(id);
    if (position == 0) continue;
    const json& entry = prompt_logprobs[position];
    ASSERT_TRUE(entry.contains(std::to_string(id))) << entry.dump();
    EXPECT_LE(entry.size(), 3u);  // the token and 2 alternatives (it may be one of them)
    EXPECT_GE(entry[std::to_string(id)]["rank"].get<int>(), 1);
    // The echoed prompt token's logprob is the prompt_logprobs value.
    EXPECT_EQ(logprobs["token_logprobs"][position].dump(),
              entry[std::to_string(id)]["logprob"].dump());
  }
  // The generated part is the plain request's, position for position.
  for (size_t token = 0; token < 3; ++token)
    EXPECT_EQ(logprobs["token_logprobs"][prompt_tokens + token].dump(),
              generated["logprobs"]["token_logprobs"][token].dump());

  // The prompt extended by the first generated token: its last prompt logprob is that token's.
  const int32_t first_generated = id_of(logprobs["tokens"][prompt_tokens]);
  std::vector<int32_t> extended = prompt_ids;
  extended.push_back(first_generated);
  const json longer =
      json::parse(post(port(), "/v1/completions",
                       json{{"prompt", extended}, {"max_tokens", 1}, {"prompt_logprobs", 0}}.dump())
                      .body)["choices"][0];
  EXPECT_EQ(longer["prompt_logprobs"].back()[std::to_string(first_generated)]["logprob"].dump(),
            generated["logprobs"]["token_logprobs"][0].dump());

  // Streamed echo: the first chunk is the prompt.
  json streamed = plain;
  streamed["echo"] = true;
  streamed["stream"] = true;
  HttpResponse stream = post(port(), "/v1/completions", streamed.dump());
  ASSERT_EQ(stream.status, 200);
  const std::vector<std::string> events = sse_events(stream.body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(json::parse(events[0])["choices"][0]["text"], prompt);
  std::string text;
  for (const std::string& event : events)
    text += json::parse(event)["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(text, choice["text"]);
}

// Chat logprobs: "token" is the token's own text and "bytes" its own bytes (a token may hold
// part of a UTF-8 character, which its text cannot show).
TEST_F(Serve, ChatLogprobsCarryEachTokensOwnBytes) {
  const keel::Tokenizer tokenizer = keel::Tokenizer::load(model_dir() + "/tokenizer.json");
  json request = {{"messages", {{{"role", "user"}, {"content", "h\u00e9llo w\u00f6rld \u2713"}}}},
                  {"max_tokens", 24},
                  {"temperature", 1.0},
                  {"seed", 3},
                  {"ignore_eos", true},
                  {"logprobs", true},
                  {"top_logprobs", 2},
                  {"prompt_logprobs", 1}};
  const json named = json::parse(post(port(), "/v1/chat/completions", request.dump()).body);
  request["return_tokens_as_token_ids"] = true;
  const json by_id = json::parse(post(port(), "/v1/chat/completions", request.dump()).body);
  const json& entries = named["choices"][0]["logprobs"]["content"];
  const json& id_entries = by_id["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(entries.size(), 24u) << named.dump();
  ASSERT_EQ(id_entries.size(), entries.size());
  const auto bytes_of = [](const json& list) {
    std::string bytes;
    for (const json& byte : list) bytes.push_back(static_cast<char>(byte.get<int>()));
    return bytes;
  };
  std::vector<int32_t> ids;
  bool saw_partial_character = false;
  for (size_t i = 0; i < entries.size(); ++i) {
    const int32_t id = id_of(id_entries[i]["token"]);
    ids.push_back(id);
    EXPECT_EQ(entries[i]["token"], tokenizer.decode({id})) << i;
    EXPECT_EQ(bytes_of(entries[i]["bytes"]), tokenizer.token_bytes(id)) << i;
    EXPECT_EQ(id_entries[i]["bytes"], entries[i]["bytes"]) << i;
    // A token holding part of a UTF-8 character: its text is U+FFFD, its bytes the real ones.
    saw_partial_character |= bytes_of(entries[i]["bytes"]) != entries[i]["token"];
    ASSERT_EQ(entries[i]["top_logprobs"].size(), 2u);
    for (size_t k = 0; k < 2; ++k)
      EXPECT_EQ(bytes_of(entries[i]["top_logprobs"][k]["bytes"]),
                tokenizer.token_bytes(id_of(id_entries[i]["top_logprobs"][k]["token"])));
  }
  EXPECT_TRUE(saw_partial_character) << "the sample (seed 3) has tokens that split a character";
  // The content is those tokens decoded together (split characters joined, invalid ones U+FFFD).
  EXPECT_EQ(named["choices"][0]["message"]["content"].get<std::string>(),
            tokenizer.decode(ids, /*skip_special_tokens=*/true));
  // A chat's prompt_logprobs sit on the response, one per prompt token.
  EXPECT_EQ(named["prompt_logprobs"].size(), named["usage"]["prompt_tokens"].get<size_t>());
  EXPECT_TRUE(named["prompt_logprobs"][0].is_null());
}

TEST_F(Serve, CurlStreamsAChat) {
  const std::string command =
      "curl -sS -N --max-time 60 http://127.0.0.1:" + std::to_string(port()) +
      "/v1/chat/completions -H 'Content-Type: application/json' -d '{\"messages\":[{\"role\":"
      "\"user\",\"content\":\"hello\"}],\"max_tokens\":6,\"stream\":true,\"ignore_eos\":true}'";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  size_t bytes;
  while ((bytes = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, bytes);
  ASSERT_EQ(pclose(pipe), 0) << output;
  bool done = false;
  std::vector<std::string> events = sse_events(output, &done);
  EXPECT_TRUE(done) << output;
  // A role chunk, 6 content chunks, a finish chunk.
  ASSERT_EQ(events.size(), 8u) << output;
  EXPECT_EQ(json::parse(events.back())["choices"][0]["finish_reason"], "length");
}

// Telemetry ground truth: the per-expert counters move by exactly the routing the request itself
// reports (every forward position of prompt and output, every MoE layer, every slot), and the
// near-tie counter by exactly its margins under epsilon.
TEST_F(Serve, ExpertCountersMatchTheRequestsOwnRoutingExactly) {
  const json before = json::parse(http(port(), "GET", "/v1/telemetry/experts").body);
  HttpResponse response = post(port(), "/v1/completions",
                               json{{"prompt", "count every expert"},
                                    {"max_tokens", 9},
                                    {"temperature", 0},
                                    {"ignore_eos", true},
                                    {"return_routing", true}}
                                   .dump());
  ASSERT_EQ(response.status, 200) << response.body;
  const json after = json::parse(http(port(), "GET", "/v1/telemetry/experts").body);
  const json choice = json::parse(response.body)["choices"][0];
  const json& routed = choice["routed_experts"];   // [token][moe layer][slot]
  const json& margins = choice["router_margins"];  // [token][moe layer]
  const int prompt_tokens = json::parse(response.body)["usage"]["prompt_tokens"];
  ASSERT_EQ(routed.size(), static_cast<size_t>(prompt_tokens + 9 - 1));
  const size_t num_experts = after["num_experts"];
  const double epsilon = after["near_tie_epsilon"];
  for (size_t layer = 0; layer < after["layers"].size(); ++layer) {
    std::vector<int64_t> expected(num_experts, 0);
    int64_t expected_near_ties = 0;
    for (size_t token = 0; token < routed.size(); ++token) {
      for (const json& expert : routed[token][layer]) ++expected[expert.get<size_t>()];
      if (margins[token][layer].get<double>() < epsilon) ++expected_near_ties;
    }
    for (size_t expert = 0; expert < num_experts; ++expert)
      EXPECT_EQ(after["layers"][layer]["tokens"][expert].get<int64_t>() -
                    before["layers"][layer]["tokens"][expert].get<int64_t>(),
                expected[expert])
          << "layer " << layer << " expert " << expert;
    EXPECT_EQ(after["layers"][layer]["near_ties"].get<int64_t>() -
                  before["layers"][layer]["near_ties"].get<int64_t>(),
              expected_near_ties);
  }
  // The request and the steps that served it are joinable by id.
  const std::string id = json::parse(response.body)["id"];
  const json requests = json::parse(http(port(), "GET", "/v1/telemetry/requests?limit=5").body);
  const json* record = nullptr;
  for (const json& request : requests["requests"])
    if (request["id"] == id) record = &request;
  ASSERT_NE(record, nullptr) << requests.dump();
  EXPECT_EQ((*record)["completion_tokens"], 9);
  EXPECT_LE((*record)["ttft_s"].get<double>(), (*record)["e2e_s"].get<double>());
  const json steps = json::parse(
      http(port(), "GET",
           "/v1/telemetry/steps?first=" + std::to_string((*record)["first_step"].get<int64_t>()) +
               "&last=" + std::to_string((*record)["last_step"].get<int64_t>()))
          .body);
  int64_t steps_with_request = 0;
  for (const json& step : steps["steps"]) {
    for (const json& request_id : step["request_ids"]) steps_with_request += request_id == id;
    EXPECT_EQ(step["phases"]["attention"].size(), 4u);  // one entry per rank
  }
  EXPECT_EQ(steps_with_request, 9);  // one prefill step (budget 256) + 8 decode steps
}

// Steps that follow each other without an idle wait carry the serving overhead between them
// (gap_before_s = this start - previous end), and keel calibrate --from-url folds that overhead
// into each step's cost; a step after an idle wait has no gap.
TEST_F(Serve, StepGapsAreTheOverheadBetweenBackToBackStepsAndCalibrationCountsThem) {
  const json before = json::parse(http(port(), "GET", "/v1/telemetry/steps").body);
  // Idle long enough (> the 20 ms idle wait) that the next request starts after a wait.
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  HttpResponse response =
      post(port(), "/v1/completions",
           json{{"prompt", "gap probe"}, {"max_tokens", 6}, {"ignore_eos", true}}.dump());
  ASSERT_EQ(response.status, 200) << response.body;
  const json steps = json::parse(http(port(), "GET", "/v1/telemetry/steps").body)["steps"];
  const int64_t last_before =
      before["steps"].empty() ? -1 : before["steps"].back()["id"].get<int64_t>();
  std::vector<json> served;
  for (const json& step : steps)
    if (step["id"].get<int64_t>() > last_before) served.push_back(step);
  ASSERT_EQ(served.size(), 6u);  // one prefill step + 5 decode steps, alone on the server
  EXPECT_TRUE(served[0]["gap_before_s"].is_null()) << "the first step follows an idle wait";
  for (size_t i = 1; i < served.size(); ++i) {
    ASSERT_FALSE(served[i]["gap_before_s"].is_null()) << "step " << i << " ran back to back";
    const double previous_end =
        served[i - 1]["start_s"].get<double>() + served[i - 1]["seconds"].get<double>();
    EXPECT_NEAR(served[i]["gap_before_s"].get<double>(),
                served[i]["start_s"].get<double>() - previous_end, 1e-9);
    EXPECT_GE(served[i]["gap_before_s"].get<double>(), 0.0);
  }
  const std::string calibration = scratch() + "/served-calibration.json";
  int exit_code = -1;
  const std::string output =
      run_command(kKeel + " calibrate --from-url http://127.0.0.1:" + std::to_string(port()) +
                      " --out " + calibration,
                  &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  std::ifstream file(calibration);
  const json written = json::parse(file);
  EXPECT_GE(written["median_gap_s"].get<double>(), 0.0);
  // A shape's median cost (time + gap >= 0) is at least its fastest served step's time;
  // decode-only points are that median (only prefill shapes may take a fitted line).
  for (const json& point : written["points"]) {
    double fastest = 1e30;
    for (const json& step : steps)
      if (step["num_decode_tokens"] == point["num_decode_tokens"] &&
          step["num_prefill_tokens"] == point["num_prefill_tokens"])
        fastest = std::min(fastest, step["seconds"].get<double>());
    EXPECT_GE(point["median_s"].get<double>(), fastest) << point.dump();
    if (point["num_prefill_tokens"] == 0) {
      EXPECT_EQ(point["step_s"].get<double>(), point["median_s"].get<double>()) << point.dump();
    }
  }
  EXPECT_NO_THROW(keel::sim::CalibratedCostModel::load(calibration));

  // The same offline from a saved answer, limited to this request's steps.
  const std::string saved = scratch() + "/saved-steps.json";
  std::ofstream(saved) << json{{"steps", steps}}.dump();
  const std::string offline = scratch() + "/offline-calibration.json";
  const int64_t first = served.front()["id"], last = served.back()["id"];
  const std::string offline_output = run_command(
      kKeel + " calibrate --from-steps " + saved + " --first-step " + std::to_string(first) +
          " --last-step " + std::to_string(last) + " --out " + offline,
      &exit_code);
  ASSERT_EQ(exit_code, 0) << offline_output;
  std::ifstream offline_file(offline);
  EXPECT_EQ(json::parse(offline_file)["points"],
            keel::calibration_from_served_steps(json(served), 1)["points"]);
  const std::string bad = scratch() + "/not-steps.json";
  std::ofstream(bad) << "{\"requests\": []}";
  const std::string bad_output =
      run_command(kKeel + " calibrate --from-steps " + bad + " --out " + offline, &exit_code);
  EXPECT_NE(exit_code, 0);
  EXPECT_NE(bad_output.find("no \"steps\" array"), std::string::npos) << bad_output;
}

TEST_F(Serve, MetricsPassPromtool) {
  ASSERT_EQ(post(port(), "/v1/completions", kProbe).status, 200);
  HttpResponse metrics = http(port(), "GET", "/metrics");
  ASSERT_EQ(metrics.status, 200);
  for (const char* family :
       {"keel_expert_tokens_total", "keel_expert_seconds_bucket", "keel_moe_balancedness",
        "keel_router_margin_bucket", "keel_router_near_ties_total",
        "keel_step_phase_seconds_bucket", "keel_time_to_first_token_seconds_bucket",
        "keel_inter_token_latency_seconds_bucket", "keel_e2e_request_latency_seconds_bucket",
        "keel_request_queue_time_seconds_bucket", "keel_http_open_connections",
        "keel_http_slow_reader_aborts_total"})
    EXPECT_NE(metrics.body.find(family), std::string::npos) << family;
  EXPECT_NE(metrics.body.find("phase=\"allreduce\",algo=\"fixed_order\""), std::string::npos);
  const PromtoolResult lint = promtool_check(metrics.body, scratch() + "/metrics.txt");
  ASSERT_NE(lint.status, 127)
      << "promtool not found: install Debian's prometheus package (scripts/setup does)";
  EXPECT_EQ(lint.status, 0) << lint.findings;
  EXPECT_EQ(lint.findings, "") << "promtool lint findings";
}

TEST_F(Serve, ProfileWritesAChromeTraceWithOneTrackPerRank) {
  ASSERT_EQ(http(port(), "POST", "/v1/profile/start").status, 200);
  ASSERT_EQ(post(port(), "/v1/completions", kProbe).status, 200);
  // The path is a new file under trace_dir (confinement: test_serve_profile).
  HttpResponse stop = post(port(), "/v1/profile/stop", json{{"path", "trace.json"}}.dump());
  ASSERT_EQ(stop.status, 200) << stop.body;
  const std::string path = scratch() + "/traces/trace.json";
  EXPECT_EQ(json::parse(stop.body)["path"], path);
  EXPECT_GT(json::parse(stop.body)["spans"].get<int64_t>(), 0);
  EXPECT_EQ(post(port(), "/v1/profile/stop", "").status, 409);  // nothing running any more
  // Written off the server's threads: wait for the writer to report.
  json status;
  for (int attempt = 0; attempt < 600; ++attempt) {
    status = json::parse(http(port(), "GET", "/v1/profile").body);
    if (status["last_trace"]["state"] != "writing") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(status["last_trace"]["state"], "written") << status.dump();
  std::ifstream file(path);
  const json trace = json::parse(file);
  std::set<int> ranks;
  bool expert_span = false, allreduce_span = false;
  for (const json& event : trace["traceEvents"]) {
    if (event["ph"] != "X") continue;
    ranks.insert(event["tid"].get<int>());
    expert_span |= event["name"].get<std::string>().rfind("expert ", 0) == 0;
    allreduce_span |= event["name"] == "allreduce";
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1, 2, 3}));
  EXPECT_TRUE(expert_span);
  EXPECT_TRUE(allreduce_span);
}

// A capture records the numerics that decide the bits besides the reduction: the checkpoint's
// quantization, NVFP4 W4A4 activations and the KV cache dtype. Replay runs with them (without
// them every W4A4 record would fail to reproduce) and refuses a checkpoint of another
// quantization, naming both.
// Tools and reasoning end to end: the tiny-chat model given Qwen3.5's real chat template. The
// prompt the server renders for a request (tools, tool-call history, enable_thinking) has
// exactly the tokens of transformers' rendering (the golden in
// tests/fixtures/chat_templates/qwen3_5_tools.json); the answer carries reasoning_content, the
// same streamed as not; what keel cannot do is refused by name.
TEST(ServeAlone, QwenTemplateRendersToolsAndSeparatesReasoning) {
  const std::string dir = scratch() + "/tiny-chat-qwen35";
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(model_dir()))
    fs::copy(entry.path(), dir + "/" + entry.path().filename().string(),
             fs::copy_options::overwrite_existing);
  std::ifstream fixture_file(std::string(KEEL_SOURCE_DIR) +
                             "/tests/fixtures/chat_templates/qwen3_5_tools.json");
  const nlohmann::ordered_json fixture = nlohmann::ordered_json::parse(fixture_file);
  std::ofstream(dir + "/tokenizer_config.json") << fixture["tokenizer_config"].dump();
  fs::remove(dir + "/chat_template.jinja");
  const std::string config = scratch() + "/qwen35.yaml";
  std::ofstream(config) << "model: " << dir << "\nmodel_name: tiny\ntp: 2\nport: 0\n"
                        << "determinism: batch_invariant\ncollective_timeout_ms: 60000\n";
  ServerProcess server(serve_args(config));
  const keel::Tokenizer tokenizer = keel::Tokenizer::load(dir + "/tokenizer.json");

  // The fixture case whose first message has this content, as an OpenAI request (tool-call
  // arguments as JSON strings, an empty assistant content as null).
  auto golden = [&](const std::string& first_content) {
    for (const auto& test_case : fixture["cases"]) {
      if (test_case["messages"][0]["content"] != first_content) continue;
      nlohmann::ordered_json request = {{"max_tokens", 12}, {"temperature", 0.8}, {"seed", 7}};
      request["messages"] = test_case["messages"];
      for (auto& message : request["messages"]) {
        if (!message.contains("tool_calls")) continue;
        if (message["content"] == "") message["content"] = nullptr;
        for (auto& call : message["tool_calls"])
          call["function"]["arguments"] = call["function"]["arguments"].dump();
      }
      if (test_case.contains("tools")) request["tools"] = test_case["tools"];
      if (test_case.contains("enable_thinking"))
        request["chat_template_kwargs"] = {{"enable_thinking", test_case["enable_thinking"]}};
      return std::make_pair(request, test_case["rendered"].get<std::string>());
    }
    ADD_FAILURE() << "no fixture case starts with " << first_content;
    return std::make_pair(nlohmann::ordered_json(), std::string());
  };
  for (const char* first :
       {"You are a helpful agent.", "Compare Paris and Rome.", "Quick answer: 2+2?", "2+2?"}) {
    SCOPED_TRACE(first);
    auto [request, rendered] = golden(first);
    HttpResponse reply = post(server.port(), "/v1/chat/completions", request.dump());
    ASSERT_EQ(reply.status, 200) << reply.body;
    const json body = json::parse(reply.body);
    EXPECT_EQ(body["usage"]["prompt_tokens"].get<size_t>(), tokenizer.encode(rendered).size());
    const json& message = body["choices"][0]["message"];
    ASSERT_TRUE(message.contains("reasoning_content")) << reply.body;
    const bool thinking = !request.contains("chat_template_kwargs");
    // Thinking off: all content, no reasoning. On: the output begins inside <think>.
    EXPECT_EQ(message["reasoning_content"].is_null(), !thinking) << reply.body;
    if (!thinking) {
      EXPECT_TRUE(message["content"].is_string());
    }

    // Streamed, the same seed gives the same message delta by delta.
    request["stream"] = true;
    HttpResponse stream = post(server.port(), "/v1/chat/completions", request.dump());
    ASSERT_EQ(stream.status, 200);
    std::string reasoning, content;
    for (const std::string& event : sse_events(stream.body)) {
      if (event == "[DONE]") continue;
      const json delta = json::parse(event)["choices"][0]["delta"];
      reasoning += delta.value("reasoning_content", "");
      content += delta.value("content", "");
    }
    EXPECT_EQ(reasoning, message["reasoning_content"].is_null()
                             ? ""
                             : message["reasoning_content"].get<std::string>());
    EXPECT_EQ(content, message["content"].is_null() ? "" : message["content"].get<std::string>());
  }
  auto [request, rendered] = golden("You are a helpful agent.");
  request["tool_choice"] = "required";
  HttpResponse required = post(server.port(), "/v1/chat/completions", request.dump());
  EXPECT_EQ(required.status, 400);
  EXPECT_EQ(json::parse(required.body)["error"]["param"], "tool_choice");
  request["tool_choice"] = "auto";
  request["chat_template_kwargs"] = {{"preserve_thinking", true}};
  HttpResponse unknown = post(server.port(), "/v1/chat/completions", request.dump());
  EXPECT_EQ(unknown.status, 400);
  EXPECT_EQ(json::parse(unknown.body)["error"]["param"], "chat_template_kwargs.preserve_thinking");
  // What Qwen3.5's template raises on is a 400 naming its reason.
  request.erase("chat_template_kwargs");
  request["messages"].push_back({{"role", "system"}, {"content", "late"}});
  HttpResponse late = post(server.port(), "/v1/chat/completions", request.dump());
  EXPECT_EQ(late.status, 400);
  EXPECT_NE(late.body.find("System message must be at the beginning."), std::string::npos);
}

TEST(ServeAlone, QuantizedCaptureRecordsItsNumericsAndReplays) {
  const std::string nvfp4 = scratch() + "/tiny-chat-nvfp4";
  keel::GenModelOptions options;
  options.quant.format = keel::QuantFormat::kNvfp4;
  keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), options,
                       nvfp4);
  const std::string capture = scratch() + "/capture-w4a4.keelrt";
  const std::string config = scratch() + "/w4a4.yaml";
  std::ofstream(config) << "model: " << nvfp4 << "\nmodel_name: tiny\ntp: 2\n"
                        << "determinism: batch_invariant\nport: 0\ncollective_timeout_ms: 60000\n"
                        << "nvfp4_activations: w4a4\nkv_cache_dtype: fp8_e4m3\n"
                        << "routing_capture: " << capture << "\n";
  {
    ServerProcess server(serve_args(config));
    ASSERT_EQ(post(server.port(), "/v1/completions", mate_request(0, false)).status, 200);
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  const keel::RoutingFile file = keel::read_routing_file(capture);
  EXPECT_EQ(file.header.quantization, "modelopt-nvfp4");
  EXPECT_EQ(file.header.nvfp4_activations, "w4a4");
  EXPECT_EQ(file.header.kv_cache_dtype, "fp8_e4m3");
  int exit_code = -1;
  std::string output = run_command(kKeel + " routes replay " + capture + " --json", &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  const json report = json::parse(output.substr(output.find('{')));
  EXPECT_EQ(report["total"], 2);
  EXPECT_TRUE(report["all_reproduced"].get<bool>()) << output;
  output = run_command(kKeel + " routes replay " + capture + " --model " + model_dir(), &exit_code);
  EXPECT_NE(exit_code, 0) << output;
  EXPECT_NE(output.find("quantized 'modelopt-nvfp4'"), std::string::npos) << output;
}

// Capture every request's routing to a file, then replay it: forcing the recorded experts (and,
// separately, letting the router choose) reproduces every token and the logits digest; a record
// whose experts were altered does not.
TEST(ServeAlone, CapturedRoutingReplaysBitForBit) {
  const std::string capture = scratch() + "/capture.keelrt";
  {
    ServerProcess server(serve_args(write_config("capture", "routing_capture: " + capture + "\n")));
    for (int index = 0; index < 3; ++index)
      ASSERT_EQ(post(server.port(), "/v1/completions", mate_request(index, index == 1)).status,
                200);
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  int exit_code = -1;
  std::string output = run_command(kKeel + " routes replay " + capture + " --json", &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  json report = json::parse(output.substr(output.find('{')));
  EXPECT_EQ(report["total"], 4);
  EXPECT_TRUE(report["all_reproduced"].get<bool>());
  output = run_command(kKeel + " routes replay " + capture + " --no-force --json", &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
  output = run_command(kKeel + " routes diff " + capture + " " + capture + " --json", &exit_code);
  EXPECT_EQ(exit_code, 0) << output;

  // Force a different expert into every row of the probe: replay must notice.
  keel::RoutingFile file = keel::read_routing_file(capture);
  keel::RoutingRecord& probe = file.records.back();
  const int64_t experts = file.header.num_experts;
  for (size_t slot = 0; slot < probe.expert_ids.size(); slot += file.header.top_k) {
    // Replace the first choice by an expert not among the token's others.
    int32_t replacement = (probe.expert_ids[slot] + 1) % static_cast<int32_t>(experts);
    auto taken = [&](int32_t id) {
      for (int64_t k = 1; k < file.header.top_k; ++k)
        if (probe.expert_ids[slot + static_cast<size_t>(k)] == id) return true;
      return false;
    };
    while (taken(replacement)) replacement = (replacement + 1) % static_cast<int32_t>(experts);
    probe.expert_ids[slot] = replacement;
  }
  const std::string altered = scratch() + "/altered.keelrt";
  keel::write_routing_file(altered, file);
  output = run_command(kKeel + " routes replay " + altered + " --json", &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  report = json::parse(output.substr(output.find('{')));
  EXPECT_EQ(report["reproduced"], 3);
  EXPECT_FALSE(report["requests"][3]["reproduced"].get<bool>());
}

// Placement by observed load: GET /v1/telemetry/placement turns the live expert counters into a
// balanced placement file (each rank E / tp experts, the busiest rank no busier than now); a
// server started from that file (placement_file, 2 threads per rank) serves, records the
// placement in its routing capture, and the capture replays bit for bit on 1 thread per rank.
TEST(ServeAlone, BalancedPlacementFromLiveCountersServesAndReplays) {
  const std::string placement = scratch() + "/balanced-placement.yaml";
  {
    ServerProcess server(serve_args(write_config("live-placement", "")));
    for (int index = 0; index < 3; ++index)
      ASSERT_EQ(post(server.port(), "/v1/completions", mate_request(index, false)).status, 200);
    EXPECT_EQ(http(server.port(), "GET", "/v1/telemetry/placement?tp=0").status, 400);
    EXPECT_EQ(http(server.port(), "POST", "/v1/telemetry/placement").status, 405);
    const HttpResponse response = http(server.port(), "GET", "/v1/telemetry/placement");
    ASSERT_EQ(response.status, 200) << response.body;
    EXPECT_EQ(response.headers.at("content-type"), "application/yaml");
    std::ofstream(placement) << response.body;
    std::istringstream lines(response.body);
    int layers_compared = 0;
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("#   layer ", 0) != 0) continue;
      const size_t colon = line.find(": "), arrow = line.find(" -> ");
      EXPECT_LE(std::stoll(line.substr(arrow + 4)),
                std::stoll(line.substr(colon + 2, arrow - colon - 2)))
          << line;
      ++layers_compared;
    }
    EXPECT_GT(layers_compared, 0) << response.body;
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  const keel::PlacementSpec spec = keel::load_placement_file(placement);
  const auto config = keel::ModelConfig::load(model_dir() + "/config.json");
  ASSERT_EQ(spec.explicit_ranks.size(), static_cast<size_t>(config.num_layers));
  for (const std::vector<int>& ranks : spec.explicit_ranks)
    for (int rank = 0; rank < 4; ++rank)
      EXPECT_EQ(std::count(ranks.begin(), ranks.end(), rank), config.num_experts / 4);

  const std::string capture = scratch() + "/capture-balanced.keelrt";
  const std::string serve_config = scratch() + "/balanced.yaml";
  std::ofstream(serve_config) << "model: " << model_dir() << "\nmodel_name: tiny\ntp: 4\n"
                              << "threads: 2\nplacement_file: " << placement << "\n"
                              << "determinism: batch_invariant\nport: 0\n"
                              << "collective_timeout_ms: 60000\nrouting_capture: " << capture
                              << "\n";
  {
    ServerProcess server(serve_args(serve_config));
    ASSERT_EQ(post(server.port(), "/v1/completions", mate_request(1, true)).status, 200);
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  const keel::RoutingFile file = keel::read_routing_file(capture);
  EXPECT_EQ(file.header.placement, "explicit");
  EXPECT_EQ(file.header.extra.at("explicit_placement").get<std::vector<std::vector<int>>>(),
            spec.explicit_ranks);
  int exit_code = -1;
  const std::string output =
      run_command(kKeel + " routes replay " + capture + " --json", &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  const json report = json::parse(output.substr(output.find('{')));
  EXPECT_EQ(report["total"], 2);
  EXPECT_TRUE(report["all_reproduced"].get<bool>()) << output;
}

// Periodic JSONL dumps land in the configured directory; keel generate --trace writes a Chrome
// trace with one track per thread rank.
TEST(ServeAlone, TelemetryDumpsAndGenerateTrace) {
  const std::string dump_dir = scratch() + "/dumps";
  std::filesystem::create_directories(dump_dir);  // the server refuses a missing one
  {
    ServerProcess server(serve_args(write_config(
        "dumps", "telemetry_dump_dir: " + dump_dir + "\ntelemetry_dump_interval_s: 0.01\n")));
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    // The pause exceeds the interval, so the second request's first step must dump, whatever
    // the speed of the first (a fast machine runs all of it inside one interval).
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  std::ifstream dump(dump_dir + "/keel-telemetry.jsonl");
  std::string line;
  int lines = 0;
  json last;
  int64_t previous_steps = 0;
  while (std::getline(dump, line)) {
    last = json::parse(line);
    EXPECT_GE(last["steps_total"].get<int64_t>(), previous_steps) << "totals are cumulative";
    previous_steps = last["steps_total"].get<int64_t>();
    ++lines;
  }
  EXPECT_GE(lines, 2) << "an interval line in the second request plus the closing line";
  EXPECT_GT(last["steps_total"].get<int64_t>(), 0);
  EXPECT_FALSE(last["expert_tokens"].empty());

  const std::string trace = scratch() + "/generate-trace.json";
  int exit_code = -1;
  std::string output = run_command(
      kKeel + " generate --model " + model_dir() + " --tp 4 --max-tokens 3 --trace " + trace,
      &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  std::ifstream file(trace);
  const json events = json::parse(file)["traceEvents"];
  std::set<int> ranks;
  for (const json& event : events)
    if (event["ph"] == "X") ranks.insert(event["tid"].get<int>());
  EXPECT_EQ(ranks, (std::set<int>{0, 1, 2, 3}));
}

// Gauge `name{labels}` of a Prometheus exposition (the first sample line that starts with it).
double metric_value(const std::string& body, const std::string& sample) {
  const size_t at = body.find("\n" + sample + " ");
  if (at == std::string::npos) return -1;
  return std::stod(body.substr(at + sample.size() + 2));
}

// `keel serve --metrics-names vllm` with a long metrics_cache_s:
//  - concurrent scrapes get one body, byte for byte, and a request finished after it does not
//    show until the interval ends (the cache serves what it rendered);
//  - promtool parses it; its only findings are its lint against ':' in metric names, which
//    vLLM's own names (vllm:...) draw from vLLM's server too; keel's names alone pass clean
//    (MetricsPassPromtool);
//  - every metric vLLM's published Grafana dashboard queries (tests/fixtures/vllm_grafana) is
//    there with the model_name label the dashboard filters on, and every label the queries
//    aggregate by (le, finished_reason).
TEST(ServeAlone, MetricsUnderVllmNamesAreCachedAndServeVllmsDashboard) {
  std::vector<std::string> args = serve_args(write_config("vllm-names", "metrics_cache_s: 600\n"));
  args.insert(args.end(), {"--metrics-names", "vllm"});
  ServerProcess server(args);
  const std::string request =
      json{{"prompt", "a dashboard"}, {"max_tokens", 6}, {"ignore_eos", true}}.dump();
  ASSERT_EQ(post(server.port(), "/v1/completions", request).status, 200);
  constexpr int kScrapers = 8;
  std::vector<HttpResponse> scrapes(kScrapers);
  std::vector<std::thread> scrapers;
  for (int i = 0; i < kScrapers; ++i)
    scrapers.emplace_back(
        [&, i] { scrapes[static_cast<size_t>(i)] = http(server.port(), "GET", "/metrics"); });
  for (std::thread& scraper : scrapers) scraper.join();
  // The HTTP front end's keel_http_* gauges (open connections) are read live on every scrape,
  // after the cached engine body: they are a few counters, and a cached connection count
  // would be wrong for the scrape that reads it. The engine body is what the cache holds.
  auto engine_part = [](const std::string& text) {
    return text.substr(0, text.find("# HELP keel_http_"));
  };
  const std::string body = engine_part(scrapes[0].body);
  for (const HttpResponse& scrape : scrapes) {
    ASSERT_EQ(scrape.status, 200);
    EXPECT_NE(scrape.body.find("# HELP keel_http_open_connections"), std::string::npos);
    EXPECT_EQ(engine_part(scrape.body), body) << "two bodies within one cache interval";
  }
  ASSERT_EQ(post(server.port(), "/v1/completions", request).status, 200);
  EXPECT_EQ(engine_part(http(server.port(), "GET", "/metrics").body), body)
      << "the cache re-rendered early";
  EXPECT_NE(body.find("\nkeel_request_success_total{model_name=\"tiny\"} 1\n"), std::string::npos);
  EXPECT_NE(
      body.find("\nvllm:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 1\n"),
      std::string::npos);

  const PromtoolResult lint = promtool_check(scrapes[0].body, scratch() + "/vllm-metrics.txt");
  ASSERT_NE(lint.status, 127)
      << "promtool not found: install Debian's prometheus package (scripts/setup does)";
  EXPECT_EQ(lint.status, 3) << "promtool's lint exit status expected:\n" << lint.findings;
  std::istringstream findings(lint.findings);
  std::string finding;
  int colon_findings = 0;
  while (std::getline(findings, finding)) {
    EXPECT_TRUE(finding.rfind("vllm:", 0) == 0 &&
                finding.ends_with(" metric names should not contain ':'"))
        << "a promtool finding other than the colon in vLLM's names: " << finding;
    ++colon_findings;
  }
  EXPECT_GT(colon_findings, 10);

  std::ifstream fixture(std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/vllm_grafana/queries.txt");
  ASSERT_TRUE(fixture) << "tests/fixtures/vllm_grafana/queries.txt";
  std::string query;
  std::set<std::string> names;
  while (std::getline(fixture, query)) {
    if (query.empty() || query[0] == '#') continue;
    std::set<std::string> by_labels = {"model_name"};
    for (size_t at = query.find("by("); at != std::string::npos; at = query.find("by(", at + 1)) {
      const size_t end = query.find(')', at);
      by_labels.insert(query.substr(at + 3, end - at - 3));
    }
    for (size_t at = query.find("vllm:"); at != std::string::npos;
         at = query.find("vllm:", at + 1)) {
      size_t end = at + 5;
      while (end < query.size() && (std::isalnum(static_cast<unsigned char>(query[end])) ||
                                    query[end] == '_' || query[end] == ':'))
        ++end;
      const std::string name = query.substr(at, end - at);
      if (name == "vllm:") continue;  // the template query's regex vllm:.*
      names.insert(name);
      // Its samples: "name{...}" lines; each must carry every label the query groups by.
      size_t samples = 0;
      for (size_t line = body.find("\n" + name + "{"); line != std::string::npos;
           line = body.find("\n" + name + "{", line + 1)) {
        const std::string labels = body.substr(line, body.find('}', line) - line);
        EXPECT_NE(labels.find("model_name=\"tiny\""), std::string::npos) << labels;
        for (const std::string& label : by_labels)
          EXPECT_NE(labels.find(label + "=\""), std::string::npos) << label << " in " << labels;
        ++samples;
      }
      EXPECT_GT(samples, 0u) << name << " (queried by: " << query << ")";
    }
  }
  EXPECT_EQ(names.size(), 21u) << "the fixture's distinct vllm: names";
}

// kv_cache_dtype: the same kv_cache_mb buys twice the blocks in bf16 as in fp32 (and four
// times in fp8); the server answers, and /metrics reports the pool's bytes and dtype.
TEST(ServeAlone, KvCacheDtypeSetsThePoolBytesAndMetricsShowThem) {
  double fp32_blocks = 0;
  for (const std::string dtype : {"fp32", "bf16", "fp8_e4m3"}) {
    SCOPED_TRACE(dtype);
    ServerProcess server(
        serve_args(write_config("kv-" + dtype, "kv_cache_dtype: " + dtype + "\nkv_cache_mb: 1\n")));
    EXPECT_NE(server.output().find("kv_cache_dtype " + dtype), std::string::npos)
        << server.output();
    HttpResponse response = post(server.port(), "/v1/completions", kProbe);
    ASSERT_EQ(response.status, 200) << response.body;
    EXPECT_FALSE(json::parse(response.body)["choices"][0]["text"].get<std::string>().empty());
    const std::string metrics = http(server.port(), "GET", "/metrics").body;
    const double blocks = metric_value(metrics, "keel_kv_cache_blocks{model_name=\"tiny\"}");
    const double bytes =
        metric_value(metrics, "keel_kv_cache_bytes{model_name=\"tiny\",dtype=\"" + dtype + "\"}");
    EXPECT_GT(blocks, 0) << metrics.substr(0, 3000);
    // Whole blocks of 1 MiB: within one block of it.
    EXPECT_LE(bytes, 1024.0 * 1024.0);
    EXPECT_GT(bytes, 1024.0 * 1024.0 - bytes / blocks);
    EXPECT_NE(metrics.find("keel_kv_cache_info{model_name=\"tiny\",dtype=\"" + dtype +
                           "\",block_size=\"16\"} 1"),
              std::string::npos);
    if (dtype == "fp32") fp32_blocks = blocks;
    if (dtype == "bf16") {
      EXPECT_EQ(blocks, 2 * fp32_blocks);
    }
    if (dtype == "fp8_e4m3") {
      EXPECT_EQ(blocks, 4 * fp32_blocks);
    }
    server.terminate();
    EXPECT_EQ(server.wait(), 0) << server.output();
  }
  // An unknown value is refused at start-up, naming the file, key and value.
  int exit_code = -1;
  const std::string output = run_command(
      kKeel + " serve --config " + write_config("kv-bad", "kv_cache_dtype: int4\n"), &exit_code);
  EXPECT_EQ(exit_code, 1) << output;
  EXPECT_NE(output.find("kv_cache_dtype 'int4'"), std::string::npos) << output;
}

TEST(ServeAlone, OverloadAnswers429AndKeepsEveryAcceptedRequest) {
  ServerProcess server(serve_args(write_config("overload", "max_num_seqs: 1\nmax_waiting: 2\n")));
  std::vector<std::thread> clients;
  std::vector<HttpResponse> responses(8);
  for (size_t index = 0; index < responses.size(); ++index)
    clients.emplace_back([&, index] {
      responses[index] = post(server.port(), "/v1/completions",
                              json{{"prompt", "queue " + std::to_string(index)},
                                   {"max_tokens", 200},
                                   {"ignore_eos", true}}
                                  .dump());
    });
  for (std::thread& client : clients) client.join();
  int accepted = 0, refused = 0;
  for (const HttpResponse& response : responses) {
    if (response.status == 200) {
      ++accepted;
      EXPECT_EQ(json::parse(response.body)["usage"]["completion_tokens"], 200);
    } else {
      ASSERT_EQ(response.status, 429) << response.body;
      EXPECT_EQ(response.headers.count("retry-after"), 1u);
      EXPECT_EQ(json::parse(response.body)["error"]["type"], "rate_limit_error");
      ++refused;
    }
  }
  EXPECT_GE(accepted, 2);  // the first two always fit (one running or queued, one waiting)
  EXPECT_GE(refused, 1);
  EXPECT_EQ(accepted + refused, 8);
}

TEST(ServeAlone, SigtermDrainsInFlightStreamsAndExitsZero) {
  ServerProcess server(serve_args(write_config("drain", "")));
  int fd = connect_to(server.port());
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(send_all(fd, request_text("POST", "/v1/completions",
                                        json{{"prompt", "keep going"},
                                             {"max_tokens", 200},
                                             {"stream", true},
                                             {"ignore_eos", true}}
                                            .dump())));
  std::string raw;
  char buffer[8192];
  while (raw.find("data: ") == std::string::npos) {
    ssize_t bytes = recv(fd, buffer, sizeof(buffer), 0);
    ASSERT_GT(bytes, 0);
    raw.append(buffer, static_cast<size_t>(bytes));
  }
  server.terminate();
  ssize_t bytes;
  while ((bytes = recv(fd, buffer, sizeof(buffer), 0)) > 0)
    raw.append(buffer, static_cast<size_t>(bytes));
  close(fd);
  EXPECT_EQ(server.wait(), 0) << server.output();
  HttpResponse response = parse_response(raw);
  bool done = false;
  std::vector<std::string> events = sse_events(response.body, &done);
  EXPECT_TRUE(done);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(json::parse(events.back())["choices"][0]["finish_reason"], "length") << events.back();
  int tokens = 0;
  for (const std::string& event : events)
    if (json::parse(event)["choices"][0]["finish_reason"].is_null()) ++tokens;
  EXPECT_EQ(tokens, 200);
  EXPECT_LT(connect_to(server.port()), 0) << "the listener is closed after the drain";
}

}  // namespace
