#include "runtime/serving/serving_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "kernels/base/check.h"
#include "runtime/engine/step_plan.h"

namespace keel {

namespace {

using server::RequestError;

// How long an idle leader waits for work before it sends the ranks an idle heartbeat.
constexpr auto kIdleWait = std::chrono::milliseconds(20);

uint64_t mix64(uint64_t value) {  // splitmix64 finaliser
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

RequestError bad_request(std::string message, std::string param) {
  RequestError error;
  error.status = 400;
  error.message = std::move(message);
  error.param = std::move(param);
  return error;
}

// eos_token_id of config.json: absent, an integer, or a list of integers.
std::vector<int32_t> config_eos_ids(const std::string& model_dir) {
  std::ifstream file(model_dir + "/config.json");
  nlohmann::json config = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
  std::vector<int32_t> ids;
  if (!config.is_object()) return ids;
  auto it = config.find("eos_token_id");
  if (it == config.end()) return ids;
  if (it->is_number_integer()) ids.push_back(it->get<int32_t>());
  if (it->is_array())
    for (const auto& id : *it)
      if (id.is_number_integer()) ids.push_back(id.get<int32_t>());
  return ids;
}

// Length of the longest suffix of `text` that is a proper prefix of some stop string.
size_t held_suffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const std::string& stop : stops)
    for (size_t len = std::min(text.size(), stop.size() - 1); len > longest; --len)
      if (text.compare(text.size() - len, len, stop, 0, len) == 0) {
        longest = len;
        break;
      }
  return longest;
}

sampling::SamplingParams sampling_params_of(const server::CompletionRequest& request) {
  sampling::SamplingParams params;
  params.temperature = request.temperature;
  params.top_p = request.top_p;
  params.top_k = request.top_k;
  params.num_logprobs = request.logprobs ? request.top_logprobs : 0;
  params.min_p = request.min_p;
  params.presence_penalty = request.presence_penalty;
  params.frequency_penalty = request.frequency_penalty;
  params.repetition_penalty = request.repetition_penalty;
  for (const auto& [token, bias] : request.logit_bias) params.logit_bias.push_back({token, bias});
  return params;
}

// Prompt logprobs (with their alternatives) a request needs: prompt_logprobs itself, or echo
// with logprobs (the echoed prompt tokens carry logprobs too). -1: none.
int32_t prompt_logprobs_wanted(const server::CompletionRequest& request) {
  int32_t wanted = request.prompt_logprobs ? *request.prompt_logprobs : -1;
  if (request.echo && request.logprobs) wanted = std::max(wanted, request.top_logprobs);
  return wanted;
}

}  // namespace

ServingEngine::ServingEngine(const Engine& engine, const std::string& model_dir,
                             ServingConfig config)
    : vocab_size_(engine.config().vocab_size),
      config_(std::move(config)),
      tokenizer_([&] {
        const std::string path = model_dir + "/tokenizer.json";
        if (!std::filesystem::exists(path))
          throw_error("model ", model_dir,
                      " has no tokenizer.json; serving needs one (keel gen-model writes one for "
                      "presets with vocab_size >= 259)");
        return Tokenizer::load(path);
      }()),
      template_(load_chat_template(model_dir)),
      scheduler_(config_.scheduler) {
  const int64_t model_max = engine.config().max_position_embeddings;
  // Positions past max_position_embeddings are outside what the model was trained (and its RoPE
  // tables sized) for: refused by name rather than quietly clipped to the model's limit.
  if (config_.max_model_len > model_max)
    throw_error("max_model_len ", config_.max_model_len, " exceeds model ", model_dir,
                "'s max_position_embeddings (", model_max, ")");
  max_context_ = config_.max_model_len > 0 ? config_.max_model_len : model_max;
  model_dir_ = model_dir;
  if (config_.model_name.empty()) {
    // "out/models/tiny/" names "tiny" too.
    const std::filesystem::path path = std::filesystem::path(model_dir).lexically_normal();
    config_.model_name =
        (path.has_filename() ? path.filename() : path.parent_path().filename()).string();
  }
  if (static_cast<int64_t>(tokenizer_.vocab_size()) > vocab_size_)
    throw_error("model ", model_dir, ": tokenizer.json has ", tokenizer_.vocab_size(),
                " tokens but the model's vocab_size is ", vocab_size_);
  // End of sequence: config.json's eos_token_id and the chat family's end-of-turn tokens.
  stop_token_ids_ = config_eos_ids(model_dir);
  for (const std::string& token : template_.stop_tokens)
    if (int32_t id = tokenizer_.token_id(token); id >= 0) stop_token_ids_.push_back(id);
  std::sort(stop_token_ids_.begin(), stop_token_ids_.end());
  stop_token_ids_.erase(std::unique(stop_token_ids_.begin(), stop_token_ids_.end()),
                        stop_token_ids_.end());
  // Model rows the tokenizer has no token for (padding rows of the embedding, or a synthetic
  // model's vocab beyond its small tokenizer) can never be sampled: they have no text.
  for (int32_t id = 0; id < vocab_size_; ++id)
    if (!tokenizer_.id_to_token(id)) untokenizable_ids_.push_back(id);
  stats_.kv_blocks_total = config_.scheduler.num_kv_blocks;
  kv_cache_bytes_ = int64_t{config_.scheduler.num_kv_blocks} *
                    engine.kv_block_bytes(config_.scheduler.block_size);
  kv_cache_dtype_ = std::string(kv_cache_dtype_name(engine.kv_dtype()));
  stats_.state_slots_total = config_.scheduler.num_state_slots;
  local_stats_ = stats_;
  top_k_ = engine.config().top_k;
  tp_size_ = engine.tp_size();
  num_layers_ = engine.config().num_layers;
  num_experts_ = engine.config().num_experts;
  for (bool is_moe : engine.config().layer_is_moe) num_moe_layers_ += is_moe ? 1 : 0;
  telemetry_ =
      std::make_unique<ServingTelemetry>(engine.config(), engine.placement(), engine.tp_size(),
                                         config_.model_name, config_.telemetry_options);
  if (!(config_.metrics_cache_s >= 0 && config_.metrics_cache_s <= 3600))
    throw_error("metrics_cache_s is ", config_.metrics_cache_s, "; expected [0, 3600] seconds");
  metrics_cache_ = std::make_unique<telemetry::ScrapeCache>(
      [this] { return render_metrics(config_.telemetry_options.metrics); },
      std::chrono::duration_cast<telemetry::ScrapeCache::Clock::duration>(
          std::chrono::duration<double>(config_.metrics_cache_s)));
  profile_ = std::make_unique<ProfileRoutes>(*telemetry_, config_.trace_dir);
  if (!config_.routing_capture_path.empty()) {
    RoutingFileHeader& header = config_.routing_header;
    header.model = config_.model_name;
    header.num_layers = engine.config().num_layers;
    header.moe_layers.clear();
    for (int64_t layer = 0; layer < engine.config().num_layers; ++layer)
      if (engine.config().layer_is_moe[static_cast<size_t>(layer)])
        header.moe_layers.push_back(static_cast<int32_t>(layer));
    header.num_experts = engine.config().num_experts;
    header.top_k = engine.config().top_k;
    header.tp = engine.tp_size();
    header.created_unix = static_cast<int64_t>(std::time(nullptr));
    routing_writer_ = std::make_unique<RoutingWriter>(config_.routing_capture_path, header);
    spdlog::info("capturing routing records to {}", config_.routing_capture_path);
  }
  spdlog::info("serving {}: context {}, {} KV blocks of {}, chat template {}", config_.model_name,
               max_context_, config_.scheduler.num_kv_blocks, config_.scheduler.block_size,
               template_.family);
}

