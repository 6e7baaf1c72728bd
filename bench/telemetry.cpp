// bench/telemetry: what keel's always-on serving telemetry costs in decode throughput (goal:
// at most 2%), and a check that it changes no result bits.
//
// Design. In-process, no HTTP: one Engine (synthetic "small" preset, --tp thread ranks,
// fixed_order reduce, round_robin placement) is driven through Engine::serve by a StepSource
// that plays a fixed workload: B sequences with an 8-token prompt, one prefill step, then D
// decode steps of one token per sequence, greedy argmax on the returned logits, then kStop.
// Each sequence owns a contiguous run of KV blocks (StepBatch::set_contiguous_block_tables);
// ServeOptions.num_kv_blocks is exactly B * blocks per sequence. A run with every step
// observe=false and a run with observe=true (capture_routing=false, trace=false: what the
// server does on every step) form one pair. Per batch size: one unmeasured warm-up run, then
// R pairs whose order alternates (off/on, on/off, ...: ABBA) so that drift in the machine's
// state (thermal, page cache, neighbours) hits both modes alike.
//
// Timing: steady clock from the leader asking for the first decode step to the leader being
// handed the last decode step's logits, i.e. header/payload broadcast, forward pass, the
// observation gather (when on), and the source's argmax. The bit check's SHA-256 of the logits
// runs inside on_step_done too; its time is measured and subtracted, since it is the benchmark's
// own bookkeeping and not part of serving. Prefill is not timed. Figures: per mode the median
// decode tokens/s over rounds, and the median over rounds of the per-round ratio on/off (each
// ratio compares two runs taken back to back, which cancels slow drift better than a ratio of
// medians).
//
// Bits: SHA-256 over every logits row of every step (prefill and decode) of a run. Every run
// of a batch size must give the warm-up run's digest; an on run that differs from the off runs
// means telemetry changed results: "telemetry_changes_bits": true and exit 1 (also exit 1 when
// off runs disagree among themselves, which would make the comparison meaningless).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/check.h"
#include "kernels/cpu/gemm.h"
#include "runtime/cli/flags.h"
#include "runtime/common/sha256.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string model_dir;
  int tp = 4;
  std::vector<int> batch_list = {16};
  int64_t decode_steps = 32;
  int64_t prompt_length = 8;
  int rounds = 5;
  int64_t block_size = 16;
};

Options parse_options(int argc, char** argv) {
  Options options;
  keel::flags::FlagSet flags("bench/telemetry",
                             "usage: telemetry [flags]\n"
                             "What always-on serving telemetry costs in decode tokens/s (ABBA "
                             "rounds), and a check that it changes no result bits.\n");
  flags.add_string("--model", &options.model_dir, "DIR", "checkpoint (default: generated small)");
  flags.add_int("--tp", &options.tp, "N", "thread ranks").at_least(1);
  // --batch N is --batch-list N: both fill the same list, the later one wins.
  flags.add_int_list("--batch", &options.batch_list, "B", "one batch size").at_least(1);
  flags.add_int_list("--batch-list", &options.batch_list, "B,...", "batch sizes").at_least(1);
  flags.add_int("--decode-steps", &options.decode_steps, "N", "decode steps per run").at_least(1);
  flags.add_int("--prompt-length", &options.prompt_length, "N", "prompt tokens").at_least(1);
  flags.add_int("--rounds", &options.rounds, "R", "ABBA pairs per batch size").at_least(1);
  flags.parse_or_exit(argc, argv);
  return options;
}

int32_t argmax(const float* row, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (row[i] > row[best]) best = i;
  return static_cast<int32_t>(best);
}

// One run: prefill of every prompt in one step, then `decode_steps` greedy decode steps.
class DecodeSource : public keel::StepSource {
 public:
  DecodeSource(int64_t batch, int64_t prompt_length, int64_t decode_steps, int64_t vocab,
               int64_t block_size, bool observe)
      : batch_(batch),
        prompt_length_(prompt_length),
        decode_steps_(decode_steps),
        vocab_(vocab),
        observe_(observe),
        next_tokens_(static_cast<size_t>(batch)) {
    tables_.set_contiguous_block_tables(batch, capacity(), block_size);
  }

  int64_t capacity() const { return prompt_length_ + decode_steps_; }
  int64_t num_kv_blocks() const { return static_cast<int64_t>(tables_.block_tables.size()); }

