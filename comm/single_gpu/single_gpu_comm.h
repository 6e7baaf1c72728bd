// One rank on one GPU, without NCCL or MPI: with a single rank every collective is the identity
// (a fixed_order sum over one rank is that rank's partial, bit for bit), so all_reduce and
// broadcast only wait for the device and all_gather copies send to recv. Host-synchronous like
// NcclCommunicator: results are in place, and device errors surface, when a call returns.
// Used where TP=1 runs on a GPU machine that may lack NCCL (bench/decode --backend cuda,
// tests/test_gpu_forward.cpp). Pointers are device memory.
#pragma once

#include "comm/communicator.h"

namespace keel::comm {

class SingleGpuCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce(float* data, size_t count, ReduceAlgo algo) override;
  void all_gather(const float* send, size_t count, float* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;
};

}  // namespace keel::comm
