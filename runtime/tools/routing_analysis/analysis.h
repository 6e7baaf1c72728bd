// Analyses over routing files (format: routing_file.h): diff two runs, summarise one.
//
// Design note. These are pure functions of in-memory RoutingFiles so that tests, the CLI and a
// future server endpoint share them and nothing here touches disk or the model. The questions
// they answer are the ones a reproducibility investigation asks:
//  - diff: did two runs route the same way, and if not, where did they first part (request,
//    token position, layer, the experts each side chose, and both margins, which show whether
//    the flip was a near-tie or a real bug)? A flip is a different expert SET; the same set in
//    another slot order is counted apart because it changes only the order of the combine sum
//    (a last-bit effect), not which experts ran. Identical sets in the same order whose weight
//    or margin bits differ are counted too: the scores moved without changing a decision.
//  - stats: how loaded each expert (and, given a placement, each rank) is, which experts fire
//    together, and how often a decision was a near-tie (margin < epsilon): the tokens whose
//    routing a last-bit change could flip.
// Renderers give JSON (stable keys, for scripts) and text tables (for people at a terminal).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/routing/routing_file.h"

namespace keel {

// ---- diff ---------------------------------------------------------------------------------

// One (request, token position, MoE layer) decision that differs between the two files.
struct RoutingDivergence {
  bool found = false;
  std::string request_id;
  int64_t request_index_a = -1;  // index of the record in file a / file b
  int64_t request_index_b = -1;
  int64_t position = -1;           // token row = absolute position in the sequence
  int32_t layer = -1;              // model layer index (header a's moe_layers[layer_slot])
  int64_t layer_slot = -1;         // index into moe_layers
  std::vector<int32_t> experts_a;  // chosen experts in slot order
  std::vector<int32_t> experts_b;
  std::vector<float> weights_a;
  std::vector<float> weights_b;
  float margin_a = 0.0f;
  float margin_b = 0.0f;
};

// One paired request that differs in any way (requests equal in every compared respect are not
// listed).
struct RequestRoutingDiff {
  std::string request_id;
  int64_t index_a = -1;
  int64_t index_b = -1;
  int64_t rows_a = 0;
  int64_t rows_b = 0;
  int64_t set_flips = 0;
  int64_t order_only = 0;
  int64_t score_only = 0;
  int64_t first_flip_position = -1;  // -1: no set flip
  bool prompt_differs = false;
  bool output_differs = false;
  int64_t first_output_difference = -1;  // index into output_token_ids (or the shorter length)
  bool logits_digest_differs = false;    // only when both digests are non-empty
};

struct RoutingDiff {
  // Header fields that differ, as "key: a vs b" (informational: git_revision and created_unix
  // are not compared, they always differ between runs).
  std::vector<std::string> header_differences;
  std::string paired_by;  // "request_id" or "order"
  int64_t requests_a = 0;
  int64_t requests_b = 0;
  int64_t requests_paired = 0;
  std::vector<std::string> only_in_a;  // request ids (or "#index" when pairing by order)
  std::vector<std::string> only_in_b;
  int64_t rows_compared = 0;       // token rows present on both sides
  int64_t decisions_compared = 0;  // rows_compared x MoE layers
  int64_t set_flips = 0;           // (token, layer) decisions with a different expert set
  int64_t order_only = 0;          // same set, different slot order
  int64_t score_only = 0;          // same experts, same order, different weight/margin bits
  int64_t rows_only_a = 0;         // rows beyond the other side's length
  int64_t rows_only_b = 0;
  std::vector<int32_t> layers;               // model layer index per MoE slot (from a)
  std::vector<int64_t> set_flips_per_layer;  // per MoE slot
  std::vector<int64_t> order_only_per_layer;
  RoutingDivergence first_divergence;        // first set flip (request order of a, then t, layer)
  RoutingDivergence first_order_difference;  // first order-only difference
  std::vector<std::string> outputs_differ;   // request ids whose output_token_ids differ
  std::vector<RequestRoutingDiff> requests;  // paired requests with any difference

