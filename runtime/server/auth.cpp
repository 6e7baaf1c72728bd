#include "runtime/server/auth.h"

#include <boost/asio/ip/address.hpp>
#include <cctype>

#include "kernels/base/check.h"

namespace keel::server {

std::string_view api_key_scope_name(ApiKeyScope scope) {
  return scope == ApiKeyScope::kApi ? "api" : "all";
}

ApiKeyScope parse_api_key_scope(std::string_view name, std::string_view what) {
  if (name == "api") return ApiKeyScope::kApi;
  if (name == "all") return ApiKeyScope::kAll;
  throw_error(what, " is '", name,
              "'; expected api (every endpoint but /health, /ping, /version, /metrics) or all");
}

bool constant_time_equal(std::string_view given, std::string_view expected) {
  // Every byte of `expected` is visited whatever `given` holds; volatile keeps the compiler
  // from turning the loop into an early-exit comparison.
  volatile unsigned char difference = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char other = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    difference = difference | (other ^ static_cast<unsigned char>(expected[i]));
  }
  return difference == 0;
}

bool requires_api_key(const AuthConfig& config, std::string_view path) {
  if (config.api_key.empty()) return false;
  if (config.scope == ApiKeyScope::kAll) return true;
  return path != "/health" && path != "/ping" && path != "/version" && path != "/metrics";
}

std::optional<RequestError> check_api_key(const AuthConfig& config, std::string_view path,
                                          std::string_view authorization) {
  if (!requires_api_key(config, path)) return std::nullopt;
  // "Bearer <key>": the scheme is case-insensitive (RFC 7235), the key is not.
  constexpr std::string_view kScheme = "bearer ";
  bool bearer = authorization.size() > kScheme.size();
  for (size_t i = 0; bearer && i < kScheme.size(); ++i)
    bearer = std::tolower(static_cast<unsigned char>(authorization[i])) == kScheme[i];
  if (bearer && constant_time_equal(authorization.substr(kScheme.size()), config.api_key))
    return std::nullopt;
  RequestError error;
  error.status = 401;
  error.type = "invalid_request_error";
  error.code = "invalid_api_key";
  error.message = authorization.empty()
                      ? "this server needs an API key: send the header 'Authorization: Bearer "
                        "<key>' (the openai client sends its api_key so)"
                      : "incorrect API key provided";
  return error;
}

std::optional<std::string> open_bind_warning(const std::string& host, const AuthConfig& config) {
  if (!config.api_key.empty()) return std::nullopt;
  boost::system::error_code ec;
  const auto address = boost::asio::ip::make_address(host, ec);
  if (ec || address.is_loopback()) return std::nullopt;  // a bad host fails at bind, said there
  return "listening on " + host +
         " (not a loopback address) without an API key: anyone who can reach it can generate, "
         "read telemetry and start or stop the profiler; set --api-key or KEEL_API_KEY";
}

}  // namespace keel::server
