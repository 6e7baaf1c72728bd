// Histogram, standard bounds and the Prometheus text builder (see metrics.h for the design).
#include "runtime/telemetry/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "kernels/base/check.h"

namespace keel::telemetry {

// ---- Histogram -----------------------------------------------------------------------------

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    if (!std::isfinite(bounds_[i]))
      throw_error("histogram bounds must be finite (+Inf is implicit); bound ", i, " is ",
                  bounds_[i]);
    if (i > 0 && !(bounds_[i] > bounds_[i - 1]))
      throw_error("histogram bounds must be strictly increasing; bound ", i, " (", bounds_[i],
                  ") <= bound ", i - 1, " (", bounds_[i - 1], ")");
  }
  counts_.assign(bounds_.size() + 1, 0);
}

void Histogram::observe_n(double value, uint64_t n) {
  if (std::isnan(value)) return;
  // First bound >= value: "le" semantics, a value on a bound belongs to that bound's bucket.
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  counts_[bucket] += n;
  count_ += n;
  sum_ += value * static_cast<double>(n);
}

void Histogram::merge(const Histogram& other) {
  if (other.bounds_ != bounds_)
    throw_error("cannot merge histograms with different bounds (", bounds_.size(), " vs ",
                other.bounds_.size(), " finite bounds, or different values)");
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  sum_ += other.sum_;
  count_ += other.count_;
}

std::vector<uint64_t> Histogram::cumulative() const {
  std::vector<uint64_t> out(counts_.size());
  uint64_t running = 0;
  for (size_t i = 0; i < counts_.size(); ++i) out[i] = running += counts_[i];
  return out;
}

double Histogram::quantile(double q) const {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (std::isnan(q)) return std::numeric_limits<double>::quiet_NaN();
  if (q < 0) return -kInf;
  if (q > 1) return kInf;
  // Prometheus needs at least one finite bucket besides +Inf, and some observations.
  if (bounds_.empty() || count_ == 0) return std::numeric_limits<double>::quiet_NaN();
  const std::vector<uint64_t> cum = cumulative();
  const double rank = q * static_cast<double>(count_);
  // Search the finite buckets only; none reaching rank means the +Inf bucket.
  size_t b = 0;
  while (b < bounds_.size() && static_cast<double>(cum[b]) < rank) ++b;
  if (b == bounds_.size()) return bounds_.back();
  if (b == 0 && bounds_[0] <= 0) return bounds_[0];
  const double lower = b == 0 ? 0.0 : bounds_[b - 1];
  const double upper = bounds_[b];
  const double below = b == 0 ? 0.0 : static_cast<double>(cum[b - 1]);
  const double in_bucket = static_cast<double>(cum[b]) - below;
  if (in_bucket == 0) return lower;  // rank == 0 only; see the header
  return lower + (upper - lower) * ((rank - below) / in_bucket);
}

void Histogram::reset() {
  std::fill(counts_.begin(), counts_.end(), 0);
  sum_ = 0.0;
  count_ = 0;
}

// ---- Standard bounds -----------------------------------------------------------------------

const std::vector<double>& latency_seconds_bounds() {
  static const std::vector<double> b = {0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                        0.1,   0.15,  0.2,   0.3,  0.4,  0.5,  0.75, 1,
                                        2.5,   5,     7.5,   10,   20,   40,   80};
  return b;
}

const std::vector<double>& vllm_ttft_seconds_bounds() {
  static const std::vector<double> b = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                        0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0};
  return b;
}

const std::vector<double>& vllm_tpot_seconds_bounds() {
  static const std::vector<double> b = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                        0.3,  0.4,   0.5,  0.75,  1.0, 2.5};
  return b;
}

const std::vector<double>& vllm_e2e_seconds_bounds() {
  static const std::vector<double> b = {1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0};
  return b;
}

const std::vector<double>& expert_compute_seconds_bounds() {
  // Written as literals, not m * 10^k: the product is often not the double nearest the
  // decimal (1.8 * 1e-6 != 1.8e-6), which would print as 1.8000000000000002e-06 in le labels.
  static const std::vector<double> b = {1e-6, 1.8e-6, 3.2e-6, 5.6e-6, 1e-5, 1.8e-5, 3.2e-5, 5.6e-5,
                                        1e-4, 1.8e-4, 3.2e-4, 5.6e-4, 1e-3, 1.8e-3, 3.2e-3, 5.6e-3,
                                        1e-2, 1.8e-2, 3.2e-2, 5.6e-2, 0.1,  0.18,   0.32,   0.56,
                                        1,    1.8,    3.2,    5.6,    10};
  return b;
}

const std::vector<double>& router_margin_bounds() {
  static const std::vector<double> b = {0,    1e-7, 1e-6, 1e-5, 1e-4, 1e-3,
                                        3e-3, 1e-2, 3e-2, 0.1,  0.3,  1};
  return b;
}

const std::vector<double>& count_bounds() {
  static const std::vector<double> b = [] {
    std::vector<double> v;
    for (int e = 0; e <= 16; ++e) v.push_back(static_cast<double>(int64_t{1} << e));
    return v;
  }();
  return b;
}

// ---- Formatting ----------------------------------------------------------------------------

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // 2^53: beyond it not every integer is representable, and to_chars' shortest form is the
  // honest rendering ("1e+20" rather than digits the double does not hold).
  constexpr double kExactIntegers = 9007199254740992.0;
  if (v == std::trunc(v) && std::fabs(v) < kExactIntegers)
    return std::to_string(static_cast<int64_t>(v));
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), v);
  return std::string(buffer, result.ptr);
}

