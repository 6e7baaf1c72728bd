#include "runtime/server/http_server.h"

#include <spdlog/spdlog.h>

#include <boost/asio.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <condition_variable>
#include <csignal>
#include <ctime>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/resource.h>

#include "kernels/base/check.h"
#include "runtime/server/chat_output.h"
#include "runtime/server/connection_table.h"
#include "runtime/server/http_request.h"
#include "runtime/server/info_routes.h"

namespace keel::server {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using nlohmann::json;

// Token text may end in the middle of a UTF-8 sequence; never let that throw while rendering.
std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string random_id(const char* prefix) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(rng()));
  return std::string(prefix) + hex;
}

std::string make_chunk(const std::string& payload) {
  char size[32];
  std::snprintf(size, sizeof(size), "%zx\r\n", payload.size());
  return size + payload + "\r\n";
}

// A client's x-request-id becomes the request's id in telemetry, routing records and logs:
// 1..256 visible ASCII characters, so it is safe in every one of them.
bool valid_request_id(std::string_view id) {
  if (id.empty() || id.size() > 256) return false;
  for (char c : id)
    if (c < '!' || c > '~') return false;
  return true;
}

using Clock = std::chrono::steady_clock;

// The targets a reserve connection serves (connection_table.h): cheap, and what an operator
// needs when everything else is busy.
bool is_control_route(const std::string& target) {
  return target == "/health" || target == "/metrics";
}

// Sockets the limits can hold, plus room for the process's other descriptors (model files,
// pipes, the epoll set, MPI). Raises the soft limit up to the hard one when that is enough.
void ensure_descriptor_limit(const HttpServerConfig& config) {
  const rlim_t needed =
      static_cast<rlim_t>(config.max_connections) + config.reserved_connections + 64;
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= needed) return;
  if (limit.rlim_max == RLIM_INFINITY || limit.rlim_max >= needed) {
    rlimit raised = limit;
    raised.rlim_cur = needed;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) return;
  }
  throw_error("server: max_connections ", config.max_connections, " + reserved_connections ",
              config.reserved_connections, " need about ", needed,
              " file descriptors, but the limit is ", limit.rlim_cur, " (hard limit ",
              limit.rlim_max, "; see ulimit -n): lower max_connections or raise the limit");
}

RequestError make_error(int status, std::string message, std::string type, std::string code = "") {
  RequestError error;
  error.status = status;
  error.message = std::move(message);
  error.type = std::move(type);
  error.code = std::move(code);
  return error;
}

}  // namespace

class Session;

struct HttpServer::Impl {
  Impl(HttpServerConfig config_in, GenerationBackend& backend_in)
      : config(std::move(config_in)),
        backend(backend_in),
        table(config.max_connections, config.reserved_connections, config.slow_request_grace) {}

  void request_done() {
    {
      std::lock_guard lock(mutex);
      --in_flight;
    }
    idle_cv.notify_all();
  }

  void accept_next();

  // Declared before the io_context: sessions destroyed with it still update these.
  HttpServerConfig config;
  GenerationBackend& backend;
  std::mutex mutex;
  std::condition_variable idle_cv;
  int in_flight = 0;
  std::atomic<int> connections{0};
  std::atomic<bool> accepting{true};
  std::atomic<bool> stop_now{false};  // a second signal: fail what is in flight, now
  ConnectionTable table;
  std::atomic<int64_t> evicted_idle{0}, evicted_slow{0}, refused{0}, reserve_refused{0},
      slow_reader_aborts{0};
  uint64_t next_session_id = 0;
  std::unordered_map<uint64_t, std::weak_ptr<Session>> sessions;

  net::io_context ioc;
  // SIGINT/SIGTERM watcher, installed by catch_signals() (or run_until_signal()).
  std::unique_ptr<net::signal_set> signals;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;
  std::vector<std::thread> threads;
  bool running = false;
};

namespace {

// Bridges backend threads to a session's strand. Holds the session weakly: once the connection
// is gone the callbacks have nowhere to go, and cancelled() says so. Events carry the session's
// generation number, so a late callback can never land on the connection's next request. The
// cancel flag is shared with the session, which does not own the sink: when the backend drops
// the sink without a final call, the destructor turns that into an error for the client.
class SessionSink : public TokenSink {
 public:
  SessionSink(std::weak_ptr<Session> session, uint64_t generation, size_t choice_index,
              std::shared_ptr<std::atomic<bool>> cancelled)
      : session_(std::move(session)),
        generation_(generation),
        choice_index_(choice_index),
        cancelled_(std::move(cancelled)) {}
  ~SessionSink() override;

  void on_prompt(const PromptOutput& prompt) override;
  void on_token(const GeneratedToken& token) override;
  void on_finish(const std::string& finish_reason, Usage usage) override;
  void on_finish_with(const std::string& finish_reason, Usage usage, json choice_fields) override;
  void on_error(const std::string& message) override;
  void on_unavailable(const std::string& message) override;
  bool cancelled() const override { return cancelled_->load(std::memory_order_acquire); }

 private:
  template <typename Fn>
  void deliver(Fn fn);

  // No executor copy here: a strand handle outliving the io_context (the backend may release
  // the sink after the server is gone) would touch freed service state.
  std::weak_ptr<Session> session_;
  uint64_t generation_;
  size_t choice_index_;  // which prompt of the request (0 unless a batch)
  std::shared_ptr<std::atomic<bool>> cancelled_;
  bool ended_ = false;  // on_finish or on_error was called
};

}  // namespace

class Session : public std::enable_shared_from_this<Session> {
  // What the response says for one prompt, gathered until it finishes.
  struct Choice {
    std::string text;           // non-streamed text so far
    size_t text_offset = 0;     // bytes of text produced so far (logprobs' text_offset)
    json logprobs;              // non-streamed logprobs so far
    json prompt_logprobs;       // vLLM's prompt_logprobs, when asked for
    bool counts_prompt = true;  // false for choices 1..n-1 of a prompt: usage counts it once
    bool finished = false;
    json body;  // the finished choice (non-streamed), waiting for the others
    // Chat with reasoning or tool parsing, streamed: turns text deltas into message deltas.
    std::shared_ptr<ChatOutputStream> output_stream;
    size_t num_tool_calls = 0;  // tool calls streamed so far
  };

 public:
  Session(HttpServer::Impl& server, tcp::socket socket)
      : server_(server), stream_(std::move(socket)), accepted_at_(Clock::now()) {
    server_.connections.fetch_add(1);
  }
  ~Session() {
    server_.connections.fetch_sub(1);
    server_.table.remove(id_);
    std::lock_guard lock(server_.mutex);
    server_.sessions.erase(id_);
  }

