// Fault handling below the server (README "Faults"): the shared wait loop's decisions (done,
// timed out, aborted) that the MPI and NCCL backends rely on, the process probes that name a
// dead or stopped rank, the thread backend's "who is behind", and the leader's watchdog
// verdicts and thread. The end-to-end checks under mpirun are in test_mpi_faults.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/collective_watch.h"
#include "comm/process_probe.h"
#include "comm/thread_comm.h"
#include "comm/wait_loop.h"
#include "kernels/base/check.h"
#include "runtime/engine/step_watchdog.h"

namespace {

using keel::comm::CollectiveWatch;
using keel::comm::PeerFault;
using keel::comm::ProcessIdentity;
using keel::comm::ProcessState;
using keel::comm::WaitOutcome;
using keel::comm::WaitSchedule;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr WaitSchedule kSchedule{.spin_polls = 4,
                                 .spin_window = std::chrono::microseconds(10),
                                 .yield_window = std::chrono::microseconds(100),
                                 .first_sleep = std::chrono::microseconds(20),
                                 .max_sleep = std::chrono::milliseconds(1)};

TEST(WaitLoop, ReturnsDoneOnTheFirstCompletedPoll) {
  CollectiveWatch watch;
  int polls = 0;
  const WaitOutcome outcome = keel::comm::wait_until_done([&] { return ++polls == 10; }, kSchedule,
                                                          watch, "all_reduce", Clock::now(), 0ms);
  EXPECT_EQ(outcome, WaitOutcome::kDone);
  EXPECT_EQ(polls, 10);
  EXPECT_FALSE(watch.snapshot().waiting);
  EXPECT_EQ(watch.snapshot().num_completed, 1);  // past the spin polls: the wait was marked
}

TEST(WaitLoop, SpinPollsThatCompleteDoNotMarkAWait) {
  CollectiveWatch watch;
  const WaitOutcome outcome = keel::comm::wait_until_done([] { return true; }, kSchedule, watch,
                                                          "barrier", Clock::now(), 0ms);
  EXPECT_EQ(outcome, WaitOutcome::kDone);
  EXPECT_EQ(watch.snapshot().num_completed, 0);
}

TEST(WaitLoop, TimesOutAtTheDeadlineCountedFromTheCollectivesStart) {
  CollectiveWatch watch;
  const auto start = Clock::now();
  const WaitOutcome outcome =
      keel::comm::wait_until_done([] { return false; }, kSchedule, watch, "broadcast", start, 30ms);
  EXPECT_EQ(outcome, WaitOutcome::kTimedOut);
  EXPECT_GE(Clock::now() - start, 30ms);
  EXPECT_FALSE(watch.snapshot().waiting);
}

TEST(WaitLoop, AnAbortFromAnotherThreadEndsAWaitWithoutDeadline) {
  CollectiveWatch watch;
  std::promise<void> waiting_seen;
  std::thread watchdog([&] {
    // The wait is visible to the watchdog while it lasts: collective name and growing time.
    while (!watch.snapshot().waiting) std::this_thread::sleep_for(1ms);
    const CollectiveWatch::Snapshot snapshot = watch.snapshot();
    EXPECT_STREQ(snapshot.collective, "all_gather");
    waiting_seen.set_value();
    watch.request_abort("rank 3 died");
    watch.request_abort("second reason, ignored");
  });
  const WaitOutcome outcome = keel::comm::wait_until_done([] { return false; }, kSchedule, watch,
                                                          "all_gather", Clock::now(), 0ms);
  watchdog.join();
  EXPECT_EQ(outcome, WaitOutcome::kAborted);
  EXPECT_EQ(watch.abort_reason(), "rank 3 died");
  EXPECT_FALSE(watch.snapshot().waiting);
}

TEST(WaitLoop, APollThatThrowsEndsTheWaitAndClearsTheMark) {
  CollectiveWatch watch;
  int polls = 0;
  auto poll = [&] {
    if (++polls == 8) keel::throw_error("NCCL asynchronous error: remote process exited");
    return false;
  };
  EXPECT_THROW(keel::comm::wait_until_done(poll, kSchedule, watch, "all_reduce", Clock::now(), 0ms),
               keel::Error);
  EXPECT_FALSE(watch.snapshot().waiting);
}

TEST(CollectiveWatch, SnapshotReportsTheWaitInProgress) {
  CollectiveWatch watch;
  EXPECT_FALSE(watch.snapshot().waiting);
  watch.enter("broadcast", Clock::now() - 2s);
  const CollectiveWatch::Snapshot snapshot = watch.snapshot();
  EXPECT_TRUE(snapshot.waiting);
  EXPECT_STREQ(snapshot.collective, "broadcast");
  EXPECT_GE(snapshot.waited, 2s);
  watch.leave();
  EXPECT_FALSE(watch.snapshot().waiting);
  EXPECT_EQ(watch.snapshot().num_completed, 1);
}

// A child process that sleeps until killed.
pid_t spawn_sleeper() {
  const pid_t pid = fork();
  if (pid == 0) {
    while (true) pause();
  }
  return pid;
}

ProcessIdentity identity_of(pid_t pid) {
  return keel::comm::process_identity(pid);
}

void wait_for_state(const ProcessIdentity& identity, ProcessState state) {
  for (int attempt = 0; attempt < 2000 && keel::comm::probe_process(identity) != state; ++attempt)
    std::this_thread::sleep_for(1ms);
}

TEST(ProcessProbe, TellsAliveStoppedAndGoneApart) {
  EXPECT_EQ(keel::comm::probe_process(keel::comm::this_process_identity()), ProcessState::kAlive);
  const pid_t child = spawn_sleeper();
  ASSERT_GT(child, 0);
  const ProcessIdentity identity = identity_of(child);
  ASSERT_NE(identity.start_ticks, 0u);
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kAlive);

