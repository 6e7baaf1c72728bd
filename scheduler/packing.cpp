#include "scheduler/packing.h"

#include "kernels/base/check.h"

namespace keel {

void pack_routes(const int32_t* expert_ids, int64_t num_tokens, int64_t top_k,
                 const std::vector<int32_t>& expert_to_local, ExpertPacking& packing) {
  size_t num_local = 0;
  for (int32_t local : expert_to_local) num_local += local >= 0 ? 1 : 0;
  packing.local_expert_ids.assign(num_local, 0);
  for (size_t expert = 0; expert < expert_to_local.size(); ++expert)
    if (expert_to_local[expert] >= 0)
      packing.local_expert_ids[static_cast<size_t>(expert_to_local[expert])] =
          static_cast<int32_t>(expert);

  packing.offsets.assign(num_local + 1, 0);
  int64_t num_pairs = num_tokens * top_k;
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    int32_t expert = expert_ids[pair];
    KEEL_CHECK(expert >= 0 && static_cast<size_t>(expert) < expert_to_local.size(), "expert id ",
               expert, " out of range");
    int32_t local = expert_to_local[static_cast<size_t>(expert)];
    if (local >= 0) ++packing.offsets[static_cast<size_t>(local) + 1];
  }
  for (size_t local = 0; local < num_local; ++local)
    packing.offsets[local + 1] += packing.offsets[local];

  packing.routes.resize(static_cast<size_t>(packing.offsets[num_local]));
  std::vector<int64_t> cursor(packing.offsets.begin(), packing.offsets.end() - 1);
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    int32_t local = expert_to_local[static_cast<size_t>(expert_ids[pair])];
    if (local < 0) continue;
    packing.routes[static_cast<size_t>(cursor[static_cast<size_t>(local)]++)] =
        PackedRoute{static_cast<int32_t>(pair / top_k), static_cast<int32_t>(pair % top_k)};
  }
}

}  // namespace keel
