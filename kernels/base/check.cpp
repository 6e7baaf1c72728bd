#include "kernels/base/check.h"

#include <cstdio>
#include <cstdlib>

namespace keel {

namespace {
thread_local int g_current_rank = -1;
}

void set_current_rank(int tp_rank) {
  g_current_rank = tp_rank;
}
int current_rank() {
  return g_current_rank;
}

void fatal(const char* file, int line, const std::string& message) {
  std::fprintf(stderr, "[keel rank %d] FATAL %s:%d: %s\n", g_current_rank, file, line,
               message.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace keel
