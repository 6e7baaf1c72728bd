#include "runtime/serving/replay.h"

#include <cmath>
#include <filesystem>

#include "kernels/base/check.h"
#include "runtime/common/sha256.h"
#include "runtime/sampling/sampler.h"
#include "runtime/tokenizer/tokenizer.h"

namespace keel {

namespace {

// Drives one request at a time through the engine's step loop.
class ReplaySource final : public StepSource {
 public:
  ReplaySource(const ModelConfig& config, const RoutingFile& file, const ReplayOptions& options)
      : config_(config), file_(file), options_(options) {}

  void next_step(ServeStep& step) override {
    step = ServeStep{};
    while (request_idx_ < file_.records.size() && request_done_) start_next_request();
    if (request_idx_ >= file_.records.size() && request_done_) {
      step.kind = ServeStep::Kind::kStop;
      return;
    }
    const RoutingRecord& record = file_.records[current_];
    StepBatch& batch = step.batch;
    // Positions fed this step: the whole prompt first, then the latest token.
    std::vector<int32_t> tokens;
    int64_t first_position = 0;
    if (fed_ == 0) {
      tokens = record.prompt_token_ids;
    } else {
      tokens = {outcomes_.back().tokens.back()};
      first_position = fed_;
    }
    const int64_t capacity =
        static_cast<int64_t>(record.prompt_token_ids.size() + record.output_token_ids.size()) + 1;
    batch.set_contiguous_block_tables(1, capacity, kBlockSize);
    if (config_.is_hybrid()) batch.set_identity_state_slots(1);
    for (size_t i = 0; i < tokens.size(); ++i) {
      batch.token_ids.push_back(tokens[i]);
      batch.positions.push_back(static_cast<int32_t>(first_position + static_cast<int64_t>(i)));
      batch.cache_idx.push_back(0);
    }
    batch.logits_rows.push_back(static_cast<int32_t>(tokens.size()) - 1);
    if (options_.force_routes) {
      // The record's rows are [position][moe layer][slot]; the step wants [moe layer][token][slot].
      const size_t num_layers = file_.header.num_moe_layers();
      const size_t k = static_cast<size_t>(file_.header.top_k);
      const int64_t last_position = first_position + static_cast<int64_t>(tokens.size()) - 1;
      if (last_position >= record.num_tokens)
        throw_error("replay: request ", record.request_id, " has routing rows for ",
                    record.num_tokens, " positions, position ", last_position, " is needed");
      batch.forced_routes.resize(num_layers * tokens.size() * k);
      for (size_t layer = 0; layer < num_layers; ++layer)
        for (size_t token = 0; token < tokens.size(); ++token)
          for (size_t slot = 0; slot < k; ++slot)
            batch.forced_routes[(layer * tokens.size() + token) * k + slot] =
                record.expert_ids[RoutingRecord::slot_offset(
                                      first_position + static_cast<int64_t>(token), layer,
                                      num_layers, file_.header.top_k) +
                                  slot];
    }
    fed_ = first_position + static_cast<int64_t>(tokens.size());
    step.kind = ServeStep::Kind::kRun;
  }

  void on_step_done(const StepOutput& output) override {
    const RoutingRecord& record = file_.records[current_];
    ReplayOutcome& outcome = outcomes_.back();
    const int64_t vocab = config_.vocab_size;
    std::vector<float> row(output.logits->begin(), output.logits->begin() + vocab);
    for (int32_t id : options_.masked_ids) row[static_cast<size_t>(id)] = -INFINITY;
    sampling::SamplingParams params;
    params.temperature = static_cast<float>(record.sampling.temperature);
    params.top_p = static_cast<float>(record.sampling.top_p);
    params.top_k = static_cast<int32_t>(record.sampling.top_k);
    params.seed = record.sampling.seed;
    const sampling::SampleResult sample = sampling::sample(row.data(), vocab, params, fed_);
    digest_.update(row.data(), row.size() * sizeof(float));
    const size_t index = outcome.tokens.size();
    outcome.tokens.push_back(sample.token);
    if (index >= record.output_token_ids.size() || record.output_token_ids[index] != sample.token) {
      outcome.first_mismatch = static_cast<int64_t>(index);
      finish_request();
      return;
    }
    if (outcome.tokens.size() == record.output_token_ids.size()) finish_request();
  }

  std::vector<ReplayOutcome> take() { return std::move(outcomes_); }

 private:
  static constexpr int64_t kBlockSize = 16;

  void start_next_request() {
    current_ = request_idx_++;
    const RoutingRecord& record = file_.records[current_];
    outcomes_.push_back(ReplayOutcome{});
    outcomes_.back().request_id = record.request_id;
    fed_ = 0;
    digest_ = Sha256();
    request_done_ = record.prompt_token_ids.empty() || record.output_token_ids.empty();
    if (request_done_) {
      outcomes_.back().tokens_match = record.output_token_ids.empty();
      outcomes_.back().digest = "";
    }
  }

  void finish_request() {
    ReplayOutcome& outcome = outcomes_.back();
    const RoutingRecord& record = file_.records[current_];
    outcome.tokens_match = outcome.first_mismatch < 0 && outcome.tokens == record.output_token_ids;
    outcome.digest = digest_.finish_hex();
    outcome.digest_match = !record.logits_digest.empty() && outcome.digest == record.logits_digest;
    request_done_ = true;
  }

  const ModelConfig& config_;
  const RoutingFile& file_;
  const ReplayOptions& options_;
  size_t request_idx_ = 0;
  size_t current_ = 0;
  bool request_done_ = true;
  int64_t fed_ = 0;
  Sha256 digest_;
  std::vector<ReplayOutcome> outcomes_;
};

}  // namespace

std::vector<ReplayOutcome> replay_routing(Engine& engine, const RoutingFile& file,
                                          const ReplayOptions& options) {
  const ModelConfig& config = engine.config();
  if (file.header.num_experts != config.num_experts || file.header.top_k != config.top_k ||
      file.header.num_layers != config.num_layers)
    throw_error("replay: ", file.path, " was recorded on a model with ", file.header.num_layers,
                " layers, ", file.header.num_experts, " experts, top_k ", file.header.top_k,
                "; this model has ", config.num_layers, ", ", config.num_experts, ", ",
                config.top_k);
  int64_t longest = 1;
  for (const RoutingRecord& record : file.records)
    longest = std::max<int64_t>(
        longest,
        static_cast<int64_t>(record.prompt_token_ids.size() + record.output_token_ids.size()) + 1);
  ReplaySource source(config, file, options);
  ServeOptions serve_options;
  serve_options.block_size = 16;
  serve_options.num_kv_blocks = (longest + 15) / 16;
  serve_options.num_state_slots = 1;
  engine.serve(engine.is_leader_process() ? &source : nullptr, serve_options);
  return source.take();
}

std::vector<int32_t> untokenizable_ids(const std::string& model_dir, int64_t vocab_size) {
  std::vector<int32_t> ids;
  const std::string path = model_dir + "/tokenizer.json";
  if (!std::filesystem::exists(path)) return ids;
  Tokenizer tokenizer = Tokenizer::load(path);
  for (int32_t id = 0; id < vocab_size; ++id)
    if (!tokenizer.id_to_token(id)) ids.push_back(id);
  return ids;
}

}  // namespace keel
