// The endpoints that answer from what the server knows, without generating:
//   GET  /v1/models          every served name, each a model card (the first name is the one
//                            responses report); "root" is the path the model was loaded from
//   GET  /v1/models/{id}     one card; the id is percent-decoded and may contain '/' (a path
//                            or an HF-style name); 404 model_not_found for any other id
//   POST /tokenize           vLLM's shapes: {"prompt": str, "add_special_tokens": true} or
//                            {"messages": [...], "add_generation_prompt": true} (the chat
//                            prompt as /v1/chat/completions renders it), "return_token_strs"
//                            -> {"count", "max_model_len", "tokens", "token_strs"}
//   POST /detokenize         {"tokens": [ids]} -> {"prompt": text}
//   GET  /version            {"version": the build revision}
// Both tokenizer endpoints take an optional "model" (one of the served names) and refuse
// unknown fields, as the generation endpoints do.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "runtime/server/api.h"

namespace keel::server {

struct RouteReply {
  int status = 200;
  std::string body;                   // JSON, when error is unset
  std::optional<RequestError> error;  // set: answer with this error
  std::string allow;                  // a 405's Allow header
};

// nullopt: `path` is none of these routes.
std::optional<RouteReply> serve_info_route(std::string_view method, const std::string& path,
                                           const std::string& body, GenerationBackend& backend,
                                           const ChatTemplate& chat_template);

// Whether a request naming `model` is for this backend: an empty name (the field was left
// out) or any of its served names.
bool serves_model(const GenerationBackend& backend, const std::string& model);
// The 404 for a model the backend does not serve, listing the names it does.
RequestError model_not_found(const GenerationBackend& backend, const std::string& model);
// The 405 for `method` on `path`, naming the method to use.
RequestError method_not_allowed(std::string_view method, const std::string& path,
                                std::string_view allowed);

// %XX escapes decoded; a '%' not followed by two hex digits stays as it is.
std::string percent_decode(std::string_view text);

}  // namespace keel::server
