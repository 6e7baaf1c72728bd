// keel_telemetry metrics: histograms, standard bucket bounds, Prometheus text exposition and
// JSON summaries.
//
// Design:
//  - Histogram is a plain value type with no locks: each rank (or thread) owns one and is its
//    only writer; whoever publishes merges the per-rank copies (merge() requires identical
//    bounds). observe() is a binary search plus two adds, cheap enough for the decode loop.
//  - Buckets follow Prometheus semantics: bucket i counts values v <= bounds[i] (an "le"
//    bucket) that are above bounds[i-1]; a final implicit +Inf bucket takes the rest. Counts are
//    stored per bucket (not cumulative) so merging is an element-wise add; the exposition makes
//    them cumulative.
//  - PromText only formats: it holds no live metrics and takes values at str()-building time,
//    so the owners of counters (ServingStats, per-rank histograms) stay where they are and the
//    /metrics handler snapshots them into one PromText per scrape.
//  - Dependencies: keel_base (keel::Error) and nlohmann_json only, so any layer may link it.
#pragma once

#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::telemetry {

// ---- Histogram -----------------------------------------------------------------------------

class Histogram {
 public:
  // bounds: finite, strictly increasing upper bounds (+Inf is implicit and must not be listed);
  // may be empty (then everything lands in +Inf). Throws keel::Error otherwise.
  explicit Histogram(std::vector<double> bounds);

  // Counts value in the first bucket whose bound is >= value (Prometheus "le"). NaN is
  // ignored: it would poison sum forever and belongs to no bucket. +/-Inf are counted (+Inf in
  // the +Inf bucket, -Inf in the first) and make sum infinite, as in Prometheus' clients.
  void observe(double value) { observe_n(value, 1); }
  // n observations of the same value (e.g. one expert-compute time shared by n tokens); sum
  // grows by value * n.
  void observe_n(double value, uint64_t n);

  // Adds other's counts, sum and count into this one. Throws keel::Error unless the bounds are
  // identical (same length, bit-equal values).
  void merge(const Histogram& other);

  // Estimated q-quantile, computed like PromQL's histogram_quantile() over the cumulative
  // buckets (promql/quantile.go, bucketQuantile):
  //   rank = q * count; b = first bucket whose cumulative count >= rank;
  //   if b is the +Inf bucket: return the highest finite bound;
  //   if b == 0 and bounds[0] <= 0: return bounds[0];
  //   else linear interpolation inside b, assuming observations are spread uniformly over
  //   (lower, upper] with lower = bounds[b-1] (0 for the first bucket):
  //     lower + (upper - lower) * (rank - cum[b-1]) / (cum[b] - cum[b-1]).
  // q < 0 gives -Inf, q > 1 +Inf, NaN q / empty histogram / no finite bounds give NaN.
  // One deviation: a bucket b with zero observations (only possible when rank == 0, i.e.
  // q == 0) returns its lower edge instead of Prometheus' 0/0 = NaN.
  double quantile(double q) const;

  void reset();

  const std::vector<double>& bounds() const { return bounds_; }
  // Per-bucket (non-cumulative) counts; size bounds().size() + 1, the last is the +Inf bucket.
  const std::vector<uint64_t>& counts() const { return counts_; }
  // Running totals: cumulative()[i] = counts()[0] + ... + counts()[i].
  std::vector<uint64_t> cumulative() const;
  uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0.0;
  uint64_t count_ = 0;
};

// ---- Standard bounds -----------------------------------------------------------------------
// Each returns a reference to a static vector (valid for the program's lifetime).

