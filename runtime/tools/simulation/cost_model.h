// Step-time models for the serving simulator (keel simulate).
//
// Design note. The simulator asks one question per engine step: how long does a step of this
// shape take? StepShape / StepCostModel are the interface `keel plan` (runtime/tools/planning/
// perf_model.h, namespace keel::planning) provides. When the build has keel_planning,
// runtime/tools/simulation/CMakeLists.txt defines KEEL_SIMULATION_USE_PERF_MODEL and they are taken
// from perf_model.h (aliased into keel::sim); without it the same two types are declared here.
//
// StepShape, as the simulator fills it from a StepPlan (see simulator.h):
//   num_seqs            sequences in the step
//   num_decode_tokens   sequences fed exactly one token (decode)
//   num_prefill_tokens  tokens of the other sequences (prefill chunks, recompute after
//                       preemption)
//   kv_tokens_read      sum over sequences of (last position fed + 1): the context each
//                       sequence's attention reads from the KV cache in this step
//
// Two models live here:
//   LinearCostModel     step_s = base + per_token * (decode + prefill tokens)
//                              + per_kv_token * kv_tokens_read   (a hand-computable baseline)
//   CalibratedCostModel interpolation over measured step times (`keel calibrate` writes the file)
//
// ---------------------------------------------------------------------------------------------
// Calibration file format (JSON), version 1:
//   {
//     "format": "keel-calibration",          required, exactly this string
//     "version": 1,                          required
//     "expert_fraction": 0.55,               optional, in [0, 1]: share of step time spent in
//                                            routed-expert GEMMs (the simulator's MoE skew
//                                            factor scales this share; see simulator.h)
//     "extrapolation": "linear",             optional: "linear" (default) or "clamp"
//     "step_jitter": {                       optional: how served steps scatter around their
//       "ratio_quantiles": [0.76, ..., 1.9], shape's median: >= 2 nondecreasing ratios > 0,
//                                            evenly spaced quantiles from q=0 to q=1 of (step
//                                            time / median time of steps of that shape)
//       "lag1_correlation": 0.6              in [0, 1): correlation of consecutive steps'
//     },                                     log ratios (slow steps come in runs)
//     "points": [                            required, >= 1 measured steps
//       {"num_decode_tokens": 8, "num_prefill_tokens": 0, "kv_tokens_read": 4096,
//        "step_s": 0.0123,                   required, seconds (> 0): the median is advised
//        ...}                                other keys (num_seqs, samples, p90_step_s, ...)
//     ],                                     are kept for humans and ignored
//     ...                                    any other top-level keys (model, tp, backend,
//   }                                        git_revision, created_unix) are ignored
// The grid's axes are the sorted distinct values of each of the three coordinates over all
// points; a (decode, prefill, kv) combination appears at most once. Cells need not all be
// measured.
//
// Interpolation (CalibratedCostModel::step_seconds): per axis, the query's cell is the grid
// interval [a_i, a_{i+1}] holding it (the first/last interval outside the axis range; an axis
// with a single value contributes weight 1 to it). When all 2^3 corners of that cell were
// measured the result is trilinear interpolation; outside the grid the same formula
// extrapolates linearly from the edge cell ("linear") or the query is clamped to the axis range
// first ("clamp"). When some corner is missing (the usual case for grids from keel calibrate,
// whose kv values follow from decode x context + prefill) the result is bilinear over the
// (decode, prefill) cell, each corner node taken at its measured point nearest in kv and moved
// to the query's kv along the kv slope (the median over nodes measured at two or more kv values
// of their time difference per KV token, floored at 0). When a corner node has no measured
// point at all, the value of the nearest measured point is used, distance measured in
// grid-index units (fractional index along each axis). The result is never below the smallest
// measured step time.
// ---------------------------------------------------------------------------------------------
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#if defined(KEEL_SIMULATION_USE_PERF_MODEL)
#include "runtime/tools/planning/perf_model.h"
namespace keel::sim {
using planning::StepCostModel;
using planning::StepShape;
}  // namespace keel::sim
#else
namespace keel::sim {
struct StepShape {
  int64_t num_seqs = 0;
  int64_t num_decode_tokens = 0;
  int64_t num_prefill_tokens = 0;
  int64_t kv_tokens_read = 0;
};
class StepCostModel {
 public:
  virtual ~StepCostModel() = default;
  virtual double step_seconds(const StepShape& shape) const = 0;
};
}  // namespace keel::sim
#endif

