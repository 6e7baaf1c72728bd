// spdlog set-up: every line carries the rank of the thread that wrote it ("[keel r2 info]"),
// quiet by default (warnings and errors only); --verbose turns on info.
#pragma once

#include <spdlog/spdlog.h>

namespace keel {

void init_logging(bool verbose);

}  // namespace keel
