// MPI communicator, run as N Open MPI processes (ctest: mpirun -np 4). Every rank runs every
// test; every rank checks every element of its own results against values it computes
// independently: each rank can regenerate every rank's input from a seed, so expected sums
// (and the thread backend's results for the same inputs) are known locally.
//
// Reporting: rank 0 prints gtest's usual output; other ranks print only their failures,
// prefixed with their rank. A failure on any rank makes every rank exit non-zero (the failure
// flags are reduced over MPI_COMM_WORLD before MPI_Finalize).
//
// Hangs: the communicator shared by the tests has a 30 s watchdog, so a rank that leaves a
// collective sequence early (a failed ASSERT) turns into an MPI_Abort with a FATAL line naming
// the collective, not a stuck job. Tests prefer EXPECT and counting over ASSERT so that every
// rank makes the same collective calls.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_comm.h"
#include "comm/thread_comm.h"
#include "kernels/base/check.h"
#include "tests/comm_test_util.h"

namespace keel::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr ReduceAlgo kAllAlgos[] = {ReduceAlgo::kNative, ReduceAlgo::kFixedOrder};
// Message sizes (elements) from the issue: empty, fewer elements than ranks, odd sizes, a
// page-ish size, 64 K, several MB.
const std::vector<size_t> kSizes = {0, 1, 3, 7, 1000, 4097, 65536, size_t{1} << 20};
using keel::comm::test_util::kOrderSizes;
// Written past the end of every buffer; a collective must never touch it.
constexpr float kGuardValue = -12345.5f;
constexpr size_t kGuardElems = 17;

// The communicator most tests share (set up in main, after MPI_Init).
MpiCommunicator* g_comm = nullptr;

MpiCommunicator& world() {
  return *g_comm;
}

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

// Non-integer floats over a few binades, so the rounding of a sum depends on its order. Rank
// r's input comes from its own seeded stream: any rank can regenerate any rank's input.
std::vector<float> random_input(int tp_rank, size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed * 1000003u + static_cast<uint64_t>(tp_rank));
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-6, 6);
  std::vector<float> input(count);
  for (float& value : input) value = std::ldexp(mantissa(rng), exponent(rng));
  return input;
}

std::vector<std::vector<float>> all_random_inputs(int num_ranks, size_t count, uint64_t seed) {
  std::vector<std::vector<float>> inputs;
  for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank)
    inputs.push_back(random_input(tp_rank, count, seed));
  return inputs;
}

// The documented kFixedOrder result: ((p0 + p1) + p2) + ... in rank order, in fp32.
float serial_sum(const std::vector<std::vector<float>>& inputs, size_t index) {
  float sum = inputs[0][index];
  for (size_t k = 1; k < inputs.size(); ++k) sum += inputs[k][index];
  return sum;
}

// Copies the input into a guarded buffer, all-reduces it, checks the guard and returns the
// result (without the guard).
std::vector<float> all_reduce_copy(Communicator& comm, const std::vector<float>& input,
                                   size_t count, ReduceAlgo algo) {
  std::vector<float> buffer(count + kGuardElems, kGuardValue);
  std::copy(input.begin(), input.begin() + static_cast<std::ptrdiff_t>(count), buffer.begin());
  comm.all_reduce(buffer.data(), count, algo);
  for (size_t i = count; i < buffer.size(); ++i) {
    EXPECT_EQ(buffer[i], kGuardValue) << "rank " << comm.rank() << ": guard element " << i;
  }
  buffer.resize(count);
  return buffer;
}

uint64_t hash_bits(const std::vector<float>& values) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the bit patterns
  for (float value : values) {
    hash ^= bits_of(value);
    hash *= 1099511628211ull;
  }
  return hash;
}

