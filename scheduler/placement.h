// Expert placement: which tensor-parallel rank holds each routed expert of each layer.
// Experts are placed whole (expert parallelism inside the TP group).
//   contiguous:  expert e of E on rank e / ceil(E / tp)           (blocks of neighbours)
//   round_robin: expert e on rank e % tp
//   explicit:    a per-layer (or one shared) list of ranks from YAML
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

enum class PlacementKind : uint8_t { kContiguous, kRoundRobin, kExplicit };

std::string_view placement_kind_name(PlacementKind kind);
// Throws keel::Error naming the bad value and the accepted ones.
PlacementKind parse_placement_kind(std::string_view name);

struct PlacementSpec {
  PlacementKind kind = PlacementKind::kContiguous;
  // For kExplicit: either one list of num_experts ranks used for every layer, or one list per
  // layer. Entry e is the rank that holds expert e.
  std::vector<std::vector<int>> explicit_ranks;
};

class ExpertPlacement {
 public:
  // Throws keel::Error when an explicit list has the wrong length or names a rank >= tp_size.
  static ExpertPlacement build(const PlacementSpec& spec, int64_t num_layers, int64_t num_experts,
                               int tp_size);

  int rank_of(int64_t layer_idx, int64_t expert_idx) const {
    return rank_of_[layer_idx * num_experts_ + expert_idx];
  }
  // Experts of `layer_idx` on `tp_rank`, ascending.
  std::vector<int32_t> local_experts(int64_t layer_idx, int tp_rank) const;
  int64_t num_layers() const { return num_layers_; }
  int64_t num_experts() const { return num_experts_; }
  int tp_size() const { return tp_size_; }

 private:
  int64_t num_layers_ = 0;
  int64_t num_experts_ = 0;
  int tp_size_ = 1;
  std::vector<int> rank_of_;  // [num_layers * num_experts]
};

// Placement by observed load (longest processing time first): in each layer, experts in
// decreasing load (ties: lower expert id) each go to the rank with the least load so far among
// those still holding fewer than ceil(E / tp) experts (ties: lower rank), so expert memory stays
// as even as round_robin's. expert_load[layer][expert] (e.g. tokens routed, from a routing
// record or the live counters); returns [layer][expert] -> rank, an explicit_placement list.
// Deterministic. Throws keel::Error on an empty or ragged table or tp_size < 1.
std::vector<std::vector<int>> balanced_placement(
    const std::vector<std::vector<int64_t>>& expert_load, int tp_size);

// One routed layer's observed load and where its experts sit now.
struct LayerLoad {
  int64_t layer = 0;                   // model layer index
  std::vector<int64_t> expert_tokens;  // [expert] tokens routed
  std::vector<int> current_ranks;      // [expert] rank under the placement the load was seen on
};

// The placement file for the balanced placement of `layers` (what `keel routes placement` and
// GET /v1/telemetry/placement print, and deployment / serve configs load): comment lines
// (`source`, then each routed layer's busiest-rank tokens under the current placement and the
// balanced one), `placement: explicit`, and one explicit_placement list per model layer; layers
// that do not route keep round_robin's list (never used).
std::string balanced_placement_file(const std::vector<LayerLoad>& layers, int64_t num_layers,
                                    int64_t num_experts, int tp_size, const std::string& source);

}  // namespace keel
