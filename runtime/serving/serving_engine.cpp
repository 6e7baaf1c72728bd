#include "runtime/serving/serving_engine.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "kernels/base/check.h"

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
  max_context_ = config_.max_model_len > 0 ? std::min(config_.max_model_len, model_max) : model_max;
  if (config_.model_name.empty())
    config_.model_name = std::filesystem::path(model_dir).filename().string();
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
  local_stats_ = stats_;
  spdlog::info("serving {}: context {}, {} KV blocks of {}, chat template {}", config_.model_name,
               max_context_, config_.scheduler.num_kv_blocks, config_.scheduler.block_size,
               template_.family);
}

ServingEngine::~ServingEngine() = default;

server::ChatTemplate ServingEngine::chat_template() const {
  return [info = template_](const std::vector<server::ChatMessage>& messages) {
    std::vector<ChatTurn> turns;
    turns.reserve(messages.size());
    for (const auto& message : messages) turns.push_back({message.role, message.content});
    return render_chat(info, turns);
  };
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
      return bad_request("prompt token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                             std::to_string(vocab_size_) + ")",
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
  request.max_tokens = static_cast<int>(std::min<int64_t>(request.max_tokens, pool_tokens - prompt_len));
  sampling::SamplingParams params;
  params.temperature = request.temperature;
  params.top_p = request.top_p;
  params.top_k = request.top_k;
  params.num_logprobs = request.logprobs ? request.top_logprobs : 0;
  try {
    params.validate();
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
    if (static_cast<int64_t>(incoming_.size()) + stats_.waiting >= config_.max_waiting) return false;
    incoming_.push_back(Incoming{std::move(request), std::move(sink)});
  }
  wakeup_.notify_one();
  return true;
}

server::BackendHealth ServingEngine::health() const {
  std::lock_guard lock(mutex_);
  if (!failure_.empty()) return {false, failure_};
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

void ServingEngine::set_failed(const std::string& reason) {
  std::vector<Incoming> dropped;
  {
    std::lock_guard lock(mutex_);
    failure_ = reason;
    dropped.swap(incoming_);
  }
  for (Incoming& incoming : dropped) incoming.sink->on_error("the engine failed: " + reason);
  // The step loop has exited (the caller's contract), so its state is ours now.
  for (auto& [seq_id, live] : live_)
    if (!live.ended) live.sink->on_error("the engine failed: " + reason);
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
  local_stats_.preemptions = scheduler_.total_preemptions();
  std::lock_guard lock(mutex_);
  stats_ = local_stats_;
}

void ServingEngine::admit(Incoming incoming) {
  server::CompletionRequest& request = incoming.request;
  const int64_t seq_id = next_seq_id_++;
  Live live;
  live.sink = std::move(incoming.sink);
  live.params.temperature = request.temperature;
  live.params.top_p = request.top_p;
  live.params.top_k = request.top_k;
  live.params.num_logprobs = request.logprobs ? request.top_logprobs : 0;
  live.params.seed = request.seed ? *request.seed : mix64(config_.seed_base ^ mix64(seq_id));
  live.prompt_len = static_cast<int64_t>(request.prompt_tokens->size());
  live.max_new_tokens = request.max_tokens;
  live.decoder = std::make_unique<StreamDecoder>(tokenizer_, /*skip_special_tokens=*/true);
  live.stop = std::move(request.stop);
  Request scheduled;
  scheduled.seq_id = seq_id;
  scheduled.prompt_token_ids = std::move(*request.prompt_tokens);
  scheduled.max_new_tokens = request.max_tokens;
  if (!request.ignore_eos) scheduled.stop_token_ids = stop_token_ids_;
  live.ignore_eos = request.ignore_eos;
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
  std::vector<Incoming> arrived;
  bool stopping = false;
  {
    std::unique_lock lock(mutex_);
    if (incoming_.empty() && !stopping_ && !scheduler_.has_unfinished())
      wakeup_.wait_for(lock, kIdleWait);
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
    step.kind = ServeStep::Kind::kIdle;
    return;
  }
  // The plan as the ranks' StepBatch: sequence i of the plan is row i of the block tables.
  StepBatch& batch = step.batch;
  int64_t max_blocks = 1;
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq)
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(plan_.block_table_of(seq).size()));
  batch.max_blocks_per_seq = max_blocks;
  batch.block_tables.assign(plan_.num_seqs() * static_cast<size_t>(max_blocks), -1);
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    auto table = plan_.block_table_of(seq);
    std::copy(table.begin(), table.end(),
              batch.block_tables.begin() + static_cast<std::ptrdiff_t>(seq) * max_blocks);
    auto ids = plan_.token_ids_of(seq);
    auto positions = plan_.positions_of(seq);
    for (size_t token = 0; token < ids.size(); ++token) {
      batch.token_ids.push_back(ids[token]);
      batch.positions.push_back(static_cast<int32_t>(positions[token]));
      batch.cache_idx.push_back(static_cast<int32_t>(seq));
    }
    if (plan_.needs_logits[seq])
      batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()) - 1);
  }
  step.kind = ServeStep::Kind::kRun;
}

