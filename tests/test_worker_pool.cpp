// Tests of the rank's fork-join pool (kernels/cpu/worker_pool.h): the fixed row partition covers
// every row once in aligned chunks; run() calls every part exactly once per call, back to back
// (the spinning path) and after the workers fell asleep (the futex path); a part's exception
// reaches the caller and the pool keeps working.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cpu/worker_pool.h"

namespace keel::cpu {
namespace {

TEST(PartitionRows, CoversEveryRowOnceInAlignedChunks) {
  for (int64_t num_rows : {0, 1, 15, 16, 17, 100, 203, 4096, 151936}) {
    for (int parts : {1, 2, 3, 4, 7}) {
      for (int64_t align : {1, 16}) {
        int64_t next = 0;
        for (int part = 0; part < parts; ++part) {
          const RowRange range = partition_rows(num_rows, parts, part, align);
          ASSERT_EQ(range.first, next) << num_rows << " rows, part " << part << " of " << parts;
          ASSERT_GE(range.count(), 0);
          if (range.end < num_rows) {
            EXPECT_EQ(range.count() % align, 0);
          }
          next = range.end;
        }
        EXPECT_EQ(next, num_rows) << num_rows << " rows over " << parts;
      }
    }
  }
  // Balanced to within one chunk: 4096 rows over 2 parts are 2048 each.
  EXPECT_EQ(partition_rows(4096, 2, 1, 16).count(), 2048);
}

TEST(WorkerPool, EveryPartRunsOncePerCall) {
  for (int threads : {1, 2, 4}) {
    WorkerPool pool(threads);
    std::vector<std::atomic<int>> calls(static_cast<size_t>(threads));
    for (int round = 0; round < 2000; ++round) {
      pool.run([&](int part) { calls[static_cast<size_t>(part)].fetch_add(1); });
      // Every 500 rounds let the workers fall asleep, so the wake-up path runs too.
      if (round % 500 == 499) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (int part = 0; part < threads; ++part)
      EXPECT_EQ(calls[static_cast<size_t>(part)].load(), 2000) << "part " << part;
  }
}

TEST(WorkerPool, PartsSeeTheCallersWritesAndTheCallerSeesTheirs) {
  WorkerPool pool(3);
  std::vector<int64_t> data(3000);
  for (int round = 1; round <= 200; ++round) {
    for (auto& value : data) value = round;  // written by the caller before run()
    pool.run([&](int part) {
      const RowRange range = partition_rows(static_cast<int64_t>(data.size()), 3, part, 1);
      for (int64_t i = range.first; i < range.end; ++i) data[static_cast<size_t>(i)] *= 2;
    });
    for (int64_t value : data) ASSERT_EQ(value, 2 * round);
  }
}

TEST(WorkerPool, AnExceptionInAPartReachesTheCaller) {
  WorkerPool pool(2);
  EXPECT_THROW(pool.run([](int part) {
    if (part == 1) throw std::runtime_error("worker failed");
  }),
               std::runtime_error);
  EXPECT_THROW(pool.run([](int part) {
    if (part == 0) throw std::runtime_error("caller failed");
  }),
               std::runtime_error);
  std::atomic<int> calls{0};
  pool.run([&](int) { calls.fetch_add(1); });
  EXPECT_EQ(calls.load(), 2);
}

}  // namespace
}  // namespace keel::cpu
