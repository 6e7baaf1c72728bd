// Routing diff and stats (analysis.h).
//
// Design note. Both analyses validate every record against its header first, so the loops below
// can index the flat [T][L][k] arrays without bounds worries and a malformed in-memory file is a
// keel::Error, not undefined behaviour. Stats walk one MoE layer at a time so the dense
// co-activation matrix (num_experts^2 counters) exists for one layer at a time only. Every
// ordering that reaches output (top pairs, request lists) has a total tie-break, so two runs of
// the tool over the same files print the same bytes.
#include "runtime/tools/routing_analysis/analysis.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <unordered_map>

#include "kernels/base/check.h"

namespace keel {
namespace {

using json = nlohmann::json;

std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* pattern, ...) {
  va_list args;
  va_start(args, pattern);
  va_list copy;
  va_copy(copy, args);
  const int size = std::vsnprintf(nullptr, 0, pattern, copy);
  va_end(copy);
  std::string out(static_cast<size_t>(std::max(size, 0)) + 1, '\0');
  std::vsnprintf(out.data(), out.size(), pattern, args);
  va_end(args);
  out.resize(static_cast<size_t>(std::max(size, 0)));
  return out;
}

std::string where_of(const RoutingFile& file, size_t index) {
  return "routing file '" + (file.path.empty() ? std::string("<memory>") : file.path) +
         "': record " + std::to_string(index);
}

void validate_records(const RoutingFile& file) {
  for (size_t i = 0; i < file.records.size(); ++i) {
    file.records[i].validate(file.header, where_of(file, i));
  }
}

std::string join_ints(const std::vector<int32_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ",";
    out += std::to_string(values[i]);
  }
  return out + "]";
}

bool same_bits(float x, float y) {
  return std::bit_cast<uint32_t>(x) == std::bit_cast<uint32_t>(y);
}

std::string request_label(const RoutingRecord& record, size_t index) {
  return record.request_id.empty() ? "#" + std::to_string(index) : record.request_id;
}

bool ids_unique_and_present(const RoutingFile& file) {
  std::unordered_map<std::string, int> seen;
  for (const RoutingRecord& record : file.records) {
    if (record.request_id.empty() || seen[record.request_id]++ > 0) return false;
  }
  return true;
}

MarginPercentiles percentiles(std::vector<float>& margins) {
  MarginPercentiles out;
  std::vector<float> finite;
  finite.reserve(margins.size());
  for (float margin : margins) {
    if (std::isnan(margin)) {
      ++out.nan_count;
    } else {
      finite.push_back(margin);
    }
  }
  out.count = static_cast<int64_t>(finite.size());
  if (finite.empty()) return out;
  std::sort(finite.begin(), finite.end());
  const auto n = static_cast<double>(finite.size());
  for (size_t i = 0; i < MarginPercentiles::kPercents.size(); ++i) {
    // Nearest rank: the smallest value with at least p% of the values at or below it.
    const double rank = std::ceil(MarginPercentiles::kPercents[i] / 100.0 * n);
    const auto index = static_cast<size_t>(std::clamp(rank - 1.0, 0.0, n - 1.0));
    out.values[i] = finite[index];
  }
  return out;
}

double balance(const std::vector<int64_t>& counts) {
  if (counts.empty()) return 1.0;
  int64_t total = 0;
  int64_t max = 0;
  for (int64_t count : counts) {
    total += count;
    max = std::max(max, count);
  }
  if (max == 0) return 1.0;
  return static_cast<double>(total) / static_cast<double>(counts.size()) / static_cast<double>(max);
}

json divergence_json(const RoutingDivergence& d) {
  if (!d.found) return nullptr;
  return {{"request_id", d.request_id},
          {"request_index_a", d.request_index_a},
          {"request_index_b", d.request_index_b},
          {"position", d.position},
          {"layer", d.layer},
          {"layer_slot", d.layer_slot},
          {"experts_a", d.experts_a},
          {"experts_b", d.experts_b},
          {"weights_a", d.weights_a},
          {"weights_b", d.weights_b},
          {"margin_a", d.margin_a},
          {"margin_b", d.margin_b}};
}

