#include "runtime/server/http_request.h"

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace keel::server {

namespace beast = boost::beast;
namespace http = beast::http;

RequestTarget split_target(std::string target) {
  RequestTarget out;
  out.path = std::move(target);
  if (auto query = out.path.find('?'); query != std::string::npos) {
    out.query = out.path.substr(query + 1);
    out.path.resize(query);
  }
  while (out.path.size() > 1 && out.path.back() == '/') out.path.pop_back();
  return out;
}

ParsedHttpRequest parse_http_request(std::string_view bytes, size_t max_body_bytes) {
  ParsedHttpRequest out;
  http::request_parser<http::string_body> parser;
  parser.body_limit(max_body_bytes);
  // put() consumes what it can; fed in a loop as the server's reads would feed it.
  beast::error_code ec;
  size_t used = 0;
  while (!parser.is_done() && used < bytes.size()) {
    const size_t consumed =
        parser.put(boost::asio::buffer(bytes.data() + used, bytes.size() - used), ec);
    used += consumed;
    if (ec == http::error::need_more) {
      ec = {};
      if (consumed == 0) break;
      continue;
    }
    if (ec) break;
  }
  out.bytes_used = used;
  if (ec == http::error::body_limit) {
    out.error_status = 413;
    out.error = "request body exceeds " + std::to_string(max_body_bytes) + " bytes";
    return out;
  }
  if (ec) {
    out.error_status = 400;
    out.error = "malformed HTTP request: " + ec.message();
    return out;
  }
  if (!parser.is_done()) {
    out.error_status = -1;
    out.error = "incomplete request";
    return out;
  }
  http::request<http::string_body> request = parser.release();
  out.method = std::string(request.method_string());
  out.target = split_target(std::string(request.target()));
  out.body = std::move(request.body());
  out.keep_alive = request.keep_alive();
  return out;
}

}  // namespace keel::server
