// The HTTP request parser (the server's Beast parser and limits, without sockets) and the
// JSON bodies of /v1/completions and /v1/chat/completions.
#include "runtime/server/api.h"
#include "runtime/server/http_request.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

// The context the parser validates lengths against (any value works; a small one reaches the
// length checks).
constexpr int kMaxContext = 4096;

void parse_body(std::string_view body, keel::server::Endpoint endpoint) {
  keel::server::CompletionRequest request;
  (void)keel::server::parse_completion_request(std::string(body), endpoint, kMaxContext, request);
}

}  // namespace

KEEL_FUZZ_TARGET(http_request) {
  // Pipelined requests, as one connection may send them.
  std::string_view rest = input;
  for (int request = 0; request < 4 && !rest.empty(); ++request) {
    keel::server::ParsedHttpRequest parsed =
        keel::server::parse_http_request(rest, /*max_body_bytes=*/64 * 1024);
    if (parsed.error_status != 0) return;
    if (parsed.target.path == "/v1/completions")
      parse_body(parsed.body, keel::server::Endpoint::kCompletions);
    else if (parsed.target.path == "/v1/chat/completions")
      parse_body(parsed.body, keel::server::Endpoint::kChatCompletions);
    if (parsed.bytes_used == 0) return;
    rest.remove_prefix(parsed.bytes_used);
  }
}

// Both endpoints on the same body.
KEEL_FUZZ_TARGET(request_json) {
  parse_body(input, keel::server::Endpoint::kCompletions);
  parse_body(input, keel::server::Endpoint::kChatCompletions);
}
