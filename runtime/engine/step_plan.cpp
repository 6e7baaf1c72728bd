#include "runtime/engine/step_plan.h"

#include <algorithm>

namespace keel {

StepBatch step_batch_from_plan(const StepPlan& plan, bool every_prompt_position) {
  return step_batch_from_plan(plan, std::vector<bool>(plan.num_seqs(), every_prompt_position));
}

StepBatch step_batch_from_plan(const StepPlan& plan,
                               const std::vector<bool>& every_position_of_seq) {
  StepBatch batch;
  int64_t max_blocks = 1;
  for (size_t seq = 0; seq < plan.num_seqs(); ++seq)
    max_blocks =
        std::max<int64_t>(max_blocks, static_cast<int64_t>(plan.block_table_of(seq).size()));
  batch.max_blocks_per_seq = max_blocks;
  batch.block_tables.assign(plan.num_seqs() * static_cast<size_t>(max_blocks), -1);
  batch.state_slots = plan.state_slots;
  for (size_t seq = 0; seq < plan.num_seqs(); ++seq) {
    auto table = plan.block_table_of(seq);
    std::copy(table.begin(), table.end(),
              batch.block_tables.begin() + static_cast<std::ptrdiff_t>(seq) * max_blocks);
    auto ids = plan.token_ids_of(seq);
    auto positions = plan.positions_of(seq);
    const bool every_position = every_position_of_seq.at(seq);
    for (size_t token = 0; token < ids.size(); ++token) {
      if (every_position && token + 1 < ids.size())
        batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()));
      batch.token_ids.push_back(ids[token]);
      batch.positions.push_back(static_cast<int32_t>(positions[token]));
      batch.cache_idx.push_back(static_cast<int32_t>(seq));
    }
    if (plan.needs_logits[seq] || every_position)
      batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()) - 1);
  }
  return batch;
}

}  // namespace keel