ServingEngine::~ServingEngine() = default;

std::vector<std::string> ServingEngine::served_model_names() const {
  std::vector<std::string> names = {config_.model_name};
  for (const std::string& alias : config_.model_aliases)
    if (std::find(names.begin(), names.end(), alias) == names.end()) names.push_back(alias);
  return names;
}

std::optional<RequestError> ServingEngine::tokenize(const std::string& text,
                                                    bool add_special_tokens,
                                                    server::Tokenized& out) {
  try {
    out.ids = tokenizer_.encode(text, add_special_tokens);
  } catch (const Error& error) {
    return bad_request(std::string("cannot tokenize the prompt: ") + error.what(), "prompt");
  }
  out.token_strs.clear();
  for (int32_t id : out.ids) out.token_strs.push_back(tokenizer_.id_to_token(id).value_or(""));
  return std::nullopt;
}

std::optional<RequestError> ServingEngine::detokenize(const std::vector<int32_t>& ids,
                                                      std::string& text) {
  for (int32_t id : ids)
    if (id >= vocab_size_ || !tokenizer_.id_to_token(id))
      return bad_request("token id " + std::to_string(id) +
                             (id >= vocab_size_ ? " is outside the vocabulary [0, " +
                                                      std::to_string(vocab_size_) + ")"
                                                : " has no token in this model's tokenizer"),
                         "tokens");
  text = tokenizer_.decode(ids, /*skip_special_tokens=*/false);
  return std::nullopt;
}

server::ChatTemplate ServingEngine::chat_template() const {
  return [info = template_](const server::CompletionRequest& request) {
    std::vector<ChatTurn> turns;
    turns.reserve(request.messages.size());
    for (const auto& message : request.messages) {
      ChatTurn turn(message.role, message.content);
      turn.content_parts = message.content_parts;
      for (const auto& call : message.tool_calls)
        turn.tool_calls.push_back({call.name, call.arguments});
      turn.reasoning_content = message.reasoning_content;
      turns.push_back(std::move(turn));
    }
    ChatRenderOptions options;
    options.tools = request.tools;
    options.enable_thinking = request.enable_thinking;
    return render_chat(info, turns, options);
  };
}

server::ChatCapabilities ServingEngine::chat_capabilities() const {
  server::ChatCapabilities caps;
  caps.template_family = template_.family;
  switch (template_.tool_call_syntax) {
    case ToolCallSyntax::kHermesJson:
      caps.tool_calls = server::ToolCallFormat::kHermesJson;
      break;
    case ToolCallSyntax::kQwenXml:
      caps.tool_calls = server::ToolCallFormat::kQwenXml;
      break;
    case ToolCallSyntax::kNone:
      caps.tool_calls = server::ToolCallFormat::kNone;
      break;
  }
  // Qwen3's and Qwen3.5's outputs carry <think> reasoning (vLLM: --reasoning-parser qwen3).
  caps.reasoning = template_.dialect != ChatMLDialect::kPlain;
  caps.thinking_switch = template_.thinking_switch;
  caps.thinking_default = template_.thinking_default;
  return caps;
}

