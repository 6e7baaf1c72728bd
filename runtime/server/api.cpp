#include "runtime/server/api.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>

#include "runtime/common/json_depth.h"

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

// An integer above INT64_MAX: nlohmann keeps it unsigned (is_number_integer is true for it too)
// and get<int64_t> would wrap 2^64 - 1 to -1.
bool is_huge_unsigned(const json& value) {
  return value.is_number_unsigned() &&
         value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

// JSON numbers arrive as integer or float; integers must not have a fraction.
bool as_int(const json& value, int64_t& out) {
  if (!value.is_number_integer() || is_huge_unsigned(value)) return false;
  out = value.get<int64_t>();
  return true;
}

std::optional<RequestError> read_int(const json& body, const char* field, int64_t lo, int64_t hi,
                                     int& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  int64_t value = 0;
  const std::string range = "between " + std::to_string(lo) + " and " + std::to_string(hi);
  if (is_huge_unsigned(*it)) return field_error(field, "must be " + range + ", got " + it->dump());
  if (!as_int(*it, value)) return field_error(field, "must be an integer");
  if (value < lo || value > hi) {
    return field_error(field, "must be " + range + ", got " + std::to_string(value));
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

// logit_bias: {"<token id>": bias}, OpenAI's shape; the ids are checked against the vocabulary
// by the backend (it knows the vocabulary), the values here.
std::optional<RequestError> read_logit_bias(const json& body,
                                            std::vector<std::pair<int32_t, float>>& out) {
  auto it = body.find("logit_bias");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_object()) {
    return field_error("logit_bias", "must be an object mapping token ids to biases");
  }
  for (const auto& [key, value] : it->items()) {
    int64_t id = -1;
    size_t used = 0;
    try {
      id = std::stoll(key, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != key.size() || key.empty() || id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return field_error("logit_bias",
                         "key '" + key + "' is not a token id (a non-negative integer)");
    }
    if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() < -100.0 ||
        value.get<double>() > 100.0) {
      return field_error("logit_bias", "bias of token " + key +
                                           " must be a number in [-100, 100], got " + value.dump());
    }
    out.emplace_back(static_cast<int32_t>(id), value.get<float>());
  }
  std::sort(out.begin(), out.end());
  return std::nullopt;
}

// Fields keel knows but does not implement (or implements only at one value): accepted when
// absent, null or that value, refused by name otherwise. Silently ignoring them would answer a
// different question than the one asked.
struct UnsupportedField {
  const char* name;
  bool (*accepted)(const json& value);
  const char* reason;
};

bool is_null(const json& value) {
  return value.is_null();
}
bool is_false(const json& value) {
  return value.is_null() || value == false;
}
bool is_true(const json& value) {
  return value.is_null() || value == true;
}
bool is_empty_list(const json& value) {
  return value.is_null() || (value.is_array() && value.empty());
}
bool is_zero(const json& value) {
  return value.is_null() || (value.is_number() && value == 0);
}
bool is_one(const json& value) {
  return value.is_null() || (value.is_number() && value == 1);
}
bool is_text_format(const json& value) {
  return value.is_null() || (value.is_object() && value.size() == 1 && value.contains("type") &&
                             value["type"] == "text");
}
bool is_text_modalities(const json& value) {
  return value.is_null() || value == json::array({"text"});
}

constexpr const char* kNoConstrainedDecoding =
    "constrained (guided / structured) decoding is not implemented";

const UnsupportedField kUnsupportedAnywhere[] = {
    {"best_of", is_one, "only best_of == 1 is supported"},
    {"use_beam_search", is_false, "beam search is not implemented"},
    {"length_penalty", is_one, "only used by beam search, which is not implemented"},
    {"response_format", is_text_format,
     "only {\"type\": \"text\"} is supported: JSON mode and JSON schemas need constrained "
     "decoding, which is not implemented"},
    {"guided_json", is_null, kNoConstrainedDecoding},
    {"guided_regex", is_null, kNoConstrainedDecoding},
    {"guided_choice", is_null, kNoConstrainedDecoding},
    {"guided_grammar", is_null, kNoConstrainedDecoding},
    {"guided_decoding_backend", is_null, kNoConstrainedDecoding},
    {"guided_whitespace_pattern", is_null, kNoConstrainedDecoding},
    {"structured_outputs", is_null, kNoConstrainedDecoding},
    {"bad_words", is_empty_list, "bad_words is not implemented"},
    {"allowed_token_ids", is_null, "allowed_token_ids is not implemented"},
    {"logits_processors", is_null, "custom logits processors are not supported"},
    {"truncate_prompt_tokens", is_null, "prompt truncation is not implemented"},
    {"priority", is_zero, "priority scheduling is not implemented (requests are served FCFS)"},
    {"spaces_between_special_tokens", is_true,
     "only spaces_between_special_tokens == true is supported"},
};

const UnsupportedField kUnsupportedInCompletions[] = {
    {"suffix", is_null, "suffix (fill-in-the-middle) is not supported"},
    {"add_special_tokens", is_true, "only add_special_tokens == true is supported for completions"},
};

const UnsupportedField kUnsupportedInChat[] = {
    {"functions", is_empty_list,
     "the deprecated functions field is not supported; send tools instead"},
    {"function_call", is_null,
     "the deprecated function_call field is not supported; send tool_choice instead"},
    {"reasoning_effort", is_null, "reasoning controls are not implemented yet"},
    {"chat_template", is_null,
     "keel renders the model's own template; a custom one is not supported"},
    {"add_generation_prompt", is_true, "only add_generation_prompt == true is supported"},
    {"continue_final_message", is_false, "continuing the final message is not supported"},
    {"add_special_tokens", is_false, "only add_special_tokens == false is supported for chat"},
    {"echo", is_false, "echo is supported on /v1/completions only"},
    {"documents", is_null, "documents (RAG templates) are not supported"},
    {"modalities", is_text_modalities, "only [\"text\"] output is supported"},
    {"audio", is_null, "audio output is not supported"},
    {"prediction", is_null, "predicted outputs are not supported"},
    {"web_search_options", is_null, "web search is not supported"},
    {"verbosity", is_null, "verbosity is not supported"},
    {"store", is_false, "keel does not store completions"},
};

// Fields accepted with no effect on the output, with the type each must have.
struct NoOpField {
  const char* name;
  bool (*well_typed)(const json& value);
  const char* expected;
};

bool is_string(const json& value) {
  return value.is_null() || value.is_string();
}
bool is_object(const json& value) {
  return value.is_null() || value.is_object();
}
bool is_service_tier(const json& value) {
  return value.is_null() || value == "auto" || value == "default";
}

const NoOpField kNoOpAnywhere[] = {
    {"user", is_string, "a string"},
};
const NoOpField kNoOpInChat[] = {
    {"metadata", is_object, "an object"},
    {"service_tier", is_service_tier, "\"auto\" or \"default\""},
    {"prompt_cache_key", is_string, "a string"},
    {"safety_identifier", is_string, "a string"},
};

// Fields this parser reads itself, per endpoint.
const char* const kParsedAnywhere[] = {"model",
                                       "max_tokens",
                                       "temperature",
                                       "top_p",
                                       "top_k",
                                       "seed",
                                       "stop",
                                       "stream",
                                       "stream_options",
                                       "n",
                                       "ignore_eos",
                                       "return_routing",
                                       "logprobs",
                                       "presence_penalty",
                                       "frequency_penalty",
                                       "repetition_penalty",
                                       "min_p",
                                       "logit_bias",
                                       "min_tokens",
                                       "stop_token_ids",
                                       "prompt_logprobs",
                                       "return_tokens_as_token_ids",
                                       "include_stop_str_in_output",
                                       "skip_special_tokens"};
const char* const kParsedInCompletions[] = {"prompt", "echo"};
const char* const kParsedInChat[] = {
    "messages",    "max_completion_tokens", "top_logprobs",         "tools",
    "tool_choice", "parallel_tool_calls",   "chat_template_kwargs", "include_reasoning"};

const char* name_of(const char* name) {
  return name;
}
const char* name_of(const UnsupportedField& field) {
  return field.name;
}
const char* name_of(const NoOpField& field) {
  return field.name;
}

std::optional<RequestError> check_field_support(const json& body, Endpoint endpoint) {
  const bool chat = endpoint == Endpoint::kChatCompletions;
  const auto check = [&](std::span<const UnsupportedField> fields) -> std::optional<RequestError> {
    for (const UnsupportedField& field : fields) {
      auto it = body.find(field.name);
      if (it != body.end() && !field.accepted(*it)) {
        return field_error(field.name, std::string(field.reason) + " (got " + it->dump() + ")");
      }
    }
    return std::nullopt;
  };
  if (auto error = check(kUnsupportedAnywhere)) return error;
  if (auto error = check(chat ? std::span<const UnsupportedField>(kUnsupportedInChat)
                              : std::span<const UnsupportedField>(kUnsupportedInCompletions)))
    return error;
  const auto known = [&](const std::string& key) {
    const auto in = [&](const auto& names) {
      for (const auto& name : names)
        if (key == name_of(name)) return true;
      return false;
    };
    return in(kParsedAnywhere) ||
           in(chat ? std::span<const char* const>(kParsedInChat)
                   : std::span<const char* const>(kParsedInCompletions)) ||
           in(kUnsupportedAnywhere) || in(kNoOpAnywhere) ||
           (chat ? in(kUnsupportedInChat) || in(kNoOpInChat) : in(kUnsupportedInCompletions));
  };
  for (const auto& [key, value] : body.items()) {
    for (const NoOpField& field : kNoOpAnywhere)
      if (key == field.name && !field.well_typed(value))
        return field_error(key, std::string("must be ") + field.expected);
    if (chat)
      for (const NoOpField& field : kNoOpInChat)
        if (key == field.name && !field.well_typed(value))
          return field_error(key, std::string("must be ") + field.expected);
    if (!known(key)) {
      return field_error(key, std::string("unknown field for ") +
                                  (chat ? "/v1/chat/completions" : "/v1/completions") +
                                  "; keel refuses what it does not implement rather than "
                                  "ignoring it (the README lists every field)");
    }
  }
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

// An assistant message's tool_calls (arguments: a JSON object as a string, as OpenAI sends
// them), its reasoning_content, a tool message's tool_call_id.
std::optional<RequestError> read_message_tool_fields(const json& message, const std::string& where,
                                                     ChatMessage& parsed) {
  const bool assistant = parsed.role == "assistant";
  if (auto it = message.find("tool_calls"); it != message.end() && !it->is_null()) {
    if (!assistant) return field_error(where + ".tool_calls", "only assistant messages have them");
    if (!it->is_array()) return field_error(where + ".tool_calls", "must be a list");
    for (size_t j = 0; j < it->size(); ++j) {
      const json& call = (*it)[j];
      const std::string at = where + ".tool_calls[" + std::to_string(j) + "]";
      if (!call.is_object()) return field_error(at, "must be an object");
      if (call.contains("type") && call["type"] != "function")
        return field_error(at + ".type", "must be \"function\"");
      if (!call.contains("function") || !call["function"].is_object())
        return field_error(at + ".function", "must be an object");
      const json& function = call["function"];
      if (!function.contains("name") || !function["name"].is_string())
        return field_error(at + ".function.name", "must be a string");
      ChatMessageToolCall parsed_call;
      parsed_call.name = function["name"].get<std::string>();
      if (call.contains("id") && call["id"].is_string()) parsed_call.id = call["id"];
      if (function.contains("arguments")) {
        const json& arguments = function["arguments"];
        if (!arguments.is_string())
          return field_error(at + ".function.arguments", "must be a string (JSON text)");
        parsed_call.arguments =
            nlohmann::ordered_json::parse(arguments.get<std::string>(), nullptr, false);
        if (parsed_call.arguments.is_discarded() || !parsed_call.arguments.is_object())
          return field_error(at + ".function.arguments",
                             "must be a JSON object encoded as a string");
      }
      parsed.tool_calls.push_back(std::move(parsed_call));
    }
  }
  if (auto it = message.find("reasoning_content"); it != message.end() && !it->is_null()) {
    if (!assistant || !it->is_string())
      return field_error(where + ".reasoning_content", "must be a string on an assistant message");
    parsed.reasoning_content = it->get<std::string>();
  }
  if (auto it = message.find("tool_call_id"); it != message.end() && !it->is_null()) {
    if (!it->is_string()) return field_error(where + ".tool_call_id", "must be a string");
    parsed.tool_call_id = it->get<std::string>();
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
    ChatMessage parsed;
    parsed.role = role_name;
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
        parsed.content_parts.push_back(part["text"].get<std::string>());
      }
      for (size_t p = 0; p < parsed.content_parts.size(); ++p)
        parsed.content += (p > 0 ? "\n" : "") + parsed.content_parts[p];
    } else {
      return field_error(where + ".content", "must be a string or a list of text parts");
    }
    if (auto error = read_message_tool_fields(message, where, parsed)) return error;
    out.messages.push_back(std::move(parsed));
  }
  return std::nullopt;
}

// tools: [{"type": "function", "function": {"name", "description"?, "parameters"?}}], kept as
// sent (from the body parsed with its key order) for the template to print.
std::optional<RequestError> read_tools(const std::string& body_text, CompletionRequest& out) {
  const nlohmann::ordered_json body = nlohmann::ordered_json::parse(body_text, nullptr, false);
  const auto it = body.find("tools");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_array()) return field_error("tools", "must be a list of tools");
  for (size_t i = 0; i < it->size(); ++i) {
    const auto& tool = (*it)[i];
    const std::string where = "tools[" + std::to_string(i) + "]";
    if (!tool.is_object()) return field_error(where, "must be an object");
    if (!tool.contains("type") || tool["type"] != "function")
      return field_error(where + ".type", "must be \"function\" (the only tool type keel serves)");
    if (!tool.contains("function") || !tool["function"].is_object())
      return field_error(where + ".function", "must be an object");
    const auto& function = tool["function"];
    if (!function.contains("name") || !function["name"].is_string() ||
        function["name"].get<std::string>().empty())
      return field_error(where + ".function.name", "must be a non-empty string");
    if (function.contains("description") && !function["description"].is_string() &&
        !function["description"].is_null())
      return field_error(where + ".function.description", "must be a string");
    if (function.contains("parameters") && !function["parameters"].is_object() &&
        !function["parameters"].is_null())
      return field_error(where + ".function.parameters", "must be a JSON schema object");
  }
  out.tools = *it;
  return std::nullopt;
}

