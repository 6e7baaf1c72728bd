// The NCCL backend's failure policy on the CPU (README "Faults"): comm/polled_collectives.h over
// a fake DeviceQueue standing in for the stream and ncclCommGetAsyncError / ncclCommAbort.
// NcclCommunicator is this same policy with a CUDA queue, so what is asserted here -- the
// timeout, the asynchronous error and the watchdog's abort each abort the queue exactly once,
// on the rank's own thread, with an error naming the rank and the peer; every later call is
// refused -- is what a GPU rank does (test_nccl_comm, label gpu, runs the real one).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/polled_collectives.h"
#include "kernels/base/check.h"
#include "runtime/engine/step_watchdog.h"

namespace {

using keel::comm::PeerFault;
using namespace std::chrono_literals;

// The device: finishes what is enqueued once `peers_arrive`, reports an asynchronous error once
// `async_error`; counts enqueues and aborts and remembers the aborting thread.
class FakeQueue final : public keel::comm::DeviceQueue {
 public:
  std::atomic<bool> peers_arrive{false};
  std::atomic<bool> async_error{false};
  std::atomic<bool> enqueue_fails{false};
  std::atomic<int> num_enqueued{0};
  std::atomic<int> num_aborts{0};
  std::thread::id aborted_on;

  bool finished() override {
    if (async_error.load())
      keel::throw_error(
          "NCCL asynchronous error: remote process exited or there was a network "
          "error");
    return peers_arrive.load();
  }
  void abort_queue() noexcept override {
    aborted_on = std::this_thread::get_id();
    num_aborts.fetch_add(1);
  }
};

// A rank of a polled backend, as NcclCommunicator is one, over FakeQueue.
class FakeDeviceCommunicator final : public keel::comm::Communicator {
 public:
  FakeDeviceCommunicator()
      : polled_(*this, queue,
                {.spin_polls = 2,
                 .spin_window = std::chrono::microseconds(10),
                 .yield_window = std::chrono::microseconds(50),
                 .first_sleep = std::chrono::microseconds(20),
                 .max_sleep = std::chrono::microseconds(500)}) {}

  int rank() const override { return 0; }
  int size() const override { return 4; }
  void all_reduce(float*, size_t count, keel::comm::ReduceAlgo) override {
    run("all_reduce", count);
  }
  void all_gather(const float*, size_t count, float*) override { run("all_gather", count); }
  void broadcast(void*, size_t bytes, int) override { run("broadcast", bytes); }
  void barrier() override { run("barrier", 0); }
  std::vector<PeerFault> peer_faults() const override {
    std::lock_guard lock(mutex_);
    return faults_;
  }
  void set_timeout(std::chrono::milliseconds timeout) override { polled_.set_timeout(timeout); }

  void set_peer_faults(std::vector<PeerFault> faults) {
    std::lock_guard lock(mutex_);
    faults_ = std::move(faults);
  }
  const keel::comm::PolledCollectives& polled() const { return polled_; }

  FakeQueue queue;

 private:
  void run(const char* collective, size_t count) {
    auto describe = [&] { return keel::detail::concat(collective, " of ", count); };
    polled_.fail_if_unusable(describe);
    polled_.run(collective, describe, [&] {
      queue.num_enqueued.fetch_add(1);
      if (queue.enqueue_fails.load()) keel::throw_error("ncclAllReduce failed: invalid usage");
    });
  }

  keel::comm::PolledCollectives polled_;
  mutable std::mutex mutex_;
  std::vector<PeerFault> faults_;
};

std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const keel::Error& error) {
    return error.what();
  }
  return "";
}

TEST(PolledCollectives, ACompletedCollectiveAbortsNothing) {
  FakeDeviceCommunicator comm;
  comm.set_timeout(5000ms);
  comm.queue.peers_arrive = true;
  comm.all_reduce(nullptr, 64, keel::comm::ReduceAlgo::kNative);
  comm.barrier();
  EXPECT_EQ(comm.queue.num_enqueued.load(), 2);
  EXPECT_EQ(comm.queue.num_aborts.load(), 0);
  EXPECT_FALSE(comm.polled().aborted());
}

