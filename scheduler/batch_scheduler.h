// Continuous-batching scheduler (vLLM-v1-like) over the paged KV block manager.
//
// A sequence is its prompt plus the tokens generated so far; num_computed_tokens of them have KV
// in the cache. Each step a sequence is fed tokens [num_computed, num_computed + n) at those
// absolute positions, and asks for logits when that reaches its last token. There is no separate
// prefill/decode state: decode is the case "one token left to compute".
//
// One step, under max_num_batched_tokens and max_num_seqs:
//   1. every running decoding sequence gets its one token (oldest first);
//   2. running sequences part-way through prefill get the next chunk (oldest first);
//   3. waiting requests are admitted FCFS with a first chunk while blocks allow (not in a step
//      that preempted, and never skipping the head of the queue).
// With prefix caching on, an admitted sequence starts at the end of its longest cached run of
// full blocks (always leaving at least its last token to compute); blocks are filed in the cache
// when the step that computed them is done.
// When a running sequence needs a block and none is free, the most recently admitted running
// sequence not yet scheduled this step is preempted by recompute: its blocks are freed,
// num_computed resets to 0 and it returns to the front of the waiting queue, to re-prefill its
// prompt and generated tokens later.
//
// schedule() and on_step_done() alternate. The plan depends only on the sequence of calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <set>
#include <span>
#include <vector>

#include "scheduler/block_manager.h"

namespace keel {

struct SchedulerConfig {
  int32_t num_kv_blocks = 0;
  int32_t block_size = BlockManager::kDefaultBlockSize;
  int64_t max_num_batched_tokens = 2048;  // tokens fed to the model per step
  int64_t max_num_seqs = 256;             // running sequences at once
  bool enable_prefix_caching = false;     // admissions skip leading blocks already cached
  // Hybrid (recurrent) models: state slots, one per running sequence; 0 for models without
  // recurrent layers. A sequence is admitted only with a free slot, holds it while running and
  // frees it when it finishes, is aborted or is preempted (recompute restarts from position 0,
  // i.e. from a zero state). Prefix caching cannot be combined with slots: a cached prefix's
  // blocks do not hold the recurrent state at their end.
  int32_t num_state_slots = 0;
};

struct Request {
  int64_t seq_id = 0;
  std::vector<int32_t> prompt_token_ids;
  int64_t max_new_tokens = 0;
  std::vector<int32_t> stop_token_ids;  // generation ends after emitting any of these (e.g. EOS)
  // Compute the whole prompt even where the prefix cache holds it (its logits are wanted).
  bool skip_prefix_cache = false;
};

// One engine step, flat so it can be serialised and broadcast to ranks as it is. Sequence i
// feeds token_ids / positions [token_offsets[i], token_offsets[i + 1]) and uses
// block_tables [block_table_offsets[i], block_table_offsets[i + 1]).
struct StepPlan {
  std::vector<int64_t> seq_ids;              // [num_seqs]
  std::vector<int32_t> needs_logits;         // [num_seqs] 1 when the chunk ends the sequence
  std::vector<int64_t> token_offsets;        // [num_seqs + 1]
  std::vector<int32_t> token_ids;            // [num_tokens]
  std::vector<int64_t> positions;            // [num_tokens] absolute positions
  std::vector<int64_t> block_table_offsets;  // [num_seqs + 1]
  std::vector<int32_t> block_tables;         // concatenated block tables
  std::vector<int32_t> state_slots;          // [num_seqs] when the config has state slots
  int64_t num_scheduled_tokens = 0;
  int64_t num_preemptions = 0;  // sequences preempted while building this plan

  size_t num_seqs() const { return seq_ids.size(); }
  bool empty() const { return seq_ids.empty(); }
  std::span<const int32_t> token_ids_of(size_t seq_idx) const;
  std::span<const int64_t> positions_of(size_t seq_idx) const;
  std::span<const int32_t> block_table_of(size_t seq_idx) const;

