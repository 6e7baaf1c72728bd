#include "scheduler/block_manager.h"

#include "kernels/base/check.h"

namespace keel {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 0) throw_error("BlockManager: num_blocks must be >= 0, got ", num_blocks);
  if (block_size < 1) throw_error("BlockManager: block_size must be >= 1, got ", block_size);
  free_block_ids_.reserve(static_cast<size_t>(num_blocks));
  for (int32_t block_id = num_blocks - 1; block_id >= 0; --block_id)
    free_block_ids_.push_back(block_id);
}

int32_t BlockManager::blocks_for_tokens(int64_t num_tokens) const {
  return static_cast<int32_t>((num_tokens + block_size_ - 1) / block_size_);
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  return num_tokens >= 0 && blocks_for_tokens(num_tokens) <= num_free_blocks();
}

void BlockManager::allocate(int64_t seq_id, int64_t num_tokens) {
  if (has_sequence(seq_id)) throw_error("BlockManager: sequence ", seq_id, " already allocated");
  if (!can_allocate(num_tokens))
    throw_error("BlockManager: cannot allocate ", num_tokens, " tokens for sequence ", seq_id,
                " (needs ", blocks_for_tokens(num_tokens), " blocks, ", num_free_blocks(),
                " free)");
  SequenceBlocks& blocks = sequences_[seq_id];
  take_blocks(blocks, blocks_for_tokens(num_tokens));
  blocks.num_tokens = num_tokens;
}

int64_t BlockManager::appendable_tokens(int64_t seq_id) const {
  const SequenceBlocks& blocks = sequence(seq_id);
  int64_t unused_in_last_block =
      static_cast<int64_t>(blocks.block_ids.size()) * block_size_ - blocks.num_tokens;
  return unused_in_last_block + num_free_slots();
}

bool BlockManager::can_append(int64_t seq_id, int64_t num_new_tokens) const {
  return num_new_tokens >= 0 && num_new_tokens <= appendable_tokens(seq_id);
}

void BlockManager::append_slots(int64_t seq_id, int64_t num_new_tokens) {
  if (!can_append(seq_id, num_new_tokens))
    throw_error("BlockManager: cannot append ", num_new_tokens, " tokens to sequence ", seq_id,
                " (room for ", appendable_tokens(seq_id), ")");
  SequenceBlocks& blocks = sequence(seq_id);
  int64_t new_num_tokens = blocks.num_tokens + num_new_tokens;
  int32_t missing_blocks =
      blocks_for_tokens(new_num_tokens) - static_cast<int32_t>(blocks.block_ids.size());
  take_blocks(blocks, missing_blocks);
  blocks.num_tokens = new_num_tokens;
}

void BlockManager::free(int64_t seq_id) {
  auto found = sequences_.find(seq_id);
  if (found == sequences_.end()) throw_error("BlockManager: free of unknown sequence ", seq_id);
  const std::vector<int32_t>& block_ids = found->second.block_ids;
  for (auto block = block_ids.rbegin(); block != block_ids.rend(); ++block)
    free_block_ids_.push_back(*block);
  sequences_.erase(found);
}

int64_t BlockManager::num_tokens(int64_t seq_id) const {
  return sequence(seq_id).num_tokens;
}

const std::vector<int32_t>& BlockManager::block_table(int64_t seq_id) const {
  return sequence(seq_id).block_ids;
}

KvSlot BlockManager::slot_of(int64_t seq_id, int64_t position) const {
  const SequenceBlocks& blocks = sequence(seq_id);
  if (position < 0 || position >= blocks.num_tokens)
    throw_error("BlockManager: position ", position, " outside sequence ", seq_id, " of ",
                blocks.num_tokens, " tokens");
  return KvSlot{blocks.block_ids[static_cast<size_t>(position / block_size_)],
                static_cast<int32_t>(position % block_size_)};
}

int64_t BlockManager::flat_slot_of(int64_t seq_id, int64_t position) const {
  KvSlot slot = slot_of(seq_id, position);
  return int64_t{slot.block_id} * block_size_ + slot.offset;
}

const BlockManager::SequenceBlocks& BlockManager::sequence(int64_t seq_id) const {
  auto found = sequences_.find(seq_id);
  if (found == sequences_.end()) throw_error("BlockManager: unknown sequence ", seq_id);
  return found->second;
}

BlockManager::SequenceBlocks& BlockManager::sequence(int64_t seq_id) {
  auto found = sequences_.find(seq_id);
  if (found == sequences_.end()) throw_error("BlockManager: unknown sequence ", seq_id);
  return found->second;
}

void BlockManager::take_blocks(SequenceBlocks& blocks, int32_t count) {
  KEEL_CHECK(count <= num_free_blocks(), "taking ", count, " blocks with ", num_free_blocks(),
             " free");
  for (int32_t taken = 0; taken < count; ++taken) {
    blocks.block_ids.push_back(free_block_ids_.back());
    free_block_ids_.pop_back();
  }
}

}  // namespace keel
