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

std::string describe_peer_fault(const PeerFault& fault) {
  const char* what = "is behind";
  switch (fault.kind) {
    case PeerFault::Kind::kDead:
      what = "died";
      break;
    case PeerFault::Kind::kStopped:
      what = "is stopped";
      break;
    case PeerFault::Kind::kBehind:
      break;
  }
  std::string text = keel::detail::concat("rank ", fault.rank, " ", what);
  if (!fault.detail.empty()) text += keel::detail::concat(" (", fault.detail, ")");
  return text;
}

std::string describe_peer_faults(const std::vector<PeerFault>& faults,
                                 std::string_view none_found) {
  if (faults.empty()) return std::string(none_found);
  std::string text;
  for (const PeerFault& fault : faults) {
    if (!text.empty()) text += "; ";
    text += describe_peer_fault(fault);
  }
  return text;
}

}  // namespace keel::comm
