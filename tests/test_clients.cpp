// keel_clients tests (runtime/cli/client_cmds.*) and the loadgen features they use:
//  - `keel profile tail`: the attribution arithmetic on a hand-built two-slow-request scenario
//    (worked out in the comment above the test), served by a fake telemetry server so the
//    command's fetches (paths, window bounds) are exercised too.
//  - `keel experts`: table rows (hottest by tokens with shares, slowest by p99) from a canned
//    document with a non-MoE layer.
//  - `keel bench serve`: the saved JSON's vLLM keys and values against keel's HttpServer with a
//    fake backend of known token count and timing (exact counts, bounded latencies, metrics
//    recomputed from the per-request arrays), goodput with a met and an unmet SLO.
//  - loadgen: gamma arrivals (mean 1/rate, variance 1/(rate^2 b); b = 1 is the exponential
//    draw it always was), JSONL datasets, --goodput parsing, length ranges.
//  - plotting: a clear error naming python3-matplotlib when it is missing; a PNG when present.
// The fake telemetry server is a POSIX-socket loop (one request per connection, canned bodies
// by exact path) because keel's HttpServer only serves the OpenAI endpoints.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/cli/client_cmds.h"
#include "runtime/server/api.h"
#include "runtime/server/http_server.h"
#include "runtime/tools/loadgen/loadgen.h"

namespace {

using json = nlohmann::json;
using namespace keel;
using namespace keel::clients;
using namespace std::chrono_literals;

// Serves canned JSON bodies by exact request target; anything else is a 404. Records targets.
class FakeTelemetryServer {
 public:
  explicit FakeTelemetryServer(std::map<std::string, std::string> bodies)
      : bodies_(std::move(bodies)) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd_, 8) != 0)
      throw std::runtime_error("fake server: bind/listen failed");
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeTelemetryServer() {
    stopping_ = true;
    ::shutdown(fd_, SHUT_RDWR);  // wakes accept()
    ::close(fd_);
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::vector<std::string> targets() {
    std::lock_guard lock(mutex_);
    return targets_;
  }

 private:
  void serve() {
    while (!stopping_) {
      int client = ::accept(fd_, nullptr, nullptr);
      if (client < 0) return;
      std::string request;
      char buffer[4096];
      while (request.find("\r\n\r\n") == std::string::npos) {
        ssize_t n = ::read(client, buffer, sizeof buffer);
        if (n <= 0) break;
        request.append(buffer, static_cast<size_t>(n));
      }
      std::istringstream line(request);
      std::string method, target;
      line >> method >> target;
      {
        std::lock_guard lock(mutex_);
        targets_.push_back(target);
      }
      auto it = bodies_.find(target);
      std::string body = it == bodies_.end() ? R"({"error": "not found"})" : it->second;
      std::string response =
          std::string("HTTP/1.1 ") + (it == bodies_.end() ? "404 Not Found" : "200 OK") +
          "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
          "\r\nConnection: close\r\n\r\n" + body;
      for (size_t sent = 0; sent < response.size();) {
        ssize_t n = ::write(client, response.data() + sent, response.size() - sent);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
      ::close(client);
    }
  }

  std::map<std::string, std::string> bodies_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::vector<std::string> targets_;
  std::thread thread_;
};

// Runs a command with stdout captured.
int run_captured(int (*command)(int, char**), std::vector<std::string> words, std::string& out) {
  std::vector<char*> argv;
  for (std::string& word : words) argv.push_back(word.data());
  argv.push_back(nullptr);
  std::ostringstream captured;
  std::streambuf* saved = std::cout.rdbuf(captured.rdbuf());
  int rc = command(static_cast<int>(words.size()), argv.data());
  std::cout.rdbuf(saved);
  out = captured.str();
  return rc;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          (name + "-" + std::to_string(::getpid()) + "-" +
           std::to_string(std::chrono::steady_clock::now().time_since_epoch().count())))
      .string();
}

// ---- profile tail ----

json usual_phases() {
  return {{"attention", {0.03, 0.03}}, {"router", {0.0, 0.0}},  {"pack", {0.0, 0.0}},
          {"experts", {0.02, 0.02}},   {"combine", {0.0, 0.0}}, {"allreduce", {0.01, 0.01}},
          {"other", {0.0, 0.0}}};
}

