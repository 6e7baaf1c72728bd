// Thread-rank communicator: all_reduce (both algorithms), all_gather, broadcast, barrier,
// abort and timeout. Every test checks every element on every rank against a value computed
// independently in the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/communicator.h"
#include "comm/thread_comm.h"
#include "kernels/base/check.h"
#include "tests/comm_test_util.h"

namespace keel::comm {
namespace {

using namespace std::chrono_literals;

constexpr ReduceAlgo kAllAlgos[] = {ReduceAlgo::kNative, ReduceAlgo::kFixedOrder};
// Message sizes (elements) from the issue: empty, fewer elements than ranks, odd sizes, a
// page-ish size, the 64 KiB native threshold (16384 floats) region, several MB.
const std::vector<size_t> kSizes = {0, 1, 2, 3, 7, 64, 1000, 4097, 65536, size_t{1} << 20};
// Written past the end of every buffer; a collective must never touch it.
constexpr float kGuardValue = -12345.5f;
constexpr size_t kGuardElems = 17;

// A group and one communicator per rank, plus a runner that executes one body per rank on
// its own thread. A hang is a test failure, not a stuck CI job: past the deadline the process
// reports and aborts.
class Ranks {
 public:
  explicit Ranks(int num_ranks, ThreadCommOptions options = {}) : group_(num_ranks, options) {
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
      comms_.push_back(group_.communicator(tp_rank));
    }
  }

  ThreadGroup& group() { return group_; }
  int size() const { return group_.size(); }

  // Returns each rank's exception (null when it returned normally). With abort_on_error, a
  // rank that throws aborts the group, as the engine does, so that its peers do not wait.
  std::vector<std::exception_ptr> run(const std::function<void(Communicator&)>& body,
                                      bool abort_on_error = false,
                                      std::chrono::seconds deadline = 120s) {
    const int num_ranks = size();
    std::vector<std::exception_ptr> errors(num_ranks);
    std::mutex done_mutex;
    std::condition_variable done_cv;
    int num_done = 0;
    std::vector<std::thread> threads;
    threads.reserve(num_ranks);
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
      threads.emplace_back([&, tp_rank] {
        set_current_rank(tp_rank);
        try {
          body(*comms_[tp_rank]);
        } catch (...) {
          errors[tp_rank] = std::current_exception();
          if (abort_on_error) {
            group_.abort("rank " + std::to_string(tp_rank) + ": " + message_of(errors[tp_rank]));
          }
        }
        std::lock_guard<std::mutex> lock(done_mutex);
        ++num_done;
        done_cv.notify_all();
      });
    }
    {
      std::unique_lock<std::mutex> lock(done_mutex);
      if (!done_cv.wait_for(lock, deadline, [&] { return num_done == num_ranks; })) {
        std::fprintf(stderr, "test_allreduce: ranks still running after %lld s (hang)\n",
                     static_cast<long long>(deadline.count()));
        std::abort();
      }
    }
    for (std::thread& thread : threads) thread.join();
    return errors;
  }

  // run() that fails the test on any rank's exception.
  void run_ok(const std::function<void(Communicator&)>& body) {
    const std::vector<std::exception_ptr> errors = run(body);
    for (size_t tp_rank = 0; tp_rank < errors.size(); ++tp_rank) {
      if (errors[tp_rank])
        ADD_FAILURE() << "rank " << tp_rank << ": " << message_of(errors[tp_rank]);
    }
  }

  static std::string message_of(const std::exception_ptr& error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& caught) {
      return caught.what();
    } catch (...) {
      return "non-standard exception";
    }
  }

  static bool is_keel_error(const std::exception_ptr& error) {
    try {
      std::rethrow_exception(error);
    } catch (const keel::Error&) {
      return true;
    } catch (...) {
      return false;
    }
  }

 private:
  ThreadGroup group_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

uint32_t bits_of(float value) {
  return std::bit_cast<uint32_t>(value);
}

// Rank r's element i: small integers, so every summation order gives the exact sum.
float integer_input(int tp_rank, size_t index) {
  return static_cast<float>((tp_rank + 1) * 1000 + static_cast<int>(index % 997));
}
float integer_sum(int num_ranks, size_t index) {
  const int rank_terms = 1000 * (num_ranks * (num_ranks + 1) / 2);  // 1000 * (1 + ... + N)
  return static_cast<float>(rank_terms + num_ranks * static_cast<int>(index % 997));
}