bool ServingEngine::emit(Live& live, const sampling::SampleResult& sample, bool is_last) {
  std::string text = std::move(live.held);
  live.held.clear();
  text += live.decoder->push(sample.token);
  if (is_last) text += live.decoder->finish();
  bool stopped = false;
  if (!live.stop.empty()) {
    size_t first_stop = std::string::npos;
    for (const std::string& stop : live.stop) first_stop = std::min(first_stop, text.find(stop));
    if (first_stop != std::string::npos) {
      text.resize(first_stop);
      stopped = true;
    } else if (!is_last) {
      const size_t hold = held_suffix(text, live.stop);
      live.held = text.substr(text.size() - hold);
      text.resize(text.size() - hold);
    }
  }
  std::vector<server::TopLogprob> top;
  for (const sampling::TokenLogprob& entry : sample.top_logprobs)
    top.push_back({tokenizer_.decode({entry.token}), entry.token, entry.logprob});
  live.sink->on_token(text, sample.token, sample.logprob, top);
  return stopped;
}

void ServingEngine::finish(int64_t seq_id, Live& live, const std::string& reason) {
  (void)seq_id;
  live.ended = true;
  live.sink->on_finish(reason, server::Usage{static_cast<int>(live.prompt_len),
                                             static_cast<int>(live.num_generated)});
  ++local_stats_.requests_finished;
}

void ServingEngine::on_step_done(const std::vector<float>& logits) {
  std::vector<int32_t> sampled;
  std::vector<int64_t> stopped_by_string;
  size_t row = 0;
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    if (!plan_.needs_logits[seq]) continue;
    const int64_t seq_id = plan_.seq_ids[seq];
    Live& live = live_.at(seq_id);
    // The sampled token's absolute position: request-local, so batch-independent.
    const int64_t position = live.prompt_len + live.num_generated;
    const float* row_logits = logits.data() + row * static_cast<size_t>(vocab_size_);
    if (!untokenizable_ids_.empty()) {
      masked_.assign(row_logits, row_logits + vocab_size_);
      for (int32_t id : untokenizable_ids_) masked_[static_cast<size_t>(id)] = -INFINITY;
      row_logits = masked_.data();
    }
    sampling::SampleResult sample =
        sampling::sample(row_logits, vocab_size_, live.params, position);
    ++row;
    sampled.push_back(sample.token);
    ++live.num_generated;
    ++local_stats_.generated_tokens;
    const bool is_stop_token =
        !live.ignore_eos &&
        std::binary_search(stop_token_ids_.begin(), stop_token_ids_.end(), sample.token);
    const bool is_last = is_stop_token || live.num_generated >= live.max_new_tokens;
    if (emit(live, sample, is_last)) stopped_by_string.push_back(seq_id);
  }
  KEEL_CHECK(row * static_cast<size_t>(vocab_size_) == logits.size(), "step returned ",
             logits.size(), " logits for ", row, " rows");
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

}  // namespace keel
