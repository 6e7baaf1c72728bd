// keel_telemetry: histogram bucketing, merging and quantiles; the Prometheus text exposition
// (exact text, escaping, validation, and `promtool check metrics` on a large exposition); the
// JSON summary; Chrome trace files; the /metrics scrape cache (one render per interval for any
// number of concurrent scrapers, never a scraper queued behind another's render).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/telemetry/metrics.h"
#include "runtime/telemetry/scrape_cache.h"
#include "runtime/telemetry/trace.h"

namespace keel::telemetry {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("keel_test_telemetry_" + std::to_string(getpid()) + "_" + name))
      .string();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Deterministic pseudo-random values (no <random> distribution: those differ across standard
// libraries, and the merge test wants the same stream everywhere).
struct Lcg {
  uint64_t state;
  uint64_t next() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 11;  // 53 bits
  }
  double uniform() { return static_cast<double>(next()) * 0x1.0p-53; }
};

// ---- Histogram: bucketing -------------------------------------------------------------------

TEST(Histogram, LeBucketsIncludingEdges) {
  Histogram h({1, 2, 5});
  // Bucket 0 (<= 1): -3, 0.5, 1 (on the edge).
  // Bucket 1 (1, 2]: nextafter(1, 2) (just above an edge), 2 (edge).
  // Bucket 2 (2, 5]: 3, 5 (edge), 5 again via observe_n(5, 2).
  // +Inf: 5.000001, 100, +Inf.
  // -Inf goes to bucket 0; NaN is dropped.
  for (const double v : {-3.0, 0.5, 1.0, std::nextafter(1.0, 2.0), 2.0, 3.0, 5.0, 5.000001, 100.0,
                         kInf, -kInf, kNaN})
    h.observe(v);
  h.observe_n(5.0, 2);
  EXPECT_EQ(h.counts(), (std::vector<uint64_t>{4, 2, 4, 3}));
  EXPECT_EQ(h.cumulative(), (std::vector<uint64_t>{4, 6, 10, 13}));
  EXPECT_EQ(h.count(), 13u);
  EXPECT_TRUE(std::isnan(h.sum()));  // +Inf + -Inf; finite-only below

  Histogram finite({1, 2, 5});
  for (const double v : {0.5, 1.0, 2.0, 4.0}) finite.observe(v);
  finite.observe_n(10.0, 3);
  EXPECT_EQ(finite.counts(), (std::vector<uint64_t>{2, 1, 1, 3}));
  EXPECT_EQ(finite.sum(), 0.5 + 1.0 + 2.0 + 4.0 + 30.0);  // all exact in binary
  EXPECT_EQ(finite.count(), 7u);

  finite.reset();
  EXPECT_EQ(finite.counts(), (std::vector<uint64_t>{0, 0, 0, 0}));
  EXPECT_EQ(finite.count(), 0u);
  EXPECT_EQ(finite.sum(), 0.0);
}

TEST(Histogram, NoFiniteBoundsAndStandardBoundsAreValid) {
  Histogram only_inf({});
  only_inf.observe(3);
  EXPECT_EQ(only_inf.counts(), (std::vector<uint64_t>{1}));
  EXPECT_TRUE(std::isnan(only_inf.quantile(0.5)));

  // Every standard list constructs (strictly increasing, finite) and has its documented size.
  EXPECT_EQ(Histogram(latency_seconds_bounds()).bounds().size(), 23u);
  EXPECT_EQ(Histogram(vllm_ttft_seconds_bounds()).bounds().size(), 16u);
  EXPECT_EQ(Histogram(vllm_tpot_seconds_bounds()).bounds().size(), 13u);
  EXPECT_EQ(Histogram(vllm_e2e_seconds_bounds()).bounds().size(), 10u);
  EXPECT_EQ(Histogram(expert_compute_seconds_bounds()).bounds().size(), 29u);
  EXPECT_EQ(Histogram(router_margin_bounds()).bounds().size(), 12u);
  EXPECT_EQ(Histogram(count_bounds()).bounds().size(), 17u);
  EXPECT_EQ(expert_compute_seconds_bounds().front(), 1e-6);
  EXPECT_EQ(expert_compute_seconds_bounds().back(), 10.0);
  EXPECT_EQ(count_bounds().back(), 65536.0);
  EXPECT_EQ(router_margin_bounds().front(), 0.0);
  EXPECT_EQ(router_margin_bounds().back(), 1.0);
  // Round decimal bounds print as written in le labels.
  EXPECT_EQ(format_value(expert_compute_seconds_bounds()[1]), "1.8e-06");
  EXPECT_EQ(format_value(expert_compute_seconds_bounds()[22]), "0.32");
}