  void start(uint64_t id, Admission::Verdict verdict) {
    id_ = id;
    if (verdict == Admission::Verdict::kRefused) {
      // Even the reserve is taken: answer without reading, then let the client finish sending
      // before closing (a close with its request unread would reset the connection, and the
      // reset can overtake the answer).
      keep_alive_ = false;
      refused_ = true;
      send_error(make_error(429,
                            "too many concurrent connections: every connection is busy; retry "
                            "later",
                            "rate_limit_error", "too_many_connections"),
                 /*retry_after=*/true);
      return;
    }
    reserve_ = verdict == Admission::Verdict::kReserve;
    if (reserve_) keep_alive_ = false;
    do_read();
  }

  net::any_io_executor executor() { return stream_.get_executor(); }

  // Shutdown, step 1: connections waiting for a request are closed; busy ones finish first.
  // Also how the connection table's victim goes (it held a slot without work).
  void close_if_idle() {
    if (state_ == State::kReading) close();
  }

  // Shutdown, step 2 (drain deadline): fail whatever is still generating.
  void abort(const std::string& message) {
    if (state_ != State::kGenerating) return;
    cancel_backend();
    keep_alive_ = false;
    finish_with_error(message, 503);
  }

  uint64_t generation() const { return generation_; }

  // Sink events, always on the strand.
  void prompt(size_t index, const PromptOutput& prompt) {
    if (state_ != State::kGenerating) return;
    Choice& state = choices_.at(index);
    if (request_.prompt_logprobs) state.prompt_logprobs = prompt_logprobs_json(prompt);
    if (!request_.echo) return;
    // Echo: the prompt's text comes first, and with logprobs its tokens' entries (the first
    // token has no logprob, as in OpenAI's and vLLM's answers).
    json entry = initial_logprobs();
    size_t offset = state.text_offset;
    for (const PromptToken& token : prompt.tokens) {
      entry["tokens"].push_back(token_name(token.token_id, token.text));
      entry["token_logprobs"].push_back(token.logprob ? json(*token.logprob) : json(nullptr));
      if (token.logprob) {
        json alternatives = json::object();
        for (size_t i = 0;
             i < token.top_logprobs.size() && static_cast<int>(i) < request_.top_logprobs; ++i)
          alternatives[token_name(token.top_logprobs[i].token_id, token.top_logprobs[i].token)] =
              token.top_logprobs[i].logprob;
        entry["top_logprobs"].push_back(alternatives);
      } else {
        entry["top_logprobs"].push_back(nullptr);
      }
      entry["text_offset"].push_back(offset);
      offset += token.text.size();
    }
    if (request_.stream) {
      json choice = {{"index", index},
                     {"text", prompt.text},
                     {"logprobs", request_.logprobs ? entry : json(nullptr)},
                     {"finish_reason", nullptr}};
      enqueue(event(dump(chunk_envelope(json::array({choice})))));
    } else {
      state.text += prompt.text;
      if (request_.logprobs)
        for (auto& [key, values] : entry.items())
          for (auto& value : values) state.logprobs[key].push_back(std::move(value));
    }
    state.text_offset += prompt.text.size();
  }

  void token(size_t index, const GeneratedToken& token) {
    if (state_ != State::kGenerating) return;
    Choice& state = choices_.at(index);
    const std::string& delta = token.text_delta;
    if (request_.stream) {
      json choice = {{"index", index}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
      if (request_.logprobs) choice["logprobs"] = logprobs_for(token, state.text_offset);
      state.text_offset += delta.size();
      if (is_chat() && state.output_stream) {
        choice["delta"] = delta_json(state, state.output_stream->feed(delta));
        // Held-back text sends nothing now, unless the token's logprobs are asked for.
        if (choice["delta"].empty() && !request_.logprobs) return;
      } else if (is_chat()) {
        choice["delta"] = {{"content", delta}};
      } else {
        choice["text"] = delta;
      }
      enqueue(event(dump(chunk_envelope(json::array({choice})))));
    } else {
      if (request_.logprobs) append_logprobs(state, token);
      state.text += delta;
      state.text_offset += delta.size();
    }
  }

  // Prompt `index` finished; the response is complete when every prompt has.
  void finish(size_t index, const std::string& finish_reason, Usage usage,
              const json& choice_fields = json::object()) {
    if (state_ != State::kGenerating) return;
    Choice& state = choices_.at(index);
    if (state.finished) return;
    state.finished = true;
    ++num_finished_;
    if (state.counts_prompt) usage_.prompt_tokens += usage.prompt_tokens;
    usage_.completion_tokens += usage.completion_tokens;
    const bool last = num_finished_ == choices_.size();
    json usage_json = {{"prompt_tokens", usage_.prompt_tokens},
                       {"completion_tokens", usage_.completion_tokens},
                       {"total_tokens", usage_.prompt_tokens + usage_.completion_tokens}};
    if (request_.stream) {
      std::string reason = finish_reason;
      json last_delta = json::object();
      if (is_chat() && state.output_stream) {
        // What was held back (a tag that never completed, the tool calls) goes out now.
        last_delta = delta_json(state, state.output_stream->finish());
        if (state.num_tool_calls > 0) reason = "tool_calls";
      }
      json choice = {{"index", index}, {"logprobs", nullptr}, {"finish_reason", reason}};
      if (is_chat()) {
        choice["delta"] = std::move(last_delta);
      } else {
        choice["text"] = "";
      }
      for (const auto& [key, value] : choice_fields.items()) choice[key] = value;
      enqueue(event(dump(chunk_envelope(json::array({choice})))));
      if (!last) return;
      if (request_.include_usage_in_stream) {
        json usage_chunk = chunk_envelope(json::array());
        usage_chunk["usage"] = usage_json;
        enqueue(event(dump(usage_chunk)));
      }
      end_stream();
      return;
    }
    json choice = {{"index", index}, {"finish_reason", finish_reason}, {"logprobs", nullptr}};
    if (request_.logprobs) choice["logprobs"] = std::move(state.logprobs);
    if (is_chat() && output_options_.parses()) {
      choice["message"] = message_json(parse_chat_output(state.text, output_options_));
      if (choice["message"].contains("tool_calls")) choice["finish_reason"] = "tool_calls";
    } else if (is_chat()) {
      choice["message"] = {{"role", "assistant"}, {"content", state.text}};
    } else {
      choice["text"] = state.text;
      // vLLM puts a completion's prompt_logprobs on its choice, a chat's on the response.
      if (request_.prompt_logprobs) choice["prompt_logprobs"] = state.prompt_logprobs;
    }
    for (const auto& [key, value] : choice_fields.items()) choice[key] = value;
    state.body = std::move(choice);
    if (!last) return;
    json choices = json::array();
    for (Choice& each : choices_) choices.push_back(std::move(each.body));
    json body = {{"id", completion_id_},
                 {"object", is_chat() ? "chat.completion" : "text_completion"},
                 {"created", created_},
                 {"model", model_},
                 {"system_fingerprint", system_fingerprint()},
                 {"choices", std::move(choices)},
                 {"usage", usage_json}};
    if (is_chat() && request_.prompt_logprobs)
      body["prompt_logprobs"] = choices_[0].prompt_logprobs;
    state_ = State::kWriting;
    send(http::status::ok, dump(body));
  }

  // One prompt failed: the response fails, and the batch's other prompts stop too.
  void error(const std::string& message, int status = 500) {
    if (state_ != State::kGenerating) return;
    cancel_backend();
    finish_with_error(message, status);
  }

 private:
  enum class State { kReading, kGenerating, kWriting, kClosed };

  bool is_chat() const { return request_.endpoint == Endpoint::kChatCompletions; }

  void do_read() {
    if (!server_.accepting.load()) {
      close();
      return;
    }
    state_ = State::kReading;
    head_request_ = false;  // a request's own: errors before the next one is read carry none
    client_request_id_.clear();
    response_request_id_.clear();
    parser_.emplace();
    parser_->body_limit(server_.config.max_body_bytes);
    if (buffer_.size() > 0) {  // a pipelined request has begun to arrive already
      read_header(Clock::now() + server_.config.header_timeout);
      return;
    }
    // Idle until the request's first byte: a new connection must have its headers in within
    // the header timeout of connecting, a kept-alive one may wait the idle timeout first.
    server_.table.set_phase(id_, ConnectionPhase::kIdle, Clock::now());
    const bool fresh = num_requests_ == 0;
    if (fresh) {
      stream_.expires_at(accepted_at_ + server_.config.header_timeout);
    } else {
      stream_.expires_after(server_.config.idle_timeout);
    }
    stream_.async_read_some(
        buffer_.prepare(4096), [self = shared_from_this(), fresh](beast::error_code ec, size_t n) {
          if (ec) return self->close();  // hang-up, idle timeout or closed to make room
          self->buffer_.commit(n);
          self->read_header(fresh ? self->accepted_at_ + self->server_.config.header_timeout
                                  : Clock::now() + self->server_.config.header_timeout);
        });
  }

  void read_header(Clock::time_point deadline) {
    server_.table.set_phase(id_, ConnectionPhase::kReading, Clock::now());
    stream_.expires_at(deadline);
    // Header first, so an oversized Content-Length is refused before the body is sent and
    // "Expect: 100-continue" clients (curl) are not kept waiting.
    http::async_read_header(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
  }

  void on_header(beast::error_code ec) {
    if (ec) return on_read_error(ec);
    auto& req = parser_->get();
    stream_.expires_after(server_.config.body_timeout);
    if (auto it = req.find(http::field::expect);
        it != req.end() && beast::iequals(it->value(), "100-continue")) {
      auto cont = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
      net::async_write(stream_, net::buffer(*cont),
                       [self = shared_from_this(), cont](beast::error_code wec, size_t) {
                         if (wec) return self->close();
                         self->read_body();
                       });
      return;
    }
    read_body();
  }

  void read_body() {
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (ec) return self->on_read_error(ec);
                       self->handle_request();
                     });
  }