json percentiles_json(const MarginPercentiles& p) {
  json values = json::object();
  for (size_t i = 0; i < p.kPercents.size(); ++i) {
    values["p" + std::to_string(static_cast<int>(p.kPercents[i]))] = p.values[i];
  }
  return {{"count", p.count}, {"nan_count", p.nan_count}, {"percentiles", values}};
}

}  // namespace

// ---- diff ---------------------------------------------------------------------------------

bool RoutingDiff::identical() const {
  return requests.empty() && only_in_a.empty() && only_in_b.empty();
}

RoutingDiff diff_routing(const RoutingFile& a, const RoutingFile& b) {
  RoutingDiff diff;
  const RoutingFileHeader& ha = a.header;
  const RoutingFileHeader& hb = b.header;
  auto note = [&](const char* key, const std::string& x, const std::string& y) {
    if (x != y) diff.header_differences.push_back(std::string(key) + ": " + x + " vs " + y);
  };
  note("model", ha.model, hb.model);
  note("model_dir", ha.model_dir, hb.model_dir);
  note("architecture", ha.architecture, hb.architecture);
  note("num_layers", std::to_string(ha.num_layers), std::to_string(hb.num_layers));
  note("moe_layers", join_ints(ha.moe_layers), join_ints(hb.moe_layers));
  note("num_experts", std::to_string(ha.num_experts), std::to_string(hb.num_experts));
  note("top_k", std::to_string(ha.top_k), std::to_string(hb.top_k));
  note("tp", std::to_string(ha.tp), std::to_string(hb.tp));
  note("placement", ha.placement, hb.placement);
  note("reduce", ha.reduce, hb.reduce);
  note("determinism", ha.determinism, hb.determinism);
  note("dtype", ha.dtype, hb.dtype);
  note("combine", ha.combine, hb.combine);
  note("quantization", ha.quantization, hb.quantization);
  note("nvfp4_activations", ha.nvfp4_activations, hb.nvfp4_activations);
  note("kv_cache_dtype", ha.kv_cache_dtype, hb.kv_cache_dtype);
  if (ha.top_k != hb.top_k || ha.num_moe_layers() != hb.num_moe_layers()) {
    throw_error("routing diff: row shapes differ, cannot compare: top_k ", ha.top_k, " vs ",
                hb.top_k, ", MoE layers ", ha.num_moe_layers(), " vs ", hb.num_moe_layers());
  }
  validate_records(a);
  validate_records(b);

  const size_t layers = ha.num_moe_layers();
  const auto k = static_cast<size_t>(ha.top_k);
  diff.layers = ha.moe_layers;
  diff.set_flips_per_layer.assign(layers, 0);
  diff.order_only_per_layer.assign(layers, 0);
  diff.requests_a = static_cast<int64_t>(a.records.size());
  diff.requests_b = static_cast<int64_t>(b.records.size());

  std::vector<std::pair<size_t, size_t>> pairs;
  if (ids_unique_and_present(a) && ids_unique_and_present(b)) {
    diff.paired_by = "request_id";
    std::unordered_map<std::string, size_t> b_index;
    for (size_t j = 0; j < b.records.size(); ++j) b_index[b.records[j].request_id] = j;
    std::vector<bool> b_paired(b.records.size(), false);
    for (size_t i = 0; i < a.records.size(); ++i) {
      auto it = b_index.find(a.records[i].request_id);
      if (it == b_index.end()) {
        diff.only_in_a.push_back(a.records[i].request_id);
      } else {
        pairs.emplace_back(i, it->second);
        b_paired[it->second] = true;
      }
    }
    for (size_t j = 0; j < b.records.size(); ++j) {
      if (!b_paired[j]) diff.only_in_b.push_back(b.records[j].request_id);
    }
  } else {
    diff.paired_by = "order";
    const size_t common = std::min(a.records.size(), b.records.size());
    for (size_t i = 0; i < common; ++i) pairs.emplace_back(i, i);
    for (size_t i = common; i < a.records.size(); ++i) {
      diff.only_in_a.push_back(request_label(a.records[i], i));
    }
    for (size_t j = common; j < b.records.size(); ++j) {
      diff.only_in_b.push_back(request_label(b.records[j], j));
    }
  }
  diff.requests_paired = static_cast<int64_t>(pairs.size());

  std::vector<int32_t> sorted_a(k);
  std::vector<int32_t> sorted_b(k);
  for (const auto& [ia, ib] : pairs) {
    const RoutingRecord& ra = a.records[ia];
    const RoutingRecord& rb = b.records[ib];
    RequestRoutingDiff req;
    req.request_id = request_label(ra, ia);
    req.index_a = static_cast<int64_t>(ia);
    req.index_b = static_cast<int64_t>(ib);
    req.rows_a = ra.num_tokens;
    req.rows_b = rb.num_tokens;
    const int64_t rows = std::min(ra.num_tokens, rb.num_tokens);
    for (int64_t t = 0; t < rows; ++t) {
      for (size_t l = 0; l < layers; ++l) {
        const size_t base = RoutingRecord::slot_offset(t, l, layers, ha.top_k);
        const size_t m = RoutingRecord::margin_offset(t, l, layers);
        const int32_t* ea = ra.expert_ids.data() + base;
        const int32_t* eb = rb.expert_ids.data() + base;
        if (std::equal(ea, ea + k, eb)) {
          bool scores_same = same_bits(ra.margins[m], rb.margins[m]);
          for (size_t s = 0; s < k && scores_same; ++s) {
            scores_same = same_bits(ra.weights[base + s], rb.weights[base + s]);
          }
          if (!scores_same) ++req.score_only;
          continue;
        }
        sorted_a.assign(ea, ea + k);
        sorted_b.assign(eb, eb + k);
        std::sort(sorted_a.begin(), sorted_a.end());
        std::sort(sorted_b.begin(), sorted_b.end());
        const bool set_same = sorted_a == sorted_b;
        RoutingDivergence* first = nullptr;
        if (set_same) {
          ++req.order_only;
          ++diff.order_only_per_layer[l];
          if (!diff.first_order_difference.found) first = &diff.first_order_difference;
        } else {
          ++req.set_flips;
          ++diff.set_flips_per_layer[l];
          if (req.first_flip_position < 0) req.first_flip_position = t;
          if (!diff.first_divergence.found) first = &diff.first_divergence;
        }
        if (first != nullptr) {
          first->found = true;
          first->request_id = req.request_id;
          first->request_index_a = req.index_a;
          first->request_index_b = req.index_b;
          first->position = t;
          first->layer = ha.moe_layers[l];
          first->layer_slot = static_cast<int64_t>(l);
          first->experts_a.assign(ea, ea + k);
          first->experts_b.assign(eb, eb + k);
          first->weights_a.assign(ra.weights.begin() + static_cast<ptrdiff_t>(base),
                                  ra.weights.begin() + static_cast<ptrdiff_t>(base + k));
          first->weights_b.assign(rb.weights.begin() + static_cast<ptrdiff_t>(base),
                                  rb.weights.begin() + static_cast<ptrdiff_t>(base + k));
          first->margin_a = ra.margins[m];
          first->margin_b = rb.margins[m];
        }
      }
    }
    diff.rows_compared += rows;
    diff.rows_only_a += ra.num_tokens - rows;
    diff.rows_only_b += rb.num_tokens - rows;
    diff.set_flips += req.set_flips;
    diff.order_only += req.order_only;
    diff.score_only += req.score_only;

    req.prompt_differs = ra.prompt_token_ids != rb.prompt_token_ids;
    if (ra.output_token_ids != rb.output_token_ids) {
      req.output_differs = true;
      const auto mismatch = std::mismatch(ra.output_token_ids.begin(), ra.output_token_ids.end(),
                                          rb.output_token_ids.begin(), rb.output_token_ids.end());
      req.first_output_difference = mismatch.first - ra.output_token_ids.begin();
      diff.outputs_differ.push_back(req.request_id);
    }
    req.logits_digest_differs = !ra.logits_digest.empty() && !rb.logits_digest.empty() &&
                                ra.logits_digest != rb.logits_digest;
    if (req.set_flips > 0 || req.order_only > 0 || req.score_only > 0 || req.rows_a != req.rows_b ||
        req.prompt_differs || req.output_differs || req.logits_digest_differs) {
      diff.requests.push_back(std::move(req));
    }
  }
  diff.decisions_compared = diff.rows_compared * static_cast<int64_t>(layers);
  return diff;
}

