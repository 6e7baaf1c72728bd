// One HTTP/1.1 request parsed from bytes, with the parser and limits the server uses
// (Boost.Beast's request_parser, body limited to max_body_bytes), and the split of its target
// into path and query as the server routes it. Callable without sockets: the fuzz harness
// (tests/fuzz) and tests drive the parsing of outside bytes through it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace keel::server {

// A request target split as the server routes it: the path without the query and without
// trailing slashes ("/v1/models/?x=1" -> path "/v1/models", query "x=1").
struct RequestTarget {
  std::string path;
  std::string query;
};
RequestTarget split_target(std::string target);

struct ParsedHttpRequest {
  // 0 when a whole request was parsed; otherwise the status the server answers with (400
  // malformed, 413 body too large) or -1 when the bytes end before the request does.
  int error_status = 0;
  std::string error;  // what went wrong, for error_status != 0
  std::string method;
  RequestTarget target;
  std::string body;
  bool keep_alive = false;
  size_t bytes_used = 0;  // bytes of `bytes` the request took (pipelined requests follow)
};

ParsedHttpRequest parse_http_request(std::string_view bytes, size_t max_body_bytes);

}  // namespace keel::server
