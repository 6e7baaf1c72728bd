// bench/flip_rate: how often greedy generation changes when only the batch around a request
// changes, against weight precision, for a dense and an MoE model, in `fast` and in
// `batch_invariant` mode. Seed 002 saw it qualitatively (dense models byte-identical at every
// precision; MoE flipping at near-ties; a fixed-reduction engine never flipping); this measures it.
//
// Models (gen-model, written under --work-dir once): configs/models/flip-moe.yaml (32 experts of
// 64, top-4, hidden 128, 4 layers) and flip-dense.yaml (the same model with a dense 2048-wide
// MLP per layer: the same feed-forward parameters), each at bf16 (as drawn), fp8 block, NVFP4 with
// fp32 activations (weight-only), NVFP4 W4A4 (activations quantized per 16 with the checkpoint's
// input_scale) and int4 (AWQ, group 64). Quantization covers the feed-forward (gen-model
// --quant-scope experts: routed experts, or the dense MLP); attention, router, embeddings and
// lm_head stay bf16, so the two models differ only where the question is. Router near-ties occur
// as they naturally do. Control: tiny-near-tie.yaml (bf16, engineered near-ties in layer 1).
//
// Procedure per cell (model x precision x mode), TP=4 thread ranks, greedy, --max-tokens per
// request, never stopping early: every probe prompt (a fixed set, 8 to 40 tokens) is generated
// once alone (the reference) and once in each batch composition a server produces:
//   with-1          one short batch-mate admitted in the same step
//   concurrency-8   seven batch-mates of 4..40 tokens, all admitted with the probe
//   join-running    the probe arrives while seven batch-mates are decoding (step 5)
//   long-prefill    the probe arrives during a 2348-token batch-mate's chunked prefill (token
//                   budget 512): it is admitted into a 512-token step behind 300 mate rows
//   chunked         the probe's own prompt prefilled 16 tokens a step beside 3 decoding mates
//   big-batch       31 batch-mates of 24 tokens and the probe in one ~780-token prefill step
// In keel the GEMMs, attention and combine are batch-invariant in both modes; what `fast`
// changes is the `native` all-reduce, whose summation order depends on the message size (rank
// order below 64 KiB, per-rank chunks above: 128 tokens at hidden 128, 256 at hidden 64). So
// `fast` can only differ from the reference in compositions with large steps, and
// `batch_invariant` (fixed_order) never should: the bench exits 1 if it does.
//
// Reported per cell: the share of runs whose probe output tokens equal the reference, and whose
// logits are bit-identical; tokens to the first divergence (min / median of the runs that
// diverged); routing flips per 1000 routing decisions (a decision = one token position x one MoE
// layer; a flip = a different top-k set than the reference's at that position, counted only at
// positions whose token history still equals the reference's); the near-tie share (reference
// decisions whose k-th minus (k+1)-th router probability is below --near-tie, default 1e-4) and
// how many flips fell on such near-ties. JSON on stdout, a table on stderr.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/common/sha256.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/step_plan.h"
#include "runtime/model/gen_model.h"
#include "runtime/sampling/sampler.h"
#include "scheduler/batch_scheduler.h"

