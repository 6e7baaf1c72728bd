// Tests for the paged KV block manager (scheduler/block_manager.h). Accounting is checked
// against an independent view built from the public block tables: free + used == total, no block
// in two tables, each table holds exactly ceil(num_tokens / block_size) blocks, and freeing
// returns every block. Slot mapping is checked position by position.

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "kernels/base/check.h"
#include "scheduler/block_manager.h"

namespace keel {
namespace {

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

// Checks the pool against the tables of the sequences the test believes are alive.
void expect_consistent(const BlockManager& manager, const std::map<int64_t, int64_t>& live_tokens) {
  std::set<int32_t> owned_blocks;
  int64_t total_table_blocks = 0;
  for (const auto& [seq_id, num_tokens] : live_tokens) {
    ASSERT_TRUE(manager.has_sequence(seq_id));
    EXPECT_EQ(manager.num_tokens(seq_id), num_tokens);
    const std::vector<int32_t>& table = manager.block_table(seq_id);
    EXPECT_EQ(static_cast<int64_t>(table.size()), ceil_div(num_tokens, manager.block_size()));
    for (int32_t block_id : table) {
      EXPECT_GE(block_id, 0);
      EXPECT_LT(block_id, manager.num_blocks());
      EXPECT_TRUE(owned_blocks.insert(block_id).second) << "block " << block_id << " shared";
    }
    total_table_blocks += static_cast<int64_t>(table.size());
  }
  EXPECT_EQ(manager.num_sequences(), static_cast<int64_t>(live_tokens.size()));
  EXPECT_EQ(manager.num_used_blocks(), total_table_blocks);
  EXPECT_EQ(manager.num_free_blocks() + manager.num_used_blocks(), manager.num_blocks());
}

TEST(BlockManager, StartsWithEveryBlockFree) {
  BlockManager manager(8);
  EXPECT_EQ(manager.block_size(), 16);
  EXPECT_EQ(manager.num_blocks(), 8);
  EXPECT_EQ(manager.num_free_blocks(), 8);
  EXPECT_EQ(manager.num_used_blocks(), 0);
  EXPECT_TRUE(manager.can_allocate(8 * 16));
  EXPECT_FALSE(manager.can_allocate(8 * 16 + 1));
}

TEST(BlockManager, AllocateTakesCeilOfTokensOverBlockSize) {
  BlockManager manager(10, 4);
  manager.allocate(1, 0);
  manager.allocate(2, 1);
  manager.allocate(3, 4);
  manager.allocate(4, 5);
  EXPECT_TRUE(manager.block_table(1).empty());
  EXPECT_EQ(manager.block_table(2).size(), 1u);
  EXPECT_EQ(manager.block_table(3).size(), 1u);
  EXPECT_EQ(manager.block_table(4).size(), 2u);
  expect_consistent(manager, {{1, 0}, {2, 1}, {3, 4}, {4, 5}});
  EXPECT_EQ(manager.num_free_blocks(), 6);
}

TEST(BlockManager, AppendTakesANewBlockOnlyWhenTheLastIsFull) {
  BlockManager manager(4, 4);
  manager.allocate(7, 3);
  EXPECT_EQ(manager.num_free_blocks(), 3);
  manager.append_slot(7);  // fills slot 3 of block 0
  EXPECT_EQ(manager.num_free_blocks(), 3);
  EXPECT_EQ(manager.block_table(7).size(), 1u);
  manager.append_slot(7);  // position 4 needs block 1
  EXPECT_EQ(manager.num_free_blocks(), 2);
  EXPECT_EQ(manager.block_table(7).size(), 2u);
  manager.append_slots(7, 7);  // 12 tokens: exactly 3 blocks
  EXPECT_EQ(manager.block_table(7).size(), 3u);
  EXPECT_EQ(manager.appendable_tokens(7), 4);
  EXPECT_TRUE(manager.can_append(7, 4));
  EXPECT_FALSE(manager.can_append(7, 5));
  expect_consistent(manager, {{7, 12}});
}

TEST(BlockManager, CanAppendIsFalseWhenThePoolIsExhausted) {
  BlockManager manager(2, 2);
  manager.allocate(1, 2);
  manager.allocate(2, 2);
  EXPECT_EQ(manager.num_free_blocks(), 0);
  EXPECT_FALSE(manager.can_append(1));
  EXPECT_THROW(manager.append_slot(1), Error);
  EXPECT_FALSE(manager.can_allocate(1));
  EXPECT_TRUE(manager.can_allocate(0));
  EXPECT_THROW(manager.allocate(3, 1), Error);
  manager.free(2);
  EXPECT_TRUE(manager.can_append(1));
  manager.append_slot(1);
  expect_consistent(manager, {{1, 3}});
}

TEST(BlockManager, FreeReturnsEveryBlockAndForgetsTheSequence) {
  BlockManager manager(6, 4);
  manager.allocate(1, 9);
  manager.allocate(2, 5);
  manager.free(1);
  EXPECT_FALSE(manager.has_sequence(1));
  EXPECT_EQ(manager.num_free_blocks(), 4);
  manager.free(2);
  EXPECT_EQ(manager.num_free_blocks(), 6);
  EXPECT_EQ(manager.num_sequences(), 0);
  EXPECT_THROW(manager.free(2), Error);
  // A freed id can be allocated again.
  manager.allocate(1, 24);
  expect_consistent(manager, {{1, 24}});
}

TEST(BlockManager, RejectsMisuse) {
  EXPECT_THROW(BlockManager(4, 0), Error);
  EXPECT_THROW(BlockManager(-1, 4), Error);
  BlockManager manager(4, 4);
  manager.allocate(1, 1);
  EXPECT_THROW(manager.allocate(1, 1), Error);
  EXPECT_THROW(manager.block_table(9), Error);
  EXPECT_THROW(manager.append_slot(9), Error);
  EXPECT_THROW(manager.slot_of(1, 1), Error);
  EXPECT_THROW(manager.slot_of(1, -1), Error);
}

TEST(BlockManager, SlotMappingFollowsTheBlockTable) {
  BlockManager manager(16, 4);
  manager.allocate(1, 3);
  manager.allocate(2, 6);
  manager.append_slots(1, 7);
  manager.append_slots(2, 3);
  for (int64_t seq_id : {1, 2}) {
    const std::vector<int32_t>& table = manager.block_table(seq_id);
    for (int64_t position = 0; position < manager.num_tokens(seq_id); ++position) {
      KvSlot slot = manager.slot_of(seq_id, position);
      EXPECT_EQ(slot.block_id, table[static_cast<size_t>(position / 4)]);
      EXPECT_EQ(slot.offset, position % 4);
    }
  }
  // Every live slot is distinct across sequences.
  std::set<int64_t> flat_slots;
  for (int64_t seq_id : {1, 2})
    for (int64_t position = 0; position < manager.num_tokens(seq_id); ++position)
      EXPECT_TRUE(flat_slots
                      .insert(int64_t{manager.slot_of(seq_id, position).block_id} * 4 +
                              manager.slot_of(seq_id, position).offset)
                      .second);
}

TEST(BlockManager, HandsOutBlocksDeterministically) {
  auto run = [] {
    BlockManager manager(12, 4);
    manager.allocate(1, 5);
    manager.allocate(2, 9);
    manager.free(1);
    manager.allocate(3, 13);
    manager.append_slots(2, 4);
    return std::vector<std::vector<int32_t>>{manager.block_table(2), manager.block_table(3)};
  };
  EXPECT_EQ(run(), run());
  BlockManager fresh(3, 4);
  fresh.allocate(1, 12);
  EXPECT_EQ(fresh.block_table(1), (std::vector<int32_t>{0, 1, 2}));
}

std::vector<int32_t> iota_tokens(int32_t first, int32_t count) {
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  for (int32_t idx = 0; idx < count; ++idx) tokens[static_cast<size_t>(idx)] = first + idx;
  return tokens;
}

TEST(BlockManager, PrefixCacheSharesFullBlocksWithReferenceCounts) {
  BlockManager manager(8, 4, /*enable_prefix_caching=*/true);
  const std::vector<int32_t> first = iota_tokens(0, 10);
  manager.allocate(1, 10);
  EXPECT_EQ(manager.cached_prefix_tokens(first, 10), 0);  // nothing filed yet
  manager.cache_full_blocks(1, first);
  EXPECT_EQ(manager.num_cached_blocks(), 2);  // the partial third block is not cached
  EXPECT_EQ(manager.cached_prefix_tokens(first, 10), 8);
  EXPECT_EQ(manager.cached_prefix_tokens(first, 7), 4);  // whole blocks within the limit

  std::vector<int32_t> second = iota_tokens(0, 12);
  second[9] = 99;  // same first two blocks, different third
  ASSERT_EQ(manager.cached_prefix_tokens(second, 11), 8);
  EXPECT_TRUE(manager.can_allocate_with_prefix(second, 8, 12));
  manager.allocate_with_prefix(2, second, 8, 12);
  const std::vector<int32_t>& table_1 = manager.block_table(1);
  const std::vector<int32_t>& table_2 = manager.block_table(2);
  ASSERT_EQ(table_2.size(), 3u);
  EXPECT_EQ(table_2[0], table_1[0]);
  EXPECT_EQ(table_2[1], table_1[1]);
  EXPECT_NE(table_2[2], table_1[2]);
  EXPECT_EQ(manager.ref_count(table_1[0]), 2);
  EXPECT_EQ(manager.ref_count(table_1[2]), 1);
  EXPECT_EQ(manager.num_used_blocks(), 4);  // shared blocks count once
  EXPECT_EQ(manager.num_free_blocks() + manager.num_used_blocks(), 8);

  // A different first block matches nothing, even with the same second block.
  std::vector<int32_t> other = first;
  other[0] = 77;
  EXPECT_EQ(manager.cached_prefix_tokens(other, 10), 0);

  const int32_t shared_block = table_1[0];
  manager.free(1);
  EXPECT_EQ(manager.ref_count(shared_block), 1);
  EXPECT_EQ(manager.num_used_blocks(), 3);
  manager.free(2);
  EXPECT_EQ(manager.num_free_blocks(), 8);  // cached but unreferenced blocks are free
  EXPECT_EQ(manager.ref_count(shared_block), 0);
  EXPECT_EQ(manager.cached_prefix_tokens(first, 10), 8);  // and still reusable
  manager.allocate_with_prefix(3, first, 8, 10);
  EXPECT_EQ(manager.block_table(3)[0], shared_block);
  EXPECT_EQ(manager.num_used_blocks(), 3);
}

TEST(BlockManager, CachedBlocksAreEvictedOnlyWhenNoOtherBlockIsFree) {
  BlockManager manager(3, 2, /*enable_prefix_caching=*/true);
  const std::vector<int32_t> tokens = iota_tokens(10, 4);
  manager.allocate(1, 4);
  manager.cache_full_blocks(1, tokens);
  manager.free(1);
  EXPECT_EQ(manager.num_free_blocks(), 3);
  manager.allocate(2, 2);  // takes the never-cached block
  EXPECT_EQ(manager.cached_prefix_tokens(tokens, 4), 4);
  manager.allocate(3, 2);  // must evict: the leaf (released first) goes before its parent
  EXPECT_EQ(manager.cached_prefix_tokens(tokens, 4), 2);
  EXPECT_FALSE(manager.can_allocate_with_prefix(tokens, 2, 4));  // the cached block + 1 new
  manager.free(2);
  EXPECT_TRUE(manager.can_allocate_with_prefix(tokens, 2, 4));
  manager.allocate_with_prefix(4, tokens, 2, 4);
  EXPECT_EQ(manager.num_free_blocks(), 0);
  EXPECT_EQ(manager.num_used_blocks(), 3);
}

TEST(BlockManager, WithoutPrefixCachingNothingIsShared) {
  BlockManager manager(8, 4);
  const std::vector<int32_t> tokens = iota_tokens(0, 8);
  manager.allocate(1, 8);
  manager.cache_full_blocks(1, tokens);
  EXPECT_EQ(manager.num_cached_blocks(), 0);
  EXPECT_EQ(manager.cached_prefix_tokens(tokens, 8), 0);
}

// Random allocate / append / free against a shadow map of live sequences; the pool stays
// consistent after every operation and is whole again once everything is freed.
TEST(BlockManager, RandomizedAccountingStaysConsistent) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    std::mt19937 rng(seed);
    const int32_t block_size = 1 + static_cast<int32_t>(rng() % 8);
    const int32_t num_blocks = 1 + static_cast<int32_t>(rng() % 40);
    BlockManager manager(num_blocks, block_size);
    std::map<int64_t, int64_t> live_tokens;
    int64_t next_seq_id = 0;
    for (int step = 0; step < 400; ++step) {
      uint32_t action = rng() % 3;
      if (action == 0 || live_tokens.empty()) {
        int64_t num_tokens = rng() % (3 * block_size + 1);
        bool expected = ceil_div(num_tokens, block_size) <= manager.num_free_blocks();
        ASSERT_EQ(manager.can_allocate(num_tokens), expected);
        if (expected) {
          manager.allocate(next_seq_id, num_tokens);
          live_tokens[next_seq_id++] = num_tokens;
        }
      } else {
        auto victim = live_tokens.begin();
        std::advance(victim, rng() % live_tokens.size());
        if (action == 1) {
          int64_t num_new_tokens = 1 + rng() % (2 * block_size);
          int64_t room = ceil_div(victim->second, block_size) * block_size - victim->second +
                         int64_t{manager.num_free_blocks()} * block_size;
          ASSERT_EQ(manager.can_append(victim->first, num_new_tokens), num_new_tokens <= room);
          if (num_new_tokens <= room) {
            manager.append_slots(victim->first, num_new_tokens);
            victim->second += num_new_tokens;
          }
        } else {
          manager.free(victim->first);
          live_tokens.erase(victim);
        }
      }
      expect_consistent(manager, live_tokens);
      if (testing::Test::HasFailure()) FAIL() << "seed " << seed << " step " << step;
    }
    for (const auto& [seq_id, num_tokens] : live_tokens) manager.free(seq_id);
    EXPECT_EQ(manager.num_free_blocks(), num_blocks);
    EXPECT_EQ(manager.num_sequences(), 0);
  }
}

}  // namespace
}  // namespace keel
