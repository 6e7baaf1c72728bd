#include "comm/collective_watch.h"

#include <algorithm>

namespace keel::comm {

void CollectiveWatch::enter(const char* collective, Clock::time_point start) noexcept {
  collective_.store(collective, std::memory_order_relaxed);
  wait_start_ns_.store(
      std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count(),
      std::memory_order_relaxed);
  waiting_.store(true, std::memory_order_release);
}

void CollectiveWatch::leave() noexcept {
  waiting_.store(false, std::memory_order_release);
  num_completed_.fetch_add(1, std::memory_order_relaxed);
}

CollectiveWatch::Snapshot CollectiveWatch::snapshot() const noexcept {
  Snapshot snapshot;
  snapshot.waiting = waiting_.load(std::memory_order_acquire);
  snapshot.collective = collective_.load(std::memory_order_relaxed);
  snapshot.num_completed = num_completed_.load(std::memory_order_relaxed);
  if (snapshot.waiting) {
    const Clock::time_point start{
        std::chrono::nanoseconds(wait_start_ns_.load(std::memory_order_relaxed))};
    snapshot.waited = std::max(Clock::duration::zero(), Clock::now() - start);
  }
  return snapshot;
}

void CollectiveWatch::request_abort(const std::string& reason) {
  std::lock_guard lock(mutex_);
  if (abort_requested_.load(std::memory_order_relaxed)) return;  // the first reason wins
  abort_reason_ = reason;
  abort_requested_.store(true, std::memory_order_release);
}

std::string CollectiveWatch::abort_reason() const {
  std::lock_guard lock(mutex_);
  return abort_reason_;
}

}  // namespace keel::comm