namespace {

using keel::throw_error;

// ---- the experiment's cells ----

struct Precision {
  std::string name;  // bf16, fp8, nvfp4, nvfp4-w4a4, int4
  keel::QuantFormat format = keel::QuantFormat::kNone;
  bool w4a4 = false;
};

const std::vector<Precision>& all_precisions() {
  static const std::vector<Precision> precisions = {{"bf16", keel::QuantFormat::kNone, false},
                                                    {"fp8", keel::QuantFormat::kFp8, false},
                                                    {"nvfp4", keel::QuantFormat::kNvfp4, false},
                                                    {"nvfp4-w4a4", keel::QuantFormat::kNvfp4, true},
                                                    {"int4", keel::QuantFormat::kAwq, false}};
  return precisions;
}

struct Mate {
  int64_t prompt_len = 0;
  int64_t arrival_step = 0;
};

struct Scenario {
  std::string name;
  int64_t token_budget = 2048;
  std::vector<Mate> mates;
  int64_t probe_arrival_step = 0;
};

std::vector<Scenario> scenarios() {
  std::vector<Scenario> out;
  out.push_back({"alone", 2048, {}, 0});
  out.push_back({"with-1", 2048, {{12, 0}}, 0});
  Scenario concurrency{"concurrency-8", 2048, {}, 0};
  for (int64_t i = 0; i < 7; ++i) concurrency.mates.push_back({4 + 6 * i, 0});
  out.push_back(concurrency);
  Scenario join = concurrency;
  join.name = "join-running";
  join.probe_arrival_step = 5;
  out.push_back(join);
  // 4 x 512 + 300: chunks of 512 in steps 0..3, the last 300 rows in step 4 with the probe.
  out.push_back({"long-prefill", 512, {{4 * 512 + 300, 0}}, 4});
  out.push_back({"chunked", 16, {{6, 0}, {9, 0}, {13, 0}}, 3});
  Scenario big{"big-batch", 2048, {}, 0};
  for (int64_t i = 0; i < 31; ++i) big.mates.push_back({24, 0});
  out.push_back(big);
  return out;
}

// splitmix64: the prompts' ids, reproducible.
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::vector<int32_t> random_prompt(int64_t length, int64_t vocab, uint64_t& state) {
  std::vector<int32_t> ids(static_cast<size_t>(length));
  for (int32_t& id : ids)
    id = static_cast<int32_t>(next_random(state) % static_cast<uint64_t>(vocab));
  return ids;
}

// ---- one run: a probe in one batch composition ----

struct ProbeTrace {
  std::vector<int32_t> tokens;
  std::string logits_digest;
  // Per fed position of the probe: [moe layer][top_k] sorted ids, and [moe layer] margins.
  std::map<int64_t, std::vector<int32_t>> routes;
  std::map<int64_t, std::vector<float>> margins;
};

constexpr int64_t kProbeId = 1000;

class ScenarioSource final : public keel::StepSource {
 public:
  ScenarioSource(const Scenario& scenario, std::vector<int32_t> probe_prompt, int64_t max_new,
                 int64_t vocab, int64_t num_moe_layers, int64_t top_k, uint64_t mate_seed,
                 const keel::SchedulerConfig& config, ProbeTrace& trace)
      : vocab_(vocab),
        num_moe_layers_(num_moe_layers),
        top_k_(top_k),
        scheduler_(config),
        trace_(trace) {
    uint64_t state = mate_seed;
    for (size_t i = 0; i < scenario.mates.size(); ++i) {
      keel::Request request;
      request.seq_id = static_cast<int64_t>(i);
      request.prompt_token_ids = random_prompt(scenario.mates[i].prompt_len, vocab, state);
      request.max_new_tokens = max_new;
      pending_.push_back({scenario.mates[i].arrival_step, std::move(request)});
    }
    keel::Request probe;
    probe.seq_id = kProbeId;
    probe.prompt_token_ids = std::move(probe_prompt);
    probe.max_new_tokens = max_new;
    pending_.push_back({scenario.probe_arrival_step, std::move(probe)});
    std::stable_sort(pending_.begin(), pending_.end(),
                     [](const Pending& a, const Pending& b) { return a.step < b.step; });
  }

  void next_step(keel::ServeStep& step) override {
    // Arrivals of this step; with nothing running, the next arrival comes at once.
    if (!scheduler_.has_unfinished() && !pending_.empty())
      steps_done_ = std::max(steps_done_, pending_.front().step);
    while (!pending_.empty() && pending_.front().step <= steps_done_) {
      scheduler_.add_request(std::move(pending_.front().request));
      pending_.erase(pending_.begin());
    }
    if (!scheduler_.has_unfinished()) {
      step.batch = keel::StepBatch{};
      step.kind = keel::ServeStep::Kind::kStop;
      return;
    }
    plan_ = scheduler_.schedule();
    KEEL_CHECK(!plan_.empty(), "flip_rate: the scheduler planned an empty step");
    step.batch = keel::step_batch_from_plan(plan_);
    step.kind = keel::ServeStep::Kind::kRun;
    step.observe = true;
    step.capture_routing = false;
    step.trace = false;
  }

