// libFuzzer entry point for one target (KEEL_FUZZ_TARGET_NAME, set per binary by CMake).
#include "tests/fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const keel::fuzz::TargetFn target = keel::fuzz::targets().at(KEEL_FUZZ_TARGET_NAME);
  target(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