namespace keel::sim {

// Implemented by cost models that know which share of a step the routed experts take.
class ExpertShareSource {
 public:
  virtual ~ExpertShareSource() = default;
  virtual std::optional<double> expert_fraction() const = 0;
};
// The model's expert fraction when it exposes one (ExpertShareSource), else nullopt.
std::optional<double> expert_fraction_of(const StepCostModel& model);

// Step-to-step scatter of real step times around the model's (median) time, measured from a
// server's own steps (keel calibrate --from-url). The simulator multiplies each step's time by
// a ratio drawn from this distribution, consecutive draws correlated (see simulator.h).
struct StepJitter {
  std::vector<double> ratio_quantiles;  // evenly spaced quantiles q = 0..1, nondecreasing, > 0
  double lag1_correlation = 0.0;        // of consecutive log ratios, in [0, 1)
  // The ratio at quantile u in [0, 1], linear between the stored quantiles.
  double ratio_at(double u) const;
};
// Throws keel::Error naming `where` when the jitter is malformed.
void validate_step_jitter(const StepJitter& jitter, const std::string& where);

class LinearCostModel : public StepCostModel, public ExpertShareSource {
 public:
  LinearCostModel(double base_s, double per_token_s, double per_kv_token_s,
                  std::optional<double> expert_fraction = std::nullopt);
  double step_seconds(const StepShape& shape) const override;
  std::optional<double> expert_fraction() const override { return expert_fraction_; }

 private:
  double base_s_, per_token_s_, per_kv_token_s_;
  std::optional<double> expert_fraction_;
};

struct CalibrationPoint {
  int64_t num_decode_tokens = 0;
  int64_t num_prefill_tokens = 0;
  int64_t kv_tokens_read = 0;
  double step_s = 0.0;
};

class CalibratedCostModel : public StepCostModel, public ExpertShareSource {
 public:
  enum class Extrapolation : uint8_t { kLinear, kClamp };
  // Throws keel::Error for no points, duplicates, non-positive or non-finite times.
  CalibratedCostModel(std::vector<CalibrationPoint> points,
                      Extrapolation extrapolation = Extrapolation::kLinear,
                      std::optional<double> expert_fraction = std::nullopt);
  // Parses the format above; `where` prefixes error messages (e.g. the file name).
  static CalibratedCostModel from_json(const nlohmann::json& json, const std::string& where);
  // Throws keel::Error naming the file on a read or format error.
  static CalibratedCostModel load(const std::string& path);
  nlohmann::json to_json() const;

  double step_seconds(const StepShape& shape) const override;
  std::optional<double> expert_fraction() const override { return expert_fraction_; }
  const std::vector<CalibrationPoint>& points() const { return points_; }
  const std::optional<StepJitter>& step_jitter() const { return step_jitter_; }
  void set_step_jitter(std::optional<StepJitter> jitter);

 private:
  double at(size_t d, size_t p, size_t k) const;  // NaN when unmeasured
  // The (decode, prefill) node's time at kv: its measured point nearest in kv plus kv_slope_
  // times the kv difference; NaN when the node has no measured point.
  double node_at(size_t d, size_t p, double kv) const;
  double kv_slope_ = 0.0;  // seconds per KV token read: median over nodes measured at 2+ kv
  std::vector<CalibrationPoint> points_;
  std::array<std::vector<double>, 3> axes_;  // decode, prefill, kv
  std::vector<double> grid_;                 // [d][p][k], NaN = unmeasured
  Extrapolation extrapolation_;
  std::optional<double> expert_fraction_;
  std::optional<StepJitter> step_jitter_;
  double min_step_s_ = 0.0;
};

}  // namespace keel::sim