json step(int id, double start, double seconds, std::vector<std::string> ids,
          json phases = usual_phases(), json hot = json::array()) {
  return {{"id", id},
          {"start_s", start},
          {"seconds", seconds},
          {"num_seqs", static_cast<int>(ids.size())},
          {"num_tokens", 4},
          {"num_prefill_tokens", 0},
          {"kv_blocks_used", 3},
          {"preemptions", 0},
          {"phases", phases},
          {"sampling_s", 0.005},
          {"schedule_s", 0.005},
          {"seq_ids", json::array()},
          {"request_ids", ids},
          {"hot_experts", hot}};
}

json request(const std::string& id, double arrival, double queue, double ttft, double e2e,
             int preemptions, int first, int last) {
  return {{"id", id},
          {"arrival_s", arrival},
          {"queue_s", queue},
          {"ttft_s", ttft},
          {"e2e_s", e2e},
          {"prompt_tokens", 8},
          {"completion_tokens", 4},
          {"preemptions", preemptions},
          {"first_step", first},
          {"last_step", last},
          {"finish_reason", "length"}};
}

// The scenario (times in seconds; every step has 2 ranks and the "usual" phases -- attention
// 0.03, experts 0.02, allreduce 0.01 on both ranks, sampling 0.005, schedule 0.005 -- except
// step 12):
//   steps   10: 0.10-0.30 (0.20)  11: 0.30-0.40 (0.10)  12: 0.40-0.80 (0.40)
//           13: 0.80-0.90 (0.10)  14: 0.90-0.95 (0.05)
//   median step = median(0.20, 0.10, 0.40, 0.10, 0.05) = 0.10
//   step 12: experts [0.25, 0.05], allreduce [0.01, 0.11], hot experts L1/E3@0 0.2 s and
//            L2/E0@0 0.05 s.
//   requests (e2e): A 1.00, B 0.20, C 0.64, D 0.25. p50 over (0.20, 0.25, 0.64, 1.00): position
//   1.5 -> 0.25 + 0.5 * 0.39 = 0.445, so A and C are slow; total 1.64 s.
//   A: arrival 0, queue 0.10, ttft 0.30, steps 10..14, not preempted.
//      queueing 0.10; prefill 0.30 - 0.10 = 0.20; decode 0.70 over steps 11-14 (step 10's
//      midpoint 0.20 is before the first token at 0.30): covered 0.65, normal pace
//      0.10 + 0.10 + 0.10 + 0.05 = 0.35, step 12 excess 0.40 - 0.10 = 0.30; between steps 0.05.
//      Step 12's components above their window medians: experts 0.25 - 0.02 = 0.23, allreduce
//      stall (0.11 - 0.01) - 0 = 0.10, fastest-rank allreduce 0.01 - 0.01 = 0; sum 0.33.
//      hot experts 0.30 * 0.23 / 0.33 = 0.209090..., stall 0.30 * 0.10 / 0.33 = 0.090909...
//      Hot experts split 0.2 : 0.05 -> L1/E3@0 0.167272..., L2/E0@0 0.041818...
//   C: arrival 0.35, queue 0.05, ttft 0.45 (first token 0.80), e2e 0.64, preempted once,
//      steps 12..14. queueing 0.05; prefill 0.40; decode 0.19: steps 13, 14 (step 12's midpoint
//      0.60 is before 0.80), normal pace 0.15, no excess; uncovered 0.04 -> preemption.
//   Causes: prefill 0.60, decode (normal pace) 0.50, hot experts 0.2091, queueing 0.15,
//   allreduce stall 0.0909, between steps 0.05, preemption 0.04 -- adding up to 1.64.
struct TailScenario {
  json requests, steps;
  TailScenario() {
    json hot_phases = usual_phases();
    hot_phases["experts"] = {0.25, 0.05};
    hot_phases["allreduce"] = {0.01, 0.11};
    json hot = json::array(
        {{{"layer", 1}, {"expert", 3}, {"rank", 0}, {"seconds", 0.2}, {"tokens", 50}},
         {{"layer", 2}, {"expert", 0}, {"rank", 0}, {"seconds", 0.05}, {"tokens", 10}}});
    steps = {
        {"steps",
         {step(10, 0.10, 0.20, {"cmpl-A", "cmpl-B", "cmpl-D"}),
          step(11, 0.30, 0.10, {"cmpl-A", "cmpl-B", "cmpl-D"}),
          step(12, 0.40, 0.40, {"cmpl-A", "cmpl-C"}, hot_phases, hot),
          step(13, 0.80, 0.10, {"cmpl-A", "cmpl-C"}), step(14, 0.90, 0.05, {"cmpl-A", "cmpl-C"})}}};
    requests = {{"requests",
                 {request("cmpl-B", 0.0, 0.0, 0.1, 0.20, 0, 10, 11),
                  request("cmpl-A", 0.0, 0.10, 0.30, 1.00, 0, 10, 14),
                  request("cmpl-D", 0.05, 0.0, 0.05, 0.25, 0, 10, 11),
                  request("cmpl-C", 0.35, 0.05, 0.45, 0.64, 1, 12, 14)}}};
  }
};

