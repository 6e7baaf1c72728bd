// keel_loadgen tests: percentile() against hand-computed numpy "linear" values, the seeded
// load plan, the ABBA run order bench_serve interleaves its two servers with, and whole loads
// over real sockets against keel's HttpServer wired to a fake backend whose token count and
// timing are known (first-token delay, fixed gap between tokens, injected errors, a backend
// that never answers). Also the child-process helper that bench_serve uses to run
// `keel serve`, with a shell script standing in for keel.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/server/api.h"
#include "runtime/server/http_server.h"
#include "runtime/tools/loadgen/loadgen.h"

namespace {

using namespace keel::loadgen;
using namespace keel::server;
using namespace std::chrono_literals;

// Emits min(max_tokens, eos_after) tokens: the first after first_delay_ms, the others
// gap_ms apart. Every fail_every-th submission (1-based) fails with an error instead; with
// hang set, requests never finish (until the client goes away). One thread per request, as
// an engine would call the sink from its own threads.
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
    int ordinal = ++submitted;
    std::lock_guard lock(mutex_);
    workers_.emplace_back([this, ordinal, request = std::move(request), sink = std::move(sink)] {
      run(ordinal, request, *sink);
    });
    return true;
  }

  std::atomic<int> submitted{0};
  std::atomic<int> first_delay_ms{0};
  std::atomic<int> gap_ms{0};
  std::atomic<int> eos_after{1 << 30};
  std::atomic<int> fail_every{0};
  std::atomic<bool> hang{false};

 private:
  void run(int ordinal, const CompletionRequest& request, TokenSink& sink) {
    if (fail_every > 0 && ordinal % fail_every == 0) {
      sink.on_error("expert rank crashed");
      return;
    }
    if (hang) {
      while (!sink.cancelled()) std::this_thread::sleep_for(5ms);
      return;
    }
    int prompt = request.prompt_tokens ? static_cast<int>(request.prompt_tokens->size()) : 0;
    int produced = 0;
    while (produced < request.max_tokens && produced < eos_after) {
      if (sink.cancelled()) return;
      std::this_thread::sleep_for(
          std::chrono::milliseconds(produced == 0 ? first_delay_ms.load() : gap_ms.load()));
      const std::string text = " t" + std::to_string(produced);
      sink.on_token({.text_delta = text,
                     .token_id = 100 + produced,
                     .token_text = text,
                     .token_bytes = text,
                     .logprob = -0.5f,
                     .top_logprobs = {}});
      ++produced;
    }
    sink.on_finish(produced == request.max_tokens ? "length" : "stop", Usage{prompt, produced});
  }

  std::mutex mutex_;
  std::vector<std::thread> workers_;
};

class LoadgenServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HttpServerConfig config;
    config.port = 0;
    server = std::make_unique<HttpServer>(config, backend);
    server->start();
    spec.url = "http://127.0.0.1:" + std::to_string(server->port());
    spec.input_len_min = spec.input_len_max = 16;
    spec.output_len_min = spec.output_len_max = 8;
    spec.seed = 42;
  }
  void TearDown() override {
    server->drain(2000ms);
    server.reset();
  }

  TimedBackend backend;  // declared first: outlives the server
  std::unique_ptr<HttpServer> server;
  LoadSpec spec;
};