std::optional<RequestError> ServingEngine::prepare(server::CompletionRequest& request) {
  const bool chat = request.endpoint == server::Endpoint::kChatCompletions;
  const std::string prompt_param = chat ? "messages" : "prompt";
  if (!request.prompt_tokens) {
    try {
      // Completions get the tokenizer's special tokens (a BOS where the model has one); a chat
      // template already wrote them.
      request.prompt_tokens = tokenizer_.encode(request.prompt_text, /*add_special_tokens=*/!chat);
    } catch (const Error& error) {
      return bad_request(std::string("cannot tokenize the prompt: ") + error.what(), prompt_param);
    }
  }
  std::vector<int32_t>& prompt = *request.prompt_tokens;
  if (prompt.empty()) return bad_request("the prompt is empty after tokenization", prompt_param);
  for (int32_t id : prompt)
    if (id < 0 || id >= vocab_size_)
      return bad_request("prompt token id " + std::to_string(id) +
                             " is outside the vocabulary [0, " + std::to_string(vocab_size_) + ")",
                         prompt_param);
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  if (prompt_len >= max_context_)
    return bad_request("the prompt has " + std::to_string(prompt_len) +
                           " tokens; this model's context is " + std::to_string(max_context_) +
                           " tokens (prompt plus at least one generated token)",
                       prompt_param);
  // Generation stops at the context end ("length") rather than failing the request.
  request.max_tokens =
      static_cast<int>(std::min<int64_t>(request.max_tokens, max_context_ - prompt_len));
  const int64_t pool_tokens =
      int64_t{config_.scheduler.num_kv_blocks} * config_.scheduler.block_size;
  if (prompt_len + 1 > pool_tokens)
    return bad_request("the prompt needs " + std::to_string(prompt_len + 1) +
                           " KV slots; the whole cache holds " + std::to_string(pool_tokens),
                       prompt_param);
  request.max_tokens =
      static_cast<int>(std::min<int64_t>(request.max_tokens, pool_tokens - prompt_len));
  for (const auto& [token, bias] : request.logit_bias)
    if (token >= vocab_size_)
      return bad_request("logit_bias names token id " + std::to_string(token) +
                             ", outside the vocabulary [0, " + std::to_string(vocab_size_) + ")",
                         "logit_bias");
  for (const int32_t token : request.stop_token_ids)
    if (token >= vocab_size_)
      return bad_request("stop_token_ids has token id " + std::to_string(token) +
                             ", outside the vocabulary [0, " + std::to_string(vocab_size_) + ")",
                         "stop_token_ids");
  try {
    sampling_params_of(request).validate();
  } catch (const Error& error) {
    return bad_request(error.what(), "");
  }
  return std::nullopt;
}

bool ServingEngine::try_submit(server::CompletionRequest request,
                               std::shared_ptr<server::TokenSink> sink) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_ || !failure_.empty()) return false;
    if (static_cast<int64_t>(incoming_.size()) + stats_.waiting >= config_.max_waiting)
      return false;
    incoming_.push_back(Incoming{std::move(request), std::move(sink), telemetry_->now_s()});
  }
  wakeup_.notify_one();
  return true;
}

server::BackendHealth ServingEngine::health() const {
  std::lock_guard lock(mutex_);
  if (!failure_.empty()) return {false, failure_};
  if (!stall_.empty()) return {.healthy = false, .detail = stall_, .stalled_only = !stopping_};
  if (stopping_) return {false, "shutting down"};
  return {true, ""};
}

void ServingEngine::request_stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wakeup_.notify_one();
}

void ServingEngine::on_stall(const std::string& reason) {
  std::lock_guard lock(mutex_);
  stall_ = reason;
}

void ServingEngine::set_failed(const std::string& reason) {
  std::vector<Incoming> dropped;
  {
    std::lock_guard lock(mutex_);
    failure_ = reason;
    dropped.swap(incoming_);
  }
  for (Incoming& incoming : dropped) incoming.sink->on_unavailable("the engine failed: " + reason);
  // The step loop has exited (the caller's contract), so its state is ours now.
  for (auto& [seq_id, live] : live_)
    if (!live.ended) live.sink->on_unavailable("the engine failed: " + reason);
  live_.clear();
}

ServingStats ServingEngine::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void ServingEngine::publish_stats() {
  local_stats_.waiting = scheduler_.num_waiting();
  local_stats_.running = scheduler_.num_running();
  local_stats_.kv_blocks_used = scheduler_.block_manager().num_used_blocks();
  local_stats_.state_slots_used = scheduler_.num_used_state_slots();
  local_stats_.preemptions = scheduler_.total_preemptions();
  std::lock_guard lock(mutex_);
  stats_ = local_stats_;
}