  void on_read_error(beast::error_code ec) {
    if (ec == http::error::body_limit) {
      keep_alive_ = false;
      send_error(make_error(
          413, "request body exceeds " + std::to_string(server_.config.max_body_bytes) + " bytes",
          "invalid_request_error", "body_too_large"));
      return;
    }
    if (ec.category() == beast::error_code(http::error::end_of_stream).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message) {
      // Malformed HTTP (bad start line, header syntax, ...).
      keep_alive_ = false;
      send_error(
          make_error(400, "malformed HTTP request: " + ec.message(), "invalid_request_error"));
      return;
    }
    // end of stream, timeout, reset: nobody to answer.
    close();
  }

  void handle_request() {
    http::request<http::string_body> req = parser_->release();
    const std::string method(req.method_string());
    parser_.reset();
    ++num_requests_;
    server_.table.set_phase(id_, ConnectionPhase::kBusy, Clock::now());
    version_ = req.version();
    keep_alive_ = req.keep_alive() && server_.accepting.load() && !reserve_;
    head_request_ = req.method() == http::verb::head;  // answered without a body
    client_request_id_ = std::string(req["x-request-id"]);
    response_request_id_ = client_request_id_.empty() ? random_id("req-") : client_request_id_;
    RequestTarget split = split_target(std::string(req.target()));
    std::string target = std::move(split.path);
    const std::string query_string = std::move(split.query);
    if (reserve_ && !is_control_route(target)) {
      // Every regular connection is busy with a request: this one only serves the control
      // routes. Past capacity is a rate limit, as max_waiting's.
      ++server_.reserve_refused;
      send_error(
          make_error(429, "too many concurrent requests: every connection is busy; retry later",
                     "rate_limit_error", "too_many_connections"),
          /*retry_after=*/true);
      return;
    }

    auto require = [&](http::verb verb, http::verb also = http::verb::unknown) {
      if (req.method() == verb || (also != http::verb::unknown && req.method() == also))
        return true;
      const std::string allowed(http::to_string(verb));
      send_error(method_not_allowed(method, target, allowed), false, allowed);
      return false;
    };
    if (!client_request_id_.empty() && !valid_request_id(client_request_id_)) {
      response_request_id_ = random_id("req-");
      send_error(make_error(400,
                            "the x-request-id header must be 1 to 256 visible ASCII characters",
                            "invalid_request_error"));
      return;
    }
    if (auto denied = check_api_key(server_.config.auth, target,
                                    std::string(req[http::field::authorization]))) {
      send_error(*denied);
      return;
    }

    try {
      if (target == "/v1/completions" || target == "/v1/chat/completions") {
        if (!require(http::verb::post)) return;
        start_generation(req.body(), target == "/v1/completions" ? Endpoint::kCompletions
                                                                 : Endpoint::kChatCompletions);
      } else if (auto info = serve_info_route(method, target, req.body(), server_.backend,
                                              server_.config.chat_template)) {
        if (info->error) {
          send_error(*info->error, false, info->allow);
        } else {
          send(static_cast<http::status>(info->status), std::move(info->body));
        }
      } else if (target == "/health" || target == "/ping") {
        // HEAD for load balancers; /ping (vLLM's, for SageMaker) also takes POST.
        if (!head_request_ &&
            !require(http::verb::get, target == "/ping" ? http::verb::post : http::verb::head))
          return;
        BackendHealth health = server_.backend.health();
        if (!health.healthy) {
          send_error(make_error(503, "backend unhealthy: " + health.detail, "server_error",
                                "backend_unhealthy"),
                     true);
          return;
        }
        send(http::status::ok, dump(json{{"status", "ok"}, {"detail", health.detail}}));
      } else if (target == "/metrics") {
        if (!require(http::verb::get)) return;
        std::string text = server_.config.metrics ? server_.config.metrics() : std::string();
        send(http::status::ok, std::move(text), "text/plain; version=0.0.4");
      } else if (auto extra = server_.config.extra_routes
                                  ? server_.config.extra_routes(std::string(req.method_string()),
                                                                target, query_string, req.body())
                                  : std::nullopt) {
        if (extra->status >= 400) {
          RequestError error =
              make_error(extra->status, extra->body,
                         extra->status >= 500 ? "server_error" : "invalid_request_error");
          send_error(error);
        } else {
          send(static_cast<http::status>(extra->status), std::move(extra->body),
               extra->content_type);
        }
      } else {
        send_error(
            make_error(404, "no endpoint " + target, "invalid_request_error", "unknown_url"));
      }
    } catch (const std::exception& e) {
      // A throwing backend or hook must not take the server down; the client gets a 500.
      spdlog::error("server: {} {}: {}", std::string(req.method_string()), target, e.what());
      if (state_ == State::kReading) {
        send_error(make_error(500, std::string("internal error: ") + e.what(), "server_error"));
      }
    }
  }

