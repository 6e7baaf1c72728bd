#include "comm/communicator.h"

#include <string>

#include "kernels/base/check.h"

namespace keel::comm {

std::string_view reduce_algo_name(ReduceAlgo algo) {
  switch (algo) {
    case ReduceAlgo::kNative:
      return "native";
    case ReduceAlgo::kFixedOrder:
      return "fixed_order";
  }
  // Only reachable through a cast of an out-of-range integer: that is a programming error.
  KEEL_CHECK(false, "unknown ReduceAlgo value ", static_cast<int>(algo));
}

ReduceAlgo parse_reduce_algo(std::string_view name) {
  if (name == "native") return ReduceAlgo::kNative;
  if (name == "fixed_order") return ReduceAlgo::kFixedOrder;
  throw_error("unknown all-reduce algorithm '", std::string(name),
              "' (expected 'native' or 'fixed_order')");
}

}  // namespace keel::comm
