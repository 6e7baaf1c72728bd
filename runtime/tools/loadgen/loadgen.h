// keel_loadgen: a load generator for OpenAI-compatible completion servers (keel, vLLM, ...),
// reporting the metrics of vLLM's benchmark_serving under the same JSON names.
//
// Design:
//  - Workers are plain threads, each with one synchronous Boost.Beast keep-alive connection
//    (reconnected when the server closes it). A worker takes the next request index from a
//    shared counter, waits until that request's arrival time and sends it. Closed loop: C
//    workers and every arrival time is 0, so each worker sends its next request as soon as the
//    previous one ends. Open loop: arrival gaps are gamma-distributed with shape `burstiness`
//    and mean 1/rate (vLLM benchmark_serving's model: burstiness 1 is a Poisson process,
//    smaller is burstier, larger is more regular), drawn from the seeded RNG, and there are
//    enough workers that a request is not held back by earlier
//    ones still running (up to LoadSpec::max_workers; the delay is visible as late starts).
//  - Streaming responses are read with a buffer_body parser and read_some, so each SSE event
//    is timestamped when its bytes arrive rather than when the response ends.
//  - The whole load is a pure function of the LoadSpec's seed: prompt lengths, prompt token
//    ids, output lengths and arrival gaps come from one mt19937_64, drawn before sending. With
//    a dataset (JSONL) the prompts and output lengths come from the file instead, in file order
//    (wrapping around), and only the arrival gaps are random.
//  - Goodput follows vLLM: a completed request is good when every given SLO (TTFT, TPOT, E2EL
//    in ms) holds with `<=`, and request_goodput = good requests / duration.
//  - Timing is std::chrono::steady_clock; each request carries its own offsets from the
//    benchmark start so summaries can be recomputed from the records.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
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
  double request_rate = 0.0;  // requests per second
  // Shape of the gamma distribution of arrival gaps (mean stays 1/request_rate): 1 = Poisson,
  // < 1 burstier, > 1 more regular. Open loop only.
  double burstiness = 1.0;
  // A JSONL file, one request a line: {"prompt": "text" or [token ids], "output_len": n}.
  // Empty: random token-id prompts with the lengths below.
  std::string dataset;
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
  // A progress bar on stderr while the load runs (the CLI turns it on when stderr is a TTY).
  bool progress = false;
};

// The load a spec describes: what each request sends and when (offset from the start).
struct PlannedRequest {
  std::vector<int32_t> prompt;  // token ids, unless text_prompt
  bool text_prompt = false;     // the dataset gave text: sent as a string prompt
  std::string prompt_text;
  int max_tokens = 0;
  double arrival_s = 0.0;
};
std::vector<PlannedRequest> plan_requests(const LoadSpec& spec);
// The requests of a JSONL dataset (see LoadSpec::dataset), arrival times 0. Throws
// std::runtime_error naming the file and line for anything malformed.
std::vector<PlannedRequest> load_dataset(const std::string& path);
// One gamma(shape, scale) draw from `rng`, by Marsaglia-Tsang with Box-Muller normals over
// the top 53 bits of each draw, so the same seed gives the same gaps on every platform
// (std::gamma_distribution's algorithm is implementation-defined).
double sample_gamma(std::mt19937_64& rng, double shape, double scale);

struct RequestRecord {
  int index = 0;
  bool success = false;
  std::string error;
  int http_status = 0;
  std::string response_id;  // the response's "id" ("cmpl-..."): joins with server telemetry
  double start_s = 0.0;     // offset from the benchmark start when the request was written
  double ttft_s = 0.0;      // first chunk carrying a token (non-streaming: = e2el_s)
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
  // Set when summarize() was given an SLO: completed requests meeting all of it, per second.
  std::optional<double> request_goodput;
  int good_completed = 0;
  struct Stats {
    double mean = 0, median = 0, p90 = 0, p99 = 0, p99_9 = 0, stddev = 0;
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

// Service-level objectives for goodput, each optional (vLLM's --goodput ttft:MS tpot:MS e2el:MS).
struct Slo {
  std::optional<double> ttft_ms, tpot_ms, e2el_ms;
  bool any() const { return ttft_ms || tpot_ms || e2el_ms; }
};
// "ttft:300" "tpot:50" ... -> Slo; throws std::runtime_error for an unknown key or a value
// that is not a positive number.
Slo parse_slo(const std::vector<std::string>& items);
// Whether a successful record meets every SLO that is set. TPOT of a request with at most one
// output token counts as 0, as in vLLM.
bool meets_slo(const RequestRecord& record, const Slo& slo);

Summary summarize(const std::vector<RequestRecord>& records, double duration_s,
                  const Slo& slo = {});

// vLLM benchmark_serving names: completed, failed, duration, request_throughput,
// output_throughput, total_token_throughput, request_goodput (null without an SLO),
// {mean,median,std,p90,p99,p99.9}_{ttft,tpot,itl,e2el}_ms (vLLM spells percentile keys
// f"p{p}" with p printed as Python does: 99.9 -> "p99.9_ttft_ms").
nlohmann::json summary_json(const Summary& summary);
// Per-request arrays in request order, under vLLM's --save-result names where it has them
// (seconds, as vLLM): "input_lens", "output_lens", "ttfts", "itls" (a list per request),
// "errors"; plus keel's "request_ids" (response ids), "e2els", "tpots" (0 for <= 1 output
// token), "start_times" and "success". Failed requests have 0 lengths/latencies, as in vLLM.
nlohmann::json records_json(const std::vector<RequestRecord>& records);
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

// A plain HTTP/1.1 GET of `url` ("http://host:port/path?query"), for telemetry endpoints.
// Throws std::runtime_error for a bad URL, a connection failure or a timeout; any HTTP status
// is returned.
struct HttpResponse {
  int status = 0;
  std::string body;
};
HttpResponse http_get(const std::string& url, double timeout_s = 30.0);

}  // namespace keel::loadgen