// Hand-computed with numpy's default method "linear": sort, position p = q/100 * (n - 1),
// value a[floor p] + (p - floor p) * (a[floor p + 1] - a[floor p]).
TEST(LoadgenPercentile, MatchesNumpyLinear) {
  std::vector<double> four = {4, 1, 3, 2};  // sorted: 1 2 3 4, n - 1 = 3
  EXPECT_DOUBLE_EQ(percentile(four, 0), 1.0);
  EXPECT_DOUBLE_EQ(percentile(four, 100), 4.0);
  // q=50: p = 0.5 * 3 = 1.5 -> a[1] + 0.5 * (a[2] - a[1]) = 2 + 0.5 * 1 = 2.5
  EXPECT_DOUBLE_EQ(percentile(four, 50), 2.5);
  // q=90: p = 0.9 * 3 = 2.7 -> a[2] + 0.7 * (a[3] - a[2]) = 3 + 0.7 = 3.7
  EXPECT_NEAR(percentile(four, 90), 3.7, 1e-12);
  // q=99: p = 0.99 * 3 = 2.97 -> 3 + 0.97 * 1 = 3.97
  EXPECT_NEAR(percentile(four, 99), 3.97, 1e-12);
  // q=25: p = 0.75 -> a[0] + 0.75 * (2 - 1) = 1.75
  EXPECT_DOUBLE_EQ(percentile(four, 25), 1.75);

  std::vector<double> five = {50, 15, 40, 20, 35};  // sorted: 15 20 35 40 50, n - 1 = 4
  // q=40: p = 1.6 -> a[1] + 0.6 * (a[2] - a[1]) = 20 + 0.6 * 15 = 29
  EXPECT_NEAR(percentile(five, 40), 29.0, 1e-12);
  // q=50: p = 2 exactly -> a[2] = 35 (no interpolation at an exact rank)
  EXPECT_DOUBLE_EQ(percentile(five, 50), 35.0);
  // q=90: p = 3.6 -> 40 + 0.6 * (50 - 40) = 46
  EXPECT_NEAR(percentile(five, 90), 46.0, 1e-12);
  // q=99: p = 3.96 -> 40 + 0.96 * 10 = 49.6
  EXPECT_NEAR(percentile(five, 99), 49.6, 1e-12);

  EXPECT_DOUBLE_EQ(percentile({7.5}, 99), 7.5);  // one sample: every percentile is it
  EXPECT_DOUBLE_EQ(percentile({}, 50), 0.0);     // no samples: reported as 0, like vLLM
}

TEST(LoadgenSummary, TpotExcludesFirstTokenAndItlPoolsGaps) {
  RequestRecord a;
  a.success = true;
  a.ttft_s = 0.100;
  a.e2el_s = 0.400;
  a.completion_tokens = 4;                         // TPOT = (0.4 - 0.1) / 3 = 100 ms
  a.chunk_times_s = {0.100, 0.150, 0.300, 0.400};  // ITL 50, 150, 100 ms
  a.prompt_tokens = 10;
  RequestRecord b;
  b.success = true;
  b.ttft_s = b.e2el_s = 0.050;
  b.completion_tokens = 1;  // one token: no TPOT sample
  b.chunk_times_s = {0.050};
  b.prompt_tokens = 10;
  RequestRecord c;
  c.error = "boom";
  Summary summary = summarize({a, b, c}, 2.0);
  EXPECT_EQ(summary.completed, 2);
  EXPECT_EQ(summary.failed, 1);
  EXPECT_EQ(summary.errors, std::vector<std::string>{"boom"});
  EXPECT_EQ(summary.total_output_tokens, 5);
  EXPECT_DOUBLE_EQ(summary.output_throughput, 2.5);
  EXPECT_DOUBLE_EQ(summary.total_token_throughput, 12.5);
  EXPECT_DOUBLE_EQ(summary.request_throughput, 1.0);
  EXPECT_NEAR(summary.tpot_ms.mean, 100.0, 1e-9);
  EXPECT_NEAR(summary.itl_ms.mean, 100.0, 1e-9);
  EXPECT_NEAR(summary.itl_ms.median, 100.0, 1e-9);  // sorted 50 100 150
  EXPECT_NEAR(summary.ttft_ms.mean, 75.0, 1e-9);
  nlohmann::json out = summary_json(summary);
  for (const char* key :
       {"completed", "failed", "duration", "request_throughput", "output_throughput",
        "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p99_itl_ms", "median_e2el_ms"})
    EXPECT_TRUE(out.contains(key)) << key;
}

