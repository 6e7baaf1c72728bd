// HTTP layer tests over real sockets on 127.0.0.1: a Beast client (and curl once) against an
// HttpServer wired to a fake backend with deterministic tokens, a per-token delay and a queue
// limit.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/common/build_info.h"
#include "runtime/server/api.h"
#include "runtime/server/auth.h"
#include "runtime/server/http_server.h"
#include "runtime/server/info_routes.h"

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using nlohmann::json;
using namespace keel::server;
using namespace std::chrono_literals;

// Token i is " t<i>" (or script[i] when a script is set: a model output known in advance);
// generation ends with "stop" after eos_after tokens (or the script) or "length" at max_tokens.
// Each request runs on its own thread, like an engine would call the sink.
class FakeBackend : public GenerationBackend {
 public:
  ~FakeBackend() override {
    std::lock_guard lock(mutex_);
    for (std::thread& worker : workers_) worker.join();
  }
  std::string model_name() const override { return "fake-moe"; }
  std::vector<std::string> served_model_names() const override {
    std::vector<std::string> names = {model_name()};
    names.insert(names.end(), aliases.begin(), aliases.end());
    return names;
  }
  std::string model_root() const override { return "/models/fake-moe"; }
  // A byte tokenizer: one id per byte (+ id 1000 first with special tokens); ids over 255 are
  // not in its vocabulary.
  std::optional<RequestError> tokenize(const std::string& text, bool add_special_tokens,
                                       Tokenized& out) override {
    if (add_special_tokens) {
      out.ids.push_back(1000);
      out.token_strs.push_back("<s>");
    }
    for (unsigned char c : text) {
      out.ids.push_back(c);
      out.token_strs.push_back(std::string(1, static_cast<char>(c)));
    }
    return std::nullopt;
  }
  std::optional<RequestError> detokenize(const std::vector<int32_t>& ids,
                                         std::string& text) override {
    for (int32_t id : ids) {
      if (id > 255)
        return RequestError{400, "token id out of range", "invalid_request_error", "tokens", ""};
      text.push_back(static_cast<char>(id));
    }
    return std::nullopt;
  }
  int max_context() const override { return 4096; }
  BackendHealth health() const override { return {healthy.load(), healthy ? "ok" : "rank 1 down"}; }

  bool try_submit(CompletionRequest request, std::shared_ptr<TokenSink> sink) override {
    if (active.load() >= queue_limit.load()) return false;
    ++active;
    ++submitted;
    std::lock_guard lock(mutex_);
    last_request_ = request;
    requests_seen_.push_back(request);
    workers_.emplace_back([this, request = std::move(request), sink = std::move(sink)] {
      run(request, *sink);
      --active;
    });
    return true;
  }

  CompletionRequest last_request() {
    std::lock_guard lock(mutex_);
    return last_request_;
  }
  std::vector<CompletionRequest> requests_seen() {
    std::lock_guard lock(mutex_);
    return requests_seen_;
  }

  std::atomic<int> queue_limit{8};
  std::atomic<int> eos_after{1000};
  std::atomic<int> delay_ms{0};
  std::atomic<bool> healthy{true};
  std::atomic<bool> fail{false};
  std::atomic<bool> drop{false};
  std::atomic<bool> tag_with_prompt{false};
  std::atomic<int> submitted{0};
  std::atomic<int> active{0};
  std::atomic<int> cancellations{0};
  std::vector<std::string> script;   // set before the requests that use it
  std::vector<std::string> aliases;  // further served names (set before the server starts)

 private:
  void run(const CompletionRequest& request, TokenSink& sink) {
    if (fail) {
      sink.on_error("expert rank crashed");
      return;
    }
    if (drop) return;  // a buggy backend: no tokens, no final call
    int prompt_tokens = request.prompt_tokens ? static_cast<int>(request.prompt_tokens->size())
                                              : static_cast<int>(request.prompt_text.size());
    int produced = 0;
    const int end = script.empty() ? eos_after.load() : static_cast<int>(script.size());
    while (produced < request.max_tokens && produced < end) {
      if (sink.cancelled()) {
        ++cancellations;
        return;
      }
      if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms.load()));
      // With tag_with_prompt the text names the prompt, so a batch's choices can be told apart.
      const std::string text = !script.empty() ? script[static_cast<size_t>(produced)]
                                               : (tag_with_prompt ? " " + request.prompt_text + ":"
                                                                  : std::string(" t")) +
                                                     std::to_string(produced);
      std::vector<TopLogprob> top = {{text, 100 + produced, -0.25f, text}, {" x", 7, -2.0f, " x"}};
      sink.on_token({.text_delta = text,
                     .token_id = 100 + produced,
                     .token_text = text,
                     .token_bytes = text,
                     .logprob = -0.25f,
                     .top_logprobs = top});
      ++produced;
    }
    sink.on_finish(produced == request.max_tokens ? "length" : "stop",
                   Usage{prompt_tokens, produced});
  }

  std::mutex mutex_;
  std::vector<std::thread> workers_;
  CompletionRequest last_request_;
  std::vector<CompletionRequest> requests_seen_;
};

struct Reply {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::string body;
  json json_body() const { return json::parse(body); }
};

using Headers = std::vector<std::pair<std::string, std::string>>;

Reply send_on(tcp::socket& socket, http::verb verb, const std::string& target,
              const std::string& body, bool keep_alive = false, const Headers& headers = {}) {
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, "127.0.0.1");
  for (const auto& [name, value] : headers) req.set(name, value);
  req.keep_alive(keep_alive);
  if (!body.empty() || verb == http::verb::post) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  http::write(socket, req);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  parser.skip(verb == http::verb::head);  // a HEAD response has no body, whatever its length
  http::read(socket, buffer, parser);
  Reply reply;
  reply.status = parser.get().result_int();
  for (const auto& field : parser.get()) {
    reply.headers[std::string(field.name_string())] = std::string(field.value());
  }
  reply.body = parser.get().body();
  return reply;
}

Reply send(uint16_t port, http::verb verb, const std::string& target, const std::string& body = "",
           const Headers& headers = {}) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  return send_on(socket, verb, target, body, false, headers);
}

Reply post(uint16_t port, const std::string& target, const json& body) {
  return send(port, http::verb::post, target, body.dump());
}

// Server-sent events: the payload of each "data: " line, in order.
std::vector<std::string> sse_payloads(const std::string& body) {
  std::vector<std::string> payloads;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    std::string event = body.substr(pos, end - pos);
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    payloads.push_back(event.substr(6));
    pos = end + 2;
  }
  return payloads;
}

template <typename Pred>
bool wait_for(Pred pred, std::chrono::milliseconds timeout = 3000ms) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

class HttpTest : public ::testing::Test {
 protected:
  void start(HttpServerConfig config = {}) {
    config.port = 0;
    server = std::make_unique<HttpServer>(std::move(config), backend);
    server->start();
    port = server->port();
    ASSERT_NE(port, 0);
  }
  void SetUp() override { start(); }
  void TearDown() override {
    if (server) server->drain(2000ms);
    server.reset();
  }
  void restart(HttpServerConfig config) {
    server->drain(1000ms);
    server.reset();
    start(std::move(config));
  }

  // Asserts an OpenAI error body whose message names `field`.
  void expect_error(const Reply& reply, int status, const std::string& field) {
    EXPECT_EQ(reply.status, status) << reply.body;
    json body = json::parse(reply.body, nullptr, false);
    ASSERT_TRUE(body.contains("error")) << reply.body;
    EXPECT_TRUE(body["error"].contains("type"));
    EXPECT_TRUE(body["error"].contains("param"));
    EXPECT_TRUE(body["error"].contains("code"));
    EXPECT_NE(body["error"]["message"].get<std::string>().find(field), std::string::npos)
        << reply.body;
  }

  FakeBackend backend;  // declared first: outlives the server
  std::unique_ptr<HttpServer> server;
  uint16_t port = 0;
};

