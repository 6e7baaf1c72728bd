// Shared by the all-reduce tests of every backend (thread, MPI, NCCL, ordered-sum twin): the
// message sizes that straddle every chunking decision, and the thread backend's fixed_order
// result as the reference the other backends must equal bit for bit.
#pragma once

#include <cstddef>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "comm/thread_comm.h"

namespace keel::comm::test_util {

// Fewer elements than ranks, 64-byte chunk alignment (16 floats), the native single-chunk
// threshold (64 KiB = 16384 floats), Open MPI's small/large message switches, the native
// 2N-chunk threshold (4 MiB = 1 Mi floats) and ragged tails.
inline const std::vector<size_t> kOrderSizes = {1,
                                                2,
                                                3,
                                                5,
                                                15,
                                                16,
                                                17,
                                                63,
                                                64,
                                                65,
                                                1000,
                                                4097,
                                                16383,
                                                16384,
                                                16385,
                                                65536,
                                                65549,
                                                262143,
                                                (size_t{1} << 20) - 1,
                                                size_t{1} << 20,
                                                (size_t{1} << 20) + 5};

// ThreadGroup's kFixedOrder all-reduce over `partials` (one vector per rank, all the same
// length) on partials.size() threads; returns every rank's result. Errors propagate.
inline std::vector<std::vector<float>> thread_fixed_order(
    std::vector<std::vector<float>> partials) {
  const int num_ranks = static_cast<int>(partials.size());
  ThreadGroup group(num_ranks);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int rank = 0; rank < num_ranks; ++rank) comms.push_back(group.communicator(rank));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(num_ranks));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < num_ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        comms[rank]->all_reduce(partials[rank].data(), partials[rank].size(),
                                ReduceAlgo::kFixedOrder);
      } catch (...) {
        errors[rank] = std::current_exception();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
  return partials;
}

}  // namespace keel::comm::test_util