TEST(PolledCollectives, ATimeoutAbortsTheQueueOnceAndNamesTheStoppedPeer) {
  FakeDeviceCommunicator comm;
  comm.set_timeout(30ms);
  comm.set_peer_faults(
      {{.rank = 2, .kind = PeerFault::Kind::kStopped, .detail = "pid 4242 on gpu1 is stopped"}});
  const std::string error =
      error_of([&] { comm.all_reduce(nullptr, 64, keel::comm::ReduceAlgo::kNative); });
  EXPECT_NE(error.find("rank 0: all_reduce of 64 timed out after 30 ms"), std::string::npos)
      << error;
  EXPECT_NE(error.find("(rank 2 is stopped (pid 4242 on gpu1 is stopped))"), std::string::npos)
      << error;
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
  EXPECT_EQ(comm.queue.aborted_on, std::this_thread::get_id());
  EXPECT_FALSE(comm.watch().snapshot().waiting);

  // Every later call is refused before anything is enqueued, naming the first failure.
  comm.queue.peers_arrive = true;
  const std::string later = error_of([&] { comm.barrier(); });
  EXPECT_NE(later.find("rank 0: barrier of 0: communicator unusable after an earlier failure: "
                       "rank 0: all_reduce of 64 timed out"),
            std::string::npos)
      << later;
  EXPECT_EQ(comm.queue.num_enqueued.load(), 1);
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
}

TEST(PolledCollectives, AnAsynchronousErrorAbortsTheQueueAndIsReported) {
  FakeDeviceCommunicator comm;  // timeout 0: only the device can end the wait
  comm.queue.async_error = true;
  const std::string error = error_of([&] { comm.broadcast(nullptr, 12, 0); });
  EXPECT_NE(error.find("NCCL asynchronous error: remote process exited"), std::string::npos)
      << error;
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
  EXPECT_NE(comm.polled().failure().find("NCCL asynchronous error"), std::string::npos);
}

TEST(PolledCollectives, AFailedEnqueueAbortsTheQueue) {
  FakeDeviceCommunicator comm;
  comm.queue.enqueue_fails = true;
  const std::string error = error_of([&] { comm.all_gather(nullptr, 8, nullptr); });
  EXPECT_NE(error.find("ncclAllReduce failed: invalid usage"), std::string::npos) << error;
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
  EXPECT_TRUE(comm.polled().aborted());
}

// The serving path on a GPU rank: the leader waits forever (timeout 0) on a peer that died; the
// watchdog thread sees the dead process, reports it and aborts; the leader's own thread then
// aborts the queue (ncclCommAbort) and throws an error naming the rank.
TEST(PolledCollectives, TheWatchdogEndsAWaitOnADeadPeerAndTheRankAbortsItsQueue) {
  FakeDeviceCommunicator comm;
  std::mutex mutex;
  std::vector<std::string> reports;
  std::string error;
  {
    keel::StepWatchdog watchdog(comm, {.stall = 1000ms, .poll = 10ms},
                                [&](const std::string& reason) {
                                  std::lock_guard lock(mutex);
                                  reports.push_back(reason);
                                });
    // The peer dies once the leader waits for it (an abort before the call would be refused
    // at the call's start instead, the next test's case).
    std::thread peer([&] {
      while (!comm.watch().snapshot().waiting) std::this_thread::yield();
      comm.set_peer_faults(
          {{.rank = 2, .kind = PeerFault::Kind::kDead, .detail = "pid 4242 on gpu1 exited"}});
    });
    error = error_of([&] { comm.all_reduce(nullptr, 64, keel::comm::ReduceAlgo::kNative); });
    peer.join();
  }
  EXPECT_NE(error.find("rank 0: all_reduce of 64 aborted: rank 2 died (pid 4242 on gpu1 exited)"),
            std::string::npos)
      << error;
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
  EXPECT_EQ(comm.queue.aborted_on, std::this_thread::get_id());
  std::lock_guard lock(mutex);
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.front(), "steps stopped: rank 2 died (pid 4242 on gpu1 exited)");
}

TEST(PolledCollectives, AnAbortBetweenCallsAbortsTheQueueAtTheNextCall) {
  FakeDeviceCommunicator comm;
  comm.queue.peers_arrive = true;
  comm.abort("rank 3 died (pid 7 on gpu1 exited)");
  EXPECT_EQ(comm.queue.num_aborts.load(), 0);  // no call in progress: nothing touched yet
  const std::string error = error_of([&] { comm.barrier(); });
  EXPECT_NE(error.find("communicator unusable after an earlier failure: aborted: rank 3 died"),
            std::string::npos)
      << error;
  EXPECT_EQ(comm.queue.num_aborts.load(), 1);
  EXPECT_EQ(comm.queue.num_enqueued.load(), 0);
}

TEST(PolledCollectives, ANegativeTimeoutIsRefused) {
  FakeDeviceCommunicator comm;
  const std::string error = error_of([&] { comm.set_timeout(-1ms); });
  EXPECT_NE(error.find("rank 0: negative collective timeout -1 ms"), std::string::npos) << error;
}

}  // namespace