const Cause* find_cause(const TailReport& report, const std::string& name) {
  for (const Cause& cause : report.causes)
    if (cause.name == name) return &cause;
  return nullptr;
}

TEST(ProfileTail, AttributionArithmetic) {
  TailScenario scenario;
  TailReport report = analyze_tail(scenario.requests, scenario.steps, 50.0, 3);
  EXPECT_NEAR(report.threshold_s, 0.445, 1e-12);
  EXPECT_NEAR(report.median_step_s, 0.10, 1e-12);
  ASSERT_EQ(report.slow_ids, (std::vector<std::string>{"cmpl-A", "cmpl-C"}));
  EXPECT_NEAR(report.total_s, 1.64, 1e-12);

  struct Expected {
    std::string name;
    double seconds;
  };
  std::vector<Expected> expected = {{"prefill", 0.60},
                                    {"decode (normal pace)", 0.50},
                                    {"hot experts", 0.30 * 0.23 / 0.33},
                                    {"queueing", 0.15},
                                    {"allreduce stall (rank skew)", 0.30 * 0.10 / 0.33},
                                    {"between steps", 0.05},
                                    {"preemption", 0.04}};
  ASSERT_EQ(report.causes.size(), expected.size());
  double sum = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE(expected[i].name);
    EXPECT_EQ(report.causes[i].name, expected[i].name);  // ranked by seconds
    EXPECT_NEAR(report.causes[i].seconds, expected[i].seconds, 1e-9);
    EXPECT_NEAR(report.causes[i].share, expected[i].seconds / 1.64, 1e-9);
    sum += report.causes[i].seconds;
  }
  EXPECT_NEAR(sum, report.total_s, 1e-9);  // the decomposition is exact

  const Cause* prefill = find_cause(report, "prefill");
  ASSERT_EQ(prefill->examples.size(), 2u);
  EXPECT_EQ(prefill->examples[0].request_id, "cmpl-C");  // 0.40 before A's 0.20
  EXPECT_NEAR(prefill->examples[0].seconds, 0.40, 1e-12);
  EXPECT_EQ(find_cause(report, "preemption")->examples[0].request_id, "cmpl-C");
  EXPECT_EQ(find_cause(report, "hot experts")->examples[0].request_id, "cmpl-A");

  ASSERT_EQ(report.hot_experts.size(), 2u);
  EXPECT_EQ(report.hot_experts[0].layer, 1);
  EXPECT_EQ(report.hot_experts[0].expert, 3);
  EXPECT_NEAR(report.hot_experts[0].seconds, 0.30 * 0.23 / 0.33 * 0.8, 1e-9);
  EXPECT_NEAR(report.hot_experts[1].seconds, 0.30 * 0.23 / 0.33 * 0.2, 1e-9);

  // Per request: A's steps exclude its prefill step 10; C's exclude step 12.
  EXPECT_EQ(report.per_request[0]["steps"], json({11, 12, 13, 14}));
  EXPECT_EQ(report.per_request[1]["steps"], json({13, 14}));
  EXPECT_NEAR(report.per_request[1]["causes"]["preemption"].get<double>(), 0.04, 1e-12);
}

TEST(ProfileTail, NoGrowthFallsBackToComponentSizes) {
  // One slow step whose components all sit at their window medians (the medians are taken
  // over three identical usual steps): its excess is split by component size instead.
  json steps = {{"steps",
                 {step(1, 0.0, 0.1, {"r"}), step(2, 0.1, 0.1, {"r"}), step(3, 0.2, 0.1, {"r"}),
                  step(4, 0.3, 0.5, {"r"})}}};
  json requests = {{"requests", {request("r", 0.0, 0.0, 0.0, 0.8, 0, 1, 4)}}};
  TailReport report = analyze_tail(requests, steps, 99.0);
  // Excess 0.4 over sizes attention 0.03, experts 0.02, allreduce 0.01, sampling 0.005,
  // schedule 0.005 (sum 0.07).
  EXPECT_NEAR(find_cause(report, "step phase: attention")->seconds, 0.4 * 0.03 / 0.07, 1e-9);
  EXPECT_NEAR(find_cause(report, "step phase: experts")->seconds, 0.4 * 0.02 / 0.07, 1e-9);
  EXPECT_NEAR(find_cause(report, "step phase: sampling")->seconds, 0.4 * 0.005 / 0.07, 1e-9);
  EXPECT_NEAR(find_cause(report, "decode (normal pace)")->seconds, 0.4, 1e-9);
}