TEST(Histogram, RejectsBadBounds) {
  EXPECT_THROW(Histogram({1, 1}), Error);
  EXPECT_THROW(Histogram({2, 1}), Error);
  EXPECT_THROW(Histogram({1, kInf}), Error);
  EXPECT_THROW(Histogram({kNaN}), Error);
  EXPECT_NO_THROW(Histogram({-1, 0, 1e-300, 1}));
}

// ---- Histogram: merging ---------------------------------------------------------------------

TEST(Histogram, MergeOfFourRanksEqualsOneHistogram) {
  const std::vector<double>& bounds = latency_seconds_bounds();
  constexpr int kRanks = 4;
  constexpr int kPerRank = 5000;
  // Values spread log-uniformly over 1e-4 .. 100 s so every bucket incl. +Inf is hit; every
  // 50th value sits exactly on a bound to exercise the edges.
  Lcg lcg{42};
  std::vector<std::vector<double>> values(kRanks);
  for (int r = 0; r < kRanks; ++r)
    for (int i = 0; i < kPerRank; ++i)
      values[r].push_back(i % 50 == 0 ? bounds[(r * kPerRank + i) % bounds.size()]
                                      : std::pow(10.0, -4.0 + 6.0 * lcg.uniform()));

  std::vector<Histogram> ranks(kRanks, Histogram(bounds));
  Histogram all(bounds);
  for (int r = 0; r < kRanks; ++r)
    for (const double v : values[r]) {
      ranks[r].observe(v);
      all.observe(v);
    }
  Histogram merged(bounds);
  for (const Histogram& h : ranks) merged.merge(h);

  // Exact: per-bucket counts and the total count (integers; addition order is irrelevant).
  EXPECT_EQ(merged.counts(), all.counts());
  EXPECT_EQ(merged.count(), all.count());
  EXPECT_EQ(merged.count(), static_cast<uint64_t>(kRanks * kPerRank));
  for (const uint64_t c : merged.counts()) EXPECT_GT(c, 0u);
  // Exact: the sum when the reference adds in the same order as merge does, i.e. each rank's
  // values left to right into its own partial sum, then 0 + s0 + s1 + s2 + s3.
  double same_order = 0.0;
  for (int r = 0; r < kRanks; ++r) {
    double partial = 0.0;
    for (const double v : values[r]) partial += v;
    same_order += partial;
  }
  EXPECT_EQ(merged.sum(), same_order);
  // Not exact in general: one histogram fed everything sums in a different order (floating-
  // point addition is not associative), so only close.
  EXPECT_NEAR(merged.sum(), all.sum(), 1e-12 * all.sum());

  // When every partial sum is exactly representable (multiples of 2^-10 below 2^20), the order
  // no longer matters and all three agree bit for bit.
  std::vector<Histogram> dyadic_ranks(kRanks, Histogram(bounds));
  Histogram dyadic_all(bounds);
  for (int r = 0; r < kRanks; ++r)
    for (int i = 0; i < kPerRank; ++i) {
      const double v = static_cast<double>(lcg.next() % 100000) * 0x1.0p-10;
      dyadic_ranks[r].observe(v);
      dyadic_all.observe(v);
    }
  Histogram dyadic_merged(bounds);
  for (const Histogram& h : dyadic_ranks) dyadic_merged.merge(h);
  EXPECT_EQ(dyadic_merged.sum(), dyadic_all.sum());
  EXPECT_EQ(dyadic_merged.counts(), dyadic_all.counts());
}

TEST(Histogram, MergeRequiresIdenticalBounds) {
  Histogram a({1, 2});
  EXPECT_THROW(a.merge(Histogram({1, 3})), Error);
  EXPECT_THROW(a.merge(Histogram({1})), Error);
  EXPECT_THROW(a.merge(Histogram({1, 2, 3})), Error);
  Histogram b({1, 2});
  b.observe(1.5);
  a.merge(b);
  EXPECT_EQ(a.counts(), (std::vector<uint64_t>{0, 1, 0}));
}

// ---- Histogram: quantiles -------------------------------------------------------------------

