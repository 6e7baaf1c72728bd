// The contract between the HTTP layer and whatever generates tokens (the engine, or a fake in
// tests). The server parses and validates an OpenAI request into a CompletionRequest, hands it
// to GenerationBackend::try_submit together with a TokenSink, and turns the sink's callbacks
// into a JSON body or an SSE stream. Nothing here depends on Beast, so the engine can
// implement the backend without pulling in Boost.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/server/tool_calls.h"

namespace keel::server {

// A call of an assistant message in the history (OpenAI's tool_calls entry). The arguments
// string is parsed here: chat templates render arguments as a mapping (vLLM parses them too).
struct ChatMessageToolCall {
  std::string id;
  std::string name;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::object();  // client's key order
};

struct ChatMessage {
  std::string role;
  std::string content;  // a list of text parts: the parts joined with "\n" (below)
  // The text parts when content came as a list (empty for a string). vLLM hands a template
  // that loops over content (Qwen3.5's) the list, and every other template the parts joined
  // with "\n"; the renderers do the same.
  std::vector<std::string> content_parts;
  std::vector<ChatMessageToolCall> tool_calls;   // assistant messages
  std::optional<std::string> reasoning_content;  // assistant messages (vLLM's field)
  std::string tool_call_id;                      // tool messages
};

// OpenAI tool_choice: what keel implements. "required" and a named function would need
// constrained decoding and are refused.
enum class ToolChoice { kNone, kAuto };

// What the model's chat template can do with tools and reasoning; decides which request fields
// are accepted and how the output is read (the default: plain ChatML, neither).
struct ChatCapabilities {
  std::string template_family = "chatml";
  ToolCallFormat tool_calls = ToolCallFormat::kNone;  // kNone: tools are refused
  bool reasoning = false;         // outputs carry <think> reasoning (Qwen3 / Qwen3.5)
  bool thinking_switch = false;   // chat_template_kwargs.enable_thinking is understood
  bool thinking_default = false;  // thinking is on when the request does not say
};

enum class Endpoint { kCompletions, kChatCompletions };

// One prompt of a batched /v1/completions request ("prompt": ["a", "b"] or [[1, 2], [3]]).
struct PromptInput {
  std::optional<std::vector<int32_t>> tokens;  // the client sent token ids
  std::string text;                            // otherwise the text
};

// Prompts one /v1/completions request may carry (each becomes a request of its own).
inline constexpr size_t kMaxPromptsPerRequest = 64;

// A parsed, validated request. Exactly one prompt form is set: prompt_tokens (the client sent
// token ids) or prompt_text (a plain prompt, or chat messages rendered through the template;
// the backend tokenizes it).
struct CompletionRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  std::optional<std::vector<int32_t>> prompt_tokens;
  std::string prompt_text;
  std::vector<ChatMessage> messages;  // chat only; kept for backends with their own template
  // Chat: the request's tools as sent (key order kept: the template prints them), tool_choice
  // (OpenAI's default: auto when tools are given), parallel_tool_calls (false: at most one
  // call is returned) and chat_template_kwargs.enable_thinking (unset: the template's default).
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();
  ToolChoice tool_choice = ToolChoice::kNone;
  bool parallel_tool_calls = true;
  bool include_reasoning = true;  // vLLM's: false drops reasoning_content (still split off)
  std::optional<bool> enable_thinking;
  // Prompts 2..N of a batch: the server runs each as a request of its own with every other
  // field of this one, and answers with choice i for prompt i. Empty for a single prompt.
  std::vector<PromptInput> more_prompts;

  int max_tokens = 16;  // OpenAI default for /v1/completions; chat default is set by the parser
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = -1;  // -1: disabled (not an OpenAI field, but vLLM-compatible clients send it)
  std::optional<uint64_t> seed;
  // Stop strings: the backend stops generating when the detokenized output contains one and
  // leaves it out of the text, reporting finish_reason "stop".
  std::vector<std::string> stop;
  bool stream = false;
  bool ignore_eos = false;      // vLLM extension: generate max_tokens even past end-of-sequence
  bool return_routing = false;  // keel extension: the response carries "routed_experts"
  std::string request_id;       // the response id ("cmpl-..."), set by the server
  bool include_usage_in_stream = false;  // stream_options.include_usage
  bool logprobs = false;
  int top_logprobs = 0;  // number of alternatives per position when logprobs is on

