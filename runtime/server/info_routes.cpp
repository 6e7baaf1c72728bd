#include "runtime/server/info_routes.h"

#include <ctime>
#include <limits>

#include "kernels/base/check.h"
#include "runtime/common/build_info.h"

namespace keel::server {
namespace {

using nlohmann::json;

constexpr std::string_view kModelsPrefix = "/v1/models/";

RequestError bad_request(std::string message, std::string param = "") {
  RequestError error;
  error.status = 400;
  error.message = std::move(message);
  error.param = std::move(param);
  return error;
}

RouteReply reply_error(RequestError error) {
  RouteReply reply;
  reply.status = error.status;
  reply.error = std::move(error);
  return reply;
}

RouteReply reply_json(const json& body) {
  RouteReply reply;
  // Token strings may hold part of a UTF-8 character: never let that throw while rendering.
  reply.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
  return reply;
}

json model_card(const GenerationBackend& backend, const std::string& name) {
  const std::string root = backend.model_root();
  return json{{"id", name},
              {"object", "model"},
              {"created", static_cast<int64_t>(std::time(nullptr))},
              {"owned_by", "keel"},
              {"root", root.empty() ? json(nullptr) : json(root)},
              {"parent", nullptr},
              {"max_model_len", backend.max_context()}};
}

// A JSON object body, or the 400 saying why not.
std::optional<RequestError> parse_object(const std::string& text, json& body) {
  body = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return bad_request("request body is not valid JSON");
  if (!body.is_object()) return bad_request("request body must be a JSON object");
  return std::nullopt;
}

std::optional<RequestError> check_fields(const json& body,
                                         std::initializer_list<std::string_view> known,
                                         std::string_view endpoint) {
  for (const auto& [key, value] : body.items()) {
    bool found = false;
    for (std::string_view name : known) found = found || key == name;
    if (!found)
      return bad_request("'" + key + "': unknown field for " + std::string(endpoint) +
                             "; keel refuses what it does not implement rather than ignoring it",
                         key);
  }
  return std::nullopt;
}

std::optional<RequestError> read_bool(const json& body, const char* field, bool& out) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean())
    return bad_request(std::string("'") + field + "': must be a boolean", field);
  out = it->get<bool>();
  return std::nullopt;
}

std::optional<RequestError> check_model(const json& body, const GenerationBackend& backend) {
  auto it = body.find("model");
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) return bad_request("'model': must be a string", "model");
  if (!serves_model(backend, it->get<std::string>()))
    return model_not_found(backend, it->get<std::string>());
  return std::nullopt;
}

RouteReply tokenize(const std::string& text, GenerationBackend& backend,
                    const ChatTemplate& chat_template) {
  json body;
  if (auto error = parse_object(text, body)) return reply_error(*error);
  if (auto error = check_model(body, backend)) return reply_error(*error);
  bool return_token_strs = false;
  if (auto error = read_bool(body, "return_token_strs", return_token_strs))
    return reply_error(*error);
  const bool chat = body.contains("messages");
  if (chat == body.contains("prompt"))
    return reply_error(bad_request("give either 'prompt' (a string) or 'messages' (a chat)"));
  std::string prompt;
  bool add_special_tokens = !chat;  // vLLM's defaults: true for a prompt, false for a chat
  if (chat) {
    // The chat form is read as /v1/chat/completions reads its request, so its messages and
    // template fields are checked (and refused where unsupported) exactly as there. Fields
    // that change the rendering beyond the messages (tools, chat_template_kwargs) are refused
    // here until this renders them as generation does.
    if (auto error =
            check_fields(body,
                         {"model", "messages", "add_generation_prompt", "continue_final_message",
                          "add_special_tokens", "chat_template", "return_token_strs"},
                         "/tokenize"))
      return reply_error(*error);
    json chat_body = body;
    chat_body.erase("return_token_strs");
    chat_body.erase("model");
    CompletionRequest request;
    if (auto error = parse_completion_request(chat_body.dump(), Endpoint::kChatCompletions,
                                              std::numeric_limits<int>::max(), request))
      return reply_error(*error);
    try {
      prompt = chat_template ? chat_template(request) : render_chatml(request.messages);
    } catch (const keel::Error& error) {
      // The template refuses this conversation, as it would for /v1/chat/completions.
      return reply_error(bad_request(error.what(), "messages"));
    }
  } else {
    if (auto error = check_fields(
            body, {"model", "prompt", "add_special_tokens", "return_token_strs"}, "/tokenize"))
      return reply_error(*error);
    if (!body["prompt"].is_string())
      return reply_error(bad_request("'prompt': must be a string", "prompt"));
    prompt = body["prompt"].get<std::string>();
    if (auto error = read_bool(body, "add_special_tokens", add_special_tokens))
      return reply_error(*error);
  }
  Tokenized tokenized;
  if (auto error = backend.tokenize(prompt, add_special_tokens, tokenized))
    return reply_error(*error);
  json answer = {{"count", tokenized.ids.size()},
                 {"max_model_len", backend.max_context()},
                 {"tokens", tokenized.ids},
                 {"token_strs", nullptr}};
  if (return_token_strs) answer["token_strs"] = tokenized.token_strs;
  return reply_json(answer);
}

