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
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace keel::comm {

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
};

}  // namespace keel::comm