  kill(child, SIGSTOP);
  wait_for_state(identity, ProcessState::kStopped);
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kStopped);
  kill(child, SIGCONT);
  wait_for_state(identity, ProcessState::kAlive);
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kAlive);

  // Killed but not reaped yet: a zombie is gone for the probe.
  kill(child, SIGKILL);
  wait_for_state(identity, ProcessState::kGone);
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kGone);
  waitpid(child, nullptr, 0);
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kGone);
}

TEST(ProcessProbe, AReusedPidIsNotTheRankThatDied) {
  ProcessIdentity identity = keel::comm::this_process_identity();
  identity.start_ticks += 1;  // the same pid, started at another time: another process
  EXPECT_EQ(keel::comm::probe_process(identity), ProcessState::kGone);
}

TEST(ProcessProbe, LocalPeersAreNamedByRankAndRemoteOnesAreSkipped) {
  const pid_t stopped_child = spawn_sleeper();
  const pid_t dead_child = spawn_sleeper();
  ASSERT_GT(stopped_child, 0);
  ASSERT_GT(dead_child, 0);
  std::vector<ProcessIdentity> ranks = {keel::comm::this_process_identity(),
                                        identity_of(stopped_child), identity_of(dead_child),
                                        identity_of(dead_child)};
  ranks[3].node = "another-node";  // rank 3 claims another node: never probed
  kill(stopped_child, SIGSTOP);
  wait_for_state(ranks[1], ProcessState::kStopped);
  kill(dead_child, SIGKILL);
  waitpid(dead_child, nullptr, 0);

  const std::vector<PeerFault> faults = keel::comm::probe_local_peers(ranks, 0);
  ASSERT_EQ(faults.size(), 2u);
  EXPECT_EQ(faults[0].rank, 1);
  EXPECT_EQ(faults[0].kind, PeerFault::Kind::kStopped);
  EXPECT_EQ(faults[1].rank, 2);
  EXPECT_EQ(faults[1].kind, PeerFault::Kind::kDead);
  EXPECT_EQ(keel::comm::describe_peer_fault(faults[1]),
            "rank 2 died (pid " + std::to_string(dead_child) + " on " + ranks[0].node + " exited)");
  kill(stopped_child, SIGKILL);
  waitpid(stopped_child, nullptr, 0);
}

TEST(Watchdog, VerdictsFollowTheWaitAndThePeers) {
  const auto stall = std::chrono::milliseconds(1000);
  CollectiveWatch::Snapshot busy{.waiting = true, .collective = "all_reduce", .waited = 200ms};
  CollectiveWatch::Snapshot stalled{.waiting = true, .collective = "all_reduce", .waited = 1500ms};
  const PeerFault stopped{.rank = 2, .kind = PeerFault::Kind::kStopped, .detail = "pid 7"};
  const PeerFault dead{.rank = 3, .kind = PeerFault::Kind::kDead, .detail = "pid 9"};

  EXPECT_EQ(keel::judge_progress({}, {}, 0, stall).stall_reason, "");
  EXPECT_EQ(keel::judge_progress(busy, {}, 0, stall).stall_reason, "");
  // A stopped peer alone is not fatal, and a short wait is not a stall.
  EXPECT_EQ(keel::judge_progress(busy, {stopped}, 0, stall).stall_reason, "");
  const keel::WatchdogVerdict slow = keel::judge_progress(stalled, {}, 0, stall);
  EXPECT_EQ(slow.stall_reason,
            "steps stalled: rank 0 has waited 1.5 s in all_reduce for its peers; no peer on this "
            "node is dead or stopped");
  EXPECT_EQ(slow.abort_reason, "");
  const keel::WatchdogVerdict hung = keel::judge_progress(stalled, {stopped}, 0, stall);
  EXPECT_EQ(hung.stall_reason,
            "steps stalled: rank 0 has waited 1.5 s in all_reduce for its peers; rank 2 is "
            "stopped (pid 7)");
  EXPECT_EQ(hung.abort_reason, "");
  // A dead peer aborts at once, stalled or not.
  const keel::WatchdogVerdict died = keel::judge_progress(busy, {stopped, dead}, 0, stall);
  EXPECT_EQ(died.abort_reason, "rank 3 died (pid 9)");
  EXPECT_EQ(died.stall_reason, "steps stopped: rank 3 died (pid 9)");
}

