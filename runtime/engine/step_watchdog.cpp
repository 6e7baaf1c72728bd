#include "runtime/engine/step_watchdog.h"

#include <spdlog/spdlog.h>

#include <cstdio>

#include "kernels/base/check.h"

namespace keel {

namespace {

std::string seconds_text(std::chrono::steady_clock::duration duration) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", std::chrono::duration<double>(duration).count());
  return text;
}

}  // namespace

WatchdogVerdict judge_progress(const comm::CollectiveWatch::Snapshot& snapshot,
                               const std::vector<comm::PeerFault>& faults, int leader_rank,
                               std::chrono::milliseconds stall) {
  WatchdogVerdict verdict;
  std::vector<comm::PeerFault> dead;
  for (const comm::PeerFault& fault : faults)
    if (fault.kind == comm::PeerFault::Kind::kDead) dead.push_back(fault);
  if (!dead.empty()) {
    verdict.abort_reason = comm::describe_peer_faults(dead, "");
    verdict.stall_reason = "steps stopped: " + verdict.abort_reason;
    return verdict;
  }
  if (!snapshot.waiting || snapshot.waited < stall) return verdict;
  verdict.stall_reason = keel::detail::concat(
      "steps stalled: rank ", leader_rank, " has waited ", seconds_text(snapshot.waited), " in ",
      snapshot.collective, " for its peers; ",
      comm::describe_peer_faults(faults, "no peer on this node is dead or stopped"));
  return verdict;
}

StepWatchdog::StepWatchdog(comm::Communicator& communicator, WatchdogOptions options,
                           std::function<void(const std::string&)> on_stall)
    : communicator_(communicator), options_(options), on_stall_(std::move(on_stall)) {
  if (options_.stall.count() <= 0 || options_.poll.count() <= 0)
    throw_error("StepWatchdog: stall and poll must be positive (got ", options_.stall.count(),
                " ms and ", options_.poll.count(), " ms)");
  thread_ = std::thread([this] { run(); });
}

StepWatchdog::~StepWatchdog() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wakeup_.notify_all();
  thread_.join();
}

void StepWatchdog::run() {
  std::string reported;
  bool aborted = false;
  std::unique_lock lock(mutex_);
  while (!wakeup_.wait_for(lock, options_.poll, [this] { return stopping_; })) {
    lock.unlock();
    const WatchdogVerdict verdict =
        judge_progress(communicator_.watch().snapshot(), communicator_.peer_faults(),
                       communicator_.rank(), options_.stall);
    if (!verdict.abort_reason.empty() && !aborted) {
      aborted = true;
      spdlog::error("watchdog: {}: aborting the step", verdict.abort_reason);
      communicator_.abort(verdict.abort_reason);
    }
    if (verdict.stall_reason != reported) {
      // Logged when the state flips; /health shows every update (the waited time grows).
      if (reported.empty()) spdlog::warn("watchdog: {}", verdict.stall_reason);
      if (verdict.stall_reason.empty()) spdlog::warn("watchdog: steps progress again");
      reported = verdict.stall_reason;
      on_stall_(reported);
    }
    lock.lock();
  }
}

}  // namespace keel
