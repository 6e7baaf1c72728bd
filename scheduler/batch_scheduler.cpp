#include "scheduler/batch_scheduler.h"

#include <algorithm>
#include <set>
#include <utility>

#include "kernels/base/check.h"

namespace keel {

namespace {

template <typename T>
std::span<const T> slice(const std::vector<T>& values, const std::vector<int64_t>& offsets,
                         size_t index) {
  return std::span<const T>(values).subspan(
      static_cast<size_t>(offsets[index]),
      static_cast<size_t>(offsets[index + 1] - offsets[index]));
}

}  // namespace

std::span<const int32_t> StepPlan::token_ids_of(size_t seq_idx) const {
  return slice(token_ids, token_offsets, seq_idx);
}
std::span<const int64_t> StepPlan::positions_of(size_t seq_idx) const {
  return slice(positions, token_offsets, seq_idx);
}
std::span<const int32_t> StepPlan::block_table_of(size_t seq_idx) const {
  return slice(block_tables, block_table_offsets, seq_idx);
}

int64_t BatchScheduler::Sequence::num_output_tokens() const {
  return num_tokens() - static_cast<int64_t>(request.prompt_token_ids.size());
}

struct BatchScheduler::StepBuilder {
  int64_t token_budget = 0;
  std::vector<ScheduledChunk> chunks;
  std::set<int64_t> scheduled_seq_ids;
  int64_t num_preemptions = 0;
};

BatchScheduler::BatchScheduler(const SchedulerConfig& config)
    : config_(config),
      block_manager_(config.num_kv_blocks, config.block_size, config.enable_prefix_caching) {
  if (config.num_kv_blocks < 1)
    throw_error("BatchScheduler: num_kv_blocks must be >= 1, got ", config.num_kv_blocks);
  if (config.max_num_batched_tokens < 1)
    throw_error("BatchScheduler: max_num_batched_tokens must be >= 1, got ",
                config.max_num_batched_tokens);
  if (config.max_num_seqs < 1)
    throw_error("BatchScheduler: max_num_seqs must be >= 1, got ", config.max_num_seqs);
  if (config.num_state_slots < 0)
    throw_error("BatchScheduler: num_state_slots must be >= 0, got ", config.num_state_slots);
  if (config.num_state_slots > 0 && config.enable_prefix_caching)
    throw_error("BatchScheduler: prefix caching cannot be used with recurrent-state slots (a ",
                "cached prefix does not hold the recurrent state at its end)");
  for (int32_t slot = 0; slot < config.num_state_slots; ++slot) free_slots_.insert(slot);
}

void BatchScheduler::release_slot(int64_t seq_id) {
  auto found = slot_of_.find(seq_id);
  if (found == slot_of_.end()) return;
  free_slots_.insert(found->second);
  slot_of_.erase(found);
}

void BatchScheduler::add_request(Request request) {
  const int64_t seq_id = request.seq_id;
  if (sequences_.contains(seq_id))
    throw_error("BatchScheduler: request ", seq_id, " is already waiting or running");
  if (request.prompt_token_ids.empty())
    throw_error("BatchScheduler: request ", seq_id, " has an empty prompt");
  if (request.max_new_tokens < 1)
    throw_error("BatchScheduler: request ", seq_id, " has max_new_tokens ", request.max_new_tokens,
                ", expected >= 1");
  // The last generated token is never fed back, so it needs no KV slot.
  const int64_t max_kv_tokens =
      static_cast<int64_t>(request.prompt_token_ids.size()) + request.max_new_tokens - 1;
  if (block_manager_.blocks_for_tokens(max_kv_tokens) > block_manager_.num_blocks())
    throw_error("BatchScheduler: request ", seq_id, " needs up to ",
                block_manager_.blocks_for_tokens(max_kv_tokens), " KV blocks, the pool has ",
                block_manager_.num_blocks());
  std::vector<int32_t> token_ids = request.prompt_token_ids;
  sequences_.emplace(seq_id, Sequence{std::move(request), std::move(token_ids), 0});
  waiting_.push_back(seq_id);
}

StepPlan BatchScheduler::schedule() {
  if (step_in_flight_)
    throw_error("BatchScheduler: schedule() called before on_step_done() of the previous step");
  StepBuilder step;
  step.token_budget = config_.max_num_batched_tokens;
  schedule_decodes(step);
  schedule_partial_prefills(step);
  if (step.num_preemptions == 0) admit_waiting(step);

  StepPlan plan = build_plan(step);
  in_flight_seq_ids_ = plan.seq_ids;
  pending_samples_.clear();
  for (size_t seq_idx = 0; seq_idx < plan.num_seqs(); ++seq_idx)
    if (plan.needs_logits[seq_idx] != 0) pending_samples_.push_back({plan.seq_ids[seq_idx]});
  step_in_flight_ = !plan.empty();
  return plan;
}

void BatchScheduler::schedule_decodes(StepBuilder& step) {
  for (size_t running_idx = 0; running_idx < running_.size() && step.token_budget > 0;) {
    const int64_t seq_id = running_[running_idx];
    if (sequences_.at(seq_id).num_uncomputed_tokens() != 1) {
      ++running_idx;
      continue;
    }
    if (!make_room(step, seq_id, 1)) {
      preempt(step, seq_id);
      continue;  // running_idx now names the next sequence (or the end)
    }
    schedule_chunk(step, seq_id, 1);
    ++running_idx;
  }
}

void BatchScheduler::schedule_partial_prefills(StepBuilder& step) {
  for (size_t running_idx = 0; running_idx < running_.size() && step.token_budget > 0;
       ++running_idx) {
    const int64_t seq_id = running_[running_idx];
    if (step.scheduled_seq_ids.contains(seq_id)) continue;
    const int64_t num_uncomputed = sequences_.at(seq_id).num_uncomputed_tokens();
    if (num_uncomputed <= 1) continue;  // a decode left out by the budget
    int64_t chunk = std::min(num_uncomputed, step.token_budget);
    make_room(step, seq_id, chunk);
    chunk = std::min(chunk, block_manager_.appendable_tokens(seq_id));
    if (chunk > 0) schedule_chunk(step, seq_id, chunk);
  }
}

void BatchScheduler::admit_waiting(StepBuilder& step) {
  const bool slots = config_.num_state_slots > 0;
  while (!waiting_.empty() && step.token_budget > 0 && num_running() < config_.max_num_seqs &&
         (!slots || !free_slots_.empty())) {
    const int64_t seq_id = waiting_.front();
    Sequence& sequence = sequences_.at(seq_id);
    const int64_t cached_tokens =
        sequence.request.skip_prefix_cache
            ? 0
            : block_manager_.cached_prefix_tokens(sequence.token_ids, sequence.num_tokens() - 1);
    const int64_t chunk = std::min(sequence.num_tokens() - cached_tokens, step.token_budget);
    if (!block_manager_.can_allocate_with_prefix(sequence.token_ids, cached_tokens,
                                                 cached_tokens + chunk))
      return;
    waiting_.pop_front();
    running_.push_back(seq_id);
    block_manager_.allocate_with_prefix(seq_id, sequence.token_ids, cached_tokens, cached_tokens);
    if (slots) {
      slot_of_[seq_id] = *free_slots_.begin();
      free_slots_.erase(free_slots_.begin());
    }
    sequence.num_computed_tokens = cached_tokens;
    schedule_chunk(step, seq_id, chunk);
  }
}

bool BatchScheduler::make_room(StepBuilder& step, int64_t seq_id, int64_t num_new_tokens) {
  while (!block_manager_.can_append(seq_id, num_new_tokens)) {
    auto victim = std::find_if(running_.rbegin(), running_.rend(), [&](int64_t candidate) {
      return candidate == seq_id || !step.scheduled_seq_ids.contains(candidate);
    });
    if (victim == running_.rend() || *victim == seq_id) return false;
    preempt(step, *victim);
  }
  return true;
}

void BatchScheduler::preempt(StepBuilder& step, int64_t seq_id) {
  block_manager_.free(seq_id);
  release_slot(seq_id);
  sequences_.at(seq_id).num_computed_tokens = 0;
  running_.erase(std::find(running_.begin(), running_.end(), seq_id));
  waiting_.push_front(seq_id);
  ++step.num_preemptions;
  ++total_preemptions_;
}

void BatchScheduler::schedule_chunk(StepBuilder& step, int64_t seq_id, int64_t num_new_tokens) {
  Sequence& sequence = sequences_.at(seq_id);
  block_manager_.append_slots(seq_id, num_new_tokens);
  step.chunks.push_back(ScheduledChunk{seq_id, sequence.num_computed_tokens, num_new_tokens});
  step.scheduled_seq_ids.insert(seq_id);
  step.token_budget -= num_new_tokens;
  sequence.num_computed_tokens += num_new_tokens;
}

StepPlan BatchScheduler::build_plan(const StepBuilder& step) const {
  StepPlan plan;
  plan.token_offsets.push_back(0);
  plan.block_table_offsets.push_back(0);
  for (const ScheduledChunk& chunk : step.chunks) {
    const Sequence& sequence = sequences_.at(chunk.seq_id);
    const int64_t end_position = chunk.first_position + chunk.num_tokens;
    plan.seq_ids.push_back(chunk.seq_id);
    plan.needs_logits.push_back(end_position == sequence.num_tokens() ? 1 : 0);
    for (int64_t position = chunk.first_position; position < end_position; ++position) {
      plan.token_ids.push_back(sequence.token_ids[static_cast<size_t>(position)]);
      plan.positions.push_back(position);
    }
    plan.token_offsets.push_back(static_cast<int64_t>(plan.token_ids.size()));
    const std::vector<int32_t>& table = block_manager_.block_table(chunk.seq_id);
    plan.block_tables.insert(plan.block_tables.end(), table.begin(), table.end());
    plan.block_table_offsets.push_back(static_cast<int64_t>(plan.block_tables.size()));
    if (config_.num_state_slots > 0) plan.state_slots.push_back(slot_of_.at(chunk.seq_id));
    plan.num_scheduled_tokens += chunk.num_tokens;
  }
  plan.num_preemptions = step.num_preemptions;
  return plan;
}

void BatchScheduler::on_step_done(std::span<const int32_t> sampled_token_ids) {
  if (!step_in_flight_) throw_error("BatchScheduler: on_step_done() without a scheduled step");
  if (sampled_token_ids.size() != pending_samples_.size())
    throw_error("BatchScheduler: on_step_done() got ", sampled_token_ids.size(),
                " sampled tokens, the step asked logits for ", pending_samples_.size(),
                " sequences");
  step_in_flight_ = false;
  for (int64_t seq_id : in_flight_seq_ids_) {
    if (!block_manager_.has_sequence(seq_id)) continue;  // aborted since schedule()
    const Sequence& sequence = sequences_.at(seq_id);
    block_manager_.cache_full_blocks(seq_id,
                                     std::span<const int32_t>(sequence.token_ids)
                                         .first(static_cast<size_t>(sequence.num_computed_tokens)));
  }
  for (size_t logit_idx = 0; logit_idx < sampled_token_ids.size(); ++logit_idx) {
    if (pending_samples_[logit_idx].aborted) continue;
    const int64_t seq_id = pending_samples_[logit_idx].seq_id;
    Sequence& sequence = sequences_.at(seq_id);
    KEEL_CHECK(sequence.num_uncomputed_tokens() == 0, "sequence ", seq_id,
               " sampled with uncomputed tokens");
    const int32_t token = sampled_token_ids[logit_idx];
    sequence.token_ids.push_back(token);
    const std::vector<int32_t>& stop_ids = sequence.request.stop_token_ids;
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end())
      finish(seq_id, FinishReason::kStop);
    else if (sequence.num_output_tokens() >= sequence.request.max_new_tokens)
      finish(seq_id, FinishReason::kLength);
  }
  pending_samples_.clear();
  in_flight_seq_ids_.clear();
}

bool BatchScheduler::abort(int64_t seq_id) {
  if (!sequences_.contains(seq_id)) return false;
  finish(seq_id, FinishReason::kAborted);
  for (PendingSample& pending : pending_samples_)
    if (pending.seq_id == seq_id) pending.aborted = true;
  return true;
}

void BatchScheduler::finish(int64_t seq_id, FinishReason reason) {
  if (block_manager_.has_sequence(seq_id)) block_manager_.free(seq_id);
  release_slot(seq_id);
  std::erase(running_, seq_id);
  std::erase(waiting_, seq_id);
  auto found = sequences_.find(seq_id);
  const Sequence& sequence = found->second;
  const auto prompt_length = static_cast<std::ptrdiff_t>(sequence.request.prompt_token_ids.size());
  finished_.push_back(FinishedRequest{
      seq_id,
      std::vector<int32_t>(sequence.token_ids.begin() + prompt_length, sequence.token_ids.end()),
      reason});
  sequences_.erase(found);
}

std::vector<FinishedRequest> BatchScheduler::take_finished() {
  return std::exchange(finished_, {});
}

}  // namespace keel
