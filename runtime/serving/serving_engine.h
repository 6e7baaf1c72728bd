// The serving backend: connects the HTTP layer (runtime/server) to the engine.
//
// Design:
//  - Server threads call prepare() (tokenize, check lengths) and try_submit() (queue); nothing
//    there blocks on generation. The queue is the only state they share with the engine, under
//    one mutex.
//  - The leader rank's thread runs the StepSource side: it moves queued requests into the
//    BatchScheduler (scheduler/, continuous batching over the paged KV block manager), turns
//    each StepPlan into a StepBatch (block tables included) that Engine::serve broadcasts to all
//    ranks, and after the step samples every sequence that asked for logits, detokenizes
//    incrementally, applies stop strings and streams to the request's TokenSink. The scheduler
//    and every per-request state are touched by that thread only.
//  - Sampling is keel::sampling: a pure function of (logits row, params, position), with the
//    position the absolute position of the sampled token, so a request's samples never depend
//    on its batch-mates. With batch_invariant determinism the logits rows themselves are
//    batch-invariant (fixed_order all-reduce, canonical GEMMs, attention in position order),
//    hence the whole response is.
//  - A sink that reports cancelled() (client gone, drain deadline) is aborted at the next step:
//    its KV blocks return to the pool at once.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "runtime/common/sha256.h"
#include "runtime/engine/engine.h"
#include "runtime/routing/routing_file.h"
#include "runtime/sampling/sampler.h"
#include "runtime/server/api.h"
#include "runtime/server/http_server.h"
#include "runtime/serving/profile_routes.h"
#include "runtime/serving/serving_telemetry.h"
#include "runtime/telemetry/scrape_cache.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"
#include "scheduler/batch_scheduler.h"

namespace keel {

struct ServingConfig {
  std::string model_name;  // what responses report; empty: the model directory's name
  // Further names a request's "model" may use (more served names, the model's path as given).
  std::vector<std::string> model_aliases;
  int64_t max_model_len = 0;  // context limit; 0 = the model's max_position_embeddings
  SchedulerConfig scheduler;  // num_kv_blocks must be set
  int64_t max_waiting = 256;  // queued (not yet running) requests beyond which submit says 429
  uint64_t seed_base = 0;     // seeds of requests that bring none: hash(seed_base, request #)
  bool telemetry = true;      // per-step phase/expert timings and routing statistics
  TelemetryConfig telemetry_options;  // telemetry_options.metrics: what /metrics carries
  // GET /metrics serves one body for this long (seconds since its render began) to every
  // scraper, so N scrapers cost one render per interval; 0 renders on every scrape.
  double metrics_cache_s = 1.0;
  std::string trace_dir = ".";  // POST /v1/profile/stop writes only new files under it
  // Server-wide routing capture (runtime/routing/routing_file.h): every finished request's
  // prompt, output, sampling, logits digest and per-token routing appended to this file.
  std::string routing_capture_path;
  RoutingFileHeader routing_header;  // model/placement/reduce/... for the capture file
};

// Counters for /metrics, tests and shutdown; readable from any thread.
struct ServingStats {
  int64_t waiting = 0;
  int64_t running = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t state_slots_used = 0;   // hybrid models: recurrent-state slots held by running requests
  int64_t state_slots_total = 0;  // 0 for models without recurrent layers
  int64_t requests_finished = 0;
  int64_t requests_finished_by_length = 0;  // of requests_finished; the rest ended by a stop
  int64_t requests_aborted = 0;
  int64_t preemptions = 0;
  int64_t steps = 0;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
};

class ServingEngine final : public server::GenerationBackend, public StepSource {
 public:
  // Loads tokenizer.json and tokenizer_config.json (chat template) from model_dir; throws
  // keel::Error when the model has no tokenizer.json.
  ServingEngine(const Engine& engine, const std::string& model_dir, ServingConfig config);
  ~ServingEngine() override;

  // server::GenerationBackend
  std::string model_name() const override { return config_.model_name; }
  std::vector<std::string> served_model_names() const override;
  std::string model_root() const override { return model_dir_; }
  std::optional<server::RequestError> tokenize(const std::string& text, bool add_special_tokens,
                                               server::Tokenized& out) override;
  std::optional<server::RequestError> detokenize(const std::vector<int32_t>& ids,
                                                 std::string& text) override;
  int max_context() const override { return static_cast<int>(max_context_); }
  std::optional<server::RequestError> prepare(server::CompletionRequest& request) override;
  bool try_submit(server::CompletionRequest request,
                  std::shared_ptr<server::TokenSink> sink) override;
  server::BackendHealth health() const override;

  // StepSource (leader thread only)
  void next_step(ServeStep& step) override;
  void on_step_done(const StepOutput& output) override;
  // The watchdog's stall reason (any thread): /health and new requests answer 503 with it.
  void on_stall(const std::string& reason) override;

  // GET /metrics: serving counters plus the telemetry's metric families (Prometheus text), as
  // cached for metrics_cache_s.
  std::string prometheus() const;
  // A fresh exposition with these options (prometheus() renders through it; bench/metrics
  // compares the options on one state).
  std::string render_metrics(const MetricsOptions& options) const;
  // Telemetry and profiling routes for HttpServerConfig::extra_routes:
  //   GET /v1/telemetry/experts, GET /v1/telemetry/requests?limit=N,
  //   GET /v1/telemetry/steps?first=A&last=B, GET /v1/telemetry/placement?tp=N (a balanced
  //   placement file from the live counters), and the profile routes (profile_routes.h).
  std::optional<server::HttpServerConfig::ExtraResponse> handle_route(const std::string& method,
                                                                      const std::string& path,
                                                                      const std::string& query,
                                                                      const std::string& body);
  ServingTelemetry& telemetry() { return *telemetry_; }

