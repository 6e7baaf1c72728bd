// Tests for the MoE pack (kernels/cpu/moe.h, the stable counting sort of kernels/math/moe_math.h).
// Packing is checked against a direct reading of the router output rather than a second
// implementation: every (token, slot) pair routed to a local expert appears exactly once, in that
// expert's range, in increasing (token, slot) order; pairs routed elsewhere never appear;
// per-expert counts equal a direct count; slot_rows points every local pair at its packed row.

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "kernels/cpu/moe.h"

namespace keel {
namespace {

using math::PackedRoute;

// What cpu::moe_pack writes, in host vectors, with the local expert ids the offsets refer to.
struct ExpertPacking {
  std::vector<int32_t> local_expert_ids;
  std::vector<int64_t> offsets;
  std::vector<PackedRoute> routes;
  std::vector<int32_t> slot_rows;
  int64_t num_tokens_of(size_t local_idx) const {
    return offsets[local_idx + 1] - offsets[local_idx];
  }
};

// Runs cpu::moe_pack into `packing`, whose storage may hold a previous call's (larger) results:
// arrays are sized for the worst case and filled with junk first, so stale data would show.
void pack_routes(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                 const std::vector<int32_t>& expert_to_local, ExpertPacking& packing) {
  packing.local_expert_ids.clear();
  for (size_t expert = 0; expert < expert_to_local.size(); ++expert)
    if (expert_to_local[expert] >= 0)
      packing.local_expert_ids.push_back(static_cast<int32_t>(expert));
  const int64_t num_local = static_cast<int64_t>(packing.local_expert_ids.size());
  const size_t num_pairs = static_cast<size_t>(num_tokens * top_k);
  std::vector<int32_t> offsets(static_cast<size_t>(num_local + 1), 12345);
  packing.routes.assign(num_pairs, PackedRoute{-7, -7});
  packing.slot_rows.assign(num_pairs, 999);
  cpu::moe_pack(expert_ids, num_tokens, top_k, expert_to_local.data(),
                static_cast<int64_t>(expert_to_local.size()), num_local, offsets.data(),
                packing.routes.data(), packing.slot_rows.data());
  packing.offsets.assign(offsets.begin(), offsets.end());
  packing.routes.resize(static_cast<size_t>(offsets.back()));
}

// expert_to_local for a set of local experts: local index i for the i-th smallest local expert
// id (the ascending order ExpertPlacement::local_experts produces), -1 for all others.
std::vector<int32_t> make_expert_to_local(int64_t num_experts,
                                          const std::vector<int32_t>& local_experts) {
  std::vector<int32_t> expert_to_local(static_cast<size_t>(num_experts), -1);
  std::vector<int32_t> sorted = local_experts;
  std::sort(sorted.begin(), sorted.end());
  for (size_t local_idx = 0; local_idx < sorted.size(); ++local_idx)
    expert_to_local[static_cast<size_t>(sorted[local_idx])] = static_cast<int32_t>(local_idx);
  return expert_to_local;
}

// Checks `packing` against the router output it was built from.
void expect_correct_packing(const std::vector<int32_t>& expert_ids, int64_t num_tokens,
                            int64_t top_k, const std::vector<int32_t>& expert_to_local,
                            const ExpertPacking& packing) {
  // local_expert_ids inverts expert_to_local and is ascending.
  std::vector<int32_t> expected_local_ids;
  for (size_t expert = 0; expert < expert_to_local.size(); ++expert)
    if (expert_to_local[expert] >= 0) expected_local_ids.push_back(static_cast<int32_t>(expert));
  ASSERT_EQ(packing.local_expert_ids, expected_local_ids);
  const size_t num_local = expected_local_ids.size();

  // offsets: num_local + 1 entries, from 0, non-decreasing, ending at routes.size().
  ASSERT_EQ(packing.offsets.size(), num_local + 1);
  EXPECT_EQ(packing.offsets.front(), 0);
  for (size_t local_idx = 0; local_idx < num_local; ++local_idx)
    ASSERT_LE(packing.offsets[local_idx], packing.offsets[local_idx + 1]);
  ASSERT_EQ(packing.offsets.back(), static_cast<int64_t>(packing.routes.size()));

  // Direct count of the router output per local expert, and the set of local pairs.
  std::vector<int64_t> expected_counts(num_local, 0);
  std::set<std::pair<int32_t, int32_t>> expected_pairs;
  for (int64_t token = 0; token < num_tokens; ++token) {
    for (int64_t slot = 0; slot < top_k; ++slot) {
      const int32_t local_idx =
          expert_to_local[static_cast<size_t>(expert_ids[token * top_k + slot])];
      if (local_idx < 0) continue;
      ++expected_counts[static_cast<size_t>(local_idx)];
      expected_pairs.emplace(static_cast<int32_t>(token), static_cast<int32_t>(slot));
    }
  }

  std::set<std::pair<int32_t, int32_t>> seen_pairs;
  for (size_t local_idx = 0; local_idx < num_local; ++local_idx) {
    EXPECT_EQ(packing.num_tokens_of(local_idx), expected_counts[local_idx])
        << "local expert " << local_idx << " (expert " << expected_local_ids[local_idx] << ")";
    for (int64_t i = packing.offsets[local_idx]; i < packing.offsets[local_idx + 1]; ++i) {
      const PackedRoute& route = packing.routes[static_cast<size_t>(i)];
      ASSERT_GE(route.token_idx, 0);
      ASSERT_LT(route.token_idx, num_tokens);
      ASSERT_GE(route.slot_idx, 0);
      ASSERT_LT(route.slot_idx, top_k);
      // The pair really was routed to this expert (so non-local pairs never appear).
      ASSERT_EQ(expert_ids[route.token_idx * top_k + route.slot_idx], expected_local_ids[local_idx])
          << "pair (" << route.token_idx << ", " << route.slot_idx << ") in the range of expert "
          << expected_local_ids[local_idx];
      // Stable: strictly increasing (token, slot) within the expert's range.
      if (i > packing.offsets[local_idx]) {
        const PackedRoute& previous = packing.routes[static_cast<size_t>(i - 1)];
        ASSERT_LT(std::make_pair(previous.token_idx, previous.slot_idx),
                  std::make_pair(route.token_idx, route.slot_idx))
            << "expert " << expected_local_ids[local_idx] << " position " << i;
      }
      // Exactly once overall.
      ASSERT_TRUE(seen_pairs.emplace(route.token_idx, route.slot_idx).second)
          << "pair (" << route.token_idx << ", " << route.slot_idx << ") packed twice";
    }
  }
  EXPECT_EQ(seen_pairs, expected_pairs);

  // slot_rows: the packed row of every local pair, -1 for the others.
  ASSERT_EQ(packing.slot_rows.size(), static_cast<size_t>(num_tokens * top_k));
  for (int64_t pair = 0; pair < num_tokens * top_k; ++pair) {
    const int32_t row = packing.slot_rows[static_cast<size_t>(pair)];
    if (expert_to_local[static_cast<size_t>(expert_ids[static_cast<size_t>(pair)])] < 0) {
      EXPECT_EQ(row, -1) << "pair " << pair;
      continue;
    }
    ASSERT_GE(row, 0) << "pair " << pair;
    ASSERT_LT(row, static_cast<int32_t>(packing.routes.size()));
    EXPECT_EQ(packing.routes[static_cast<size_t>(row)].token_idx, pair / top_k);
    EXPECT_EQ(packing.routes[static_cast<size_t>(row)].slot_idx, pair % top_k);
  }
}

// Router output like the real router's: top_k distinct experts per token, in random order.
std::vector<int32_t> random_routing(std::mt19937& rng, int64_t num_tokens, int64_t top_k,
                                    int64_t num_experts) {
  std::vector<int32_t> all_experts(static_cast<size_t>(num_experts));
  std::iota(all_experts.begin(), all_experts.end(), 0);
  std::vector<int32_t> expert_ids;
  expert_ids.reserve(static_cast<size_t>(num_tokens * top_k));
  for (int64_t token = 0; token < num_tokens; ++token) {
    std::shuffle(all_experts.begin(), all_experts.end(), rng);
    expert_ids.insert(expert_ids.end(), all_experts.begin(), all_experts.begin() + top_k);
  }
  return expert_ids;
}

// A random subset of the experts (possibly empty or all of them) as this rank's local set.
std::vector<int32_t> random_local_experts(std::mt19937& rng, int64_t num_experts) {
  std::vector<int32_t> experts(static_cast<size_t>(num_experts));
  std::iota(experts.begin(), experts.end(), 0);
  std::shuffle(experts.begin(), experts.end(), rng);
  const int64_t num_local = std::uniform_int_distribution<int64_t>(0, num_experts)(rng);
  experts.resize(static_cast<size_t>(num_local));
  return experts;
}

TEST(MoePack, RandomRoutingsArePackedCorrectly) {
  for (uint32_t seed : {1u, 2u, 3u, 17u, 12345u}) {
    std::mt19937 rng(seed);
    for (int trial = 0; trial < 60; ++trial) {
      const int64_t num_experts = std::uniform_int_distribution<int64_t>(1, 64)(rng);
      const int64_t top_k =
          std::uniform_int_distribution<int64_t>(1, std::min<int64_t>(8, num_experts))(rng);
      const int64_t num_tokens = std::uniform_int_distribution<int64_t>(0, 200)(rng);
      const std::vector<int32_t> expert_ids = random_routing(rng, num_tokens, top_k, num_experts);
      const std::vector<int32_t> expert_to_local =
          make_expert_to_local(num_experts, random_local_experts(rng, num_experts));
      ExpertPacking packing;
      pack_routes(expert_ids.data(), num_tokens, top_k, expert_to_local, packing);
      SCOPED_TRACE(testing::Message() << "seed " << seed << " trial " << trial << " E "
                                      << num_experts << " k " << top_k << " tokens " << num_tokens);
      expect_correct_packing(expert_ids, num_tokens, top_k, expert_to_local, packing);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(MoePack, ConcreteExample) {
  // 4 tokens, top_k 2, experts 0..5; this rank holds experts 1, 3 and 4.
  const std::vector<int32_t> expert_ids = {3, 1,  // token 0
                                           0, 3,  // token 1
                                           4, 5,  // token 2
                                           1, 3};
  const std::vector<int32_t> expert_to_local = make_expert_to_local(6, {1, 3, 4});
  ExpertPacking packing;
  pack_routes(expert_ids.data(), 4, 2, expert_to_local, packing);
  EXPECT_EQ(packing.local_expert_ids, (std::vector<int32_t>{1, 3, 4}));
  EXPECT_EQ(packing.offsets, (std::vector<int64_t>{0, 2, 5, 6}));
  const std::vector<std::pair<int32_t, int32_t>> expected = {
      {0, 1}, {3, 0},          // expert 1
      {0, 0}, {1, 1}, {3, 1},  // expert 3
      {2, 0},                  // expert 4
  };
  ASSERT_EQ(packing.routes.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(packing.routes[i].token_idx, expected[i].first) << "route " << i;
    EXPECT_EQ(packing.routes[i].slot_idx, expected[i].second) << "route " << i;
  }
}

TEST(MoePack, AllTokensOnOneExpert) {
  const int64_t num_tokens = 150, num_experts = 16;
  for (int64_t top_k : {1, 4}) {
    // Expert 9 is every token's choice in slot top_k - 1; other slots use experts 0..top_k-2.
    std::vector<int32_t> expert_ids;
    for (int64_t token = 0; token < num_tokens; ++token) {
      for (int64_t slot = 0; slot + 1 < top_k; ++slot)
        expert_ids.push_back(static_cast<int32_t>(slot));
      expert_ids.push_back(9);
    }
    const std::vector<int32_t> expert_to_local = make_expert_to_local(num_experts, {9, 12});
    ExpertPacking packing;
    pack_routes(expert_ids.data(), num_tokens, top_k, expert_to_local, packing);
    expect_correct_packing(expert_ids, num_tokens, top_k, expert_to_local, packing);
    EXPECT_EQ(packing.num_tokens_of(0), num_tokens);
    EXPECT_EQ(packing.num_tokens_of(1), 0);
    for (int64_t token = 0; token < num_tokens; ++token) {
      EXPECT_EQ(packing.routes[token].token_idx, token);
      EXPECT_EQ(packing.routes[token].slot_idx, top_k - 1);
    }
  }
}

TEST(MoePack, ExpertsWithZeroTokensGetEmptyRanges) {
  // Only experts 2 and 5 are ever chosen; local experts 0, 3, 7 get empty ranges in between.
  std::mt19937 rng(5);
  std::vector<int32_t> expert_ids;
  for (int token = 0; token < 50; ++token) expert_ids.push_back(rng() % 2 ? 2 : 5);
  const std::vector<int32_t> expert_to_local = make_expert_to_local(8, {0, 2, 3, 5, 7});
  ExpertPacking packing;
  pack_routes(expert_ids.data(), 50, 1, expert_to_local, packing);
  expect_correct_packing(expert_ids, 50, 1, expert_to_local, packing);
  EXPECT_EQ(packing.num_tokens_of(0), 0);  // expert 0
  EXPECT_EQ(packing.num_tokens_of(2), 0);  // expert 3
  EXPECT_EQ(packing.num_tokens_of(4), 0);  // expert 7
  EXPECT_EQ(packing.num_tokens_of(1) + packing.num_tokens_of(3), 50);
}

TEST(MoePack, NoLocalExperts) {
  std::mt19937 rng(6);
  const std::vector<int32_t> expert_ids = random_routing(rng, 40, 4, 32);
  const std::vector<int32_t> expert_to_local(32, -1);
  ExpertPacking packing;
  pack_routes(expert_ids.data(), 40, 4, expert_to_local, packing);
  expect_correct_packing(expert_ids, 40, 4, expert_to_local, packing);
  EXPECT_TRUE(packing.local_expert_ids.empty());
  EXPECT_EQ(packing.offsets, (std::vector<int64_t>{0}));
  EXPECT_TRUE(packing.routes.empty());
}

TEST(MoePack, ZeroTokens) {
  const std::vector<int32_t> expert_to_local = make_expert_to_local(16, {1, 4, 9});
  ExpertPacking packing;
  pack_routes(nullptr, 0, 8, expert_to_local, packing);
  expect_correct_packing({}, 0, 8, expert_to_local, packing);
  EXPECT_EQ(packing.offsets, (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_TRUE(packing.routes.empty());
}

TEST(MoePack, ReusedPackingHasNoStaleData) {
  // The pack reuses scratch that held a previous step's (larger or smaller) packing; a call must
  // give exactly what a fresh packing gives, with a different local set too.
  std::mt19937 rng(77);
  ExpertPacking reused;
  const int64_t num_tokens_sequence[] = {200, 3, 0, 120, 1, 200, 17};
  for (int round = 0; round < 3; ++round) {
    for (int64_t num_tokens : num_tokens_sequence) {
      const int64_t num_experts = std::uniform_int_distribution<int64_t>(8, 64)(rng);
      const int64_t top_k = std::uniform_int_distribution<int64_t>(1, 8)(rng);
      const std::vector<int32_t> expert_ids = random_routing(rng, num_tokens, top_k, num_experts);
      const std::vector<int32_t> expert_to_local =
          make_expert_to_local(num_experts, random_local_experts(rng, num_experts));
      pack_routes(expert_ids.data(), num_tokens, top_k, expert_to_local, reused);
      SCOPED_TRACE(testing::Message() << "round " << round << " tokens " << num_tokens);
      expect_correct_packing(expert_ids, num_tokens, top_k, expert_to_local, reused);
      ExpertPacking fresh;
      pack_routes(expert_ids.data(), num_tokens, top_k, expert_to_local, fresh);
      EXPECT_EQ(reused.local_expert_ids, fresh.local_expert_ids);
      EXPECT_EQ(reused.offsets, fresh.offsets);
      ASSERT_EQ(reused.routes.size(), fresh.routes.size());
      for (size_t i = 0; i < fresh.routes.size(); ++i) {
        EXPECT_EQ(reused.routes[i].token_idx, fresh.routes[i].token_idx);
        EXPECT_EQ(reused.routes[i].slot_idx, fresh.routes[i].slot_idx);
      }
    }
  }
}

TEST(MoePackDeathTest, OutOfRangeExpertIdAborts) {
  // A router id outside [0, num_experts) is an invariant violation (KEEL_CHECK), not data.
  const std::vector<int32_t> expert_ids = {0, 1, 8, 2};
  const std::vector<int32_t> expert_to_local = make_expert_to_local(8, {0, 1});
  ExpertPacking packing;
  EXPECT_DEATH(pack_routes(expert_ids.data(), 2, 2, expert_to_local, packing),
               "expert id 8 out of range");
}

}  // namespace
}  // namespace keel
