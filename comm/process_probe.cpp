#include "comm/process_probe.h"

#include <unistd.h>

#include <array>
#include <fstream>
#include <sstream>

#include "kernels/base/check.h"

namespace keel::comm {

namespace {

struct StatLine {
  char state = '?';
  uint64_t start_ticks = 0;
};

// Parses /proc/PID/stat: "PID (COMM) STATE f4 f5 ... f22=starttime ...". COMM may hold spaces
// and parentheses, so the fields start after the last ')'.
bool read_stat(int64_t pid, StatLine& line) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  if (!file) return false;
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const size_t comm_end = text.rfind(')');
  if (comm_end == std::string::npos) return false;
  std::istringstream fields(text.substr(comm_end + 1));
  fields >> line.state;
  // Fields 4..21 precede the start time (field 22).
  std::string skipped;
  for (int field = 4; field < 22; ++field) fields >> skipped;
  fields >> line.start_ticks;
  return !fields.fail();
}

}  // namespace

ProcessIdentity this_process_identity() {
  return process_identity(static_cast<int64_t>(::getpid()));
}

ProcessIdentity process_identity(int64_t pid) {
  ProcessIdentity identity;
  identity.pid = pid;
  StatLine line;
  if (read_stat(identity.pid, line)) identity.start_ticks = line.start_ticks;
  std::array<char, 256> host{};
  if (::gethostname(host.data(), host.size() - 1) == 0) identity.node = host.data();
  return identity;
}

ProcessState probe_process(const ProcessIdentity& identity) {
  if (identity.pid <= 0) return ProcessState::kUnknown;
  StatLine line;
  if (!read_stat(identity.pid, line)) {
    // No /proc entry for a pid that had one: the process is gone. Without /proc at all (the
    // identity has no start time) nothing can be said.
    return identity.start_ticks != 0 ? ProcessState::kGone : ProcessState::kUnknown;
  }
  if (identity.start_ticks != 0 && line.start_ticks != identity.start_ticks)
    return ProcessState::kGone;  // the pid now names another process
  switch (line.state) {
    case 'Z':
    case 'X':
    case 'x':
      return ProcessState::kGone;
    case 'T':
    case 't':
      return ProcessState::kStopped;
    default:
      return ProcessState::kAlive;
  }
}

std::vector<PeerFault> probe_local_peers(const std::vector<ProcessIdentity>& ranks, int self_rank) {
  std::vector<PeerFault> faults;
  const size_t self = static_cast<size_t>(self_rank);
  if (self >= ranks.size()) return faults;
  for (size_t rank = 0; rank < ranks.size(); ++rank) {
    if (rank == self || ranks[rank].node != ranks[self].node) continue;
    const ProcessState state = probe_process(ranks[rank]);
    if (state != ProcessState::kGone && state != ProcessState::kStopped) continue;
    PeerFault fault;
    fault.rank = static_cast<int>(rank);
    fault.kind = state == ProcessState::kGone ? PeerFault::Kind::kDead : PeerFault::Kind::kStopped;
    fault.detail = keel::detail::concat("pid ", ranks[rank].pid, " on ", ranks[rank].node,
                                        state == ProcessState::kGone ? " exited" : " is stopped");
    faults.push_back(std::move(fault));
  }
  return faults;
}

}  // namespace keel::comm
