// Paged KV block manager: a fixed pool of `num_blocks` KV blocks of `block_size` token slots.
// Each sequence owns a block table (block ids in position order); token position p of a sequence
// lives in block table[p / block_size] at offset p % block_size. A sequence grows one token (or
// one prefill chunk) at a time and takes a new block only when its last block is full, so at most
// block_size - 1 slots per sequence are ever unused.
//
// Free blocks form a stack seeded so that block 0 is handed out first; the pool's state depends
// only on the sequence of calls. No prefix caching: a block belongs to at most one sequence.
// Misuse at the boundary (unknown or duplicate sequence, growing beyond the free pool) throws
// keel::Error; callers ask can_allocate / can_append first.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace keel {

struct KvSlot {
  int32_t block_id = 0;
  int32_t offset = 0;  // token slot inside the block, in [0, block_size)
};

class BlockManager {
 public:
  static constexpr int32_t kDefaultBlockSize = 16;

  explicit BlockManager(int32_t num_blocks, int32_t block_size = kDefaultBlockSize);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  int32_t num_free_blocks() const { return static_cast<int32_t>(free_block_ids_.size()); }
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

  bool has_sequence(int64_t seq_id) const { return sequences_.contains(seq_id); }
  int64_t num_sequences() const { return static_cast<int64_t>(sequences_.size()); }
  int64_t num_tokens(int64_t seq_id) const;
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  // Where token `position` of seq_id is stored; position must be < num_tokens(seq_id).
  KvSlot slot_of(int64_t seq_id, int64_t position) const;
  // Flat slot index block_id * block_size + offset (the form KV-write kernels take).
  int64_t flat_slot_of(int64_t seq_id, int64_t position) const;

 private:
  struct SequenceBlocks {
    std::vector<int32_t> block_ids;
    int64_t num_tokens = 0;
  };

  const SequenceBlocks& sequence(int64_t seq_id) const;
  SequenceBlocks& sequence(int64_t seq_id);
  void take_blocks(SequenceBlocks& blocks, int32_t count);

  int32_t num_blocks_ = 0;
  int32_t block_size_ = kDefaultBlockSize;
  std::vector<int32_t> free_block_ids_;  // stack: back() is handed out next
  std::map<int64_t, SequenceBlocks> sequences_;
};

}  // namespace keel