TEST(LoadgenPlan, SeededLengthsIdsAndPoissonGaps) {
  LoadSpec spec;
  spec.num_prompts = 4000;
  spec.input_len_min = 3;
  spec.input_len_max = 9;
  spec.output_len_min = 5;
  spec.output_len_max = 5;
  spec.vocab_hint = 50;
  spec.request_rate = 20.0;
  spec.seed = 7;
  std::vector<PlannedRequest> plan = plan_requests(spec);
  ASSERT_EQ(plan.size(), 4000u);
  std::vector<PlannedRequest> again = plan_requests(spec);
  double previous = 0;
  bool saw_min = false, saw_max = false;
  for (size_t i = 0; i < plan.size(); ++i) {
    EXPECT_EQ(plan[i].prompt, again[i].prompt);
    EXPECT_EQ(plan[i].arrival_s, again[i].arrival_s);
    EXPECT_GE(plan[i].prompt.size(), 3u);
    EXPECT_LE(plan[i].prompt.size(), 9u);
    saw_min |= plan[i].prompt.size() == 3u;
    saw_max |= plan[i].prompt.size() == 9u;
    EXPECT_EQ(plan[i].max_tokens, 5);
    for (int32_t id : plan[i].prompt) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 50);
    }
    if (i == 0) {
      EXPECT_EQ(plan[i].arrival_s, 0.0);  // the first request goes at once, as in vLLM
    } else {
      EXPECT_GT(plan[i].arrival_s, previous);
    }
    previous = plan[i].arrival_s;
  }
  EXPECT_TRUE(saw_min && saw_max);  // the bounds are inclusive
  // Exponential gaps with mean 1/20 s: over 3999 gaps the mean's standard error is
  // (1/20)/sqrt(3999) = 1.6% of it, so 5% is > 3 standard errors.
  EXPECT_NEAR(previous / 3999.0, 0.05, 0.05 * 0.05);
  spec.seed = 8;
  EXPECT_NE(plan_requests(spec)[0].prompt, plan[0].prompt);
}

// TTFT and ITL tolerance: sleep_for never returns early, so a token cannot arrive before its
// sleep ends: TTFT >= first delay, and the sum of a request's gaps >= (tokens - 1) * gap. A
// single gap can look shorter than the sleep when the previous token's bytes were delayed
// (scheduling on 2 shared cores), and longer by the server's post-write-read path plus
// scheduler wake-up latency (well under a millisecond idle, several ms while other builds run).
// The median over 8 * 7 = 56 gaps discards such outliers; the band [0.75 gap, gap + 15 ms]
// leaves room for a busy machine while still failing if chunks were timestamped at the end of
// the response (ITL ~0) or coalesced (ITL a multiple of the gap).
TEST_F(LoadgenServerTest, ClosedLoopStreamingCountsAndTiming) {
  backend.first_delay_ms = 40;
  backend.gap_ms = 20;
  spec.concurrency = 4;
  spec.num_prompts = 8;
  LoadResult result = run_load(spec);
  const Summary& summary = result.summary;
  EXPECT_EQ(summary.completed, 8);
  EXPECT_EQ(summary.failed, 0) << (summary.errors.empty() ? "" : summary.errors[0]);
  EXPECT_EQ(backend.submitted.load(), 8);
  EXPECT_EQ(summary.total_output_tokens, 64);
  EXPECT_EQ(summary.total_input_tokens, 8 * 16);
  for (const RequestRecord& record : result.records) {
    EXPECT_TRUE(record.success) << record.error;
    EXPECT_TRUE(record.usage_reported);
    EXPECT_EQ(record.completion_tokens, 8);
    EXPECT_EQ(record.prompt_tokens, 16);
    EXPECT_EQ(record.chunk_times_s.size(), 8u);
    EXPECT_GE(record.ttft_s, 0.040);
    EXPECT_GE(record.e2el_s, 0.040 + 7 * 0.020);
    EXPECT_DOUBLE_EQ(record.ttft_s, record.chunk_times_s.front());
  }
  std::string figures = summary_table(summary, "closed loop");  // shown when a check fails
  EXPECT_GE(summary.ttft_ms.median, 40.0) << figures;
  EXPECT_GE(summary.itl_ms.median, 0.75 * 20.0) << figures;
  EXPECT_LE(summary.itl_ms.median, 20.0 + 15.0) << figures;
  // TPOT averages a request's 7 gaps after its first token; the same band as ITL (a late first
  // chunk shortens it), on the median so that one stalled request cannot fail the check.
  EXPECT_GE(summary.tpot_ms.median, 0.75 * 20.0) << figures;
  EXPECT_LE(summary.tpot_ms.median, 20.0 + 15.0) << figures;
  // Closed loop with 4 workers and 8 equal requests: two waves, so the run takes at least two
  // requests' worth of time and no more than four (slack for a busy machine).
  double one_request = 0.040 + 7 * 0.020;
  EXPECT_GE(summary.duration_s, 2 * one_request);
  EXPECT_LE(summary.duration_s, 4 * one_request + 0.5);
}

