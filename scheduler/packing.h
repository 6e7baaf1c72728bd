// Token packing: turn the router's (token, slot) -> expert choices into contiguous per-expert
// batches for the experts one rank holds, so each expert runs one GEMM over all its tokens.
//
// Stable counting sort: pass 1 counts pairs per local expert, a prefix sum gives each expert's
// offset, pass 2 writes pairs in (token, slot) order. Within an expert the pairs therefore keep
// increasing token order, whatever the batch, which is what makes the combine order canonical.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace keel {

struct PackedRoute {
  int32_t token_idx = 0;
  int32_t slot_idx = 0;  // position in the token's top-k list
};

struct ExpertPacking {
  // local_expert_ids[i] is the expert id of local expert i (ascending).
  std::vector<int32_t> local_expert_ids;
  // Pairs of local expert i are routes[offsets[i] .. offsets[i + 1]).
  std::vector<int64_t> offsets;
  std::vector<PackedRoute> routes;

  int64_t num_tokens_of(size_t local_idx) const {
    return offsets[local_idx + 1] - offsets[local_idx];
  }
};

// expert_ids: [num_tokens, top_k] router choices. expert_to_local: [num_experts], the local
// index of each expert on this rank or -1 when it lives elsewhere. Reuses `packing`'s storage.
void pack_routes(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                 const std::vector<int32_t>& expert_to_local, ExpertPacking& packing);

}  // namespace keel
