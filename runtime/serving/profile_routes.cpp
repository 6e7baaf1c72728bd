// Profiling endpoints (see profile_routes.h).
#include "runtime/serving/profile_routes.h"

#include <ctime>

#include <nlohmann/json.hpp>

#include "kernels/base/check.h"

namespace keel {

using Response = server::HttpServerConfig::ExtraResponse;

ProfileRoutes::ProfileRoutes(ServingTelemetry& telemetry, const std::string& trace_dir)
    : telemetry_(telemetry), directory_(trace_dir) {}

std::optional<Response> ProfileRoutes::handle(const std::string& method, const std::string& path,
                                              const std::string& body) {
  auto method_error = [&](const char* allowed) {
    return Response{405, "method " + method + " not allowed on " + path + "; use " + allowed};
  };
  if (path == "/v1/profile/start") {
    if (method != "POST") return method_error("POST");
    telemetry_.start_trace();
    return Response{200, nlohmann::json{{"tracing", true},
                                        {"max_spans", telemetry_.trace_status()["max_spans"]}}
                             .dump()};
  }
  if (path == "/v1/profile/stop") {
    if (method != "POST") return method_error("POST");
    return stop(body);
  }
  if (path == "/v1/profile") {
    if (method != "GET") return method_error("GET");
    nlohmann::json status = telemetry_.trace_status();
    status["trace_dir"] = directory_.path();
    status["last_trace"] = writer_.status();
    return Response{200, status.dump()};
  }
  return std::nullopt;
}

Response ProfileRoutes::stop(const std::string& body) {
  std::string name;
  if (!body.empty()) {
    nlohmann::json request = nlohmann::json::parse(body, nullptr, false);
    if (request.is_discarded() || !request.is_object())
      return Response{400, "body must be a JSON object like {\"path\": \"trace.json\"}"};
    for (const auto& [key, value] : request.items())
      if (key != "path") return Response{400, "unknown field '" + key + "'; the body takes 'path'"};
    if (request.contains("path")) {
      if (!request["path"].is_string())
        return Response{400, "'path' must be a string (a file name relative to trace_dir)"};
      name = request["path"].get<std::string>();
      if (name.empty()) return Response{400, "'path' is empty"};
    }
  }
  std::lock_guard lock(stop_mutex_);
  if (!telemetry_.trace_pending())
    return Response{409, "no profile is running; POST /v1/profile/start first"};
  if (writer_.busy())
    return Response{409, "the previous trace is still being written; see GET /v1/profile"};
  telemetry::OwnedFd file;
  try {
    if (name.empty()) {
      auto created = directory_.create_unique(static_cast<int64_t>(std::time(nullptr)));
      name = std::move(created.first);
      file = std::move(created.second);
    } else {
      file = directory_.create(name);
    }
  } catch (const Error& error) {
    // The profile stays as it is: the client may retry with another name.
    return Response{400, error.what()};
  }
  TakenTrace trace;
  telemetry_.take_trace(trace);  // stop_mutex_: nothing took it since the check
  const std::string full_path = directory_.path() + "/" + name;
  const size_t num_spans = trace.spans.size();
  writer_.start(std::move(file), full_path, std::move(trace.spans),
                "keel serve " + telemetry_.model_name());
  return Response{200, nlohmann::json{{"path", full_path},
                                      {"spans", num_spans},
                                      {"stopped_by_cap", trace.stopped_by_cap},
                                      {"state", "writing"}}
                           .dump()};
}

}  // namespace keel