  // Logits processing (runtime/sampling/sampler.h has the formulas and their order).
  float presence_penalty = 0.0f;    // [-2, 2], OpenAI
  float frequency_penalty = 0.0f;   // [-2, 2], OpenAI
  float repetition_penalty = 1.0f;  // > 0, vLLM (HF semantics, over prompt + output)
  float min_p = 0.0f;               // [0, 1], vLLM
  // OpenAI logit_bias {"token id": bias in [-100, 100]}, sorted by id; ids are checked against
  // the vocabulary by the backend.
  std::vector<std::pair<int32_t, float>> logit_bias;
  // vLLM: end-of-sequence and stop_token_ids are masked (and stop strings not looked for) until
  // this many tokens were generated. <= max_tokens.
  int min_tokens = 0;
  // vLLM: generation also ends ("stop") after any of these ids, even with ignore_eos.
  std::vector<int32_t> stop_token_ids;
  bool include_stop_str_in_output = false;  // vLLM: keep the matched stop string in the text
  bool skip_special_tokens = true;          // vLLM: special tokens left out of the text
  // Choices per prompt (OpenAI n). The server runs choice j of a prompt as a request of its own
  // whose seed is seed + j (vLLM's rule), so choice j is reproducible alone.
  int n = 1;
  // vLLM prompt_logprobs: logprobs of every prompt token (the first has none) and this many
  // alternatives; nullopt = off. Refused with stream.
  std::optional<int> prompt_logprobs;
  bool echo = false;  // /v1/completions: the text (and logprobs) begin with the prompt's
  // vLLM: logprobs name tokens "token_id:N" instead of their text.
  bool return_tokens_as_token_ids = false;
};

// Upper bound on n, and on prompts x n choices of one request.
inline constexpr int kMaxChoicesPerRequest = 128;

struct TopLogprob {
  std::string token;  // the token's own text (decoded alone)
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::string bytes;  // the token's own bytes (possibly part of a UTF-8 sequence)
};

// One generated token as the backend reports it.
struct GeneratedToken {
  std::string text_delta;  // text the response gains (complete UTF-8, after stop handling)
  int32_t token_id = 0;
  std::string token_text;   // the token's own text, decoded alone
  std::string token_bytes;  // the token's own bytes
  float logprob = 0.0f;
  std::vector<TopLogprob> top_logprobs;
};

// One prompt token with its logprobs (vLLM's prompt_logprobs entry).
struct PromptToken {
  int32_t token_id = 0;
  std::string text;   // decoded alone
  std::string bytes;  // its own bytes
  // Logprob under the model's distribution at the previous position, and its vLLM rank; none
  // for the first prompt token (nothing precedes it) or when logprobs were not computed.
  std::optional<float> logprob;
  int64_t rank = 0;
  std::vector<TopLogprob> top_logprobs;
};

// What the backend reports of the prompt before the first generated token, when the request
// asks for echo or prompt_logprobs.
struct PromptOutput {
  std::string text;  // the prompt as text (as sent, or decoded from the ids)
  std::vector<PromptToken> tokens;
};

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