  void start_generation(const std::string& body, Endpoint endpoint) {
    BackendHealth health = server_.backend.health();
    if (!health.healthy && !health.stalled_only) {
      send_error(make_error(503, "backend unhealthy: " + health.detail, "server_error",
                            "backend_unhealthy"),
                 true);
      return;
    }
    CompletionRequest request;
    if (auto error =
            parse_completion_request(body, endpoint, server_.backend.max_context(), request)) {
      send_error(*error);
      return;
    }
    model_ = server_.backend.model_name();
    if (!serves_model(server_.backend, request.model)) {
      send_error(model_not_found(server_.backend, request.model));
      return;
    }
    if (endpoint == Endpoint::kChatCompletions) {
      if (auto error = check_chat_capabilities(request)) {
        send_error(*error);
        return;
      }
      try {
        request.prompt_text = server_.config.chat_template ? server_.config.chat_template(request)
                                                           : render_chatml(request.messages);
      } catch (const Error& error) {
        // The template refuses this conversation (as transformers' raise_exception would).
        RequestError refused = make_error(400, error.what(), "invalid_request_error");
        refused.param = "messages";
        send_error(refused);
        return;
      }
      output_options_ = chat_output_options(request);
      // vLLM's hermes parser reads the tags even where a tokenizer marks them special.
      if (output_options_.tool_calls == ToolCallFormat::kHermesJson)
        request.skip_special_tokens = false;
    } else {
      output_options_ = ChatOutputOptions{};
    }
    // With the client's x-request-id, the response id is it with the endpoint's prefix (as vLLM
    // does) and telemetry names the request by it exactly.
    const char* id_prefix = endpoint == Endpoint::kChatCompletions ? "chatcmpl-" : "cmpl-";
    completion_id_ =
        client_request_id_.empty() ? random_id(id_prefix) : id_prefix + client_request_id_;
    const std::string base_request_id =
        client_request_id_.empty() ? completion_id_ : client_request_id_;
    response_request_id_ = base_request_id;
    // One request per prompt (a batch has several); each carries every field but its prompt.
    std::vector<PromptInput> more_prompts = std::move(request.more_prompts);
    request.more_prompts.clear();
    std::vector<CompletionRequest> requests;
    requests.push_back(request);
    for (PromptInput& prompt : more_prompts) {
      CompletionRequest next = request;
      next.prompt_tokens = std::move(prompt.tokens);
      next.prompt_text = std::move(prompt.text);
      requests.push_back(std::move(next));
    }
    for (size_t index = 0; index < requests.size(); ++index) {
      // The backend tokenizes and checks what only it can (prompt length against the context).
      if (auto error = server_.backend.prepare(requests[index])) {
        if (requests.size() > 1 && error->param == "prompt") {
          error->param = "prompt[" + std::to_string(index) + "]";
          error->message = "prompt " + std::to_string(index) + " of the batch: " + error->message;
        }
        send_error(*error);
        return;
      }
    }
    // n choices per prompt: choice p * n + j is prompt p's request with seed + j (vLLM's rule),
    // so each is reproducible alone; unseeded choices get seeds of their own from the backend.
    const size_t num_samples = static_cast<size_t>(std::max(1, request.n));
    std::vector<CompletionRequest> choices;
    choices.reserve(requests.size() * num_samples);
    for (CompletionRequest& prompt_request : requests) {
      for (size_t sample = 0; sample < num_samples; ++sample) {
        CompletionRequest child = prompt_request;
        child.n = 1;
        if (child.seed) child.seed = *child.seed + sample;
        choices.push_back(std::move(child));
      }
    }
    requests = std::move(choices);
    for (size_t index = 0; index < requests.size(); ++index) {
      // A batch's choices have ids of their own (telemetry, routing records) under the
      // response's id.
      requests[index].request_id =
          requests.size() == 1 ? base_request_id : base_request_id + "-" + std::to_string(index);
    }
    request_ = requests.front();
    request_.n = static_cast<int>(num_samples);
    created_ = static_cast<int64_t>(std::time(nullptr));
    choices_.assign(requests.size(), Choice{});
    for (size_t index = 0; index < choices_.size(); ++index) {
      choices_[index].logprobs = initial_logprobs();
      choices_[index].counts_prompt = index % num_samples == 0;
      if (request_.stream && output_options_.parses())
        choices_[index].output_stream = std::make_shared<ChatOutputStream>(output_options_);
    }
    num_finished_ = 0;
    usage_ = Usage{};

    ++generation_;
    cancel_flag_ = std::make_shared<std::atomic<bool>>(false);
    {
      std::lock_guard lock(server_.mutex);
      ++server_.in_flight;
    }
    counted_in_flight_ = true;
    // Generating before submit: the backend may call the sink at once, and those calls are
    // posted to this strand, so they run only after this handler returns.
    state_ = State::kGenerating;
    self_ = shared_from_this();
    for (size_t index = 0; index < requests.size(); ++index) {
      // One cancel flag for the batch: a hang-up or a failed prompt stops them all.
      auto sink = std::make_shared<SessionSink>(weak_from_this(), generation_, index, cancel_flag_);
      bool accepted = false;
      try {
        accepted = server_.backend.try_submit(std::move(requests[index]), sink);
      } catch (...) {
        abandon_generation();
        throw;
      }
      if (!accepted) {
        // Prompts already queued are cancelled with the flag (their blocks freed at the
        // engine's next step); the client retries the whole request.
        abandon_generation();
        send_error(make_error(429, "the generation queue is full; retry later", "rate_limit_error",
                              "queue_full"),
                   true);
        return;
      }
    }
    if (request_.stream) {
      // HTTP/1.0 has no chunked encoding: its stream ends when the connection closes.
      if (version_ < 11) keep_alive_ = false;
      enqueue(std::string(version_ >= 11 ? "HTTP/1.1" : "HTTP/1.0") +
              " 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n" +
              "x-request-id: " + response_request_id_ + "\r\n" +
              (version_ >= 11 ? "Transfer-Encoding: chunked\r\n" : "") +
              (keep_alive_ ? "Connection: keep-alive\r\n" : "Connection: close\r\n") + "\r\n");
      if (is_chat()) {
        for (size_t index = 0; index < choices_.size(); ++index) {
          json choice = {{"index", index},
                         {"delta", {{"role", "assistant"}, {"content", ""}}},
                         {"logprobs", nullptr},
                         {"finish_reason", nullptr}};
          enqueue(event(dump(chunk_envelope(json::array({choice})))));
        }
      }
    }
    watch_for_disconnect();
  }

