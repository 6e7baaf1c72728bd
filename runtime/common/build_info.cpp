#include "runtime/common/build_info.h"

#include "keel_revision.h"  // generated into the build tree

namespace keel {

std::string_view build_revision() {
  return KEEL_BUILD_REVISION;
}

}  // namespace keel