// Thread ranks: rank 0 waits in a collective that rank 2 has not entered.
TEST(ThreadFaults, TheRankThatHasNotEnteredIsNamedAndAbortReachesEveryWaiter) {
  keel::comm::ThreadGroup group(3);
  auto rank0 = group.communicator(0);
  auto rank1 = group.communicator(1);
  auto rank2 = group.communicator(2);
  std::atomic<int> thrown{0};
  std::vector<std::string> errors(2);
  auto waiter = [&](keel::comm::Communicator& communicator, int index) {
    try {
      communicator.barrier();
    } catch (const keel::Error& error) {
      errors[static_cast<size_t>(index)] = error.what();
      thrown.fetch_add(1);
    }
  };
  std::thread first(waiter, std::ref(*rank0), 0);
  std::thread second(waiter, std::ref(*rank1), 1);
  while (!rank0->watch().snapshot().waiting || !rank1->watch().snapshot().waiting)
    std::this_thread::sleep_for(1ms);
  const std::vector<PeerFault> faults = rank0->peer_faults();
  ASSERT_EQ(faults.size(), 1u);
  EXPECT_EQ(keel::comm::describe_peer_fault(faults[0]),
            "rank 2 is behind (has not entered barrier #1; its last was #0)");
  rank0->abort("rank 2 hangs");
  first.join();
  second.join();
  EXPECT_EQ(thrown.load(), 2);
  EXPECT_NE(errors[0].find("rank 2 hangs"), std::string::npos) << errors[0];
  EXPECT_NE(errors[1].find("rank 2 hangs"), std::string::npos) << errors[1];
  EXPECT_THROW(rank2->barrier(), keel::Error);  // aborted for good
}

TEST(ThreadFaults, ATimeoutNamesTheMissingRanks) {
  keel::comm::ThreadGroup group(3, {.timeout = std::chrono::milliseconds(50)});
  auto rank0 = group.communicator(0);
  auto rank1 = group.communicator(1);
  std::string error;
  try {
    rank0->barrier();
  } catch (const keel::Error& thrown) {
    error = thrown.what();
  }
  EXPECT_NE(error.find("(1 of 3 ranks arrived; missing: rank 1, rank 2)"), std::string::npos)
      << error;
}

// The watchdog thread over a real communicator: a stall is reported while it lasts and cleared
// when the collective completes; the reason names the rank that is behind.
TEST(StepWatchdog, ReportsAStallWhileItLastsAndClearsIt) {
  keel::comm::ThreadGroup group(2);
  auto leader = group.communicator(0);
  auto follower = group.communicator(1);
  std::mutex mutex;
  std::vector<std::string> reports;
  {
    keel::StepWatchdog watchdog(*leader, {.stall = 100ms, .poll = 10ms},
                                [&](const std::string& reason) {
                                  std::lock_guard lock(mutex);
                                  reports.push_back(reason);
                                });
    std::thread late([&] {
      std::this_thread::sleep_for(400ms);
      follower->barrier();
    });
    leader->barrier();
    late.join();
    std::this_thread::sleep_for(100ms);  // a few polls after the barrier completed
  }
  std::lock_guard lock(mutex);
  ASSERT_GE(reports.size(), 2u);
  EXPECT_NE(reports.front().find("steps stalled: rank 0 has waited"), std::string::npos)
      << reports.front();
  EXPECT_NE(reports.front().find("in barrier for its peers; rank 1 is behind"), std::string::npos)
      << reports.front();
  EXPECT_EQ(reports.back(), "");
}

TEST(StepWatchdog, RefusesNonPositiveIntervals) {
  keel::comm::ThreadGroup group(1);
  auto leader = group.communicator(0);
  EXPECT_THROW(keel::StepWatchdog(*leader, {.stall = 0ms}, [](const std::string&) {}), keel::Error);
}

}  // namespace