void ServingEngine::admit(Incoming incoming) {
  server::CompletionRequest& request = incoming.request;
  const int64_t seq_id = next_seq_id_++;
  Live live;
  live.sink = std::move(incoming.sink);
  live.params = sampling_params_of(request);
  live.params.seed = request.seed ? *request.seed : mix64(config_.seed_base ^ mix64(seq_id));
  live.prompt_len = static_cast<int64_t>(request.prompt_tokens->size());
  live.max_new_tokens = request.max_tokens;
  live.decoder = std::make_unique<StreamDecoder>(tokenizer_, request.skip_special_tokens);
  live.stop = std::move(request.stop);
  live.include_stop_str = request.include_stop_str_in_output;
  live.min_tokens = request.min_tokens;
  live.prompt_ids = *request.prompt_tokens;
  // End of sequence: the model's (unless ignore_eos) and the request's own stop ids; until
  // min_tokens are out they are masked, so they cannot be sampled.
  if (!request.ignore_eos) live.stop_ids = stop_token_ids_;
  live.stop_ids.insert(live.stop_ids.end(), request.stop_token_ids.begin(),
                       request.stop_token_ids.end());
  std::sort(live.stop_ids.begin(), live.stop_ids.end());
  live.stop_ids.erase(std::unique(live.stop_ids.begin(), live.stop_ids.end()), live.stop_ids.end());
  live.num_prompt_logprobs = prompt_logprobs_wanted(request);
  live.report_prompt = request.echo || live.num_prompt_logprobs >= 0;
  if (live.report_prompt) {
    live.prompt_output.text =
        request.prompt_text.empty()
            ? tokenizer_.decode(live.prompt_ids, /*skip_special_tokens=*/false)
            : request.prompt_text;
    live.prompt_output.tokens.resize(live.prompt_ids.size());
    for (size_t position = 0; position < live.prompt_ids.size(); ++position) {
      server::PromptToken& token = live.prompt_output.tokens[position];
      token.token_id = live.prompt_ids[position];
      token.text = tokenizer_.decode({token.token_id});
      token.bytes = tokenizer_.token_bytes(token.token_id);
    }
  }
  live.request_id = request.request_id;
  live.arrival_s = incoming.arrival_s;
  live.return_routing = request.return_routing || routing_writer_ != nullptr;
  if (routing_writer_) {
    live.prompt_token_ids = *request.prompt_tokens;
    live.logits_digest = std::make_unique<Sha256>();
  }
  live.want_routing_field = request.return_routing;
  Request scheduled;
  scheduled.seq_id = seq_id;
  scheduled.prompt_token_ids = std::move(*request.prompt_tokens);
  scheduled.max_new_tokens = request.max_tokens;
  scheduled.stop_token_ids = live.stop_ids;
  // Prompt logprobs need the logits of every prompt position: none may come from the cache.
  scheduled.skip_prefix_cache = live.num_prompt_logprobs >= 0;
  try {
    scheduler_.add_request(std::move(scheduled));
  } catch (const Error& error) {
    live.sink->on_error(error.what());
    return;
  }
  local_stats_.prompt_tokens += live.prompt_len;
  live_.emplace(seq_id, std::move(live));
}

void ServingEngine::next_step(ServeStep& step) {
  const double schedule_start = telemetry_->now_s();
  std::vector<Incoming> arrived;
  bool stopping = false;
  {
    std::unique_lock lock(mutex_);
    if (incoming_.empty() && !stopping_ && !scheduler_.has_unfinished()) {
      idle_since_last_step_ = true;
      wakeup_.wait_for(lock, kIdleWait);
    }
    arrived.swap(incoming_);
    stopping = stopping_;
  }
  for (Incoming& incoming : arrived) admit(std::move(incoming));
  // Clients that went away: free their blocks now.
  for (auto& [seq_id, live] : live_)
    if (live.sink->cancelled()) scheduler_.abort(seq_id);
  for (const FinishedRequest& finished : scheduler_.take_finished()) {
    // Only aborts can finish outside on_step_done.
    if (live_.erase(finished.seq_id) > 0) ++local_stats_.requests_aborted;
  }
  step.batch = StepBatch{};
  if (!scheduler_.has_unfinished()) {
    publish_stats();
    step.kind = stopping ? ServeStep::Kind::kStop : ServeStep::Kind::kIdle;
    return;
  }
  plan_ = scheduler_.schedule();
  if (plan_.empty()) {
    // Nothing fits this step (the head of the queue waits for blocks that running sequences
    // will free); no step is in flight.
    publish_stats();
    idle_since_last_step_ = true;
    step.kind = ServeStep::Kind::kIdle;
    return;
  }
  // Sequences whose prompt logprobs are still missing get a logits row for every token fed.
  every_row_.assign(plan_.num_seqs(), false);
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    const Live& live = live_.at(plan_.seq_ids[seq]);
    every_row_[seq] = live.num_prompt_logprobs >= 0 && !live.prompt_reported;
  }
  step.batch = step_batch_from_plan(plan_, every_row_);
  step.kind = ServeStep::Kind::kRun;
  ++step_id_;
  step_start_s_ = telemetry_->now_s();
  schedule_s_ = step_start_s_ - schedule_start;
  step.observe = config_.telemetry;
  step.capture_routing = false;
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    Live& live = live_.at(plan_.seq_ids[seq]);
    if (live.first_step < 0) {
      live.first_step = step_id_;
      live.first_scheduled_s = step_start_s_;
    }
    live.last_step = step_id_;
    step.capture_routing |= live.return_routing;
  }
  step.capture_routing |= routing_writer_ != nullptr;
  step.observe |= step.capture_routing;
  step.trace = telemetry_->tracing();
  // /metrics shows this step's admissions and blocks before any client hears of the step: a
  // client that read its first token and then asks /metrics finds its request running.
  publish_stats();
}

