#include "runtime/engine/generate_source.h"

#include <algorithm>

#include "kernels/base/check.h"
#include "runtime/engine/step_plan.h"
#include "runtime/sampling/sampler.h"

namespace keel {

namespace {

double seconds_between(std::chrono::steady_clock::time_point from,
                       std::chrono::steady_clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

SchedulerConfig generate_scheduler_config(const GenerateRequest& request, int32_t block_size) {
  SchedulerConfig config;
  config.block_size = block_size;
  int64_t num_blocks = 0;
  int64_t prompt_tokens = 0;
  for (const auto& prompt : request.prompts) {
    const int64_t full_length = static_cast<int64_t>(prompt.size()) + request.max_new_tokens;
    num_blocks += (full_length + block_size - 1) / block_size;
    prompt_tokens += static_cast<int64_t>(prompt.size());
  }
  KEEL_CHECK(num_blocks <= int64_t{0x7fffffff}, "generate: ", num_blocks, " KV blocks");
  config.num_kv_blocks = static_cast<int32_t>(num_blocks);
  config.max_num_seqs = std::max<int64_t>(1, static_cast<int64_t>(request.prompts.size()));
  config.max_num_batched_tokens =
      std::max(config.max_num_batched_tokens, prompt_tokens + config.max_num_seqs);
  return config;
}

GenerateSource::GenerateSource(const GenerateRequest& request, int64_t vocab_size,
                               const SchedulerConfig& scheduler_config, GenerateResult& result)
    : request_(request), vocab_size_(vocab_size), scheduler_(scheduler_config), result_(result) {
  for (size_t prompt = 0; prompt < request.prompts.size(); ++prompt) {
    Request scheduled;
    scheduled.seq_id = static_cast<int64_t>(prompt);
    scheduled.prompt_token_ids = request.prompts[prompt];
    scheduled.max_new_tokens = request.max_new_tokens;
    scheduler_.add_request(std::move(scheduled));
  }
}

void GenerateSource::next_step(ServeStep& step) {
  if (!scheduler_.has_unfinished()) {
    step.batch = StepBatch{};
    step.kind = ServeStep::Kind::kStop;
    return;
  }
  plan_ = scheduler_.schedule();
  // Every prompt fits the pool by construction, so a step always has work.
  KEEL_CHECK(!plan_.empty(), "generate: the scheduler planned an empty step");
  step.batch = step_batch_from_plan(plan_, request_.keep_all_logits);
  step.kind = ServeStep::Kind::kRun;
  step.observe = request_.time_experts;
  step.capture_routing = false;
  step.trace = request_.trace;
}

void GenerateSource::on_step_done(const StepOutput& output) {
  const std::vector<float>& logits = *output.logits;
  sampled_.clear();
  size_t row = 0;
  sampling::SamplingParams greedy;
  greedy.temperature = 0.0f;
  for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
    const size_t prompt = static_cast<size_t>(plan_.seq_ids[seq]);
    const int64_t prompt_len = static_cast<int64_t>(request_.prompts[prompt].size());
    const auto positions = plan_.positions_of(seq);
    if (request_.keep_all_logits) {
      // Every token's row, in order: prompt positions first (the last of them is also step 0).
      for (size_t token = 0; token < positions.size(); ++token) {
        const bool is_last = token + 1 == positions.size();
        if (is_last && plan_.needs_logits[seq]) break;
        const float* rows = logits.data() + (row++) * static_cast<size_t>(vocab_size_);
        if (positions[token] < prompt_len)
          result_.prompt_logits[prompt].emplace_back(rows, rows + vocab_size_);
      }
    }
    if (!plan_.needs_logits[seq]) continue;
    const float* row_logits = logits.data() + (row++) * static_cast<size_t>(vocab_size_);
    const int64_t position = positions.back();
    if (request_.keep_all_logits) {
      if (position < prompt_len)
        result_.prompt_logits[prompt].emplace_back(row_logits, row_logits + vocab_size_);
      result_.step_logits[prompt].emplace_back(row_logits, row_logits + vocab_size_);
    }
    if (static_cast<int64_t>(prompt) == request_.digest_prompt_idx)
      digest_.update(row_logits, static_cast<size_t>(vocab_size_) * sizeof(float));
    // The token sampled here sits at position + 1 (the sampler's key, as in serving).
    const int32_t token = sampling::sample(row_logits, vocab_size_, greedy, position + 1).token;
    sampled_.push_back(token);
    result_.tokens[prompt].push_back(token);
    if (result_.tokens[prompt].size() == 1 &&
        ++prompts_started_ == static_cast<int64_t>(request_.prompts.size())) {
      decode_start_ = Clock::now();
      result_.prefill_seconds = seconds_between(start_, decode_start_);
    }
  }
  KEEL_CHECK(row == output.logits->size() / static_cast<size_t>(vocab_size_), "generate: used ",
             row, " logits rows of ", output.logits->size() / static_cast<size_t>(vocab_size_));
  scheduler_.on_step_done(sampled_);
  scheduler_.take_finished();
  if (!output.expert_seconds.empty()) {
    const size_t num_experts =
        result_.expert_seconds.empty() ? 0 : result_.expert_seconds.front().size();
    for (size_t cell = 0; cell < output.expert_seconds.size() && num_experts > 0; ++cell)
      result_.expert_seconds[cell / num_experts][cell % num_experts] += output.expert_seconds[cell];
  }
  if (request_.trace) {
    if (result_.rank_traces.size() < output.rank_traces.size())
      result_.rank_traces.resize(output.rank_traces.size());
    for (size_t rank = 0; rank < output.rank_traces.size(); ++rank)
      result_.rank_traces[rank].insert(result_.rank_traces[rank].end(),
                                       output.rank_traces[rank].begin(),
                                       output.rank_traces[rank].end());
  }
}

void GenerateSource::finish() {
  result_.decode_seconds = seconds_between(decode_start_, Clock::now());
  result_.logits_digest = digest_.finish_hex();
}

}  // namespace keel