// ---- stats --------------------------------------------------------------------------------

std::vector<std::vector<int>> placement_from_header(const RoutingFileHeader& header) {
  if (header.tp < 1 || header.num_experts < 1) return {};
  std::vector<int> ranks(static_cast<size_t>(header.num_experts));
  const int64_t block = (header.num_experts + header.tp - 1) / header.tp;
  for (int64_t e = 0; e < header.num_experts; ++e) {
    if (header.placement == "contiguous") {
      ranks[static_cast<size_t>(e)] = static_cast<int>(e / block);
    } else if (header.placement == "round_robin") {
      ranks[static_cast<size_t>(e)] = static_cast<int>(e % header.tp);
    } else {
      return {};
    }
  }
  return {ranks};
}

RoutingStats routing_stats(const RoutingFile& file, double near_tie_epsilon,
                           const RoutingStatsOptions& options) {
  const RoutingFileHeader& header = file.header;
  validate_records(file);
  const size_t layers = header.num_moe_layers();
  const auto k = static_cast<size_t>(header.top_k);
  const auto num_experts = static_cast<size_t>(header.num_experts);

  RoutingStats stats;
  stats.near_tie_epsilon = near_tie_epsilon;
  stats.num_requests = static_cast<int64_t>(file.records.size());
  stats.num_experts = header.num_experts;
  stats.top_k = header.top_k;
  for (const RoutingRecord& record : file.records) stats.num_tokens += record.num_tokens;

  const auto& ranks_map = options.expert_ranks;
  if (!ranks_map.empty()) {
    if (ranks_map.size() != 1 && ranks_map.size() != static_cast<size_t>(header.num_layers)) {
      throw_error("routing stats: placement map has ", ranks_map.size(),
                  " lists; want 1 (shared) or num_layers = ", header.num_layers);
    }
    int max_rank = -1;
    for (size_t i = 0; i < ranks_map.size(); ++i) {
      if (ranks_map[i].size() != num_experts) {
        throw_error("routing stats: placement list ", i, " has ", ranks_map[i].size(),
                    " entries; want num_experts = ", num_experts);
      }
      for (int rank : ranks_map[i]) {
        if (rank < 0) throw_error("routing stats: placement list ", i, " has rank ", rank, " < 0");
        max_rank = std::max(max_rank, rank);
      }
    }
    stats.num_ranks = std::max<int64_t>(max_rank + 1, header.tp);
  }

  std::vector<float> all_margins;
  all_margins.reserve(static_cast<size_t>(stats.num_tokens) * layers);
  std::vector<int64_t> pair_counts;  // [a * E + b], a < b; one layer at a time
  std::vector<int32_t> chosen(k);
  for (size_t l = 0; l < layers; ++l) {
    LayerRoutingStats layer;
    layer.layer = header.moe_layers[l];
    layer.tokens = stats.num_tokens;
    layer.expert_tokens.assign(num_experts, 0);
    pair_counts.assign(num_experts * num_experts, 0);
    std::vector<float> margins;
    margins.reserve(static_cast<size_t>(stats.num_tokens));
    for (const RoutingRecord& record : file.records) {
      for (int64_t t = 0; t < record.num_tokens; ++t) {
        const size_t base = RoutingRecord::slot_offset(t, l, layers, header.top_k);
        chosen.assign(record.expert_ids.begin() + static_cast<ptrdiff_t>(base),
                      record.expert_ids.begin() + static_cast<ptrdiff_t>(base + k));
        // A token counts once per expert even if a malformed row repeats an id.
        std::sort(chosen.begin(), chosen.end());
        chosen.erase(std::unique(chosen.begin(), chosen.end()), chosen.end());
        for (size_t i = 0; i < chosen.size(); ++i) {
          ++layer.expert_tokens[static_cast<size_t>(chosen[i])];
          for (size_t j = i + 1; j < chosen.size(); ++j) {
            ++pair_counts[static_cast<size_t>(chosen[i]) * num_experts +
                          static_cast<size_t>(chosen[j])];
          }
        }
        const float margin = record.margins[RoutingRecord::margin_offset(t, l, layers)];
        margins.push_back(margin);
        if (margin < near_tie_epsilon) ++layer.near_ties;
      }
    }
    int64_t total = 0;
    for (int64_t count : layer.expert_tokens) {
      total += count;
      layer.max_expert_tokens = std::max(layer.max_expert_tokens, count);
    }
    layer.mean_expert_tokens = static_cast<double>(total) / static_cast<double>(num_experts);
    layer.expert_balance = balance(layer.expert_tokens);
    if (!ranks_map.empty()) {
      const std::vector<int>& map =
          ranks_map.size() == 1 ? ranks_map[0] : ranks_map[static_cast<size_t>(layer.layer)];
      layer.rank_tokens.assign(static_cast<size_t>(stats.num_ranks), 0);
      for (size_t e = 0; e < num_experts; ++e) {
        layer.rank_tokens[static_cast<size_t>(map[e])] += layer.expert_tokens[e];
      }
      layer.rank_balance = balance(layer.rank_tokens);
    }
    std::vector<ExpertPair> pairs;
    for (size_t x = 0; x < num_experts; ++x) {
      for (size_t y = x + 1; y < num_experts; ++y) {
        const int64_t count = pair_counts[x * num_experts + y];
        if (count > 0) pairs.push_back({static_cast<int32_t>(x), static_cast<int32_t>(y), count});
      }
    }
    const size_t keep = std::min(options.top_pairs, pairs.size());
    // (x, y) was generated in increasing order, so a stable sort by count is a total order.
    std::stable_sort(pairs.begin(), pairs.end(),
                     [](const ExpertPair& p, const ExpertPair& q) { return p.count > q.count; });
    pairs.resize(keep);
    layer.top_pairs = std::move(pairs);
    layer.near_tie_rate =
        layer.tokens > 0 ? static_cast<double>(layer.near_ties) / static_cast<double>(layer.tokens)
                         : 0.0;
    stats.near_ties += layer.near_ties;
    all_margins.insert(all_margins.end(), margins.begin(), margins.end());
    layer.margins = percentiles(margins);
    stats.layers.push_back(std::move(layer));
  }
  const int64_t decisions = stats.num_tokens * static_cast<int64_t>(layers);
  stats.near_tie_rate =
      decisions > 0 ? static_cast<double>(stats.near_ties) / static_cast<double>(decisions) : 0.0;
  stats.margins = percentiles(all_margins);
  return stats;
}