  // True when the routing is the same decision for decision, bit for bit, with the same
  // requests, rows and outputs (header differences alone do not count).
  bool identical() const;
};

// Pairs requests by request_id when every record on both sides has a non-empty id that is unique
// within its file, else by position in the file. Throws keel::Error when the row shapes differ
// (top_k or the number of MoE layers); other header differences are only reported.
RoutingDiff diff_routing(const RoutingFile& a, const RoutingFile& b);

// ---- stats --------------------------------------------------------------------------------

struct ExpertPair {
  int32_t a = 0;  // a < b
  int32_t b = 0;
  int64_t count = 0;  // tokens whose top-k (at this layer) holds both
};

// Nearest-rank percentiles of the margins (NaN margins excluded and counted apart).
struct MarginPercentiles {
  static constexpr std::array<double, 9> kPercents = {0, 1, 5, 25, 50, 75, 95, 99, 100};
  int64_t count = 0;  // finite or infinite margins included
  int64_t nan_count = 0;
  std::array<double, 9> values{};  // values[i] is the kPercents[i]-th percentile; 0 if count == 0
};

struct LayerRoutingStats {
  int32_t layer = 0;  // model layer index
  int64_t tokens = 0;
  std::vector<int64_t> expert_tokens;  // [num_experts]: tokens that chose the expert
  double mean_expert_tokens = 0.0;
  int64_t max_expert_tokens = 0;
  double expert_balance = 1.0;       // mean / max over experts (1 = perfectly even; 1 if no tokens)
  std::vector<int64_t> rank_tokens;  // [ranks], empty without a placement map
  double rank_balance = 1.0;         // mean / max over ranks
  std::vector<ExpertPair> top_pairs;  // most frequent co-activated pairs, count desc, then (a, b)
  int64_t near_ties = 0;              // margins < epsilon
  double near_tie_rate = 0.0;         // near_ties / tokens
  MarginPercentiles margins;
};

struct RoutingStats {
  double near_tie_epsilon = 0.0;
  int64_t num_requests = 0;
  int64_t num_tokens = 0;  // rows over all requests
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t num_ranks = 0;                  // 0 without a placement map
  std::vector<LayerRoutingStats> layers;  // per MoE slot
  int64_t near_ties = 0;                  // over all (token, layer) decisions
  double near_tie_rate = 0.0;
  MarginPercentiles margins;  // all decisions
};

struct RoutingStatsOptions {
  // Placement map: expert_ranks[layer][expert] = rank holding the expert. Either empty (no rank
  // statistics), one list shared by every layer, or one list per model layer (num_layers lists,
  // indexed by model layer index as ExpertPlacement::rank_of is). Each list has num_experts
  // entries >= 0; the number of ranks is max entry + 1 (at least header.tp).
  std::vector<std::vector<int>> expert_ranks;
  size_t top_pairs = 10;
};

// Throws keel::Error when a record's arrays do not fit the header or the placement map is
// malformed.
RoutingStats routing_stats(const RoutingFile& file, double near_tie_epsilon,
                           const RoutingStatsOptions& options = {});

// The placement the header names, when it is computable from the header alone: "contiguous"
// (expert e on rank e / ceil(E / tp)) or "round_robin" (e % tp), one shared list; empty for
// anything else (explicit placements are not recorded in the header) or tp < 1.
std::vector<std::vector<int>> placement_from_header(const RoutingFileHeader& header);

// ---- renderers ----------------------------------------------------------------------------

nlohmann::json routing_diff_to_json(const RoutingDiff& diff);
nlohmann::json routing_stats_to_json(const RoutingStats& stats);
std::string render_routing_diff_text(const RoutingDiff& diff);
std::string render_routing_stats_text(const RoutingStats& stats);

}  // namespace keel
