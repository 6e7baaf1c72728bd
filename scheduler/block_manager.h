// Paged KV block manager: a fixed pool of `num_blocks` KV blocks of `block_size` token slots.
// Each sequence owns a block table (block ids in position order); token position p of a sequence
// lives in block table[p / block_size] at offset p % block_size. A sequence grows one token (or
// one prefill chunk) at a time and takes a new block only when its last block is full, so at most
// block_size - 1 slots per sequence are ever unused.
//
// Free blocks form a stack seeded so that block 0 is handed out first; the pool's state depends
// only on the sequence of calls. Misuse at the boundary (unknown or duplicate sequence, growing
// beyond the free pool) throws keel::Error; callers ask can_allocate / can_append first.
//
// Optional prefix caching: once a full block's KV is computed, cache_full_blocks() files it under
// the exact key (parent block, parent generation, its block_size token ids), so a key names the
// whole token prefix up to that block. A new sequence whose leading full blocks match reuses them
// (reference counted) and skips computing them. Only full blocks are shared and a shared block is
// never written again, so no copy-on-write. A cached block nobody references still counts as free;
// it is evicted (least recently released first) only when no uncached free block is left.
// With caching off a block belongs to at most one sequence.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

namespace keel {

struct KvSlot {
  int32_t block_id = 0;
  int32_t offset = 0;  // token slot inside the block, in [0, block_size)
};

class BlockManager {
 public:
  static constexpr int32_t kDefaultBlockSize = 16;

  explicit BlockManager(int32_t num_blocks, int32_t block_size = kDefaultBlockSize,
                        bool enable_prefix_caching = false);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  int32_t num_free_blocks() const {
    return static_cast<int32_t>(free_block_ids_.size() + evictable_blocks_.size());
  }
  int32_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_free_slots() const { return int64_t{num_free_blocks()} * block_size_; }
  // Blocks a sequence of num_tokens tokens occupies.
  int32_t blocks_for_tokens(int64_t num_tokens) const;

  bool can_allocate(int64_t num_tokens) const;
  // Creates seq_id's block table with room for its first num_tokens tokens.
  void allocate(int64_t seq_id, int64_t num_tokens);

  // Whether seq_id can grow by num_new_tokens slots with the free blocks left.
  bool can_append(int64_t seq_id, int64_t num_new_tokens = 1) const;
  void append_slot(int64_t seq_id) { append_slots(seq_id, 1); }
  void append_slots(int64_t seq_id, int64_t num_new_tokens);
  // Tokens the pool can still add to seq_id: the unused tail of its last block plus free blocks.
  int64_t appendable_tokens(int64_t seq_id) const;

  // Returns every block of seq_id to the pool and forgets the sequence.
  void free(int64_t seq_id);

  // Leading tokens of token_ids held by cached full blocks, whole blocks only, at most
  // max_tokens. Always 0 with caching off.
  int64_t cached_prefix_tokens(std::span<const int32_t> token_ids, int64_t max_tokens) const;
  // can_allocate / allocate for a sequence whose first cached_tokens tokens (a value
  // cached_prefix_tokens returned for these token_ids) reuse cached blocks.
  bool can_allocate_with_prefix(std::span<const int32_t> token_ids, int64_t cached_tokens,
                                int64_t num_tokens) const;
  void allocate_with_prefix(int64_t seq_id, std::span<const int32_t> token_ids,
                            int64_t cached_tokens, int64_t num_tokens);
  // Files seq_id's full blocks whose KV is now computed: token_ids are the sequence's tokens
  // with KV, token_ids.size() <= num_tokens(seq_id). No-op with caching off.
  void cache_full_blocks(int64_t seq_id, std::span<const int32_t> token_ids);
  int32_t num_cached_blocks() const { return static_cast<int32_t>(cache_.size()); }
  int32_t ref_count(int32_t block_id) const {
    return blocks_[static_cast<size_t>(block_id)].ref_count;
  }

  bool has_sequence(int64_t seq_id) const { return sequences_.contains(seq_id); }
  int64_t num_sequences() const { return static_cast<int64_t>(sequences_.size()); }
  int64_t num_tokens(int64_t seq_id) const;
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  // Where token `position` of seq_id is stored; position must be < num_tokens(seq_id).
  KvSlot slot_of(int64_t seq_id, int64_t position) const;

 private:
  struct SequenceBlocks {
    std::vector<int32_t> block_ids;
    int64_t num_tokens = 0;
    size_t num_filed_blocks = 0;  // leading blocks already in (or matched from) the cache
  };
  // (parent block id or -1, parent generation, the block's token ids)
  using CacheKey = std::tuple<int32_t, uint64_t, std::vector<int32_t>>;
  struct BlockState {
    int32_t ref_count = 0;
    uint64_t generation = 0;  // bumped each time the block is handed out fresh
    bool cached = false;
    CacheKey key;
    uint64_t release_tick = 0;  // when ref_count last dropped to 0 (eviction order)
  };

  const SequenceBlocks& sequence(int64_t seq_id) const;
  SequenceBlocks& sequence(int64_t seq_id);
  void take_blocks(SequenceBlocks& blocks, int32_t count);
  int32_t take_fresh_block();
  CacheKey key_of(int32_t parent_block_id, std::span<const int32_t> block_token_ids) const;
  // Cached blocks matching the leading whole blocks of token_ids, at most max_blocks.
  std::vector<int32_t> match_prefix(std::span<const int32_t> token_ids, int64_t max_blocks) const;

  int32_t num_blocks_ = 0;
  int32_t block_size_ = kDefaultBlockSize;
  bool prefix_caching_enabled_ = false;
  std::vector<int32_t> free_block_ids_;  // uncached free blocks; stack: back() goes next
  std::set<std::pair<uint64_t, int32_t>> evictable_blocks_;  // (release_tick, block): cached, free
  std::vector<BlockState> blocks_;
  std::map<CacheKey, int32_t> cache_;
  uint64_t next_release_tick_ = 0;
  std::map<int64_t, SequenceBlocks> sequences_;
};

}  // namespace keel