// Every rank's `value`, through the communicator under test (one broadcast per root), so the
// watchdog also covers these helper collectives.
std::vector<uint64_t> gather_u64(Communicator& comm, uint64_t value) {
  std::vector<uint64_t> values(comm.size());
  for (int root = 0; root < comm.size(); ++root) {
    uint64_t slot = comm.rank() == root ? value : 0;
    comm.broadcast(&slot, sizeof(slot), root);
    values[root] = slot;
  }
  return values;
}

std::vector<int64_t> gather_times_ns(Communicator& comm, Clock::time_point when) {
  const auto values = gather_u64(
      comm,
      static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(when.time_since_epoch()).count()));
  return {values.begin(), values.end()};
}

TEST(MpiEnvironment, LaunchedPrivateDuplicateOfWorld) {
  EXPECT_TRUE(mpi_launched()) << "run under mpirun";
  int world_rank = -1, world_size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT_EQ(world().rank(), world_rank);
  EXPECT_EQ(world().size(), world_size);
  int comparison = MPI_UNEQUAL;
  MPI_Comm_compare(world().mpi_comm(), MPI_COMM_WORLD, &comparison);
  EXPECT_EQ(comparison, MPI_CONGRUENT) << "the communicator must be a duplicate, not WORLD";
  // A second session in the same process leaves MPI to the first one.
  MpiSession nested;
  EXPECT_FALSE(nested.owns_mpi());
  EXPECT_GE(nested.thread_level(), MPI_THREAD_FUNNELED);
}

class AllReduceExact : public ::testing::TestWithParam<ReduceAlgo> {};

// Every size, every element, every rank: exact integer sums, guard untouched.
TEST_P(AllReduceExact, IntegerSumsEveryElement) {
  const ReduceAlgo algo = GetParam();
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  for (size_t count : kSizes) {
    std::vector<float> input(count);
    for (size_t i = 0; i < count; ++i) input[i] = integer_input(tp_rank, i);
    const std::vector<float> result = all_reduce_copy(comm, input, count, algo);
    size_t bad_elements = 0;
    for (size_t i = 0; i < count; ++i) {
      if (result[i] != integer_sum(comm.size(), i) && bad_elements++ == 0) {
        ADD_FAILURE() << "rank " << tp_rank << " count " << count << " element " << i << ": got "
                      << result[i] << ", want " << integer_sum(comm.size(), i);
      }
    }
    EXPECT_EQ(bad_elements, 0u) << "rank " << tp_rank << " count " << count;
  }
}

INSTANTIATE_TEST_SUITE_P(Algos, AllReduceExact, ::testing::ValuesIn(kAllAlgos),
                         [](const auto& info) {
                           return std::string(reduce_algo_name(info.param));
                         });