// Non-integer floats over a few binades: the rounding of a sum depends on its order.
std::vector<std::vector<float>> random_inputs(int num_ranks, size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-6, 6);
  std::vector<std::vector<float>> inputs(num_ranks, std::vector<float>(count));
  for (auto& rank_input : inputs) {
    for (float& value : rank_input) value = std::ldexp(mantissa(rng), exponent(rng));
  }
  return inputs;
}

// The documented kFixedOrder result: ((p0 + p1) + p2) + ... in rank order, in fp32.
float serial_sum(const std::vector<std::vector<float>>& inputs, size_t index, int first_rank = 0) {
  const int num_ranks = static_cast<int>(inputs.size());
  float sum = inputs[first_rank][index];
  for (int k = 1; k < num_ranks; ++k) sum += inputs[(first_rank + k) % num_ranks][index];
  return sum;
}

// Copies the rank's input into a guarded buffer, all-reduces it, checks the guard and returns
// the result (without the guard).
std::vector<float> all_reduce_copy(Communicator& comm, const std::vector<float>& input,
                                   size_t count, ReduceAlgo algo) {
  std::vector<float> buffer(count + kGuardElems, kGuardValue);
  std::copy(input.begin(), input.begin() + static_cast<std::ptrdiff_t>(count), buffer.begin());
  comm.all_reduce(buffer.data(), count, algo);
  for (size_t i = count; i < buffer.size(); ++i) {
    if (buffer[i] != kGuardValue)
      throw_error("rank ", comm.rank(), ": guard element ", i, " overwritten");
  }
  buffer.resize(count);
  return buffer;
}

TEST(ReduceAlgo, NamesRoundTrip) {
  for (ReduceAlgo algo : kAllAlgos) EXPECT_EQ(parse_reduce_algo(reduce_algo_name(algo)), algo);
  EXPECT_EQ(reduce_algo_name(ReduceAlgo::kNative), "native");
  EXPECT_EQ(reduce_algo_name(ReduceAlgo::kFixedOrder), "fixed_order");
  try {
    parse_reduce_algo("ring");
    FAIL() << "expected keel::Error";
  } catch (const keel::Error& error) {
    EXPECT_NE(std::string(error.what()).find("'ring'"), std::string::npos) << error.what();
  }
}

TEST(ThreadGroup, RejectsBadSizesAndRanks) {
  EXPECT_THROW(ThreadGroup(0), keel::Error);
  EXPECT_THROW(ThreadGroup(9), keel::Error);
  ThreadGroup group(2);
  EXPECT_THROW(group.communicator(-1), keel::Error);
  EXPECT_THROW(group.communicator(2), keel::Error);
  auto comm = group.communicator(1);
  EXPECT_EQ(comm->rank(), 1);
  EXPECT_EQ(comm->size(), 2);
  EXPECT_THROW(group.communicator(1), keel::Error);  // rank 1 already claimed
}

class AllReduceExact : public ::testing::TestWithParam<std::tuple<int, ReduceAlgo>> {};

// Every size, every rank, every element: exact integer sums, guard untouched.
TEST_P(AllReduceExact, IntegerSumsEveryElementEveryRank) {
  // Plain variables, not a structured binding: clang 14 cannot capture those in lambdas.
  const int num_ranks = std::get<0>(GetParam());
  const ReduceAlgo algo = std::get<1>(GetParam());
  Ranks ranks(num_ranks);
  std::vector<size_t> bad_elements(num_ranks, 0);
  ranks.run_ok([&](Communicator& comm) {
    const int tp_rank = comm.rank();
    for (size_t count : kSizes) {
      std::vector<float> input(count);
      for (size_t i = 0; i < count; ++i) input[i] = integer_input(tp_rank, i);
      const std::vector<float> result = all_reduce_copy(comm, input, count, algo);
      for (size_t i = 0; i < count; ++i) {
        if (result[i] != integer_sum(num_ranks, i)) {
          if (bad_elements[tp_rank]++ == 0) {
            ADD_FAILURE() << "rank " << tp_rank << " count " << count << " element " << i
                          << ": got " << result[i] << ", want " << integer_sum(num_ranks, i);
          }
        }
      }
    }
  });
  for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) EXPECT_EQ(bad_elements[tp_rank], 0u);
}

