// Tests for expert placement (scheduler/placement.h): the three placement rules, the invariants
// every placement must satisfy (each expert on exactly one rank, local lists ascending and
// consistent with rank_of), and the keel::Error messages for bad explicit placements.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "scheduler/placement.h"

namespace keel {
namespace {

// The invariants of any placement: rank_of is in [0, tp); for each layer the ranks' local
// expert lists are ascending, agree with rank_of, and together hold every expert exactly once.
void expect_valid_placement(const ExpertPlacement& placement) {
  for (int64_t layer = 0; layer < placement.num_layers(); ++layer) {
    std::vector<int> times_held(static_cast<size_t>(placement.num_experts()), 0);
    for (int rank = 0; rank < placement.tp_size(); ++rank) {
      const std::vector<int32_t> local = placement.local_experts(layer, rank);
      for (size_t i = 0; i < local.size(); ++i) {
        ASSERT_GE(local[i], 0);
        ASSERT_LT(local[i], placement.num_experts());
        if (i > 0) {
          EXPECT_LT(local[i - 1], local[i]) << "layer " << layer << " rank " << rank;
        }
        EXPECT_EQ(placement.rank_of(layer, local[i]), rank)
            << "layer " << layer << " expert " << local[i];
        ++times_held[static_cast<size_t>(local[i])];
      }
    }
    for (int64_t expert = 0; expert < placement.num_experts(); ++expert) {
      EXPECT_EQ(times_held[static_cast<size_t>(expert)], 1)
          << "layer " << layer << " expert " << expert;
      EXPECT_GE(placement.rank_of(layer, expert), 0);
      EXPECT_LT(placement.rank_of(layer, expert), placement.tp_size());
    }
  }
}

// Runs `build` and returns the keel::Error message it throws ("" when it does not throw).
std::string build_error(const PlacementSpec& spec, int64_t num_layers, int64_t num_experts,
                        int tp_size) {
  try {
    ExpertPlacement::build(spec, num_layers, num_experts, tp_size);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

PlacementSpec explicit_spec(std::vector<std::vector<int>> ranks) {
  PlacementSpec spec;
  spec.kind = PlacementKind::kExplicit;
  spec.explicit_ranks = std::move(ranks);
  return spec;
}

TEST(Placement, ContiguousUsesBlocksOfCeilEOverTp) {
  for (int64_t num_experts : {1, 8, 10, 60, 64, 128}) {
    for (int tp_size : {1, 2, 3, 4, 5, 8, 16}) {
      PlacementSpec spec;
      spec.kind = PlacementKind::kContiguous;
      const int64_t num_layers = 3;
      ExpertPlacement placement = ExpertPlacement::build(spec, num_layers, num_experts, tp_size);
      EXPECT_EQ(placement.num_layers(), num_layers);
      EXPECT_EQ(placement.num_experts(), num_experts);
      EXPECT_EQ(placement.tp_size(), tp_size);
      const int64_t block = (num_experts + tp_size - 1) / tp_size;
      for (int64_t layer = 0; layer < num_layers; ++layer)
        for (int64_t expert = 0; expert < num_experts; ++expert)
          ASSERT_EQ(placement.rank_of(layer, expert), expert / block)
              << "E " << num_experts << " tp " << tp_size << " expert " << expert;
      expect_valid_placement(placement);
    }
  }
}

TEST(Placement, ContiguousConcreteExample) {
  // E = 10, tp = 4: blocks of ceil(10/4) = 3 -> ranks 0,0,0,1,1,1,2,2,2,3.
  ExpertPlacement placement = ExpertPlacement::build(PlacementSpec{}, 1, 10, 4);
  EXPECT_EQ(placement.local_experts(0, 0), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(placement.local_experts(0, 1), (std::vector<int32_t>{3, 4, 5}));
  EXPECT_EQ(placement.local_experts(0, 2), (std::vector<int32_t>{6, 7, 8}));
  EXPECT_EQ(placement.local_experts(0, 3), (std::vector<int32_t>{9}));
}

TEST(Placement, RoundRobinUsesEModTp) {
  for (int64_t num_experts : {1, 8, 10, 60, 64, 128}) {
    for (int tp_size : {1, 2, 3, 4, 5, 8, 16}) {
      PlacementSpec spec;
      spec.kind = PlacementKind::kRoundRobin;
      ExpertPlacement placement = ExpertPlacement::build(spec, 2, num_experts, tp_size);
      for (int64_t layer = 0; layer < 2; ++layer)
        for (int64_t expert = 0; expert < num_experts; ++expert)
          ASSERT_EQ(placement.rank_of(layer, expert), expert % tp_size)
              << "E " << num_experts << " tp " << tp_size << " expert " << expert;
      expect_valid_placement(placement);
    }
  }
  PlacementSpec spec;
  spec.kind = PlacementKind::kRoundRobin;
  ExpertPlacement placement = ExpertPlacement::build(spec, 1, 10, 4);
  EXPECT_EQ(placement.local_experts(0, 1), (std::vector<int32_t>{1, 5, 9}));
  EXPECT_EQ(placement.local_experts(0, 3), (std::vector<int32_t>{3, 7}));
}

TEST(Placement, ExplicitSharedListAppliesToEveryLayer) {
  const std::vector<int> ranks = {2, 0, 1, 1, 0, 2, 2, 0};
  ExpertPlacement placement = ExpertPlacement::build(explicit_spec({ranks}), 4, 8, 3);
  for (int64_t layer = 0; layer < 4; ++layer) {
    for (int64_t expert = 0; expert < 8; ++expert)
      EXPECT_EQ(placement.rank_of(layer, expert), ranks[expert]);
    EXPECT_EQ(placement.local_experts(layer, 0), (std::vector<int32_t>{1, 4, 7}));
    EXPECT_EQ(placement.local_experts(layer, 1), (std::vector<int32_t>{2, 3}));
    EXPECT_EQ(placement.local_experts(layer, 2), (std::vector<int32_t>{0, 5, 6}));
  }
  expect_valid_placement(placement);
}

TEST(Placement, ExplicitPerLayerLists) {
  // Each layer gets its own list; a rank may hold no expert of some layer.
  const std::vector<std::vector<int>> ranks = {
      {0, 0, 1, 1},
      {1, 0, 1, 0},
      {1, 1, 1, 1},
  };
  ExpertPlacement placement = ExpertPlacement::build(explicit_spec(ranks), 3, 4, 2);
  for (int64_t layer = 0; layer < 3; ++layer)
    for (int64_t expert = 0; expert < 4; ++expert)
      EXPECT_EQ(placement.rank_of(layer, expert), ranks[layer][expert])
          << "layer " << layer << " expert " << expert;
  EXPECT_EQ(placement.local_experts(1, 0), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(placement.local_experts(1, 1), (std::vector<int32_t>{0, 2}));
  EXPECT_TRUE(placement.local_experts(2, 0).empty());
  EXPECT_EQ(placement.local_experts(2, 1), (std::vector<int32_t>{0, 1, 2, 3}));
  expect_valid_placement(placement);
}

TEST(Placement, ExplicitWrongListLengthIsAnError) {
  const std::string message = build_error(explicit_spec({{0, 1, 0, 1, 0, 1, 0}}), 2, 8, 2);
  EXPECT_NE(message.find("expected 8 ranks"), std::string::npos) << message;
  EXPECT_NE(message.find("got 7"), std::string::npos) << message;
  // Too long is as wrong as too short, and a per-layer list is checked for its own layer.
  const std::string per_layer =
      build_error(explicit_spec({{0, 1, 0, 1}, {0, 1, 0, 1, 1}}), 2, 4, 2);
  EXPECT_NE(per_layer.find("layer 1"), std::string::npos) << per_layer;
  EXPECT_NE(per_layer.find("got 5"), std::string::npos) << per_layer;
}

TEST(Placement, ExplicitRankOutOfRangeIsAnError) {
  const std::string too_large = build_error(explicit_spec({{0, 1, 4, 1}}), 1, 4, 4);
  EXPECT_NE(too_large.find("expert 2"), std::string::npos) << too_large;
  EXPECT_NE(too_large.find("rank 4"), std::string::npos) << too_large;
  EXPECT_NE(too_large.find("[0, 4)"), std::string::npos) << too_large;
  const std::string negative = build_error(explicit_spec({{0, -1, 1, 1}}), 1, 4, 4);
  EXPECT_NE(negative.find("expert 1"), std::string::npos) << negative;
  EXPECT_NE(negative.find("rank -1"), std::string::npos) << negative;
}

TEST(Placement, ExplicitWrongNumberOfListsIsAnError) {
  // Two lists for three layers: neither "one shared list" nor "one list per layer".
  const std::string message = build_error(explicit_spec({{0, 1}, {1, 0}}), 3, 2, 2);
  EXPECT_NE(message.find("expected 1 or 3 lists"), std::string::npos) << message;
  EXPECT_NE(message.find("got 2"), std::string::npos) << message;
  const std::string none = build_error(explicit_spec({}), 3, 2, 2);
  EXPECT_NE(none.find("got 0"), std::string::npos) << none;
}

TEST(Placement, NonPositiveTpSizeIsAnError) {
  const std::string message = build_error(PlacementSpec{}, 1, 8, 0);
  EXPECT_NE(message.find("tp_size"), std::string::npos) << message;
}

TEST(Placement, ParseKindRoundTripsAndNamesBadValue) {
  for (PlacementKind kind :
       {PlacementKind::kContiguous, PlacementKind::kRoundRobin, PlacementKind::kExplicit})
    EXPECT_EQ(parse_placement_kind(placement_kind_name(kind)), kind);
  EXPECT_EQ(parse_placement_kind("round_robin"), PlacementKind::kRoundRobin);
  try {
    parse_placement_kind("zigzag");
    FAIL() << "parse_placement_kind accepted 'zigzag'";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("zigzag"), std::string::npos) << message;
    EXPECT_NE(message.find("contiguous"), std::string::npos) << message;  // lists the options
  }
  // Matching is exact: no case folding or prefix matching.
  EXPECT_THROW(parse_placement_kind("Contiguous"), Error);
  EXPECT_THROW(parse_placement_kind("round"), Error);
  EXPECT_THROW(parse_placement_kind(""), Error);
}

}  // namespace
// Balanced placement (LPT with a capacity of ceil(E / tp) experts per rank), by hand: loads
// 10 9 8 1 1 1 on 2 ranks (3 experts each): 10 -> r0, 9 -> r1, 8 -> r1 (9 < 10), the first two
// 1s -> r0 (11 < 17), the last 1 -> r1 (r0 is full): rank loads 12 and 18.
TEST(Placement, BalancedIsLongestProcessingTimeWithEvenExpertCounts) {
  const auto placement = balanced_placement({{10, 9, 8, 1, 1, 1}}, 2);
  EXPECT_EQ(placement, (std::vector<std::vector<int>>{{0, 1, 1, 0, 0, 1}}));
  // Ties: lower expert first, lower rank first.
  EXPECT_EQ(balanced_placement({{5, 5, 5, 5}}, 2), (std::vector<std::vector<int>>{{0, 1, 0, 1}}));
  // On these skewed loads (fixed, pseudo-random) its max rank load is no worse than
  // round_robin's in any layer; expert counts are even; the result is a valid explicit placement.
  uint64_t state = 7;
  std::vector<std::vector<int64_t>> loads(6, std::vector<int64_t>(16));
  for (auto& layer : loads)
    for (auto& load : layer) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      load = static_cast<int64_t>((state >> 33) % 1000) * static_cast<int64_t>((state >> 20) % 7);
    }
  const auto balanced = balanced_placement(loads, 4);
  for (size_t layer = 0; layer < loads.size(); ++layer) {
    std::vector<int64_t> lpt(4, 0), rr(4, 0);
    std::vector<int> count(4, 0);
    for (size_t e = 0; e < 16; ++e) {
      lpt[static_cast<size_t>(balanced[layer][e])] += loads[layer][e];
      rr[e % 4] += loads[layer][e];
      ++count[static_cast<size_t>(balanced[layer][e])];
    }
    EXPECT_LE(*std::max_element(lpt.begin(), lpt.end()), *std::max_element(rr.begin(), rr.end()))
        << layer;
    EXPECT_EQ(count, (std::vector<int>{4, 4, 4, 4})) << layer;
  }
  PlacementSpec spec;
  spec.kind = PlacementKind::kExplicit;
  spec.explicit_ranks = balanced;
  const ExpertPlacement built = ExpertPlacement::build(spec, 6, 16, 4);
  EXPECT_EQ(built.rank_of(3, 5), balanced[3][5]);
  EXPECT_THROW(balanced_placement({}, 2), Error);
  EXPECT_THROW(balanced_placement({{1, 2}, {1}}, 2), Error);
  EXPECT_THROW(balanced_placement({{1, 2}}, 0), Error);
}

}  // namespace keel
