// Tests for the continuous-batching scheduler (scheduler/batch_scheduler.h).
//
// Most tests run the scheduler through a Harness that keeps its own shadow of every request
// (the tokens it should hold, how many have been fed) and checks each StepPlan against it: token
// budget and max_num_seqs respected, positions contiguous and absolute (restarting at 0 only
// after a preemption, and then re-feeding the prompt plus the generated tokens), logits asked
// exactly when a chunk reaches a sequence's last token, slot mapping and block tables consistent
// with the block manager, and no block in two tables. The fake sampler's token depends only on
// (seq_id, position), so every request's output is known in advance whatever the scheduling.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "kernels/base/check.h"
#include "scheduler/batch_scheduler.h"

namespace keel {
namespace {

int32_t fake_sample(int64_t seq_id, int64_t position) {
  return static_cast<int32_t>(100 + (seq_id * 7919 + position * 104729) % 50);
}

std::vector<int32_t> make_prompt(int64_t seq_id, int64_t length) {
  std::vector<int32_t> prompt;
  for (int64_t position = 0; position < length; ++position)
    prompt.push_back(static_cast<int32_t>(1000 + seq_id * 100 + position % 100));
  return prompt;
}

Request make_request(int64_t seq_id, int64_t prompt_length, int64_t max_new_tokens,
                     std::vector<int32_t> stop_token_ids = {}) {
  return Request{seq_id, make_prompt(seq_id, prompt_length), max_new_tokens,
                 std::move(stop_token_ids)};
}

// The output fake_sample produces for a request, stopping at its stop ids.
std::vector<int32_t> expected_output(const Request& request) {
  std::vector<int32_t> output;
  const auto prompt_length = static_cast<int64_t>(request.prompt_token_ids.size());
  while (static_cast<int64_t>(output.size()) < request.max_new_tokens) {
    int32_t token =
        fake_sample(request.seq_id, prompt_length + static_cast<int64_t>(output.size()));
    output.push_back(token);
    const auto& stop_ids = request.stop_token_ids;
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) break;
  }
  return output;
}

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

class Harness {
 public:
  explicit Harness(const SchedulerConfig& config) : scheduler(config), config_(config) {}

  void add(const Request& request) {
    scheduler.add_request(request);
    Shadow& shadow = live_[request.seq_id];
    shadow.request = request;
    shadow.tokens = request.prompt_token_ids;
    ++num_added;
  }

  bool abort(int64_t seq_id) {
    bool was_live = scheduler.abort(seq_id);
    EXPECT_EQ(was_live, live_.contains(seq_id));
    if (was_live) {
      aborted_ids.insert(seq_id);
      collect_finished();
    }
    return was_live;
  }

  // schedule(), check, optionally abort `abort_in_flight` before the samples come back,
  // on_step_done(), then collect what finished.
  StepPlan step(int64_t abort_in_flight = -1) {
    StepPlan plan = scheduler.schedule();
    check_plan(plan);
    check_block_accounting();
    if (abort_in_flight >= 0) abort(abort_in_flight);
    std::vector<int32_t> samples;
    for (size_t seq_idx = 0; seq_idx < plan.num_seqs(); ++seq_idx) {
      if (plan.needs_logits[seq_idx] == 0) continue;
      const int64_t seq_id = plan.seq_ids[seq_idx];
      const int64_t position = plan.positions_of(seq_idx).back() + 1;
      samples.push_back(fake_sample(seq_id, position));
      if (live_.contains(seq_id) && !aborted_ids.contains(seq_id))
        live_[seq_id].tokens.push_back(samples.back());
    }
    if (!plan.empty()) scheduler.on_step_done(samples);
    collect_finished();
    check_block_accounting();
    ++num_steps;
    total_preemptions_seen += plan.num_preemptions;
    return plan;
  }

  // Steps until nothing is left; fails the test on a livelock.
  void run_to_completion(int64_t max_steps = 100000) {
    for (int64_t steps = 0; scheduler.has_unfinished(); ++steps) {
      ASSERT_LT(steps, max_steps) << "scheduler made no progress";
      step();
      if (testing::Test::HasFatalFailure()) return;
    }
  }