TEST(ProfileTail, CommandFetchesWindowAndSaves) {
  TailScenario scenario;
  FakeTelemetryServer server({{"/v1/telemetry/requests?limit=4", scenario.requests.dump()},
                              {"/v1/telemetry/steps?first=10&last=14", scenario.steps.dump()}});
  std::string save = temp_path("keel-tail") + ".json";
  std::string out;
  int rc = run_captured(profile_command,
                        {"keel", "profile", "tail", "--url", server.url() + "/", "--percentile",
                         "50", "--limit", "4", "--save", save},
                        out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(server.targets(), (std::vector<std::string>{"/v1/telemetry/requests?limit=4",
                                                        "/v1/telemetry/steps?first=10&last=14"}));
  // Ranked table: prefill first with its share (0.60 / 1.64 = 36.6%) and example ids.
  EXPECT_NE(out.find("2 of 4 requests at or above p50"), std::string::npos) << out;
  EXPECT_NE(out.find("1   prefill"), std::string::npos) << out;
  EXPECT_NE(out.find("36.6%  cmpl-C:0.400 cmpl-A:0.200"), std::string::npos) << out;
  EXPECT_NE(out.find("L1/E3@0:0.1673"), std::string::npos) << out;
  std::ifstream in(save);
  json saved = json::parse(in);
  EXPECT_EQ(saved["requests"].size(), 4u);
  EXPECT_EQ(saved["steps"].size(), 5u);
  EXPECT_EQ(saved["report"]["causes"][0]["cause"], "prefill");
  std::filesystem::remove(save);

  EXPECT_EQ(run_captured(profile_command, {"keel", "profile", "head", "--url", server.url()}, out),
            2);
}

// ---- experts ----

json experts_document() {
  // 3 layers (layer 0 dense), 4 experts, top-2, tp 2.
  auto moe_layer = [](int layer, std::vector<int> tokens, std::vector<int> per_rank, double bal,
                      double imb, int ties, std::vector<double> p99) {
    return json{
        {"layer", layer},
        {"moe", true},
        {"tokens", tokens},
        {"tokens_per_rank", per_rank},
        {"balancedness", bal},
        {"imbalance", imb},
        {"near_ties", ties},
        {"margin", {{"p50", 0.2}, {"p99", 0.9}, {"count", 100}}},
        {"expert_seconds",
         {{"total", {1.0, 1.0, 1.0, 1.0}}, {"p50", {0.001, 0.001, 0.001, 0.001}}, {"p99", p99}}}};
  };
  return {{"model", "tiny-moe"},
          {"num_layers", 3},
          {"num_experts", 4},
          {"top_k", 2},
          {"tp", 2},
          {"near_tie_epsilon", 0.01},
          {"expert_rank", {json::array(), {0, 0, 1, 1}, {0, 0, 1, 1}}},
          {"layers",
           {{{"layer", 0}, {"moe", false}},
            moe_layer(1, {10, 50, 30, 10}, {60, 40}, 50.0 / 60.0, (60.0 - 50.0) / 50.0, 7,
                      {0.002, 0.004, 0.009, 0.001}),
            moe_layer(2, {25, 25, 25, 25}, {50, 50}, 1.0, 0.0, 0, {0.003, 0.003, 0.003, 0.003})}}};
}

TEST(Experts, RowsAndTable) {
  json doc = experts_document();
  std::vector<LayerRow> rows = expert_rows(doc, 2);
  ASSERT_EQ(rows.size(), 2u);  // the dense layer 0 has no row
  EXPECT_EQ(rows[0].layer, 1);
  EXPECT_EQ(rows[0].tokens, 100);
  EXPECT_EQ(rows[0].near_ties, 7);
  ASSERT_EQ(rows[0].hottest.size(), 2u);
  EXPECT_EQ(rows[0].hottest[0].expert, 1);  // 50 of 100
  EXPECT_DOUBLE_EQ(rows[0].hottest[0].share, 0.5);
  EXPECT_EQ(rows[0].hottest[1].expert, 2);  // 30
  EXPECT_EQ(rows[0].slowest[0].expert, 2);  // p99 9 ms
  EXPECT_EQ(rows[0].slowest[1].expert, 1);  // 4 ms
  EXPECT_EQ(rows[1].hottest[0].expert, 0);  // all tied: lowest ids first
  EXPECT_EQ(rows[1].hottest[1].expert, 1);

  FakeTelemetryServer server({{"/v1/telemetry/experts", doc.dump()}});
  std::string out;
  ASSERT_EQ(
      run_captured(experts_command, {"keel", "experts", "--url", server.url(), "--top", "2"}, out),
      0);
  // layer, tokens, balancedness, imbalance, near-ties, hottest id:tokens:share, slowest id:ms.
  EXPECT_NE(out.find("1            100    0.833     0.200          7  1:50:0.50 2:30:0.30"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("2:9.000 1:4.000"), std::string::npos) << out;
  EXPECT_NE(out.find("2            100    1.000     0.000          0  0:25:0.25 1:25:0.25"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("\n0 "), std::string::npos) << out;  // no row for the dense layer

  ASSERT_EQ(
      run_captured(experts_command, {"keel", "experts", "--url", server.url(), "--json"}, out), 0);
  json parsed = json::parse(out);
  EXPECT_EQ(parsed["layers"][0]["hottest"][0]["expert"], 1);
  EXPECT_EQ(parsed["telemetry"]["model"], "tiny-moe");

  EXPECT_EQ(run_captured(experts_command, {"keel", "experts"}, out), 2);  // no --url
  FakeTelemetryServer empty({});
  EXPECT_EQ(run_captured(experts_command, {"keel", "experts", "--url", empty.url()}, out),
            1);  // 404
}

// ---- bench serve against a fake backend ----

using namespace keel::server;

// Emits max_tokens tokens, the first after first_delay_ms, the rest gap_ms apart (as
// test_loadgen's TimedBackend).
class TimedBackend : public GenerationBackend {
 public:
  ~TimedBackend() override {
    std::lock_guard lock(mutex_);
    for (std::thread& worker : workers_) worker.join();
  }
  std::string model_name() const override { return "timed-fake"; }
  int max_context() const override { return 4096; }
  BackendHealth health() const override { return {true, "ok"}; }
  bool try_submit(CompletionRequest request, std::shared_ptr<TokenSink> sink) override {
    std::lock_guard lock(mutex_);
    workers_.emplace_back([this, request = std::move(request), sink = std::move(sink)] {
      int prompt = request.prompt_tokens ? static_cast<int>(request.prompt_tokens->size()) : 3;
      for (int i = 0; i < request.max_tokens; ++i) {
        if (sink->cancelled()) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(i == 0 ? first_delay_ms : gap_ms));
        const std::string text = " t" + std::to_string(i);
        sink->on_token({.text_delta = text,
                        .token_id = 100 + i,
                        .token_text = text,
                        .token_bytes = text,
                        .logprob = -0.5f,
                        .top_logprobs = {}});
      }
      sink->on_finish("length", Usage{prompt, request.max_tokens});
    });
    return true;
  }
  int first_delay_ms = 30;
  int gap_ms = 10;

 private:
  std::mutex mutex_;
  std::vector<std::thread> workers_;
};

class BenchServeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HttpServerConfig config;
    config.port = 0;
    server = std::make_unique<HttpServer>(config, backend);
    server->start();
    url = "http://127.0.0.1:" + std::to_string(server->port());
  }
  void TearDown() override {
    server->drain(2000ms);
    server.reset();
  }
  TimedBackend backend;
  std::unique_ptr<HttpServer> server;
  std::string url;
};

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / static_cast<double>(v.size());
}