// fixed_order on random non-integer floats: bit-identical to the serial rank-order sum on every
// rank at every size, through both of the MPI implementation's paths (two-phase alltoallv +
// allgatherv, and one-round allgather of whole partials; the default communicator switches at
// 2 KiB), and bit-identical to the thread backend run in this process on the same
// (regenerated) inputs. The thread-backend runs are spread over the ranks (size k on rank
// k mod N) to keep the 2-core machine's run time down; together they cover every size.
TEST(AllReduceOrder, FixedOrderBitIdenticalToSerialAndToThreadBackend) {
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  const int num_ranks = comm.size();
  const size_t max_count = *std::max_element(kOrderSizes.begin(), kOrderSizes.end());
  const auto inputs = all_random_inputs(num_ranks, max_count, /*seed=*/1234);
  std::vector<float> expected(max_count);
  for (size_t i = 0; i < max_count; ++i) expected[i] = serial_sum(inputs, i);

  MpiCommOptions two_phase_options = world().options();
  two_phase_options.fixed_order_allgather_max_bytes = 0;
  MpiCommunicator two_phase(MPI_COMM_WORLD, two_phase_options);
  MpiCommOptions one_round_options = world().options();
  one_round_options.fixed_order_allgather_max_bytes = size_t{1} << 30;
  MpiCommunicator one_round(MPI_COMM_WORLD, one_round_options);
  struct Path {
    const char* name;
    Communicator* comm;
  };
  const Path paths[] = {{"default", &comm}, {"two_phase", &two_phase}, {"one_round", &one_round}};

  for (size_t size_idx = 0; size_idx < kOrderSizes.size(); ++size_idx) {
    const size_t count = kOrderSizes[size_idx];
    std::vector<float> result;
    for (const Path& path : paths) {
      result = all_reduce_copy(*path.comm, inputs[tp_rank], count, ReduceAlgo::kFixedOrder);
      size_t serial_mismatches = 0;
      for (size_t i = 0; i < count; ++i)
        serial_mismatches += bits_of(result[i]) != bits_of(expected[i]);
      EXPECT_EQ(serial_mismatches, 0u)
          << "rank " << tp_rank << " count " << count << " path " << path.name;
    }

    if (static_cast<int>(size_idx % num_ranks) == tp_rank) {
      std::vector<std::vector<float>> truncated(inputs.begin(), inputs.end());
      for (auto& input : truncated) input.resize(count);
      const auto thread_results = keel::comm::test_util::thread_fixed_order(truncated);
      for (int thread_rank = 0; thread_rank < num_ranks; ++thread_rank) {
        size_t thread_mismatches = 0;
        for (size_t i = 0; i < count; ++i)
          thread_mismatches += bits_of(result[i]) != bits_of(thread_results[thread_rank][i]);
        EXPECT_EQ(thread_mismatches, 0u)
            << "rank " << tp_rank << " vs thread rank " << thread_rank << " count " << count;
      }
    }
  }
}

// native: whatever order Open MPI picks, every rank gets the same bits (result hashes
// compared across ranks), and the value is a correctly rounded-ish sum (close to the serial).
TEST(AllReduceOrder, NativeIdenticalOnAllRanks) {
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  const int num_ranks = comm.size();
  const size_t max_count = *std::max_element(kOrderSizes.begin(), kOrderSizes.end());
  const auto inputs = all_random_inputs(num_ranks, max_count, /*seed=*/777);
  for (size_t count : kOrderSizes) {
    const std::vector<float> result =
        all_reduce_copy(comm, inputs[tp_rank], count, ReduceAlgo::kNative);
    size_t far_from_serial = 0;
    for (size_t i = 0; i < count; ++i) {
      double magnitude = 0.0;
      for (const auto& input : inputs) magnitude += std::fabs(input[i]);
      // Any order of N fp32 adds is within (N - 1) ulps-ish of the sum of magnitudes.
      const double tolerance = magnitude * num_ranks * 1.2e-7;
      far_from_serial += std::fabs(result[i] - serial_sum(inputs, i)) > tolerance;
    }
    EXPECT_EQ(far_from_serial, 0u) << "rank " << tp_rank << " count " << count;
    const std::vector<uint64_t> hashes = gather_u64(comm, hash_bits(result));
    for (int peer_rank = 0; peer_rank < num_ranks; ++peer_rank) {
      EXPECT_EQ(hashes[peer_rank], hashes[0])
          << "native result of rank " << peer_rank << " differs from rank 0's, count " << count;
    }
  }
}