  // Undo the bookkeeping of a generation that never reached the backend.
  void abandon_generation() {
    cancel_backend();  // the sink's destructor then stays quiet
    end_generation();
    state_ = State::kReading;
  }

  // While generating, a read stays pending: EOF or reset means the client left. Bytes that do
  // arrive (a pipelined request) stay in buffer_ for the next read.
  void watch_for_disconnect() {
    if (watch_pending_ || buffer_.size() > 64 * 1024) return;
    watch_pending_ = true;
    // Generation time is not bounded: the read that watches for a hang-up never times out
    // (only this read's timer is set while a write is pending; flush() sets the write's).
    stream_.expires_never();
    stream_.async_read_some(
        buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
          self->watch_pending_ = false;
          if (ec == net::error::operation_aborted && self->resume_read_after_watch_ &&
              self->state_ == State::kReading) {
            // Cancelled by response_done to hand the socket back to the request reader.
            self->resume_read_after_watch_ = false;
            self->do_read();
            return;
          }
          if (ec) {
            if (self->state_ == State::kGenerating || self->state_ == State::kWriting) {
              self->client_gone();
            } else {
              self->close();
            }
            return;
          }
          self->buffer_.commit(n);
          if (self->state_ == State::kGenerating || self->state_ == State::kWriting) {
            self->watch_for_disconnect();
          } else if (self->resume_read_after_watch_) {
            self->resume_read_after_watch_ = false;
            self->do_read();
          }
        });
  }

  void client_gone() { close(); }

  // Idempotent: a request leaves the in-flight count exactly once, however it ends.
  void end_generation() {
    if (!counted_in_flight_) return;
    counted_in_flight_ = false;
    cancel_flag_.reset();
    server_.request_done();
    // Last: may drop the final reference; the caller's handler still holds one.
    self_.reset();
  }

  void finish_with_error(const std::string& message, int status) {
    if (request_.stream) {
      json error = error_body(make_error(status, message, "server_error"));
      enqueue(event(dump(error)));
      end_stream();
      return;
    }
    state_ = State::kWriting;
    send_error(make_error(status, message, "server_error"), status == 503);
  }

  void end_stream() {
    enqueue(event("[DONE]"));
    if (version_ >= 11) enqueue("0\r\n\r\n");
    state_ = State::kWriting;
    response_complete_ = true;
    flush();
  }

  // One server-sent event, framed for the connection's HTTP version.
  std::string event(const std::string& data) const {
    std::string payload = "data: " + data + "\n\n";
    return version_ >= 11 ? make_chunk(payload) : payload;
  }

  // Request fields the model's template cannot honour are refused before anything runs.
  std::optional<RequestError> check_chat_capabilities(const CompletionRequest& request) const {
    const ChatCapabilities& caps = server_.config.chat_capabilities;
    auto refuse = [&](const std::string& field, const std::string& what) {
      RequestError error = make_error(400, "'" + field + "': " + what, "invalid_request_error");
      error.param = field;
      return error;
    };
    if (!request.tools.empty() && caps.tool_calls == ToolCallFormat::kNone)
      return refuse("tools", "this model's chat template (" + caps.template_family +
                                 ") does not render tools; keel renders them for Qwen3's and "
                                 "Qwen3.5's templates");
    if (request.enable_thinking && !caps.thinking_switch)
      return refuse(
          "chat_template_kwargs.enable_thinking",
          "this model's chat template (" + caps.template_family + ") has no thinking switch");
    return std::nullopt;
  }

  ChatOutputOptions chat_output_options(const CompletionRequest& request) const {
    const ChatCapabilities& caps = server_.config.chat_capabilities;
    ChatOutputOptions options;
    options.reasoning = caps.reasoning;
    options.thinking_enabled = request.enable_thinking.value_or(caps.thinking_default);
    options.include_reasoning = request.include_reasoning;
    if (!request.tools.empty() && request.tool_choice == ToolChoice::kAuto) {
      options.tool_calls = caps.tool_calls;
      options.tools = request.tools;
    }
    return options;
  }

  // OpenAI's tool call object; the id is made here (vLLM: "chatcmpl-tool-" + random hex).
  static json tool_call_json(const ParsedToolCall& call) {
    return {{"id", random_id("chatcmpl-tool-")},
            {"type", "function"},
            {"function", {{"name", call.name}, {"arguments", call.arguments}}}};
  }

  // parallel_tool_calls: false keeps the first call only.
  size_t allowed_tool_calls(size_t num_calls) const {
    return request_.parallel_tool_calls ? num_calls : std::min<size_t>(num_calls, 1);
  }

  json message_json(const ChatOutputMessage& message) const {
    json out = {{"role", "assistant"}};
    out["content"] = message.content ? json(*message.content) : json(nullptr);
    if (output_options_.reasoning)
      out["reasoning_content"] = message.reasoning ? json(*message.reasoning) : json(nullptr);
    if (!message.tool_calls.empty()) {
      out["tool_calls"] = json::array();
      for (size_t i = 0; i < allowed_tool_calls(message.tool_calls.size()); ++i)
        out["tool_calls"].push_back(tool_call_json(message.tool_calls[i]));
    }
    return out;
  }

  // A streamed message delta: reasoning_content, content and whole tool calls with their index.
  json delta_json(Choice& state, const ChatOutputDelta& delta) const {
    json out = json::object();
    if (!delta.reasoning.empty()) out["reasoning_content"] = delta.reasoning;
    if (!delta.content.empty()) out["content"] = delta.content;
    for (const ParsedToolCall& call : delta.tool_calls) {
      if (state.num_tool_calls >= allowed_tool_calls(state.num_tool_calls + 1)) break;
      json entry = tool_call_json(call);
      entry["index"] = state.num_tool_calls++;
      out["tool_calls"].push_back(std::move(entry));
    }
    return out;
  }

  json chunk_envelope(json choices) const {
    return json{{"id", completion_id_},
                {"object", is_chat() ? "chat.completion.chunk" : "text_completion"},
                {"created", created_},
                {"model", model_},
                {"system_fingerprint", system_fingerprint()},
                {"choices", std::move(choices)}};
  }

  json system_fingerprint() const {
    const std::string& fingerprint = server_.config.system_fingerprint;
    return fingerprint.empty() ? json(nullptr) : json(fingerprint);
  }

  json initial_logprobs() const {
    if (is_chat()) return json{{"content", json::array()}};
    return json{{"tokens", json::array()},
                {"token_logprobs", json::array()},
                {"top_logprobs", json::array()},
                {"text_offset", json::array()}};
  }

  static json bytes_of(const std::string& text) {
    json bytes = json::array();
    for (unsigned char c : text) bytes.push_back(static_cast<int>(c));
    return bytes;
  }

  // How logprobs name a token: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids,
  // for clients that must tell apart tokens with the same or no printable text).
  std::string token_name(int32_t token_id, const std::string& text) const {
    return request_.return_tokens_as_token_ids ? "token_id:" + std::to_string(token_id) : text;
  }

  // One generated position's logprobs in the endpoint's format. Chat's "bytes" are the token's
  // own bytes (a token may hold part of a UTF-8 character; concatenating them gives the text).
  json logprobs_for(const GeneratedToken& token, size_t text_offset) const {
    json entry = initial_logprobs();
    const std::vector<TopLogprob>& top = token.top_logprobs;
    if (is_chat()) {
      json alternatives = json::array();
      for (size_t i = 0; i < top.size() && static_cast<int>(i) < request_.top_logprobs; ++i) {
        alternatives.push_back({{"token", token_name(top[i].token_id, top[i].token)},
                                {"logprob", top[i].logprob},
                                {"bytes", bytes_of(top[i].bytes)}});
      }
      entry["content"].push_back({{"token", token_name(token.token_id, token.token_text)},
                                  {"logprob", token.logprob},
                                  {"bytes", bytes_of(token.token_bytes)},
                                  {"top_logprobs", alternatives}});
    } else {
      json alternatives = json::object();
      for (size_t i = 0; i < top.size() && static_cast<int>(i) < request_.top_logprobs; ++i) {
        alternatives[token_name(top[i].token_id, top[i].token)] = top[i].logprob;
      }
      entry["tokens"].push_back(token_name(token.token_id, token.token_text));
      entry["token_logprobs"].push_back(token.logprob);
      entry["top_logprobs"].push_back(alternatives);
      entry["text_offset"].push_back(text_offset);
    }
    return entry;
  }

  void append_logprobs(Choice& choice, const GeneratedToken& token) {
    json entry = logprobs_for(token, choice.text_offset);
    for (auto& [key, values] : entry.items()) {
      for (auto& value : values) choice.logprobs[key].push_back(std::move(value));
    }
  }

  // vLLM's prompt_logprobs: null for the first prompt token, then per token an object keyed by
  // token id: the prompt token itself and the top alternatives, each {logprob, rank,
  // decoded_token}.
  json prompt_logprobs_json(const PromptOutput& prompt) const {
    json entries = json::array();
    for (const PromptToken& token : prompt.tokens) {
      if (!token.logprob) {
        entries.push_back(nullptr);
        continue;
      }
      json entry = json::object();
      for (size_t i = 0; i < token.top_logprobs.size(); ++i) {
        const TopLogprob& alternative = token.top_logprobs[i];
        entry[std::to_string(alternative.token_id)] = {
            {"logprob", alternative.logprob},
            {"rank", i + 1},
            {"decoded_token", token_name(alternative.token_id, alternative.token)}};
      }
      // The prompt token itself, with its own rank (it may also be among the alternatives).
      entry[std::to_string(token.token_id)] = {
          {"logprob", *token.logprob},
          {"rank", token.rank},
          {"decoded_token", token_name(token.token_id, token.text)}};
      entries.push_back(std::move(entry));
    }
    return entries;
  }

  void send_error(const RequestError& error, bool retry_after = false,
                  const std::string& allow = "") {
    std::vector<std::pair<http::field, std::string>> headers;
    if (retry_after) {
      headers.emplace_back(http::field::retry_after,
                           std::to_string(server_.config.retry_after_seconds));
    }
    if (!allow.empty()) headers.emplace_back(http::field::allow, allow);
    if (error.status == 401) headers.emplace_back(http::field::www_authenticate, "Bearer");
    send(static_cast<http::status>(error.status), dump(error_body(error)), "application/json",
         headers);
  }

  void send(http::status status, std::string body,
            const std::string& content_type = "application/json",
            const std::vector<std::pair<http::field, std::string>>& headers = {}) {
    http::response<http::string_body> res{status, version_ ? version_ : 11};
    res.set(http::field::server, "keel");
    res.set(http::field::content_type, content_type);
    for (const auto& [field, value] : headers) res.set(field, value);
    res.set("x-request-id",
            response_request_id_.empty() ? random_id("req-") : response_request_id_);
    res.keep_alive(keep_alive_ && server_.accepting.load());
    res.body() = std::move(body);
    res.prepare_payload();
    if (head_request_) {
      // HEAD: the headers GET would send (Content-Length included), no body.
      const size_t length = res.body().size();
      res.body().clear();
      res.content_length(length);
    }
    std::ostringstream out;
    out << res;
    if (state_ == State::kReading) state_ = State::kWriting;
    response_complete_ = true;
    enqueue(out.str());
  }

  void enqueue(std::string bytes) {
    if (state_ == State::kClosed) return;
    unsent_bytes_ += bytes.size();
    write_queue_.push_back(std::move(bytes));
    if (state_ == State::kGenerating && unsent_bytes_ > server_.config.max_unsent_bytes) {
      abort_stalled_reader();
      return;
    }
    flush();
  }

  // The client stopped reading a stream: keeping on generating into its socket would hold a
  // running slot and grow this queue without bound. Cancel (the backend frees the request and
  // counts it aborted) and close; the client is not reading, so no error could reach it.
  void abort_stalled_reader() {
    ++server_.slow_reader_aborts;
    spdlog::warn(
        "server: the client of {} stopped reading ({} bytes unsent, limit {}); "
        "cancelling the request",
        completion_id_, unsent_bytes_, server_.config.max_unsent_bytes);
    close();
  }

  void flush() {
    if (writing_ || state_ == State::kClosed) return;
    if (write_queue_.empty()) {
      if (response_complete_) response_done();
      return;
    }
    writing_ = true;
    // A write that does not finish in send_timeout (a client that stopped reading a plain
    // response, or a stream slower than that) closes the connection.
    stream_.expires_after(server_.config.send_timeout);
    net::async_write(stream_, net::buffer(write_queue_.front()),
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->writing_ = false;
                       if (ec) return self->client_gone();
                       self->unsent_bytes_ -= self->write_queue_.front().size();
                       self->write_queue_.pop_front();
                       self->flush();
                     });
  }

  void response_done() {
    response_complete_ = false;
    end_generation();
    if (refused_) {
      linger_close();
      return;
    }
    if (!keep_alive_ || !server_.accepting.load()) {
      close();
      return;
    }
    state_ = State::kReading;
    if (watch_pending_) {
      // The disconnect watch's read is still pending and a read may not be started twice:
      // cancel it; its handler starts the next request read (with the idle timeout).
      resume_read_after_watch_ = true;
      stream_.cancel();
      return;
    }
    do_read();
  }

  // public for HttpServer::drain
 public:
  void close_now() { close(); }

 private:
  void cancel_backend() {
    if (cancel_flag_) cancel_flag_->store(true, std::memory_order_release);
  }

 private:
  // After an answer given without reading the request: stop sending, drain what the client
  // still sends for up to a second, then close (see start()).
  void linger_close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(std::chrono::seconds(1));
    auto discard = std::make_shared<std::array<char, 4096>>();
    stream_.async_read_some(net::buffer(*discard),
                            [self = shared_from_this(), discard](beast::error_code ec, size_t) {
                              if (ec) return self->close();
                              self->linger_close();
                            });
  }

  void close() {
    if (state_ == State::kClosed) return;
    // Whatever the state: the disconnect watch may see the hang-up before the handler of the
    // response's last write runs, and the request must still leave the in-flight count.
    cancel_backend();
    end_generation();
    state_ = State::kClosed;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
    cancel_flag_.reset();
    self_.reset();
  }

  HttpServer::Impl& server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  uint64_t id_ = 0;
  const Clock::time_point accepted_at_;
  int64_t num_requests_ = 0;  // requests read on this connection
  bool reserve_ = false;      // a reserve connection: control routes only, then close
  bool refused_ = false;      // answered 429 without reading: linger, then close
  size_t unsent_bytes_ = 0;   // in write_queue_
  State state_ = State::kReading;
  unsigned version_ = 11;
  bool keep_alive_ = true;
  bool head_request_ = false;
  std::string client_request_id_;    // the request's x-request-id header ("" when absent)
  std::string response_request_id_;  // what the response's x-request-id says

  std::deque<std::string> write_queue_;
  bool writing_ = false;
  bool response_complete_ = false;
  bool watch_pending_ = false;
  bool resume_read_after_watch_ = false;
  bool counted_in_flight_ = false;  // this session's request is in HttpServer::in_flight

  // The request being generated.
  CompletionRequest request_;
  ChatOutputOptions output_options_;  // how chat outputs are read (reasoning, tool calls)
  uint64_t generation_ = 0;           // bumped per generated request
  std::shared_ptr<std::atomic<bool>> cancel_flag_;  // shared with the request's sink
  std::shared_ptr<Session> self_;  // keeps the session alive while the backend owns the sink
  std::string completion_id_;
  std::string model_;
  int64_t created_ = 0;
  // One per prompt of the request (one unless a /v1/completions batch).
  std::vector<Choice> choices_;
  size_t num_finished_ = 0;
  Usage usage_;  // summed over the finished prompts
};