INSTANTIATE_TEST_SUITE_P(RanksAndAlgos, AllReduceExact,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::ValuesIn(kAllAlgos)),
                         [](const auto& info) {
                           return std::to_string(std::get<0>(info.param)) + "ranks_" +
                                  std::string(reduce_algo_name(std::get<1>(info.param)));
                         });

using keel::comm::test_util::kOrderSizes;

// Runs fixed_order and native on random data for every size in `sizes` and checks:
// fixed_order is bit-identical to the serial rank-order sum on every rank; native is
// bit-identical across ranks and each element is the sum in some cyclic rank order.
void check_order_properties(int num_ranks, const std::vector<size_t>& sizes,
                            ThreadCommOptions options, uint64_t data_seed) {
  size_t max_count = 0;
  for (size_t count : sizes) max_count = std::max(max_count, count);
  const auto inputs = random_inputs(num_ranks, max_count, data_seed);
  std::vector<float> expected(max_count);
  for (size_t i = 0; i < max_count; ++i) expected[i] = serial_sum(inputs, i);

  Ranks ranks(num_ranks, options);
  for (size_t count : sizes) {
    SCOPED_TRACE("count " + std::to_string(count));
    std::vector<std::vector<float>> fixed(num_ranks), native(num_ranks);
    ranks.run_ok([&](Communicator& comm) {
      const int tp_rank = comm.rank();
      fixed[tp_rank] = all_reduce_copy(comm, inputs[tp_rank], count, ReduceAlgo::kFixedOrder);
      native[tp_rank] = all_reduce_copy(comm, inputs[tp_rank], count, ReduceAlgo::kNative);
    });
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
      ASSERT_EQ(fixed[tp_rank].size(), count);
      ASSERT_EQ(native[tp_rank].size(), count);
      size_t fixed_mismatches = 0, native_cross_rank_mismatches = 0, native_not_a_rotation = 0;
      for (size_t i = 0; i < count; ++i) {
        fixed_mismatches += bits_of(fixed[tp_rank][i]) != bits_of(expected[i]);
        native_cross_rank_mismatches += bits_of(native[tp_rank][i]) != bits_of(native[0][i]);
        bool is_rotation = false;
        for (int first_rank = 0; first_rank < num_ranks && !is_rotation; ++first_rank) {
          is_rotation = bits_of(native[tp_rank][i]) == bits_of(serial_sum(inputs, i, first_rank));
        }
        native_not_a_rotation += !is_rotation;
      }
      EXPECT_EQ(fixed_mismatches, 0u) << "rank " << tp_rank;
      EXPECT_EQ(native_cross_rank_mismatches, 0u) << "rank " << tp_rank;
      EXPECT_EQ(native_not_a_rotation, 0u) << "rank " << tp_rank;
    }
  }
}

TEST(AllReduceOrder, FixedOrderBitIdenticalToSerialAtEverySize) {
  for (int num_ranks = 2; num_ranks <= 4; ++num_ranks) {
    SCOPED_TRACE(std::to_string(num_ranks) + " ranks");
    check_order_properties(num_ranks, kOrderSizes, {}, 1234 + num_ranks);
  }
}

TEST(AllReduceOrder, FixedOrderBitIdenticalUnderInjectedDelays) {
  const std::vector<size_t> sizes = {1, 3, 17, 1000, 16383, 16385, 65536 + 13, 300000};
  for (uint64_t delay_seed : {1u, 2u, 3u, 4u, 5u}) {
    SCOPED_TRACE("delay seed " + std::to_string(delay_seed));
    ThreadCommOptions options;
    options.max_injected_delay = 500us;
    options.delay_seed = delay_seed;
    check_order_properties(4, sizes, options, 99 + delay_seed);
  }
}