// Partials whose sum depends on the order: fixed_order is exactly the rank-order value (0) on
// every rank; native is the same on every rank (its value is Open MPI's business).
TEST(AllReduceOrder, OrderSensitivePartials) {
  Communicator& comm = world();
  if (comm.size() != 4) GTEST_SKIP() << "needs 4 ranks";
  // Rank order: ((2^24 + 1) + 1) - 2^24 = 0, because 2^24 + 1 rounds back to 2^24 twice.
  const float partials[4] = {16777216.0f, 1.0f, 1.0f, -16777216.0f};
  for (size_t count : {size_t{1000}, size_t{65536}, size_t{1} << 20}) {
    const std::vector<float> input(count, partials[comm.rank()]);
    const auto fixed = all_reduce_copy(comm, input, count, ReduceAlgo::kFixedOrder);
    const auto native = all_reduce_copy(comm, input, count, ReduceAlgo::kNative);
    size_t fixed_not_zero = 0;
    for (float value : fixed) fixed_not_zero += bits_of(value) != bits_of(0.0f);
    EXPECT_EQ(fixed_not_zero, 0u) << "count " << count;
    const std::vector<uint64_t> hashes = gather_u64(comm, hash_bits(native));
    for (uint64_t hash : hashes) EXPECT_EQ(hash, hashes[0]) << "count " << count;
    if (comm.rank() == 0) {
      std::printf("  native order-sensitive sum at %zu floats: %g (fixed_order: 0)\n", count,
                  static_cast<double>(native[0]));
    }
  }
}

// Back-to-back collectives of changing sizes and algorithms, each rank rewriting its buffer
// the moment a collective returns, and ranks delayed at random: stale or mixed-up data from a
// previous call would show up as a wrong sum.
TEST(AllReduce, BackToBackReuseUnderDelays) {
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  const std::vector<size_t> sizes = {1, 5, 100, 4097, 20000, 65536, 200000};
  std::mt19937 delay_rng(static_cast<unsigned>(tp_rank) + 17u);
  std::uniform_int_distribution<int> delay_us(0, 300);
  std::vector<float> buffer(sizes.back());
  size_t bad_elements = 0;
  for (int iteration = 0; iteration < 120; ++iteration) {
    const size_t count = sizes[(iteration * 5 + 3) % sizes.size()];
    const ReduceAlgo algo = kAllAlgos[iteration % 2];
    // Values also encode the iteration so that stale data from a previous round is caught.
    for (size_t i = 0; i < count; ++i)
      buffer[i] = integer_input(tp_rank, i) + static_cast<float>(iteration);
    if (iteration % 3 == 0)
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us(delay_rng)));
    comm.all_reduce(buffer.data(), count, algo);
    for (size_t i = 0; i < count; ++i) {
      const float expected =
          integer_sum(comm.size(), i) + static_cast<float>(comm.size() * iteration);
      bad_elements += buffer[i] != expected;
    }
  }
  EXPECT_EQ(bad_elements, 0u) << "rank " << tp_rank;
}

TEST(AllGather, EveryRanksSliceLandsEverywhere) {
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  const int num_ranks = comm.size();
  size_t bad_elements = 0;
  for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{65536}}) {
    for (bool in_place : {false, true}) {
      const size_t total = count * num_ranks;
      std::vector<float> recv(total + kGuardElems, kGuardValue);
      std::vector<float> send(count);
      for (size_t i = 0; i < count; ++i) send[i] = integer_input(tp_rank, i) * 100.0f;
      const float* send_ptr = send.data();
      if (in_place) {
        std::copy(send.begin(), send.end(),
                  recv.begin() + static_cast<std::ptrdiff_t>(tp_rank * count));
        send_ptr = recv.data() + tp_rank * count;
      }
      comm.all_gather(send_ptr, count, recv.data());
      for (int source_rank = 0; source_rank < num_ranks; ++source_rank) {
        for (size_t i = 0; i < count; ++i)
          bad_elements += recv[source_rank * count + i] != integer_input(source_rank, i) * 100.0f;
      }
      for (size_t i = total; i < recv.size(); ++i) bad_elements += recv[i] != kGuardValue;
    }
  }
  EXPECT_EQ(bad_elements, 0u) << "rank " << tp_rank;
}