// ---- renderers ----------------------------------------------------------------------------

json routing_diff_to_json(const RoutingDiff& diff) {
  json per_layer = json::array();
  for (size_t l = 0; l < diff.layers.size(); ++l) {
    per_layer.push_back({{"layer", diff.layers[l]},
                         {"set_flips", diff.set_flips_per_layer[l]},
                         {"order_only", diff.order_only_per_layer[l]}});
  }
  json requests = json::array();
  for (const RequestRoutingDiff& r : diff.requests) {
    requests.push_back({{"request_id", r.request_id},
                        {"index_a", r.index_a},
                        {"index_b", r.index_b},
                        {"rows_a", r.rows_a},
                        {"rows_b", r.rows_b},
                        {"set_flips", r.set_flips},
                        {"order_only", r.order_only},
                        {"score_only", r.score_only},
                        {"first_flip_position", r.first_flip_position},
                        {"prompt_differs", r.prompt_differs},
                        {"output_differs", r.output_differs},
                        {"first_output_difference", r.first_output_difference},
                        {"logits_digest_differs", r.logits_digest_differs}});
  }
  return {{"identical", diff.identical()},
          {"header_differences", diff.header_differences},
          {"paired_by", diff.paired_by},
          {"requests_a", diff.requests_a},
          {"requests_b", diff.requests_b},
          {"requests_paired", diff.requests_paired},
          {"only_in_a", diff.only_in_a},
          {"only_in_b", diff.only_in_b},
          {"rows_compared", diff.rows_compared},
          {"decisions_compared", diff.decisions_compared},
          {"set_flips", diff.set_flips},
          {"order_only", diff.order_only},
          {"score_only", diff.score_only},
          {"rows_only_a", diff.rows_only_a},
          {"rows_only_b", diff.rows_only_b},
          {"per_layer", per_layer},
          {"first_divergence", divergence_json(diff.first_divergence)},
          {"first_order_difference", divergence_json(diff.first_order_difference)},
          {"outputs_differ", diff.outputs_differ},
          {"requests", requests}};
}