// The two algorithms really are different, as documented: with partials whose sum depends on
// the order, native gives other bits than fixed_order for some message size, and native's
// result for the same element depends on the message size. fixed_order never changes.
TEST(AllReduceOrder, NativeOrderDiffersFromFixedOrder) {
  constexpr int kNumRanks = 4;
  // Rank order: ((2^24 + 1) + 1) - 2^24 = 0, because 2^24 + 1 rounds back to 2^24 twice.
  // Any rotation starting at rank 1, 2 or 3 adds the two 1s before they can be absorbed: 2.
  const float partials[kNumRanks] = {16777216.0f, 1.0f, 1.0f, -16777216.0f};
  const std::vector<size_t> sizes = {1000, 16000, 32768, 65536, size_t{1} << 20};
  std::vector<std::vector<float>> native_by_size;
  bool native_differs_somewhere = false;
  Ranks ranks(kNumRanks);
  for (size_t count : sizes) {
    std::vector<std::vector<float>> fixed(kNumRanks), native(kNumRanks);
    ranks.run_ok([&](Communicator& comm) {
      const int tp_rank = comm.rank();
      const std::vector<float> input(count, partials[tp_rank]);
      fixed[tp_rank] = all_reduce_copy(comm, input, count, ReduceAlgo::kFixedOrder);
      native[tp_rank] = all_reduce_copy(comm, input, count, ReduceAlgo::kNative);
    });
    for (int tp_rank = 0; tp_rank < kNumRanks; ++tp_rank) {
      for (size_t i = 0; i < count; ++i) {
        ASSERT_EQ(bits_of(fixed[tp_rank][i]), bits_of(0.0f)) << "count " << count << " i " << i;
        ASSERT_EQ(bits_of(native[tp_rank][i]), bits_of(native[0][i]));
        ASSERT_TRUE(native[tp_rank][i] == 0.0f || native[tp_rank][i] == 2.0f);
        native_differs_somewhere |= native[tp_rank][i] != fixed[tp_rank][i];
      }
    }
    native_by_size.push_back(native[0]);
  }
  EXPECT_TRUE(native_differs_somewhere) << "native summed in rank order at every size";

  bool depends_on_size = false;
  for (size_t a = 0; a < sizes.size(); ++a) {
    for (size_t b = a + 1; b < sizes.size(); ++b) {
      for (size_t i = 0; i < sizes[a]; ++i)
        depends_on_size |= native_by_size[a][i] != native_by_size[b][i];
    }
  }
  EXPECT_TRUE(depends_on_size) << "native's order of an element never depended on message size";
}

// Back-to-back collectives of changing sizes and algorithms, each rank rewriting its buffer
// the moment a collective returns: a rank leaving before its peers finished reading its buffer
// would corrupt their sums. Injected delays vary who is early and who is late.
TEST(AllReduce, BackToBackReuseUnderDelays) {
  constexpr int kNumRanks = 4;
  constexpr int kIterations = 150;
  const std::vector<size_t> sizes = {1, 5, 100, 4097, 20000, 65536, 200000};
  for (uint64_t delay_seed : {0u, 7u, 8u}) {
    ThreadCommOptions options;
    options.max_injected_delay = delay_seed == 0 ? 0us : 300us;
    options.delay_seed = delay_seed;
    Ranks ranks(kNumRanks, options);
    std::atomic<size_t> bad_elements{0};
    ranks.run_ok([&](Communicator& comm) {
      const int tp_rank = comm.rank();
      std::vector<float> buffer(sizes.back());
      for (int iteration = 0; iteration < kIterations; ++iteration) {
        const size_t count = sizes[(iteration * 5 + 3) % sizes.size()];
        const ReduceAlgo algo = kAllAlgos[iteration % 2];
        // Values also encode the iteration so stale data from a previous round is caught.
        for (size_t i = 0; i < count; ++i)
          buffer[i] = integer_input(tp_rank, i) + static_cast<float>(iteration);
        comm.all_reduce(buffer.data(), count, algo);
        for (size_t i = 0; i < count; ++i) {
          const float expected =
              integer_sum(kNumRanks, i) + static_cast<float>(kNumRanks * iteration);
          if (buffer[i] != expected) ++bad_elements;
        }
      }
    });
    EXPECT_EQ(bad_elements.load(), 0u) << "delay seed " << delay_seed;
  }
}