  // The chat template for the HTTP layer (the model's, or ChatML), and what it does with tools
  // and reasoning.
  server::ChatTemplate chat_template() const;
  server::ChatCapabilities chat_capabilities() const;
  const ChatTemplateInfo& chat_template_info() const { return template_; }

  // Refuse new requests; the step loop returns kStop once nothing is queued or running (the HTTP
  // server's drain has already finished or cancelled what was in flight).
  void request_stop();
  // Marks the backend unhealthy once the step loop has died (call only after Engine::serve
  // returned or threw): queued and running requests get a 503 (TokenSink::on_unavailable)
  // carrying the reason at once; /health and new requests then answer 503.
  void set_failed(const std::string& reason);
  ServingStats stats() const;

 private:
  struct Incoming {
    server::CompletionRequest request;
    std::shared_ptr<server::TokenSink> sink;
    double arrival_s = 0;
  };
  // One token position's routing: [moe layer][slot] ids and weights, [moe layer] margins.
  struct RoutingRows {
    std::vector<int32_t> ids;
    std::vector<float> weights;
    std::vector<float> margins;
  };
  struct Live {
    std::shared_ptr<server::TokenSink> sink;
    sampling::SamplingParams params;
    int64_t prompt_len = 0;
    int64_t max_new_tokens = 0;
    int64_t num_generated = 0;
    std::unique_ptr<StreamDecoder> decoder;
    std::vector<std::string> stop;
    std::string held;  // decoded text not yet sent: it may be the start of a stop string
    bool include_stop_str = false;
    bool ended = false;
    // Logits processing and stopping: the request's own tokens, its stop ids (sorted: the
    // model's end-of-sequence unless ignore_eos, plus stop_token_ids) and min_tokens.
    std::vector<int32_t> prompt_ids;
    std::vector<int32_t> output_ids;
    std::vector<int32_t> stop_ids;
    int64_t min_tokens = 0;
    // Echo / prompt logprobs: filled while the prompt is computed, sent before the first token.
    int32_t num_prompt_logprobs = -1;  // alternatives per prompt token; -1: no prompt logprobs
    bool report_prompt = false;
    bool prompt_reported = false;
    server::PromptOutput prompt_output;
    // Telemetry.
    std::string request_id;
    double arrival_s = 0;
    double first_scheduled_s = -1;
    int64_t first_step = -1;
    int64_t last_step = -1;
    std::vector<double> token_times_s;
    bool return_routing = false;       // rows are recorded (for the response or the capture)
    bool want_routing_field = false;   // the response carries them
    std::vector<RoutingRows> routing;  // by absolute position
    // Capture (routing records): what replay needs to re-run the request.
    std::vector<int32_t> prompt_token_ids;
    std::vector<int32_t> output_token_ids;
    std::unique_ptr<Sha256> logits_digest;
  };

  void admit(Incoming incoming);
  // Streams one sampled token of `live`; returns true when a stop string ended the request.
  bool emit(Live& live, const sampling::SampleResult& sample, bool is_last);
  server::TopLogprob top_logprob(const sampling::TokenLogprob& entry) const;
  void finish(int64_t seq_id, Live& live, const std::string& reason);
  void publish_stats();
  void record_routing(const StepOutput& output);
  void write_routing_record(int64_t seq_id, Live& live);
  void finish_request(int64_t seq_id, Live& live, const std::string& reason);

  const int64_t vocab_size_;
  ServingConfig config_;
  std::string model_dir_;
  int64_t max_context_ = 0;
  // The KV pool of one rank: bytes (blocks x kv_block_bytes) and storage dtype, for /metrics.
  int64_t kv_cache_bytes_ = 0;
  std::string kv_cache_dtype_;
  Tokenizer tokenizer_;
  ChatTemplateInfo template_;
  std::vector<int32_t> stop_token_ids_;
  std::vector<int32_t> untokenizable_ids_;  // masked to -inf before sampling

  // Shared with server threads.
  mutable std::mutex mutex_;
  std::condition_variable wakeup_;
  std::vector<Incoming> incoming_;
  bool stopping_ = false;
  std::string failure_;
  std::string stall_;  // the watchdog's reason while steps do not progress
  ServingStats stats_;

  // Leader thread only.
  BatchScheduler scheduler_;
  std::map<int64_t, Live> live_;
  int64_t next_seq_id_ = 0;
  StepPlan plan_;
  std::vector<bool> every_row_;  // [plan seq] a logits row for every token fed (prompt logprobs)
  ServingStats local_stats_;
  std::vector<float> masked_;
  // Telemetry (leader thread, except what ServingTelemetry guards itself).
  std::unique_ptr<ServingTelemetry> telemetry_;
  std::unique_ptr<telemetry::ScrapeCache> metrics_cache_;  // any thread (it locks itself)
  std::unique_ptr<ProfileRoutes> profile_;                 // after telemetry_: destroyed first
  int64_t step_id_ = 0;
  double step_start_s_ = 0;
  double schedule_s_ = 0;
  bool idle_since_last_step_ = true;  // the engine waited for work since the last step
  double last_step_end_s_ = -1;
  int64_t num_moe_layers_ = 0;
  int64_t top_k_ = 0;
  int tp_size_ = 1;
  int64_t num_layers_ = 0;
  int64_t num_experts_ = 0;
  std::unique_ptr<RoutingWriter> routing_writer_;
};

}  // namespace keel