  void on_step_done(const keel::StepOutput& output) override {
    const std::vector<float>& logits = *output.logits;
    const keel::StepObservation* observation = output.observation;
    const auto num_tokens = static_cast<size_t>(plan_.num_scheduled_tokens);
    const auto layers = static_cast<size_t>(num_moe_layers_);
    const auto top_k = static_cast<size_t>(top_k_);
    KEEL_CHECK(observation != nullptr, "flip_rate: an observed step without its observation");
    KEEL_CHECK(observation->route_ids.size() == layers * num_tokens * top_k &&
                   observation->margins.size() == layers * num_tokens,
               "flip_rate: routing of ", observation->route_ids.size(), " ids for ", num_tokens,
               " tokens x ", layers, " layers x top ", top_k);
    sampled_.clear();
    size_t row = 0;
    keel::sampling::SamplingParams greedy;
    greedy.temperature = 0.0f;
    for (size_t seq = 0; seq < plan_.num_seqs(); ++seq) {
      const bool is_probe = plan_.seq_ids[seq] == kProbeId;
      const auto positions = plan_.positions_of(seq);
      if (is_probe) {
        const auto first_row = static_cast<size_t>(plan_.token_offsets[seq]);
        for (size_t t = 0; t < positions.size(); ++t) {
          std::vector<int32_t> sets(layers * top_k);
          std::vector<float> margins(layers);
          for (size_t layer = 0; layer < layers; ++layer) {
            const size_t token = first_row + t;
            const int32_t* ids =
                observation->route_ids.data() + (layer * num_tokens + token) * top_k;
            std::copy(ids, ids + top_k, sets.begin() + static_cast<std::ptrdiff_t>(layer * top_k));
            std::sort(sets.begin() + static_cast<std::ptrdiff_t>(layer * top_k),
                      sets.begin() + static_cast<std::ptrdiff_t>((layer + 1) * top_k));
            margins[layer] = observation->margins[layer * num_tokens + token];
          }
          trace_.routes[positions[t]] = std::move(sets);
          trace_.margins[positions[t]] = std::move(margins);
        }
      }
      if (!plan_.needs_logits[seq]) continue;
      const float* row_logits = logits.data() + (row++) * static_cast<size_t>(vocab_);
      const int32_t token =
          keel::sampling::sample(row_logits, vocab_, greedy, positions.back() + 1).token;
      sampled_.push_back(token);
      if (is_probe) {
        trace_.tokens.push_back(token);
        digest_.update(row_logits, static_cast<size_t>(vocab_) * sizeof(float));
      }
    }
    scheduler_.on_step_done(sampled_);
    scheduler_.take_finished();
    ++steps_done_;
  }

  void finish() { trace_.logits_digest = digest_.finish_hex(); }