TEST(Histogram, QuantilesMatchHandComputedPrometheusEstimates) {
  // bounds 1, 2, 4, 8; observations: 0.5 x2, 1.5 x3, 3 x4, 6 x1
  //   per bucket  {2, 3, 4, 1, 0}; cumulative {2, 5, 9, 10, 10}; count 10.
  Histogram h({1, 2, 4, 8});
  h.observe_n(0.5, 2);
  h.observe_n(1.5, 3);
  h.observe_n(3, 4);
  h.observe(6);
  // q=0.1:  rank 1;   first cum >= 1 is bucket 0 (0, 1]:  0 + (1-0) * (1-0)/2     = 0.5
  EXPECT_DOUBLE_EQ(h.quantile(0.1), 0.5);
  // q=0.25: rank 2.5; bucket 1 (1, 2], cum below 2:        1 + (2-1) * (2.5-2)/3   = 1.1666..
  EXPECT_DOUBLE_EQ(h.quantile(0.25), 1.0 + 0.5 / 3.0);
  // q=0.5:  rank 5;   bucket 1 (cum 5 >= 5):                1 + 1 * (5-2)/3         = 2
  EXPECT_DOUBLE_EQ(h.quantile(0.5), 2.0);
  // q=0.9:  rank 9;   bucket 2 (2, 4], below 5, 4 inside:  2 + 2 * (9-5)/4         = 4
  EXPECT_DOUBLE_EQ(h.quantile(0.9), 4.0);
  // q=0.95: rank 9.5; bucket 3 (4, 8], below 9, 1 inside:  4 + 4 * (9.5-9)/1       = 6
  EXPECT_DOUBLE_EQ(h.quantile(0.95), 6.0);
  // q=1:    rank 10;  bucket 3 (cum 10):                    4 + 4 * 1/1             = 8
  EXPECT_DOUBLE_EQ(h.quantile(1.0), 8.0);
  // q=0:    rank 0;   bucket 0:                             0 + 1 * 0/2             = 0
  EXPECT_DOUBLE_EQ(h.quantile(0.0), 0.0);

  // One observation above the last bound: count 11, cumulative {2, 5, 9, 10, 11}.
  h.observe(100);
  // q=0.99: rank 10.89; no finite bucket reaches it -> the +Inf bucket -> highest finite bound.
  EXPECT_DOUBLE_EQ(h.quantile(0.99), 8.0);
  // q=0.5:  rank 5.5; bucket 2 (2, 4], below 5, 4 inside:  2 + 2 * 0.5/4           = 2.25
  EXPECT_DOUBLE_EQ(h.quantile(0.5), 2.25);

  EXPECT_EQ(h.quantile(-0.1), -kInf);
  EXPECT_EQ(h.quantile(1.1), kInf);
  EXPECT_TRUE(std::isnan(h.quantile(kNaN)));
  EXPECT_TRUE(std::isnan(Histogram({1, 2}).quantile(0.5)));  // no observations

  // First bound <= 0 and the rank falls in the first bucket: that bound, no interpolation.
  Histogram negative({-1, 0, 1});
  negative.observe_n(-5, 3);
  negative.observe(0.5);
  EXPECT_DOUBLE_EQ(negative.quantile(0.5), -1.0);
  // q=0.9: rank 3.6; bucket 2 (0, 1], below 3, 1 inside:    0 + 1 * 0.6/1           = 0.6
  EXPECT_DOUBLE_EQ(negative.quantile(0.9), 0.6);
}

// ---- Value formatting and escaping ----------------------------------------------------------

TEST(PromText, FormatsValues) {
  EXPECT_EQ(format_value(3.0), "3");
  EXPECT_EQ(format_value(-42.0), "-42");
  EXPECT_EQ(format_value(-0.0), "0");
  EXPECT_EQ(format_value(0.25), "0.25");
  EXPECT_EQ(format_value(0.1), "0.1");
  EXPECT_EQ(format_value(1e-7), "1e-07");
  EXPECT_EQ(format_value(9007199254740991.0), "9007199254740991");
  EXPECT_EQ(format_value(1e20), "1e+20");
  EXPECT_EQ(format_value(kInf), "+Inf");
  EXPECT_EQ(format_value(-kInf), "-Inf");
  EXPECT_EQ(format_value(kNaN), "NaN");
  // Non-integers round-trip exactly through strtod.
  Lcg lcg{7};
  for (int i = 0; i < 10000; ++i) {
    const double v = (lcg.uniform() - 0.5) * std::pow(10.0, static_cast<int>(lcg.next() % 40) - 20);
    EXPECT_EQ(std::strtod(format_value(v).c_str(), nullptr), v) << format_value(v);
  }
}

