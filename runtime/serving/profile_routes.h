// The profiling endpoints of keel serve:
//   POST /v1/profile/start            start a Chrome trace (discarding an unwritten one)
//   POST /v1/profile/stop [{"path"}]  stop it and write it under trace_dir, off the server's
//                                     threads: answers {"path", "spans", "stopped_by_cap",
//                                     "state": "writing"} at once
//   GET  /v1/profile                  {"tracing", "spans", "max_spans", "stopped_by_cap",
//                                     "trace_dir", "last_trace": {"path", "spans", "state":
//                                     writing|written|failed[, "error"]}}
// The file is created new under trace_dir and nowhere else (runtime/telemetry/trace_file.h);
// a profile stops by itself at profile_max_spans (ServingTelemetry) and the answers say so.
#pragma once

#include <mutex>
#include <optional>
#include <string>

#include "runtime/server/http_server.h"
#include "runtime/serving/serving_telemetry.h"
#include "runtime/telemetry/trace_file.h"

namespace keel {

class ProfileRoutes {
 public:
  // Opens trace_dir now: a missing directory is a start-up error naming it.
  ProfileRoutes(ServingTelemetry& telemetry, const std::string& trace_dir);

  // nullopt: not a profile route.
  std::optional<server::HttpServerConfig::ExtraResponse> handle(const std::string& method,
                                                                const std::string& path,
                                                                const std::string& body);
  // Blocks until the trace being written (if any) is complete.
  void wait_for_writes() const { writer_.wait(); }

 private:
  server::HttpServerConfig::ExtraResponse stop(const std::string& body);

  ServingTelemetry& telemetry_;
  telemetry::TraceDirectory directory_;
  telemetry::TraceWriter writer_;
  std::mutex stop_mutex_;  // one stop at a time: check, create, take and hand over together
};

}  // namespace keel
