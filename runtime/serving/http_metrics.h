// The HTTP front end's connection handling as Prometheus families (appended to GET /metrics by
// keel serve): open connections, evictions, refusals and slow-reader aborts, so an operator
// (and scripts/soak) can see squatters being closed and connections returning to idle.
#pragma once

#include <string>

#include "runtime/server/http_server.h"

namespace keel {

std::string http_prometheus(const server::HttpServerStats& stats, const std::string& model_name);

}  // namespace keel