  // After the run: every request finished once, with the output fake_sample dictates, and the
  // tokens fed add up to what its KV cache ended with plus what preemption threw away.
  void expect_all_accounted_for() {
    EXPECT_TRUE(live_.empty());
    EXPECT_EQ(static_cast<int64_t>(results.size()), num_added);
    EXPECT_EQ(scheduler.num_waiting(), 0);
    EXPECT_EQ(scheduler.num_running(), 0);
    EXPECT_EQ(scheduler.block_manager().num_free_blocks(), config_.num_kv_blocks);
    EXPECT_EQ(scheduler.block_manager().num_sequences(), 0);
    EXPECT_EQ(total_preemptions_seen, scheduler.total_preemptions());
    int64_t total_restarts = 0;
    for (const auto& [seq_id, result] : results) total_restarts += result.restarts;
    EXPECT_LE(total_restarts, scheduler.total_preemptions());
    if (aborted_ids.empty() && !config_.enable_prefix_caching) {
      EXPECT_EQ(total_restarts, scheduler.total_preemptions());
    }
  }

  struct Result {
    FinishedRequest finished;
    int64_t fed_tokens = 0;
    int64_t restarts = 0;
  };

  BatchScheduler scheduler;
  std::map<int64_t, Result> results;
  std::set<int64_t> aborted_ids;
  int64_t num_added = 0;
  int64_t num_steps = 0;
  int64_t total_preemptions_seen = 0;
  int64_t total_skipped_tokens = 0;

 private:
  struct Shadow {
    Request request;
    std::vector<int32_t> tokens;  // prompt + sampled so far
    int64_t num_computed = 0;
    int64_t fed_tokens = 0;
    int64_t recomputed_tokens = 0;  // computed again after a preemption dropped them
    int64_t skipped_tokens = 0;     // never fed: found in the prefix cache
    int64_t restarts = 0;
  };

  // Identifies the KV of token `position` of a sequence: it depends on every token up to there.
  static std::vector<uint64_t> prefix_hashes(const std::vector<int32_t>& tokens) {
    std::vector<uint64_t> hashes;
    uint64_t hash = 1469598103934665603ull;
    for (int32_t token : tokens) {
      hash = (hash ^ static_cast<uint32_t>(token)) * 1099511628211ull;
      hashes.push_back(hash);
    }
    return hashes;
  }

  void check_plan(const StepPlan& plan) {
    const size_t num_seqs = plan.num_seqs();
    ASSERT_EQ(plan.needs_logits.size(), num_seqs);
    ASSERT_EQ(plan.token_offsets.size(), num_seqs + 1);
    ASSERT_EQ(plan.block_table_offsets.size(), num_seqs + 1);
    ASSERT_EQ(plan.positions.size(), plan.token_ids.size());
    EXPECT_EQ(plan.num_scheduled_tokens, static_cast<int64_t>(plan.token_ids.size()));
    EXPECT_LE(plan.num_scheduled_tokens, config_.max_num_batched_tokens);
    EXPECT_LE(static_cast<int64_t>(num_seqs), config_.max_num_seqs);
    EXPECT_LE(scheduler.num_running(), config_.max_num_seqs);

    const int32_t block_size = config_.block_size;
    const bool caching = config_.enable_prefix_caching;
    std::set<int64_t> seq_ids_in_plan;
    std::set<int32_t> blocks_in_plan;
    std::vector<std::pair<int64_t, uint64_t>> kv_writes;  // (slot, prefix hash)
    for (size_t seq_idx = 0; seq_idx < num_seqs; ++seq_idx) {
      const int64_t seq_id = plan.seq_ids[seq_idx];
      ASSERT_TRUE(seq_ids_in_plan.insert(seq_id).second) << "seq " << seq_id << " twice";
      ASSERT_TRUE(live_.contains(seq_id)) << "seq " << seq_id << " is not live";
      Shadow& shadow = live_[seq_id];
      auto positions = plan.positions_of(seq_idx);
      auto token_ids = plan.token_ids_of(seq_idx);
      auto table = plan.block_table_of(seq_idx);
      ASSERT_FALSE(positions.empty());
      const int64_t first = positions.front();
      // Only admissions start at position 0, and a step that preempted admits nothing.
      if (plan.num_preemptions > 0 && !caching) {
        EXPECT_NE(first, 0) << "seq " << seq_id << " admitted";
      }
      if (first != shadow.num_computed) {
        // (Re)admitted after a preemption, at 0 or, with caching, after whole cached blocks.
        if (!caching) {
          EXPECT_EQ(first, 0) << "seq " << seq_id;
        }
        EXPECT_EQ(first % block_size, 0) << "seq " << seq_id;
        if (shadow.num_computed > 0) ++shadow.restarts;
        shadow.recomputed_tokens += std::max<int64_t>(0, shadow.num_computed - first);
        shadow.skipped_tokens += std::max<int64_t>(0, first - shadow.num_computed);
        total_skipped_tokens += std::max<int64_t>(0, first - shadow.num_computed);
        shadow.num_computed = first;
      }
      const int64_t end = first + static_cast<int64_t>(positions.size());
      ASSERT_LE(end, static_cast<int64_t>(shadow.tokens.size())) << "seq " << seq_id;
      EXPECT_EQ(plan.needs_logits[seq_idx],
                end == static_cast<int64_t>(shadow.tokens.size()) ? 1 : 0);
      EXPECT_EQ(static_cast<int64_t>(table.size()), ceil_div(end, block_size));
      const std::vector<uint64_t> hashes = prefix_hashes(shadow.tokens);
      auto slot_of = [&](int64_t position) {
        const int32_t block_id = table[static_cast<size_t>(position / block_size)];
        return int64_t{block_id} * block_size + position % block_size;
      };
      // The KV this step attends to holds exactly this sequence's prefix.
      for (int64_t position = 0; position < first; ++position) {
        auto written = kv_.find(slot_of(position));
        ASSERT_NE(written, kv_.end()) << "seq " << seq_id << " position " << position;
        EXPECT_EQ(written->second, hashes[static_cast<size_t>(position)])
            << "seq " << seq_id << " reads stale KV at position " << position;
      }
      for (size_t token_idx = 0; token_idx < positions.size(); ++token_idx) {
        const int64_t position = first + static_cast<int64_t>(token_idx);
        EXPECT_EQ(positions[token_idx], position);
        EXPECT_EQ(token_ids[token_idx], shadow.tokens[static_cast<size_t>(position)]);
        kv_writes.emplace_back(slot_of(position), hashes[static_cast<size_t>(position)]);
        // Never written while another sequence shares the block.
        const int32_t block_id = table[static_cast<size_t>(position / block_size)];
        EXPECT_EQ(scheduler.block_manager().ref_count(block_id), 1) << "block " << block_id;
      }
      for (int32_t block_id : table) {
        EXPECT_GE(block_id, 0);
        EXPECT_LT(block_id, config_.num_kv_blocks);
        const bool first_use_in_plan = blocks_in_plan.insert(block_id).second;
        if (!caching) {
          EXPECT_TRUE(first_use_in_plan) << "block " << block_id << " shared";
        }
      }
      shadow.num_computed = end;
      shadow.fed_tokens += static_cast<int64_t>(positions.size());
    }
    std::set<int64_t> written_slots;
    for (const auto& [slot, hash] : kv_writes) {
      EXPECT_TRUE(written_slots.insert(slot).second) << "slot " << slot << " written twice";
      kv_[slot] = hash;
    }
  }