// tool_choice: "auto" and "none" work; "required" and a named function force a call, which
// takes constrained decoding keel does not have.
std::optional<RequestError> read_tool_choice(const json& body, CompletionRequest& out) {
  const bool has_tools = !out.tools.empty();
  out.tool_choice = has_tools ? ToolChoice::kAuto : ToolChoice::kNone;
  auto it = body.find("tool_choice");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (*it == "none") {
    out.tool_choice = ToolChoice::kNone;
  } else if (*it == "auto") {
    if (!has_tools) return field_error("tool_choice", "\"auto\" needs a non-empty 'tools' list");
    out.tool_choice = ToolChoice::kAuto;
  } else if (*it == "required" || it->is_object()) {
    return field_error("tool_choice",
                       std::string(*it == "required" ? "\"required\"" : "a named function") +
                           " forces a tool call, which needs constrained decoding; keel does not "
                           "implement it (use \"auto\" or \"none\")");
  } else {
    return field_error("tool_choice", "must be \"auto\" or \"none\", got " + it->dump());
  }
  return std::nullopt;
}

// chat_template_kwargs: the template arguments keel's templates read; anything else would be
// ignored by the template, so it is refused.
std::optional<RequestError> read_template_kwargs(const json& body, CompletionRequest& out) {
  auto it = body.find("chat_template_kwargs");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_object()) return field_error("chat_template_kwargs", "must be an object");
  for (const auto& [key, value] : it->items()) {
    const std::string field = "chat_template_kwargs." + key;
    if (key != "enable_thinking")
      return field_error(field,
                         "unknown template argument; keel's chat templates read only "
                         "enable_thinking");
    if (value.is_null()) continue;
    if (!value.is_boolean()) return field_error(field, "must be a boolean");
    out.enable_thinking = value.get<bool>();
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
  if (json_nesting_depth(body_text) > kMaxJsonDepth) {
    RequestError error;
    error.message = "request body nests deeper than " + std::to_string(kMaxJsonDepth) + " levels";
    error.code = "invalid_json";
    return error;
  }
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
    if (auto error = read_tools(body_text, out)) return error;
    if (auto error = read_tool_choice(body, out)) return error;
    if (auto error = read_bool(body, "parallel_tool_calls", out.parallel_tool_calls)) return error;
    if (auto error = read_bool(body, "include_reasoning", out.include_reasoning)) return error;
    if (auto error = read_template_kwargs(body, out)) return error;
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
    if (!as_int(*it, seed))
      return field_error("seed", "must be an integer in [-2^63, 2^63 - 1], got " + it->dump());
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
  if (auto error = read_int(body, "n", 1, kMaxChoicesPerRequest, out.n)) return error;
  const size_t num_prompts = 1 + out.more_prompts.size();
  if (num_prompts * static_cast<size_t>(out.n) > static_cast<size_t>(kMaxChoicesPerRequest)) {
    return field_error("n", std::to_string(num_prompts) +
                                " prompts x n = " + std::to_string(out.n) + " make " +
                                std::to_string(num_prompts * static_cast<size_t>(out.n)) +
                                " choices, over the limit of " +
                                std::to_string(kMaxChoicesPerRequest) + " per request");
  }

  if (auto error = read_float(body, "presence_penalty", -2.0, 2.0, false, out.presence_penalty))
    return error;
  if (auto error = read_float(body, "frequency_penalty", -2.0, 2.0, false, out.frequency_penalty))
    return error;
  if (auto error = read_float(body, "repetition_penalty", 0.0, std::numeric_limits<float>::max(),
                              true, out.repetition_penalty))
    return error;
  if (auto error = read_float(body, "min_p", 0.0, 1.0, false, out.min_p)) return error;
  if (auto error = read_logit_bias(body, out.logit_bias)) return error;
  if (auto error = read_int(body, "min_tokens", 0, context_limit, out.min_tokens)) return error;
  if (out.min_tokens > out.max_tokens) {
    return field_error("min_tokens", "must be <= max_tokens (" + std::to_string(out.max_tokens) +
                                         "), got " + std::to_string(out.min_tokens));
  }
  if (auto it = body.find("stop_token_ids"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) return field_error("stop_token_ids", "must be a list of token ids");
    if (auto error = read_token_ids(*it, "stop_token_ids", out.stop_token_ids)) return error;
  }
  if (auto error = read_bool(body, "include_stop_str_in_output", out.include_stop_str_in_output))
    return error;
  if (auto error = read_bool(body, "skip_special_tokens", out.skip_special_tokens)) return error;
  if (auto error = read_bool(body, "return_tokens_as_token_ids", out.return_tokens_as_token_ids))
    return error;
  if (auto it = body.find("prompt_logprobs"); it != body.end() && !it->is_null()) {
    int count = 0;
    if (auto error = read_int(body, "prompt_logprobs", 0, 20, count)) return error;
    // As vLLM: a stream has no place to put them.
    if (out.stream) return field_error("prompt_logprobs", "is not available with stream: true");
    out.prompt_logprobs = count;
  }

  if (endpoint == Endpoint::kCompletions) {
    if (auto error = read_bool(body, "echo", out.echo)) return error;
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
  // Last: a field that is both mistyped and unsupported is reported for its type first.
  if (auto error = check_field_support(body, endpoint)) return error;
  return std::nullopt;
}

}  // namespace keel::server
