// In-process communicator: N ranks are N threads of one process sharing one ThreadGroup.
//
// Design (details, measurements and the ordering argument are in thread_comm.cpp):
//  - Zero-copy through shared memory. Each collective publishes the calling rank's buffer
//    pointers in a per-rank slot of the group; ranks then read and write each other's buffers
//    directly. Every collective is: publish, entry barrier, one work phase, exit barrier.
//  - all_reduce(data, count, algo), in place: a reduce-scatter fused with an all-gather. The
//    message is split into 64-byte-aligned chunks; in the work phase the owner of chunk c
//    reads chunk c of every rank's buffer, sums it in the algorithm's order and writes the sum
//    into chunk c of every rank's buffer. Chunk c of any buffer is touched only by its owner
//    between the two barriers, so no write races with a read; the exit barrier keeps every
//    rank from returning (and reusing its buffer) while a peer may still write into it.
//  - ReduceAlgo::kFixedOrder: N chunks (64-byte aligned), every element summed
//    ((p0 + p1) + p2) + ... in rank order, whatever the message size.
//  - ReduceAlgo::kNative: chunk c (owned by rank c mod N) is summed starting at rank c mod N:
//    ((p_c + p_{c+1}) + ...) mod N, ring reduce-scatter style. The chunk count depends on the
//    message size (1 chunk under 64 KiB, N chunks under 4 MiB, 2N chunks above), so an element's
//    summation order depends on the message size, as with NCCL. Results are identical on all
//    ranks.
//  - Barrier: one 32-bit atomic word holds {aborted bit, generation, arrived count}; waiters
//    spin briefly, yield for up to 100 us, then sleep on a condition variable (4 ranks may
//    share 2 cores, so long spinning would starve the peer being waited for).
//  - ThreadGroup::abort(reason) makes every pending and future collective throw
//    keel::Error("collective aborted: <reason> ...") instead of waiting forever. A collective
//    whose entry barrier had already completed finishes normally (its remaining work is bounded
//    memory traffic) so no rank returns while a peer still reads or writes its buffer.
//  - Faults (comm/communicator.h): a rank asleep in an entry barrier marks its watch();
//    peer_faults() names the ranks that have not entered the collective it waits in (each rank
//    counts the collectives it entered); Communicator::abort aborts the whole group.
//  - Errors are keel::Error naming the rank and the collective. Arguments the ranks disagree on
//    (count, algorithm, root) or a rank's invalid arguments make every rank throw in the same
//    call, after which the group is still usable.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace keel::comm {

struct ThreadCommOptions {
  // Test hook: when > 0, each rank sleeps a pseudo-random time in [0, max] before entering each
  // collective, drawn from (delay_seed, rank, call index), to shake out ordering bugs.
  std::chrono::microseconds max_injected_delay{0};
  uint64_t delay_seed = 0;
  // A rank that waits longer than this for its peers to enter a collective throws keel::Error
  // naming itself and the collective, and aborts the group. 0 = wait forever.
  std::chrono::milliseconds timeout{0};
};

namespace detail {
struct GroupState;
}

// Shared state of `size` thread ranks (1..8). Communicators keep the state alive, so the group
// object itself may be destroyed before them.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size, ThreadCommOptions options = {});
  ~ThreadGroup();
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;

  int size() const;

  // The communicator of `rank`; each rank may be claimed once (throws keel::Error otherwise).
  // The returned communicator must be used by one thread at a time.
  std::unique_ptr<Communicator> communicator(int rank);

  // After this, every pending and future collective on every rank throws
  // keel::Error("collective aborted: <reason> ..."). Thread-safe; the first reason wins.
  void abort(const std::string& reason);
  bool aborted() const;

 private:
  std::shared_ptr<detail::GroupState> state_;
};

}  // namespace keel::comm
