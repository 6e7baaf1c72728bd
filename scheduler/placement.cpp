#include "scheduler/placement.h"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {

std::string_view placement_kind_name(PlacementKind kind) {
  switch (kind) {
    case PlacementKind::kContiguous:
      return "contiguous";
    case PlacementKind::kRoundRobin:
      return "round_robin";
    case PlacementKind::kExplicit:
      return "explicit";
  }
  return "?";
}

PlacementKind parse_placement_kind(std::string_view name) {
  if (name == "contiguous") return PlacementKind::kContiguous;
  if (name == "round_robin") return PlacementKind::kRoundRobin;
  if (name == "explicit") return PlacementKind::kExplicit;
  throw_error("unknown placement '", name, "' (expected contiguous, round_robin or explicit)");
}

ExpertPlacement ExpertPlacement::build(const PlacementSpec& spec, int64_t num_layers,
                                       int64_t num_experts, int tp_size) {
  if (tp_size < 1) throw_error("placement: tp_size must be >= 1, got ", tp_size);
  ExpertPlacement placement;
  placement.num_layers_ = num_layers;
  placement.num_experts_ = num_experts;
  placement.tp_size_ = tp_size;
  placement.rank_of_.resize(static_cast<size_t>(num_layers * num_experts));
  int64_t block = (num_experts + tp_size - 1) / tp_size;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      int rank = 0;
      switch (spec.kind) {
        case PlacementKind::kContiguous:
          rank = static_cast<int>(expert / block);
          break;
        case PlacementKind::kRoundRobin:
          rank = static_cast<int>(expert % tp_size);
          break;
        case PlacementKind::kExplicit: {
          if (spec.explicit_ranks.size() != 1 &&
              static_cast<int64_t>(spec.explicit_ranks.size()) != num_layers)
            throw_error("explicit placement: expected 1 or ", num_layers, " lists, got ",
                        spec.explicit_ranks.size());
          const auto& ranks =
              spec.explicit_ranks.size() == 1 ? spec.explicit_ranks[0] : spec.explicit_ranks[layer];
          if (static_cast<int64_t>(ranks.size()) != num_experts)
            throw_error("explicit placement for layer ", layer, ": expected ", num_experts,
                        " ranks (one per expert), got ", ranks.size());
          rank = ranks[expert];
          if (rank < 0 || rank >= tp_size)
            throw_error("explicit placement for layer ", layer, ", expert ", expert, ": rank ",
                        rank, " is outside [0, ", tp_size, ")");
          break;
        }
      }
      placement.rank_of_[layer * num_experts + expert] = rank;
    }
  }
  return placement;
}

std::vector<int32_t> ExpertPlacement::local_experts(int64_t layer_idx, int tp_rank) const {
  std::vector<int32_t> experts;
  for (int64_t expert = 0; expert < num_experts_; ++expert)
    if (rank_of(layer_idx, expert) == tp_rank) experts.push_back(static_cast<int32_t>(expert));
  return experts;
}

std::vector<std::vector<int>> balanced_placement(
    const std::vector<std::vector<int64_t>>& expert_load, int tp_size) {
  if (tp_size < 1) throw_error("balanced placement: tp must be >= 1, got ", tp_size);
  if (expert_load.empty() || expert_load.front().empty())
    throw_error("balanced placement: no expert loads");
  const size_t num_experts = expert_load.front().size();
  const size_t capacity = (num_experts + static_cast<size_t>(tp_size) - 1) / tp_size;
  std::vector<std::vector<int>> placement;
  for (const std::vector<int64_t>& load : expert_load) {
    if (load.size() != num_experts)
      throw_error("balanced placement: layers disagree on the number of experts (", load.size(),
                  " vs ", num_experts, ")");
    std::vector<size_t> order(num_experts);
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return load[a] > load[b]; });
    std::vector<int64_t> rank_load(static_cast<size_t>(tp_size), 0);
    std::vector<size_t> rank_count(static_cast<size_t>(tp_size), 0);
    std::vector<int> ranks(num_experts, 0);
    for (size_t expert : order) {
      int best = -1;
      for (int rank = 0; rank < tp_size; ++rank) {
        const auto r = static_cast<size_t>(rank);
        if (rank_count[r] >= capacity) continue;
        if (best < 0 || rank_load[r] < rank_load[static_cast<size_t>(best)]) best = rank;
      }
      ranks[expert] = best;
      rank_load[static_cast<size_t>(best)] += load[expert];
      ++rank_count[static_cast<size_t>(best)];
    }
    placement.push_back(std::move(ranks));
  }
  return placement;
}

std::string balanced_placement_file(const std::vector<LayerLoad>& layers, int64_t num_layers,
                                    int64_t num_experts, int tp_size, const std::string& source) {
  std::vector<std::vector<int64_t>> loads;
  for (const LayerLoad& layer : layers) loads.push_back(layer.expert_tokens);
  const std::vector<std::vector<int>> balanced = balanced_placement(loads, tp_size);
  std::vector<std::vector<int>> lists(static_cast<size_t>(num_layers));
  for (std::vector<int>& list : lists)
    for (int64_t expert = 0; expert < num_experts; ++expert)
      list.push_back(static_cast<int>(expert % tp_size));
  std::ostringstream out;
  out << "# balanced placement for tp " << tp_size << " from " << source
      << ": busiest rank's tokens per MoE layer, current -> balanced\n";
  for (size_t slot = 0; slot < layers.size(); ++slot) {
    const LayerLoad& layer = layers[slot];
    if (layer.layer < 0 || layer.layer >= num_layers ||
        layer.expert_tokens.size() != static_cast<size_t>(num_experts) ||
        layer.current_ranks.size() != layer.expert_tokens.size())
      throw_error("balanced placement: layer ", layer.layer, " does not fit ", num_layers,
                  " layers x ", num_experts, " experts");
    std::vector<int64_t> current(static_cast<size_t>(tp_size), 0), lpt(current.size(), 0);
    for (size_t expert = 0; expert < layer.expert_tokens.size(); ++expert) {
      const int rank = layer.current_ranks[expert];
      if (rank < 0 || rank >= tp_size)
        throw_error("balanced placement: layer ", layer.layer, " expert ", expert, " on rank ",
                    rank, " of ", tp_size, " (pass the tp the placement was seen with)");
      current[static_cast<size_t>(rank)] += layer.expert_tokens[expert];
      lpt[static_cast<size_t>(balanced[slot][expert])] += layer.expert_tokens[expert];
    }
    out << "#   layer " << layer.layer << ": " << *std::max_element(current.begin(), current.end())
        << " -> " << *std::max_element(lpt.begin(), lpt.end()) << "\n";
    lists[static_cast<size_t>(layer.layer)] = balanced[slot];
  }
  out << "placement: explicit\nexplicit_placement:\n";
  for (const std::vector<int>& list : lists) {
    out << "  - [";
    for (size_t expert = 0; expert < list.size(); ++expert)
      out << (expert ? ", " : "") << list[expert];
    out << "]\n";
  }
  return out.str();
}

}  // namespace keel