TEST(Broadcast, EveryRootReachesEveryRank) {
  Communicator& comm = world();
  const int tp_rank = comm.rank();
  auto pattern = [](size_t index, int root) {
    return static_cast<uint8_t>(index * 7 + static_cast<size_t>(root) * 31 + 1);
  };
  size_t bad_bytes = 0;
  for (int root = 0; root < comm.size(); ++root) {
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
  EXPECT_EQ(bad_bytes, 0u) << "rank " << tp_rank;
}

// Ranks arrive staggered by 15 ms each; nobody may leave before the last one arrived. All
// ranks run on one host, so steady_clock (CLOCK_MONOTONIC) readings are comparable.
TEST(Barrier, NobodyLeavesBeforeEverybodyArrived) {
  Communicator& comm = world();
  for (int round = 0; round < 3; ++round) {
    comm.barrier();
    const int late_rank = (round + 1) % comm.size();
    std::this_thread::sleep_for(comm.rank() == late_rank ? 40ms : 5ms * comm.rank());
    const auto arrive = Clock::now();
    comm.barrier();
    const auto leave = Clock::now();
    const auto arrivals = gather_times_ns(comm, arrive);
    const auto leaves = gather_times_ns(comm, leave);
    const int64_t last_arrival = *std::max_element(arrivals.begin(), arrivals.end());
    const int64_t first_leave = *std::min_element(leaves.begin(), leaves.end());
    EXPECT_LE(last_arrival, first_leave) << "round " << round;
  }
}

// With verify_arguments, bad or mismatched arguments make every rank throw in the same call,
// and the communicator stays usable; without it, local problems still throw locally.
TEST(Arguments, VerifiedMismatchesThrowOnEveryRankAndCommStaysUsable) {
  MpiCommOptions options;
  options.timeout = 30s;
  options.verify_arguments = true;
  MpiCommunicator comm(MPI_COMM_WORLD, options);
  const int tp_rank = comm.rank();
  if (comm.size() < 3) GTEST_SKIP() << "needs 3 ranks";
  std::vector<float> buffer(100, 1.0f);

  auto message_of_call = [&](const std::function<void()>& call) -> std::string {
    try {
      call();
    } catch (const keel::Error& error) {
      return error.what();
    }
    return "";
  };
  auto expect_contains = [&](const std::string& message, const std::string& part) {
    EXPECT_NE(message.find(part), std::string::npos)
        << "rank " << tp_rank << ": '" << message << "' lacks '" << part << "'";
  };

  std::string message = message_of_call(
      [&] { comm.all_reduce(buffer.data(), tp_rank == 1 ? 99 : 100, ReduceAlgo::kFixedOrder); });
  expect_contains(message, "rank " + std::to_string(tp_rank) + ": all_reduce: ");
  expect_contains(message, "ranks disagree on count (rank 0: 100, rank 1: 99)");

  message = message_of_call(
      [&] { comm.all_reduce(tp_rank == 2 ? nullptr : buffer.data(), 100, ReduceAlgo::kNative); });
  expect_contains(message, tp_rank == 2 ? "null data" : "rank 2 passed invalid arguments");

  message = message_of_call([&] {
    comm.all_reduce(buffer.data(), 100,
                    tp_rank == 0 ? ReduceAlgo::kNative : ReduceAlgo::kFixedOrder);
  });
  expect_contains(message, "ranks disagree on algorithm");

  message = message_of_call([&] { comm.broadcast(buffer.data(), 4, tp_rank == 1 ? 0 : 1); });
  expect_contains(message, "broadcast: ranks disagree on root");

  // Every rank passes the bad root; the first bad rank (0) is what the others report.
  message = message_of_call([&] { comm.broadcast(buffer.data(), 4, 5); });
  expect_contains(message, tp_rank == 0
                               ? "root 5 out of range [0, " + std::to_string(comm.size()) + ")"
                               : "rank 0 passed invalid arguments");

  message = message_of_call([&] { comm.all_gather(buffer.data(), tp_rank == 0 ? 3 : 2, nullptr); });
  expect_contains(message, "all_gather: ");

  // Still usable, with the check on.
  std::fill(buffer.begin(), buffer.end(), 1.0f);
  comm.all_reduce(buffer.data(), buffer.size(), ReduceAlgo::kFixedOrder);
  size_t bad_elements = 0;
  for (float value : buffer) bad_elements += value != static_cast<float>(comm.size());
  EXPECT_EQ(bad_elements, 0u);

  // Without the check, a rank's local problem throws on that rank (every rank passes the bad
  // root here, so every rank throws and nothing is left posted).
  message = message_of_call([&] { world().broadcast(buffer.data(), 4, -1); });
  expect_contains(message, "rank " + std::to_string(tp_rank) + ": broadcast: root -1 out of range");
}

// A peer that is slow but alive (joins before the deadline) does not trip the watchdog.
TEST(Watchdog, SlowPeerWithinTimeoutIsFine) {
  MpiCommOptions options;
  options.timeout = 500ms;
  options.on_timeout = MpiCommOptions::OnTimeout::kThrow;
  MpiCommunicator comm(MPI_COMM_WORLD, options);
  std::vector<float> buffer(4096);
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = integer_input(comm.rank(), i);
    if (comm.rank() == comm.size() - 1) std::this_thread::sleep_for(100ms);
    EXPECT_NO_THROW(comm.all_reduce(buffer.data(), buffer.size(), kAllAlgos[round]));
    size_t bad_elements = 0;
    for (size_t i = 0; i < buffer.size(); ++i)
      bad_elements += buffer[i] != integer_sum(comm.size(), i);
    EXPECT_EQ(bad_elements, 0u);
  }
  EXPECT_FALSE(comm.unusable());
}