server::TopLogprob ServingEngine::top_logprob(const sampling::TokenLogprob& entry) const {
  return {tokenizer_.decode({entry.token}), entry.token, entry.logprob,
          tokenizer_.token_bytes(entry.token)};
}

bool ServingEngine::emit(Live& live, const sampling::SampleResult& sample, bool is_last) {
  std::string text = std::move(live.held);
  live.held.clear();
  text += live.decoder->push(sample.token);
  if (is_last) text += live.decoder->finish();
  bool stopped = false;
  // As vLLM: stop strings are looked for once more than min_tokens tokens are out.
  if (!live.stop.empty() && live.num_generated > live.min_tokens) {
    size_t first_stop = std::string::npos;
    size_t stop_length = 0;
    for (const std::string& stop : live.stop) {
      const size_t at = text.find(stop);
      if (at < first_stop) {
        first_stop = at;
        stop_length = stop.size();
      }
    }
    if (first_stop != std::string::npos) {
      text.resize(first_stop + (live.include_stop_str ? stop_length : 0));
      stopped = true;
    } else if (!is_last) {
      const size_t hold = held_suffix(text, live.stop);
      live.held = text.substr(text.size() - hold);
      text.resize(text.size() - hold);
    }
  }
  server::GeneratedToken token;
  token.text_delta = std::move(text);
  token.token_id = sample.token;
  token.token_text = tokenizer_.decode({sample.token});
  token.token_bytes = tokenizer_.token_bytes(sample.token);
  token.logprob = sample.logprob;
  for (const sampling::TokenLogprob& entry : sample.top_logprobs)
    token.top_logprobs.push_back(top_logprob(entry));
  live.sink->on_token(token);
  return stopped;
}

void ServingEngine::finish(int64_t seq_id, Live& live, const std::string& reason) {
  live.ended = true;
  // Telemetry first: a client that reads /v1/telemetry right after its response must find it.
  RequestRecord record;
  record.id = live.request_id;
  record.seq_id = seq_id;
  record.arrival_s = live.arrival_s;
  record.queue_s = live.first_scheduled_s >= 0 ? live.first_scheduled_s - live.arrival_s : 0.0;
  record.ttft_s = live.token_times_s.empty() ? 0.0 : live.token_times_s.front() - live.arrival_s;
  record.e2e_s = telemetry_->now_s() - live.arrival_s;
  record.prompt_tokens = live.prompt_len;
  record.completion_tokens = live.num_generated;
  record.max_tokens = live.max_new_tokens;
  record.first_step = live.first_step;
  record.last_step = live.last_step;
  record.finish_reason = reason;
  record.token_times_s = live.token_times_s;
  telemetry_->on_request(record);
  const server::Usage usage{static_cast<int>(live.prompt_len),
                            static_cast<int>(live.num_generated)};
  // Counted and published before the client hears: a client that reads /metrics right after
  // its response finds it counted.
  ++local_stats_.requests_finished;
  if (reason == "length") ++local_stats_.requests_finished_by_length;
  publish_stats();
  if (routing_writer_ && reason != "error") write_routing_record(seq_id, live);
  if (live.want_routing_field) {
    // (tokens, moe layers, top_k) as vLLM/SGLang's routed_experts, plus weights and margins;
    // rows for every position whose forward pass ran (prompt and generated, not the last token).
    nlohmann::json ids = nlohmann::json::array(), weights = nlohmann::json::array(),
                   margins = nlohmann::json::array();
    const size_t k = static_cast<size_t>(top_k_);
    for (const RoutingRows& rows : live.routing) {
      nlohmann::json token_ids = nlohmann::json::array(), token_weights = nlohmann::json::array();
      for (size_t layer = 0; layer * k < rows.ids.size(); ++layer) {
        token_ids.push_back(
            std::vector<int32_t>(rows.ids.begin() + static_cast<ptrdiff_t>(layer * k),
                                 rows.ids.begin() + static_cast<ptrdiff_t>((layer + 1) * k)));
        token_weights.push_back(
            std::vector<float>(rows.weights.begin() + static_cast<ptrdiff_t>(layer * k),
                               rows.weights.begin() + static_cast<ptrdiff_t>((layer + 1) * k)));
      }
      ids.push_back(std::move(token_ids));
      weights.push_back(std::move(token_weights));
      margins.push_back(rows.margins);
    }
    live.sink->on_finish_with(
        reason, usage,
        {{"routed_experts", ids}, {"routed_expert_weights", weights}, {"router_margins", margins}});
  } else {
    live.sink->on_finish(reason, usage);
  }
}