std::string escape_label_value(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string escape_help(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

namespace {
bool is_alpha_(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

const char* type_name(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
    case MetricType::kUntyped:
      return "untyped";
  }
  return "untyped";
}
}  // namespace

bool valid_metric_name(const std::string& name) {
  if (name.empty() || !(is_alpha_(name[0]) || name[0] == ':')) return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return is_alpha_(c) || is_digit(c) || c == ':'; });
}

bool valid_label_name(const std::string& name) {
  if (name.empty() || !is_alpha_(name[0])) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return is_alpha_(c) || is_digit(c); });
}

// ---- PromText ------------------------------------------------------------------------------

void PromText::family(const std::string& name, MetricType type, const std::string& help) {
  if (!valid_metric_name(name))
    throw_error("invalid Prometheus metric name '", name,
                "' (must match [a-zA-Z_:][a-zA-Z0-9_:]*)");
  const auto it = index_.find(name);
  if (it != index_.end()) {
    const Family& existing = families_[it->second];
    if (existing.type != type || existing.help != help)
      throw_error("metric family '", name, "' redeclared with a different type or help");
    return;
  }
  index_.emplace(name, families_.size());
  families_.push_back(Family{name, type, help, {}, {}});
}

PromText::Family& PromText::checked_family(const std::string& name, bool histogram) {
  const auto it = index_.find(name);
  if (it == index_.end())
    throw_error("sample for undeclared metric family '", name, "' (call family() first)");
  Family& f = families_[it->second];
  if (histogram != (f.type == MetricType::kHistogram))
    throw_error("metric family '", name, "' is a ", type_name(f.type), ": use ",
                f.type == MetricType::kHistogram ? "histogram()" : "value()");
  return f;
}

namespace {
// "{a="x",b="y"" without the closing brace, so a histogram can append le; empty for no labels.
std::string open_label_set(const std::string& family, const Labels& labels, bool histogram) {
  std::string out;
  for (size_t i = 0; i < labels.size(); ++i) {
    const std::string& key = labels[i].first;
    if (!valid_label_name(key) || key.rfind("__", 0) == 0)
      throw_error("metric '", family, "': invalid label name '", key,
                  "' (must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __)");
    if (histogram && key == "le")
      throw_error("metric '", family, "': histograms reserve the label name 'le'");
    for (size_t j = 0; j < i; ++j)
      if (labels[j].first == key) throw_error("metric '", family, "': label '", key, "' twice");
    out += i == 0 ? "{" : ",";
    out += key;
    out += "=\"";
    out += escape_label_value(labels[i].second);
    out += '"';
  }
  return out;
}

std::string close_label_set(const std::string& open) {
  return open.empty() ? open : open + "}";
}
}  // namespace

void PromText::add_line(Family& f, const Labels& labels, const std::string& text) {
  const std::string label_set = close_label_set(open_label_set(f.name, labels, false));
  if (!f.series.insert(label_set).second)
    throw_error("metric '", f.name, "': series ", label_set.empty() ? "{}" : label_set,
                " added twice");
  f.body.append(f.name).append(label_set).append(" ").append(text).append("\n");
}

void PromText::value(const std::string& name, const Labels& labels, double v, bool allow_nan) {
  Family& f = checked_family(name, false);
  if (std::isnan(v) && !allow_nan)
    throw_error("metric '", name, "': NaN value (pass allow_nan if it is meant)");
  add_line(f, labels, format_value(v));
}

void PromText::add_integer(const std::string& name, const Labels& labels, const std::string& text) {
  add_line(checked_family(name, false), labels, text);
}

void PromText::histogram(const std::string& name, const Labels& labels, const Histogram& h) {
  Family& f = checked_family(name, true);
  const std::string open = open_label_set(name, labels, true);
  const std::string label_set = close_label_set(open);
  if (!f.series.insert(label_set).second)
    throw_error("metric '", name, "': series ", label_set.empty() ? "{}" : label_set,
                " added twice");
  const std::string le_prefix = open.empty() ? "{le=\"" : open + ",le=\"";
  const std::vector<uint64_t> cum = h.cumulative();
  std::string& out = f.body;
  const std::string bucket_prefix = name + "_bucket" + le_prefix;
  for (size_t i = 0; i < h.bounds().size(); ++i)
    out.append(bucket_prefix)
        .append(format_value(h.bounds()[i]))
        .append("\"} ")
        .append(std::to_string(cum[i]))
        .append("\n");
  out.append(bucket_prefix).append("+Inf\"} ").append(std::to_string(cum.back())).append("\n");
  out.append(name).append("_sum").append(label_set).append(" ").append(format_value(h.sum()));
  out.append("\n");
  out.append(name).append("_count").append(label_set).append(" ");
  out.append(std::to_string(h.count())).append("\n");
}

std::string PromText::str() const {
  std::string out;
  for (const Family& f : families_) {
    out += "# HELP " + f.name + " " + escape_help(f.help) + "\n";
    out += "# TYPE " + f.name + " " + type_name(f.type) + "\n";
    out += f.body;
  }
  return out;
}

// ---- JSON ----------------------------------------------------------------------------------

nlohmann::json histogram_json(const Histogram& h) {
  // nlohmann serializes NaN as null already; being explicit keeps the contract visible.
  const auto q = [&](double p) -> nlohmann::json {
    const double v = h.quantile(p);
    return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v);
  };
  return nlohmann::json{{"bounds", h.bounds()}, {"counts", h.counts()}, {"sum", h.sum()},
                        {"count", h.count()},   {"p50", q(0.5)},        {"p90", q(0.9)},
                        {"p99", q(0.99)}};
}

}  // namespace keel::telemetry