// The last rank joins an all-reduce long after the 300 ms timeout: its peers throw
// keel::Error naming their rank, the collective, the size and the timeout (OnTimeout::kThrow,
// the in-process stand-in for MPI_Abort), and refuse later calls. The late rank then completes
// the collective with the right sum, and the abandoned collective completes on the peers too
// (the communicator's destructor gives it one more timeout).
TEST(Watchdog, LatePeerMakesOthersThrowWithinTheTimeout) {
  constexpr size_t kCount = 4096;
  constexpr auto kTimeout = 300ms;
  // Static: MPI may write an abandoned collective's buffer until it completes, possibly after
  // this test (it does not in practice: the destructor below waits for it).
  static std::vector<float> buffer(kCount);
  const int late_rank = world().size() - 1;
  bool threw = false;
  std::string message;
  Clock::duration waited{};
  {
    MpiCommOptions options;
    options.timeout = kTimeout;
    options.on_timeout = MpiCommOptions::OnTimeout::kThrow;
    MpiCommunicator comm(MPI_COMM_WORLD, options);
    const int tp_rank = comm.rank();
    for (size_t i = 0; i < kCount; ++i) buffer[i] = integer_input(tp_rank, i);
    if (tp_rank == late_rank) std::this_thread::sleep_for(4 * kTimeout);
    const auto start = Clock::now();
    try {
      // kNative: one MPI request, which the late rank can still complete. (A fixed_order
      // abandoned in its first phase never posts its second, so a late peer would time out
      // in that one in turn.)
      comm.all_reduce(buffer.data(), kCount, ReduceAlgo::kNative);
    } catch (const keel::Error& error) {
      threw = true;
      message = error.what();
    }
    waited = Clock::now() - start;
    if (tp_rank != late_rank) {
      EXPECT_TRUE(threw) << "rank " << tp_rank;
      EXPECT_EQ(message, "rank " + std::to_string(tp_rank) + ": all_reduce of 4096 floats timed " +
                             "out after 300 ms: a peer rank died or hangs");
      EXPECT_GE(waited, kTimeout);
      EXPECT_LT(waited, 3 * kTimeout) << "rank " << tp_rank;
      EXPECT_TRUE(comm.unusable());
      try {
        comm.barrier();
        ADD_FAILURE() << "barrier on an unusable communicator returned";
      } catch (const keel::Error& error) {
        EXPECT_NE(std::string(error.what())
                      .find("rank " + std::to_string(tp_rank) +
                            ": barrier: communicator unusable after an "
                            "earlier all_reduce of 4096 floats timed out"),
                  std::string::npos)
            << error.what();
      }
    } else {
      EXPECT_FALSE(threw) << message;
    }
    // Everybody meets again (the late rank once its all-reduce is done); blocking calls on
    // WORLD also progress the peers' abandoned collective.
    MPI_Barrier(MPI_COMM_WORLD);
  }
  // The collective completed everywhere: every rank's buffer holds the sums.
  size_t bad_elements = 0;
  for (size_t i = 0; i < kCount; ++i) bad_elements += buffer[i] != integer_sum(world().size(), i);
  EXPECT_EQ(bad_elements, 0u) << "rank " << world().rank();
}

