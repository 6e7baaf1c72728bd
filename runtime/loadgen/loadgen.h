// keel_loadgen: a load generator for OpenAI-compatible completion servers (keel, vLLM, ...),
// reporting the metrics of vLLM's benchmark_serving under the same JSON names.
//
// Design:
//  - Workers are plain threads, each with one synchronous Boost.Beast keep-alive connection
//    (reconnected when the server closes it). A worker takes the next request index from a
//    shared counter, waits until that request's arrival time and sends it. Closed loop: C
//    workers and every arrival time is 0, so each worker sends its next request as soon as the
//    previous one ends. Open loop: arrival times are a Poisson process (exponential gaps from
//    the seeded RNG) and there are enough workers that a request is not held back by earlier
//    ones still running (up to LoadSpec::max_workers; the delay is visible as late starts).
//  - Streaming responses are read with a buffer_body parser and read_some, so each SSE event
//    is timestamped when its bytes arrive rather than when the response ends.
//  - The whole load is a pure function of the LoadSpec's seed: prompt lengths, prompt token
//    ids, output lengths and arrival gaps come from one mt19937_64, drawn before sending.
//  - Timing is std::chrono::steady_clock; each request carries its own offsets from the
//    benchmark start so summaries can be recomputed from the records.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace keel::loadgen {

struct LoadSpec {
  std::string url = "http://127.0.0.1:8000";  // scheme://host:port; only http
  std::string endpoint = "/v1/completions";   // or /v1/chat/completions
  std::string model;                          // sent when non-empty
  // Closed loop with `concurrency` workers when request_rate <= 0; otherwise open loop.
  int concurrency = 1;
  double request_rate = 0.0;  // requests per second, Poisson arrivals
  // Open loop: at most this many requests in flight (worker threads); 0 = num_prompts.
  int max_workers = 256;
  int num_prompts = 16;
  // Per-request lengths, uniform in [min, max] (equal bounds: fixed).
  int input_len_min = 64, input_len_max = 64;
  int output_len_min = 64, output_len_max = 64;
  int vocab_hint = 1000;  // prompt token ids are drawn from [0, vocab_hint)
  bool stream = true;
  double temperature = 0.0;
  uint64_t seed = 0;
  // Sends "ignore_eos": true (vLLM's extension; servers that do not know it ignore it). Output
  // is counted from what comes back either way.
  bool ignore_eos = false;
  // A request that has not finished after this long is failed (its connection is shut down).
  double request_timeout_s = 600.0;
};

// The load a spec describes: what each request sends and when (offset from the start).
struct PlannedRequest {
  std::vector<int32_t> prompt;
  int max_tokens = 0;
  double arrival_s = 0.0;
};
std::vector<PlannedRequest> plan_requests(const LoadSpec& spec);

struct RequestRecord {
  int index = 0;
  bool success = false;
  std::string error;
  int http_status = 0;
  double start_s = 0.0;  // offset from the benchmark start when the request was written
  double ttft_s = 0.0;   // first chunk carrying a token (non-streaming: = e2el_s)
  double e2el_s = 0.0;
  std::vector<double> chunk_times_s;  // arrival of each token chunk, offset from start_s
  int prompt_tokens = 0;              // from usage; else the prompt length sent
  int completion_tokens = 0;          // from usage; else the number of token chunks
  bool usage_reported = false;
};

struct Summary {
  int completed = 0;
  int failed = 0;
  double duration_s = 0.0;  // first request sent to last request finished
  int64_t total_input_tokens = 0;
  int64_t total_output_tokens = 0;
  double request_throughput = 0.0;  // completed / duration
  double output_throughput = 0.0;   // output tokens / duration
  double total_token_throughput = 0.0;
  struct Stats {
    double mean = 0, median = 0, p90 = 0, p99 = 0, stddev = 0;
  };
  Stats ttft_ms, tpot_ms, itl_ms, e2el_ms;
  std::vector<std::string> errors;  // the first few distinct error texts
};

struct LoadResult {
  LoadSpec spec;
  std::vector<RequestRecord> records;  // by request index
  Summary summary;
};

// Runs the load to completion: every request ends as a success or a recorded failure. Throws
// std::runtime_error only for an unusable spec (bad URL, unresolvable host, bad lengths).
LoadResult run_load(const LoadSpec& spec);

// numpy.percentile(values, q) with the default method "linear": sorted values a[0..n-1],
// position p = q/100 * (n-1), result a[floor p] + (p - floor p) * (a[ceil p] - a[floor p]).
// An empty input gives 0 (vLLM reports 0 for metrics without samples).
double percentile(std::vector<double> values, double q);

Summary summarize(const std::vector<RequestRecord>& records, double duration_s);

// vLLM benchmark_serving names: completed, failed, duration, request_throughput,
// output_throughput, total_token_throughput, {mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms.
nlohmann::json summary_json(const Summary& summary);
nlohmann::json spec_json(const LoadSpec& spec);
// A human-readable table in the style of benchmark_serving's.
std::string summary_table(const Summary& summary, const std::string& title);

// A server run as a child process: `argv` is executed with stdout on a pipe; start() reads its
// lines (echoing them to stderr) until one contains "listening on http://HOST:PORT" and returns
// the URL. Output after that keeps being drained by a thread so the child never blocks on a
// full pipe. stop() sends SIGTERM and waits; it returns the exit code (128 + signal if a signal
// ended it; -1 if it was still running after `timeout` and had to be SIGKILLed).
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> argv);
  ~ServerProcess();  // stops the child if still running
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  std::string start(std::chrono::milliseconds startup_timeout);
  int stop(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }

 private:
  std::vector<std::string> argv_;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::atomic<bool> stop_draining_{false};
  std::thread drainer_;
};

// An interleaved comparison of two arms (0 = A, 1 = B) over `rounds` rounds, for a machine
// whose speed drifts: each round runs both arms back to back, A first in even rounds and B
// first in odd ones (A B, B A, A B, ...), so a drift that is linear over two rounds adds the
// same to both arms. The runs in execution order; `position` is 0 for a round's first run.
struct ScheduledRun {
  int round = 0;
  int arm = 0;
  int position = 0;
  bool operator==(const ScheduledRun&) const = default;
};
std::vector<ScheduledRun> abba_schedule(int rounds);

// "listening on http://127.0.0.1:PORT" anywhere in `line` -> "http://127.0.0.1:PORT"; empty
// when the line does not announce a listener.
std::string parse_listening_url(const std::string& line);

}  // namespace keel::loadgen