TEST(AllReduce, RanksDisagreeingOnCountAllThrowAndGroupStaysUsable) {
  Ranks ranks(3);
  const auto errors = ranks.run([&](Communicator& comm) {
    std::vector<float> buffer(100, 1.0f);
    comm.all_reduce(buffer.data(), comm.rank() == 1 ? 99 : 100, ReduceAlgo::kFixedOrder);
  });
  for (const auto& error : errors) {
    ASSERT_TRUE(error);
    EXPECT_TRUE(Ranks::is_keel_error(error));
    EXPECT_NE(Ranks::message_of(error).find("disagree on count"), std::string::npos)
        << Ranks::message_of(error);
  }
  const auto null_errors = ranks.run([&](Communicator& comm) {
    std::vector<float> buffer(100, 1.0f);
    comm.all_reduce(comm.rank() == 2 ? nullptr : buffer.data(), 100, ReduceAlgo::kNative);
  });
  for (const auto& error : null_errors) ASSERT_TRUE(error) << "every rank must throw";
  EXPECT_NE(Ranks::message_of(null_errors[2]).find("null data"), std::string::npos);
  EXPECT_NE(Ranks::message_of(null_errors[0]).find("rank 2 passed invalid"), std::string::npos);
  ranks.run_ok([&](Communicator& comm) {
    std::vector<float> buffer(100, 1.0f);
    comm.all_reduce(buffer.data(), 100, ReduceAlgo::kFixedOrder);
    for (float value : buffer) ASSERT_EQ(value, 3.0f);
  });
}

class AllGather : public ::testing::TestWithParam<int> {};

TEST_P(AllGather, EveryRanksSliceLandsEverywhere) {
  const int num_ranks = GetParam();
  Ranks ranks(num_ranks);
  std::atomic<size_t> bad_elements{0};
  ranks.run_ok([&](Communicator& comm) {
    const int tp_rank = comm.rank();
    for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{65536}}) {
      for (bool in_place : {false, true}) {
        const size_t total = count * num_ranks;
        std::vector<float> recv(total + kGuardElems, kGuardValue);
        std::vector<float> send(count);
        for (size_t i = 0; i < count; ++i) send[i] = integer_input(tp_rank, i) * 100.0f;
        float* send_ptr = send.data();
        if (in_place) {
          send_ptr = recv.data() + tp_rank * count;
          std::copy(send.begin(), send.end(), send_ptr);
        }
        comm.all_gather(send_ptr, count, recv.data());
        for (int source_rank = 0; source_rank < num_ranks; ++source_rank) {
          for (size_t i = 0; i < count; ++i) {
            bad_elements += recv[source_rank * count + i] != integer_input(source_rank, i) * 100.0f;
          }
        }
        for (size_t i = total; i < recv.size(); ++i) bad_elements += recv[i] != kGuardValue;
      }
    }
  });
  EXPECT_EQ(bad_elements.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Ranks, AllGather, ::testing::Values(1, 2, 3, 4));

class Broadcast : public ::testing::TestWithParam<int> {};

