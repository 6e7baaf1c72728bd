// Is a peer rank's process still there? Process ranks on one node can answer that exactly and
// at once from /proc, whatever the rank is doing: a killed rank is gone (or a zombie) within
// milliseconds, a SIGSTOPped one shows state T. The serving watchdog uses it to name the rank
// that broke a step (comm/communicator.h PeerFault) long before a collective timeout would.
//
// Identity is (node, pid, start time): the start time (clock ticks since boot, /proc/PID/stat
// field 22) tells a reused pid from the rank that died. Peers on other nodes cannot be probed
// this way; probe_peers() leaves them to the collective timeout.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace keel::comm {

struct ProcessIdentity {
  int64_t pid = 0;
  uint64_t start_ticks = 0;
  std::string node;  // gethostname()
};

// The identity of process `pid` on this node (start time 0 when /proc cannot tell), and of this
// process.
ProcessIdentity process_identity(int64_t pid);
ProcessIdentity this_process_identity();

enum class ProcessState : uint8_t {
  kAlive,    // running or sleeping
  kStopped,  // stopped by a signal or traced (state T or t)
  kGone,     // no such process, a zombie (exited, not yet reaped), or the pid was reused
  kUnknown,  // /proc could not be read (not Linux, no permission)
};

// The state of a process on this node.
ProcessState probe_process(const ProcessIdentity& identity);

// kDead / kStopped faults of the peers in `ranks` (indexed by rank) that live on this node;
// `self_rank` and peers on other nodes are skipped. Reads /proc once per local peer.
std::vector<PeerFault> probe_local_peers(const std::vector<ProcessIdentity>& ranks, int self_rank);

}  // namespace keel::comm