TEST(PromText, Escaping) {
  EXPECT_EQ(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(escape_help("say \"hi\"\\\nnext"), "say \"hi\"\\\\\\nnext");  // quotes stay in HELP
  PromText text;
  text.family("x_total", MetricType::kCounter, "Line one\nline \\two");
  text.value("x_total", {{"path", "C:\\tmp\\\"q\"\n"}}, 1);
  EXPECT_EQ(text.str(),
            "# HELP x_total Line one\\nline \\\\two\n"
            "# TYPE x_total counter\n"
            "x_total{path=\"C:\\\\tmp\\\\\\\"q\\\"\\n\"} 1\n");
}

// ---- Exact exposition -----------------------------------------------------------------------

TEST(PromText, MatchesHandWrittenExposition) {
  PromText text;
  text.family("keel_requests_total", MetricType::kCounter, "Requests finished.");
  text.family("keel_kv_usage_ratio", MetricType::kGauge, "Fraction of KV blocks in use.");
  text.value("keel_requests_total", {{"model", "m"}, {"reason", "stop"}}, 3);
  text.value("keel_kv_usage_ratio", {}, 0.25);
  // Declared later, and more samples for the first family after it: still grouped.
  text.family("keel_ttft_seconds", MetricType::kHistogram, "Time to first token.");
  Histogram h({0.25, 1});
  for (const double v : {0.125, 0.25, 0.5, 2.0}) h.observe(v);  // sum 2.875 exactly
  text.histogram("keel_ttft_seconds", {{"model", "m"}}, h);
  text.value("keel_requests_total", {{"model", "m"}, {"reason", "length"}},
             uint64_t{18446744073709551615ULL});
  text.family("keel_requests_total", MetricType::kCounter, "Requests finished.");  // idempotent
  text.family("keel_up", MetricType::kGauge, "Declared, no samples.");
  Histogram empty({0.5});
  text.histogram("keel_ttft_seconds", {{"model", "other"}}, empty);
  text.value("keel_kv_usage_ratio", {{"pool", "nan"}}, kNaN, /*allow_nan=*/true);

  const std::string expected =
      "# HELP keel_requests_total Requests finished.\n"
      "# TYPE keel_requests_total counter\n"
      "keel_requests_total{model=\"m\",reason=\"stop\"} 3\n"
      "keel_requests_total{model=\"m\",reason=\"length\"} 18446744073709551615\n"
      "# HELP keel_kv_usage_ratio Fraction of KV blocks in use.\n"
      "# TYPE keel_kv_usage_ratio gauge\n"
      "keel_kv_usage_ratio 0.25\n"
      "keel_kv_usage_ratio{pool=\"nan\"} NaN\n"
      "# HELP keel_ttft_seconds Time to first token.\n"
      "# TYPE keel_ttft_seconds histogram\n"
      "keel_ttft_seconds_bucket{model=\"m\",le=\"0.25\"} 2\n"
      "keel_ttft_seconds_bucket{model=\"m\",le=\"1\"} 3\n"
      "keel_ttft_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n"
      "keel_ttft_seconds_sum{model=\"m\"} 2.875\n"
      "keel_ttft_seconds_count{model=\"m\"} 4\n"
      "keel_ttft_seconds_bucket{model=\"other\",le=\"0.5\"} 0\n"
      "keel_ttft_seconds_bucket{model=\"other\",le=\"+Inf\"} 0\n"
      "keel_ttft_seconds_sum{model=\"other\"} 0\n"
      "keel_ttft_seconds_count{model=\"other\"} 0\n"
      "# HELP keel_up Declared, no samples.\n"
      "# TYPE keel_up gauge\n";
  EXPECT_EQ(text.str(), expected);

  PromText unlabeled;
  unlabeled.family("h_seconds", MetricType::kHistogram, "h");
  Histogram one({1});
  one.observe(0.5);
  unlabeled.histogram("h_seconds", {}, one);
  EXPECT_EQ(unlabeled.str(),
            "# HELP h_seconds h\n# TYPE h_seconds histogram\n"
            "h_seconds_bucket{le=\"1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 1\n"
            "h_seconds_sum 0.5\nh_seconds_count 1\n");
}

TEST(PromText, RejectsBadInput) {
  PromText text;
  for (const std::string bad : {"", "1abc", "a-b", "a b", "caf\xc3\xa9", "a.b", "a{b}"})
    EXPECT_THROW(text.family(bad, MetricType::kGauge, "h"), Error) << bad;
  for (const std::string good : {"a", "_a", ":a", "a:b_c9", "A_Z"})
    EXPECT_NO_THROW(text.family(good, MetricType::kGauge, "h")) << good;
  EXPECT_TRUE(valid_label_name("le"));
  EXPECT_FALSE(valid_label_name("a:b"));  // colons are for metric names only
  EXPECT_FALSE(valid_label_name("9a"));

  text.family("g", MetricType::kGauge, "h");
  text.family("h_seconds", MetricType::kHistogram, "h");
  EXPECT_THROW(text.value("g", {{"a:b", "x"}}, 1), Error);
  EXPECT_THROW(text.value("g", {{"__name__", "x"}}, 1), Error);  // reserved prefix
  EXPECT_THROW(text.value("g", {{"", "x"}}, 1), Error);
  EXPECT_THROW(text.value("g", {{"a", "x"}, {"a", "y"}}, 1), Error);  // label twice
  EXPECT_THROW(text.value("undeclared", {}, 1), Error);
  EXPECT_THROW(text.value("g", {}, kNaN), Error);                // NaN not asked for
  EXPECT_THROW(text.value("h_seconds", {}, 1), Error);           // wrong kind
  EXPECT_THROW(text.histogram("g", {}, Histogram({1})), Error);  // wrong kind
  EXPECT_THROW(text.histogram("h_seconds", {{"le", "1"}}, Histogram({1})), Error);
  EXPECT_THROW(text.family("g", MetricType::kCounter, "h"), Error);  // type changed
  EXPECT_THROW(text.family("g", MetricType::kGauge, "other help"), Error);
  text.value("g", {{"a", "1"}}, 1);
  EXPECT_THROW(text.value("g", {{"a", "1"}}, 2), Error);  // same series twice
  text.histogram("h_seconds", {}, Histogram({1}));
  EXPECT_THROW(text.histogram("h_seconds", {}, Histogram({1})), Error);
  // Nothing partial was appended by the rejected calls.
  EXPECT_EQ(text.str().find("__name__"), std::string::npos);
}

// ---- promtool ---------------------------------------------------------------------------------

std::string find_on_path(const std::string& binary) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return "";
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + binary;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A large, realistic exposition: counters with label sets, gauges (incl. +Inf and tiny/huge
// values), histograms over every standard bound list, awkward label values and help text.
std::string large_exposition() {
  PromText text;
  Lcg lcg{2024};
  const std::vector<std::string> reasons = {"stop",
                                            "length",
                                            "abort",
                                            "quote\"d",
                                            "back\\slash",
                                            "new\nline",
                                            "utf8 \xc3\xa9\xe2\x9c\x93"};
  text.family("keel_requests_total", MetricType::kCounter,
              "Requests finished, by reason.\nSecond line with a \\ backslash.");
  text.family("keel_tokens_total", MetricType::kCounter, "Tokens processed.");
  text.family("keel_requests_running", MetricType::kGauge, "Requests in the running batch.");
  text.family("keel_kv_usage_ratio", MetricType::kGauge, "KV blocks in use / total.");
  struct HistogramFamily {
    std::string name;
    const std::vector<double>* bounds;
  };
  const std::vector<HistogramFamily> histograms = {
      {"keel_time_to_first_token_seconds", &latency_seconds_bounds()},
      {"keel_inter_token_latency_seconds", &vllm_tpot_seconds_bounds()},
      {"keel_e2e_request_latency_seconds", &vllm_e2e_seconds_bounds()},
      {"keel_ttft_vllm_seconds", &vllm_ttft_seconds_bounds()},
      {"keel_expert_compute_seconds", &expert_compute_seconds_bounds()},
      {"keel_router_margin", &router_margin_bounds()},
      {"keel_batch_tokens", &count_bounds()},
  };
  for (const HistogramFamily& f : histograms)
    text.family(f.name, MetricType::kHistogram, "Distribution of " + f.name + ".");

  for (int rank = 0; rank < 4; ++rank) {
    for (int layer = 0; layer < 8; ++layer) {
      const Labels labels = {
          {"model", "qwen3-moe"}, {"rank", std::to_string(rank)}, {"layer", std::to_string(layer)}};
      for (const HistogramFamily& f : histograms) {
        Histogram h(*f.bounds);
        const double top = f.bounds->back() * 2;
        for (int i = 0; i < 200; ++i) h.observe(top * std::pow(lcg.uniform(), 6.0));
        text.histogram(f.name, labels, h);
      }
    }
    for (size_t r = 0; r < reasons.size(); ++r)
      text.value("keel_requests_total",
                 {{"rank", std::to_string(rank)}, {"finish_reason", reasons[r]}},
                 static_cast<int64_t>(lcg.next() % 100000));
    text.value("keel_tokens_total", {{"rank", std::to_string(rank)}, {"kind", "prompt"}},
               static_cast<uint64_t>(lcg.next()));
    text.value("keel_tokens_total", {{"rank", std::to_string(rank)}, {"kind", "generated"}},
               1e300 * lcg.uniform());
    text.value("keel_requests_running", {{"rank", std::to_string(rank)}}, rank * 3);
    text.value("keel_kv_usage_ratio", {{"rank", std::to_string(rank)}, {"pool", "a"}},
               lcg.uniform());
    text.value("keel_kv_usage_ratio", {{"rank", std::to_string(rank)}, {"pool", "inf"}}, kInf);
    text.value("keel_kv_usage_ratio", {{"rank", std::to_string(rank)}, {"pool", "tiny"}}, 4.9e-324);
  }
  return text.str();
}

TEST(PromText, PromtoolAcceptsLargeExpositionWithoutLintFindings) {
  const std::string promtool = find_on_path("promtool");
  if (promtool.empty()) {
    FAIL() << "promtool not found on PATH: install Debian's `prometheus` package "
              "(apt-get install prometheus, or run scripts/setup) so that the /metrics "
              "exposition can be checked with `promtool check metrics`";
  }
  const std::string text = large_exposition();
  ASSERT_GT(text.size(), 100000u);
  const std::string input = temp_path("exposition.prom");
  const std::string output = temp_path("promtool.out");
  {
    std::ofstream out(input, std::ios::binary);
    out << text;
  }
  const std::string command =
      "'" + promtool + "' check metrics < '" + input + "' > '" + output + "' 2>&1";
  const int status = std::system(command.c_str());
  const std::string findings = read_text(output);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "promtool exit status " << status << ":\n"
      << findings;
  EXPECT_EQ(findings, "") << "promtool lint findings";
  // And a deliberately broken exposition is refused, so the check above checks something.
  {
    std::ofstream out(input, std::ios::binary);
    out << "# HELP bad_total x\n# TYPE bad_total counter\nbad_total{a=\"1\" 1\n";
  }
  const int bad_status = std::system(command.c_str());
  EXPECT_FALSE(WIFEXITED(bad_status) && WEXITSTATUS(bad_status) == 0);
  std::filesystem::remove(input);
  std::filesystem::remove(output);
}

// ---- JSON ------------------------------------------------------------------------------------

TEST(HistogramJson, FieldsAndQuantiles) {
  Histogram h({1, 2, 4, 8});
  h.observe_n(0.5, 2);
  h.observe_n(1.5, 3);
  h.observe_n(3, 4);
  h.observe(6);
  const nlohmann::json j = histogram_json(h);
  EXPECT_EQ(j["bounds"], nlohmann::json({1.0, 2.0, 4.0, 8.0}));
  EXPECT_EQ(j["counts"], nlohmann::json({2, 3, 4, 1, 0}));
  EXPECT_EQ(j["count"], 10);
  EXPECT_EQ(j["sum"].get<double>(), 1.0 + 4.5 + 12.0 + 6.0);
  EXPECT_DOUBLE_EQ(j["p50"].get<double>(), 2.0);  // hand-computed above
  EXPECT_DOUBLE_EQ(j["p90"].get<double>(), 4.0);
  // q=0.99: rank 9.9; bucket 3 (4, 8], below 9, 1 inside: 4 + 4 * 0.9 = 7.6
  EXPECT_DOUBLE_EQ(j["p99"].get<double>(), 7.6);
  const nlohmann::json empty = histogram_json(Histogram({1}));
  EXPECT_TRUE(empty["p50"].is_null());
  EXPECT_EQ(empty["count"], 0);
}

// ---- Chrome trace ------------------------------------------------------------------------------

TEST(ChromeTrace, WritesPerfettoLoadableFile) {
  // Ranks' spans arrive out of order (an enclosing "step" is recorded after its parts, as it
  // would be when it completes last), ranks in descending order.
  std::vector<TraceSpan> spans;
  for (int32_t rank = 3; rank >= 0; --rank) {
    const double base = 1000.0 * rank;
    spans.push_back({rank, "moe", "moe", base + 40.5, 20.25, {{"experts", 8}, {"tokens", 16}}});
    spans.push_back({rank, "attn", "attn", base + 10, 30, nullptr});
    spans.push_back({rank, "step", "engine", base + 10, 60, {{"step", 7}}});
    spans.push_back({rank, "allreduce", "comm", base + 61, 9, nullptr});
  }
  const std::string path = temp_path("trace.json");
  write_chrome_trace(path, spans, "keel serve");

  const nlohmann::json trace = nlohmann::json::parse(read_text(path));  // throws if invalid
  EXPECT_EQ(trace["displayTimeUnit"], "ms");
  const nlohmann::json& events = trace["traceEvents"];
  ASSERT_TRUE(events.is_array());

  int process_names = 0;
  std::vector<std::string> thread_names(4);
  std::vector<nlohmann::json> complete;
  for (const nlohmann::json& e : events) {
    EXPECT_EQ(e["pid"], 0);
    if (e["ph"] == "M") {
      if (e["name"] == "process_name") {
        ++process_names;
        EXPECT_EQ(e["args"]["name"], "keel serve");
      } else if (e["name"] == "thread_name") {
        thread_names.at(e["tid"].get<int>()) = e["args"]["name"].get<std::string>();
      } else {
        EXPECT_EQ(e["name"], "thread_sort_index");
        EXPECT_EQ(e["args"]["sort_index"], e["tid"]);
      }
    } else {
      EXPECT_EQ(e["ph"], "X");
      complete.push_back(e);
    }
  }
  EXPECT_EQ(process_names, 1);
  EXPECT_EQ(thread_names, (std::vector<std::string>{"rank 0", "rank 1", "rank 2", "rank 3"}));
  ASSERT_EQ(complete.size(), 16u);
  // Sorted by (rank, start), the enclosing step before the attn span that starts with it.
  const std::vector<std::string> order = {"step", "attn", "moe", "allreduce"};
  for (size_t i = 0; i < complete.size(); ++i) {
    const nlohmann::json& e = complete[i];
    const int rank = static_cast<int>(i / 4);
    const double base = 1000.0 * rank;
    EXPECT_EQ(e["tid"], rank);
    EXPECT_EQ(e["name"], order[i % 4]);
    if (e["name"] == "moe") {
      EXPECT_EQ(e["ts"].get<double>(), base + 40.5);
      EXPECT_EQ(e["dur"].get<double>(), 20.25);
      EXPECT_EQ(e["cat"], "moe");
      EXPECT_EQ(e["args"]["experts"], 8);
    } else if (e["name"] == "step") {
      EXPECT_EQ(e["ts"].get<double>(), base + 10);
      EXPECT_EQ(e["dur"].get<double>(), 60.0);
      EXPECT_EQ(e["args"]["step"], 7);
    } else if (e["name"] == "attn") {
      EXPECT_EQ(e["dur"].get<double>(), 30.0);
      EXPECT_FALSE(e.contains("args"));  // null args are omitted
    } else {
      EXPECT_EQ(e["ts"].get<double>(), base + 61);
      EXPECT_EQ(e["cat"], "comm");
    }
  }
  std::filesystem::remove(path);
}

TEST(ChromeTrace, ErrorsNameThePathAndBadSpans) {
  const std::string path = "/nonexistent-keel-dir/trace.json";
  try {
    write_chrome_trace(path, {}, "p");
    FAIL() << "expected keel::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  TraceSpan bad{0, "s", "c", kNaN, 1, nullptr};
  EXPECT_THROW(chrome_trace_json({bad}, "p"), Error);
  bad.start_us = 0;
  bad.dur_us = -1;
  EXPECT_THROW(chrome_trace_json({bad}, "p"), Error);
  // An empty trace is still a valid file with the process metadata.
  const nlohmann::json empty = chrome_trace_json({}, "p");
  EXPECT_EQ(empty["traceEvents"].size(), 1u);
}

// ---- Scrape cache ------------------------------------------------------------------------------

// A clock the test moves by hand, so "within the interval" is exact, not a race with time.
struct FakeClock {
  std::atomic<int64_t> now_ms{1000};
  ScrapeCache::Clock::time_point now() const {
    return ScrapeCache::Clock::time_point(std::chrono::milliseconds(now_ms.load()));
  }
};

TEST(ScrapeCache, ConcurrentScrapesWithinTheIntervalShareOneRender) {
  FakeClock clock;
  std::atomic<int> renders{0};
  ScrapeCache cache([&] { return "body " + std::to_string(++renders) + "\n"; },
                    std::chrono::seconds(1), [&] { return clock.now(); });
  // 16 scrapers at once, however they interleave: whoever comes first renders, the others take
  // its body (finished or, for the very first, awaited). One render, one body.
  constexpr int kScrapers = 16;
  std::vector<std::shared_ptr<const std::string>> bodies(kScrapers);
  std::vector<std::thread> scrapers;
  std::atomic<bool> go{false};
  for (int i = 0; i < kScrapers; ++i)
    scrapers.emplace_back([&, i] {
      while (!go.load()) std::this_thread::yield();
      bodies[static_cast<size_t>(i)] = cache.get();
    });
  go = true;
  for (std::thread& scraper : scrapers) scraper.join();
  EXPECT_EQ(renders.load(), 1);
  EXPECT_EQ(cache.renders(), 1u);
  for (const auto& body : bodies) {
    ASSERT_NE(body, nullptr);
    EXPECT_EQ(*body, "body 1\n");
  }
  // Still inside the interval (999 ms after the render began): the same body.
  clock.now_ms += 999;
  EXPECT_EQ(*cache.get(), "body 1\n");
  // At the interval's end the next scrape renders anew, and the one after shares that.
  clock.now_ms += 1;
  EXPECT_EQ(*cache.get(), "body 2\n");
  EXPECT_EQ(*cache.get(), "body 2\n");
  EXPECT_EQ(renders.load(), 2);
}

TEST(ScrapeCache, AScrapeDuringARenderTakesThePreviousBodyInsteadOfWaiting) {
  FakeClock clock;
  std::atomic<int> renders{0};
  std::promise<void> render_started;
  std::promise<void> release_render;
  std::shared_future<void> released = release_render.get_future().share();
  ScrapeCache cache(
      [&] {
        const int n = ++renders;
        if (n == 2) {  // the second render blocks until the test lets it go
          render_started.set_value();
          released.wait();
        }
        return "body " + std::to_string(n);
      },
      std::chrono::seconds(1), [&] { return clock.now(); });
  ASSERT_EQ(*cache.get(), "body 1");
  clock.now_ms += 1000;  // expired
  std::future<std::string> slow = std::async(std::launch::async, [&] { return *cache.get(); });
  render_started.get_future().wait();
  // A render is under way: another scrape must not wait for it (if it did, it would wait for
  // the release below, which comes only after this scrape answers or the bound runs out).
  std::future<std::string> other = std::async(std::launch::async, [&] { return *cache.get(); });
  const bool answered = other.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  release_render.set_value();
  ASSERT_TRUE(answered) << "a scrape queued behind another scrape's render";
  EXPECT_EQ(other.get(), "body 1");
  EXPECT_EQ(slow.get(), "body 2");
  EXPECT_EQ(*cache.get(), "body 2");
  EXPECT_EQ(renders.load(), 2);
}

TEST(ScrapeCache, ZeroIntervalRendersEveryScrapeAndAFailedRenderPublishesNothing) {
  std::atomic<int> renders{0};
  ScrapeCache uncached([&] { return std::to_string(++renders); }, ScrapeCache::Clock::duration{});
  EXPECT_EQ(*uncached.get(), "1");
  EXPECT_EQ(*uncached.get(), "2");
  EXPECT_EQ(uncached.renders(), 2u);

  FakeClock clock;
  bool fail = true;
  ScrapeCache cache(
      [&]() -> std::string {
        if (fail) throw Error("render failed");
        return "ok";
      },
      std::chrono::seconds(1), [&] { return clock.now(); });
  EXPECT_THROW(cache.get(), Error);
  fail = false;
  EXPECT_EQ(*cache.get(), "ok") << "the failure left nothing behind";
  EXPECT_EQ(cache.renders(), 1u);
  EXPECT_THROW(ScrapeCache([] { return std::string(); }, -std::chrono::seconds(1)), Error);
  EXPECT_THROW(ScrapeCache(nullptr, std::chrono::seconds(1)), Error);
}

}  // namespace
}  // namespace keel::telemetry