TEST_F(LoadgenServerTest, ShortOutputIsCountedFromWhatCameBack) {
  backend.eos_after = 3;  // the "model" stops early although max_tokens is 8
  spec.concurrency = 2;
  spec.num_prompts = 4;
  LoadResult result = run_load(spec);
  EXPECT_EQ(result.summary.completed, 4);
  for (const RequestRecord& record : result.records) {
    EXPECT_EQ(record.completion_tokens, 3);
    EXPECT_EQ(record.chunk_times_s.size(), 3u);
  }
}

// Chat streams open with a role-only chunk and close with a finish_reason chunk; neither is a
// token. Also: keel accepts (and ignores) vLLM's ignore_eos.
TEST_F(LoadgenServerTest, ChatStreamCountsOnlyTokenChunks) {
  spec.endpoint = "/v1/chat/completions";
  spec.ignore_eos = true;
  spec.concurrency = 2;
  spec.num_prompts = 4;
  LoadResult result = run_load(spec);
  EXPECT_EQ(result.summary.completed, 4)
      << (result.summary.errors.empty() ? "" : result.summary.errors[0]);
  for (const RequestRecord& record : result.records) {
    EXPECT_EQ(record.completion_tokens, 8);
    EXPECT_EQ(record.chunk_times_s.size(), 8u);
  }
}

TEST_F(LoadgenServerTest, NonStreamingUsesUsageAndTtftIsE2e) {
  backend.first_delay_ms = 10;
  backend.gap_ms = 5;
  spec.stream = false;
  spec.concurrency = 2;
  spec.num_prompts = 4;
  LoadResult result = run_load(spec);
  EXPECT_EQ(result.summary.completed, 4) << result.records[0].error;
  EXPECT_EQ(result.summary.total_output_tokens, 32);
  for (const RequestRecord& record : result.records) {
    EXPECT_EQ(record.completion_tokens, 8);
    EXPECT_DOUBLE_EQ(record.ttft_s, record.e2el_s);
    EXPECT_GE(record.e2el_s, 0.010 + 7 * 0.005);
  }
  EXPECT_EQ(result.summary.itl_ms.mean, 0.0);  // no chunks, no ITL samples
}

TEST_F(LoadgenServerTest, BackendErrorsAreCountedAsFailures) {
  backend.fail_every = 2;  // submissions 2, 4, 6, 8 fail
  for (bool stream : {true, false}) {
    backend.submitted = 0;
    spec.stream = stream;
    spec.concurrency = 3;
    spec.num_prompts = 8;
    LoadResult result = run_load(spec);
    EXPECT_EQ(result.summary.completed, 4) << "stream " << stream;
    EXPECT_EQ(result.summary.failed, 4) << "stream " << stream;
    EXPECT_EQ(result.summary.total_output_tokens, 4 * 8);
    ASSERT_EQ(result.summary.errors.size(), 1u);  // one distinct text
    // Streaming: an error event inside a 200 stream; non-streaming: an HTTP 500 error body.
    EXPECT_NE(result.summary.errors[0].find("expert rank crashed"), std::string::npos)
        << result.summary.errors[0];
    if (!stream) {
      EXPECT_EQ(result.summary.errors[0].rfind("HTTP 500", 0), 0u);
    }
  }
}

TEST_F(LoadgenServerTest, RequestTimeoutFailsAHungRequest) {
  backend.hang = true;
  spec.concurrency = 2;
  spec.num_prompts = 2;
  spec.request_timeout_s = 0.3;
  auto start = std::chrono::steady_clock::now();
  LoadResult result = run_load(spec);
  EXPECT_EQ(result.summary.failed, 2);
  EXPECT_EQ(result.summary.completed, 0);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  for (const RequestRecord& record : result.records) EXPECT_GE(record.e2el_s, 0.3);
}