TEST_F(HttpTest, CompletionNonStreaming) {
  Reply reply = post(port, "/v1/completions", {{"prompt", "hello"}, {"max_tokens", 5}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.headers["Content-Type"], "application/json");
  json body = reply.json_body();
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(body["model"], "fake-moe");
  EXPECT_TRUE(body["created"].is_number_integer());
  ASSERT_EQ(body["choices"].size(), 1u);
  EXPECT_EQ(body["choices"][0]["index"], 0);
  EXPECT_EQ(body["choices"][0]["text"], " t0 t1 t2 t3 t4");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(body["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(body["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(body["usage"]["completion_tokens"], 5);
  EXPECT_EQ(body["usage"]["total_tokens"], 10);
  EXPECT_EQ(backend.last_request().prompt_text, "hello");
}

TEST_F(HttpTest, PromptFormsAndSamplingFields) {
  Reply ids = post(port, "/v1/completions",
                   {{"prompt", {1, 2, 3}},
                    {"max_tokens", 2},
                    {"temperature", 0.5},
                    {"top_p", 0.9},
                    {"top_k", 40},
                    {"seed", 7},
                    {"stop", {"\n", "END"}}});
  ASSERT_EQ(ids.status, 200) << ids.body;
  CompletionRequest seen = backend.last_request();
  ASSERT_TRUE(seen.prompt_tokens.has_value());
  EXPECT_EQ(*seen.prompt_tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FLOAT_EQ(seen.temperature, 0.5f);
  EXPECT_FLOAT_EQ(seen.top_p, 0.9f);
  EXPECT_EQ(seen.top_k, 40);
  EXPECT_EQ(seen.seed, 7u);
  EXPECT_EQ(seen.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_EQ(ids.json_body()["usage"]["prompt_tokens"], 3);

  ASSERT_EQ(post(port, "/v1/completions", {{"prompt", {"one"}}, {"max_tokens", 1}}).status, 200);
  EXPECT_EQ(backend.last_request().prompt_text, "one");
  ASSERT_EQ(post(port, "/v1/completions", {{"prompt", {{4, 5}}}, {"max_tokens", 1}}).status, 200);
  EXPECT_EQ(*backend.last_request().prompt_tokens, (std::vector<int32_t>{4, 5}));
  ASSERT_EQ(post(port, "/v1/completions", {{"prompt", "x"}, {"stop", "END"}}).status, 200);
  EXPECT_EQ(backend.last_request().stop, (std::vector<std::string>{"END"}));
  EXPECT_EQ(backend.last_request().max_tokens, 16);  // OpenAI default
}

TEST_F(HttpTest, ChatNonStreaming) {
  backend.eos_after = 3;
  json request = {{"model", "fake-moe"},
                  {"messages",
                   {{{"role", "system"}, {"content", "Be brief."}},
                    {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Hi"}}}}}}},
                  {"max_tokens", 10}};
  Reply reply = post(port, "/v1/chat/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  json body = reply.json_body();
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], " t0 t1 t2");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(body["usage"]["completion_tokens"], 3);
  const std::string chatml =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n";
  EXPECT_EQ(backend.last_request().prompt_text, chatml);
  EXPECT_EQ(body["usage"]["prompt_tokens"], static_cast<int>(chatml.size()));
  EXPECT_EQ(backend.last_request().messages.size(), 2u);
}

TEST_F(HttpTest, ChatTemplateHook) {
  HttpServerConfig config;
  config.chat_template = [](const CompletionRequest& request) {
    return "[" + request.messages.back().content + "]";
  };
  restart(config);
  ASSERT_EQ(post(port, "/v1/chat/completions",
                 {{"messages", {{{"role", "user"}, {"content", "q"}}}}, {"max_tokens", 1}})
                .status,
            200);
  EXPECT_EQ(backend.last_request().prompt_text, "[q]");
}

// Tool and template fields: checked, and refused by name where this model's template (plain
// ChatML here) or keel cannot honour them.
TEST_F(HttpTest, ToolFieldsAreCheckedAndRefusedByName) {
  const json messages = {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"max_tokens", 2}};
  const json weather = {{"type", "function"}, {"function", {{"name", "get_weather"}}}};
  auto with = [&](const std::string& field, const json& value) {
    json body = messages;
    body[field] = value;
    return post(port, "/v1/chat/completions", body);
  };
  auto expect_param = [&](const Reply& reply, const std::string& param) {
    expect_error(reply, 400, "'" + param + "'");
    EXPECT_EQ(reply.json_body()["error"]["param"], param);
  };
  expect_param(with("tools", json::array({weather})), "tools");  // ChatML renders no tools
  expect_param(with("tool_choice", "required"), "tool_choice");
  expect_param(with("tool_choice", {{"type", "function"}, {"function", {{"name", "f"}}}}),
               "tool_choice");
  expect_param(with("tool_choice", "auto"), "tool_choice");  // no tools to choose from
  expect_param(with("tool_choice", "sometimes"), "tool_choice");
  expect_param(with("tools", {{{"type", "custom"}}}), "tools[0].type");
  expect_param(with("tools", {{{"type", "function"}, {"function", {{"name", ""}}}}}),
               "tools[0].function.name");
  expect_param(with("chat_template_kwargs", {{"enable_thinking", false}}),
               "chat_template_kwargs.enable_thinking");  // ChatML has no thinking switch
  expect_param(with("chat_template_kwargs", {{"enable_thinking", "no"}}),
               "chat_template_kwargs.enable_thinking");
  expect_param(with("chat_template_kwargs", {{"add_vision_id", true}}),
               "chat_template_kwargs.add_vision_id");
  expect_param(with("parallel_tool_calls", "yes"), "parallel_tool_calls");
  json bad_call = messages;
  bad_call["messages"].push_back({{"role", "assistant"},
                                  {"content", nullptr},
                                  {"tool_calls",
                                   {{{"id", "c"},
                                     {"type", "function"},
                                     {"function", {{"name", "f"}, {"arguments", "{not json"}}}}}}});
  expect_param(post(port, "/v1/chat/completions", bad_call),
               "messages[1].tool_calls[0].function.arguments");
  json user_call = messages;
  user_call["messages"][0]["tool_calls"] = json::array();
  expect_param(post(port, "/v1/chat/completions", user_call), "messages[0].tool_calls");
  EXPECT_EQ(backend.submitted.load(), 0);
  // tool_choice none with no tools, and an empty kwargs object, change nothing.
  EXPECT_EQ(with("tool_choice", "none").status, 200);
  EXPECT_EQ(with("chat_template_kwargs", json::object()).status, 200);
}

// A Qwen3.5-like template: tools, reasoning and the thinking switch reach the template, and the
// scripted model output is read into reasoning_content, content and tool_calls, the same
// streamed as not (tags split across tokens included).
class HttpToolsTest : public HttpTest {
 protected:
  void SetUp() override {
    HttpServerConfig config;
    config.chat_capabilities = {.template_family = "qwen3.5",
                                .tool_calls = ToolCallFormat::kQwenXml,
                                .reasoning = true,
                                .thinking_switch = true,
                                .thinking_default = true};
    config.chat_template = [](const CompletionRequest& request) -> std::string {
      if (request.messages.back().content == "refuse") keel::throw_error("No user query found.");
      return "tools=" + std::to_string(request.tools.size()) + " thinking=" +
             (request.enable_thinking ? std::to_string(*request.enable_thinking) : "default") +
             " calls=" + std::to_string(request.messages.front().tool_calls.size());
    };
    start(config);
  }

  json request(const std::string& content = "Weather in Paris?") const {
    json properties = {{"city", {{"type", "string"}}}, {"days", {{"type", "integer"}}}};
    json function = {{"name", "get_weather"},
                     {"parameters", {{"type", "object"}, {"properties", properties}}}};
    json body;
    json user = {{"role", "user"}, {"content", content}};
    json tool = {{"type", "function"}, {"function", function}};
    body["messages"] = json::array({user});
    body["tools"] = json::array({tool});
    body["max_tokens"] = 50;
    return body;
  }

  // The streamed response folded back into one message.
  static json assemble(const Reply& reply, std::string& finish) {
    json message = {{"reasoning_content", ""}, {"content", ""}, {"tool_calls", json::array()}};
    for (const std::string& event : sse_payloads(reply.body)) {
      if (event == "[DONE]") continue;
      const json chunk = json::parse(event);
      const json& choice = chunk["choices"][0];
      const json& delta = choice["delta"];
      for (const char* field : {"reasoning_content", "content"})
        if (delta.contains(field))
          message[field] = message[field].get<std::string>() + delta[field].get<std::string>();
      EXPECT_EQ(delta.value("content", "").find("<tool"), std::string::npos) << event;
      if (delta.contains("tool_calls"))
        for (const json& call : delta["tool_calls"]) message["tool_calls"].push_back(call);
      if (!choice["finish_reason"].is_null()) finish = choice["finish_reason"];
    }
    return message;
  }
};

TEST_F(HttpToolsTest, ToolCallsAndReasoningNonStreamedAndStreamed) {
  backend.script = {"Let me",
                    " look.\n</th",
                    "ink>\n\nSure.",
                    "<tool",
                    "_call>\n<func",
                    "tion=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>",
                    "\n3\n</parameter>\n</function>\n</tool_call>"};
  Reply reply = post(port, "/v1/chat/completions", request());
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(backend.last_request().prompt_text, "tools=1 thinking=default calls=0");
  const json body = reply.json_body();
  const json& choice = body["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls");
  const json& message = choice["message"];
  EXPECT_EQ(message["reasoning_content"], "Let me look.\n");
  EXPECT_EQ(message["content"], "\n\nSure.");
  ASSERT_EQ(message["tool_calls"].size(), 1u);
  const json& call = message["tool_calls"][0];
  EXPECT_EQ(call["type"], "function");
  EXPECT_EQ(call["id"].get<std::string>().rfind("chatcmpl-tool-", 0), 0u);
  EXPECT_EQ(call["function"]["name"], "get_weather");
  EXPECT_EQ(call["function"]["arguments"], "{\"city\": \"Paris\", \"days\": 3}");

  json streamed_request = request();
  streamed_request["stream"] = true;
  std::string finish;
  json streamed = assemble(post(port, "/v1/chat/completions", streamed_request), finish);
  EXPECT_EQ(finish, "tool_calls");
  EXPECT_EQ(streamed["reasoning_content"], message["reasoning_content"]);
  EXPECT_EQ(streamed["content"], message["content"]);
  ASSERT_EQ(streamed["tool_calls"].size(), 1u);
  EXPECT_EQ(streamed["tool_calls"][0]["index"], 0);
  EXPECT_EQ(streamed["tool_calls"][0]["function"], call["function"]);
  EXPECT_EQ(streamed["tool_calls"][0]["type"], "function");

  // include_reasoning false (vLLM's field): the reasoning is still split off, then dropped;
  // content and calls are unchanged, streamed or not.
  json hidden = request();
  hidden["include_reasoning"] = false;
  const json hidden_message =
      post(port, "/v1/chat/completions", hidden).json_body()["choices"][0]["message"];
  EXPECT_TRUE(hidden_message["reasoning_content"].is_null());
  EXPECT_EQ(hidden_message["content"], message["content"]);
  EXPECT_EQ(hidden_message["tool_calls"].size(), 1u);
  hidden["stream"] = true;
  json hidden_streamed = assemble(post(port, "/v1/chat/completions", hidden), finish);
  EXPECT_EQ(hidden_streamed["reasoning_content"], "");
  EXPECT_EQ(hidden_streamed["content"], message["content"]);
  hidden["include_reasoning"] = "no";
  expect_error(post(port, "/v1/chat/completions", hidden), 400, "include_reasoning");
}

TEST_F(HttpToolsTest, ToolChoiceNoneThinkingOffAndOneCallAtATime) {
  const std::string one_call =
      "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n"
      "</tool_call>";
  backend.script = {"</think>", one_call, "\n", one_call};
  // tool_choice none: the tools are still rendered (vLLM does too), the output is not parsed.
  json none = request();
  none["tool_choice"] = "none";
  const json none_body = post(port, "/v1/chat/completions", none).json_body();
  EXPECT_EQ(none_body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(none_body["choices"][0]["message"]["content"], one_call + "\n" + one_call);
  EXPECT_FALSE(none_body["choices"][0]["message"].contains("tool_calls"));
  // parallel_tool_calls false: the first call only, streamed or not.
  json single = request();
  single["parallel_tool_calls"] = false;
  const json single_body = post(port, "/v1/chat/completions", single).json_body();
  EXPECT_EQ(single_body["choices"][0]["message"]["tool_calls"].size(), 1u);
  single["stream"] = true;
  std::string finish;
  EXPECT_EQ(assemble(post(port, "/v1/chat/completions", single), finish)["tool_calls"].size(), 1u);
  single["parallel_tool_calls"] = true;
  EXPECT_EQ(assemble(post(port, "/v1/chat/completions", single), finish)["tool_calls"].size(), 2u);
  // Thinking off: the switch reaches the template, and all the output is content.
  backend.script = {"no ", "</think> here"};
  json off = request();
  off["chat_template_kwargs"] = {{"enable_thinking", false}};
  const json off_body = post(port, "/v1/chat/completions", off).json_body();
  EXPECT_EQ(backend.last_request().prompt_text, "tools=1 thinking=0 calls=0");
  EXPECT_TRUE(off_body["choices"][0]["message"]["reasoning_content"].is_null());
  EXPECT_EQ(off_body["choices"][0]["message"]["content"], "no </think> here");
  // Thinking on, cut short: everything is reasoning and the content is null.
  backend.script = {"still ", "thinking"};
  const json cut = post(port, "/v1/chat/completions", request()).json_body();
  EXPECT_EQ(cut["choices"][0]["message"]["reasoning_content"], "still thinking");
  EXPECT_TRUE(cut["choices"][0]["message"]["content"].is_null());
}

TEST_F(HttpToolsTest, HistoryReachesTheTemplateAndItsRefusalsAre400) {
  backend.script = {"ok"};
  json history = request();
  history["messages"] = {
      {{"role", "assistant"},
       {"content", nullptr},
       {"tool_calls",
        {{{"id", "c1"},
          {"type", "function"},
          {"function", {{"name", "get_weather"}, {"arguments", "{\"city\": \"Oslo\"}"}}}}}}},
      {{"role", "tool"}, {"tool_call_id", "c1"}, {"content", "5C"}},
      {{"role", "user"}, {"content", "thanks"}}};
  ASSERT_EQ(post(port, "/v1/chat/completions", history).status, 200);
  const CompletionRequest seen = backend.last_request();
  EXPECT_EQ(seen.prompt_text, "tools=1 thinking=default calls=1");
  ASSERT_EQ(seen.messages[0].tool_calls.size(), 1u);
  EXPECT_EQ(seen.messages[0].tool_calls[0].arguments.dump(), "{\"city\":\"Oslo\"}");
  EXPECT_EQ(seen.messages[1].tool_call_id, "c1");
  Reply refused = post(port, "/v1/chat/completions", request("refuse"));
  expect_error(refused, 400, "No user query found.");
  EXPECT_EQ(refused.json_body()["error"]["param"], "messages");
}

TEST_F(HttpTest, StreamingCompletionMatchesNonStreaming) {
  backend.delay_ms = 2;
  json request = {{"prompt", "hello"}, {"max_tokens", 6}};
  std::string expected = post(port, "/v1/completions", request).json_body()["choices"][0]["text"];
  request["stream"] = true;
  request["stream_options"] = {{"include_usage", true}};
  Reply reply = post(port, "/v1/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.headers["Content-Type"], "text/event-stream");
  std::vector<std::string> events = sse_payloads(reply.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string id;
  int tokens = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "text_completion");
    if (id.empty()) id = chunk["id"];
    EXPECT_EQ(chunk["id"], id);      // one id across the stream
    if (chunk["choices"].empty()) {  // the usage chunk, last before [DONE]
      EXPECT_EQ(i + 2, events.size());
      EXPECT_EQ(chunk["usage"]["completion_tokens"], 6);
      EXPECT_EQ(chunk["usage"]["total_tokens"], 11);
      continue;
    }
    const json& choice = chunk["choices"][0];
    text += choice["text"].get<std::string>();
    if (choice["finish_reason"].is_null()) {
      EXPECT_EQ(choice["text"], " t" + std::to_string(tokens));  // chunks in order
      ++tokens;
    } else {
      EXPECT_EQ(choice["finish_reason"], "length");
    }
  }
  EXPECT_EQ(tokens, 6);
  EXPECT_EQ(text, expected);
}

TEST_F(HttpTest, StreamingOverHttp10EndsWithClose) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  std::string body = json{{"prompt", "a"}, {"max_tokens", 2}, {"stream", true}}.dump();
  net::write(socket, net::buffer("POST /v1/completions HTTP/1.0\r\nContent-Length: " +
                                 std::to_string(body.size()) + "\r\n\r\n" + body));
  std::string response;
  beast::error_code ec;
  char data[1024];
  while (size_t n = socket.read_some(net::buffer(data), ec)) response.append(data, n);
  EXPECT_EQ(ec, net::error::eof);
  size_t header_end = response.find("\r\n\r\n");
  ASSERT_NE(header_end, std::string::npos);
  EXPECT_EQ(response.rfind("HTTP/1.0 200", 0), 0u);
  EXPECT_EQ(response.find("chunked"), std::string::npos);
  std::vector<std::string> events = sse_payloads(response.substr(header_end + 4));
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events.back(), "[DONE]");
}

TEST_F(HttpTest, StreamingChat) {
  backend.eos_after = 4;
  json request = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 10}};
  std::string expected =
      post(port, "/v1/chat/completions", request).json_body()["choices"][0]["message"]["content"];
  request["stream"] = true;
  Reply reply = post(port, "/v1/chat/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  std::vector<std::string> events = sse_payloads(reply.body);
  ASSERT_EQ(events.back(), "[DONE]");
  json first = json::parse(events.front());
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  std::string finish;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    json chunk = json::parse(events[i]);
    EXPECT_FALSE(chunk.contains("usage"));  // not asked for
    const json& choice = chunk["choices"][0];
    if (choice["delta"].contains("content")) text += choice["delta"]["content"].get<std::string>();
    if (!choice["finish_reason"].is_null()) finish = choice["finish_reason"];
  }
  EXPECT_EQ(text, expected);
  EXPECT_EQ(finish, "stop");
}

TEST_F(HttpTest, Logprobs) {
  Reply reply =
      post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}, {"logprobs", 1}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  json logprobs = reply.json_body()["choices"][0]["logprobs"];
  EXPECT_EQ(logprobs["tokens"], json({" t0", " t1"}));
  EXPECT_EQ(logprobs["token_logprobs"], json({-0.25, -0.25}));
  EXPECT_EQ(logprobs["top_logprobs"][1], json({{" t1", -0.25}}));
  EXPECT_EQ(logprobs["text_offset"], json({0, 3}));

  Reply chat = post(port, "/v1/chat/completions",
                    {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                     {"max_tokens", 1},
                     {"logprobs", true},
                     {"top_logprobs", 2}});
  ASSERT_EQ(chat.status, 200) << chat.body;
  json content = chat.json_body()["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 1u);
  EXPECT_EQ(content[0]["token"], " t0");
  EXPECT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[0]["top_logprobs"][1]["token"], " x");
}

TEST_F(HttpTest, ModelsHealthMetrics) {
  Reply models = send(port, http::verb::get, "/v1/models");
  ASSERT_EQ(models.status, 200);
  EXPECT_EQ(models.json_body()["object"], "list");
  EXPECT_EQ(models.json_body()["data"][0]["id"], "fake-moe");
  EXPECT_EQ(send(port, http::verb::get, "/health").status, 200);
  Reply metrics = send(port, http::verb::get, "/metrics");
  EXPECT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.body, "");

  HttpServerConfig config;
  config.metrics = [] { return std::string("keel_requests_total 3\n"); };
  restart(config);
  EXPECT_EQ(send(port, http::verb::get, "/metrics").body, "keel_requests_total 3\n");
}

TEST_F(HttpTest, ValidationErrorsNameTheField) {
  const std::string completions = "/v1/completions";
  Reply malformed = send(port, http::verb::post, completions, "{\"prompt\": ");
  expect_error(malformed, 400, "JSON");
  expect_error(send(port, http::verb::post, completions, "[1,2]"), 400, "object");
  expect_error(post(port, completions, json::object()), 400, "prompt");
  expect_error(post(port, completions, {{"prompt", 5}}), 400, "prompt");
  expect_error(post(port, completions, {{"prompt", {"a", 5}}}), 400, "prompt[1]");
  expect_error(
      post(port, completions, {{"prompt", json::array({json::array({1, 2}), json::array()})}}), 400,
      "prompt[1]");
  expect_error(post(port, completions, {{"prompt", std::vector<std::string>(65, "p")}}), 400,
               "limit of 64");
  expect_error(post(port, completions, {{"prompt", {1, -2}}}), 400, "prompt");
  expect_error(post(port, completions, {{"prompt", "x"}, {"max_tokens", "ten"}}), 400,
               "max_tokens");
  expect_error(post(port, completions, {{"prompt", "x"}, {"max_tokens", 0}}), 400, "max_tokens");
  expect_error(post(port, completions, {{"prompt", "x"}, {"max_tokens", 1.5}}), 400, "max_tokens");
  expect_error(post(port, completions, {{"prompt", "x"}, {"max_tokens", 100000}}), 400,
               "max_tokens");
  expect_error(post(port, completions, {{"prompt", "x"}, {"temperature", "hot"}}), 400,
               "temperature");
  expect_error(post(port, completions, {{"prompt", "x"}, {"temperature", 3}}), 400, "temperature");
  expect_error(post(port, completions, {{"prompt", "x"}, {"top_p", 0}}), 400, "top_p");
  expect_error(post(port, completions, {{"prompt", "x"}, {"top_k", -5}}), 400, "top_k");
  expect_error(post(port, completions, {{"prompt", "x"}, {"seed", "s"}}), 400, "seed");
  expect_error(post(port, completions, {{"prompt", "x"}, {"stop", 3}}), 400, "stop");
  expect_error(post(port, completions, {{"prompt", "x"}, {"stop", {"a", "b", "c", "d", "e"}}}), 400,
               "stop");
  expect_error(post(port, completions, {{"prompt", "x"}, {"stream", "yes"}}), 400, "stream");
  expect_error(post(port, completions, {{"prompt", "x"}, {"n", 0}}), 400, "'n'");
  expect_error(post(port, completions, {{"prompt", "x"}, {"n", 129}}), 400, "'n'");
  expect_error(post(port, completions, {{"prompt", {"a", "b"}}, {"n", 100}}), 400,
               "make 200 choices");
  expect_error(post(port, completions, {{"prompt", "x"}, {"logprobs", 9}}), 400, "logprobs");
  expect_error(post(port, completions, {{"prompt", "x"}, {"model", 3}}), 400, "model");
  expect_error(post(port, completions, {{"prompt", "x"}, {"echo", "yes"}}), 400, "echo");
  expect_error(post(port, completions, {{"prompt", "x"}, {"best_of", 3}}), 400, "best_of");
  expect_error(post(port, completions, {{"prompt", "x"}, {"suffix", "y"}}), 400, "suffix");
  Reply wrong_model = post(port, completions, {{"prompt", "x"}, {"model", "gpt-4"}});
  expect_error(wrong_model, 404, "gpt-4");
  EXPECT_EQ(wrong_model.json_body()["error"]["param"], "model");

  const std::string chat = "/v1/chat/completions";
  expect_error(post(port, chat, {{"prompt", "x"}}), 400, "messages");
  expect_error(post(port, chat, {{"messages", json::array()}}), 400, "messages");
  expect_error(post(port, chat, {{"messages", {{{"content", "x"}}}}}), 400, "messages[0].role");
  expect_error(post(port, chat, {{"messages", {{{"role", "wizard"}, {"content", "x"}}}}}), 400,
               "messages[0].role");
  expect_error(post(port, chat, {{"messages", {{{"role", "user"}, {"content", 1}}}}}), 400,
               "messages[0].content");
  expect_error(
      post(port, chat, {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"top_logprobs", 2}}),
      400, "top_logprobs");
  Reply typed = post(port, completions, {{"prompt", "x"}, {"temperature", "hot"}});
  EXPECT_EQ(typed.json_body()["error"]["param"], "temperature");
  EXPECT_EQ(typed.json_body()["error"]["type"], "invalid_request_error");
  EXPECT_EQ(backend.active.load(), 0);
}

