// keel calibrate: measure keel's own engine step times on a grid of step shapes and write the
// calibration file keel simulate interpolates (format: runtime/tools/simulation/cost_model.h).
//
// Each grid point is one synthetic step driven through Engine::serve, exactly as the server
// drives steps (header + payload broadcast, forward on every rank, logits gathered to the
// leader): `decode` sequences feeding one token each at context `context` (their earlier KV
// slots exist in the pool; their contents do not matter for time) plus, when `prefill` > 0, one
// sequence feeding a `prefill`-token chunk from position 0. The step's time is measured on the
// leader from the end of planning to the logits in hand; the point's value is the median of
// `repeats` runs after one warm-up. kv_tokens_read = decode * context + prefill (the
// simulator's definition: sum over sequences of last position + 1). The expert share of a step
// (for the simulator's MoE skew model) comes from the ranks' phase timers. Token ids vary by
// (sequence, position) so a decode batch touches as many distinct experts as real traffic does
// (identical tokens would route every sequence to the same experts and make batches look
// cheap), and every logits row is sampled (greedy, with its logprob) as the server does.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine/engine.h"

namespace keel {

struct CalibrationGrid {
  std::vector<int64_t> decode = {1, 2, 4, 8, 16, 32};
  std::vector<int64_t> prefill = {0, 64, 256};
  std::vector<int64_t> context = {64, 512};
  int64_t repeats = 5;
  int64_t block_size = 16;
};

// Runs the grid (every process of the group must call it; only the leader's result is filled)
// and returns the calibration JSON (format "keel-calibration", version 1).
nlohmann::json calibrate_engine(Engine& engine, const CalibrationGrid& grid);

// The calibration from a server's own step records (the "steps" array of /v1/telemetry/steps,
// in id order; `keel calibrate --from-url`): what its steps really took under the load it
// served, sampling, streaming and every thread competing for the cores included.
//  - A step's cost is its time plus the gap before the next step when the engine went straight
//    on (serving overhead between steps: finishing, telemetry, admission, planning); a step
//    followed by an idle wait gets the median gap.
//  - One point per (decode tokens, prefill tokens) seen >= min_samples times: the median cost
//    and the median KV tokens read of those steps ("median_s", "samples"). Points with a
//    prefill chunk take as "step_s" the weighted least-squares line over decode tokens through
//    the medians of all shapes with that prefill count (weights: sample counts) when that count
//    was seen at >= 2 decode counts in >= 10 steps: such steps are few per shape, and their
//    medians scatter more than the line does.
//  - step_jitter (format in runtime/tools/simulation/cost_model.h) when >= 100 steps belong to
//  shapes
//    seen >= 5 times: quantiles q = 0, 0.01, .., 1 of cost / median cost of the step's shape,
//    and the lag-1 correlation of consecutive steps' log ratios (clamped to [0, 0.99]).
// Throws keel::Error when a record lacks a field or no shape has min_samples steps.
nlohmann::json calibration_from_served_steps(const nlohmann::json& steps, int64_t min_samples);

}  // namespace keel