// Request latencies in seconds (TTFT, inter-token latency, end-to-end): resolves milliseconds
// near the bottom and reaches 80 s. The union of vLLM's v0 TTFT buckets and time-per-output-
// token buckets (vllm/engine/metrics.py), plus 0.002 and the 20/40/80 s tail vLLM later added
// to TTFT, so one bucket set serves all three request latencies and they can be compared:
// 0.001 0.002 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1 2.5 5 7.5 10 20 40
// 80.
const std::vector<double>& latency_seconds_bounds();
// vLLM's own lists (vllm/engine/metrics.py, v0 engine), for dashboards shared with vLLM:
//   vllm:time_to_first_token_seconds  0.001 .. 10 (16 bounds)
//   vllm:time_per_output_token_seconds 0.01 .. 2.5 (13 bounds)
//   vllm:e2e_request_latency_seconds   1 .. 60 (10 bounds)
const std::vector<double>& vllm_ttft_seconds_bounds();
const std::vector<double>& vllm_tpot_seconds_bounds();
const std::vector<double>& vllm_e2e_seconds_bounds();
// Expert (or any kernel) compute time in seconds: 1e-6 .. 10, four bounds per decade at
// 1, 1.8, 3.2, 5.6 x 10^k (10^(i/4) rounded to two digits, within 1.2% of exact log spacing;
// round values keep the le labels short and exact in decimal). 29 bounds.
const std::vector<double>& expert_compute_seconds_bounds();
// Router margin: the probability gap between the k-th and (k+1)-th expert, in [0, 1]. A gap
// below ~1e-6 is where last-bit reduction differences can flip the choice, hence the
// resolution at the bottom: 0 1e-7 1e-6 1e-5 1e-4 1e-3 3e-3 1e-2 3e-2 0.1 0.3 1.
const std::vector<double>& router_margin_bounds();
// Batch sizes and token counts: powers of two 1, 2, 4, .., 65536 (17 bounds).
const std::vector<double>& count_bounds();

// ---- Prometheus text exposition --------------------------------------------------------------

using Labels = std::vector<std::pair<std::string, std::string>>;

enum class MetricType { kCounter, kGauge, kHistogram, kUntyped };

// Builds Prometheus text exposition format 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/). Families print in the order
// of their first family() call, each with one HELP and one TYPE line followed by all of its
// samples in insertion order, however samples of different families were interleaved.
// Everything is validated when added (keel::Error), so str() cannot fail:
//  - metric names match [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]* and do
//    not start with "__" (reserved); no label name twice in a sample; histograms may not use
//    "le"; one series (name + label set) at most once;
//  - a sample's family must be declared first, with the matching kind (value() for counters,
//    gauges and untyped, histogram() for histograms); redeclaring a family is allowed only
//    with the same type and help.
// Not enforced, but `promtool check metrics` lints them: counters should end in _total,
// names should be snake_case with base units (_seconds, _bytes), every family needs help.
// Timestamps are not emitted (Prometheus stamps at scrape time).
class PromText {
 public:
  void family(const std::string& name, MetricType type, const std::string& help);

  // A counter, gauge or untyped sample. Values print as integers when they are integral and
  // exactly representable (|v| < 2^53), otherwise in the shortest form that round-trips
  // (std::to_chars), +Inf/-Inf as such. NaN throws keel::Error unless allow_nan (a NaN gauge is
  // legal in the format but is almost always a bug upstream).
  void value(const std::string& name, const Labels& labels, double v, bool allow_nan = false);
  // Integer overload so 64-bit counters print exactly (a template, so that an int argument
  // picks it rather than being ambiguous between int64_t and double).
  template <std::integral T>
  void value(const std::string& name, const Labels& labels, T v) {
    add_integer(name, labels, std::to_string(v));
  }

  // name_bucket{labels...,le="b"} cumulative for every bound and le="+Inf", then name_sum and
  // name_count, in that order.
  void histogram(const std::string& name, const Labels& labels, const Histogram& h);

  std::string str() const;

 private:
  struct Family {
    std::string name;
    MetricType type;
    std::string help;
    std::string body;                        // formatted sample lines
    std::unordered_set<std::string> series;  // formatted label sets already present
  };
  Family& checked_family(const std::string& name, bool histogram);
  void add_integer(const std::string& name, const Labels& labels, const std::string& text);
  void add_line(Family& family, const Labels& labels, const std::string& text);

  std::vector<Family> families_;
  std::map<std::string, size_t> index_;
};

// Number formatting shared by the exposition and tests: integral |v| < 2^53 as an integer,
// otherwise shortest round-trip (std::to_chars), "+Inf", "-Inf", "NaN".
std::string format_value(double v);
// Escaping per the 0.0.4 format: label values escape \ " and newline; HELP escapes \ and
// newline.
std::string escape_label_value(const std::string& s);
std::string escape_help(const std::string& s);
bool valid_metric_name(const std::string& name);
bool valid_label_name(const std::string& name);

// ---- JSON ----------------------------------------------------------------------------------

// {"bounds":[...], "counts":[... per bucket, last = +Inf bucket], "sum":s, "count":n,
//  "p50":x, "p90":x, "p99":x}; the quantiles are quantile() estimates, null when NaN (empty).
nlohmann::json histogram_json(const Histogram& h);

}  // namespace keel::telemetry
