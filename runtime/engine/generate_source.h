// `keel generate` as a StepSource: one GenerateRequest's prompts go through the serving
// scheduler (BatchScheduler over the paged KV block manager) and greedy sampling::sample,
// driven by Engine::serve's step loop — the very path `keel serve` takes, without HTTP, tokenizer
// or stop strings. Each prompt is a request of max_new_tokens that never stops early.
//
// The result keeps generate()'s contract: greedy tokens per prompt, the SHA-256 over the fp32
// logits of every generated token of the digest prompt in order, optionally every logits row
// (prompt positions and steps), expert seconds summed over ranks, traces, and the prefill time
// (until every prompt has its first token) apart from the decode time.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/common/background_sha256.h"
#include "runtime/engine/engine.h"
#include "scheduler/batch_scheduler.h"

namespace keel {

// Scheduler limits for a generate call: blocks for every prompt at its full length, every
// prompt admitted at once, and a token budget that prefills all prompts in one step when they
// fit the default budget of a serving deployment or less.
SchedulerConfig generate_scheduler_config(const GenerateRequest& request, int32_t block_size);

class GenerateSource final : public StepSource {
 public:
  // `result` is filled as steps complete (leader only); both must outlive the serve call.
  GenerateSource(const GenerateRequest& request, int64_t vocab_size,
                 const SchedulerConfig& scheduler_config, GenerateResult& result);
  void next_step(ServeStep& step) override;
  void on_step_done(const StepOutput& output) override;
  // Called after the serve loop: the digest and the decode time.
  void finish();

 private:
  using Clock = std::chrono::steady_clock;
  const GenerateRequest& request_;
  int64_t vocab_size_;
  BatchScheduler scheduler_;
  GenerateResult& result_;
  StepPlan plan_;
  // Hashed off the step loop's thread: the loop only copies each digest row.
  BackgroundSha256 digest_;
  int64_t prompts_started_ = 0;  // prompts that have their first generated token
  Clock::time_point start_ = Clock::now();
  Clock::time_point decode_start_{};
  std::vector<int32_t> sampled_;
};

}  // namespace keel
