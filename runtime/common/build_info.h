// What this build of keel is, for `keel --version`, GET /version, routing records and the
// system_fingerprint of responses.
#pragma once

#include <string_view>

namespace keel {

// The git revision the binary was built from: a 12-digit short commit hash, with "-dirty"
// when tracked files differed from that commit, or "unknown" outside a git checkout. Taken at
// build time (cmake/keel_revision.cmake runs at every build), not at configure time.
std::string_view build_revision();

}  // namespace keel