  void check_block_accounting() {
    const BlockManager& blocks = scheduler.block_manager();
    EXPECT_EQ(blocks.num_free_blocks() + blocks.num_used_blocks(), blocks.num_blocks());
    EXPECT_EQ(blocks.num_sequences(), scheduler.num_running());
    std::map<int32_t, int32_t> tables_holding;  // block -> number of tables it is in
    for (const auto& [seq_id, shadow] : live_) {
      if (!blocks.has_sequence(seq_id)) continue;
      const std::vector<int32_t>& table = blocks.block_table(seq_id);
      for (size_t block_idx = 0; block_idx < table.size(); ++block_idx)
        ++tables_holding[table[block_idx]];
    }
    for (const auto& [seq_id, shadow] : live_) {
      if (!blocks.has_sequence(seq_id)) continue;
      const std::vector<int32_t>& table = blocks.block_table(seq_id);
      for (size_t block_idx = 0; block_idx < table.size(); ++block_idx) {
        const int32_t block_id = table[block_idx];
        EXPECT_EQ(blocks.ref_count(block_id), tables_holding[block_id]);
        if (tables_holding[block_id] == 1) continue;
        // Only the prefix cache shares blocks, and only full ones.
        EXPECT_TRUE(config_.enable_prefix_caching) << "block " << block_id << " shared";
        EXPECT_LE(static_cast<int64_t>(block_idx + 1) * config_.block_size,
                  blocks.num_tokens(seq_id));
      }
    }
    EXPECT_EQ(static_cast<int64_t>(tables_holding.size()), blocks.num_used_blocks());
  }