// Every sampling field is range- and type-checked by name; what keel does not implement is
// refused by name (never silently ignored), and so is any field it does not know.
TEST_F(HttpTest, NewSamplingFieldsAreCheckedAndUnimplementedOnesRefusedByName) {
  const std::string completions = "/v1/completions";
  const std::string chat = "/v1/chat/completions";
  const json prompt = {{"prompt", "x"}};
  const json messages = {{"messages", {{{"role", "user"}, {"content", "x"}}}}};
  const auto with = [](json body, const std::string& key, const json& value) {
    body[key] = value;
    return body;
  };
  // Out of range or mistyped: 400 with param = the field.
  const std::vector<std::pair<std::string, json>> bad_values = {
      {"presence_penalty", 2.5},
      {"presence_penalty", "high"},
      {"frequency_penalty", -2.01},
      {"repetition_penalty", 0},
      {"repetition_penalty", -1},
      {"min_p", 1.5},
      {"min_p", -0.1},
      {"logit_bias", {1, 2}},
      {"logit_bias", {{"abc", 1}}},
      {"logit_bias", {{"-3", 1}}},
      {"logit_bias", {{"5", 101}}},
      {"logit_bias", {{"5", "x"}}},
      {"min_tokens", -1},
      {"min_tokens", 17},
      {"stop_token_ids", {1, -1}},
      {"stop_token_ids", 3},
      {"prompt_logprobs", 21},
      {"prompt_logprobs", -1},
      {"return_tokens_as_token_ids", 1},
      {"include_stop_str_in_output", "no"},
      {"skip_special_tokens", 0}};
  for (const auto& [field, value] : bad_values) {
    SCOPED_TRACE(field + " = " + value.dump());
    Reply reply = post(port, completions, with(prompt, field, value));
    expect_error(reply, 400, "'" + field + "'");
    EXPECT_EQ(reply.json_body()["error"]["param"], field);
  }
  // min_tokens is judged against max_tokens (16 by default for completions).
  expect_error(post(port, completions, with(with(prompt, "min_tokens", 8), "max_tokens", 7)), 400,
               "max_tokens (7)");
  expect_error(post(port, completions, with(with(prompt, "prompt_logprobs", 1), "stream", true)),
               400, "prompt_logprobs");

  // Known but not implemented: refused by name, on the endpoint where it exists.
  const std::vector<std::pair<std::string, json>> refused_chat = {
      {"response_format", {{"type", "json_object"}}},
      {"response_format", {{"type", "json_schema"}, {"json_schema", json::object()}}},
      {"guided_json", json::object()},
      {"functions", {{{"name", "f"}}}},
      {"reasoning_effort", "high"},
      {"echo", true},
      {"use_beam_search", true},
      {"best_of", 2},
      {"logits_processors", {"x"}},
      {"allowed_token_ids", {1}},
      {"modalities", {"text", "audio"}},
      {"store", true},
      {"priority", 1},
  };
  for (const auto& [field, value] : refused_chat) {
    SCOPED_TRACE(field + " = " + value.dump());
    Reply reply = post(port, chat, with(messages, field, value));
    expect_error(reply, 400, "'" + field + "'");
    EXPECT_EQ(reply.json_body()["error"]["param"], field);
  }
  expect_error(post(port, completions, with(prompt, "suffix", "y")), 400, "suffix");
  expect_error(post(port, completions, with(prompt, "response_format", {{"type", "json_object"}})),
               400, "response_format");
  // Unknown fields (a typo, or a feature keel has never heard of) are refused too.
  Reply typo = post(port, completions, with(prompt, "temprature", 0.5));
  expect_error(typo, 400, "unknown field");
  EXPECT_EQ(typo.json_body()["error"]["param"], "temprature");
  expect_error(post(port, completions, with(prompt, "top_logprobs", 2)), 400, "top_logprobs");
  EXPECT_EQ(backend.active.load(), 0);

  // The defaults of those fields, and fields without effect, are accepted.
  const json accepted_chat = {{"messages", {{{"role", "user"}, {"content", "x"}}}},
                              {"max_tokens", 2},
                              {"tools", json::array()},
                              {"tool_choice", "none"},
                              {"response_format", {{"type", "text"}}},
                              {"parallel_tool_calls", true},
                              {"user", "u-1"},
                              {"metadata", {{"k", "v"}}},
                              {"store", false},
                              {"service_tier", "auto"},
                              {"modalities", {"text"}},
                              {"best_of", 1},
                              {"use_beam_search", false},
                              {"chat_template_kwargs", json::object()}};
  EXPECT_EQ(post(port, chat, accepted_chat).status, 200);
}