// A communicator over a sub-communicator (even and odd world ranks): its own rank numbering and
// fixed_order order.
TEST(SubCommunicator, EvenAndOddHalves) {
  const int world_rank = world().rank();
  MPI_Comm half = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank % 2, world_rank, &half);
  {
    MpiCommOptions options;
    options.timeout = 30s;
    MpiCommunicator comm(half, options);
    EXPECT_EQ(comm.rank(), world_rank / 2);
    const size_t count = 10007;
    const auto inputs = all_random_inputs(comm.size(), count, /*seed=*/55 + world_rank % 2);
    const auto result = all_reduce_copy(comm, inputs[comm.rank()], count, ReduceAlgo::kFixedOrder);
    size_t mismatches = 0;
    for (size_t i = 0; i < count; ++i)
      mismatches += bits_of(result[i]) != bits_of(serial_sum(inputs, i));
    EXPECT_EQ(mismatches, 0u) << "world rank " << world_rank;
  }
  MPI_Comm_free(&half);
}

// Other ranks print only their failures, prefixed with the rank.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int tp_rank) : tp_rank_(tp_rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", tp_rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", tp_rank_, info.test_suite_name(),
                   info.name());
    }
  }

 private:
  int tp_rank_;
};

}  // namespace
}  // namespace keel::comm

int main(int argc, char** argv) {
  using keel::comm::MpiCommunicator;
  keel::comm::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  keel::set_current_rank(world_rank);
  if (world_rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    // Released listeners are ours to delete.
    std::unique_ptr<::testing::TestEventListener> default_printer(
        listeners.Release(listeners.default_result_printer()));
    listeners.Append(std::make_unique<keel::comm::FailurePrinter>(world_rank).release());
  }

  int local_failed = 1;
  {
    keel::comm::MpiCommOptions options;
    options.timeout = std::chrono::seconds(30);  // a test that desynchronises ranks aborts
    MpiCommunicator comm(MPI_COMM_WORLD, options);
    keel::comm::g_comm = &comm;
    local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
    keel::comm::g_comm = nullptr;
  }

  // Any rank's failure fails every rank's exit code; rank 0 names the failing ranks.
  std::vector<int> failed_by_rank(static_cast<size_t>(world_size), 0);
  MPI_Gather(&local_failed, 1, MPI_INT, failed_by_rank.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int any_failed = 0;
  MPI_Allreduce(&local_failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (world_rank == 0) {
    std::string failing;
    for (int tp_rank = 0; tp_rank < world_size; ++tp_rank) {
      if (failed_by_rank[tp_rank] != 0) failing += " " + std::to_string(tp_rank);
    }
    if (any_failed != 0) {
      std::fprintf(stderr, "test_mpi_comm: FAILED on rank(s)%s of %d\n", failing.c_str(),
                   world_size);
    } else {
      std::printf("test_mpi_comm: all %d ranks passed\n", world_size);
    }
  }
  return any_failed != 0 ? 1 : 0;
}
