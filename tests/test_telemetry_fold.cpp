// The telemetry fold under concurrency, as `keel serve` runs it: the leader rank folds every step
// and finished request into ServingTelemetry while HTTP threads submit requests, render /metrics
// and answer the telemetry and profile routes. Built for ThreadSanitizer by scripts/sanitize
// tsan (label tsan), where any unsynchronised access between those threads is a finding; in the
// default build it checks that what the readers and the final state report adds up.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/serving/serving_engine.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int kSubmitters = 4;
constexpr int kRequestsPerSubmitter = 6;
constexpr int kRequests = kSubmitters * kRequestsPerSubmitter;
constexpr int kMaxTokens = 5;

// Counts what the backend delivers (from the leader thread) for the main thread to check.
class CountingSink final : public keel::server::TokenSink {
 public:
  void on_token(const keel::server::GeneratedToken&) override { ++tokens; }
  void on_finish(const std::string&, keel::server::Usage usage) override {
    completion_tokens = usage.completion_tokens;
    finished = true;
  }
  void on_error(const std::string& message) override { ADD_FAILURE() << message; }
  bool cancelled() const override { return false; }

  std::atomic<int> tokens{0};
  std::atomic<int> completion_tokens{-1};
  std::atomic<bool> finished{false};
};

struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-telemetry-fold/pid-" + std::to_string(::getpid());
  ScratchDir() { fs::create_directories(path); }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

TEST(TelemetryFold, ReadersAndSubmittersOnOtherThreadsSeeConsistentCounts) {
  const ScratchDir scratch;
  const std::string model_dir = scratch.path + "/tiny-chat";
  keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), {},
                       model_dir);
  keel::EngineOptions options;
  options.tp_size = 2;
  keel::Engine engine(model_dir, options);
  keel::ServingConfig config;
  config.model_name = "tiny";
  config.scheduler.num_kv_blocks = 64;
  config.scheduler.block_size = 16;
  config.trace_dir = scratch.path;
  config.metrics_cache_s = 0;  // the final scrape below must see the last requests
  keel::ServingEngine serving(engine, model_dir, config);

  std::atomic<bool> done{false};
  std::vector<std::shared_ptr<CountingSink>> sinks(kRequests);
  std::vector<std::thread> threads;
  for (int submitter = 0; submitter < kSubmitters; ++submitter)
    threads.emplace_back([&, submitter] {
      for (int i = 0; i < kRequestsPerSubmitter; ++i) {
        const int index = submitter * kRequestsPerSubmitter + i;
        keel::server::CompletionRequest request;
        request.prompt_tokens = std::vector<int32_t>(static_cast<size_t>(3 + index % 7), 5 + i);
        request.max_tokens = kMaxTokens;
        request.temperature = 0;
        request.ignore_eos = true;
        request.request_id = "r" + std::to_string(index);
        EXPECT_FALSE(serving.prepare(request).has_value());
        sinks[static_cast<size_t>(index)] = std::make_shared<CountingSink>();
        EXPECT_TRUE(serving.try_submit(std::move(request), sinks[static_cast<size_t>(index)]));
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  // Two scrapers, as HTTP threads serve them: every route that reads the folded state.
  std::atomic<int> scrapes{0};
  std::atomic<int> profiles{0};
  for (int reader = 0; reader < 2; ++reader)
    threads.emplace_back([&, reader] {
      while (!done) {
        EXPECT_NE(serving.prometheus().find("keel_step_seconds"), std::string::npos);
        for (const char* path : {"/v1/telemetry/experts", "/v1/telemetry/requests",
                                 "/v1/telemetry/steps", "/v1/telemetry/placement"}) {
          const auto response = serving.handle_route("GET", path, "", "");
          ASSERT_TRUE(response.has_value()) << path;
          EXPECT_EQ(response->status, 200) << path << ": " << response->body;
        }
        (void)serving.stats();
        (void)serving.health();
        if (reader == 0) {
          // A profile started and stopped while steps append spans to it.
          EXPECT_EQ(serving.handle_route("POST", "/v1/profile/start", "", "")->status, 200);
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
          // A name under trace_dir (absolute paths are refused: writes stay inside it).
          const std::string trace = "trace-" + std::to_string(profiles++) + ".json";
          const auto stopped =
              serving.handle_route("POST", "/v1/profile/stop", "", json{{"path", trace}}.dump());
          EXPECT_EQ(stopped->status, 200) << stopped->body;
        }
        ++scrapes;
      }
    });
  std::thread stopper([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
    while (serving.stats().requests_finished < kRequests &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    serving.request_stop();
  });
  keel::ServeOptions serve_options;
  serve_options.block_size = config.scheduler.block_size;
  serve_options.num_kv_blocks = config.scheduler.num_kv_blocks;
  engine.serve(&serving, serve_options);
  stopper.join();
  done = true;
  for (std::thread& thread : threads) thread.join();

  const keel::ServingStats stats = serving.stats();
  EXPECT_EQ(stats.requests_finished, kRequests);
  EXPECT_EQ(stats.requests_aborted, 0);
  EXPECT_EQ(stats.generated_tokens, int64_t{kRequests} * kMaxTokens);
  EXPECT_GT(scrapes.load(), 0);
  for (const auto& sink : sinks) {
    ASSERT_NE(sink, nullptr);
    EXPECT_TRUE(sink->finished);
    EXPECT_EQ(sink->tokens, kMaxTokens);
    EXPECT_EQ(sink->completion_tokens, kMaxTokens);
  }
  // The folded records: one per request, each with its own id and its tokens.
  const json requests = serving.telemetry().requests_json(1000);
  std::set<std::string> ids;
  int64_t completion_tokens = 0;
  for (const json& request : requests["requests"]) {
    ids.insert(request["id"].get<std::string>());
    completion_tokens += request["completion_tokens"].get<int64_t>();
  }
  EXPECT_EQ(ids.size(), static_cast<size_t>(kRequests));
  EXPECT_EQ(completion_tokens, int64_t{kRequests} * kMaxTokens);
  // Every step the engine ran is in the ring (far below its bound here).
  EXPECT_EQ(static_cast<int64_t>(serving.telemetry().steps_json(0, 1 << 30)["steps"].size()),
            stats.steps);
  // /metrics counts the same requests.
  const std::string metrics = serving.prometheus();
  const std::regex e2e_count(R"(keel_e2e_request_latency_seconds_count\{[^}]*\} (\d+))");
  std::smatch match;
  ASSERT_TRUE(std::regex_search(metrics, match, e2e_count)) << metrics.substr(0, 2000);
  EXPECT_EQ(match[1].str(), std::to_string(kRequests));
}

}  // namespace