TEST_F(BenchServeTest, SavedJsonHasVllmKeysAndValues) {
  std::string save = temp_path("keel-bench") + ".json";
  std::string out;
  // 6 requests, 2 at a time, 16 prompt ids, 5 output tokens: each request takes ~30 ms to its
  // first token and ~10 ms per later token.
  int rc = run_captured(bench_serve_command,
                        {"keel",      "bench",         "serve",       "--url",
                         url,         "--concurrency", "2",           "--num-prompts",
                         "6",         "--input-len",   "16",          "--output-len",
                         "5",         "--seed",        "3",           "--goodput",
                         "ttft:5000", "e2el:10000",    "--save-json", save},
                        out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("Serving Benchmark Result"), std::string::npos);
  EXPECT_NE(out.find("Request goodput (req/s):"), std::string::npos);
  EXPECT_NE(out.find("P99.9 TTFT (ms):"), std::string::npos);
  std::ifstream in(save);
  json r = json::parse(in);
  std::filesystem::remove(save);

  for (const char* key : {"date",
                          "backend",
                          "model_id",
                          "num_prompts",
                          "request_rate",
                          "burstiness",
                          "max_concurrency",
                          "duration",
                          "completed",
                          "total_input_tokens",
                          "total_output_tokens",
                          "request_throughput",
                          "request_goodput",
                          "output_throughput",
                          "total_token_throughput",
                          "input_lens",
                          "output_lens",
                          "ttfts",
                          "itls",
                          "errors"})
    EXPECT_TRUE(r.contains(key)) << key;
  for (const char* metric : {"ttft", "tpot", "itl", "e2el"})
    for (const char* stat : {"mean", "median", "std", "p90", "p99", "p99.9"})
      EXPECT_TRUE(r.contains(std::string(stat) + "_" + metric + "_ms")) << stat << metric;

  // Exact: counts and lengths.
  EXPECT_EQ(r["completed"], 6);
  EXPECT_EQ(r["failed"], 0);
  EXPECT_EQ(r["num_prompts"], 6);
  EXPECT_EQ(r["request_rate"], "inf");
  EXPECT_EQ(r["max_concurrency"], 2);
  EXPECT_EQ(r["total_input_tokens"], 6 * 16);
  EXPECT_EQ(r["total_output_tokens"], 6 * 5);
  EXPECT_EQ(r["input_lens"], json(std::vector<int>(6, 16)));
  EXPECT_EQ(r["output_lens"], json(std::vector<int>(6, 5)));
  ASSERT_EQ(r["itls"].size(), 6u);
  for (const json& gaps : r["itls"]) EXPECT_EQ(gaps.size(), 4u);  // 5 tokens, 4 gaps
  for (const json& id : r["request_ids"]) EXPECT_EQ(id.get<std::string>().rfind("cmpl-", 0), 0u);
  double duration = r["duration"];
  EXPECT_DOUBLE_EQ(r["request_throughput"].get<double>(), 6 / duration);
  EXPECT_DOUBLE_EQ(r["request_goodput"].get<double>(), 6 / duration);  // every SLO met
  EXPECT_DOUBLE_EQ(r["output_throughput"].get<double>(), 30 / duration);

  // Bounded: the backend's sleeps are lower bounds, a loaded CI machine adds to them.
  std::vector<double> ttfts = r["ttfts"], e2els = r["e2els"], tpots = r["tpots"];
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_GE(ttfts[i], 0.030);
    EXPECT_LT(ttfts[i], 2.0);
    // After the first chunk come 4 sleeps of 10 ms, less however late the first chunk arrived
    // (allowed 10 ms, as for the gaps below).
    EXPECT_GE(e2els[i], ttfts[i] + 4 * 0.010 - 0.010);
    EXPECT_NEAR(tpots[i], (e2els[i] - ttfts[i]) / 4, 1e-12);
    // One gap can look short when the chunk before it arrived late (the backend sleeps 10 ms
    // between tokens, the client timestamps arrivals), so bound the gaps' sum: 4 gaps span at
    // least the 4 sleeps minus how late the first chunk arrived; allow it 10 ms.
    ASSERT_EQ(r["itls"][i].size(), 4u);
    double gaps = 0;
    for (const json& gap : r["itls"][i]) gaps += gap.get<double>();
    EXPECT_GE(gaps, 4 * 0.010 - 0.010);
  }
  // The summary is the per-request arrays' statistics (ms).
  EXPECT_NEAR(r["mean_ttft_ms"].get<double>(), mean(ttfts) * 1e3, 1e-9);
  EXPECT_NEAR(r["mean_e2el_ms"].get<double>(), mean(e2els) * 1e3, 1e-9);
  EXPECT_NEAR(r["p99.9_ttft_ms"].get<double>(), keel::loadgen::percentile(ttfts, 99.9) * 1e3, 1e-9);
  EXPECT_GE(r["p99.9_e2el_ms"].get<double>(), r["p99_e2el_ms"].get<double>());
  EXPECT_GE(r["median_tpot_ms"].get<double>(), (4 * 10.0 - 10.0) / 4);  // same allowance
  EXPECT_LT(r["median_tpot_ms"].get<double>(), 500.0);
}

