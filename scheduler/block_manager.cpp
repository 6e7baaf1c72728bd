#include "scheduler/block_manager.h"

#include <algorithm>
#include <utility>

#include "kernels/base/check.h"

namespace keel {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      prefix_caching_enabled_(enable_prefix_caching) {
  if (num_blocks < 0) throw_error("BlockManager: num_blocks must be >= 0, got ", num_blocks);
  if (block_size < 1) throw_error("BlockManager: block_size must be >= 1, got ", block_size);
  blocks_.resize(static_cast<size_t>(num_blocks));
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
  allocate_with_prefix(seq_id, {}, 0, num_tokens);
}

int64_t BlockManager::cached_prefix_tokens(std::span<const int32_t> token_ids,
                                           int64_t max_tokens) const {
  if (!prefix_caching_enabled_) return 0;
  return static_cast<int64_t>(match_prefix(token_ids, max_tokens / block_size_).size()) *
         block_size_;
}

bool BlockManager::can_allocate_with_prefix(std::span<const int32_t> token_ids,
                                            int64_t cached_tokens, int64_t num_tokens) const {
  if (num_tokens < cached_tokens) return false;
  const std::vector<int32_t> reused = match_prefix(token_ids, cached_tokens / block_size_);
  if (static_cast<int64_t>(reused.size()) * block_size_ != cached_tokens) return false;
  const auto reused_free = std::count_if(reused.begin(), reused.end(), [&](int32_t block_id) {
    return blocks_[static_cast<size_t>(block_id)].ref_count == 0;
  });
  const int64_t new_blocks = blocks_for_tokens(num_tokens) - static_cast<int64_t>(reused.size());
  return new_blocks + reused_free <= num_free_blocks();
}

void BlockManager::allocate_with_prefix(int64_t seq_id, std::span<const int32_t> token_ids,
                                        int64_t cached_tokens, int64_t num_tokens) {
  if (has_sequence(seq_id)) throw_error("BlockManager: sequence ", seq_id, " already allocated");
  if (!can_allocate_with_prefix(token_ids, cached_tokens, num_tokens))
    throw_error("BlockManager: cannot allocate ", num_tokens, " tokens (", cached_tokens,
                " cached) for sequence ", seq_id, " (needs ", blocks_for_tokens(num_tokens),
                " blocks, ", num_free_blocks(), " free)");
  SequenceBlocks& blocks = sequences_[seq_id];
  for (int32_t block_id : match_prefix(token_ids, cached_tokens / block_size_)) {
    BlockState& state = blocks_[static_cast<size_t>(block_id)];
    if (state.ref_count == 0) evictable_blocks_.erase({state.release_tick, block_id});
    ++state.ref_count;
    blocks.block_ids.push_back(block_id);
  }
  blocks.num_filed_blocks = blocks.block_ids.size();
  take_blocks(blocks,
              blocks_for_tokens(num_tokens) - static_cast<int32_t>(blocks.block_ids.size()));
  blocks.num_tokens = num_tokens;
}

void BlockManager::cache_full_blocks(int64_t seq_id, std::span<const int32_t> token_ids) {
  if (!prefix_caching_enabled_) return;
  SequenceBlocks& blocks = sequence(seq_id);
  KEEL_CHECK(static_cast<int64_t>(token_ids.size()) <= blocks.num_tokens, "sequence ", seq_id,
             ": caching ", token_ids.size(), " tokens of ", blocks.num_tokens);
  const size_t num_full_blocks = token_ids.size() / static_cast<size_t>(block_size_);
  for (size_t block_idx = blocks.num_filed_blocks; block_idx < num_full_blocks; ++block_idx) {
    const int32_t parent = block_idx == 0 ? -1 : blocks.block_ids[block_idx - 1];
    CacheKey key = key_of(parent, token_ids.subspan(block_idx * static_cast<size_t>(block_size_),
                                                    static_cast<size_t>(block_size_)));
    if (cache_.contains(key)) continue;  // the same prefix computed twice: keep the first
    const int32_t block_id = blocks.block_ids[block_idx];
    BlockState& state = blocks_[static_cast<size_t>(block_id)];
    state.cached = true;
    state.key = key;
    cache_.emplace(std::move(key), block_id);
  }
  blocks.num_filed_blocks = std::max(blocks.num_filed_blocks, num_full_blocks);
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
  for (auto block = block_ids.rbegin(); block != block_ids.rend(); ++block) {
    BlockState& state = blocks_[static_cast<size_t>(*block)];
    if (--state.ref_count > 0) continue;
    if (state.cached) {
      state.release_tick = next_release_tick_++;
      evictable_blocks_.insert({state.release_tick, *block});
    } else {
      free_block_ids_.push_back(*block);
    }
  }
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
  for (int32_t taken = 0; taken < count; ++taken) blocks.block_ids.push_back(take_fresh_block());
}

int32_t BlockManager::take_fresh_block() {
  int32_t block_id = 0;
  if (!free_block_ids_.empty()) {
    block_id = free_block_ids_.back();
    free_block_ids_.pop_back();
  } else {
    block_id = evictable_blocks_.begin()->second;
    evictable_blocks_.erase(evictable_blocks_.begin());
    BlockState& evicted = blocks_[static_cast<size_t>(block_id)];
    cache_.erase(evicted.key);
    evicted.cached = false;
    evicted.key = {};
  }
  BlockState& state = blocks_[static_cast<size_t>(block_id)];
  ++state.generation;
  state.ref_count = 1;
  return block_id;
}

BlockManager::CacheKey BlockManager::key_of(int32_t parent_block_id,
                                            std::span<const int32_t> block_token_ids) const {
  const uint64_t parent_generation =
      parent_block_id < 0 ? 0 : blocks_[static_cast<size_t>(parent_block_id)].generation;
  return CacheKey{parent_block_id, parent_generation,
                  std::vector<int32_t>(block_token_ids.begin(), block_token_ids.end())};
}

std::vector<int32_t> BlockManager::match_prefix(std::span<const int32_t> token_ids,
                                                int64_t max_blocks) const {
  std::vector<int32_t> matched;
  if (!prefix_caching_enabled_) return matched;
  const auto block_size = static_cast<size_t>(block_size_);
  int32_t parent = -1;
  for (size_t block_idx = 0; static_cast<int64_t>(block_idx) < max_blocks &&
                             (block_idx + 1) * block_size <= token_ids.size();
       ++block_idx) {
    auto found = cache_.find(key_of(parent, token_ids.subspan(block_idx * block_size, block_size)));
    if (found == cache_.end()) break;
    matched.push_back(found->second);
    parent = found->second;
  }
  return matched;
}

}  // namespace keel