// The parsed request carries every implemented field to the backend.
TEST_F(HttpTest, ImplementedSamplingFieldsReachTheBackend) {
  json body = {{"prompt", "x"},
               {"max_tokens", 4},
               {"presence_penalty", 0.5},
               {"frequency_penalty", -0.25},
               {"repetition_penalty", 1.3},
               {"min_p", 0.05},
               {"logit_bias", {{"17", -100}, {"3", 2.5}}},
               {"min_tokens", 2},
               {"stop_token_ids", {9, 4}},
               {"prompt_logprobs", 3},
               {"echo", true},
               {"return_tokens_as_token_ids", true},
               {"include_stop_str_in_output", true},
               {"skip_special_tokens", false},
               {"seed", 40}};
  ASSERT_EQ(post(port, "/v1/completions", body).status, 200);
  CompletionRequest request = backend.last_request();
  EXPECT_FLOAT_EQ(request.presence_penalty, 0.5f);
  EXPECT_FLOAT_EQ(request.frequency_penalty, -0.25f);
  EXPECT_FLOAT_EQ(request.repetition_penalty, 1.3f);
  EXPECT_FLOAT_EQ(request.min_p, 0.05f);
  EXPECT_EQ(request.logit_bias, (std::vector<std::pair<int32_t, float>>{{3, 2.5f}, {17, -100.0f}}));
  EXPECT_EQ(request.min_tokens, 2);
  EXPECT_EQ(request.stop_token_ids, (std::vector<int32_t>{9, 4}));
  EXPECT_EQ(request.prompt_logprobs, 3);
  EXPECT_TRUE(request.echo);
  EXPECT_TRUE(request.return_tokens_as_token_ids);
  EXPECT_TRUE(request.include_stop_str_in_output);
  EXPECT_FALSE(request.skip_special_tokens);
  EXPECT_EQ(request.seed, 40u);
}

