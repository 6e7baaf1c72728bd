// The leader's step-progress watchdog (README "Faults"): a thread that looks at the leader
// rank's communicator every `poll` and tells the serving layer, within one poll, when steps
// stop progressing and why.
//
//  - Stalled: the leader has waited at least `stall` in one collective for its peers. Inside a
//    healthy step the leader waits only for a peer's one layer of compute, so a wait that long
//    means a peer is dead, stopped, hung or far behind. on_stall(reason) then makes /health
//    answer 503 with the reason; on_stall("") once collectives complete again.
//  - A peer found dead (comm::Communicator::peer_faults: its process on this node is gone) is
//    final: the watchdog aborts the communicator at once, so the leader's collective throws
//    and every in-flight request gets an error naming the rank, instead of everyone waiting
//    for the collective timeout (or, under mpirun, for mpirun's teardown, which kills the
//    leader ~2 s after a rank dies).
//  - Anything else (a stopped or slow peer, a peer on another node) ends at the collective
//    timeout, whose error names what peer_faults() found by then.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace keel {

struct WatchdogOptions {
  std::chrono::milliseconds stall{1000};  // a collective wait this long marks steps stalled
  std::chrono::milliseconds poll{100};
};

// One look at the leader's state: what /health should say and whether to abort.
struct WatchdogVerdict {
  std::string stall_reason;  // empty: steps progress
  std::string abort_reason;  // non-empty: abort the communicator with it
};
WatchdogVerdict judge_progress(const comm::CollectiveWatch::Snapshot& snapshot,
                               const std::vector<comm::PeerFault>& faults, int leader_rank,
                               std::chrono::milliseconds stall);

class StepWatchdog {
 public:
  // Starts the thread. on_stall is called from it, on every change of the stall reason.
  StepWatchdog(comm::Communicator& communicator, WatchdogOptions options,
               std::function<void(const std::string&)> on_stall);
  ~StepWatchdog();  // stops and joins the thread
  StepWatchdog(const StepWatchdog&) = delete;
  StepWatchdog& operator=(const StepWatchdog&) = delete;

 private:
  void run();

  comm::Communicator& communicator_;
  const WatchdogOptions options_;
  std::function<void(const std::string&)> on_stall_;
  std::mutex mutex_;
  std::condition_variable wakeup_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace keel
