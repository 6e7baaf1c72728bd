#include "runtime/serving/calibrate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <limits>
#include <map>
#include <set>
#include <tuple>

#include "kernels/base/check.h"
#include "runtime/sampling/sampler.h"

namespace keel {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct GridPoint {
  int64_t decode = 0;
  int64_t prefill = 0;
  int64_t context = 0;
};

class CalibrationSource final : public StepSource {
 public:
  CalibrationSource(std::vector<GridPoint> points, int64_t repeats, int64_t block_size,
                    int64_t vocab_size)
      : points_(std::move(points)),
        repeats_(repeats),
        block_size_(block_size),
        vocab_size_(vocab_size),
        times_(points_.size()),
        expert_share_(points_.size()) {}

  void next_step(ServeStep& step) override {
    step = ServeStep{};
    if (point_ >= points_.size()) {
      step.kind = ServeStep::Kind::kStop;
      return;
    }
    const GridPoint& point = points_[point_];
    StepBatch& batch = step.batch;
    const int64_t decode_blocks = (point.context + block_size_ - 1) / block_size_;
    const int64_t prefill_blocks = (point.prefill + block_size_ - 1) / block_size_;
    const int64_t num_seqs = point.decode + (point.prefill > 0 ? 1 : 0);
    batch.max_blocks_per_seq = std::max<int64_t>({decode_blocks, prefill_blocks, 1});
    batch.block_tables.assign(static_cast<size_t>(num_seqs * batch.max_blocks_per_seq), -1);
    // Hybrid models: a slot per sequence (decode rows continue from whatever state it holds:
    // the cost is the same).
    batch.set_identity_state_slots(num_seqs);
    int32_t next_block = 0;
    for (int64_t seq = 0; seq < num_seqs; ++seq) {
      const bool is_prefill = seq == point.decode;
      const int64_t blocks = is_prefill ? prefill_blocks : decode_blocks;
      for (int64_t block = 0; block < blocks; ++block)
        batch.block_tables[static_cast<size_t>(seq * batch.max_blocks_per_seq + block)] =
            next_block++;
      if (is_prefill) {
        for (int64_t position = 0; position < point.prefill; ++position) {
          batch.token_ids.push_back(token_of(seq, position));
          batch.positions.push_back(static_cast<int32_t>(position));
          batch.cache_idx.push_back(static_cast<int32_t>(seq));
        }
      } else {
        batch.token_ids.push_back(token_of(seq, point.context - 1));
        batch.positions.push_back(static_cast<int32_t>(point.context - 1));
        batch.cache_idx.push_back(static_cast<int32_t>(seq));
      }
      batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()) - 1);
    }
    step.kind = ServeStep::Kind::kRun;
    step.observe = true;  // phase timers give the expert share; the server runs with them on
    start_ = now_seconds();
  }

  void on_step_done(const StepOutput& output) override {
    // The server samples every row that asked for logits before the next step: so does this.
    sampling::SamplingParams greedy;
    greedy.temperature = 0.0f;
    const size_t rows = output.logits->size() / static_cast<size_t>(vocab_size_);
    for (size_t row = 0; row < rows; ++row)
      sampled_ ^= sampling::sample(output.logits->data() + row * static_cast<size_t>(vocab_size_),
                                   vocab_size_, greedy, 0)
                      .token;
    const double seconds = now_seconds() - start_;
    if (run_ > 0) {  // run 0 warms up
      times_[point_].push_back(seconds);
      if (!output.rank_phase_seconds.empty()) {
        double total = 0;
        for (double phase : output.rank_phase_seconds.front()) total += phase;
        const double experts =
            output.rank_phase_seconds.front()[static_cast<size_t>(Phase::kExperts)];
        if (total > 0) expert_share_[point_].push_back(experts / total);
      }
    }
    if (++run_ > repeats_) {
      run_ = 0;
      ++point_;
    }
  }

  // Varied tokens, as real traffic has: identical tokens would route every sequence to the
  // same experts and make a decode batch look cheaper than it is.
  int32_t token_of(int64_t seq, int64_t position) const {
    uint64_t hash = static_cast<uint64_t>(seq) * 0x9e3779b97f4a7c15ull +
                    static_cast<uint64_t>(position) * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
    hash ^= hash >> 31;
    hash *= 0xd6e8feb86659fd93ull;
    hash ^= hash >> 29;
    return static_cast<int32_t>(hash % static_cast<uint64_t>(vocab_size_));
  }

  int64_t max_seqs() const {
    int64_t most = 1;
    for (const GridPoint& point : points_)
      most = std::max<int64_t>(most, point.decode + (point.prefill > 0 ? 1 : 0));
    return most;
  }

  int64_t blocks_needed() const {
    int64_t most = 1;
    for (const GridPoint& point : points_) {
      const int64_t decode_blocks = (point.context + block_size_ - 1) / block_size_;
      const int64_t prefill_blocks = (point.prefill + block_size_ - 1) / block_size_;
      most = std::max(most, point.decode * decode_blocks + prefill_blocks);
    }
    return most;
  }

  nlohmann::json result(const Engine& engine) const {
    nlohmann::json points = nlohmann::json::array();
    std::vector<double> shares;
    for (size_t index = 0; index < points_.size(); ++index) {
      std::vector<double> times = times_[index];
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2];
      const GridPoint& point = points_[index];
      points.push_back({{"num_decode_tokens", point.decode},
                        {"num_prefill_tokens", point.prefill},
                        {"kv_tokens_read", point.decode * point.context + point.prefill},
                        {"num_seqs", point.decode + (point.prefill > 0 ? 1 : 0)},
                        {"context", point.context},
                        {"step_s", median},
                        {"min_step_s", times.front()},
                        {"max_step_s", times.back()},
                        {"samples", times.size()}});
      shares.insert(shares.end(), expert_share_[index].begin(), expert_share_[index].end());
    }
    std::sort(shares.begin(), shares.end());
    nlohmann::json out = {{"format", "keel-calibration"},
                          {"version", 1},
                          {"model", engine.config().architecture_name},
                          {"tp", engine.tp_size()},
                          {"reduce", comm::reduce_algo_name(engine.options().reduce)},
                          {"backend", device_name(engine.options().device)},
                          {"created_unix", static_cast<int64_t>(std::time(nullptr))},
                          {"extrapolation", "linear"},
                          {"points", points}};
    if (!shares.empty()) out["expert_fraction"] = shares[shares.size() / 2];
    return out;
  }

 private:
  std::vector<GridPoint> points_;
  int64_t repeats_;
  int64_t block_size_;
  int64_t vocab_size_;
  int32_t sampled_ = 0;  // keeps the sampling from being optimised away
  size_t point_ = 0;
  int64_t run_ = 0;
  double start_ = 0;
  std::vector<std::vector<double>> times_;
  std::vector<std::vector<double>> expert_share_;
};

}  // namespace