  void next_step(keel::ServeStep& step) override {
    if (step_ > decode_steps_) {
      step.kind = keel::ServeStep::Kind::kStop;
      return;
    }
    if (step_ == 1) decode_start_ = Clock::now();
    step.kind = keel::ServeStep::Kind::kRun;
    step.observe = observe_;
    step.capture_routing = false;
    step.trace = false;
    keel::StepBatch& batch = step.batch;
    batch.token_ids.clear();
    batch.positions.clear();
    batch.cache_idx.clear();
    batch.logits_rows.clear();
    batch.forced_routes.clear();
    batch.block_tables = tables_.block_tables;
    batch.max_blocks_per_seq = tables_.max_blocks_per_seq;
    for (int64_t seq = 0; seq < batch_; ++seq) {
      if (step_ == 0) {
        for (int64_t i = 0; i < prompt_length_; ++i) {
          batch.token_ids.push_back(static_cast<int32_t>((seq * 7919 + i * 104729 + 13) % vocab_));
          batch.positions.push_back(static_cast<int32_t>(i));
          batch.cache_idx.push_back(static_cast<int32_t>(seq));
        }
      } else {
        batch.token_ids.push_back(next_tokens_[static_cast<size_t>(seq)]);
        batch.positions.push_back(static_cast<int32_t>(prompt_length_ + step_ - 1));
        batch.cache_idx.push_back(static_cast<int32_t>(seq));
      }
      batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()) - 1);
    }
  }

  void on_step_done(const keel::StepOutput& output) override {
    KEEL_CHECK(
        output.logits != nullptr && output.logits->size() == static_cast<size_t>(batch_ * vocab_),
        "step ", step_, ": expected ", batch_, " x ", vocab_, " logits");
    const float* logits = output.logits->data();
    for (int64_t seq = 0; seq < batch_; ++seq)
      next_tokens_[static_cast<size_t>(seq)] = argmax(logits + seq * vocab_, vocab_);
    if (output.observation != nullptr) ++observed_steps_;
    auto hash_start = Clock::now();
    digest_.update(logits, output.logits->size() * sizeof(float));
    if (step_ >= 1) hash_seconds_ += seconds_since(hash_start);
    if (step_ == decode_steps_) decode_seconds_ = seconds_since(decode_start_) - hash_seconds_;
    ++step_;
  }

  double decode_seconds() const { return decode_seconds_; }
  int64_t observed_steps() const { return observed_steps_; }
  std::string digest() { return digest_.finish_hex(); }

 private:
  static double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
  }

  int64_t batch_;
  int64_t prompt_length_;
  int64_t decode_steps_;
  int64_t vocab_;
  bool observe_;
  keel::StepBatch tables_;
  std::vector<int32_t> next_tokens_;
  int64_t step_ = 0;  // 0 = prefill, 1..decode_steps = decode
  Clock::time_point decode_start_;
  double hash_seconds_ = 0;
  double decode_seconds_ = 0;
  int64_t observed_steps_ = 0;
  keel::Sha256 digest_;
};

struct RunResult {
  double tokens_per_second = 0;
  double decode_seconds = 0;
  std::string digest;
};