void ServingEngine::write_routing_record(int64_t seq_id, Live& live) {
  RoutingRecord record;
  record.request_id = live.request_id;
  record.seq_id = seq_id;
  record.prompt_token_ids = live.prompt_token_ids;
  record.output_token_ids = live.output_token_ids;
  record.sampling.temperature = live.params.temperature;
  record.sampling.top_p = live.params.top_p;
  record.sampling.top_k = live.params.top_k;
  record.sampling.seed = live.params.seed;
  record.logits_digest = live.logits_digest ? live.logits_digest->finish_hex() : "";
  // Rows for every position whose forward ran: the prompt and all outputs but the last.
  record.num_tokens = static_cast<int64_t>(live.routing.size());
  for (const RoutingRows& rows : live.routing) {
    record.expert_ids.insert(record.expert_ids.end(), rows.ids.begin(), rows.ids.end());
    record.weights.insert(record.weights.end(), rows.weights.begin(), rows.weights.end());
    record.margins.insert(record.margins.end(), rows.margins.begin(), rows.margins.end());
  }
  try {
    routing_writer_->append(record);
    routing_writer_->flush();
  } catch (const Error& error) {
    spdlog::error("routing capture: {}", error.what());
  }
}

void ServingEngine::record_routing(const StepOutput& output) {
  const StepObservation* observation = output.observation;
  if (observation == nullptr || observation->route_weights.empty()) return;
  const size_t k = static_cast<size_t>(top_k_);
  const size_t num_layers = static_cast<size_t>(num_moe_layers_);
  const size_t num_tokens = static_cast<size_t>(plan_.num_scheduled_tokens);
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    Live& live = live_.at(plan_.seq_ids[seq]);
    if (!live.return_routing) continue;
    auto positions = plan_.positions_of(seq);
    const size_t first_row = static_cast<size_t>(plan_.token_offsets[seq]);
    for (size_t token = 0; token < positions.size(); ++token) {
      const size_t row = first_row + token;
      const size_t position = static_cast<size_t>(positions[token]);
      if (live.routing.size() <= position) live.routing.resize(position + 1);
      RoutingRows& rows = live.routing[position];  // a recompute after preemption overwrites
      rows.ids.clear();
      rows.weights.clear();
      rows.margins.clear();
      for (size_t layer = 0; layer < num_layers; ++layer) {
        const size_t at = (layer * num_tokens + row) * k;
        rows.ids.insert(rows.ids.end(), observation->route_ids.begin() + static_cast<ptrdiff_t>(at),
                        observation->route_ids.begin() + static_cast<ptrdiff_t>(at + k));
        rows.weights.insert(rows.weights.end(),
                            observation->route_weights.begin() + static_cast<ptrdiff_t>(at),
                            observation->route_weights.begin() + static_cast<ptrdiff_t>(at + k));
        rows.margins.push_back(observation->margins[layer * num_tokens + row]);
      }
    }
  }
}

