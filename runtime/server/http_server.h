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
//  - Connections: at most max_connections, plus reserved_connections kept for /health and
//    /metrics when every other one is busy; when full, the longest-idle kept-alive connection
//    (then a silent or slow one) is closed to make room, and what cannot be served gets 429
//    (runtime/server/connection_table.h). Each phase of a request has its own deadline
//    (header, body, idle keep-alive, send), and a client that stops reading a stream is cut
//    off once max_unsent_bytes of its output wait in the server: its request is cancelled, so
//    it frees its running slot and counts as aborted.
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
  // Connections (README, "Connections, timeouts and slow clients"). Generation itself is not
  // bounded by any timeout: long streams are legitimate.
  int max_connections = 512;
  int reserved_connections = 8;  // beyond max_connections, answering only /health and /metrics
  std::chrono::milliseconds header_timeout{10000};  // connect (or first byte) to full headers
  std::chrono::milliseconds body_timeout{30000};    // full headers to full body
  std::chrono::milliseconds idle_timeout{30000};    // a kept-alive connection between requests
  std::chrono::milliseconds send_timeout{30000};    // one write to the socket, start to finish
  // A silent new connection or a request still arriving after this may be closed to make room.
  std::chrono::milliseconds slow_request_grace{1000};
  size_t max_unsent_bytes = 1024 * 1024;  // a stream's output waiting for a client that stalls
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

// What the connection handling did, for /metrics and tests.
struct HttpServerStats {
  int open_connections = 0;
  int reserve_connections = 0;  // open ones in the reserve
  int64_t evicted_idle = 0;     // kept-alive connections closed to make room
  int64_t evicted_slow = 0;     // silent or slow-request connections closed to make room
  int64_t refused = 0;          // answered 429 without reading: even the reserve was full
  int64_t reserve_refused = 0;  // reserve connections whose request got 429 (not a control route)
  int64_t slow_reader_aborts = 0;  // requests cancelled: the client stopped reading its stream
};

class HttpServer {
 public:
  // The backend must outlive the server.
  HttpServer(HttpServerConfig config, GenerationBackend& backend);
  ~HttpServer();  // drains with a zero timeout if still running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds, listens and starts the thread pool. Throws keel::Error if the address is unusable
  // or the process may not open the file descriptors the connection limits need (the soft
  // limit is raised up to the hard one first).
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
  // Blocks the caller until SIGTERM or SIGINT, then stop_accepting() + drain(timeout). A second
  // signal during the drain means stop now: the requests still in flight get their error at
  // once instead of at the drain deadline. Lets main() return 0 after a graceful shutdown.
  void run_until_signal(std::chrono::milliseconds drain_timeout);

  // Requests submitted to the backend and not yet answered.
  int in_flight() const;
  int open_connections() const;
  HttpServerStats stats() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
  uint16_t bound_port_ = 0;
};

}  // namespace keel::server