nlohmann::json calibrate_engine(Engine& engine, const CalibrationGrid& grid) {
  if (grid.repeats < 1) throw_error("calibrate: repeats must be >= 1");
  std::vector<GridPoint> points;
  for (int64_t decode : grid.decode)
    for (int64_t prefill : grid.prefill)
      for (int64_t context : grid.context) {
        if (decode + prefill == 0) continue;  // an empty step
        if (decode < 0 || prefill < 0 || context < 1)
          throw_error("calibrate: bad grid point decode ", decode, " prefill ", prefill,
                      " context ", context);
        if (context > engine.config().max_position_embeddings ||
            prefill > engine.config().max_position_embeddings)
          throw_error("calibrate: context ", std::max(context, prefill),
                      " exceeds max_position_embeddings ", engine.config().max_position_embeddings);
        // Without decode sequences the context axis means nothing: measure it once.
        if (decode == 0 && context != grid.context.front()) continue;
        points.push_back({decode, prefill, context});
      }
  CalibrationSource source(points, grid.repeats, grid.block_size, engine.config().vocab_size);
  ServeOptions options;
  options.block_size = grid.block_size;
  options.num_kv_blocks = source.blocks_needed();
  options.num_state_slots = source.max_seqs();
  engine.serve(engine.is_leader_process() ? &source : nullptr, options);
  return engine.is_leader_process() ? source.result(engine) : nlohmann::json();
}