namespace {

template <typename Fn>
void SessionSink::deliver(Fn fn) {
  std::shared_ptr<Session> session = session_.lock();
  if (!session) {
    cancelled_->store(true, std::memory_order_release);
    return;
  }
  net::any_io_executor strand = session->executor();
  net::post(strand, [session = std::move(session), generation = generation_, fn = std::move(fn)]() {
    if (session->generation() == generation) fn(*session);
  });
}

SessionSink::~SessionSink() {
  if (ended_ || cancelled()) return;
  // A backend that drops a live request must not leave the client waiting forever.
  deliver([](Session& session) { session.error("the backend dropped the request unfinished"); });
}

void SessionSink::on_prompt(const PromptOutput& prompt) {
  deliver([index = choice_index_, prompt](Session& session) { session.prompt(index, prompt); });
}

void SessionSink::on_token(const GeneratedToken& token) {
  deliver([index = choice_index_, token](Session& session) { session.token(index, token); });
}

void SessionSink::on_finish(const std::string& finish_reason, Usage usage) {
  ended_ = true;
  deliver([index = choice_index_, finish_reason, usage](Session& session) {
    session.finish(index, finish_reason, usage);
  });
}

void SessionSink::on_finish_with(const std::string& finish_reason, Usage usage,
                                 json choice_fields) {
  ended_ = true;
  deliver([index = choice_index_, finish_reason, usage, fields = std::move(choice_fields)](
              Session& session) { session.finish(index, finish_reason, usage, fields); });
}

void SessionSink::on_error(const std::string& message) {
  ended_ = true;
  deliver([message](Session& session) { session.error(message, 500); });
}

void SessionSink::on_unavailable(const std::string& message) {
  ended_ = true;
  deliver([message](Session& session) { session.error(message, 503); });
}

}  // namespace

