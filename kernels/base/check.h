// Errors in two tiers (STYLE.md lesson 6):
//  - keel::Error: recoverable, thrown at boundaries with context ("file X, tensor Y: expected
//    shape [a,b], found [c,d]"); the CLI prints it and exits non-zero.
//  - KEEL_CHECK: invariant violations; abort with rank and location.
// The rank is thread-local so that thread ranks and process ranks print the same prefix.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace keel {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Rank of the calling thread for fatal messages and log prefixes; -1 outside any rank.
void set_current_rank(int tp_rank);
int current_rank();

[[noreturn]] void fatal(const char* file, int line, const std::string& message);

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream stream;
  (stream << ... << args);
  return stream.str();
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void throw_error(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace keel

#define KEEL_CHECK(cond, ...)                                                           \
  do {                                                                                  \
    if (!(cond)) [[unlikely]]                                                           \
      ::keel::fatal(__FILE__, __LINE__,                                                 \
                    ::keel::detail::concat("check failed: " #cond " ", ##__VA_ARGS__)); \
  } while (0)