// n > 1: prompt p's choice j is its own request with seed + j, answered as choice p * n + j;
// usage counts each prompt once; streams carry each choice's index (chat: a role chunk each).
TEST_F(HttpTest, NChoicesAreRequestsOfTheirOwnWithDerivedSeeds) {
  backend.tag_with_prompt = true;
  Reply reply = post(port, "/v1/completions",
                     {{"prompt", {"a", "b"}}, {"n", 3}, {"max_tokens", 2}, {"seed", 10}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  json body = reply.json_body();
  ASSERT_EQ(body["choices"].size(), 6u);
  for (size_t index = 0; index < 6; ++index) {
    EXPECT_EQ(body["choices"][index]["index"], index);
    EXPECT_EQ(body["choices"][index]["text"], index < 3 ? " a:0 a:1" : " b:0 b:1") << index;
  }
  // The fake counts the prompt's characters as its tokens: 1 + 1, once per prompt.
  EXPECT_EQ(body["usage"]["prompt_tokens"], 2);
  EXPECT_EQ(body["usage"]["completion_tokens"], 12);
  std::multiset<uint64_t> seeds;
  for (const CompletionRequest& request : backend.requests_seen()) seeds.insert(*request.seed);
  EXPECT_EQ(seeds, (std::multiset<uint64_t>{10, 11, 12, 10, 11, 12}));

  Reply stream = post(port, "/v1/chat/completions",
                      {{"messages", {{{"role", "user"}, {"content", "c"}}}},
                       {"n", 2},
                       {"max_tokens", 2},
                       {"stream", true}});
  ASSERT_EQ(stream.status, 200) << stream.body;
  std::map<int, std::string> text;
  std::map<int, int> roles, finishes;
  for (const std::string& event : sse_payloads(stream.body)) {
    if (event == "[DONE]") continue;
    const json chunk = json::parse(event);
    for (const json& choice : chunk["choices"]) {
      const int index = choice["index"];
      if (choice["delta"].contains("role")) ++roles[index];
      if (choice["delta"].contains("content")) text[index] += choice["delta"]["content"];
      if (!choice["finish_reason"].is_null()) ++finishes[index];
    }
  }
  EXPECT_EQ(roles, (std::map<int, int>{{0, 1}, {1, 1}})) << stream.body;
  EXPECT_EQ(finishes, (std::map<int, int>{{0, 1}, {1, 1}}));
  EXPECT_EQ(text[0], text[1]);
  EXPECT_FALSE(text[0].empty());
}

TEST_F(HttpTest, RoutingErrors) {
  expect_error(send(port, http::verb::get, "/v2/nothing"), 404, "/v2/nothing");
  Reply get_completions = send(port, http::verb::get, "/v1/completions");
  expect_error(get_completions, 405, "GET");
  EXPECT_EQ(get_completions.headers["Allow"], "POST");
  expect_error(send(port, http::verb::post, "/v1/models", "{}"), 405, "POST");
  expect_error(send(port, http::verb::delete_, "/health"), 405, "DELETE");
  // A query string does not change the route.
  EXPECT_EQ(send(port, http::verb::get, "/v1/models?x=1").status, 200);
}

TEST_F(HttpTest, BodyTooLarge) {
  HttpServerConfig config;
  config.max_body_bytes = 1024;
  restart(config);
  json big = {{"prompt", std::string(4096, 'a')}};
  expect_error(post(port, "/v1/completions", big), 413, "exceeds");
  EXPECT_EQ(post(port, "/v1/completions", {{"prompt", "small"}, {"max_tokens", 1}}).status, 200);
}

TEST_F(HttpTest, GarbageIsRefusedWithoutCrashing) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  net::write(socket, net::buffer(std::string("NOT HTTP AT ALL\r\n\r\n")));
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(socket, buffer, res);
  EXPECT_EQ(res.result_int(), 400);
  EXPECT_EQ(send(port, http::verb::get, "/health").status, 200);
}

// A list of prompts is a batch: one choice per prompt, in prompt order, each generated as a
// request of its own; usage sums them.
TEST_F(HttpTest, PromptBatchAnswersOneChoicePerPrompt) {
  backend.tag_with_prompt = true;
  Reply reply = post(port, "/v1/completions",
                     {{"prompt", {"ab", "cde", "f"}}, {"max_tokens", 2}, {"logprobs", 1}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  json body = reply.json_body();
  ASSERT_EQ(body["choices"].size(), 3u);
  const std::vector<std::string> prompts = {"ab", "cde", "f"};
  for (size_t index = 0; index < 3; ++index) {
    const json& choice = body["choices"][index];
    EXPECT_EQ(choice["index"], index);
    const std::string first = " " + prompts[index] + ":0";
    EXPECT_EQ(choice["text"], first + " " + prompts[index] + ":1");
    EXPECT_EQ(choice["finish_reason"], "length");
    // Offsets count from each choice's own text.
    EXPECT_EQ(choice["logprobs"]["text_offset"], json({0, first.size()}));
  }
  EXPECT_EQ(body["usage"]["prompt_tokens"], 2 + 3 + 1);
  EXPECT_EQ(body["usage"]["completion_tokens"], 6);
  EXPECT_EQ(body["usage"]["total_tokens"], 12);
  EXPECT_EQ(backend.submitted.load(), 3);

  // Token-id prompts batch too.
  Reply ids =
      post(port, "/v1/completions",
           {{"prompt", json::array({json::array({1, 2}), json::array({3})})}, {"max_tokens", 1}});
  ASSERT_EQ(ids.status, 200) << ids.body;
  EXPECT_EQ(ids.json_body()["choices"].size(), 2u);
  EXPECT_EQ(ids.json_body()["usage"]["prompt_tokens"], 3);
}

TEST_F(HttpTest, PromptBatchStreamsEveryChoiceThenOneDone) {
  backend.tag_with_prompt = true;
  backend.delay_ms = 1;
  Reply reply = post(port, "/v1/completions",
                     {{"prompt", {"ab", "cde"}},
                      {"max_tokens", 3},
                      {"logprobs", 1},
                      {"stream", true},
                      {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  std::vector<std::string> events = sse_payloads(reply.body);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_EQ(std::count(events.begin(), events.end(), "[DONE]"), 1);
  std::map<int, std::string> text;
  std::map<int, int> finishes;
  int usage_chunks = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    json chunk = json::parse(events[i]);
    if (chunk["choices"].empty()) {
      ++usage_chunks;
      EXPECT_EQ(i + 2, events.size()) << "usage comes last, once every prompt finished";
      EXPECT_EQ(chunk["usage"]["prompt_tokens"], 5);
      EXPECT_EQ(chunk["usage"]["completion_tokens"], 6);
      continue;
    }
    const json& choice = chunk["choices"][0];
    const int index = choice["index"];
    if (choice["finish_reason"].is_null()) {
      // A token chunk's text_offset is where its text starts in its own choice's text.
      EXPECT_EQ(choice["logprobs"]["text_offset"], json({text[index].size()})) << events[i];
    }
    text[index] += choice["text"].get<std::string>();
    if (!choice["finish_reason"].is_null()) ++finishes[index];
  }
  EXPECT_EQ(usage_chunks, 1);
  EXPECT_EQ(text[0], " ab:0 ab:1 ab:2");
  EXPECT_EQ(text[1], " cde:0 cde:1 cde:2");
  EXPECT_EQ(finishes, (std::map<int, int>{{0, 1}, {1, 1}}));
}

// The queue takes the batch's first prompt but not its second: 429 for the whole request, and
// the prompt already queued is cancelled rather than left generating for nobody.
TEST_F(HttpTest, PromptBatchThatDoesNotFitIs429AndCancelsWhatWasQueued) {
  backend.queue_limit = 1;
  backend.delay_ms = 5;
  Reply reply = post(port, "/v1/completions", {{"prompt", {"a", "b"}}, {"max_tokens", 200}});
  expect_error(reply, 429, "queue");
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 1; }));
  EXPECT_TRUE(wait_for([&] { return backend.active.load() == 0 && server->in_flight() == 0; }));
}

// One prompt failing fails the response (500) and stops the batch's other prompts.
TEST_F(HttpTest, PromptBatchWithAFailingPromptIs500) {
  backend.fail = true;
  expect_error(post(port, "/v1/completions", {{"prompt", {"a", "b"}}}), 500, "expert rank crashed");
  EXPECT_TRUE(wait_for([&] { return backend.active.load() == 0 && server->in_flight() == 0; }));
}

TEST_F(HttpTest, QueueFullIs429WithRetryAfter) {
  backend.queue_limit = 1;
  backend.delay_ms = 20;
  Reply first;
  std::thread client([&] {
    first = post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}});
  });
  ASSERT_TRUE(wait_for([&] { return backend.active.load() == 1; }));
  Reply second = post(port, "/v1/completions", {{"prompt", "b"}, {"max_tokens", 10}});
  client.join();
  expect_error(second, 429, "queue");
  EXPECT_EQ(second.headers["Retry-After"], "1");
  EXPECT_EQ(first.status, 200);
  EXPECT_TRUE(wait_for([&] { return server->in_flight() == 0; }));
}

TEST_F(HttpTest, UnhealthyBackendIs503WithRetryAfter) {
  backend.healthy = false;
  Reply health = send(port, http::verb::get, "/health");
  expect_error(health, 503, "rank 1 down");
  EXPECT_EQ(health.headers["Retry-After"], "1");
  Reply completion = post(port, "/v1/completions", {{"prompt", "a"}});
  expect_error(completion, 503, "unhealthy");
  EXPECT_EQ(completion.headers["Retry-After"], "1");
}

TEST_F(HttpTest, BackendErrorBecomesErrorResponse) {
  backend.fail = true;
  Reply reply = post(port, "/v1/completions", {{"prompt", "a"}});
  expect_error(reply, 500, "expert rank crashed");
  Reply streamed = post(port, "/v1/completions", {{"prompt", "a"}, {"stream", true}});
  EXPECT_EQ(streamed.status, 200);
  std::vector<std::string> events = sse_payloads(streamed.body);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_NE(events[0].find("expert rank crashed"), std::string::npos);
  EXPECT_EQ(events[1], "[DONE]");
  EXPECT_TRUE(wait_for([&] { return server->in_flight() == 0; }));

  backend.fail = false;
  backend.drop = true;
  expect_error(post(port, "/v1/completions", {{"prompt", "a"}}), 500, "dropped");
}

TEST_F(HttpTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  for (int i = 0; i < 3; ++i) {
    Reply reply = send_on(socket, http::verb::post, "/v1/completions",
                          json{{"prompt", "a"}, {"max_tokens", 2}, {"stream", i == 1}}.dump(),
                          /*keep_alive=*/true);
    EXPECT_EQ(reply.status, 200) << reply.body;
  }
  EXPECT_EQ(send_on(socket, http::verb::get, "/health", "", true).status, 200);
}

TEST_F(HttpTest, PipelinedRequestsAndIdleTimeoutAfterGeneration) {
  HttpServerConfig config;
  config.idle_timeout = 300ms;
  restart(config);
  backend.delay_ms = 5;
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  // Two requests in one write: the second arrives while the first is generating.
  std::string body = json{{"prompt", "a"}, {"max_tokens", 3}}.dump();
  std::string one =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
      "application/json\r\nContent-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  net::write(socket, net::buffer(one + one));
  beast::flat_buffer buffer;
  for (int i = 0; i < 2; ++i) {
    http::response<http::string_body> res;
    http::read(socket, buffer, res);
    EXPECT_EQ(res.result_int(), 200);
    EXPECT_EQ(json::parse(res.body())["choices"][0]["text"], " t0 t1 t2");
  }
  // Then the connection idles: the server closes it after the request timeout.
  auto started = std::chrono::steady_clock::now();
  char data[16];
  beast::error_code ec;
  socket.read_some(net::buffer(data), ec);
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 3s);
}

// Opens a request on a raw socket, waits for the first bytes of the answer (or for the backend
// to start), then hangs up; the backend must see cancelled().
void disconnect_mid_request(uint16_t port, FakeBackend& backend, bool stream) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  std::string body = json{{"prompt", "a"}, {"max_tokens", 1000}, {"stream", stream}}.dump();
  std::string request =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
      "application/json\r\nContent-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  net::write(socket, net::buffer(request));
  if (stream) {
    char data[256];
    size_t got = socket.read_some(net::buffer(data));
    ASSERT_GT(got, 0u);
  } else {
    ASSERT_TRUE(wait_for([&] { return backend.active.load() == 1; }));
  }
  socket.close();
}

TEST_F(HttpTest, ClientDisconnectCancelsStreamingRequest) {
  backend.delay_ms = 5;
  disconnect_mid_request(port, backend, /*stream=*/true);
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 1; }));
  EXPECT_TRUE(wait_for([&] { return backend.active.load() == 0 && server->in_flight() == 0; }));
}

TEST_F(HttpTest, ClientDisconnectCancelsNonStreamingRequest) {
  backend.delay_ms = 5;
  disconnect_mid_request(port, backend, /*stream=*/false);
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 1; }));
  EXPECT_TRUE(wait_for([&] { return server->in_flight() == 0; }));
}

TEST_F(HttpTest, DrainFinishesInFlightAndRefusesNewConnections) {
  backend.delay_ms = 20;
  Reply plain;
  Reply streamed;
  std::thread a([&] {
    plain = post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}});
  });
  std::thread b([&] {
    streamed =
        post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 10}, {"stream", true}});
  });
  ASSERT_TRUE(wait_for([&] { return backend.active.load() == 2; }));
  server->stop_accepting();
  {
    net::io_context ioc;
    tcp::socket socket(ioc);
    beast::error_code ec;
    socket.connect({net::ip::make_address("127.0.0.1"), port}, ec);
    EXPECT_EQ(ec, net::error::connection_refused);
  }
  EXPECT_TRUE(server->drain(5000ms));
  a.join();
  b.join();
  EXPECT_EQ(plain.status, 200);
  EXPECT_EQ(plain.json_body()["choices"][0]["text"], " t0 t1 t2 t3 t4 t5 t6 t7 t8 t9");
  EXPECT_EQ(streamed.status, 200);
  EXPECT_EQ(sse_payloads(streamed.body).back(), "[DONE]");
  EXPECT_EQ(backend.cancellations.load(), 0);
}