  void collect_finished() {
    for (FinishedRequest& finished : scheduler.take_finished()) {
      auto found = live_.find(finished.seq_id);
      ASSERT_NE(found, live_.end()) << "seq " << finished.seq_id << " finished twice";
      const Shadow& shadow = found->second;
      const Request& request = shadow.request;
      const bool was_aborted = aborted_ids.contains(finished.seq_id);
      EXPECT_EQ(finished.reason == FinishReason::kAborted, was_aborted);
      const std::vector<int32_t> expected = expected_output(request);
      if (!was_aborted) {
        EXPECT_EQ(finished.output_token_ids, expected) << "seq " << finished.seq_id;
        const bool stopped = !expected.empty() &&
                             std::find(request.stop_token_ids.begin(), request.stop_token_ids.end(),
                                       expected.back()) != request.stop_token_ids.end();
        EXPECT_EQ(finished.reason, stopped ? FinishReason::kStop : FinishReason::kLength);
        // Every fed token is either in the final KV cache or was thrown away by a preemption.
        const int64_t final_kv_tokens = static_cast<int64_t>(request.prompt_token_ids.size() +
                                                             finished.output_token_ids.size()) -
                                        1;
        EXPECT_EQ(shadow.fed_tokens + shadow.skipped_tokens,
                  final_kv_tokens + shadow.recomputed_tokens);
      } else {
        ASSERT_LE(finished.output_token_ids.size(), expected.size());
        EXPECT_TRUE(std::equal(finished.output_token_ids.begin(), finished.output_token_ids.end(),
                               expected.begin()));
      }
      results[finished.seq_id] = Result{finished, shadow.fed_tokens, shadow.restarts};
      live_.erase(found);
    }
  }