TEST_F(BenchServeTest, GoodputCountsOnlyRequestsMeetingEverySlo) {
  std::string save = temp_path("keel-bench") + ".json";
  std::string out;
  // TTFT is at least 30 ms, so a 1 ms TTFT SLO fails every request.
  ASSERT_EQ(run_captured(bench_serve_command,
                         {"keel",   "bench",        "serve", "--url",         url, "--rate",
                          "50",     "--burstiness", "0.5",   "--concurrency", "4", "--num-prompts",
                          "4",      "--input-len",  "4:8",   "--output-len",  "2", "--goodput",
                          "ttft:1", "--save-json",  save},
                         out),
            0)
      << out;
  std::ifstream in(save);
  json r = json::parse(in);
  std::filesystem::remove(save);
  EXPECT_EQ(r["completed"], 4);
  EXPECT_EQ(r["request_goodput"], 0.0);
  EXPECT_EQ(r["burstiness"], 0.5);
  EXPECT_EQ(r["request_rate"], 50.0);
  for (const json& n : r["input_lens"]) {
    EXPECT_GE(n.get<int>(), 4);
    EXPECT_LE(n.get<int>(), 8);
  }
  // Without --goodput the key is there but null, as in vLLM.
  ASSERT_EQ(
      run_captured(bench_serve_command,
                   {"keel", "bench", "serve", "--url", url, "--concurrency", "1", "--num-prompts",
                    "1", "--input-len", "4", "--output-len", "2", "--save-json", save},
                   out),
      0);
  std::ifstream again(save);
  EXPECT_TRUE(json::parse(again)["request_goodput"].is_null());
  std::filesystem::remove(save);
}