 private:
  struct Pending {
    int64_t step;
    keel::Request request;
  };
  int64_t vocab_;
  int64_t num_moe_layers_;
  int64_t top_k_;
  keel::BatchScheduler scheduler_;
  ProbeTrace& trace_;
  std::vector<Pending> pending_;
  keel::StepPlan plan_;
  keel::Sha256 digest_;
  std::vector<int32_t> sampled_;
  int64_t steps_done_ = 0;
};

ProbeTrace run_scenario(keel::Engine& engine, const Scenario& scenario,
                        const std::vector<int32_t>& probe_prompt, int64_t max_new,
                        uint64_t mate_seed) {
  const keel::ModelConfig& config = engine.config();
  keel::SchedulerConfig scheduler;
  scheduler.block_size = 16;
  scheduler.max_num_batched_tokens = scenario.token_budget;
  scheduler.max_num_seqs = 64;
  int64_t blocks = 0;
  auto blocks_for = [&](int64_t prompt_len) { return (prompt_len + max_new + 15) / 16; };
  for (const Mate& mate : scenario.mates) blocks += blocks_for(mate.prompt_len);
  blocks += blocks_for(static_cast<int64_t>(probe_prompt.size()));
  scheduler.num_kv_blocks = static_cast<int32_t>(blocks);
  const int64_t num_moe_layers = static_cast<int64_t>(
      std::count(config.layer_is_moe.begin(), config.layer_is_moe.end(), true));
  ProbeTrace trace;
  ScenarioSource source(scenario, probe_prompt, max_new, config.vocab_size, num_moe_layers,
                        config.top_k, mate_seed, scheduler, trace);
  keel::ServeOptions serve;
  serve.num_kv_blocks = scheduler.num_kv_blocks;
  serve.block_size = scheduler.block_size;
  engine.serve(&source, serve);
  source.finish();
  KEEL_CHECK(static_cast<int64_t>(trace.tokens.size()) == max_new, "flip_rate: the probe got ",
             trace.tokens.size(), " tokens of ", max_new);
  return trace;
}

// ---- comparison against the reference ----

struct CellStats {
  int64_t runs = 0;
  int64_t identical_tokens = 0;
  int64_t identical_logits = 0;
  std::vector<int64_t> divergence_at;  // first differing token index, runs that diverged
  int64_t decisions = 0;
  int64_t flips = 0;
  int64_t flips_at_near_ties = 0;
  int64_t reference_decisions = 0;
  int64_t reference_near_ties = 0;
  int64_t reference_below_1e6 = 0;  // margins under 1e-6: within reach of last-bit changes
  float reference_min_margin = 1.0f;
  std::map<int64_t, int64_t> first_flip_layer;        // MoE layer index (0-based) -> runs
  std::map<std::string, int64_t> scenario_identical;  // runs with identical tokens
  std::map<std::string, int64_t> scenario_runs;
};

void compare(const ProbeTrace& reference, const ProbeTrace& run, int64_t prompt_len,
             double near_tie, const std::string& scenario, CellStats& stats) {
  ++stats.runs;
  ++stats.scenario_runs[scenario];
  size_t diverge = 0;
  while (diverge < run.tokens.size() && run.tokens[diverge] == reference.tokens[diverge]) ++diverge;
  if (diverge == run.tokens.size()) {
    ++stats.identical_tokens;
    ++stats.scenario_identical[scenario];
  } else {
    stats.divergence_at.push_back(static_cast<int64_t>(diverge));
  }
  if (run.logits_digest == reference.logits_digest) ++stats.identical_logits;
  // Positions fed with the reference's own history: the prompt and generated tokens before the
  // first differing one (token i is fed at position prompt_len + i).
  const int64_t compared_end = prompt_len + static_cast<int64_t>(diverge);
  bool flipped = false;
  for (const auto& [position, sets] : run.routes) {
    if (position >= compared_end) break;
    const auto ref_sets = reference.routes.find(position);
    KEEL_CHECK(ref_sets != reference.routes.end(), "flip_rate: no reference routing at ", position);
    const std::vector<float>& ref_margins = reference.margins.at(position);
    const size_t layers = ref_margins.size();
    const size_t top_k = layers > 0 ? sets.size() / layers : 0;
    for (size_t layer = 0; layer < layers; ++layer) {
      ++stats.decisions;
      const bool same =
          std::equal(sets.begin() + static_cast<std::ptrdiff_t>(layer * top_k),
                     sets.begin() + static_cast<std::ptrdiff_t>((layer + 1) * top_k),
                     ref_sets->second.begin() + static_cast<std::ptrdiff_t>(layer * top_k));
      if (!same) {
        ++stats.flips;
        if (ref_margins[layer] < near_tie) ++stats.flips_at_near_ties;
        // Positions in increasing order, layers in increasing order: the first flip of the run.
        if (!flipped) ++stats.first_flip_layer[static_cast<int64_t>(layer)];
        flipped = true;
      }
    }
  }
}

void count_reference(const ProbeTrace& reference, double near_tie, CellStats& stats) {
  for (const auto& [position, margins] : reference.margins) {
    (void)position;
    for (float margin : margins) {
      ++stats.reference_decisions;
      if (margin < near_tie) ++stats.reference_near_ties;
      if (margin < 1e-6f) ++stats.reference_below_1e6;
      stats.reference_min_margin = std::min(stats.reference_min_margin, margin);
    }
  }
}

double median(std::vector<int64_t> values) {
  if (values.empty()) return -1;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? static_cast<double>(values[mid])
                           : 0.5 * static_cast<double>(values[mid - 1] + values[mid]);
}

// ---- driver ----

struct Options {
  std::string work_dir = std::string(KEEL_BINARY_DIR) + "/flip-rate-models";
  std::vector<std::string> models = {"moe", "dense", "near-tie"};
  std::vector<std::string> precisions = {"bf16", "fp8", "nvfp4", "nvfp4-w4a4", "int4"};
  std::vector<std::string> modes = {"fast", "batch_invariant"};
  int64_t num_prompts = 8;
  int64_t max_tokens = 32;
  int tp = 4;
  double near_tie = 1e-4;
  uint64_t seed = 0;
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) out.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::string models = "moe,dense,near-tie";
  std::string precisions = "bf16,fp8,nvfp4,nvfp4-w4a4,int4";
  std::string modes = "fast,batch_invariant";
  int64_t seed = 0;
  keel::flags::FlagSet flags(
      "bench/flip_rate",
      "usage: flip_rate [flags]\n"
      "Greedy outputs and routing under changing batch composition, against weight precision,\n"
      "dense vs MoE, fast vs batch_invariant (TP thread ranks). JSON on stdout.\n");
  flags.add_string("--work-dir", &options.work_dir, "DIR", "where the checkpoints are written");
  flags.add_string("--models", &models, "LIST", "moe,dense,near-tie (near-tie: bf16 control)");
  flags.add_string("--precisions", &precisions, "LIST", "bf16,fp8,nvfp4,nvfp4-w4a4,int4");
  flags.add_string("--modes", &modes, "LIST", "fast,batch_invariant");
  flags.add_int("--prompts", &options.num_prompts, "N", "probe prompts").range(1, 64);
  flags.add_int("--max-tokens", &options.max_tokens, "N", "tokens per request").range(2, 256);
  flags.add_int("--tp", &options.tp, "N", "tensor-parallel thread ranks").range(1, 8);
  flags
      .add_double("--near-tie", &options.near_tie, "P",
                  "margin (router probability) below which a decision is a near-tie")
      .above(0);
  flags.add_int("--seed", &seed, "N", "weights and prompts seed").at_least(0);
  flags.parse_or_exit(argc, argv);
  options.seed = static_cast<uint64_t>(seed);
  options.models = split_list(models);
  options.precisions = split_list(precisions);
  options.modes = split_list(modes);
  for (const std::string& model : options.models)
    if (model != "moe" && model != "dense" && model != "near-tie")
      throw keel::flags::UsageError("bench/flip_rate: --models: unknown model '" + model +
                                    "' (moe, dense, near-tie)");
  for (const std::string& name : options.precisions)
    if (std::none_of(all_precisions().begin(), all_precisions().end(),
                     [&](const Precision& p) { return p.name == name; }))
      throw keel::flags::UsageError("bench/flip_rate: --precisions: unknown precision '" + name +
                                    "' (bf16, fp8, nvfp4, nvfp4-w4a4, int4)");
  for (const std::string& mode : options.modes)
    if (mode != "fast" && mode != "batch_invariant")
      throw keel::flags::UsageError("bench/flip_rate: --modes: unknown mode '" + mode +
                                    "' (fast, batch_invariant)");
  return options;
}

