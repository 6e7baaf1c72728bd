// Router replay: re-run the requests of a routing record file (runtime/routing/routing_file.h)
// with every MoE layer forced to the recorded experts (RankModel's forced routes; weights still
// come from the router), sample with the recorded parameters and seed, and check that the
// output tokens and the SHA-256 of the logits rows the sampler saw reproduce bit for bit.
//
// Requests run one at a time through Engine::serve (thread or MPI ranks alike): one prefill step
// with the whole prompt, then one decode step per output token, each token's forced row taken
// from the record at its absolute position. A request stops at its first token that differs from
// the record (past it the recorded rows describe another continuation).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/routing/routing_file.h"

namespace keel {

struct ReplayOptions {
  bool force_routes = true;         // false: re-run without forcing (plain reproducibility)
  std::vector<int32_t> masked_ids;  // ids the server masked before sampling (no token text)
};

struct ReplayOutcome {
  std::string request_id;
  bool tokens_match = false;
  bool digest_match = false;    // the record's logits_digest reproduced (false if it had none)
  int64_t first_mismatch = -1;  // index of the first output token that differs, -1 if none
  std::vector<int32_t> tokens;  // what the replay generated
  std::string digest;
};

std::vector<ReplayOutcome> replay_routing(Engine& engine, const RoutingFile& file,
                                          const ReplayOptions& options);

// Ids with no token in model_dir/tokenizer.json (what keel serve masks); empty without one.
std::vector<int32_t> untokenizable_ids(const std::string& model_dir, int64_t vocab_size);

}  // namespace keel