void HttpServer::Impl::accept_next() {
  acceptor->async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (!accepting.load() || !acceptor->is_open()) return;
    if (ec) {
      if (ec == net::error::operation_aborted) return;
      // EMFILE and friends: keep serving the connections we have, try again.
      spdlog::warn("server: accept failed: {}", ec.message());
      accept_next();
      return;
    }
    // Streams are many small writes: without TCP_NODELAY Nagle holds tokens back ~40 ms.
    beast::error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    auto session = std::make_shared<Session>(*this, std::move(socket));
    uint64_t id = 0;
    std::shared_ptr<Session> victim;
    Admission admission;
    {
      std::lock_guard lock(mutex);
      id = ++next_session_id;
      admission = table.admit(id, Clock::now());
      if (admission.verdict != Admission::Verdict::kRefused) sessions[id] = session;
      if (admission.evict) {
        if (auto it = sessions.find(*admission.evict); it != sessions.end())
          victim = it->second.lock();
      }
    }
    if (admission.verdict == Admission::Verdict::kRefused) ++refused;
    if (admission.evict) ++(admission.evicted_idle ? evicted_idle : evicted_slow);
    if (victim) net::post(victim->executor(), [victim] { victim->close_if_idle(); });
    session->start(id, admission.verdict);
    accept_next();
  });
}

