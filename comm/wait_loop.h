// The polling loop every process-rank backend waits in (MPI requests, NCCL streams), written
// once so that its decisions -- done, timed out, aborted by the watchdog -- are CPU-tested
// (tests/test_collective_watch.cpp) for the backends that need hardware to run.
//
// Schedule: `spin_polls` back-to-back polls (a peer on another core answers within
// microseconds), then polls without pause until `spin_window`, then polls separated by
// sched_yield until `yield_window` (4 ranks on 2 cores: the peer we wait for usually needs our
// core), then polls separated by sleeps from `first_sleep` doubling to `max_sleep`, never past
// the deadline (so a long wait costs no CPU and the timeout is met to within one poll). Every
// window counts from `start`, the collective's entry.
//
// Between polls the loop checks the watch's abort flag (a watchdog thread saw a dead peer) and
// the deadline; the poll itself may throw (an MPI error, an NCCL asynchronous error). The loop
// never cancels anything: the caller decides what an abandoned collective leaves behind.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>

#include "comm/collective_watch.h"

namespace keel::comm {

struct WaitSchedule {
  using Duration = std::chrono::steady_clock::duration;
  int spin_polls = 0;
  Duration spin_window{0};
  Duration yield_window{0};
  Duration first_sleep{std::chrono::microseconds(20)};
  Duration max_sleep{std::chrono::milliseconds(1)};
};

enum class WaitOutcome : uint8_t { kDone, kTimedOut, kAborted };

// Polls `poll()` (returns true once the collective completed) until it completes, the deadline
// `start + timeout` passes (timeout 0: never), or `watch` has an abort request. Marks the wait
// on `watch` (WaitScope) for the watchdog.
template <typename Poll>
WaitOutcome wait_until_done(Poll&& poll, const WaitSchedule& schedule, CollectiveWatch& watch,
                            const char* collective, std::chrono::steady_clock::time_point start,
                            std::chrono::steady_clock::duration timeout) {
  using Clock = std::chrono::steady_clock;
  for (int polls = 0; polls < schedule.spin_polls; ++polls)
    if (poll()) return WaitOutcome::kDone;
  const WaitScope scope(watch, collective, start);
  const bool has_deadline = timeout > Clock::duration::zero();
  const Clock::time_point deadline = start + timeout;
  Clock::duration sleep = schedule.first_sleep;
  while (true) {
    if (poll()) return WaitOutcome::kDone;
    if (watch.abort_requested()) return WaitOutcome::kAborted;
    const Clock::time_point now = Clock::now();
    if (has_deadline && now >= deadline) return WaitOutcome::kTimedOut;
    const Clock::duration waited = now - start;
    if (waited < schedule.spin_window) continue;
    if (waited < schedule.yield_window) {
      std::this_thread::yield();
      continue;
    }
    Clock::duration nap = sleep;
    if (has_deadline) nap = std::min(nap, deadline - now);
    std::this_thread::sleep_for(nap);
    sleep = std::min(sleep * 2, schedule.max_sleep);
  }
}

}  // namespace keel::comm
