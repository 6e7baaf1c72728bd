// The failure policy of a backend whose collectives are enqueued on a device and then polled
// (NCCL: ncclAllReduce on a stream, cudaStreamQuery + ncclCommGetAsyncError), written without
// any device API so that every decision is CPU-tested (tests/test_comm_faults.cpp) for the
// backend that needs a GPU to run. NcclCommunicator is a thin DeviceQueue over CUDA and NCCL.
//
// Policy (README "Faults"):
//  - run(): enqueue, then wait (comm/wait_loop.h) until the queue finished, the timeout passed,
//    or another thread asked for an abort (Communicator::abort, the serving watchdog on a dead
//    peer). Anything but "finished" -- the enqueue or a poll throwing (NCCL's asynchronous
//    error), the timeout, the abort -- aborts the queue exactly once (ncclCommAbort, which
//    stops kernels still waiting for the missing peer) and throws keel::Error naming the rank,
//    the collective and why; a timeout also names what peer_faults() found ("rank 2 is
//    stopped (...)").
//  - The abort always runs on the rank's own thread, inside the call: NCCL's communicator is
//    not touched by two threads at once, and the watchdog thread only sets a flag.
//  - Once aborted, every later call throws "unusable after an earlier failure: <why>"; an abort
//    requested while no call was in progress aborts the queue at the next call.
#pragma once

#include <chrono>
#include <exception>
#include <string>

#include "comm/communicator.h"
#include "comm/wait_loop.h"

namespace keel::comm {

// The device side of a polled backend.
class DeviceQueue {
 public:
  virtual ~DeviceQueue() = default;
  // True once everything enqueued has finished; throws keel::Error when it never will (an
  // asynchronous error: a peer or the network failed).
  virtual bool finished() = 0;
  // Stops everything enqueued for good and releases the device-side communicator. Called at
  // most once, while an error propagates: must not throw.
  virtual void abort_queue() noexcept = 0;
};

class PolledCollectives {
 public:
  // `owner` gives the rank, the watch (abort requests, wait marks) and peer_faults(); it and
  // `queue` must outlive this object (the owner usually holds both as members). The timeout
  // starts at 0 (forever).
  PolledCollectives(Communicator& owner, DeviceQueue& queue, WaitSchedule schedule)
      : owner_(owner), queue_(queue), schedule_(schedule) {}

  // 0: forever. Throws keel::Error on a negative timeout.
  void set_timeout(std::chrono::milliseconds timeout);
  std::chrono::milliseconds timeout() const { return timeout_; }
  bool aborted() const { return aborted_; }
  const std::string& failure() const { return failure_; }

  // Start of every call: throws once the queue was aborted; an abort requested meanwhile
  // aborts it first. `describe()` names the call ("all_reduce of 64 floats"); it runs only
  // when there is an error to report, so the fast path builds no string.
  template <typename Describe>
  void fail_if_unusable(Describe&& describe) {
    if (!aborted_ && owner_.watch().abort_requested()) abort_requested_meanwhile();
    if (aborted_) [[unlikely]]
      throw_unusable(describe());
  }

  // enqueue() (may throw), then the wait; see the top of this file.
  template <typename Describe, typename Enqueue>
  void run(const char* collective, Describe&& describe, Enqueue&& enqueue) {
    try {
      enqueue();
      const WaitOutcome outcome =
          wait_until_done([this] { return queue_.finished(); }, schedule_, owner_.watch(),
                          collective, std::chrono::steady_clock::now(), timeout_);
      if (outcome != WaitOutcome::kDone) throw_unfinished(outcome, describe());
    } catch (const std::exception& error) {
      abort_queue(error.what());
      throw;
    } catch (...) {
      abort_queue(describe() + " failed");
      throw;
    }
  }

 private:
  void abort_requested_meanwhile();
  [[noreturn]] void throw_unusable(const std::string& what) const;
  // kAborted: "rank R: <what> aborted: <reason>"; kTimedOut: "... timed out after T ms: ..."
  // with the peer faults found.
  [[noreturn]] void throw_unfinished(WaitOutcome outcome, const std::string& what) const;
  void abort_queue(const std::string& reason) noexcept;

  Communicator& owner_;
  DeviceQueue& queue_;
  const WaitSchedule schedule_;
  std::chrono::milliseconds timeout_{0};
  bool aborted_ = false;
  std::string failure_;  // why the queue was aborted, for later calls' errors
};

}  // namespace keel::comm
