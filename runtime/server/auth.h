// API keys: `keel serve --api-key KEY` (or KEEL_API_KEY) makes every endpoint but the open
// ones answer 401 unless the request carries "Authorization: Bearer KEY" (OpenAI's and vLLM's
// scheme; the openai client sends its api_key so).
//
// Deny by default: under scope `api` every path needs the key except the four probes
// /health, /ping, /version and /metrics, so an endpoint added later (or a path spelled
// oddly) is never open by accident; scope `all` closes those too. The key is compared in
// constant time (the time depends only on the configured key's length), so response timing
// does not reveal how much of a guess was right.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "runtime/server/api.h"

namespace keel::server {

enum class ApiKeyScope : uint8_t {
  kApi,  // everything but /health, /ping, /version, /metrics
  kAll,  // every endpoint
};
std::string_view api_key_scope_name(ApiKeyScope scope);
// "api" | "all"; throws keel::Error naming `what` otherwise.
ApiKeyScope parse_api_key_scope(std::string_view name, std::string_view what);

struct AuthConfig {
  std::string api_key;  // empty: no authentication
  ApiKeyScope scope = ApiKeyScope::kApi;
};

// Equal contents, in time that depends on expected.size() only.
bool constant_time_equal(std::string_view given, std::string_view expected);

// Whether a request for `path` (no query string) needs the key under `config`.
bool requires_api_key(const AuthConfig& config, std::string_view path);

// nullopt when the request may proceed; else the 401 to send (OpenAI's invalid_api_key error).
// `authorization` is the request's Authorization header value ("" when absent).
std::optional<RequestError> check_api_key(const AuthConfig& config, std::string_view path,
                                          std::string_view authorization);

// A warning for start-up when `host` accepts connections from other machines (anything but a
// loopback address) and no API key is set; nullopt otherwise.
std::optional<std::string> open_bind_warning(const std::string& host, const AuthConfig& config);

}  // namespace keel::server