void ServingEngine::on_step_done(const StepOutput& output) {
  const std::vector<float>& logits = *output.logits;
  const double sampling_start = telemetry_->now_s();
  record_routing(output);
  std::vector<std::string> step_request_ids;
  for (int64_t seq_id : plan_.seq_ids) step_request_ids.push_back(live_.at(seq_id).request_id);
  std::vector<int32_t> sampled;
  std::vector<int64_t> stopped_by_string;
  size_t row = 0;
  // A row of the step's logits with the untokenizable ids masked (they have no text).
  const auto masked_row = [&](size_t row_index) {
    const float* row_logits = logits.data() + row_index * static_cast<size_t>(vocab_size_);
    if (untokenizable_ids_.empty()) return row_logits;
    masked_.assign(row_logits, row_logits + vocab_size_);
    for (int32_t id : untokenizable_ids_) masked_[static_cast<size_t>(id)] = -INFINITY;
    return static_cast<const float*>(masked_.data());
  };
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    const int64_t seq_id = plan_.seq_ids[seq];
    Live& live = live_.at(seq_id);
    if (every_row_[seq]) {
      // Every fed token but a sequence's last has a row predicting the next prompt token.
      auto positions = plan_.positions_of(seq);
      const size_t num_prompt_rows = positions.size() - (plan_.needs_logits[seq] ? 1 : 0);
      for (size_t token = 0; token < num_prompt_rows; ++token, ++row) {
        const size_t next = static_cast<size_t>(positions[token]) + 1;
        if (next >= live.prompt_output.tokens.size()) continue;
        server::PromptToken& entry = live.prompt_output.tokens[next];
        sampling::TokenLogprobs logprobs = sampling::token_logprobs(
            masked_row(row), vocab_size_, entry.token_id, live.num_prompt_logprobs);
        entry.logprob = logprobs.logprob;
        entry.rank = logprobs.rank;
        entry.top_logprobs.clear();
        for (const sampling::TokenLogprob& alternative : logprobs.top)
          entry.top_logprobs.push_back(top_logprob(alternative));
      }
    }
    if (!plan_.needs_logits[seq]) continue;
    if (live.report_prompt && !live.prompt_reported) {
      live.prompt_reported = true;
      live.sink->on_prompt(live.prompt_output);
      live.prompt_output = {};
    }
    // The sampled token's absolute position: request-local, so batch-independent.
    const int64_t position = live.prompt_len + live.num_generated;
    const float* row_logits = masked_row(row);
    ++row;
    // Until min_tokens are out, end-of-sequence and stop_token_ids cannot be sampled.
    const bool before_min_tokens = live.num_generated < live.min_tokens;
    const sampling::TokenHistory history{
        live.prompt_ids, live.output_ids,
        before_min_tokens ? std::span<const int32_t>(live.stop_ids) : std::span<const int32_t>()};
    sampling::SampleResult sample;
    try {
      sample = sampling::sample(row_logits, vocab_size_, live.params, position, history);
    } catch (const Error& error) {
      // A row this request's own processing emptied (e.g. every token it may sample masked):
      // its error, not the server's. The scheduler ignores the placeholder of an aborted
      // sequence.
      sampled.push_back(0);
      live.ended = true;
      live.sink->on_error(std::string("sampling failed: ") + error.what());
      scheduler_.abort(seq_id);
      continue;
    }
    sampled.push_back(sample.token);
    ++live.num_generated;
    ++local_stats_.generated_tokens;
    live.output_ids.push_back(sample.token);
    if (live.logits_digest) {
      live.logits_digest->update(row_logits, static_cast<size_t>(vocab_size_) * sizeof(float));
      live.output_token_ids.push_back(sample.token);
    }
    const bool is_stop_token =
        std::binary_search(live.stop_ids.begin(), live.stop_ids.end(), sample.token);
    const bool is_last = is_stop_token || live.num_generated >= live.max_new_tokens;
    live.token_times_s.push_back(telemetry_->now_s());
    if (emit(live, sample, is_last)) stopped_by_string.push_back(seq_id);
  }
  KEEL_CHECK(row * static_cast<size_t>(vocab_size_) == logits.size(), "step returned ",
             logits.size(), " logits for ", row, " rows");
  // The step's telemetry before any request of it finishes: a client reading /v1/telemetry right
  // after its response finds the steps that served it.
  StepRecord record;
  record.id = step_id_;
  record.start_s = step_start_s_;
  const double now = telemetry_->now_s();
  record.sampling_s = now - sampling_start;
  record.seconds = now - step_start_s_;
  record.schedule_s = schedule_s_;
  // Back to back with the previous step: everything between the two (the previous step's
  // telemetry and finishing, this step's admission and planning) is serving overhead a
  // simulator has to count.
  record.gap_before_s =
      idle_since_last_step_ || last_step_end_s_ < 0 ? -1.0 : step_start_s_ - last_step_end_s_;
  idle_since_last_step_ = false;
  last_step_end_s_ = now;
  record.num_seqs = static_cast<int64_t>(plan_.num_seqs());
  record.num_tokens = plan_.num_scheduled_tokens;
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    const int64_t count = plan_.token_offsets[seq + 1] - plan_.token_offsets[seq];
    // As keel simulate counts them: a sequence fed exactly one token is a decode token.
    if (count == 1)
      record.num_decode_tokens += 1;
    else
      record.num_prefill_tokens += count;
    record.kv_tokens_read += plan_.positions_of(seq).back() + 1;
  }
  record.kv_blocks_used = scheduler_.block_manager().num_used_blocks();
  record.preemptions = plan_.num_preemptions;
  record.seq_ids = plan_.seq_ids;
  record.request_ids = std::move(step_request_ids);
  telemetry_->on_step(record, output);
  scheduler_.on_step_done(sampled);
  for (int64_t seq_id : stopped_by_string) {
    Live& live = live_.at(seq_id);
    finish(seq_id, live, "stop");
    scheduler_.abort(seq_id);  // frees its blocks; reported below as an abort we ignore
  }
  for (const FinishedRequest& finished : scheduler_.take_finished()) {
    auto it = live_.find(finished.seq_id);
    if (it == live_.end()) continue;
    if (!it->second.ended) {
      if (finished.reason == FinishReason::kAborted) {
        ++local_stats_.requests_aborted;
      } else {
        finish(finished.seq_id, it->second,
               finished.reason == FinishReason::kStop ? "stop" : "length");
      }
    }
    live_.erase(it);
  }
  ++local_stats_.steps;
  publish_stats();
}

std::string ServingEngine::prometheus() const {
  return *metrics_cache_->get();
}