// Steps of a served load -> calibration (see calibrate.h). Shapes and costs as the simulator
// counts them (runtime/tools/simulation/simulator.h).
nlohmann::json calibration_from_served_steps(const nlohmann::json& steps, int64_t min_samples) {
  // A step costs the simulator its own time plus the serving overhead until the next step
  // starts (finishing requests, telemetry, admission and planning): the gap before the next
  // step when the engine went straight on. A step followed by an idle wait gets the median of
  // the gaps seen.
  std::vector<double> gaps;
  std::map<int64_t, double> gap_after;  // step id -> gap before the step id + 1
  for (const auto& step : steps) {
    if (!step.contains("kv_tokens_read") || !step.contains("gap_before_s"))
      throw_error("calibrate: step ", step.value("id", int64_t{-1}),
                  " has no kv_tokens_read or gap_before_s (a server that is too old?)");
    if (step["gap_before_s"].is_null()) continue;
    gaps.push_back(step["gap_before_s"].get<double>());
    gap_after[step["id"].get<int64_t>() - 1] = gaps.back();
  }
  std::sort(gaps.begin(), gaps.end());
  const double median_gap = gaps.empty() ? 0.0 : gaps[gaps.size() / 2];
  // One point per (decode tokens, prefill tokens): the median step time and the median KV
  // tokens read of the steps of that shape.
  std::map<std::pair<int64_t, int64_t>, std::pair<std::vector<double>, std::vector<int64_t>>>
      shapes;
  std::vector<std::pair<int64_t, int64_t>> shape_of_step;
  std::vector<double> cost_of_step;
  for (const auto& step : steps) {
    shape_of_step.emplace_back(step["num_decode_tokens"].get<int64_t>(),
                               step["num_prefill_tokens"].get<int64_t>());
    auto& [times, kv] = shapes[shape_of_step.back()];
    auto gap = gap_after.find(step["id"].get<int64_t>());
    cost_of_step.push_back(step["seconds"].get<double>() +
                           (gap != gap_after.end() ? gap->second : median_gap));
    times.push_back(cost_of_step.back());
    kv.push_back(step["kv_tokens_read"].get<int64_t>());
  }
  // Step jitter (runtime/tools/simulation/cost_model.h): each step's cost over the median of its
  // shape, for shapes seen often enough that the median means something.
  constexpr size_t kJitterMinShapeSamples = 5;
  std::map<std::pair<int64_t, int64_t>, double> shape_median;
  for (const auto& [shape, samples] : shapes) {
    if (samples.first.size() < kJitterMinShapeSamples) continue;
    std::vector<double> sorted = samples.first;
    std::sort(sorted.begin(), sorted.end());
    shape_median[shape] = sorted[sorted.size() / 2];
  }
  std::vector<double> log_ratios(steps.size(), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> ratios;
  for (size_t i = 0; i < steps.size(); ++i) {
    auto median = shape_median.find(shape_of_step[i]);
    if (median == shape_median.end()) continue;
    ratios.push_back(cost_of_step[i] / median->second);
    log_ratios[i] = std::log(ratios.back());
  }
  nlohmann::json jitter;
  constexpr size_t kJitterMinSteps = 100;
  if (ratios.size() >= kJitterMinSteps) {
    std::sort(ratios.begin(), ratios.end());
    std::vector<double> quantiles;
    constexpr int kQuantiles = 100;
    for (int q = 0; q <= kQuantiles; ++q)
      quantiles.push_back(ratios[static_cast<size_t>(std::lround(
          q / static_cast<double>(kQuantiles) * static_cast<double>(ratios.size() - 1)))]);
    // Lag-1 correlation of log ratios over consecutive step ids.
    std::vector<std::pair<double, double>> pairs;
    for (size_t i = 1; i < steps.size(); ++i)
      if (!std::isnan(log_ratios[i - 1]) && !std::isnan(log_ratios[i]) &&
          steps[i]["id"].get<int64_t>() == steps[i - 1]["id"].get<int64_t>() + 1)
        pairs.emplace_back(log_ratios[i - 1], log_ratios[i]);
    double correlation = 0.0;
    if (pairs.size() >= 2) {
      double mean_a = 0, mean_b = 0;
      for (const auto& [a, b] : pairs) mean_a += a, mean_b += b;
      mean_a /= static_cast<double>(pairs.size());
      mean_b /= static_cast<double>(pairs.size());
      double cov = 0, var_a = 0, var_b = 0;
      for (const auto& [a, b] : pairs) {
        cov += (a - mean_a) * (b - mean_b);
        var_a += (a - mean_a) * (a - mean_a);
        var_b += (b - mean_b) * (b - mean_b);
      }
      if (var_a > 0 && var_b > 0) correlation = cov / std::sqrt(var_a * var_b);
    }
    jitter = {{"ratio_quantiles", quantiles},
              {"lag1_correlation", std::clamp(correlation, 0.0, 0.99)},
              {"steps", ratios.size()}};
  }
  // Steps with a prefill chunk are rare (one per request) and spread over many decode counts,
  // so their per-shape medians rest on a few correlated samples. For each prefill count seen at
  // >= 2 decode counts with >= kMinPrefillSamples steps in all, the points take the line
  // a + b * decode fitted by least squares through the shapes' medians, weighted by their
  // sample counts (a prefill step's time is close to linear in the decode tokens riding along).
  constexpr size_t kMinPrefillSamples = 10;
  std::map<int64_t, std::pair<double, double>> prefill_line;  // prefill count -> (a, b)
  {
    std::map<int64_t, std::vector<std::tuple<double, double, double>>> by_prefill;  // d, t, w
    for (auto& [shape, samples] : shapes) {
      if (shape.second == 0) continue;
      std::vector<double> sorted = samples.first;
      std::sort(sorted.begin(), sorted.end());
      by_prefill[shape.second].emplace_back(static_cast<double>(shape.first),
                                            sorted[sorted.size() / 2],
                                            static_cast<double>(sorted.size()));
    }
    for (const auto& [prefill, nodes] : by_prefill) {
      double w = 0, wx = 0, wy = 0, wxx = 0, wxy = 0;
      for (const auto& [x, y, weight] : nodes) {
        w += weight, wx += weight * x, wy += weight * y;
        wxx += weight * x * x, wxy += weight * x * y;
      }
      const double denominator = w * wxx - wx * wx;
      if (nodes.size() < 2 || w < kMinPrefillSamples || denominator <= 0) continue;
      const double slope = (w * wxy - wx * wy) / denominator;
      prefill_line[prefill] = {(wy - slope * wx) / w, slope};
    }
  }
  nlohmann::json points = nlohmann::json::array();
  std::set<std::tuple<int64_t, int64_t, int64_t>> taken;
  for (auto& [shape, samples] : shapes) {
    auto& [times, kv] = samples;
    if (static_cast<int64_t>(times.size()) < min_samples) continue;
    std::sort(times.begin(), times.end());
    std::sort(kv.begin(), kv.end());
    const int64_t median_kv = kv[kv.size() / 2];
    if (!taken.insert({shape.first, shape.second, median_kv}).second) continue;
    const double median = times[times.size() / 2];
    double step_s = median;
    if (auto line = prefill_line.find(shape.second); line != prefill_line.end()) {
      const double fitted =
          line->second.first + line->second.second * static_cast<double>(shape.first);
      if (fitted > 0) step_s = fitted;
    }
    points.push_back({{"num_decode_tokens", shape.first},
                      {"num_prefill_tokens", shape.second},
                      {"kv_tokens_read", median_kv},
                      {"step_s", step_s},
                      {"median_s", median},
                      {"samples", times.size()}});
  }
  if (points.empty())
    throw_error("calibrate: no step shape seen ", min_samples, " times; serve some load first");
  nlohmann::json calibration = {{"format", "keel-calibration"},
                                {"version", 1},
                                {"median_gap_s", median_gap},
                                {"extrapolation", "linear"},
                                {"created_unix", static_cast<int64_t>(std::time(nullptr))},
                                {"points", points}};
  if (!jitter.is_null()) calibration["step_jitter"] = jitter;
  return calibration;
}

}  // namespace keel
