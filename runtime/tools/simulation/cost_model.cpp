// Step-time models for keel simulate: the linear baseline and the calibration-table
// interpolator. Format and interpolation rules are documented in cost_model.h.
#include "runtime/tools/simulation/cost_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <tuple>

#include "kernels/base/check.h"

namespace keel::sim {

std::optional<double> expert_fraction_of(const StepCostModel& model) {
  if (const auto* source = dynamic_cast<const ExpertShareSource*>(&model))
    return source->expert_fraction();
  return std::nullopt;
}

double StepJitter::ratio_at(double u) const {
  const double position = std::clamp(u, 0.0, 1.0) * static_cast<double>(ratio_quantiles.size() - 1);
  const size_t below = std::min(static_cast<size_t>(position), ratio_quantiles.size() - 2);
  const double frac = position - static_cast<double>(below);
  return ratio_quantiles[below] + frac * (ratio_quantiles[below + 1] - ratio_quantiles[below]);
}

void validate_step_jitter(const StepJitter& jitter, const std::string& where) {
  if (jitter.ratio_quantiles.size() < 2)
    throw_error(where, ": step_jitter.ratio_quantiles needs at least 2 values");
  for (size_t i = 0; i < jitter.ratio_quantiles.size(); ++i) {
    const double ratio = jitter.ratio_quantiles[i];
    if (!(ratio > 0) || !std::isfinite(ratio))
      throw_error(where, ": step_jitter.ratio_quantiles[", i, "] must be a finite number > 0");
    if (i > 0 && ratio < jitter.ratio_quantiles[i - 1])
      throw_error(where, ": step_jitter.ratio_quantiles must be nondecreasing (index ", i, ")");
  }
  if (!(jitter.lag1_correlation >= 0.0 && jitter.lag1_correlation < 1.0))
    throw_error(where, ": step_jitter.lag1_correlation must be in [0, 1), got ",
                jitter.lag1_correlation);
}

namespace {

void check_fraction(const std::optional<double>& fraction, const std::string& where) {
  if (fraction && !(*fraction >= 0.0 && *fraction <= 1.0))
    throw_error(where, ": expert_fraction must be in [0, 1], got ", *fraction);
}

// Index i of the interval [axis[i], axis[i+1]] used for x, and the fractional offset in it
// (outside [0, 1] when x is outside the axis range). A single-value axis gives (0, 0).
std::pair<size_t, double> locate(const std::vector<double>& axis, double x) {
  if (axis.size() == 1) return {0, 0.0};
  size_t i = static_cast<size_t>(std::upper_bound(axis.begin(), axis.end(), x) - axis.begin());
  i = std::clamp<size_t>(i == 0 ? 0 : i - 1, 0, axis.size() - 2);
  return {i, (x - axis[i]) / (axis[i + 1] - axis[i])};
}

}  // namespace

LinearCostModel::LinearCostModel(double base_s, double per_token_s, double per_kv_token_s,
                                 std::optional<double> expert_fraction)
    : base_s_(base_s),
      per_token_s_(per_token_s),
      per_kv_token_s_(per_kv_token_s),
      expert_fraction_(expert_fraction) {
  if (!(base_s >= 0 && per_token_s >= 0 && per_kv_token_s >= 0) ||
      base_s + per_token_s + per_kv_token_s <= 0)
    throw_error("linear cost model: coefficients must be >= 0 and not all 0");
  check_fraction(expert_fraction, "linear cost model");
}

double LinearCostModel::step_seconds(const StepShape& shape) const {
  return base_s_ +
         per_token_s_ * static_cast<double>(shape.num_decode_tokens + shape.num_prefill_tokens) +
         per_kv_token_s_ * static_cast<double>(shape.kv_tokens_read);
}

CalibratedCostModel::CalibratedCostModel(std::vector<CalibrationPoint> points,
                                         Extrapolation extrapolation,
                                         std::optional<double> expert_fraction)
    : points_(std::move(points)), extrapolation_(extrapolation), expert_fraction_(expert_fraction) {
  if (points_.empty()) throw_error("calibration: no points");
  check_fraction(expert_fraction, "calibration");
  std::array<std::set<double>, 3> values;
  min_step_s_ = std::numeric_limits<double>::infinity();
  for (const CalibrationPoint& point : points_) {
    if (!(point.step_s > 0) || !std::isfinite(point.step_s))
      throw_error("calibration: step_s must be a finite number > 0, got ", point.step_s);
    if (point.num_decode_tokens < 0 || point.num_prefill_tokens < 0 || point.kv_tokens_read < 0)
      throw_error("calibration: negative coordinate");
    values[0].insert(static_cast<double>(point.num_decode_tokens));
    values[1].insert(static_cast<double>(point.num_prefill_tokens));
    values[2].insert(static_cast<double>(point.kv_tokens_read));
    min_step_s_ = std::min(min_step_s_, point.step_s);
  }
  for (size_t a = 0; a < 3; ++a) axes_[a].assign(values[a].begin(), values[a].end());
  grid_.assign(axes_[0].size() * axes_[1].size() * axes_[2].size(),
               std::numeric_limits<double>::quiet_NaN());
  auto index_of = [&](size_t a, int64_t v) {
    return static_cast<size_t>(
        std::lower_bound(axes_[a].begin(), axes_[a].end(), static_cast<double>(v)) -
        axes_[a].begin());
  };
  for (const CalibrationPoint& point : points_) {
    size_t cell = (index_of(0, point.num_decode_tokens) * axes_[1].size() +
                   index_of(1, point.num_prefill_tokens)) *
                      axes_[2].size() +
                  index_of(2, point.kv_tokens_read);
    if (!std::isnan(grid_[cell]))
      throw_error("calibration: duplicate point (num_decode_tokens ", point.num_decode_tokens,
                  ", num_prefill_tokens ", point.num_prefill_tokens, ", kv_tokens_read ",
                  point.kv_tokens_read, ")");
    grid_[cell] = point.step_s;
  }
  // kv slope: per (decode, prefill) node measured at two or more kv values, the time difference
  // between its extreme kv points per KV token; the median over nodes, floored at 0.
  std::vector<double> slopes;
  for (size_t d = 0; d < axes_[0].size(); ++d)
    for (size_t p = 0; p < axes_[1].size(); ++p) {
      size_t first = axes_[2].size(), last = 0;
      for (size_t k = 0; k < axes_[2].size(); ++k)
        if (!std::isnan(at(d, p, k))) {
          first = std::min(first, k);
          last = k;
        }
      if (first < last)
        slopes.push_back((at(d, p, last) - at(d, p, first)) / (axes_[2][last] - axes_[2][first]));
    }
  if (!slopes.empty()) {
    std::sort(slopes.begin(), slopes.end());
    kv_slope_ = std::max(0.0, slopes[slopes.size() / 2]);
  }
}

void CalibratedCostModel::set_step_jitter(std::optional<StepJitter> jitter) {
  if (jitter) validate_step_jitter(*jitter, "calibration");
  step_jitter_ = std::move(jitter);
}

double CalibratedCostModel::at(size_t d, size_t p, size_t k) const {
  return grid_[(d * axes_[1].size() + p) * axes_[2].size() + k];
}

double CalibratedCostModel::node_at(size_t d, size_t p, double kv) const {
  // The node's measured point nearest in kv, moved along the kv slope.
  double best_distance = std::numeric_limits<double>::infinity();
  double value = std::numeric_limits<double>::quiet_NaN();
  for (size_t k = 0; k < axes_[2].size(); ++k) {
    const double v = at(d, p, k);
    if (std::isnan(v)) continue;
    const double distance = std::abs(axes_[2][k] - kv);
    if (distance < best_distance) {
      best_distance = distance;
      value = v + kv_slope_ * (kv - axes_[2][k]);
    }
  }
  return value;
}

double CalibratedCostModel::step_seconds(const StepShape& shape) const {
  std::array<double, 3> query = {static_cast<double>(shape.num_decode_tokens),
                                 static_cast<double>(shape.num_prefill_tokens),
                                 static_cast<double>(shape.kv_tokens_read)};
  std::array<size_t, 3> cell{};
  std::array<double, 3> frac{};
  for (size_t a = 0; a < 3; ++a) {
    if (extrapolation_ == Extrapolation::kClamp)
      query[a] = std::clamp(query[a], axes_[a].front(), axes_[a].back());
    std::tie(cell[a], frac[a]) = locate(axes_[a], query[a]);
  }
  double value = 0.0;
  bool complete = true;
  for (int corner = 0; corner < 8 && complete; ++corner) {
    std::array<size_t, 3> idx{};
    double weight = 1.0;
    for (size_t a = 0; a < 3; ++a) {
      const bool upper = (corner >> a) & 1;
      if (axes_[a].size() == 1) {
        if (upper) weight = 0.0;
        idx[a] = 0;
        continue;
      }
      idx[a] = cell[a] + (upper ? 1 : 0);
      weight *= upper ? frac[a] : 1.0 - frac[a];
    }
    if (weight == 0.0) continue;
    const double v = at(idx[0], idx[1], idx[2]);
    if (std::isnan(v)) complete = false;
    value += weight * v;
  }
  if (!complete) {
    // A calibration grid is rarely complete in kv: a step's KV reads follow from its decode
    // batch and contexts, so (decode, prefill) nodes are measured at their own kv values. Then
    // interpolate bilinearly over (decode, prefill) with each node moved to the query's kv by
    // the fitted kv slope (kv_slope_).
    double bilinear = 0.0;
    bool nodes_complete = true;
    for (int corner = 0; corner < 4 && nodes_complete; ++corner) {
      double weight = 1.0;
      std::array<size_t, 2> idx{};
      for (size_t a = 0; a < 2; ++a) {
        const bool upper = (corner >> a) & 1;
        if (axes_[a].size() == 1) {
          if (upper) weight = 0.0;
          idx[a] = 0;
          continue;
        }
        idx[a] = cell[a] + (upper ? 1 : 0);
        weight *= upper ? frac[a] : 1.0 - frac[a];
      }
      if (weight == 0.0) continue;
      const double v = node_at(idx[0], idx[1], query[2]);
      if (std::isnan(v)) nodes_complete = false;
      bilinear += weight * v;
    }
    if (nodes_complete) return std::max(bilinear, min_step_s_);
  }
  if (!complete) {
    // Nearest measured point in fractional grid-index units.
    double best = std::numeric_limits<double>::infinity();
    std::array<double, 3> position{};
    for (size_t a = 0; a < 3; ++a)
      position[a] = static_cast<double>(cell[a]) + (axes_[a].size() == 1 ? 0.0 : frac[a]);
    for (size_t d = 0; d < axes_[0].size(); ++d)
      for (size_t p = 0; p < axes_[1].size(); ++p)
        for (size_t k = 0; k < axes_[2].size(); ++k) {
          const double v = at(d, p, k);
          if (std::isnan(v)) continue;
          const double dist = std::pow(position[0] - static_cast<double>(d), 2) +
                              std::pow(position[1] - static_cast<double>(p), 2) +
                              std::pow(position[2] - static_cast<double>(k), 2);
          if (dist < best) {
            best = dist;
            value = v;
          }
        }
  }
  return std::max(value, min_step_s_);
}

CalibratedCostModel CalibratedCostModel::from_json(const nlohmann::json& json,
                                                   const std::string& where) {
  if (!json.is_object()) throw_error(where, ": a calibration file is a JSON object");
  if (json.value("format", std::string()) != "keel-calibration")
    throw_error(where, ": \"format\" must be \"keel-calibration\"");
  if (!json.contains("version") || !json["version"].is_number_integer() || json["version"] != 1)
    throw_error(where, ": unsupported calibration \"version\" (this keel reads 1)");
  std::optional<double> fraction;
  if (json.contains("expert_fraction")) {
    if (!json["expert_fraction"].is_number())
      throw_error(where, ": \"expert_fraction\" must be a number");
    fraction = json["expert_fraction"].get<double>();
  }
  Extrapolation extrapolation = Extrapolation::kLinear;
  if (json.contains("extrapolation")) {
    const std::string mode =
        json["extrapolation"].is_string() ? json["extrapolation"].get<std::string>() : "";
    if (mode == "clamp")
      extrapolation = Extrapolation::kClamp;
    else if (mode != "linear")
      throw_error(where, ": \"extrapolation\" must be \"linear\" or \"clamp\"");
  }
  if (!json.contains("points") || !json["points"].is_array())
    throw_error(where, ": \"points\" must be an array");
  std::optional<StepJitter> jitter;
  if (json.contains("step_jitter")) {
    const nlohmann::json& entry = json["step_jitter"];
    if (!entry.is_object() || !entry.contains("ratio_quantiles") ||
        !entry["ratio_quantiles"].is_array())
      throw_error(where, ": \"step_jitter\" must be an object with a \"ratio_quantiles\" array");
    StepJitter parsed;
    for (const auto& value : entry["ratio_quantiles"]) {
      if (!value.is_number()) throw_error(where, ": step_jitter.ratio_quantiles must hold numbers");
      parsed.ratio_quantiles.push_back(value.get<double>());
    }
    if (entry.contains("lag1_correlation")) {
      if (!entry["lag1_correlation"].is_number())
        throw_error(where, ": step_jitter.lag1_correlation must be a number");
      parsed.lag1_correlation = entry["lag1_correlation"].get<double>();
    }
    validate_step_jitter(parsed, where);
    jitter = std::move(parsed);
  }
  std::vector<CalibrationPoint> points;
  size_t index = 0;
  for (const auto& entry : json["points"]) {
    auto integer = [&](const char* key) -> int64_t {
      if (!entry.is_object() || !entry.contains(key) || !entry[key].is_number_integer())
        throw_error(where, ": points[", index, "]: \"", key, "\" must be an integer");
      return entry[key].get<int64_t>();
    };
    CalibrationPoint point;
    point.num_decode_tokens = integer("num_decode_tokens");
    point.num_prefill_tokens = integer("num_prefill_tokens");
    point.kv_tokens_read = integer("kv_tokens_read");
    if (!entry.contains("step_s") || !entry["step_s"].is_number())
      throw_error(where, ": points[", index, "]: \"step_s\" must be a number");
    point.step_s = entry["step_s"].get<double>();
    points.push_back(point);
    ++index;
  }
  try {
    CalibratedCostModel model(std::move(points), extrapolation, fraction);
    model.set_step_jitter(std::move(jitter));
    return model;
  } catch (const Error& error) {
    throw_error(where, ": ", error.what());
  }
}

CalibratedCostModel CalibratedCostModel::load(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw_error("cannot open calibration file ", path);
  nlohmann::json json = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) throw_error("calibration file ", path, ": not valid JSON");
  return from_json(json, "calibration file " + path);
}

nlohmann::json CalibratedCostModel::to_json() const {
  nlohmann::json points = nlohmann::json::array();
  for (const CalibrationPoint& point : points_)
    points.push_back({{"num_decode_tokens", point.num_decode_tokens},
                      {"num_prefill_tokens", point.num_prefill_tokens},
                      {"kv_tokens_read", point.kv_tokens_read},
                      {"step_s", point.step_s}});
  nlohmann::json out = {
      {"format", "keel-calibration"},
      {"version", 1},
      {"extrapolation", extrapolation_ == Extrapolation::kClamp ? "clamp" : "linear"},
      {"points", points}};
  if (expert_fraction_) out["expert_fraction"] = *expert_fraction_;
  if (step_jitter_)
    out["step_jitter"] = {{"ratio_quantiles", step_jitter_->ratio_quantiles},
                          {"lag1_correlation", step_jitter_->lag1_correlation}};
  return out;
}

}  // namespace keel::sim
