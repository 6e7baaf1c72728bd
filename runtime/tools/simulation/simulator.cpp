// keel simulate's event loop, workloads, MoE skew and sweep. The model and its rules are
// documented in simulator.h; notes here are about mechanics:
//  - Request i of the workload is scheduler sequence i, so records index by seq_id directly.
//  - Synthetic prompt ids are (seq_id + position) % 32000: deterministic and irrelevant to the
//    scheduler with prefix caching off (it only looks at counts); sampled ids are all 1 and no
//    request has stop tokens.
//  - Per-step work: the scheduler's own plan building, one pass over the plan's sequences for
//    the shape and the emitted tokens, and one time-series sample.
#include "runtime/tools/simulation/simulator.h"
#include "runtime/common/json_depth.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <numeric>
#include <sstream>

#include "kernels/base/check.h"
#include "runtime/routing/routing_file.h"
#include "scheduler/placement.h"

namespace keel::sim {

namespace {

double unit_interval(std::mt19937_64& rng) {  // [0, 1) from the top 53 bits
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

double standard_normal(std::mt19937_64& rng) {  // Box-Muller (portable across libraries)
  const double u1 = 1.0 - unit_interval(rng), u2 = unit_interval(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

double parse_number(const std::string& text, const std::string& what) {
  try {
    size_t used = 0;
    double value = std::stod(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return value;
  } catch (const std::exception&) {
    throw_error(what, ": '", text, "' is not a number");
  }
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) parts.push_back(part);
  return parts;
}

}  // namespace

// ---- lengths and workloads --------------------------------------------------------------

LengthDist LengthDist::parse(const std::string& text) {
  const std::string what = "length distribution '" + text + "'";
  std::vector<std::string> parts = split(text, ':');
  LengthDist dist;
  if (parts.size() == 3 && parts[0] == "lognormal") {
    dist.kind = Kind::kLognormal;
    dist.a = parse_number(parts[1], what);
    dist.b = parse_number(parts[2], what);
    if (!(dist.a >= 1) || !(dist.b >= 0)) throw_error(what, ": need MEAN >= 1 and SD >= 0");
    return dist;
  }
  if (parts.size() == 1 || parts.size() == 2) {
    dist.a = parse_number(parts[0], what);
    dist.b = parts.size() == 2 ? parse_number(parts[1], what) : dist.a;
    dist.kind = parts.size() == 2 && dist.b != dist.a ? Kind::kUniform : Kind::kFixed;
    if (dist.a < 1 || dist.b < dist.a || dist.a != std::floor(dist.a) ||
        dist.b != std::floor(dist.b))
      throw_error(what, ": need integers 1 <= MIN <= MAX");
    return dist;
  }
  throw_error(what, ": expected N, MIN:MAX or lognormal:MEAN:SD");
}

int64_t LengthDist::sample(std::mt19937_64& rng) const {
  switch (kind) {
    case Kind::kFixed:
      return static_cast<int64_t>(a);
    case Kind::kUniform: {
      const uint64_t span = static_cast<uint64_t>(b - a) + 1;
      return static_cast<int64_t>(a) + static_cast<int64_t>(rng() % span);
    }
    case Kind::kLognormal: {
      const double sigma2 = std::log(1.0 + (b * b) / (a * a));
      const double mu = std::log(a) - sigma2 / 2.0;
      const double value = std::exp(mu + std::sqrt(sigma2) * standard_normal(rng));
      return std::clamp<int64_t>(std::llround(value), 1, static_cast<int64_t>(16 * a));
    }
  }
  return 1;
}

std::string LengthDist::to_string() const {
  std::ostringstream out;
  if (kind == Kind::kFixed) out << a;
  if (kind == Kind::kUniform) out << a << ":" << b;
  if (kind == Kind::kLognormal) out << "lognormal:" << a << ":" << b;
  return out.str();
}

std::vector<SimRequest> generate_workload(const WorkloadSpec& spec) {
  if (!(spec.rate > 0)) throw_error("simulate: the request rate must be > 0");
  if (!(spec.burstiness > 0)) throw_error("simulate: burstiness must be > 0");
  if (spec.num_requests < 0) throw_error("simulate: num_requests < 0");
  std::vector<SimRequest> requests;
  requests.reserve(static_cast<size_t>(spec.num_requests));
  using Kind = LengthDist::Kind;
  if (spec.input_len.kind != Kind::kLognormal && spec.output_len.kind != Kind::kLognormal) {
    // Exactly the load `keel bench serve` would send (its prompts are discarded).
    loadgen::LoadSpec load;
    load.request_rate = spec.rate;
    load.burstiness = spec.burstiness;
    load.num_prompts = static_cast<int>(spec.num_requests);
    load.input_len_min = static_cast<int>(spec.input_len.a);
    load.input_len_max = static_cast<int>(spec.input_len.b);
    load.output_len_min = static_cast<int>(spec.output_len.a);
    load.output_len_max = static_cast<int>(spec.output_len.b);
    load.seed = spec.seed;
    for (const loadgen::PlannedRequest& planned : loadgen::plan_requests(load))
      requests.push_back({planned.arrival_s, static_cast<int64_t>(planned.prompt.size()),
                          static_cast<int64_t>(planned.max_tokens)});
    return requests;
  }
  std::mt19937_64 rng(spec.seed);
  double arrival = 0.0;
  for (int64_t i = 0; i < spec.num_requests; ++i) {
    SimRequest request;
    request.prompt_len = spec.input_len.sample(rng);
    request.output_len = spec.output_len.sample(rng);
    request.arrival_s = arrival;
    arrival += spec.burstiness == 1.0 ? -std::log(1.0 - unit_interval(rng)) / spec.rate
                                      : loadgen::sample_gamma(rng, spec.burstiness,
                                                              1.0 / (spec.rate * spec.burstiness));
    requests.push_back(request);
  }
  return requests;
}

std::vector<SimRequest> load_trace(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw_error("cannot open trace ", path);
  std::stringstream buffer;
  buffer << file.rdbuf();
  const std::string text = buffer.str();
  std::vector<SimRequest> requests;
  check_json_depth(text, "trace " + path);
  nlohmann::json whole = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (whole.is_object() && whole.contains("start_times")) {
    // keel bench serve --save-json
    const auto& starts = whole["start_times"];
    const auto& inputs = whole.value("input_lens", nlohmann::json::array());
    const auto& outputs = whole.value("output_lens", nlohmann::json::array());
    if (!starts.is_array() || !inputs.is_array() || !outputs.is_array() ||
        inputs.size() != starts.size() || outputs.size() != starts.size())
      throw_error("trace ", path,
                  ": a bench serve result needs start_times, input_lens and output_lens arrays of "
                  "one length");
    for (size_t i = 0; i < starts.size(); ++i) {
      if (!starts[i].is_number() || !inputs[i].is_number_integer() ||
          !outputs[i].is_number_integer())
        throw_error("trace ", path, ": request ", i, ": non-numeric entry");
      const int64_t in = inputs[i].get<int64_t>(), out = outputs[i].get<int64_t>();
      if (in < 1 || out < 1) continue;  // a failed request
      requests.push_back({starts[i].get<double>(), in, out});
    }
  } else {
    std::istringstream lines(text);
    size_t line_no = 0;
    for (std::string line; std::getline(lines, line);) {
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json entry = nlohmann::json::parse(line, nullptr, false);
      if (!entry.is_object() || !entry.contains("arrival_s") || !entry["arrival_s"].is_number() ||
          !entry.contains("prompt_len") || !entry["prompt_len"].is_number_integer() ||
          !entry.contains("output_len") || !entry["output_len"].is_number_integer())
        throw_error("trace ", path, " line ", line_no,
                    ": expected {\"arrival_s\": s, \"prompt_len\": n, \"output_len\": n} (or a "
                    "keel bench serve --save-json file)");
      SimRequest request{entry["arrival_s"].get<double>(), entry["prompt_len"].get<int64_t>(),
                         entry["output_len"].get<int64_t>()};
      if (request.prompt_len < 1 || request.output_len < 1 || !(request.arrival_s >= 0))
        throw_error("trace ", path, " line ", line_no, ": lengths must be >= 1, arrival >= 0");
      requests.push_back(request);
    }
  }
  std::stable_sort(requests.begin(), requests.end(), [](const SimRequest& x, const SimRequest& y) {
    return x.arrival_s < y.arrival_s;
  });
  return requests;
}

// ---- MoE skew -----------------------------------------------------------------------------

ExpertLoads zipf_expert_loads(double s, int64_t num_experts, int64_t num_layers, uint64_t seed) {
  if (num_experts < 1 || num_layers < 1) throw_error("zipf: need >= 1 expert and layer");
  if (!(s >= 0)) throw_error("zipf: s must be >= 0");
  std::mt19937_64 rng(seed ^ 0x5a17f00dULL);
  ExpertLoads loads(static_cast<size_t>(num_layers),
                    std::vector<double>(static_cast<size_t>(num_experts)));
  std::vector<size_t> order(static_cast<size_t>(num_experts));
  for (auto& layer : loads) {
    std::iota(order.begin(), order.end(), size_t{0});
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
    for (size_t rank = 0; rank < order.size(); ++rank)
      layer[order[rank]] = 1.0 / std::pow(static_cast<double>(rank + 1), s);
  }
  return loads;
}

ExpertLoads routing_trace_expert_loads(const std::string& path) {
  RoutingReader reader(path);
  const RoutingFileHeader& header = reader.header();
  const size_t layers = header.num_moe_layers();
  ExpertLoads loads(layers, std::vector<double>(static_cast<size_t>(header.num_experts), 0.0));
  RoutingRecord record;
  while (reader.next(record))
    for (int64_t t = 0; t < record.num_tokens; ++t)
      for (size_t l = 0; l < layers; ++l) {
        const size_t offset = RoutingRecord::slot_offset(t, l, layers, header.top_k);
        for (int64_t k = 0; k < header.top_k; ++k)
          loads[l][static_cast<size_t>(record.expert_ids[offset + static_cast<size_t>(k)])] += 1.0;
      }
  return loads;
}

SimPlacement parse_sim_placement(const std::string& name) {
  if (name == "contiguous") return SimPlacement::kContiguous;
  if (name == "round_robin") return SimPlacement::kRoundRobin;
  if (name == "balanced") return SimPlacement::kBalanced;
  throw_error("unknown placement '", name, "' (contiguous, round_robin, balanced)");
}

std::string sim_placement_name(SimPlacement placement) {
  switch (placement) {
    case SimPlacement::kContiguous:
      return "contiguous";
    case SimPlacement::kRoundRobin:
      return "round_robin";
    case SimPlacement::kBalanced:
      return "balanced";
  }
  return "?";
}

std::vector<std::vector<double>> rank_loads(const ExpertLoads& loads, SimPlacement placement,
                                            int tp, int64_t redundant_experts) {
  if (tp < 1) throw_error("placement: tp must be >= 1");
  if (redundant_experts < 0) throw_error("placement: redundant experts must be >= 0");
  if (redundant_experts > 0 && placement != SimPlacement::kBalanced)
    throw_error("placement: redundant experts need --placement balanced");
  std::vector<std::vector<double>> ranks;
  for (size_t l = 0; l < loads.size(); ++l) {
    const std::vector<double>& layer = loads[l];
    const int64_t num_experts = static_cast<int64_t>(layer.size());
    std::vector<double> per_rank(static_cast<size_t>(tp), 0.0);
    if (placement != SimPlacement::kBalanced) {
      PlacementSpec spec;
      spec.kind = placement == SimPlacement::kContiguous ? PlacementKind::kContiguous
                                                         : PlacementKind::kRoundRobin;
      const ExpertPlacement map = ExpertPlacement::build(spec, 1, num_experts, tp);
      for (int64_t e = 0; e < num_experts; ++e)
        per_rank[static_cast<size_t>(map.rank_of(0, e))] += layer[static_cast<size_t>(e)];
    } else {
      // EPLB-style: replicas to the hottest experts, then greedy packing with equal slots.
      std::vector<int64_t> replicas(layer.size(), 1);
      for (int64_t r = 0; r < redundant_experts; ++r) {
        size_t best = 0;
        for (size_t e = 1; e < layer.size(); ++e)
          if (layer[e] / static_cast<double>(replicas[e]) >
              layer[best] / static_cast<double>(replicas[best]))
            best = e;
        ++replicas[best];
      }
      std::vector<std::pair<double, size_t>> items;  // (load, expert)
      for (size_t e = 0; e < layer.size(); ++e)
        for (int64_t r = 0; r < replicas[e]; ++r)
          items.push_back({layer[e] / static_cast<double>(replicas[e]), e});
      std::stable_sort(items.begin(), items.end(),
                       [](const auto& x, const auto& y) { return x.first > y.first; });
      const size_t slots = (items.size() + static_cast<size_t>(tp) - 1) / static_cast<size_t>(tp);
      std::vector<size_t> used(static_cast<size_t>(tp), 0);
      for (const auto& [load, expert] : items) {
        size_t target = per_rank.size();
        for (size_t rank = 0; rank < per_rank.size(); ++rank)
          if (used[rank] < slots &&
              (target == per_rank.size() || per_rank[rank] < per_rank[target]))
            target = rank;
        per_rank[target] += load;
        ++used[target];
      }
    }
    ranks.push_back(std::move(per_rank));
  }
  return ranks;
}

double moe_slowdown_factor(const ExpertLoads& loads, SimPlacement placement, int tp,
                           int64_t redundant_experts) {
  double max_sum = 0.0, mean_sum = 0.0;
  for (const std::vector<double>& ranks : rank_loads(loads, placement, tp, redundant_experts)) {
    max_sum += *std::max_element(ranks.begin(), ranks.end());
    mean_sum +=
        std::accumulate(ranks.begin(), ranks.end(), 0.0) / static_cast<double>(ranks.size());
  }
  return mean_sum > 0 ? max_sum / mean_sum : 1.0;
}

// ---- the event loop ------------------------------------------------------------------------

SimulationResult simulate(const std::vector<SimRequest>& requests, const SimulationConfig& config,
                          const StepCostModel& cost) {
  const auto wall_start = std::chrono::steady_clock::now();
  SchedulerConfig scheduler_config = config.scheduler;
  scheduler_config.enable_prefix_caching = false;
  BatchScheduler scheduler(scheduler_config);
  SimulationResult result;
  result.moe_factor = config.moe_factor;
  result.expert_fraction =
      config.expert_fraction ? *config.expert_fraction : expert_fraction_of(cost).value_or(0.5);
  const double step_scale =
      (1.0 - result.expert_fraction) + result.expert_fraction * config.moe_factor;
  const auto* calibrated = dynamic_cast<const CalibratedCostModel*>(&cost);
  const StepJitter* jitter = config.step_jitter && calibrated && calibrated->step_jitter()
                                 ? &*calibrated->step_jitter()
                                 : nullptr;
  std::mt19937_64 jitter_rng(config.jitter_seed);
  std::normal_distribution<double> standard_normal;
  double jitter_z = standard_normal(jitter_rng);
  auto next_jitter = [&]() {
    const double rho = jitter->lag1_correlation;
    jitter_z = rho * jitter_z + std::sqrt(1.0 - rho * rho) * standard_normal(jitter_rng);
    return jitter->ratio_at(0.5 * std::erfc(-jitter_z / std::sqrt(2.0)));
  };
  const size_t n = requests.size();
  result.records.resize(n);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    return requests[x].arrival_s < requests[y].arrival_s;
  });
  const int64_t pool_tokens = int64_t{scheduler_config.num_kv_blocks} * scheduler_config.block_size;
  const double num_blocks = std::max(1, scheduler_config.num_kv_blocks);

  double t = n > 0 ? std::max(0.0, requests[order[0]].arrival_s) : 0.0;
  const double first_arrival = t;
  double last_finish = t;
  size_t next = 0;
  std::vector<int32_t> sampled;
  std::vector<SeriesPoint> series;
  double kv_time_sum = 0.0;
  auto offer = [&](size_t index) {
    const SimRequest& request = requests[index];
    loadgen::RequestRecord& record = result.records[index];
    record.index = static_cast<int>(index);
    record.start_s = request.arrival_s;
    record.prompt_tokens = static_cast<int>(request.prompt_len);
    if (scheduler.num_waiting() >= config.max_waiting) {
      record.error = "rejected: the waiting queue is full (max_waiting " +
                     std::to_string(config.max_waiting) + "; HTTP 429)";
      record.http_status = 429;
      ++result.rejected;
      return;
    }
    if (request.prompt_len + 1 > pool_tokens) {  // the server's 400 (ServingEngine::prepare)
      record.error = "the prompt needs more KV slots than the whole cache holds";
      record.http_status = 400;
      return;
    }
    Request scheduled;
    scheduled.seq_id = static_cast<int64_t>(index);
    scheduled.prompt_token_ids.resize(static_cast<size_t>(request.prompt_len));
    for (size_t i = 0; i < scheduled.prompt_token_ids.size(); ++i)
      scheduled.prompt_token_ids[i] = static_cast<int32_t>((index + i) % 32000);
    scheduled.max_new_tokens = std::min(request.output_len, pool_tokens - request.prompt_len);
    result.prompt_tokens_requested += request.prompt_len;
    result.output_tokens_requested += scheduled.max_new_tokens;
    scheduler.add_request(std::move(scheduled));
    record.http_status = 200;
  };

  while (true) {
    while (next < n && requests[order[next]].arrival_s <= t) offer(order[next++]);
    if (!scheduler.has_unfinished()) {
      if (next == n) break;
      t = std::max(t, requests[order[next]].arrival_s);
      continue;
    }
    const StepPlan plan = scheduler.schedule();
    if (plan.empty()) {
      // Nothing fits until something arrives (cannot happen with prefix caching off, but the
      // server would idle the same way).
      if (next < n) {
        t = std::max(t, requests[order[next]].arrival_s);
        continue;
      }
      throw_error("simulate: the scheduler made no progress with ", scheduler.num_waiting(),
                  " waiting and ", scheduler.num_running(), " running requests");
    }
    if (config.on_plan) config.on_plan(plan, t);
    StepShape shape{};
    shape.num_seqs = static_cast<int64_t>(plan.num_seqs());
    size_t num_logits = 0;
    for (size_t seq = 0; seq < plan.num_seqs(); ++seq) {
      const int64_t begin = plan.token_offsets[seq], end = plan.token_offsets[seq + 1];
      const int64_t tokens = end - begin;
      const int64_t first_position = plan.positions[static_cast<size_t>(begin)];
      if (tokens == 1)
        ++shape.num_decode_tokens;
      else
        shape.num_prefill_tokens += tokens;
      shape.kv_tokens_read += first_position + tokens;
      const int64_t prompt_len = requests[static_cast<size_t>(plan.seq_ids[seq])].prompt_len;
      result.prompt_tokens_computed += std::clamp<int64_t>(prompt_len - first_position, 0, tokens);
      num_logits += plan.needs_logits[seq] ? 1 : 0;
    }
    const double kv_usage = scheduler.block_manager().num_used_blocks() / num_blocks;
    const double dt = cost.step_seconds(shape) * step_scale * (jitter ? next_jitter() : 1.0);
    if (!(dt > 0) || !std::isfinite(dt))
      throw_error("simulate: the cost model gave a step time of ", dt, " s");
    t += dt;
    result.busy_s += dt;
    kv_time_sum += kv_usage * dt;
    result.max_kv_usage = std::max(result.max_kv_usage, kv_usage);
    ++result.num_steps;
    for (size_t seq = 0; seq < plan.num_seqs(); ++seq) {
      if (!plan.needs_logits[seq]) continue;
      loadgen::RequestRecord& record = result.records[static_cast<size_t>(plan.seq_ids[seq])];
      if (record.chunk_times_s.empty()) record.ttft_s = t - record.start_s;
      record.chunk_times_s.push_back(t - record.start_s);
    }
    sampled.assign(num_logits, 1);
    scheduler.on_step_done(sampled);
    for (const FinishedRequest& finished : scheduler.take_finished()) {
      loadgen::RequestRecord& record = result.records[static_cast<size_t>(finished.seq_id)];
      record.success = true;
      record.e2el_s = t - record.start_s;
      record.completion_tokens = static_cast<int>(finished.output_token_ids.size());
      record.usage_reported = true;
      result.output_tokens_generated += static_cast<int64_t>(finished.output_token_ids.size());
      last_finish = t;
    }
    series.push_back({t, kv_usage, scheduler.num_running(), scheduler.num_waiting(),
                      scheduler.total_preemptions(), plan.num_scheduled_tokens, dt});
  }
  result.preemptions = scheduler.total_preemptions();
  result.mean_kv_usage = result.busy_s > 0 ? kv_time_sum / result.busy_s : 0.0;
  const size_t stride =
      config.max_series_points > 0
          ? (series.size() + config.max_series_points - 1) / config.max_series_points
          : 1;
  for (size_t i = 0; i < series.size(); i += std::max<size_t>(stride, 1))
    result.series.push_back(series[i]);
  if (!series.empty() && (series.size() - 1) % std::max<size_t>(stride, 1) != 0)
    result.series.push_back(series.back());
  result.summary = loadgen::summarize(result.records, last_finish - first_arrival, config.slo);
  result.wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  return result;
}

// ---- output -------------------------------------------------------------------------------

nlohmann::json result_json(const SimulationResult& result, bool per_request) {
  nlohmann::json out = loadgen::summary_json(result.summary);
  out["rejected"] = result.rejected;
  out["num_steps"] = result.num_steps;
  out["preemptions"] = result.preemptions;
  out["prompt_tokens_requested"] = result.prompt_tokens_requested;
  out["prompt_tokens_computed"] = result.prompt_tokens_computed;
  out["output_tokens_requested"] = result.output_tokens_requested;
  out["output_tokens_generated"] = result.output_tokens_generated;
  out["busy_s"] = result.busy_s;
  out["max_kv_usage"] = result.max_kv_usage;
  out["mean_kv_usage"] = result.mean_kv_usage;
  out["moe_slowdown_factor"] = result.moe_factor;
  out["expert_fraction"] = result.expert_fraction;
  out["simulation_wall_s"] = result.wall_s;
  nlohmann::json series = {
      {"t_s", nlohmann::json::array()},         {"kv_usage", nlohmann::json::array()},
      {"running", nlohmann::json::array()},     {"waiting", nlohmann::json::array()},
      {"preemptions", nlohmann::json::array()}, {"batch_tokens", nlohmann::json::array()},
      {"step_s", nlohmann::json::array()}};
  for (const SeriesPoint& point : result.series) {
    series["t_s"].push_back(point.t_s);
    series["kv_usage"].push_back(point.kv_usage);
    series["running"].push_back(point.running);
    series["waiting"].push_back(point.waiting);
    series["preemptions"].push_back(point.preemptions);
    series["batch_tokens"].push_back(point.batch_tokens);
    series["step_s"].push_back(point.step_s);
  }
  out["series"] = std::move(series);
  if (per_request) out.update(loadgen::records_json(result.records));
  return out;
}

std::string result_table(const SimulationResult& result) {
  std::ostringstream out;
  out << loadgen::summary_table(result.summary, " keel simulate ");
  out << std::fixed << std::setprecision(3);
  out << "Rejected (429):                          " << result.rejected << "\n"
      << "Steps:                                   " << result.num_steps << "\n"
      << "Preemptions:                             " << result.preemptions << "\n"
      << "Prompt tokens computed (incl. recompute): " << result.prompt_tokens_computed << "\n"
      << "KV usage max / time-weighted mean:       " << result.max_kv_usage << " / "
      << result.mean_kv_usage << "\n"
      << "MoE slowdown factor (expert fraction):   " << result.moe_factor << " ("
      << result.expert_fraction << ")\n"
      << "Simulation wall time (s):                " << result.wall_s << "\n";
  return out.str();
}

bool meets_p99_slo(const SimulationResult& result, const loadgen::Slo& slo) {
  if (result.rejected > 0 || result.summary.completed == 0) return false;
  if (slo.ttft_ms && result.summary.ttft_ms.p99 > *slo.ttft_ms) return false;
  if (slo.tpot_ms && result.summary.tpot_ms.p99 > *slo.tpot_ms) return false;
  if (slo.e2el_ms && result.summary.e2el_ms.p99 > *slo.e2el_ms) return false;
  return true;
}

SweepResult sweep_rate(const WorkloadSpec& workload, double min_rate, double max_rate, int steps,
                       const SimulationConfig& config, const StepCostModel& cost) {
  if (!(min_rate > 0) || !(max_rate > min_rate)) throw_error("sweep: need 0 < MIN < MAX");
  if (!config.slo.any()) throw_error("sweep: needs an SLO (--slo ttft:MS tpot:MS)");
  SweepResult sweep;
  auto probe = [&](double rate) {
    WorkloadSpec spec = workload;
    spec.rate = rate;
    SimulationConfig quiet = config;
    quiet.on_plan = nullptr;
    quiet.max_series_points = 1;
    const SimulationResult result = simulate(generate_workload(spec), quiet, cost);
    SweepProbe entry{rate, meets_p99_slo(result, config.slo), result.summary.ttft_ms.p99,
                     result.summary.tpot_ms.p99, result.rejected};
    sweep.probes.push_back(entry);
    return entry.ok;
  };
  if (probe(max_rate)) {
    sweep.max_rate = max_rate;
    sweep.saturated_at_max = true;
    return sweep;
  }
  if (!probe(min_rate)) return sweep;
  double lo = min_rate, hi = max_rate;
  for (int i = 0; i < steps; ++i) {
    const double mid = 0.5 * (lo + hi);
    (probe(mid) ? lo : hi) = mid;
  }
  sweep.max_rate = lo;
  return sweep;
}

nlohmann::json sweep_json(const SweepResult& sweep) {
  nlohmann::json probes = nlohmann::json::array();
  for (const SweepProbe& probe : sweep.probes)
    probes.push_back({{"rate", probe.rate},
                      {"meets_slo", probe.ok},
                      {"p99_ttft_ms", probe.p99_ttft_ms},
                      {"p99_tpot_ms", probe.p99_tpot_ms},
                      {"rejected", probe.rejected}});
  return {{"max_rate", sweep.max_rate ? nlohmann::json(*sweep.max_rate) : nlohmann::json(nullptr)},
          {"boundary_above_range", sweep.saturated_at_max},
          {"probes", probes}};
}

}  // namespace keel::sim