TEST_F(LoadgenServerTest, OpenLoopPoissonSendsExactlyNOnSchedule) {
  backend.gap_ms = 1;
  spec.request_rate = 40.0;
  spec.num_prompts = 24;
  spec.output_len_min = spec.output_len_max = 2;
  std::vector<PlannedRequest> plan = plan_requests(spec);
  LoadResult result = run_load(spec);
  EXPECT_EQ(backend.submitted.load(), 24);
  EXPECT_EQ(result.summary.completed, 24);
  EXPECT_EQ(result.summary.total_output_tokens, 48);
  // Sent at its arrival time (sleep_until never wakes early), and not much later: the workers
  // outnumber the requests in flight, so nothing queues behind a slow request. Lateness is
  // then only thread wake-up latency: the median must be small, a single late wake-up on a
  // loaded machine may not exceed half a second.
  std::vector<double> lateness;
  for (size_t i = 0; i < plan.size(); ++i) {
    EXPECT_GE(result.records[i].start_s, plan[i].arrival_s) << i;
    lateness.push_back(result.records[i].start_s - plan[i].arrival_s);
  }
  EXPECT_LE(percentile(lateness, 50), 0.020);
  EXPECT_LE(percentile(lateness, 100), 0.5);
  EXPECT_GE(result.summary.duration_s, plan.back().arrival_s);
}

TEST(LoadgenAbba, AlternatesWhichArmGoesFirst) {
  EXPECT_TRUE(abba_schedule(0).empty());
  std::vector<ScheduledRun> expected = {{0, 0, 0}, {0, 1, 1}, {1, 1, 0},
                                        {1, 0, 1}, {2, 0, 0}, {2, 1, 1}};
  EXPECT_EQ(abba_schedule(3), expected);
  // Over an even number of rounds each arm is first equally often, and the mean execution
  // slot of both arms is the same, so a linear drift cancels exactly.
  std::vector<ScheduledRun> four = abba_schedule(4);
  ASSERT_EQ(four.size(), 8u);
  double slot_sum[2] = {0, 0};
  int firsts[2] = {0, 0};
  for (size_t slot = 0; slot < four.size(); ++slot) {
    EXPECT_EQ(four[slot].round, static_cast<int>(slot / 2));
    EXPECT_EQ(four[slot].position, static_cast<int>(slot % 2));
    slot_sum[four[slot].arm] += slot;
    if (four[slot].position == 0) ++firsts[four[slot].arm];
  }
  EXPECT_EQ(slot_sum[0], slot_sum[1]);
  EXPECT_EQ(firsts[0], 2);
  EXPECT_EQ(firsts[1], 2);
}

TEST(LoadgenServerProcess, ParsesListeningLine) {
  EXPECT_EQ(parse_listening_url("keel: listening on http://127.0.0.1:43211"),
            "http://127.0.0.1:43211");
  EXPECT_EQ(parse_listening_url("[info] listening on http://127.0.0.1:8000/ (2 threads)"),
            "http://127.0.0.1:8000");
  EXPECT_EQ(parse_listening_url("listening on http://0.0.0.0:9."), "http://0.0.0.0:9");
  EXPECT_EQ(parse_listening_url("loading weights"), "");
  EXPECT_EQ(parse_listening_url("listening on http://localhost"), "");  // no port
}

TEST(LoadgenServerProcess, ReadsUrlThenStopsWithSigterm) {
  // A stand-in for `keel serve`: chatter, the announcement, more output, then exit 0 on TERM.
  ServerProcess child({"/bin/sh", "-c",
                       "trap 'exit 0' TERM; echo loading; echo 'listening on "
                       "http://127.0.0.1:4321'; i=0; while :; do i=$((i+1)); echo tick $i; "
                       "sleep 0.02; done"});
  EXPECT_EQ(child.start(5000ms), "http://127.0.0.1:4321");
  std::this_thread::sleep_for(100ms);  // output after the announcement is drained meanwhile
  EXPECT_EQ(child.stop(5000ms), 0);

  ServerProcess early({"/bin/sh", "-c", "echo no port here; exit 3"});
  EXPECT_THROW(early.start(5000ms), std::runtime_error);
  ServerProcess silent({"/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.02; done"});
  EXPECT_THROW(silent.start(300ms), std::runtime_error);
}

}  // namespace