TEST_F(HttpTest, DrainTimeoutFailsRemainingRequests) {
  backend.delay_ms = 10;
  Reply reply;
  std::thread client([&] {
    reply = post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1000}});
  });
  ASSERT_TRUE(wait_for([&] { return backend.active.load() == 1; }));
  EXPECT_FALSE(server->drain(50ms));
  client.join();
  expect_error(reply, 503, "shutting down");
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 1; }));
}

TEST_F(HttpTest, ConnectionLimit) {
  HttpServerConfig config;
  config.max_connections = 1;
  config.reserved_connections = 0;
  restart(config);
  net::io_context ioc;
  tcp::socket idle(ioc);
  idle.connect({net::ip::make_address("127.0.0.1"), port});
  ASSERT_TRUE(wait_for([&] { return server->open_connections() == 1; }));
  Reply refused = send(port, http::verb::get, "/health");
  expect_error(refused, 429, "connections");
  EXPECT_EQ(refused.headers["Retry-After"], "1");
}

TEST_F(HttpTest, SlowClientIsDisconnectedAfterRequestTimeout) {
  HttpServerConfig config;
  config.header_timeout = 200ms;
  restart(config);
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  net::write(socket, net::buffer(std::string("POST /v1/completions HTTP/1.1\r\nHost: x\r\n")));
  auto started = std::chrono::steady_clock::now();
  char data[64];
  beast::error_code ec;
  socket.read_some(net::buffer(data), ec);  // returns when the server hangs up
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 3s);
  EXPECT_TRUE(wait_for([&] { return server->open_connections() == 0; }));
}

TEST_F(HttpTest, CurlChatCompletion) {
  std::string command = "curl -s -S -m 10 http://127.0.0.1:" + std::to_string(port) +
                        "/v1/chat/completions -H 'Content-Type: application/json' -d "
                        "'{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                        "\"max_tokens\":3}' 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char chunk[512];
  while (size_t n = fread(chunk, 1, sizeof(chunk), pipe)) output.append(chunk, n);
  ASSERT_EQ(pclose(pipe), 0) << output;
  json body = json::parse(output, nullptr, false);
  ASSERT_FALSE(body.is_discarded()) << output;
  EXPECT_EQ(body["choices"][0]["message"]["content"], " t0 t1 t2");
}

TEST_F(HttpTest, SignalDrainsAndReturns) {
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    server->run_until_signal(2000ms);
    returned = true;
  });
  std::this_thread::sleep_for(100ms);  // let the signal_set register
  ASSERT_EQ(post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}}).status, 200);
  std::raise(SIGTERM);
  waiter.join();
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(server->in_flight(), 0);
}

// --- API keys, request ids, system_fingerprint, the small endpoints (issue 14) ---

const std::string kKey = "sk-keel-test-123";

Headers bearer(const std::string& key) {
  return {{"Authorization", "Bearer " + key}};
}

void expect_unauthorized(const Reply& reply, const std::string& what) {
  EXPECT_EQ(reply.status, 401) << what << ": " << reply.body;
  EXPECT_EQ(reply.headers.at("WWW-Authenticate"), "Bearer") << what;
  json body = json::parse(reply.body, nullptr, false);
  ASSERT_TRUE(body.contains("error")) << what << ": " << reply.body;
  EXPECT_EQ(body["error"]["code"], "invalid_api_key") << what;
  EXPECT_EQ(body["error"]["type"], "invalid_request_error") << what;
}

TEST_F(HttpTest, ApiKeyGuardsEveryEndpointButTheProbes) {
  std::atomic<int> extra_calls{0};
  HttpServerConfig config;
  config.auth = {kKey, ApiKeyScope::kApi};
  config.metrics = [] { return std::string("keel_up 1\n"); };
  config.extra_routes = [&](const std::string&, const std::string&, const std::string&,
                            const std::string&) -> std::optional<HttpServerConfig::ExtraResponse> {
    ++extra_calls;
    return HttpServerConfig::ExtraResponse{200, "{}", "application/json"};
  };
  restart(config);
  const std::string completion = json{{"prompt", "hi"}, {"max_tokens", 2}}.dump();
  const std::vector<std::pair<http::verb, std::string>> guarded = {
      {http::verb::post, "/v1/completions"},    {http::verb::post, "/v1/chat/completions"},
      {http::verb::get, "/v1/models"},          {http::verb::get, "/v1/models/fake-moe"},
      {http::verb::post, "/tokenize"},          {http::verb::post, "/detokenize"},
      {http::verb::post, "/v1/profile/stop"},   {http::verb::post, "/v1/profile/start"},
      {http::verb::get, "/v1/telemetry/steps"}, {http::verb::get, "/no/such/endpoint"}};
  const std::vector<std::pair<std::string, Headers>> wrong = {
      {"no header", {}},
      {"another key", bearer("sk-other")},
      {"a prefix of the key", bearer(kKey.substr(0, kKey.size() - 1))},
      {"the key and more", bearer(kKey + "4")},
      {"not Bearer", {{"Authorization", "Basic " + kKey}}},
      {"the key alone", {{"Authorization", kKey}}}};
  for (const auto& [verb, target] : guarded)
    for (const auto& [what, headers] : wrong)
      expect_unauthorized(send(port, verb, target, completion, headers), target + ", " + what);
  EXPECT_EQ(backend.submitted.load(), 0);
  EXPECT_EQ(extra_calls.load(), 0) << "a profile or telemetry route ran without the key";
  EXPECT_NE(json::parse(send(port, http::verb::get, "/v1/models").body)["error"]["message"]
                .get<std::string>()
                .find("Authorization: Bearer"),
            std::string::npos);

  EXPECT_EQ(send(port, http::verb::post, "/v1/completions", completion, bearer(kKey)).status, 200);
  EXPECT_EQ(send(port, http::verb::get, "/v1/models", "", bearer(kKey)).status, 200);
  // The scheme is case-insensitive (RFC 7235); the key is not.
  EXPECT_EQ(
      send(port, http::verb::get, "/v1/models", "", {{"Authorization", "bearer " + kKey}}).status,
      200);
  EXPECT_EQ(send(port, http::verb::post, "/v1/profile/start", "{}", bearer(kKey)).status, 200);
  EXPECT_EQ(extra_calls.load(), 1);
  EXPECT_EQ(backend.submitted.load(), 1);
  // The probes stay open under the default scope.
  for (const char* probe : {"/health", "/ping", "/version", "/metrics"})
    EXPECT_EQ(send(port, http::verb::get, probe).status, 200) << probe;
  EXPECT_EQ(send(port, http::verb::get, "/metrics").body, "keel_up 1\n");
}

TEST_F(HttpTest, ApiKeyScopeAllClosesTheProbesToo) {
  HttpServerConfig config;
  config.auth = {kKey, ApiKeyScope::kAll};
  restart(config);
  for (const char* probe : {"/health", "/ping", "/version", "/metrics"}) {
    expect_unauthorized(send(port, http::verb::get, probe), probe);
    EXPECT_EQ(send(port, http::verb::get, probe, "", bearer(kKey)).status, 200) << probe;
  }
}

TEST(Auth, ConstantTimeCompareScopesAndTheOpenBindWarning) {
  EXPECT_TRUE(constant_time_equal("abc", "abc"));
  EXPECT_TRUE(constant_time_equal("", ""));
  EXPECT_FALSE(constant_time_equal("abd", "abc"));
  EXPECT_FALSE(constant_time_equal("ab", "abc"));
  EXPECT_FALSE(constant_time_equal("abcd", "abc"));
  EXPECT_FALSE(constant_time_equal("", "abc"));
  EXPECT_FALSE(constant_time_equal(std::string("ab\0", 3), "ab"));
  AuthConfig none;
  EXPECT_FALSE(requires_api_key(none, "/v1/completions"));
  AuthConfig api{"k", ApiKeyScope::kApi};
  EXPECT_TRUE(requires_api_key(api, "/v1/completions"));
  EXPECT_TRUE(requires_api_key(api, "/v1/../health"));  // deny by default: no path tricks
  EXPECT_TRUE(requires_api_key(api, "/healthz"));
  EXPECT_FALSE(requires_api_key(api, "/health"));
  EXPECT_EQ(parse_api_key_scope("all", "x"), ApiKeyScope::kAll);
  EXPECT_THROW(parse_api_key_scope("none", "--api-key-scope"), keel::Error);

  for (const char* open : {"0.0.0.0", "::", "10.1.2.3", "192.168.0.7"}) {
    auto warning = open_bind_warning(open, none);
    ASSERT_TRUE(warning.has_value()) << open;
    EXPECT_NE(warning->find("without an API key"), std::string::npos) << *warning;
    EXPECT_NE(warning->find(open), std::string::npos) << *warning;
    EXPECT_FALSE(open_bind_warning(open, api).has_value()) << open;
  }
  for (const char* loopback : {"127.0.0.1", "127.0.0.2", "::1"})
    EXPECT_FALSE(open_bind_warning(loopback, none).has_value()) << loopback;
}

