// The collective interface every rank talks through. Backends: in-process threads
// (thread_comm), OpenMPI processes (mpi_comm) and NCCL over MPI (nccl/nccl_comm). Forward code
// never knows which one it has; the pointers it passes are memory of the rank's backend (host
// for threads and MPI, device for NCCL).
//
// All-reduce algorithms (ARCHITECTURE.md section 3):
//  - kNative: the fastest this backend can do; the order in which an element's partials are
//    added may depend on message size and on the element's position (as NCCL's ring does).
//    Results are still identical on every rank.
//  - kFixedOrder: every element is ((p0 + p1) + p2) + ... + p{N-1} in fp32, rank order,
//    whatever the message size (comm/rank_order_sum.h on the host, nccl/ordered_sum.h on the
//    device). Threads: each rank sums its chunk over all ranks, then copies the others' chunks
//    (reduce-scatter + all-gather, ring-class bytes). MPI: all-to-all of chunks, the rank-order
//    sum, all-gather. NCCL: all-gather (or grouped send/recv) plus the on-device ordered sum.
//
// Faults (README "Faults"): every backend marks its waits on watch(), so a watchdog thread can
// see a stalled collective, ask peer_faults() which peers are dead, stopped or behind, and
// abort() the wait; after an abort every call on the communicator throws keel::Error.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "comm/collective_watch.h"

namespace keel::comm {

// What a watchdog found wrong with one peer rank.
struct PeerFault {
  enum class Kind : uint8_t {
    kDead,     // its process is gone (killed, crashed, exited): nothing can recover the group
    kStopped,  // its process is stopped (SIGSTOP, a debugger); it may resume
    kBehind,   // alive, but it has not reached the collective the others wait in
  };
  int rank = -1;
  Kind kind = Kind::kBehind;
  std::string detail;  // "pid 4242 on node gpu1 exited", "has not entered all_reduce #812"
};

// "rank 2 died (pid 4242 on node gpu1 exited)", "rank 1 is stopped (...)", "rank 3 is behind
// (...)": the sentence clients and logs see.
std::string describe_peer_fault(const PeerFault& fault);
// The faults joined with "; ", or `none_found` when there are none.
std::string describe_peer_faults(const std::vector<PeerFault>& faults, std::string_view none_found);

enum class ReduceAlgo : uint8_t { kNative, kFixedOrder };

std::string_view reduce_algo_name(ReduceAlgo algo);
// Parses "native" / "fixed_order"; throws keel::Error naming the bad value otherwise.
ReduceAlgo parse_reduce_algo(std::string_view name);

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In-place sum of `count` fp32 elements across ranks; every rank ends with identical bits.
  virtual void all_reduce(float* data, size_t count, ReduceAlgo algo) = 0;
  // recv[r * count + i] = send_of_rank_r[i]; recv holds size() * count elements.
  virtual void all_gather(const float* send, size_t count, float* recv) = 0;
  // Copies `bytes` from root's `data` into every other rank's `data`.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;

  // Fault handling (see the top of this file). watch(): this rank's waits, for a watchdog
  // thread. peer_faults(): what this rank can tell about its peers right now (any thread;
  // empty when all look fine or the backend cannot tell). abort(): from any thread, makes the
  // collective in progress (and every later call) throw keel::Error carrying `reason`.
  CollectiveWatch& watch() { return watch_; }
  const CollectiveWatch& watch() const { return watch_; }
  virtual std::vector<PeerFault> peer_faults() const { return {}; }
  virtual void abort(const std::string& reason) { watch_.request_abort(reason); }
  // Changes the timeout of later collectives (backends with one; 0 = forever). Serving waits
  // for slow starters under a long start-up timeout, then runs its steps under a short one.
  virtual void set_timeout(std::chrono::milliseconds timeout) { (void)timeout; }

 private:
  CollectiveWatch watch_;
};

}  // namespace keel::comm
