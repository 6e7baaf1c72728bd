// The NCCL backend's fixed-order sum (comm/nccl/ordered_sum.h), run on the CPU, against the
// thread backend's kFixedOrder all-reduce (ThreadGroup): bit for bit, for 1..8 ranks and many
// sizes. The CUDA kernel evaluates this same header function with -fmad=false, so this is the
// CPU half of "NCCL fixed_order bits == thread fixed_order bits"; test_nccl_comm checks the GPU
// half on machines with GPUs.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/nccl/ordered_sum.h"
#include "comm/thread_comm.h"
#include "kernels/base/dtype.h"
#include "tests/comm_test_util.h"

namespace keel::comm {
namespace {

constexpr int kMaxRanks = 8;
// Sizes around the thread backend's 16-float chunk alignment and its per-rank chunking, plus a
// page-ish size and a multi-megabyte one.
const std::vector<size_t> kSizes = {0,  1,  2,  3,   7,    15,   16,        17,
                                    63, 64, 65, 127, 1000, 4097, 65536 + 3, 300001};

// Partials of one rank: mostly normal values at several scales (so the order of the adds
// matters), plus exact cancellations, signed zeros, subnormals and values near overflow.
std::vector<float> random_partials(uint64_t seed, size_t count) {
  std::mt19937_64 engine(seed);
  std::uniform_int_distribution<int> kind(0, 19);
  std::uniform_real_distribution<float> exponent(-12.0f, 12.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<uint32_t> mantissa(0, (1u << 23) - 1);
  std::vector<float> values(count);
  for (float& value : values) {
    switch (kind(engine)) {
      case 0:
        value = 0.0f;
        break;
      case 1:
        value = -0.0f;
        break;
      case 2:  // subnormal, either sign
        value = bits_float((engine() & 1u ? 0x80000000u : 0u) | (mantissa(engine) | 1u));
        break;
      case 3:  // huge: sums may overflow to +-inf, identically on both sides
        value = (engine() & 1u ? -1.0f : 1.0f) * 1.5e38f;
        break;
      default:
        value = normal(engine) * std::exp2(exponent(engine));
        break;
    }
  }
  return values;
}

uint64_t seed_of(int num_ranks, size_t count, int rank) {
  return (static_cast<uint64_t>(num_ranks) << 56) ^ (static_cast<uint64_t>(count) << 8) ^
         static_cast<uint64_t>(rank);
}

using keel::comm::test_util::thread_fixed_order;

// Row-major [num_ranks, stride] copy of the partials (the all-gather output layout when
// stride == count; the reduce-scatter stage layout when stride is the padded chunk).
std::vector<float> rank_major(const std::vector<std::vector<float>>& partials, size_t stride) {
  std::vector<float> rows(partials.size() * stride, std::nanf(""));
  for (size_t rank = 0; rank < partials.size(); ++rank) {
    // std::copy, not memcpy: an empty partial has a null data() (memcpy(null, ...) is UB).
    std::copy(partials[rank].begin(), partials[rank].end(), rows.begin() + rank * stride);
  }
  return rows;
}

// Index of the first element whose bits differ, or -1.
int64_t first_bit_mismatch(const std::vector<float>& expected, const std::vector<float>& actual) {
  if (expected.size() != actual.size()) return 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (float_bits(expected[i]) != float_bits(actual[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

TEST(OrderedSum, MatchesThreadFixedOrderBitForBit) {
  for (int num_ranks = 1; num_ranks <= kMaxRanks; ++num_ranks) {
    for (size_t count : kSizes) {
      SCOPED_TRACE(testing::Message() << num_ranks << " ranks, " << count << " floats");
      std::vector<std::vector<float>> partials;
      for (int rank = 0; rank < num_ranks; ++rank) {
        partials.push_back(random_partials(seed_of(num_ranks, count, rank), count));
      }
      const std::vector<std::vector<float>> reference = thread_fixed_order(partials);

      // The layout the all-gather path hands the kernel: stride == count.
      const std::vector<float> gathered = rank_major(partials, count);
      std::vector<float> sums(count);
      ordered_sum_strided(gathered.data(), count, num_ranks, count, 0, 1, sums.data());
      for (int rank = 0; rank < num_ranks; ++rank) {
        const int64_t mismatch = first_bit_mismatch(reference[rank], sums);
        ASSERT_EQ(mismatch, -1) << "rank " << rank << " element " << mismatch << ": thread "
                                << reference[rank][mismatch] << ", ordered_sum " << sums[mismatch];
      }

      // A padded stride (the reduce-scatter stage layout); the padding is NaN, so reading it
      // would show.
      const size_t padded = count + 64;
      const std::vector<float> staged = rank_major(partials, padded);
      std::vector<float> staged_sums(count);
      ordered_sum_strided(staged.data(), padded, num_ranks, count, 0, 1, staged_sums.data());
      ASSERT_EQ(first_bit_mismatch(reference[0], staged_sums), -1);
    }
  }
}

// The kernel's grid-stride loop: any (first, step) decomposition covers every element once.
TEST(OrderedSum, GridStrideSplitsCoverEveryElementOnce) {
  constexpr int kRanks = 3;
  constexpr size_t kCount = 1000;
  std::vector<std::vector<float>> partials;
  for (int rank = 0; rank < kRanks; ++rank) {
    partials.push_back(random_partials(seed_of(kRanks, kCount, rank) + 99, kCount));
  }
  const std::vector<float> rows = rank_major(partials, kCount);
  std::vector<float> whole(kCount);
  ordered_sum_strided(rows.data(), kCount, kRanks, kCount, 0, 1, whole.data());
  for (size_t step : {size_t{1}, size_t{7}, size_t{256}, size_t{999}, size_t{1000}, size_t{4096}}) {
    SCOPED_TRACE(testing::Message() << "step " << step);
    // A sentinel bit pattern no sum produces here, so a missed element shows.
    std::vector<float> split(kCount, bits_float(0x7FC0DEADu));
    for (size_t first = 0; first < step; ++first) {
      ordered_sum_strided(rows.data(), kCount, kRanks, kCount, first, step, split.data());
    }
    ASSERT_EQ(first_bit_mismatch(whole, split), -1);
  }
}

// Spot checks that pin the order itself, independent of the thread backend.
TEST(OrderedSum, AddsInRankOrderFromTheFirstPartial) {
  // ((1e8 + -1e8) + 1) = 1, whereas 1e8 + (-1e8 + 1) = 0 in fp32.
  const float cancel[] = {1e8f, -1e8f, 1.0f};
  EXPECT_EQ(ordered_sum_element(cancel, 1, 3, 0), 1.0f);
  // Starts from p0, not from +0: an all-negative-zero sum stays -0.
  const float negative_zeros[] = {-0.0f, -0.0f};
  EXPECT_EQ(float_bits(ordered_sum_element(negative_zeros, 1, 2, 0)), 0x80000000u);
  // One rank: the partial itself.
  const float single[] = {-0.0f};
  EXPECT_EQ(float_bits(ordered_sum_element(single, 1, 1, 0)), 0x80000000u);
  // Subnormals are kept (no flush to zero): 2^-149 + 2^-149 = 2^-148.
  const float tiny[] = {bits_float(1u), bits_float(1u)};
  EXPECT_EQ(float_bits(ordered_sum_element(tiny, 1, 2, 0)), 2u);
}

}  // namespace
}  // namespace keel::comm