HttpServer::HttpServer(HttpServerConfig config, GenerationBackend& backend)
    : impl_(std::make_shared<Impl>(std::move(config), backend)) {}

HttpServer::~HttpServer() {
  if (impl_->running) drain(std::chrono::milliseconds(0));
}

void HttpServer::start() {
  KEEL_CHECK(!impl_->running, "HttpServer::start called twice");
  Impl& impl = *impl_;
  ensure_descriptor_limit(impl.config);
  beast::error_code ec;
  auto address = net::ip::make_address(impl.config.host, ec);
  if (ec) throw_error("server: bad host '", impl.config.host, "': ", ec.message());
  tcp::endpoint endpoint{address, impl.config.port};
  // The acceptor runs on its own strand: stop_accepting() posts its close there.
  impl.acceptor.emplace(net::make_strand(impl.ioc));
  impl.acceptor->open(endpoint.protocol(), ec);
  if (!ec) impl.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor->bind(endpoint, ec);
  if (!ec) impl.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    throw_error("server: cannot listen on ", impl.config.host, ":", impl.config.port, ": ",
                ec.message());
  }
  bound_port_ = impl.acceptor->local_endpoint().port();
  impl.work.emplace(impl.ioc.get_executor());
  net::dispatch(impl.acceptor->get_executor(), [&impl] { impl.accept_next(); });
  impl.running = true;
  for (int i = 0; i < std::max(1, impl.config.threads); ++i) {
    impl.threads.emplace_back([&impl] {
      // A handler that throws is a bug in the server; log it and keep the thread serving.
      for (;;) {
        try {
          impl.ioc.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("server: handler threw: {}", e.what());
        }
      }
    });
  }
  // Not "listening on": keel serve announces that only once the engine holds its KV pool.
  spdlog::info("server: socket bound to {}:{}", impl.config.host, bound_port_);
}

void HttpServer::stop_accepting() {
  Impl& impl = *impl_;
  if (!impl.running || !impl.accepting.exchange(false)) return;
  std::promise<void> closed;
  auto closed_future = closed.get_future();
  net::dispatch(impl.acceptor->get_executor(), [&impl, &closed] {
    beast::error_code ignored;
    impl.acceptor->close(ignored);
    closed.set_value();
  });
  // Refusing new connections is a promise to the caller: wait until the listener is closed.
  closed_future.wait();
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard lock(impl.mutex);
    for (auto& [id, weak] : impl.sessions) {
      if (auto session = weak.lock()) sessions.push_back(std::move(session));
    }
  }
  for (auto& session : sessions) {
    // Each session's state belongs to its strand: ask it there.
    net::post(session->executor(), [session] { session->close_if_idle(); });
  }
}

namespace {

std::vector<std::shared_ptr<Session>> live_sessions(HttpServer::Impl& impl) {
  std::vector<std::shared_ptr<Session>> sessions;
  std::lock_guard lock(impl.mutex);
  for (auto& [id, weak] : impl.sessions) {
    if (auto session = weak.lock()) sessions.push_back(std::move(session));
  }
  return sessions;
}

}  // namespace

bool HttpServer::drain(std::chrono::milliseconds timeout) {
  Impl& impl = *impl_;
  if (!impl.running) return true;
  stop_accepting();
  bool clean = false;
  {
    std::unique_lock lock(impl.mutex);
    impl.idle_cv.wait_for(lock, timeout,
                          [&impl] { return impl.in_flight == 0 || impl.stop_now.load(); });
    clean = impl.in_flight == 0;
  }
  if (!clean) {
    // The deadline passed: every accepted request still gets an answer, an error.
    spdlog::warn("server: {} with {} requests in flight; failing them",
                 impl.stop_now.load() ? "stopping now" : "drain timed out", impl.in_flight);
    for (auto& session : live_sessions(impl)) {
      net::post(session->executor(),
                [session] { session->abort("server shutting down before the request finished"); });
    }
    // Give the error responses a moment to reach the clients.
    std::unique_lock lock(impl.mutex);
    impl.idle_cv.wait_for(lock, std::chrono::seconds(2), [&impl] { return impl.in_flight == 0; });
  }
  // Close whatever is left (sessions between requests) so their handlers release them.
  for (auto& session : live_sessions(impl)) {
    net::post(session->executor(), [session] { session->close_now(); });
  }
  impl.work.reset();
  impl.ioc.stop();
  for (std::thread& thread : impl.threads) thread.join();
  impl.threads.clear();
  impl.running = false;
  spdlog::info("server: stopped");
  return clean;
}

void HttpServer::catch_signals() {
  if (!impl_->signals)
    impl_->signals = std::make_unique<net::signal_set>(impl_->ioc, SIGINT, SIGTERM);
}

void HttpServer::run_until_signal(std::chrono::milliseconds drain_timeout) {
  Impl& impl = *impl_;
  catch_signals();
  std::mutex mutex;
  std::condition_variable cv;
  bool signalled = false;
  impl.signals->async_wait([&](const beast::error_code& ec, int signal_number) {
    if (ec) return;
    spdlog::info("server: signal {}, draining", signal_number);
    {
      std::lock_guard lock(mutex);
      signalled = true;
    }
    cv.notify_all();
    // A second signal during the drain: the operator will not wait for it.
    impl.signals->async_wait([&impl](const beast::error_code& again, int second) {
      if (again) return;
      spdlog::warn("server: signal {} during the drain, stopping now", second);
      {
        std::lock_guard lock(impl.mutex);
        impl.stop_now = true;
      }
      impl.idle_cv.notify_all();
    });
  });
  {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return signalled; });
  }
  drain(drain_timeout);
  beast::error_code ignored;
  impl.signals->cancel(ignored);
}

int HttpServer::in_flight() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->in_flight;
}

int HttpServer::open_connections() const {
  return impl_->connections.load();
}

HttpServerStats HttpServer::stats() const {
  const Impl& impl = *impl_;
  HttpServerStats stats;
  stats.open_connections = impl.connections.load();
  stats.reserve_connections = impl.table.counts().reserve;
  stats.evicted_idle = impl.evicted_idle.load();
  stats.evicted_slow = impl.evicted_slow.load();
  stats.refused = impl.refused.load();
  stats.reserve_refused = impl.reserve_refused.load();
  stats.slow_reader_aborts = impl.slow_reader_aborts.load();
  return stats;
}

}  // namespace keel::server