// Writes (once) and returns the checkpoint of `model` at `precision`.
std::string checkpoint_dir(const Options& options, const std::string& model,
                           const Precision& precision) {
  const std::string preset_name = model == "moe"     ? "flip-moe"
                                  : model == "dense" ? "flip-dense"
                                                     : "tiny-near-tie";
  const std::string format_name = precision.format == keel::QuantFormat::kNone
                                      ? "bf16"
                                      : std::string(keel::quant_format_name(precision.format));
  const std::string dir = options.work_dir + "/" + preset_name + "-" + format_name + "-seed" +
                          std::to_string(options.seed);
  if (std::filesystem::exists(dir + "/config.json")) return dir;
  keel::GenModelOptions gen;
  gen.seed = options.seed;
  gen.quant.format = precision.format;
  gen.quant.scope = keel::QuantScope::kExperts;
  keel::generate_model(keel::load_model_preset(keel::find_model_preset(preset_name)), gen, dir);
  return dir;
}

int run(const Options& options) {
  std::fprintf(
      stderr, "flip_rate bench: %s, load average %.2f, tp=%d, %lld prompts x %lld tokens\n",
      keel::bench::machine_name().c_str(), keel::bench::one_minute_load_average(), options.tp,
      static_cast<long long>(options.num_prompts), static_cast<long long>(options.max_tokens));
  const std::vector<Scenario> all_scenarios = scenarios();
  nlohmann::json cells = nlohmann::json::array();
  bool invariant_broken = false;
  std::fprintf(stderr,
               "| model | precision | mode | runs | identical tokens | identical logits | "
               "first divergence min/median | flips per 1000 | near-ties | flips at near-ties | "
               "first flipped MoE layer (runs) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& model : options.models) {
    for (const std::string& precision_name : options.precisions) {
      const Precision& precision =
          *std::find_if(all_precisions().begin(), all_precisions().end(),
                        [&](const Precision& p) { return p.name == precision_name; });
      if (model == "near-tie" && precision.name != "bf16") continue;  // the control is bf16
      const std::string dir = checkpoint_dir(options, model, precision);
      for (const std::string& mode : options.modes) {
        keel::EngineOptions engine_options;
        engine_options.tp_size = options.tp;
        engine_options.reduce =
            mode == "fast" ? keel::comm::ReduceAlgo::kNative : keel::comm::ReduceAlgo::kFixedOrder;
        engine_options.nvfp4_activations =
            precision.w4a4 ? keel::Nvfp4Activations::kW4A4 : keel::Nvfp4Activations::kFp32;
        keel::Engine engine(dir, engine_options);
        CellStats stats;
        uint64_t prompt_state = options.seed * 7919 + 17;
        for (int64_t p = 0; p < options.num_prompts; ++p) {
          const int64_t length = 8 + static_cast<int64_t>(next_random(prompt_state) % 33);
          const std::vector<int32_t> prompt =
              random_prompt(length, engine.config().vocab_size, prompt_state);
          const uint64_t mate_seed = options.seed * 104729 + static_cast<uint64_t>(p) + 1;
          const ProbeTrace reference =
              run_scenario(engine, all_scenarios.front(), prompt, options.max_tokens, mate_seed);
          count_reference(reference, options.near_tie, stats);
          for (size_t s = 1; s < all_scenarios.size(); ++s) {
            const ProbeTrace trace =
                run_scenario(engine, all_scenarios[s], prompt, options.max_tokens, mate_seed);
            compare(reference, trace, length, options.near_tie, all_scenarios[s].name, stats);
          }
        }
        if (mode == "batch_invariant" && (stats.identical_logits != stats.runs || stats.flips != 0))
          invariant_broken = true;
        const double flips_per_1000 =
            stats.decisions > 0
                ? 1000.0 * static_cast<double>(stats.flips) / static_cast<double>(stats.decisions)
                : 0.0;
        const double near_tie_share = stats.reference_decisions > 0
                                          ? static_cast<double>(stats.reference_near_ties) /
                                                static_cast<double>(stats.reference_decisions)
                                          : 0.0;
        nlohmann::json cell = {
            {"model", model},
            {"checkpoint", dir},
            {"precision", precision.name},
            {"mode", mode},
            {"runs", stats.runs},
            {"identical_tokens", stats.identical_tokens},
            {"identical_logits", stats.identical_logits},
            {"identical_tokens_share",
             static_cast<double>(stats.identical_tokens) / static_cast<double>(stats.runs)},
            {"first_divergence_min",
             stats.divergence_at.empty()
                 ? -1
                 : *std::min_element(stats.divergence_at.begin(), stats.divergence_at.end())},
            {"first_divergence_median", median(stats.divergence_at)},
            {"routing_decisions_compared", stats.decisions},
            {"routing_flips", stats.flips},
            {"flips_per_1000_decisions", flips_per_1000},
            {"reference_decisions", stats.reference_decisions},
            {"reference_near_ties", stats.reference_near_ties},
            {"near_tie_share", near_tie_share},
            {"flips_at_near_ties", stats.flips_at_near_ties},
            {"reference_margins_below_1e-6", stats.reference_below_1e6},
            {"reference_min_margin",
             stats.reference_decisions > 0 ? stats.reference_min_margin : -1.0f},
            {"first_flip_moe_layer_runs", stats.first_flip_layer},
            {"identical_tokens_by_scenario", stats.scenario_identical},
            {"runs_by_scenario", stats.scenario_runs}};
        cells.push_back(cell);
        char divergence[64] = "-";
        if (!stats.divergence_at.empty())
          std::snprintf(divergence, sizeof(divergence), "%lld / %.1f",
                        static_cast<long long>(cell["first_divergence_min"].get<int64_t>()),
                        median(stats.divergence_at));
        const bool has_routing = stats.reference_decisions > 0;
        std::string first_layers;
        for (const auto& [layer, runs] : stats.first_flip_layer)
          first_layers += (first_layers.empty() ? "" : ", ") + std::to_string(layer) + ": " +
                          std::to_string(runs);
        char routing[160] = "n/a | n/a | n/a | n/a";
        if (has_routing)
          std::snprintf(routing, sizeof(routing), "%.3f | %.4f (%lld under 1e-6) | %lld | %s",
                        flips_per_1000, near_tie_share,
                        static_cast<long long>(stats.reference_below_1e6),
                        static_cast<long long>(stats.flips_at_near_ties),
                        first_layers.empty() ? "-" : first_layers.c_str());
        std::fprintf(stderr, "| %s | %s | %s | %lld | %.3f | %.3f | %s | %s |\n", model.c_str(),
                     precision.name.c_str(), mode.c_str(), static_cast<long long>(stats.runs),
                     cell["identical_tokens_share"].get<double>(),
                     static_cast<double>(stats.identical_logits) / static_cast<double>(stats.runs),
                     divergence, routing);
      }
    }
  }
  nlohmann::json report = {{"bench", "flip_rate"},
                           {"machine",
                            {{"cpu", keel::bench::machine_name()},
                             {"load_average", keel::bench::one_minute_load_average()}}},
                           {"tp", options.tp},
                           {"prompts", options.num_prompts},
                           {"max_tokens", options.max_tokens},
                           {"near_tie_threshold", options.near_tie},
                           {"seed", options.seed},
                           {"cells", cells}};
  std::cout << report.dump(2) << std::endl;
  if (invariant_broken) {
    std::fprintf(stderr, "flip_rate: batch_invariant changed bits or routing: a determinism bug\n");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_options(argc, argv));
  } catch (const keel::flags::UsageError& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 2;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench/flip_rate: %s\n", error.what());
    return 1;
  }
}