json routing_stats_to_json(const RoutingStats& stats) {
  json layers = json::array();
  for (const LayerRoutingStats& layer : stats.layers) {
    json pairs = json::array();
    for (const ExpertPair& pair : layer.top_pairs) {
      pairs.push_back({{"experts", {pair.a, pair.b}}, {"count", pair.count}});
    }
    json entry = {{"layer", layer.layer},
                  {"tokens", layer.tokens},
                  {"expert_tokens", layer.expert_tokens},
                  {"mean_expert_tokens", layer.mean_expert_tokens},
                  {"max_expert_tokens", layer.max_expert_tokens},
                  {"expert_balance", layer.expert_balance},
                  {"top_pairs", pairs},
                  {"near_ties", layer.near_ties},
                  {"near_tie_rate", layer.near_tie_rate},
                  {"margins", percentiles_json(layer.margins)}};
    if (!layer.rank_tokens.empty()) {
      entry["rank_tokens"] = layer.rank_tokens;
      entry["rank_balance"] = layer.rank_balance;
    }
    layers.push_back(std::move(entry));
  }
  return {{"near_tie_epsilon", stats.near_tie_epsilon},
          {"num_requests", stats.num_requests},
          {"num_tokens", stats.num_tokens},
          {"num_experts", stats.num_experts},
          {"top_k", stats.top_k},
          {"num_ranks", stats.num_ranks},
          {"near_ties", stats.near_ties},
          {"near_tie_rate", stats.near_tie_rate},
          {"margins", percentiles_json(stats.margins)},
          {"layers", layers}};
}