// Receives one request's output. The backend may call it from any thread, but calls for one
// request must not overlap. A request ends with exactly one on_finish or on_error, unless
// cancelled() became true: then the backend should stop at its next step, free the request's
// KV blocks, and may drop the sink without a final call.
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  // Once, before the first on_token, when the request asks for echo or prompt_logprobs.
  virtual void on_prompt(const PromptOutput& prompt) { (void)prompt; }
  virtual void on_token(const GeneratedToken& token) = 0;
  // finish_reason: "stop" (EOS or stop string) or "length" (max_tokens / context).
  virtual void on_finish(const std::string& finish_reason, Usage usage) = 0;
  // on_finish with fields to add to the response's choice (e.g. "routed_experts"); sinks that
  // cannot carry them just finish.
  virtual void on_finish_with(const std::string& finish_reason, Usage usage,
                              nlohmann::json choice_fields) {
    (void)choice_fields;
    on_finish(finish_reason, usage);
  }
  virtual void on_error(const std::string& message) = 0;
  // The backend can serve nothing any more (a rank died or hangs, README "Faults"): the client
  // gets 503 (an SSE error event with that status when streaming). Default: on_error.
  virtual void on_unavailable(const std::string& message) { on_error(message); }
  // True once the client went away (or the server is shutting down the request).
  virtual bool cancelled() const = 0;
};

// A client error detected while parsing: becomes an OpenAI error body with HTTP status.
struct RequestError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the offending field, empty when none
  std::string code;
};

struct BackendHealth {
  bool healthy = true;
  std::string detail;  // shown in /health and in 503 bodies
  // Unhealthy only because steps are stalled (README "Faults"): /health answers 503, but new
  // requests still queue -- a slow step recovers, and a dead rank fails them with a 503.
  bool stalled_only = false;
};

// POST /tokenize's answer from the backend: the ids and each id's token string as the
// vocabulary stores it (vLLM's token_strs, e.g. "Ġthe" for a byte-level BPE).
struct Tokenized {
  std::vector<int32_t> ids;
  std::vector<std::string> token_strs;
};

class GenerationBackend {
 public:
  virtual ~GenerationBackend() = default;
  virtual std::string model_name() const = 0;
  // Every name a request's "model" may carry; the first is model_name(), the one responses
  // report. Default: model_name() alone.
  virtual std::vector<std::string> served_model_names() const { return {model_name()}; }
  // Where the model was loaded from (GET /v1/models "root"); empty when it was not.
  virtual std::string model_root() const { return ""; }
  // POST /tokenize and POST /detokenize. A backend without a tokenizer keeps these defaults,
  // which refuse with 501.
  virtual std::optional<RequestError> tokenize(const std::string& text, bool add_special_tokens,
                                               Tokenized& out) {
    (void)text, (void)add_special_tokens, (void)out;
    return RequestError{501, "this backend has no tokenizer", "server_error", "", ""};
  }
  virtual std::optional<RequestError> detokenize(const std::vector<int32_t>& ids,
                                                 std::string& text) {
    (void)ids, (void)text;
    return RequestError{501, "this backend has no tokenizer", "server_error", "", ""};
  }
  virtual int max_context() const = 0;
  // Queue the request. Returns false (without touching the sink) when the queue is full;
  // the server answers 429 with Retry-After. Must not block on generation.
  virtual bool try_submit(CompletionRequest request, std::shared_ptr<TokenSink> sink) = 0;
  virtual BackendHealth health() const = 0;
  // Called with each parsed request before try_submit, on a server thread: a backend may
  // tokenize prompt_text into prompt_tokens and reject what only it can judge (a prompt longer
  // than the context, a text prompt without a tokenizer) with a 4xx. Default: accept.
  virtual std::optional<RequestError> prepare(CompletionRequest& /*request*/) {
    return std::nullopt;
  }
};

// Renders a chat request (messages, tools, enable_thinking) into one prompt string; throws
// keel::Error where the template refuses the conversation (the server answers 400). Default:
// ChatML.
using ChatTemplate = std::function<std::string(const CompletionRequest&)>;
std::string render_chatml(const std::vector<ChatMessage>& messages);

// Parses and validates a request body for `endpoint`. On failure returns the error (naming
// the field) and leaves `out` unspecified.
std::optional<RequestError> parse_completion_request(const std::string& body, Endpoint endpoint,
                                                     int max_context, CompletionRequest& out);

nlohmann::json error_body(const RequestError& error);

}  // namespace keel::server