TEST_F(BenchServeTest, DatasetPromptsAndUsageErrors) {
  std::string dataset = temp_path("keel-dataset") + ".jsonl";
  {
    std::ofstream out(dataset);
    out << R"({"prompt": "hello there world", "output_len": 3})"
        << "\n\n"
        << R"({"prompt": [1, 2, 3, 4, 5], "output_len": 2})"
        << "\n";
  }
  std::string save = temp_path("keel-bench") + ".json";
  std::string out;
  ASSERT_EQ(run_captured(bench_serve_command,
                         {"keel", "bench", "serve", "--url", url, "--concurrency", "1",
                          "--num-prompts", "3", "--dataset", dataset, "--save-json", save},
                         out),
            0)
      << out;
  std::ifstream in(save);
  json r = json::parse(in);
  // File order, wrapping: 3, 2, 3 output tokens; the token-id prompt reports its 5 ids (the
  // fake reports 3 prompt tokens for text prompts).
  EXPECT_EQ(r["output_lens"], json({3, 2, 3}));
  EXPECT_EQ(r["input_lens"], json({3, 5, 3}));
  std::filesystem::remove(save);
  std::filesystem::remove(dataset);

  EXPECT_EQ(run_captured(bench_serve_command, {"keel", "bench", "serve", "--url", url}, out), 2);
  EXPECT_EQ(run_captured(bench_serve_command,
                         {"keel", "bench", "serve", "--url", url, "--concurrency", "1",
                          "--num-prompts", "1", "--input-len", "9:3", "--output-len", "1"},
                         out),
            1);
}