RunResult run_once(keel::Engine& engine, const Options& options, int batch, bool observe) {
  DecodeSource source(batch, options.prompt_length, options.decode_steps,
                      engine.config().vocab_size, options.block_size, observe);
  keel::ServeOptions serve_options;
  serve_options.block_size = options.block_size;
  serve_options.num_kv_blocks = source.num_kv_blocks();
  engine.serve(&source, serve_options);
  const int64_t expected_observed = observe ? options.decode_steps + 1 : 0;
  KEEL_CHECK(source.observed_steps() == expected_observed, "observe=", observe, ": ",
             source.observed_steps(), " observed steps, expected ", expected_observed);
  RunResult result;
  result.decode_seconds = source.decode_seconds();
  result.tokens_per_second =
      static_cast<double>(batch * options.decode_steps) / result.decode_seconds;
  result.digest = source.digest();
  return result;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options = parse_options(argc, argv);
    if (options.model_dir.empty()) {
      options.model_dir = std::string(KEEL_BINARY_DIR) + "/bench-models/small";
      if (!std::filesystem::exists(options.model_dir + "/config.json")) {
        std::cerr << "bench/telemetry: writing the small preset to " << options.model_dir << "\n";
        keel::GenModelOptions gen_options;
        gen_options.seed = 1;
        keel::generate_model(keel::load_model_preset(keel::find_model_preset("small")), gen_options,
                             options.model_dir);
      }
    }
    const int cpus = static_cast<int>(std::thread::hardware_concurrency());
    nlohmann::json report;
    report["benchmark"] = "telemetry";
    report["machine"] = {
        {"cpu", keel::bench::machine_name()},
        {"isa", keel::cpu::isa_name(keel::cpu::active_isa())},
        {"read_bandwidth_gbs", keel::bench::measure_read_bandwidth_gbs(
                                   size_t{256} << 20, std::min(options.tp, std::max(1, cpus)))},
        {"load_average_before", keel::bench::one_minute_load_average()}};
    report["model"] = options.model_dir;
    report["tp"] = options.tp;
    report["reduce"] = "fixed_order";
    report["placement"] = "round_robin";
    report["prompt_length"] = options.prompt_length;
    report["decode_steps"] = options.decode_steps;
    report["rounds"] = options.rounds;
    report["order"] = "warm-up run (off), then rounds alternating off,on / on,off (ABBA)";
    report["telemetry_on"] = {{"observe", true}, {"capture_routing", false}, {"trace", false}};
    report["goal_max_overhead_percent"] = 2.0;

    keel::EngineOptions engine_options;
    engine_options.tp_size = options.tp;
    engine_options.reduce = keel::comm::ReduceAlgo::kFixedOrder;
    engine_options.placement.kind = keel::PlacementKind::kRoundRobin;
    keel::Engine engine(options.model_dir, engine_options);

    bool changes_bits = false;
    bool deterministic = true;
    std::ostringstream table;
    table << std::fixed;
    table << "tp=" << options.tp << " decode_steps=" << options.decode_steps
          << " rounds=" << options.rounds << "\n"
          << " batch   off tok/s    on tok/s   ratio on/off (min..max)   overhead   bits\n";
    for (int batch : options.batch_list) {
      const RunResult warm_up = run_once(engine, options, batch, false);
      const std::string& reference = warm_up.digest;
      std::vector<double> off_rates, on_rates, ratios;
      std::set<std::string> off_digests = {reference}, on_digests;
      nlohmann::json rounds = nlohmann::json::array();
      for (int round = 0; round < options.rounds; ++round) {
        const bool on_first = round % 2 == 1;
        RunResult first = run_once(engine, options, batch, on_first);
        RunResult second = run_once(engine, options, batch, !on_first);
        const RunResult& on = on_first ? first : second;
        const RunResult& off = on_first ? second : first;
        off_rates.push_back(off.tokens_per_second);
        on_rates.push_back(on.tokens_per_second);
        ratios.push_back(on.tokens_per_second / off.tokens_per_second);
        off_digests.insert(off.digest);
        on_digests.insert(on.digest);
        rounds.push_back({{"first", on_first ? "on" : "off"},
                          {"off_tokens_per_second", off.tokens_per_second},
                          {"on_tokens_per_second", on.tokens_per_second},
                          {"ratio_on_off", ratios.back()}});
      }
      const bool off_stable = off_digests.size() == 1;
      const bool on_matches = on_digests.size() == 1 && *on_digests.begin() == reference;
      if (!on_matches) changes_bits = true;
      if (!off_stable) deterministic = false;
      const double off_median = median(off_rates);
      const double on_median = median(on_rates);
      const double ratio_median = median(ratios);
      const double overhead_percent = 100.0 * (1.0 - ratio_median);
      report["results"].push_back(
          {{"batch", batch},
           {"off_median_decode_tokens_per_second", off_median},
           {"on_median_decode_tokens_per_second", on_median},
           {"median_ratio_on_off", ratio_median},
           {"min_ratio_on_off", *std::min_element(ratios.begin(), ratios.end())},
           {"max_ratio_on_off", *std::max_element(ratios.begin(), ratios.end())},
           {"overhead_percent", overhead_percent},
           {"within_goal", overhead_percent <= 2.0},
           {"warm_up_off_tokens_per_second", warm_up.tokens_per_second},
           {"logits_digest", reference},
           {"off_runs_bit_identical", off_stable},
           {"on_runs_match_off", on_matches},
           {"rounds", rounds}});
      table << std::setw(6) << batch << std::setprecision(1) << std::setw(12) << off_median
            << std::setw(12) << on_median << std::setprecision(4) << std::setw(10) << ratio_median
            << " (" << *std::min_element(ratios.begin(), ratios.end()) << ".."
            << *std::max_element(ratios.begin(), ratios.end()) << ")" << std::setprecision(2)
            << std::setw(9) << overhead_percent << "%   "
            << (on_matches && off_stable ? "identical" : "DIFFER") << "\n";
    }
    report["machine"]["load_average_after"] = keel::bench::one_minute_load_average();
    report["telemetry_changes_bits"] = changes_bits;
    report["off_runs_deterministic"] = deterministic;
    std::cerr << table.str();
    std::cout << report.dump(2) << std::endl;
    return changes_bits || !deterministic ? 1 : 0;
  } catch (const std::exception& error) {
    std::cerr << "bench/telemetry: error: " << error.what() << "\n";
    return 2;
  }
}
