// What one rank's communicator is waiting for, seen from another thread, and that thread's way to
// stop the wait. The serving watchdog (runtime/engine/step_watchdog.h) reads it on the leader to
// tell a stalled step from a busy one and aborts a collective whose peer is dead.
//
// Design:
//  - The rank's own thread marks each wait: enter() when a collective starts waiting for peers,
//    leave() when it returns or throws (WaitScope does both). Four relaxed-enough atomics, no
//    lock: the fast path of a collective pays two stores and a clock read.
//  - snapshot() may be read by any thread at any time. Its fields are individually exact; read
//    while enter()/leave() run, they may mix two consecutive waits, which a once-per-100-ms
//    health check does not mind.
//  - request_abort(reason) from any thread: the first reason wins, and every wait loop polls
//    abort_requested() between its completion checks (comm/wait_loop.h), so a collective stuck
//    on a dead peer returns control within one poll interval. What an aborted collective leaves
//    behind is backend-specific (MPI: the request stays posted; NCCL: ncclCommAbort); in every
//    backend the communicator is unusable afterwards.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace keel::comm {

class CollectiveWatch {
 public:
  using Clock = std::chrono::steady_clock;

  struct Snapshot {
    bool waiting = false;         // inside a collective's wait right now
    const char* collective = "";  // the collective being waited on ("all_reduce", ...)
    Clock::duration waited{0};    // how long the current wait has lasted
    int64_t num_completed = 0;    // waits finished so far (completed or thrown)
  };

  // The rank's own thread. `collective` must be a string literal (it is kept by pointer).
  void enter(const char* collective, Clock::time_point start) noexcept;
  void leave() noexcept;

  // Any thread.
  Snapshot snapshot() const noexcept;
  void request_abort(const std::string& reason);
  bool abort_requested() const noexcept { return abort_requested_.load(std::memory_order_acquire); }
  std::string abort_reason() const;

 private:
  std::atomic<bool> waiting_{false};
  std::atomic<const char*> collective_{""};
  std::atomic<int64_t> wait_start_ns_{0};
  std::atomic<int64_t> num_completed_{0};
  std::atomic<bool> abort_requested_{false};
  mutable std::mutex mutex_;  // guards abort_reason_
  std::string abort_reason_;
};

// Marks one wait on `watch` for the lifetime of the scope.
class WaitScope {
 public:
  WaitScope(CollectiveWatch& watch, const char* collective,
            CollectiveWatch::Clock::time_point start) noexcept
      : watch_(watch) {
    watch_.enter(collective, start);
  }
  ~WaitScope() { watch_.leave(); }
  WaitScope(const WaitScope&) = delete;
  WaitScope& operator=(const WaitScope&) = delete;

 private:
  CollectiveWatch& watch_;
};

}  // namespace keel::comm