  SchedulerConfig config_;
  std::map<int64_t, Shadow> live_;
  std::map<int64_t, uint64_t> kv_;  // flat slot -> prefix hash of the token whose KV it holds
};

SchedulerConfig make_config(int32_t num_kv_blocks, int32_t block_size,
                            int64_t max_num_batched_tokens, int64_t max_num_seqs) {
  SchedulerConfig config;
  config.num_kv_blocks = num_kv_blocks;
  config.block_size = block_size;
  config.max_num_batched_tokens = max_num_batched_tokens;
  config.max_num_seqs = max_num_seqs;
  return config;
}

TEST(BatchScheduler, SingleRequestPrefillsThenDecodesOneTokenPerStep) {
  Harness harness(make_config(16, 4, 64, 8));
  harness.add(make_request(1, 10, 5));
  StepPlan prefill = harness.step();
  ASSERT_EQ(prefill.num_seqs(), 1u);
  EXPECT_EQ(prefill.num_scheduled_tokens, 10);
  EXPECT_EQ(prefill.needs_logits[0], 1);
  EXPECT_EQ(prefill.positions.front(), 0);
  for (int64_t decode = 0; decode < 4; ++decode) {
    StepPlan plan = harness.step();
    ASSERT_EQ(plan.num_seqs(), 1u);
    EXPECT_EQ(plan.num_scheduled_tokens, 1);
    EXPECT_EQ(plan.positions[0], 10 + decode);
    EXPECT_EQ(plan.token_ids[0], fake_sample(1, 10 + decode));
    EXPECT_EQ(plan.needs_logits[0], 1);
  }
  EXPECT_FALSE(harness.scheduler.has_unfinished());
  ASSERT_TRUE(harness.results.contains(1));
  EXPECT_EQ(harness.results[1].finished.output_token_ids.size(), 5u);
  EXPECT_EQ(harness.results[1].finished.reason, FinishReason::kLength);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, ChunkedPrefillSplitsALongPromptAndOnlyTheLastChunkAsksForLogits) {
  Harness harness(make_config(16, 4, 8, 8));
  harness.add(make_request(1, 20, 2));
  const std::vector<int64_t> expected_chunks = {8, 8, 4};
  for (size_t chunk_idx = 0; chunk_idx < expected_chunks.size(); ++chunk_idx) {
    StepPlan plan = harness.step();
    ASSERT_EQ(plan.num_seqs(), 1u);
    EXPECT_EQ(plan.num_scheduled_tokens, expected_chunks[chunk_idx]);
    EXPECT_EQ(plan.positions.front(), static_cast<int64_t>(chunk_idx) * 8);
    EXPECT_EQ(plan.needs_logits[0], chunk_idx + 1 == expected_chunks.size() ? 1 : 0);
  }
  harness.run_to_completion();
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, DecodesComeFirstAndPrefillFillsTheRemainingBudget) {
  Harness harness(make_config(64, 4, 8, 8));
  harness.add(make_request(1, 3, 10));
  harness.add(make_request(2, 3, 10));
  harness.step();  // both prompts in one step (6 tokens)
  harness.add(make_request(3, 30, 3));
  StepPlan plan = harness.step();
  ASSERT_EQ(plan.num_seqs(), 3u);
  EXPECT_EQ(plan.seq_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(plan.token_ids_of(0).size(), 1u);
  EXPECT_EQ(plan.token_ids_of(1).size(), 1u);
  EXPECT_EQ(plan.token_ids_of(2).size(), 6u);
  EXPECT_EQ(plan.needs_logits, (std::vector<int32_t>{1, 1, 0}));
  // While request 3 prefills in chunks, 1 and 2 keep decoding every step.
  for (int step = 0; step < 4; ++step) {
    plan = harness.step();
    ASSERT_GE(plan.num_seqs(), 2u);
    EXPECT_EQ(plan.seq_ids[0], 1);
    EXPECT_EQ(plan.seq_ids[1], 2);
    EXPECT_EQ(plan.token_ids_of(0).size(), 1u);
    EXPECT_EQ(plan.token_ids_of(1).size(), 1u);
    EXPECT_EQ(plan.num_scheduled_tokens, 8);
  }
  harness.run_to_completion();
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, MaxNumSeqsLimitsTheRunningSet) {
  Harness harness(make_config(64, 4, 64, 2));
  for (int64_t seq_id = 0; seq_id < 5; ++seq_id) harness.add(make_request(seq_id, 4, 3));
  StepPlan plan = harness.step();
  EXPECT_EQ(plan.seq_ids, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(harness.scheduler.num_running(), 2);
  EXPECT_EQ(harness.scheduler.num_waiting(), 3);
  harness.run_to_completion();
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, StopTokenEndsTheRequestEarly) {
  const int32_t stop_token = fake_sample(7, 5 + 2);  // the third generated token
  Harness harness(make_config(16, 4, 64, 8));
  harness.add(make_request(7, 5, 10, {stop_token}));
  harness.run_to_completion();
  const FinishedRequest& finished = harness.results[7].finished;
  EXPECT_EQ(finished.reason, FinishReason::kStop);
  ASSERT_LE(finished.output_token_ids.size(), 3u);
  EXPECT_EQ(finished.output_token_ids.back(), stop_token);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, PreemptsTheYoungestUnderATinyPoolAndItResumesToTheSameOutput) {
  // Each request ends at 8 + 12 - 1 = 19 KV tokens = 5 blocks; two cannot both finish in 6.
  Harness harness(make_config(6, 4, 64, 8));
  harness.add(make_request(1, 8, 12));
  harness.add(make_request(2, 8, 12));
  StepPlan first = harness.step();
  EXPECT_EQ(first.seq_ids, (std::vector<int64_t>{1, 2}));
  int64_t first_preemption_step = -1;
  for (int64_t step = 0; harness.scheduler.has_unfinished(); ++step) {
    ASSERT_LT(step, 1000);
    StepPlan plan = harness.step();
    if (plan.num_preemptions > 0 && first_preemption_step < 0) {
      first_preemption_step = step;
      // The older request keeps decoding; the younger one went back to the front of waiting.
      EXPECT_EQ(plan.seq_ids, (std::vector<int64_t>{1}));
      EXPECT_EQ(harness.scheduler.num_waiting(), 1);
    }
  }
  EXPECT_GE(first_preemption_step, 0);
  EXPECT_GE(harness.scheduler.total_preemptions(), 1);
  ASSERT_EQ(harness.results.size(), 2u);
  EXPECT_GE(harness.results[2].restarts, 1);
  for (int64_t seq_id : {1, 2})
    EXPECT_EQ(harness.results[seq_id].finished.output_token_ids.size(), 12u);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, PreemptedRequestGoesBackToTheFrontOfTheWaitingQueue) {
  Harness harness(make_config(6, 4, 64, 2));
  harness.add(make_request(1, 8, 12));
  harness.add(make_request(2, 8, 12));
  harness.add(make_request(3, 4, 2));  // waits: max_num_seqs is 2
  std::vector<int64_t> admissions;     // sequences starting at position 0, in order
  bool preempted = false;
  for (int64_t step = 0; harness.scheduler.has_unfinished(); ++step) {
    ASSERT_LT(step, 1000);
    StepPlan plan = harness.step();
    preempted = preempted || plan.num_preemptions > 0;
    for (size_t seq_idx = 0; seq_idx < plan.num_seqs(); ++seq_idx)
      if (preempted && plan.positions_of(seq_idx).front() == 0)
        admissions.push_back(plan.seq_ids[seq_idx]);
  }
  ASSERT_TRUE(preempted);
  ASSERT_FALSE(admissions.empty());
  EXPECT_EQ(admissions.front(), 2);  // re-admitted ahead of request 3, which arrived earlier
  harness.expect_all_accounted_for();
}

// Recurrent-state slots (hybrid models): a running sequence keeps one slot from admission to
// its end; a step never names a slot twice; a chunk that continues a sequence (first position
// > 0) uses the slot its earlier chunks used; admission waits for a free slot; preemption and
// finishing give the slot back.
void run_with_state_slots(Harness& harness, int32_t num_slots, int64_t& max_slots_in_use) {
  std::map<int64_t, int32_t> slot_of;
  for (int64_t step = 0; harness.scheduler.has_unfinished(); ++step) {
    ASSERT_LT(step, 2000);
    StepPlan plan = harness.step();
    ASSERT_EQ(plan.state_slots.size(), plan.num_seqs());
    std::set<int32_t> used;
    for (size_t seq_idx = 0; seq_idx < plan.num_seqs(); ++seq_idx) {
      const int32_t slot = plan.state_slots[seq_idx];
      ASSERT_GE(slot, 0);
      ASSERT_LT(slot, num_slots);
      EXPECT_TRUE(used.insert(slot).second) << "slot " << slot << " twice in one step";
      const int64_t seq_id = plan.seq_ids[seq_idx];
      if (plan.positions_of(seq_idx).front() > 0) {
        ASSERT_TRUE(slot_of.contains(seq_id));
        EXPECT_EQ(slot_of[seq_id], slot) << "sequence " << seq_id << " changed slot mid-run";
      }
      slot_of[seq_id] = slot;
    }
    EXPECT_LE(harness.scheduler.num_used_state_slots(), num_slots);
    EXPECT_LE(harness.scheduler.num_running(), num_slots);
    max_slots_in_use =
        std::max<int64_t>(max_slots_in_use, harness.scheduler.num_used_state_slots());
  }
  EXPECT_EQ(harness.scheduler.num_used_state_slots(), 0);
}

TEST(BatchScheduler, StateSlotsBoundAdmissionAndStayWithTheirSequence) {
  SchedulerConfig config = make_config(64, 4, 64, 8);
  config.num_state_slots = 3;
  Harness harness(config);
  for (int64_t seq_id = 0; seq_id < 7; ++seq_id) harness.add(make_request(seq_id, 3 + seq_id, 4));
  int64_t max_in_use = 0;
  run_with_state_slots(harness, 3, max_in_use);
  EXPECT_EQ(max_in_use, 3);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, PreemptionReturnsTheStateSlot) {
  SchedulerConfig config = make_config(6, 4, 64, 8);
  config.num_state_slots = 2;
  Harness harness(config);
  harness.add(make_request(1, 8, 12));
  harness.add(make_request(2, 8, 12));
  harness.add(make_request(3, 4, 3));
  int64_t max_in_use = 0;
  run_with_state_slots(harness, 2, max_in_use);
  EXPECT_GE(harness.scheduler.total_preemptions(), 1);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, StateSlotsRefusePrefixCaching) {
  SchedulerConfig config = make_config(16, 4, 64, 8);
  config.num_state_slots = 2;
  config.enable_prefix_caching = true;
  EXPECT_THROW(BatchScheduler{config}, Error);
}

TEST(BatchScheduler, PrefixCachingSkipsPromptBlocksAnEarlierRequestComputed) {
  SchedulerConfig config = make_config(32, 4, 64, 8);
  config.enable_prefix_caching = true;
  Harness harness(config);
  Request first = make_request(1, 10, 3);
  Request second = make_request(2, 14, 3);
  std::copy_n(first.prompt_token_ids.begin(), 9, second.prompt_token_ids.begin());
  Request same_as_first = make_request(3, 10, 3);
  same_as_first.prompt_token_ids = first.prompt_token_ids;
  harness.add(first);
  harness.step();  // computes 10 tokens; blocks 0-3 and 4-7 are filed once the step is done
  harness.add(second);
  harness.add(same_as_first);
  StepPlan plan = harness.step();
  ASSERT_EQ(plan.seq_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(plan.positions_of(1).front(), 8);  // tokens 0-7 come from the cache
  EXPECT_EQ(plan.token_ids_of(1).size(), 6u);
  EXPECT_EQ(plan.positions_of(2).front(), 8);  // a full match still computes its tail
  EXPECT_EQ(plan.block_table_of(1)[0], plan.block_table_of(0)[0]);
  EXPECT_EQ(plan.block_table_of(2)[1], plan.block_table_of(0)[1]);
  harness.run_to_completion();
  EXPECT_EQ(harness.total_skipped_tokens, 16);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, AbortFreesBlocksAtOnce) {
  Harness harness(make_config(32, 4, 64, 8));
  harness.add(make_request(1, 10, 20));
  harness.add(make_request(2, 10, 20));
  harness.step();
  const int32_t free_before = harness.scheduler.block_manager().num_free_blocks();
  EXPECT_TRUE(harness.abort(1));
  EXPECT_EQ(harness.scheduler.block_manager().num_free_blocks(), free_before + 3);
  EXPECT_EQ(harness.scheduler.num_running(), 1);
  EXPECT_FALSE(harness.abort(1));
  EXPECT_FALSE(harness.abort(99));
  harness.add(make_request(3, 4, 4));
  EXPECT_TRUE(harness.abort(3));  // still waiting
  EXPECT_EQ(harness.scheduler.num_waiting(), 0);
  // Aborted between schedule() and on_step_done(): its sample is dropped.
  harness.step(/*abort_in_flight=*/2);
  EXPECT_FALSE(harness.scheduler.has_unfinished());
  for (int64_t seq_id : {1, 2, 3})
    EXPECT_EQ(harness.results[seq_id].finished.reason, FinishReason::kAborted);
  harness.expect_all_accounted_for();
}

TEST(BatchScheduler, AbortedIdCanBeReusedWhileItsSampleIsInFlight) {
  BatchScheduler scheduler(make_config(16, 4, 64, 8));
  scheduler.add_request(make_request(1, 4, 3));
  StepPlan plan = scheduler.schedule();
  ASSERT_EQ(plan.needs_logits, (std::vector<int32_t>{1}));
  EXPECT_TRUE(scheduler.abort(1));
  scheduler.add_request(make_request(1, 6, 3));
  const std::vector<int32_t> stale_sample = {123};
  scheduler.on_step_done(stale_sample);
  StepPlan next = scheduler.schedule();
  ASSERT_EQ(next.num_seqs(), 1u);
  EXPECT_EQ(next.num_scheduled_tokens, 6);  // the new request's prompt, untouched by 123
  EXPECT_EQ(next.positions.front(), 0);
}

TEST(BatchScheduler, RejectsMisuse) {
  EXPECT_THROW(BatchScheduler(make_config(0, 4, 8, 8)), Error);
  EXPECT_THROW(BatchScheduler(make_config(8, 4, 0, 8)), Error);
  EXPECT_THROW(BatchScheduler(make_config(8, 4, 8, 0)), Error);
  BatchScheduler scheduler(make_config(4, 4, 64, 8));
  EXPECT_THROW(scheduler.add_request(make_request(1, 0, 4)), Error);
  EXPECT_THROW(scheduler.add_request(make_request(1, 4, 0)), Error);
  EXPECT_THROW(scheduler.add_request(make_request(1, 10, 8)), Error);  // 17 KV tokens > 16
  scheduler.add_request(make_request(1, 10, 7));                       // 16 fit exactly
  EXPECT_THROW(scheduler.add_request(make_request(1, 2, 2)), Error);   // duplicate id
  const std::vector<int32_t> no_samples;
  EXPECT_THROW(scheduler.on_step_done(no_samples), Error);
  scheduler.schedule();
  EXPECT_THROW(scheduler.schedule(), Error);
  EXPECT_THROW(scheduler.on_step_done(no_samples), Error);  // one sample is due
  const std::vector<int32_t> one_sample = {5};
  scheduler.on_step_done(one_sample);
}

TEST(BatchScheduler, EmptySchedulerReturnsEmptyPlansWithoutAStepInFlight) {
  BatchScheduler scheduler(make_config(4, 4, 64, 8));
  StepPlan plan = scheduler.schedule();
  EXPECT_TRUE(plan.empty());
  EXPECT_FALSE(scheduler.step_in_flight());
  EXPECT_TRUE(scheduler.schedule().empty());
}

// A fixed call sequence with arrivals, preemptions and aborts; returns every plan.
std::vector<StepPlan> scripted_run() {
  BatchScheduler scheduler(make_config(10, 4, 16, 4));
  std::vector<StepPlan> plans;
  for (int64_t step = 0; step < 200; ++step) {
    if (step < 12 && step % 2 == 0) scheduler.add_request(make_request(step, 5 + step, 9));
    if (step == 7) scheduler.abort(4);
    StepPlan plan = scheduler.schedule();
    std::vector<int32_t> samples;
    for (size_t seq_idx = 0; seq_idx < plan.num_seqs(); ++seq_idx)
      if (plan.needs_logits[seq_idx] != 0)
        samples.push_back(fake_sample(plan.seq_ids[seq_idx], plan.positions_of(seq_idx).back()));
    if (!plan.empty()) scheduler.on_step_done(samples);
    plans.push_back(std::move(plan));
  }
  return plans;
}

TEST(BatchScheduler, PlansDependOnlyOnTheCallSequence) {
  const std::vector<StepPlan> first = scripted_run();
  const std::vector<StepPlan> second = scripted_run();
  EXPECT_EQ(first, second);
  int64_t preemptions = 0;
  for (const StepPlan& plan : first) preemptions += plan.num_preemptions;
  EXPECT_GT(preemptions, 0);  // the script does exercise preemption
}

struct SimulationTotals {
  int64_t preemptions = 0;
  int64_t stops = 0;
  int64_t skipped_tokens = 0;
};

// One randomized run: random config (generous to starved pools), arrivals, lengths, stop ids and
// aborts (some while a step is in flight). With prefix caching, prompts start with a random
// length of one of three shared prefixes. Every request must finish (or be aborted) with the
// output the fake sampler dictates, no block may leak, and fed tokens must add up.
void run_random_simulation(uint32_t seed, bool prefix_caching, SimulationTotals& totals) {
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t low, int64_t high) {
    return low + static_cast<int64_t>(rng() % static_cast<uint32_t>(high - low + 1));
  };
  const int32_t block_size = static_cast<int32_t>(uniform(1, 8));
  const int64_t max_prompt = uniform(1, 40);
  const int64_t max_new = uniform(1, 30);
  const int64_t min_blocks = ceil_div(max_prompt + max_new - 1, block_size);
  const auto num_blocks = static_cast<int32_t>(min_blocks + uniform(0, 3 * min_blocks));
  SchedulerConfig config = make_config(num_blocks, block_size, uniform(1, 64), uniform(1, 8));
  config.enable_prefix_caching = prefix_caching;
  Harness harness(config);
  const int64_t num_requests = uniform(1, 30);
  int64_t next_seq_id = 0;
  for (int64_t step = 0; next_seq_id < num_requests || harness.scheduler.has_unfinished(); ++step) {
    ASSERT_LT(step, 100000) << "no progress";
    while (next_seq_id < num_requests && rng() % 3 == 0) {
      const int64_t seq_id = next_seq_id++;
      Request request = make_request(seq_id, uniform(1, max_prompt), uniform(1, max_new));
      if (prefix_caching) {
        const auto shared_prefix = make_prompt(1000 + uniform(0, 2), max_prompt);
        const auto shared_length =
            static_cast<size_t>(uniform(0, static_cast<int64_t>(request.prompt_token_ids.size())));
        std::copy_n(shared_prefix.begin(), shared_length, request.prompt_token_ids.begin());
      }
      if (rng() % 4 == 0) request.stop_token_ids = {static_cast<int32_t>(uniform(100, 149))};
      harness.add(request);
    }
    int64_t abort_in_flight = -1;
    if (next_seq_id > 0 && rng() % 40 == 0) {
      const int64_t victim = uniform(0, next_seq_id - 1);
      if (rng() % 2 == 0)
        harness.abort(victim);
      else
        abort_in_flight = victim;
    }
    harness.step(abort_in_flight);
    if (testing::Test::HasFailure()) FAIL() << "step " << step;
  }
  harness.expect_all_accounted_for();
  totals.preemptions += harness.scheduler.total_preemptions();
  totals.skipped_tokens += harness.total_skipped_tokens;
  for (const auto& [seq_id, result] : harness.results)
    totals.stops += result.finished.reason == FinishReason::kStop ? 1 : 0;
}

TEST(BatchScheduler, RandomizedSimulationConservesRequestsBlocksAndTokens) {
  SimulationTotals totals;
  for (uint32_t seed = 0; seed < 200; ++seed) {
    run_random_simulation(seed, /*prefix_caching=*/false, totals);
    if (testing::Test::HasFailure()) FAIL() << "seed " << seed;
  }
  // The seeds do reach the interesting paths.
  EXPECT_GT(totals.preemptions, 0);
  EXPECT_GT(totals.stops, 0);
  EXPECT_EQ(totals.skipped_tokens, 0);
}

TEST(BatchScheduler, RandomizedSimulationWithPrefixCachingReadsOnlyMatchingKv) {
  SimulationTotals totals;
  for (uint32_t seed = 0; seed < 200; ++seed) {
    run_random_simulation(seed, /*prefix_caching=*/true, totals);
    if (testing::Test::HasFailure()) FAIL() << "seed " << seed;
  }
  EXPECT_GT(totals.preemptions, 0);
  EXPECT_GT(totals.skipped_tokens, 0);
}

}  // namespace
}  // namespace keel