TEST_F(HttpTest, RequestIdIsEchoedOrGeneratedAndNamesTheRequest) {
  const json completion = {{"prompt", "hi"}, {"max_tokens", 2}};
  Reply given = send(port, http::verb::post, "/v1/completions", completion.dump(),
                     {{"x-request-id", "trace-42"}});
  ASSERT_EQ(given.status, 200) << given.body;
  EXPECT_EQ(given.headers["x-request-id"], "trace-42");
  EXPECT_EQ(given.json_body()["id"], "cmpl-trace-42");  // vLLM's shape of the response id
  EXPECT_EQ(backend.last_request().request_id, "trace-42");

  Reply generated = post(port, "/v1/completions", completion);
  ASSERT_EQ(generated.status, 200);
  const std::string id = generated.json_body()["id"];
  EXPECT_EQ(id.rfind("cmpl-", 0), 0u);
  EXPECT_EQ(generated.headers["x-request-id"], id);
  EXPECT_EQ(backend.last_request().request_id, id);

  // Choices of one request: the id with -i, as without the header.
  json two = completion;
  two["n"] = 2;
  const size_t seen = backend.requests_seen().size();
  Reply batch = send(port, http::verb::post, "/v1/chat/completions",
                     json{{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                          {"max_tokens", 2},
                          {"n", 2},
                          {"stream", true}}
                         .dump(),
                     {{"x-request-id", "trace-7"}});
  ASSERT_EQ(batch.status, 200);
  EXPECT_EQ(batch.headers["x-request-id"], "trace-7");
  std::set<std::string> ids;
  for (size_t i = seen; i < backend.requests_seen().size(); ++i)
    ids.insert(backend.requests_seen()[i].request_id);
  EXPECT_EQ(ids, (std::set<std::string>{"trace-7-0", "trace-7-1"}));

  // Every other response carries one too, errors included.
  EXPECT_EQ(send(port, http::verb::get, "/v1/models", "", {{"x-request-id", "m-1"}})
                .headers["x-request-id"],
            "m-1");
  EXPECT_EQ(send(port, http::verb::get, "/v1/models").headers["x-request-id"].rfind("req-", 0), 0u);
  json wrong_model = completion;
  wrong_model["model"] = "nope";
  EXPECT_EQ(
      send(port, http::verb::post, "/v1/completions", wrong_model.dump(), {{"x-request-id", "e-1"}})
          .headers["x-request-id"],
      "e-1");
  // An id that could not be logged or stored safely is refused.
  expect_error(send(port, http::verb::post, "/v1/completions", completion.dump(),
                    {{"x-request-id", std::string(257, 'a')}}),
               400, "x-request-id");
  expect_error(send(port, http::verb::post, "/v1/completions", completion.dump(),
                    {{"x-request-id", "two words"}}),
               400, "x-request-id");
}

TEST_F(HttpTest, SystemFingerprintInEveryResponseAndChunk) {
  const json chat = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 3}};
  EXPECT_TRUE(post(port, "/v1/chat/completions", chat).json_body().contains("system_fingerprint"));
  EXPECT_TRUE(post(port, "/v1/chat/completions", chat).json_body()["system_fingerprint"].is_null());
  HttpServerConfig config;
  config.system_fingerprint = "keel1;rev=abc;det=batch_invariant";
  restart(config);
  EXPECT_EQ(post(port, "/v1/chat/completions", chat).json_body()["system_fingerprint"],
            config.system_fingerprint);
  EXPECT_EQ(post(port, "/v1/completions", {{"prompt", "x"}, {"max_tokens", 2}})
                .json_body()["system_fingerprint"],
            config.system_fingerprint);
  for (const char* endpoint : {"/v1/completions", "/v1/chat/completions"}) {
    json body = std::string(endpoint) == "/v1/completions"
                    ? json{{"prompt", "x"}, {"max_tokens", 3}}
                    : chat;
    body["stream"] = true;
    body["stream_options"] = {{"include_usage", true}};
    Reply stream = post(port, endpoint, body);
    ASSERT_EQ(stream.status, 200);
    std::vector<std::string> events = sse_payloads(stream.body);
    ASSERT_GE(events.size(), 5u) << stream.body;  // (role), 3 tokens, finish, usage, [DONE]
    for (const std::string& event : events) {
      if (event == "[DONE]") continue;
      EXPECT_EQ(json::parse(event)["system_fingerprint"], config.system_fingerprint) << event;
    }
  }
}

TEST_F(HttpTest, ModelsAreAddressableByEveryServedName) {
  backend.aliases = {"alias-b", "/models/fake-moe"};
  restart({});
  Reply list = send(port, http::verb::get, "/v1/models");
  ASSERT_EQ(list.status, 200);
  std::vector<std::string> ids;
  const json cards = list.json_body()["data"];
  for (const json& card : cards) {
    ids.push_back(card["id"]);
    EXPECT_EQ(card["object"], "model");
    EXPECT_EQ(card["root"], "/models/fake-moe");
    EXPECT_EQ(card["max_model_len"], 4096);
  }
  EXPECT_EQ(ids, (std::vector<std::string>{"fake-moe", "alias-b", "/models/fake-moe"}));
  for (const char* target : {"/v1/models/fake-moe", "/v1/models/alias-b",
                             "/v1/models//models/fake-moe", "/v1/models/%2Fmodels%2Ffake-moe"}) {
    Reply card = send(port, http::verb::get, target);
    ASSERT_EQ(card.status, 200) << target << ": " << card.body;
    EXPECT_EQ(card.json_body()["object"], "model");
  }
  EXPECT_EQ(send(port, http::verb::get, "/v1/models/%2Fmodels%2Ffake-moe").json_body()["id"],
            "/models/fake-moe");
  Reply missing = send(port, http::verb::get, "/v1/models/nope");
  expect_error(missing, 404, "nope");
  EXPECT_EQ(missing.json_body()["error"]["code"], "model_not_found");
  expect_error(send(port, http::verb::post, "/v1/models/alias-b", "{}"), 405, "POST");
  for (const char* name : {"fake-moe", "alias-b", "/models/fake-moe"}) {
    Reply reply =
        post(port, "/v1/completions", {{"model", name}, {"prompt", "x"}, {"max_tokens", 1}});
    ASSERT_EQ(reply.status, 200) << name << ": " << reply.body;
    EXPECT_EQ(reply.json_body()["model"], "fake-moe");  // responses report the first name
  }
  Reply unknown = post(port, "/v1/completions", {{"model", "c"}, {"prompt", "x"}});
  expect_error(unknown, 404, "'alias-b'");
}

TEST_F(HttpTest, TokenizeAndDetokenizeInVllmShapes) {
  Reply plain = post(port, "/tokenize", {{"prompt", "hi"}});
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(plain.json_body(), (json{{"count", 3},
                                     {"max_model_len", 4096},
                                     {"tokens", {1000, 104, 105}},
                                     {"token_strs", nullptr}}));
  Reply strs = post(port, "/tokenize",
                    {{"model", "fake-moe"},
                     {"prompt", "hi"},
                     {"add_special_tokens", false},
                     {"return_token_strs", true}});
  ASSERT_EQ(strs.status, 200) << strs.body;
  EXPECT_EQ(strs.json_body()["tokens"], json({104, 105}));
  EXPECT_EQ(strs.json_body()["token_strs"], json({"h", "i"}));
  // A chat: the prompt /v1/chat/completions would render, without added special tokens.
  const json messages = {{{"role", "user"}, {"content", "hi"}}};
  Reply chat = post(port, "/tokenize", {{"messages", messages}});
  ASSERT_EQ(chat.status, 200) << chat.body;
  std::vector<int32_t> expected;
  ChatMessage user_hi;
  user_hi.role = "user";
  user_hi.content = "hi";
  for (unsigned char c : render_chatml({user_hi})) expected.push_back(c);
  EXPECT_EQ(chat.json_body()["tokens"], json(expected));
  EXPECT_EQ(chat.json_body()["count"], expected.size());

  // Text parts are joined with "\n", as vLLM joins them for templates that take a string.
  const json parts = {
      {{"role", "user"},
       {"content", {{{"type", "text"}, {"text", "h"}}, {{"type", "text"}, {"text", "i"}}}}}};
  Reply parts_reply = post(port, "/tokenize", {{"messages", parts}});
  ASSERT_EQ(parts_reply.status, 200) << parts_reply.body;
  ChatMessage joined;
  joined.role = "user";
  joined.content = "h\ni";
  std::vector<int32_t> joined_ids;
  for (unsigned char c : render_chatml({joined})) joined_ids.push_back(c);
  EXPECT_EQ(parts_reply.json_body()["tokens"], json(joined_ids));

  expect_error(post(port, "/tokenize", {{"messages", messages}, {"add_generation_prompt", false}}),
               400, "add_generation_prompt");
  expect_error(post(port, "/tokenize", {{"messages", messages}, {"tools", json::array({1})}}), 400,
               "tools");
  expect_error(post(port, "/tokenize", {{"prompt", "x"}, {"messages", messages}}), 400, "either");
  expect_error(post(port, "/tokenize", json::object()), 400, "either");
  expect_error(post(port, "/tokenize", {{"prompt", 5}}), 400, "prompt");
  expect_error(post(port, "/tokenize", {{"prompt", "x"}, {"bogus", 1}}), 400, "bogus");
  expect_error(post(port, "/tokenize", {{"prompt", "x"}, {"return_token_strs", "yes"}}), 400,
               "return_token_strs");
  expect_error(post(port, "/tokenize", {{"prompt", "x"}, {"model", "nope"}}), 404, "nope");
  expect_error(send(port, http::verb::post, "/tokenize", "{\"prompt\""), 400, "JSON");
  expect_error(send(port, http::verb::get, "/tokenize"), 405, "GET");

  Reply text = post(port, "/detokenize", {{"tokens", {104, 105}}});
  ASSERT_EQ(text.status, 200) << text.body;
  EXPECT_EQ(text.json_body(), (json{{"prompt", "hi"}}));
  expect_error(post(port, "/detokenize", {{"tokens", {300}}}), 400, "out of range");
  expect_error(post(port, "/detokenize", {{"tokens", "hi"}}), 400, "tokens");
  expect_error(post(port, "/detokenize", {{"tokens", {-1}}}), 400, "tokens");
  expect_error(post(port, "/detokenize", {{"tokens", {1.5}}}), 400, "tokens");
  expect_error(post(port, "/detokenize", {{"tokens", {1}}, {"prompt", "x"}}), 400, "prompt");
}

TEST_F(HttpTest, HeadHealthPingAndVersion) {
  const Reply get = send(port, http::verb::get, "/health");
  ASSERT_EQ(get.status, 200);
  // HEAD, twice on one connection: a body sent after the first would break the second.
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  for (int round = 0; round < 2; ++round) {
    Reply head = send_on(socket, http::verb::head, "/health", "", /*keep_alive=*/true);
    EXPECT_EQ(head.status, 200);
    EXPECT_EQ(head.body, "");
    EXPECT_EQ(head.headers["Content-Length"], std::to_string(get.body.size()));
  }
  // Refused methods on HEAD get no body either.
  EXPECT_EQ(send_on(socket, http::verb::head, "/v1/completions", "", true).status, 405);
  EXPECT_EQ(send_on(socket, http::verb::get, "/health", "", true).body, get.body);
  backend.healthy = false;
  EXPECT_EQ(send_on(socket, http::verb::head, "/health", "", true).status, 503);
  EXPECT_EQ(send(port, http::verb::get, "/ping").status, 503);
  backend.healthy = true;

  EXPECT_EQ(send(port, http::verb::get, "/ping").status, 200);
  EXPECT_EQ(send(port, http::verb::post, "/ping").status, 200);
  expect_error(send(port, http::verb::delete_, "/ping"), 405, "DELETE");
  Reply version = send(port, http::verb::get, "/version");
  ASSERT_EQ(version.status, 200);
  EXPECT_EQ(version.json_body()["version"], std::string(keel::build_revision()));
  EXPECT_FALSE(std::string(keel::build_revision()).empty());
}