std::string ServingEngine::render_metrics(const MetricsOptions& options) const {
  const ServingStats stats = this->stats();
  using telemetry::MetricType;
  namespace rm = request_metrics;
  telemetry::PromText text;
  MetricWriter out(text, options.names);
  const telemetry::Labels model = {{"model_name", config_.model_name}};
  auto add = [&](const char* name, MetricType type, const char* help, auto value) {
    text.family(name, type, help);
    text.value(name, model, value);
  };
  out.value(rm::kRunning, model, stats.running);
  out.value(rm::kWaiting, model, stats.waiting);
  out.value(rm::kKvCacheUsage, model,
            stats.kv_blocks_total > 0 ? static_cast<double>(stats.kv_blocks_used) /
                                            static_cast<double>(stats.kv_blocks_total)
                                      : 0.0);
  add("keel_kv_blocks_used", MetricType::kGauge, "KV blocks in use (per rank).",
      stats.kv_blocks_used);
  add("keel_kv_cache_blocks", MetricType::kGauge, "KV blocks in the pool (per rank).",
      stats.kv_blocks_total);
  const telemetry::Labels model_dtype = {{"model_name", config_.model_name},
                                         {"dtype", kv_cache_dtype_}};
  text.family("keel_kv_cache_bytes", MetricType::kGauge,
              "Bytes of the paged KV pool (K and V, every attention layer, per rank) in its "
              "storage dtype.");
  text.value("keel_kv_cache_bytes", model_dtype, kv_cache_bytes_);
  text.family("keel_kv_cache_info", MetricType::kGauge,
              "KV cache configuration (value 1): storage dtype and block size.");
  text.value("keel_kv_cache_info",
             {{"model_name", config_.model_name},
              {"dtype", kv_cache_dtype_},
              {"block_size", std::to_string(config_.scheduler.block_size)}},
             1);
  if (stats.state_slots_total > 0) {
    add("keel_state_slots_used", MetricType::kGauge,
        "Recurrent-state slots (Gated DeltaNet conv + SSM state) held by running requests.",
        stats.state_slots_used);
    add("keel_state_slots_total", MetricType::kGauge, "Recurrent-state slots (per rank).",
        stats.state_slots_total);
  }
  out.value(rm::kPreemptions, model, stats.preemptions);
  out.value(rm::kPromptTokens, model, stats.prompt_tokens);
  out.value(rm::kGenerationTokens, model, stats.generated_tokens);
  add("keel_request_success_total", MetricType::kCounter, "Requests finished (stop or length).",
      stats.requests_finished);
  if (out.vllm()) {
    // vLLM counts finished requests by reason, aborted ones included (finished_reason="abort").
    const char* name = "vllm:request_success_total";
    text.family(name, MetricType::kCounter, "Requests finished, by finish reason.");
    const std::pair<const char*, int64_t> by_reason[] = {
        {"stop", stats.requests_finished - stats.requests_finished_by_length},
        {"length", stats.requests_finished_by_length},
        {"abort", stats.requests_aborted}};
    for (const auto& [reason, count] : by_reason)
      text.value(name, {{"model_name", config_.model_name}, {"finished_reason", reason}}, count);
  }
  add("keel_request_aborted_total", MetricType::kCounter,
      "Requests cancelled (client gone or drain).", stats.requests_aborted);
  add("keel_engine_steps_total", MetricType::kCounter, "Engine steps run.", stats.steps);
  telemetry_->append_prometheus(text, options);
  return text.str();
}

namespace {

// "a=1&b=2" -> value of `key`, or `fallback`.
int64_t query_int(const std::string& query, const std::string& key, int64_t fallback) {
  size_t at = 0;
  while (at < query.size()) {
    size_t end = query.find('&', at);
    if (end == std::string::npos) end = query.size();
    const std::string pair = query.substr(at, end - at);
    if (pair.rfind(key + "=", 0) == 0) {
      try {
        return std::stoll(pair.substr(key.size() + 1));
      } catch (const std::exception&) {
        throw_error("query parameter '", key, "' must be an integer, got '",
                    pair.substr(key.size() + 1), "'");
      }
    }
    at = end + 1;
  }
  return fallback;
}

}  // namespace

std::optional<server::HttpServerConfig::ExtraResponse> ServingEngine::handle_route(
    const std::string& method, const std::string& path, const std::string& query,
    const std::string& body) {
  using Response = server::HttpServerConfig::ExtraResponse;
  auto json_response = [](const nlohmann::json& value) { return Response{200, value.dump()}; };
  auto method_error = [&](const char* allowed) {
    return Response{405, "method " + method + " not allowed on " + path + "; use " + allowed};
  };
  try {
    if (path == "/v1/telemetry/experts") {
      if (method != "GET") return method_error("GET");
      return json_response(telemetry_->experts_json());
    }
    if (path == "/v1/telemetry/placement") {
      // A balanced placement from the live per-expert token counters, as the placement file a
      // restart loads (serve config placement_file / --placement-file).
      if (method != "GET") return method_error("GET");
      const int64_t tp = query_int(query, "tp", tp_size_);
      if (tp < 1 || tp > 64) return Response{400, "query parameter 'tp' must be in [1, 64]"};
      std::vector<LayerLoad> loads = telemetry_->layer_loads();
      if (loads.empty()) return Response{409, "this model has no routed (MoE) layers"};
      std::string current = "this server's placement";
      if (tp != tp_size_) {
        current = "round_robin at tp " + std::to_string(tp);
        for (LayerLoad& load : loads)
          for (size_t e = 0; e < load.current_ranks.size(); ++e)
            load.current_ranks[e] = static_cast<int>(e % static_cast<size_t>(tp));
      }
      int64_t tokens = 0;
      for (int64_t count : loads.front().expert_tokens) tokens += count;
      return Response{
          200,
          "# current = " + current + "\n" +
              balanced_placement_file(loads, num_layers_, num_experts_, static_cast<int>(tp),
                                      "the live counters of " + config_.model_name + " (" +
                                          std::to_string(tokens) + " routed token-slots in layer " +
                                          std::to_string(loads.front().layer) + ")"),
          "application/yaml"};
    }
    if (path == "/v1/telemetry/requests") {
      if (method != "GET") return method_error("GET");
      const int64_t limit = query_int(query, "limit", 1000);
      if (limit < 1) return Response{400, "query parameter 'limit' must be >= 1"};
      return json_response(telemetry_->requests_json(static_cast<size_t>(limit)));
    }
    if (path == "/v1/telemetry/steps") {
      if (method != "GET") return method_error("GET");
      return json_response(
          telemetry_->steps_json(query_int(query, "first", 0),
                                 query_int(query, "last", std::numeric_limits<int64_t>::max())));
    }
    if (auto response = profile_->handle(method, path, body)) return response;
  } catch (const Error& error) {
    return Response{400, error.what()};
  }
  return std::nullopt;
}

}  // namespace keel
