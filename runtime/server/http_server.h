// keel's OpenAI-compatible HTTP front end.
//
// Design:
//  - One asio::io_context driven by a small thread pool; every connection runs on its own
//    strand, so a session's state is touched by one handler at a time without locks.
//  - The server knows nothing about models: it parses and validates requests (api.h), submits
//    them to a GenerationBackend with a TokenSink, and renders the sink's callbacks either as
//    one JSON body or as an SSE stream (chunked transfer, "data: {...}\n\n" ... "data: [DONE]").
//    Sink callbacks come from engine threads and are posted onto the session's strand.
//  - While a request generates, the session keeps a read pending on the socket: a client that
//    disconnects is noticed even when nothing is being written, and the sink reports
//    cancelled() so the backend frees the request's KV blocks.
//  - Every response carries x-request-id: the client's (then also the request's id in
//    telemetry and routing records) or a generated one. With an API key configured, requests
//    without it get 401 before routing (auth.h).
//  - Errors are OpenAI-shaped JSON ({"error": {message, type, param, code}}); nothing a client
//    sends can throw past a handler, and every accepted request ends in a response or an error.
//  - Shutdown: stop_accepting() closes the listener (new connections are refused) and idle
//    keep-alive connections; drain(timeout) waits for in-flight requests, fails the ones still
//    running at the deadline with an error, then stops the io_context and joins the threads.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "runtime/server/api.h"
#include "runtime/server/auth.h"

namespace keel::server {

struct HttpServerConfig {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: the OS picks a free port; see HttpServer::port()
  size_t max_body_bytes = 4 * 1024 * 1024;
  int max_concurrent_connections = 256;
  // Limit for receiving one request (headers + body) and for an idle keep-alive connection.
  // Generation itself is not bounded by it: long streams are legitimate.
  std::chrono::milliseconds request_timeout{30000};
  int threads = 2;
  int retry_after_seconds = 1;  // Retry-After on 429 and 503
  ChatTemplate chat_template;   // empty: ChatML
  // What chat_template does with tools and reasoning (runtime/server/api.h); decides which
  // chat fields are accepted and how outputs are read into reasoning, content and tool calls.
  ChatCapabilities chat_capabilities;
  std::function<std::string()> metrics;  // GET /metrics body (Prometheus text); empty: ""
  AuthConfig auth;                       // an API key: 401 without it (runtime/server/auth.h)
  // "system_fingerprint" of every completion and chat response and stream chunk (empty: null);
  // keel serve puts there what decides a response's bits (README, "system_fingerprint").
  std::string system_fingerprint;
  // Further routes (telemetry, profiling): called for any target the server does not serve
  // itself, with the method, the path, the query string (after '?') and the body. nullopt:
  // 404. A thrown exception becomes a 500.
  struct ExtraResponse {
    int status = 200;
    std::string body;
    std::string content_type = "application/json";
  };
  std::function<std::optional<ExtraResponse>(const std::string& method, const std::string& path,
                                             const std::string& query, const std::string& body)>
      extra_routes;
};

class HttpServer {
 public:
  // The backend must outlive the server.
  HttpServer(HttpServerConfig config, GenerationBackend& backend);
  ~HttpServer();  // drains with a zero timeout if still running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds, listens and starts the thread pool. Throws keel::Error if the address is unusable.
  void start();
  uint16_t port() const { return bound_port_; }

  // Closes the listening socket and idle connections; in-flight requests continue.
  void stop_accepting();
  // Waits up to `timeout` for in-flight requests, fails the rest, stops the io_context and joins
  // its threads. Returns true if everything finished within the timeout. Call from outside the
  // server's threads.
  bool drain(std::chrono::milliseconds timeout);

  // Takes over SIGINT and SIGTERM now (a signal that arrives before run_until_signal waits is
  // then kept for it, not fatal). Call after start().
  void catch_signals();
  // Blocks the caller until SIGTERM or SIGINT, then stop_accepting() + drain(timeout). Lets
  // main() return 0 after a graceful shutdown.
  void run_until_signal(std::chrono::milliseconds drain_timeout);

  // Requests submitted to the backend and not yet answered.
  int in_flight() const;
  int open_connections() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
  uint16_t bound_port_ = 0;
};

}  // namespace keel::server