TEST_P(Broadcast, EveryRootReachesEveryRank) {
  const int num_ranks = GetParam();
  Ranks ranks(num_ranks);
  std::atomic<size_t> bad_bytes{0};
  auto pattern = [](size_t index, int root) {
    return static_cast<uint8_t>(index * 7 + static_cast<size_t>(root) * 31 + 1);
  };
  ranks.run_ok([&](Communicator& comm) {
    const int tp_rank = comm.rank();
    for (int root = 0; root < num_ranks; ++root) {
      for (size_t bytes : {size_t{0}, size_t{1}, size_t{3}, size_t{1000}, (size_t{1} << 20) + 3}) {
        std::vector<uint8_t> buffer(bytes + 1, 0xEE);
        if (tp_rank == root) {
          for (size_t i = 0; i < bytes; ++i) buffer[i] = pattern(i, root);
        }
        comm.broadcast(buffer.data(), bytes, root);
        for (size_t i = 0; i < bytes; ++i) bad_bytes += buffer[i] != pattern(i, root);
        bad_bytes += buffer[bytes] != 0xEE;
      }
    }
  });
  EXPECT_EQ(bad_bytes.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Ranks, Broadcast, ::testing::Values(1, 2, 3, 4));

TEST(Broadcast, BadRootThrowsOnEveryRank) {
  Ranks ranks(2);
  const auto errors = ranks.run([&](Communicator& comm) {
    char byte = 0;
    comm.broadcast(&byte, 1, 5);
  });
  for (const auto& error : errors) {
    ASSERT_TRUE(error);
    EXPECT_TRUE(Ranks::is_keel_error(error));
  }
  EXPECT_NE(Ranks::message_of(errors[0]).find("root 5 out of range"), std::string::npos)
      << Ranks::message_of(errors[0]);
}

TEST(Barrier, NobodyLeavesBeforeEverybodyArrived) {
  for (int num_ranks = 1; num_ranks <= 4; ++num_ranks) {
    constexpr int kRounds = 300;
    Ranks ranks(num_ranks);
    std::atomic<int> arrivals{0};
    std::atomic<int> early_leaves{0};
    ranks.run_ok([&](Communicator& comm) {
      for (int round = 0; round < kRounds; ++round) {
        arrivals.fetch_add(1);
        comm.barrier();
        // Everybody has counted this round's arrival before anybody gets here.
        if (arrivals.load() < (round + 1) * num_ranks) early_leaves.fetch_add(1);
      }
    });
    EXPECT_EQ(early_leaves.load(), 0) << num_ranks << " ranks";
    EXPECT_EQ(arrivals.load(), kRounds * num_ranks);
  }
}

// One rank fails before a collective; the harness aborts the group like the engine does. Its
// peers, whether already waiting (pending) or arriving later (future), throw keel::Error
// instead of hanging, on every kind of collective.
TEST(Abort, PeersOfAFailedRankThrowInsteadOfHanging) {
  constexpr int kNumRanks = 4;
  constexpr int kFailingRank = 2;
  for (auto failing_rank_delay : {0ms, 50ms}) {
    Ranks ranks(kNumRanks);
    std::vector<int> future_collectives_thrown(kNumRanks, 0);
    const auto errors = ranks.run(
        [&](Communicator& comm) {
          const int tp_rank = comm.rank();
          if (tp_rank == kFailingRank) {
            // 50 ms: the peers are surely blocked in the barrier by then (pending case).
            std::this_thread::sleep_for(failing_rank_delay);
            throw std::runtime_error("simulated weight load failure");
          }
          std::vector<float> buffer(1000, 1.0f);
          try {
            comm.all_reduce(buffer.data(), buffer.size(), ReduceAlgo::kFixedOrder);
          } catch (const keel::Error&) {
            // Every later collective throws too.
            int thrown = 0;
            try {
              comm.barrier();
            } catch (const keel::Error&) {
              ++thrown;
            }
            try {
              comm.broadcast(buffer.data(), 4, 0);
            } catch (const keel::Error&) {
              ++thrown;
            }
            try {
              comm.all_gather(buffer.data(), 1, buffer.data());
            } catch (const keel::Error&) {
              ++thrown;
            }
            try {
              comm.all_reduce(buffer.data(), 10, ReduceAlgo::kNative);
            } catch (const keel::Error&) {
              ++thrown;
            }
            future_collectives_thrown[tp_rank] = thrown;
            throw;
          }
        },
        /*abort_on_error=*/true, /*deadline=*/60s);
    EXPECT_TRUE(ranks.group().aborted());
    for (int tp_rank = 0; tp_rank < kNumRanks; ++tp_rank) {
      ASSERT_TRUE(errors[tp_rank]) << "rank " << tp_rank << " returned normally";
      if (tp_rank == kFailingRank) continue;
      ASSERT_TRUE(Ranks::is_keel_error(errors[tp_rank]));
      const std::string message = Ranks::message_of(errors[tp_rank]);
      EXPECT_EQ(message.rfind("collective aborted: rank 2: simulated weight load failure", 0), 0u)
          << message;
      EXPECT_NE(message.find("rank " + std::to_string(tp_rank) + " in all_reduce"),
                std::string::npos)
          << message;
      EXPECT_EQ(future_collectives_thrown[tp_rank], 4) << "rank " << tp_rank;
    }
  }
}

TEST(Abort, FromAnotherThreadWakesBlockedRanks) {
  Ranks ranks(3);
  std::thread aborter([&] {
    std::this_thread::sleep_for(50ms);
    ranks.group().abort("operator pressed stop");
  });
  const auto errors = ranks.run([&](Communicator& comm) {
    if (comm.rank() == 0) return;  // never joins: the others block in the barrier
    comm.barrier();
  });
  aborter.join();
  EXPECT_FALSE(errors[0]);
  for (int tp_rank = 1; tp_rank < 3; ++tp_rank) {
    ASSERT_TRUE(errors[tp_rank]);
    EXPECT_NE(Ranks::message_of(errors[tp_rank]).find("collective aborted: operator pressed stop"),
              std::string::npos);
  }
}

// An abort that lands while ranks are inside a large all-reduce must not let any rank leave
// while a peer still writes into its buffer: right after its collective throws, a rank takes a
// snapshot of its buffer and checks, a while later, that nobody changed it since. Several abort
// times, so that some land in the work phase (which takes milliseconds at 16 MB).
TEST(Abort, MidCollectiveNoRankLeavesWhilePeersStillWriteItsBuffer) {
  constexpr int kNumRanks = 4;
  constexpr size_t kCount = size_t{4} << 20;
  for (auto abort_after : {15ms, 25ms, 35ms, 45ms, 55ms, 65ms, 75ms, 85ms}) {
    Ranks ranks(kNumRanks);
    std::vector<size_t> changed_after_leaving(kNumRanks, 0);
    std::thread aborter([&] {
      std::this_thread::sleep_for(abort_after);
      ranks.group().abort("stop mid-collective");
    });
    const auto errors = ranks.run([&](Communicator& comm) {
      const int tp_rank = comm.rank();
      std::vector<float> buffer(kCount, 1.0f);
      try {
        for (int iteration = 0; iteration < 100000; ++iteration) {
          comm.all_reduce(buffer.data(), kCount, kAllAlgos[iteration % 2]);
        }
      } catch (const keel::Error&) {
        const std::vector<float> snapshot = buffer;
        std::this_thread::sleep_for(30ms);
        for (size_t i = 0; i < kCount; ++i) {
          changed_after_leaving[tp_rank] += bits_of(buffer[i]) != bits_of(snapshot[i]);
        }
        throw;
      }
    });
    aborter.join();
    for (int tp_rank = 0; tp_rank < kNumRanks; ++tp_rank) {
      ASSERT_TRUE(errors[tp_rank]) << "rank " << tp_rank;
      EXPECT_NE(Ranks::message_of(errors[tp_rank]).find("collective aborted: stop mid-collective"),
                std::string::npos);
      EXPECT_EQ(changed_after_leaving[tp_rank], 0u)
          << "rank " << tp_rank << ", abort after " << abort_after.count() << " ms";
    }
  }
}

TEST(Timeout, RankThatNeverArrivesMakesPeersThrowWithinTheTimeout) {
  constexpr int kNumRanks = 4;
  constexpr int kMissingRank = 3;
  ThreadCommOptions options;
  options.timeout = 200ms;
  Ranks ranks(kNumRanks, options);
  std::vector<std::chrono::milliseconds> waited(kNumRanks, 0ms);
  const auto errors = ranks.run(
      [&](Communicator& comm) {
        const int tp_rank = comm.rank();
        if (tp_rank == kMissingRank) return;
        std::vector<float> buffer(5000, 1.0f);
        const auto start = std::chrono::steady_clock::now();
        try {
          comm.all_reduce(buffer.data(), buffer.size(), ReduceAlgo::kNative);
        } catch (...) {
          waited[tp_rank] = std::chrono::duration_cast<std::chrono::milliseconds>(
              std::chrono::steady_clock::now() - start);
          throw;
        }
      },
      /*abort_on_error=*/false, /*deadline=*/60s);
  EXPECT_FALSE(errors[kMissingRank]);
  int timed_out_ranks = 0;
  for (int tp_rank = 0; tp_rank < kNumRanks; ++tp_rank) {
    if (tp_rank == kMissingRank) continue;
    ASSERT_TRUE(errors[tp_rank]) << "rank " << tp_rank;
    ASSERT_TRUE(Ranks::is_keel_error(errors[tp_rank]));
    const std::string message = Ranks::message_of(errors[tp_rank]);
    // Either this rank's own wait timed out, or a peer's did first and aborted the group.
    EXPECT_NE(message.find("all_reduce"), std::string::npos) << message;
    EXPECT_NE(message.find("timed out after 200 ms"), std::string::npos) << message;
    if (message.rfind("rank " + std::to_string(tp_rank) + ": all_reduce timed out", 0) == 0) {
      // Its own timeout: it really waited that long. (A rank woken by a peer's timeout may
      // have arrived later and waited less.)
      ++timed_out_ranks;
      EXPECT_GE(waited[tp_rank], 200ms) << message;
    }
    // Generous upper bound: sanitizer builds on a loaded 2-core machine.
    EXPECT_LT(waited[tp_rank], 5000ms) << message;
  }
  EXPECT_GE(timed_out_ranks, 1);
  EXPECT_TRUE(ranks.group().aborted());
}

}  // namespace
}  // namespace keel::comm