RouteReply detokenize(const std::string& text, GenerationBackend& backend) {
  json body;
  if (auto error = parse_object(text, body)) return reply_error(*error);
  if (auto error = check_fields(body, {"model", "tokens"}, "/detokenize"))
    return reply_error(*error);
  if (auto error = check_model(body, backend)) return reply_error(*error);
  auto tokens = body.find("tokens");
  if (tokens == body.end() || !tokens->is_array())
    return reply_error(bad_request("'tokens': must be a list of token ids", "tokens"));
  std::vector<int32_t> ids;
  for (const json& item : *tokens) {
    if (!item.is_number_integer() || item.get<int64_t>() < 0 ||
        item.get<int64_t>() > std::numeric_limits<int32_t>::max())
      return reply_error(bad_request(
          "'tokens': token ids must be non-negative integers, got " + item.dump(), "tokens"));
    ids.push_back(static_cast<int32_t>(item.get<int64_t>()));
  }
  std::string prompt;
  if (auto error = backend.detokenize(ids, prompt)) return reply_error(*error);
  return reply_json(json{{"prompt", prompt}});
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string percent_decode(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '%' && i + 2 < text.size() && hex_value(text[i + 1]) >= 0 &&
        hex_value(text[i + 2]) >= 0) {
      out.push_back(static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2])));
      i += 2;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

bool serves_model(const GenerationBackend& backend, const std::string& model) {
  if (model.empty()) return true;
  for (const std::string& name : backend.served_model_names())
    if (name == model) return true;
  return false;
}

RequestError model_not_found(const GenerationBackend& backend, const std::string& model) {
  std::string names;
  for (const std::string& name : backend.served_model_names())
    names += (names.empty() ? "'" : ", '") + name + "'";
  RequestError error;
  error.status = 404;
  error.message = "model '" + model + "' does not exist; this server serves " + names;
  error.param = "model";
  error.code = "model_not_found";
  return error;
}

RequestError method_not_allowed(std::string_view method, const std::string& path,
                                std::string_view allowed) {
  RequestError error;
  error.status = 405;
  error.message =
      "method " + std::string(method) + " not allowed on " + path + "; use " + std::string(allowed);
  error.code = "method_not_allowed";
  return error;
}

std::optional<RouteReply> serve_info_route(std::string_view method, const std::string& path,
                                           const std::string& body, GenerationBackend& backend,
                                           const ChatTemplate& chat_template) {
  auto only = [&](std::string_view allowed) -> std::optional<RouteReply> {
    if (method == allowed) return std::nullopt;
    RouteReply reply = reply_error(method_not_allowed(method, path, allowed));
    reply.allow = std::string(allowed);
    return reply;
  };
  if (path == "/v1/models") {
    if (auto refused = only("GET")) return refused;
    json data = json::array();
    for (const std::string& name : backend.served_model_names())
      data.push_back(model_card(backend, name));
    return reply_json(json{{"object", "list"}, {"data", std::move(data)}});
  }
  if (path.size() > kModelsPrefix.size() &&
      path.compare(0, kModelsPrefix.size(), kModelsPrefix) == 0) {
    if (auto refused = only("GET")) return refused;
    const std::string id = percent_decode(std::string_view(path).substr(kModelsPrefix.size()));
    if (id.empty() || !serves_model(backend, id)) return reply_error(model_not_found(backend, id));
    return reply_json(model_card(backend, id));
  }
  if (path == "/tokenize") {
    if (auto refused = only("POST")) return refused;
    return tokenize(body, backend, chat_template);
  }
  if (path == "/detokenize") {
    if (auto refused = only("POST")) return refused;
    return detokenize(body, backend);
  }
  if (path == "/version") {
    if (auto refused = only("GET")) return refused;
    return reply_json(json{{"version", std::string(build_revision())}});
  }
  return std::nullopt;
}

}  // namespace keel::server