std::string render_routing_diff_text(const RoutingDiff& diff) {
  std::string out;
  out += diff.identical() ? "routing: identical\n" : "routing: DIFFERS\n";
  if (diff.header_differences.empty()) {
    out += "header: same model and shape\n";
  } else {
    out += "header differences:\n";
    for (const std::string& line : diff.header_differences) out += "  " + line + "\n";
  }
  out += format("requests: a %lld, b %lld, paired %lld (by %s)\n",
                static_cast<long long>(diff.requests_a), static_cast<long long>(diff.requests_b),
                static_cast<long long>(diff.requests_paired), diff.paired_by.c_str());
  auto list = [&](const char* label, const std::vector<std::string>& ids) {
    if (ids.empty()) return;
    out += std::string("  ") + label + ":";
    for (const std::string& id : ids) out += " " + id;
    out += "\n";
  };
  list("only in a", diff.only_in_a);
  list("only in b", diff.only_in_b);
  out += format("decisions compared: %lld (%lld token rows x %zu MoE layers)\n",
                static_cast<long long>(diff.decisions_compared),
                static_cast<long long>(diff.rows_compared), diff.layers.size());
  out += format(
      "set flips: %lld   order-only: %lld   score-only: %lld   rows only in a: %lld   "
      "rows only in b: %lld\n",
      static_cast<long long>(diff.set_flips), static_cast<long long>(diff.order_only),
      static_cast<long long>(diff.score_only), static_cast<long long>(diff.rows_only_a),
      static_cast<long long>(diff.rows_only_b));
  auto divergence = [&](const char* label, const RoutingDivergence& d) {
    if (!d.found) return;
    out += format("%s: request %s (a #%lld, b #%lld), position %lld, layer %d\n", label,
                  d.request_id.c_str(), static_cast<long long>(d.request_index_a),
                  static_cast<long long>(d.request_index_b), static_cast<long long>(d.position),
                  d.layer);
    out += format("  a: experts %s  margin %.6g\n", join_ints(d.experts_a).c_str(), d.margin_a);
    out += format("  b: experts %s  margin %.6g\n", join_ints(d.experts_b).c_str(), d.margin_b);
  };
  divergence("first divergence", diff.first_divergence);
  divergence("first order-only difference", diff.first_order_difference);
  if (diff.set_flips > 0 || diff.order_only > 0) {
    out += "\n  layer  set_flips  order_only\n";
    for (size_t l = 0; l < diff.layers.size(); ++l) {
      out += format("  %5d  %9lld  %10lld\n", diff.layers[l],
                    static_cast<long long>(diff.set_flips_per_layer[l]),
                    static_cast<long long>(diff.order_only_per_layer[l]));
    }
  }
  if (!diff.requests.empty()) {
    out +=
        "\n  request               rows_a  rows_b  set_flips  order_only  score_only  "
        "first_flip  output\n";
    for (const RequestRoutingDiff& r : diff.requests) {
      out += format(
          "  %-20s  %6lld  %6lld  %9lld  %10lld  %10lld  %10lld  %s\n", r.request_id.c_str(),
          static_cast<long long>(r.rows_a), static_cast<long long>(r.rows_b),
          static_cast<long long>(r.set_flips), static_cast<long long>(r.order_only),
          static_cast<long long>(r.score_only), static_cast<long long>(r.first_flip_position),
          r.output_differs
              ? format("differs at %lld", static_cast<long long>(r.first_output_difference)).c_str()
              : "same");
    }
  }
  return out;
}