// A request on a fresh connection that honours 429 + Retry-After as a client should; returns
// the final reply and how many 429s it took.
Reply send_with_retries(uint16_t port, http::verb verb, const std::string& target,
                        const std::string& body, int* num_429) {
  for (;;) {
    Reply reply;
    try {
      reply = send(port, verb, target, body);
    } catch (const std::exception&) {
      reply.status = 0;  // closed before answering (made room for another): retry at once
    }
    if (reply.status != 429 && reply.status != 0) return reply;
    if (reply.status == 429) {
      ++*num_429;
      std::this_thread::sleep_for(std::chrono::seconds(std::stoi(reply.headers["Retry-After"])));
    }
  }
}

// Connections that hold a slot without work, reconnecting (after a second, as Retry-After
// says) whenever the server closes them: `silent` ones send nothing, `slow` ones half a
// request's headers, `idle` ones one keep-alive /health and then nothing.
class Squatters {
 public:
  enum class Kind { kSilent, kSlow, kIdle };
  Squatters(uint16_t port, Kind kind, int count) {
    for (int i = 0; i < count; ++i) threads_.emplace_back([this, port, kind] { run(port, kind); });
  }
  ~Squatters() {
    stop_ = true;
    for (auto& thread : threads_) thread.join();
  }
  int connects() const { return connects_.load(); }

 private:
  void run(uint16_t port, Kind kind) {
    while (!stop_) {
      net::io_context ioc;
      tcp::socket socket(ioc);
      beast::error_code ec;
      socket.connect({net::ip::make_address("127.0.0.1"), port}, ec);
      if (ec) return;
      ++connects_;
      if (kind == Kind::kSlow)
        net::write(socket, net::buffer(std::string("POST /v1/completions HTTP/1.1\r\nHost: x\r\n")),
                   ec);
      if (kind == Kind::kIdle) {
        try {
          send_on(socket, http::verb::get, "/health", "", /*keep_alive=*/true);
        } catch (const std::exception&) {
        }
      }
      // Wait (polling the stop flag) until the server closes the connection.
      socket.non_blocking(true);
      char data[512];
      while (!stop_) {
        socket.read_some(net::buffer(data), ec);
        if (ec && ec != net::error::would_block) break;
        std::this_thread::sleep_for(10ms);
      }
      for (int i = 0; i < 100 && !stop_; ++i) std::this_thread::sleep_for(10ms);
    }
  }
  std::atomic<bool> stop_{false};
  std::atomic<int> connects_{0};
  std::vector<std::thread> threads_;
};

// Three times the cap in each kind of squatter, all reconnecting: completions and /health are
// still answered 200 within a bound far below every timeout (which are a minute here, so no
// timeout is what frees the slots), because squatters are closed to make room.
TEST_F(HttpTest, SquattersBeyondTheCapDoNotDenyService) {
  HttpServerConfig config;
  config.max_connections = 4;
  config.reserved_connections = 2;
  config.header_timeout = 60s;
  config.body_timeout = 60s;
  config.idle_timeout = 60s;
  config.slow_request_grace = 100ms;
  restart(config);
  // First kept-alive squatters that hold every slot, then silent and slow ones on top; then
  // silent and slow ones alone.
  for (bool with_idle : {true, false}) {
    std::optional<Squatters> idle;
    if (with_idle) {
      idle.emplace(port, Squatters::Kind::kIdle, 12);
      ASSERT_TRUE(wait_for([&] { return idle->connects() >= 12; }, 10s));
    }
    Squatters silent(port, Squatters::Kind::kSilent, 12);
    Squatters slow(port, Squatters::Kind::kSlow, 12);
    const int squatters = with_idle ? 36 : 24;
    ASSERT_TRUE(wait_for(
        [&] {
          return silent.connects() + slow.connects() + (idle ? idle->connects() : 0) >= squatters;
        },
        10s));
    const HttpServerStats before = server->stats();
    const auto started = std::chrono::steady_clock::now();
    int num_429 = 0;
    for (int i = 0; i < 5; ++i) {
      Reply completion =
          send_with_retries(port, http::verb::post, "/v1/completions",
                            json{{"prompt", "a"}, {"max_tokens", 2}}.dump(), &num_429);
      EXPECT_EQ(completion.status, 200) << completion.body;
      Reply health = send_with_retries(port, http::verb::get, "/health", "", &num_429);
      EXPECT_EQ(health.status, 200) << health.body;
    }
    EXPECT_LT(std::chrono::steady_clock::now() - started, 30s);  // the timeouts are 60 s
    const HttpServerStats after = server->stats();
    // Room was made by closing squatters of the kinds present, not by timeouts.
    EXPECT_GT(after.evicted_idle + after.evicted_slow, before.evicted_idle + before.evicted_slow);
    if (with_idle) {
      EXPECT_GT(after.evicted_idle, 0);
    } else {
      EXPECT_GT(after.evicted_slow, before.evicted_slow);
    }
    EXPECT_LE(after.open_connections,
              config.max_connections + config.reserved_connections + 2);  // + a few that raced
    std::printf("squatters %s: 10 requests in %.2f s, %d answered 429 first\n",
                with_idle ? "silent+slow+idle" : "silent+slow",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(),
                num_429);
  }
}

// Every regular slot busy with a request: /health and /metrics are still served on a reserve
// connection, a completion gets the 429 max_waiting promises (not 503), and past the reserve
// the answer is 429 without reading.
TEST_F(HttpTest, BusyCapLeavesTheReserveForHealthAndAnswers429) {
  HttpServerConfig config;
  config.max_connections = 2;
  config.reserved_connections = 1;
  config.metrics = [] { return std::string("keel_up 1\n"); };
  restart(config);
  backend.delay_ms = 10;
  std::vector<std::thread> busy;
  for (int i = 0; i < 2; ++i)
    busy.emplace_back([&] {
      EXPECT_EQ(post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 300}}).status, 200);
    });
  ASSERT_TRUE(wait_for([&] { return backend.active.load() == 2; }));
  Reply health = send(port, http::verb::get, "/health");
  EXPECT_EQ(health.status, 200) << health.body;
  EXPECT_EQ(health.headers["Connection"], "close");  // a reserve connection serves one request
  // The client reads the reply before the server has closed its side and freed the slot.
  ASSERT_TRUE(wait_for([&] { return server->stats().reserve_connections == 0; }));
  Reply metrics = send(port, http::verb::get, "/metrics");
  EXPECT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.body, "keel_up 1\n");
  ASSERT_TRUE(wait_for([&] { return server->stats().reserve_connections == 0; }));
  Reply completion = post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 1}});
  expect_error(completion, 429, "requests");
  EXPECT_EQ(completion.json_body()["error"]["type"], "rate_limit_error");
  EXPECT_EQ(completion.headers["Retry-After"], "1");
  // The reserve held by a connection that has not sent its request yet: refused unread.
  net::io_context ioc;
  tcp::socket holder(ioc);
  holder.connect({net::ip::make_address("127.0.0.1"), port});
  ASSERT_TRUE(wait_for([&] { return server->stats().reserve_connections == 1; }));
  Reply refused = send(port, http::verb::get, "/health");
  expect_error(refused, 429, "connections");
  EXPECT_EQ(refused.headers["Retry-After"], "1");
  for (auto& thread : busy) thread.join();
  HttpServerStats stats = server->stats();
  EXPECT_EQ(stats.reserve_refused, 1);
  EXPECT_EQ(stats.refused, 1);
}

TEST_F(HttpTest, BodyTimeoutClosesAConnectionWhoseBodyStalls) {
  HttpServerConfig config;
  config.header_timeout = 60s;
  config.body_timeout = 200ms;
  restart(config);
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  net::write(socket, net::buffer(std::string("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                             "Content-Length: 100\r\n\r\n{\"prompt\"")));
  auto started = std::chrono::steady_clock::now();
  char data[64];
  beast::error_code ec;
  socket.read_some(net::buffer(data), ec);  // returns when the server hangs up
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 30s);  // the body timeout, not the header's
  EXPECT_TRUE(wait_for([&] { return server->open_connections() == 0; }));
}

// A streaming client that never reads: once max_unsent_bytes of its stream wait in the server
// (beyond what the kernel buffers hold), its request is cancelled, freeing the backend: all 8
// choices stop long before their 4096 tokens (~8 KB each: the token text names the prompt).
TEST_F(HttpTest, StreamNobodyReadsIsCancelledPastTheUnsentLimit) {
  HttpServerConfig config;
  config.max_unsent_bytes = 64 * 1024;
  config.send_timeout = 600s;  // not what ends it
  restart(config);
  backend.tag_with_prompt = true;
  backend.delay_ms = 1;
  net::io_context ioc;
  tcp::socket socket(ioc);
  socket.open(tcp::v4());
  socket.set_option(net::socket_base::receive_buffer_size(4096));
  socket.connect({net::ip::make_address("127.0.0.1"), port});
  std::string body = json{
      {"prompt", std::string(2000, 'x')},
      {"max_tokens", 4096},
      {"n", 8},
      {"logprobs", 1},
      {"stream", true}}.dump();
  net::write(socket, net::buffer("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                 "application/json\r\nContent-Length: " +
                                 std::to_string(body.size()) + "\r\n\r\n" + body));
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 8; }, 60s));
  EXPECT_TRUE(wait_for([&] { return server->in_flight() == 0 && backend.active.load() == 0; }));
  EXPECT_EQ(server->stats().slow_reader_aborts, 1);
  EXPECT_TRUE(wait_for([&] { return server->open_connections() == 0; }));
}

// SIGTERM starts the drain; a second one means stop now: the request still generating gets
// its 503 at once rather than at the (one minute) drain deadline or its own end (40 s away).
TEST_F(HttpTest, SecondSignalDuringTheDrainStopsNow) {
  backend.delay_ms = 10;
  Reply reply;
  std::thread client([&] {
    reply = post(port, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 4000}});
  });
  ASSERT_TRUE(wait_for([&] { return backend.active.load() == 1; }));
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    server->run_until_signal(60000ms);
    returned = true;
  });
  std::this_thread::sleep_for(100ms);  // let the signal_set register
  std::raise(SIGTERM);
  // Draining: the listener is closed, the request goes on.
  ASSERT_TRUE(wait_for([&] {
    net::io_context ioc;
    tcp::socket socket(ioc);
    beast::error_code ec;
    socket.connect({net::ip::make_address("127.0.0.1"), port}, ec);
    return ec == net::error::connection_refused;
  }));
  EXPECT_FALSE(returned.load());
  EXPECT_EQ(server->in_flight(), 1);
  std::raise(SIGTERM);
  waiter.join();
  client.join();
  expect_error(reply, 503, "shutting down");
  EXPECT_TRUE(wait_for([&] { return backend.cancellations.load() == 1; }));
  server.reset();
}

}  // namespace