  bool operator==(const StepPlan&) const = default;
};

enum class FinishReason : uint8_t { kLength, kStop, kAborted };

struct FinishedRequest {
  int64_t seq_id = 0;
  std::vector<int32_t> output_token_ids;
  FinishReason reason = FinishReason::kLength;
};

class BatchScheduler {
 public:
  // Throws keel::Error on a config that can never schedule anything.
  explicit BatchScheduler(const SchedulerConfig& config);

  // Queues a request at the back of the waiting queue. Throws keel::Error on a duplicate live
  // id, an empty prompt, max_new_tokens < 1, or a request whose full length (prompt +
  // max_new_tokens) would not fit in the whole block pool.
  void add_request(Request request);

  // Builds the next step. Throws keel::Error when the previous step is not done yet.
  StepPlan schedule();
  // sampled_token_ids: one token per plan sequence with needs_logits, in plan order. Entries of
  // sequences aborted since schedule() are ignored. Throws keel::Error on a count mismatch or
  // when no step is in flight.
  void on_step_done(std::span<const int32_t> sampled_token_ids);

  // Drops a waiting or running request at once and frees its blocks; returns false for an
  // unknown or already finished id. The request is reported finished with kAborted.
  bool abort(int64_t seq_id);

  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }
  bool step_in_flight() const { return step_in_flight_; }
  int64_t total_preemptions() const { return total_preemptions_; }
  // Requests finished (length, stop or abort) since the last take_finished(), in finish order.
  std::vector<FinishedRequest> take_finished();

  const BlockManager& block_manager() const { return block_manager_; }
  // Recurrent-state slots held by running sequences (0 without slots).
  int32_t num_used_state_slots() const { return static_cast<int32_t>(slot_of_.size()); }
  const SchedulerConfig& config() const { return config_; }

 private:
  struct Sequence {
    Request request;
    std::vector<int32_t> token_ids;  // prompt, then generated tokens
    int64_t num_computed_tokens = 0;

    int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }
    int64_t num_uncomputed_tokens() const { return num_tokens() - num_computed_tokens; }
    int64_t num_output_tokens() const;
  };
  struct ScheduledChunk {
    int64_t seq_id = 0;
    int64_t first_position = 0;
    int64_t num_tokens = 0;
  };
  struct StepBuilder;

  void schedule_decodes(StepBuilder& step);
  void schedule_partial_prefills(StepBuilder& step);
  void admit_waiting(StepBuilder& step);
  // Frees blocks by preempting the youngest running sequences not yet in `step` (other than
  // seq_id) until seq_id can grow by num_new_tokens; false if that is impossible.
  bool make_room(StepBuilder& step, int64_t seq_id, int64_t num_new_tokens);
  void preempt(StepBuilder& step, int64_t seq_id);
  void schedule_chunk(StepBuilder& step, int64_t seq_id, int64_t num_new_tokens);
  StepPlan build_plan(const StepBuilder& step) const;
  void finish(int64_t seq_id, FinishReason reason);

  SchedulerConfig config_;
  BlockManager block_manager_;
  std::map<int64_t, Sequence> sequences_;  // every waiting or running sequence
  std::deque<int64_t> waiting_;            // FCFS; preempted sequences return to the front
  std::vector<int64_t> running_;           // in admission order, oldest first
  std::vector<FinishedRequest> finished_;
  bool step_in_flight_ = false;
  // Sequences the in-flight step asked logits for, in plan order; aborted ones are flagged so a
  // late sample never reaches a new request reusing the id.
  struct PendingSample {
    int64_t seq_id = 0;
    bool aborted = false;
  };
  std::vector<PendingSample> pending_samples_;
  std::vector<int64_t> in_flight_seq_ids_;  // every sequence of the in-flight step
  int64_t total_preemptions_ = 0;
  // Recurrent-state slots: free ones (lowest first) and the slot of each running sequence.
  std::set<int32_t> free_slots_;
  std::map<int64_t, int32_t> slot_of_;
  void release_slot(int64_t seq_id);
};

}  // namespace keel