std::string render_routing_stats_text(const RoutingStats& stats) {
  std::string out;
  out += format("requests %lld, token rows %lld, %lld experts, top-%lld, %zu MoE layers\n",
                static_cast<long long>(stats.num_requests),
                static_cast<long long>(stats.num_tokens), static_cast<long long>(stats.num_experts),
                static_cast<long long>(stats.top_k), stats.layers.size());
  out +=
      format("near-ties (margin < %g): %lld of %lld decisions (%.4f%%)\n", stats.near_tie_epsilon,
             static_cast<long long>(stats.near_ties),
             static_cast<long long>(stats.num_tokens * static_cast<int64_t>(stats.layers.size())),
             100.0 * stats.near_tie_rate);
  out += "margin percentiles:";
  for (size_t i = 0; i < stats.margins.kPercents.size(); ++i) {
    out +=
        format(" p%d=%.4g", static_cast<int>(stats.margins.kPercents[i]), stats.margins.values[i]);
  }
  out += "\n\n";
  out += format(
      "  layer  mean/expert  max/expert  balance%s  near_ties  near_tie_%%  "
      "p1_margin  p50_margin  top pair\n",
      stats.num_ranks > 0 ? "  rank_balance" : "");
  for (const LayerRoutingStats& layer : stats.layers) {
    std::string pair = "-";
    if (!layer.top_pairs.empty()) {
      const ExpertPair& p = layer.top_pairs.front();
      pair = format("(%d,%d) x%lld", p.a, p.b, static_cast<long long>(p.count));
    }
    out += format("  %5d  %11.2f  %10lld  %7.3f%s  %9lld  %10.4f  %9.3g  %10.3g  %s\n", layer.layer,
                  layer.mean_expert_tokens, static_cast<long long>(layer.max_expert_tokens),
                  layer.expert_balance,
                  stats.num_ranks > 0 ? format("  %12.3f", layer.rank_balance).c_str() : "",
                  static_cast<long long>(layer.near_ties), 100.0 * layer.near_tie_rate,
                  layer.margins.values[1], layer.margins.values[4], pair.c_str());
  }
  return out;
}

}  // namespace keel