TEST_F(BenchServeTest, PlotNeedsMatplotlib) {
  std::string out;
  std::vector<std::string> words = {"keel",
                                    "bench",
                                    "serve",
                                    "--url",
                                    url,
                                    "--concurrency",
                                    "1",
                                    "--num-prompts",
                                    "2",
                                    "--input-len",
                                    "4",
                                    "--output-len",
                                    "3",
                                    "--plot",
                                    temp_path("keel-cdf") + ".png"};
  // A python without matplotlib: a clear error naming the Debian package.
  ::setenv("KEEL_PYTHON", "/bin/false", 1);
  testing::internal::CaptureStderr();
  int rc = run_captured(bench_serve_command, words, out);
  std::string err = testing::internal::GetCapturedStderr();
  ::unsetenv("KEEL_PYTHON");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(err.find("python3-matplotlib"), std::string::npos) << err;

  if (std::system("python3 -c 'import matplotlib' >/dev/null 2>&1") != 0 &&
      std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "matplotlib not installed (python3-matplotlib)";
  ASSERT_EQ(run_captured(bench_serve_command, words, out), 0) << out;
  std::ifstream png(words.back(), std::ios::binary);
  char magic[4] = {};
  png.read(magic, 4);
  EXPECT_EQ(std::string(magic + 1, 3), "PNG");
  std::filesystem::remove(words.back());

  FakeTelemetryServer server({{"/v1/telemetry/experts", experts_document().dump()}});
  std::string heatmap = temp_path("keel-heat") + ".png";
  ASSERT_EQ(run_captured(experts_command,
                         {"keel", "experts", "--url", server.url(), "--png", heatmap}, out),
            0);
  EXPECT_TRUE(std::filesystem::file_size(heatmap) > 100);
  std::filesystem::remove(heatmap);
}

// ---- loadgen pieces ----

TEST(Loadgen, GammaArrivalsMeanAndVariance) {
  // Gamma(shape b, scale 1/(rate b)): mean 1/rate, variance 1/(rate^2 b).
  for (double b : {0.5, 1.0, 4.0}) {
    keel::loadgen::LoadSpec spec;
    spec.request_rate = 2.0;
    spec.burstiness = b;
    spec.num_prompts = 40001;
    spec.input_len_min = spec.input_len_max = 1;
    spec.output_len_min = spec.output_len_max = 1;
    spec.seed = 11;
    auto plan = keel::loadgen::plan_requests(spec);
    std::vector<double> gaps;
    for (size_t i = 1; i < plan.size(); ++i)
      gaps.push_back(plan[i].arrival_s - plan[i - 1].arrival_s);
    double m = mean(gaps), var = 0;
    for (double g : gaps) var += (g - m) * (g - m);
    var /= static_cast<double>(gaps.size());
    EXPECT_NEAR(m, 0.5, 0.5 * 0.03) << b;
    EXPECT_NEAR(var, 0.25 / b, 0.25 / b * 0.08) << b;
    EXPECT_EQ(plan[0].arrival_s, 0.0);
  }
  // b = 1 is the exponential inverse-CDF draw the loadgen always made: seeded plans unchanged.
  keel::loadgen::LoadSpec spec;
  spec.request_rate = 4.0;
  spec.num_prompts = 3;
  spec.input_len_min = spec.input_len_max = 2;
  spec.output_len_min = spec.output_len_max = 1;
  spec.vocab_hint = 10;
  spec.seed = 5;
  auto plan = keel::loadgen::plan_requests(spec);
  std::mt19937_64 rng(5);
  rng();  // fixed lengths draw nothing; the two prompt ids draw one each
  rng();
  double gap = -std::log(1.0 - static_cast<double>(rng() >> 11) * 0x1.0p-53) / 4.0;
  EXPECT_DOUBLE_EQ(plan[1].arrival_s, gap);
}

TEST(Loadgen, DatasetAndParsing) {
  std::string path = temp_path("keel-ds") + ".jsonl";
  {
    std::ofstream out(path);
    out << R"({"prompt": "a b", "output_len": 4})"
        << "\n"
        << R"({"prompt": [7, 8], "output_len": 1})"
        << "\n";
  }
  auto entries = keel::loadgen::load_dataset(path);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_TRUE(entries[0].text_prompt);
  EXPECT_EQ(entries[0].prompt_text, "a b");
  EXPECT_EQ(entries[0].max_tokens, 4);
  EXPECT_EQ(entries[1].prompt, (std::vector<int32_t>{7, 8}));
  {
    std::ofstream out(path);
    out << R"({"prompt": "x"})"
        << "\n";
  }
  try {
    keel::loadgen::load_dataset(path);
    ADD_FAILURE() << "no output_len accepted";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find(":1: \"output_len\""), std::string::npos)
        << error.what();
  }
  std::filesystem::remove(path);

  auto slo = keel::loadgen::parse_slo({"ttft:300", "tpot:50.5"});
  EXPECT_EQ(*slo.ttft_ms, 300);
  EXPECT_EQ(*slo.tpot_ms, 50.5);
  EXPECT_FALSE(slo.e2el_ms);
  EXPECT_THROW(keel::loadgen::parse_slo({"itl:3"}), std::runtime_error);
  EXPECT_THROW(keel::loadgen::parse_slo({"ttft"}), std::runtime_error);
  EXPECT_THROW(keel::loadgen::parse_slo({"ttft:0"}), std::runtime_error);

  keel::loadgen::RequestRecord record;
  record.success = true;
  record.ttft_s = 0.3;
  record.e2el_s = 0.5;
  record.completion_tokens = 1;  // TPOT counts as 0
  EXPECT_TRUE(keel::loadgen::meets_slo(record, keel::loadgen::parse_slo({"ttft:300", "tpot:1"})));
  EXPECT_FALSE(keel::loadgen::meets_slo(record, keel::loadgen::parse_slo({"e2el:499"})));

  EXPECT_EQ(parse_length_range("64"), std::make_pair(64, 64));
  EXPECT_EQ(parse_length_range("8:32"), std::make_pair(8, 32));
  EXPECT_THROW(parse_length_range("0"), std::runtime_error);
  EXPECT_THROW(parse_length_range("4:x"), std::runtime_error);
}

}  // namespace
