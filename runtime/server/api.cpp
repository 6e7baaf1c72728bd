#include "runtime/server/api.h"

#include <cmath>
#include <limits>

namespace keel::server {
namespace {

using nlohmann::json;

RequestError field_error(const std::string& field, const std::string& what) {
  RequestError error;
  error.status = 400;
  error.param = field;
  error.message = "'" + field + "': " + what;
  return error;
}

// JSON numbers arrive as integer or float; integers must not have a fraction.
bool as_int(const json& value, int64_t& out) {
  if (value.is_number_integer()) {
    out = value.get<int64_t>();
    return true;
  }
  if (value.is_number_unsigned()) {
    uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    out = static_cast<int64_t>(u);
    return true;
  }
  return false;
}

std::optional<RequestError> read_int(const json& body, const char* field, int64_t lo, int64_t hi,
                                     int& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  int64_t value = 0;
  if (!as_int(*it, value)) return field_error(field, "must be an integer");
  if (value < lo || value > hi) {
    return field_error(field, "must be between " + std::to_string(lo) + " and " +
                                  std::to_string(hi) + ", got " + std::to_string(value));
  }
  out = static_cast<int>(value);
  return std::nullopt;
}

std::optional<RequestError> read_float(const json& body, const char* field, double lo, double hi,
                                       bool lo_exclusive, float& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return field_error(field, "must be a number");
  double value = it->get<double>();
  bool below = lo_exclusive ? value <= lo : value < lo;
  if (!std::isfinite(value) || below || value > hi) {
    std::string range = (lo_exclusive ? "(" : "[") + json(lo).dump() + ", " + json(hi).dump() + "]";
    return field_error(field, "must be in " + range + ", got " + it->dump());
  }
  out = static_cast<float>(value);
  return std::nullopt;
}

std::optional<RequestError> read_bool(const json& body, const char* field, bool& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return field_error(field, "must be a boolean");
  out = it->get<bool>();
  return std::nullopt;
}

std::optional<RequestError> read_token_ids(const json& list, const std::string& field,
                                           std::vector<int32_t>& out) {
  out.clear();
  for (const json& item : list) {
    int64_t id = 0;
    if (!as_int(item, id) || id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return field_error(field, "token ids must be non-negative integers");
    }
    out.push_back(static_cast<int32_t>(id));
  }
  return std::nullopt;
}

// prompt: "text" | [ids...] | ["text", ...] | [[ids...], ...]. A list of several prompts is a
// batch: each runs as a request of its own (choice i answers prompt i).
std::optional<RequestError> read_prompt(const json& body, CompletionRequest& out) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return field_error("prompt", "is required");
  const json& prompt = *it;
  if (prompt.is_string()) {
    out.prompt_text = prompt.get<std::string>();
    return std::nullopt;
  }
  if (!prompt.is_array()) {
    return field_error("prompt",
                       "must be a string, a list of token ids, or a list of strings or of "
                       "token id lists");
  }
  if (prompt.empty()) return field_error("prompt", "must not be empty");
  if (!prompt[0].is_string() && !prompt[0].is_array()) {
    std::vector<int32_t> ids;
    if (auto error = read_token_ids(prompt, "prompt", ids)) return error;
    out.prompt_tokens = std::move(ids);
    return std::nullopt;
  }
  if (prompt.size() > kMaxPromptsPerRequest) {
    return field_error("prompt", "a batch of " + std::to_string(prompt.size()) +
                                     " prompts exceeds the limit of " +
                                     std::to_string(kMaxPromptsPerRequest) + " per request");
  }
  for (size_t index = 0; index < prompt.size(); ++index) {
    const json& item = prompt[index];
    const std::string where = "prompt[" + std::to_string(index) + "]";
    PromptInput input;
    if (item.is_string()) {
      input.text = item.get<std::string>();
    } else if (item.is_array()) {
      std::vector<int32_t> ids;
      if (auto error = read_token_ids(item, where, ids)) return error;
      if (ids.empty()) return field_error(where, "must not be empty");
      input.tokens = std::move(ids);
    } else {
      return field_error(where, "must be a string or a list of token ids");
    }
    if (index == 0) {
      out.prompt_text = std::move(input.text);
      out.prompt_tokens = std::move(input.tokens);
    } else {
      out.more_prompts.push_back(std::move(input));
    }
  }
  return std::nullopt;
}

std::optional<RequestError> read_messages(const json& body, CompletionRequest& out) {
  auto it = body.find("messages");
  if (it == body.end() || it->is_null()) return field_error("messages", "is required");
  if (!it->is_array() || it->empty()) return field_error("messages", "must be a non-empty list");
  for (size_t i = 0; i < it->size(); ++i) {
    const json& message = (*it)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!message.is_object()) return field_error(where, "must be an object");
    auto role = message.find("role");
    if (role == message.end() || !role->is_string()) {
      return field_error(where + ".role", "must be a string");
    }
    const std::string role_name = role->get<std::string>();
    if (role_name != "system" && role_name != "user" && role_name != "assistant" &&
        role_name != "tool" && role_name != "developer") {
      return field_error(where + ".role", "unknown role '" + role_name + "'");
    }
    ChatMessage parsed{role_name, ""};
    auto content = message.find("content");
    if (content == message.end() || content->is_null()) {
      // An assistant turn may carry only tool calls; it renders as empty content.
    } else if (content->is_string()) {
      parsed.content = content->get<std::string>();
    } else if (content->is_array()) {
      // Content parts: only text is understood; images etc. are refused by name.
      for (const json& part : *content) {
        const std::string part_type =
            part.is_object() && part.contains("type") && part["type"].is_string()
                ? part["type"].get<std::string>()
                : "";
        if (part_type != "text" && !part_type.empty())
          return field_error(where + ".content",
                             "content part of type '" + part_type +
                                 "' is not supported: keel serves text only (the vision tower "
                                 "of a vision-language checkpoint is not loaded)");
        if (!part.is_object() || part_type != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return field_error(where + ".content", "only text content parts are supported");
        }
        parsed.content += part["text"].get<std::string>();
      }
    } else {
      return field_error(where + ".content", "must be a string or a list of text parts");
    }
    out.messages.push_back(std::move(parsed));
  }
  return std::nullopt;
}

}  // namespace

std::string render_chatml(const std::vector<ChatMessage>& messages) {
  std::string prompt;
  for (const ChatMessage& message : messages) {
    prompt += "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n";
  }
  prompt += "<|im_start|>assistant\n";
  return prompt;
}

nlohmann::json error_body(const RequestError& error) {
  json inner = {{"message", error.message}, {"type", error.type}};
  inner["param"] = error.param.empty() ? json(nullptr) : json(error.param);
  inner["code"] = error.code.empty() ? json(nullptr) : json(error.code);
  return json{{"error", inner}};
}

std::optional<RequestError> parse_completion_request(const std::string& body_text,
                                                     Endpoint endpoint, int max_context,
                                                     CompletionRequest& out) {
  out = CompletionRequest{};
  out.endpoint = endpoint;
  // Parse without exceptions: a malformed body is the client's error, not ours.
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    RequestError error;
    error.message = "request body is not valid JSON";
    error.code = "invalid_json";
    return error;
  }
  if (!body.is_object()) {
    RequestError error;
    error.message = "request body must be a JSON object";
    return error;
  }

  if (auto it = body.find("model"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) return field_error("model", "must be a string");
    out.model = it->get<std::string>();
  }

  if (endpoint == Endpoint::kCompletions) {
    if (auto error = read_prompt(body, out)) return error;
  } else {
    if (auto error = read_messages(body, out)) return error;
    out.max_tokens = std::max(1, max_context);  // chat default: until EOS or context end
  }

  const int64_t context_limit = std::max(1, max_context);
  if (auto error = read_int(body, "max_tokens", 1, context_limit, out.max_tokens)) return error;
  if (endpoint == Endpoint::kChatCompletions) {
    // Newer clients send max_completion_tokens instead of max_tokens.
    if (auto error = read_int(body, "max_completion_tokens", 1, context_limit, out.max_tokens)) {
      return error;
    }
  }
  auto check_tokens = [&](const std::optional<std::vector<int32_t>>& tokens,
                          const std::string& field) -> std::optional<RequestError> {
    if (!tokens) return std::nullopt;
    if (tokens->empty()) return field_error(field, "must not be empty");
    if (static_cast<int64_t>(tokens->size()) >= context_limit) {
      return field_error(field, "has " + std::to_string(tokens->size()) +
                                    " tokens; the context is " + std::to_string(context_limit));
    }
    return std::nullopt;
  };
  if (auto error = check_tokens(out.prompt_tokens, "prompt")) return error;
  for (size_t index = 0; index < out.more_prompts.size(); ++index) {
    if (auto error = check_tokens(out.more_prompts[index].tokens,
                                  "prompt[" + std::to_string(index + 1) + "]"))
      return error;
  }
  if (auto error = read_float(body, "temperature", 0.0, 2.0, false, out.temperature)) return error;
  if (auto error = read_float(body, "top_p", 0.0, 1.0, true, out.top_p)) return error;
  if (auto error = read_int(body, "top_k", -1, std::numeric_limits<int>::max(), out.top_k)) {
    return error;
  }
  if (auto it = body.find("seed"); it != body.end() && !it->is_null()) {
    int64_t seed = 0;
    if (!as_int(*it, seed)) return field_error("seed", "must be an integer");
    out.seed = static_cast<uint64_t>(seed);
  }
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      out.stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      if (it->size() > 4) return field_error("stop", "at most 4 stop sequences");
      for (const json& item : *it) {
        if (!item.is_string()) return field_error("stop", "must be a string or a list of strings");
        out.stop.push_back(item.get<std::string>());
      }
    } else {
      return field_error("stop", "must be a string or a list of strings");
    }
    for (const std::string& stop : out.stop) {
      if (stop.empty()) return field_error("stop", "stop sequences must not be empty");
    }
  }
  if (auto error = read_bool(body, "stream", out.stream)) return error;
  if (auto error = read_bool(body, "ignore_eos", out.ignore_eos)) return error;
  if (auto error = read_bool(body, "return_routing", out.return_routing)) return error;
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return field_error("stream_options", "must be an object");
    if (auto error = read_bool(*it, "include_usage", out.include_usage_in_stream)) {
      error->param = "stream_options.include_usage";
      error->message = "'stream_options.include_usage': must be a boolean";
      return error;
    }
  }
  int n = 1;
  if (auto error = read_int(body, "n", 1, 1, n)) {
    error->message = "'n': only n == 1 is supported";
    return error;
  }

  if (endpoint == Endpoint::kCompletions) {
    // Accepted by OpenAI but not implemented here: refuse rather than silently ignore them.
    bool echo = false;
    if (auto error = read_bool(body, "echo", echo)) return error;
    if (echo) return field_error("echo", "echo is not supported");
    int best_of = 1;
    if (auto error = read_int(body, "best_of", 1, 1, best_of)) {
      error->message = "'best_of': only best_of == 1 is supported";
      return error;
    }
    if (auto it = body.find("suffix"); it != body.end() && !it->is_null()) {
      return field_error("suffix", "suffix is not supported");
    }
    // Completions: logprobs is an integer, the number of alternatives (OpenAI allows 0..5).
    if (auto it = body.find("logprobs"); it != body.end() && !it->is_null()) {
      int count = 0;
      if (auto error = read_int(body, "logprobs", 0, 5, count)) return error;
      out.logprobs = true;
      out.top_logprobs = count;
    }
  } else {
    if (auto error = read_bool(body, "logprobs", out.logprobs)) return error;
    if (auto error = read_int(body, "top_logprobs", 0, 20, out.top_logprobs)) return error;
    if (out.top_logprobs > 0 && !out.logprobs) {
      return field_error("top_logprobs", "requires 'logprobs': true");
    }
  }
  return std::nullopt;
}

}  // namespace keel::server
