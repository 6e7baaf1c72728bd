// Tests for the CPU op kernels in kernels/cpu/ops.h against plain double-precision references
// written from the HF transformers definitions.
//
// Error model behind every tolerance in this file. u = 2^-24 is the fp32 unit roundoff: each
// fp32 +, -, *, / and sqrt returns the exact result times (1 + d) with |d| <= u. glibc's expf,
// powf, cosf and sinf are accurate to within 1 ulp, i.e. at most 2u relative. A sequential sum of
// n terms is off by at most (n - 1) u * sum(|term|) to first order. The double references carry
// errors of order 2^-53, negligible next to those bounds. Each test states the bound it uses,
// usually with a small constant of slack for second-order terms; the bounds stay tight enough
// that a wrong formula (missing eps, wrong pairing, wrong kv head, wrong normalisation) fails.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/cpu/ops.h"

namespace keel::cpu {
namespace {

constexpr double kUnitRoundoff = 0x1p-24;  // u for fp32, round to nearest

std::vector<float> random_floats(std::mt19937& rng, size_t count, float low, float high) {
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(count);
  for (float& value : values) value = distribution(rng);
  return values;
}

bool same_bits(const float* a, const float* b, size_t count) {
  return std::memcmp(a, b, count * sizeof(float)) == 0;
}

// ---------------------------------------------------------------------------------------------
// rms_norm

// HF RMSNorm: x / sqrt(mean(x^2) + eps) * weight, in double.
std::vector<double> reference_rms_norm(const float* x, const float* weight, float eps,
                                       int64_t width) {
  double sum_squares = 0.0;
  for (int64_t i = 0; i < width; ++i) sum_squares += double{x[i]} * double{x[i]};
  const double inv_rms = 1.0 / std::sqrt(sum_squares / static_cast<double>(width) + eps);
  std::vector<double> out(static_cast<size_t>(width));
  for (int64_t i = 0; i < width; ++i) out[i] = double{x[i]} * inv_rms * double{weight[i]};
  return out;
}

// Per-element relative bound: the sum of squares of `width` non-negative terms is off by at
// most width * u relative (squares u, sum (width - 1) u); / width, + eps add u each; sqrt halves
// all that and adds u; 1/r, x * inv_rms and weight * (...) add u each: about (width/2 + 5) u.
// We allow (width + 8) u. A missing eps or a divisor of width - 1 is off by far more for the
// widths used here (e.g. 1/(2 * width) relative for width - 1).
double rms_norm_tolerance(int64_t width, double reference) {
  return (static_cast<double>(width) + 8.0) * kUnitRoundoff * std::abs(reference);
}

TEST(RmsNorm, MatchesDoubleReference) {
  std::mt19937 rng(1234);
  const float eps = 1e-6f;
  for (int64_t width : {1, 7, 64, 257, 1000, 2048}) {
    // Rows of different magnitudes; the 1e-3 row has mean(x^2) ~ 3e-7, comparable to eps, so
    // it checks that eps is added inside the square root and not elsewhere.
    for (float magnitude : {1.0f, 30.0f, 1e-3f}) {
      const int64_t num_rows = 3;
      std::vector<float> x =
          random_floats(rng, static_cast<size_t>(num_rows * width), -magnitude, magnitude);
      std::vector<float> weight = random_floats(rng, static_cast<size_t>(width), 0.5f, 1.5f);
      std::vector<float> out(x.size());
      rms_norm(x.data(), weight.data(), eps, num_rows, width, out.data());
      for (int64_t row = 0; row < num_rows; ++row) {
        std::vector<double> expected =
            reference_rms_norm(x.data() + row * width, weight.data(), eps, width);
        for (int64_t i = 0; i < width; ++i) {
          ASSERT_NEAR(out[row * width + i], expected[i], rms_norm_tolerance(width, expected[i]))
              << "width " << width << " magnitude " << magnitude << " row " << row << " i " << i;
        }
      }
    }
  }
}

TEST(RmsNorm, EpsDominatesForZeroRow) {
  // An all-zero row must give zeros, not NaN (eps keeps the denominator positive).
  const int64_t width = 16;
  std::vector<float> x(width, 0.0f), weight(width, 1.0f), out(width, -1.0f);
  rms_norm(x.data(), weight.data(), 1e-6f, 1, width, out.data());
  for (float value : out) EXPECT_EQ(value, 0.0f);
}

TEST(RmsNorm, InPlaceGivesSameBits) {
  // The header allows out == x; every output element depends only on its own input element
  // once inv_rms is known, so aliasing must not change a bit.
  std::mt19937 rng(7);
  const int64_t num_rows = 4, width = 333;
  std::vector<float> x = random_floats(rng, num_rows * width, -2.0f, 2.0f);
  std::vector<float> weight = random_floats(rng, width, 0.5f, 1.5f);
  std::vector<float> separate(x.size());
  rms_norm(x.data(), weight.data(), 1e-5f, num_rows, width, separate.data());
  std::vector<float> in_place = x;
  rms_norm(in_place.data(), weight.data(), 1e-5f, num_rows, width, in_place.data());
  EXPECT_TRUE(same_bits(separate.data(), in_place.data(), x.size()));
}

TEST(RmsNorm, BatchInvariant) {
  // A row normalised alone and as row `target_row` of a batch of unrelated random rows must be
  // bitwise equal: the serving path relies on outputs not depending on batch composition.
  std::mt19937 rng(99);
  const int64_t width = 1024, num_rows = 9, target_row = 4;
  std::vector<float> weight = random_floats(rng, width, 0.5f, 1.5f);
  std::vector<float> target = random_floats(rng, width, -3.0f, 3.0f);
  std::vector<float> alone(width);
  rms_norm(target.data(), weight.data(), 1e-6f, 1, width, alone.data());
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<float> batch = random_floats(rng, num_rows * width, -10.0f, 10.0f);
    std::copy(target.begin(), target.end(), batch.begin() + target_row * width);
    std::vector<float> batch_out(batch.size());
    rms_norm(batch.data(), weight.data(), 1e-6f, num_rows, width, batch_out.data());
    EXPECT_TRUE(same_bits(alone.data(), batch_out.data() + target_row * width, width))
        << "trial " << trial;
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE

TEST(Rope, CosSinMatchDoubleReference) {
  // Reference: inv_freq[i] = 1 / theta^(2i / rotary_dim) and angle = position * inv_freq in
  // double. The kernel follows HF's fp32 path, so its angle carries a relative error of at most
  // (ln(theta) + 4) u: 2i/rotary_dim rounds (u, amplified by ln(theta) * exponent <= ln(theta)
  // through the power), powf (2u), 1/x (u), position * inv_freq (u). cos and sin are
  // 1-Lipschitz and cosf/sinf add at most 1 ulp (<= 2u absolute for values <= 1), so
  // |kernel - reference| <= (ln(theta) + 4) u |angle| + 2u.
  for (double theta : {10000.0, 1000000.0}) {
    for (int64_t rotary_dim : {2, 16, 64, 128}) {
      for (int64_t position : {0, 1, 2, 7, 100, 4095, 32767}) {
        std::vector<float> cos_sin(rotary_dim);
        rope_cos_sin(position, theta, rotary_dim, cos_sin.data());
        const int64_t half = rotary_dim / 2;
        for (int64_t i = 0; i < half; ++i) {
          const double inv_freq =
              1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(rotary_dim));
          const double angle = static_cast<double>(position) * inv_freq;
          const double tolerance =
              (std::log(theta) + 4.0) * kUnitRoundoff * angle + 2.0 * kUnitRoundoff;
          EXPECT_NEAR(cos_sin[i], std::cos(angle), tolerance)
              << "theta " << theta << " rotary_dim " << rotary_dim << " pos " << position;
          EXPECT_NEAR(cos_sin[half + i], std::sin(angle), tolerance)
              << "theta " << theta << " rotary_dim " << rotary_dim << " pos " << position;
        }
      }
    }
  }
}

struct RopeShape {
  int64_t num_heads;
  int64_t head_dim;
  int64_t rotary_dim;
};

TEST(Rope, ApplyMatchesRotateHalfReference) {
  // HF rotate_half on the first rotary_dim dims: pairs are (i, i + rotary_dim/2), not
  // neighbours; out1 = x1 c - x2 s, out2 = x2 c + x1 s. Each output is two rounded products and
  // one rounded sum: error <= 2u (|x1 c| + |x2 s|) for out1 (|x2 c| + |x1 s| for out2) to first
  // order; we allow 3u times that.
  // The cos/sin inputs come from rope_cos_sin so this test isolates the rotation itself.
  std::mt19937 rng(2024);
  const RopeShape shapes[] = {{4, 64, 64}, {3, 128, 64}, {2, 64, 16}, {5, 80, 40}, {1, 8, 2}};
  for (const RopeShape& shape : shapes) {
    for (int64_t position : {0, 3, 511, 20000}) {
      std::vector<float> cos_sin(shape.rotary_dim);
      rope_cos_sin(position, 10000.0, shape.rotary_dim, cos_sin.data());
      std::vector<float> heads = random_floats(rng, shape.num_heads * shape.head_dim, -4.0f, 4.0f);
      // Put distinctive bit patterns (a NaN payload, -0, a subnormal, infinity) into the
      // pass-through dims of the first head: these must survive bit for bit.
      if (shape.head_dim - shape.rotary_dim >= 4) {
        heads[shape.rotary_dim + 0] = bits_float(0x7fc12345u);
        heads[shape.rotary_dim + 1] = -0.0f;
        heads[shape.rotary_dim + 2] = bits_float(0x00000003u);
        heads[shape.rotary_dim + 3] = std::numeric_limits<float>::infinity();
      }
      const std::vector<float> original = heads;
      apply_rope(heads.data(), shape.num_heads, shape.head_dim, shape.rotary_dim, cos_sin.data());
      const int64_t half = shape.rotary_dim / 2;
      for (int64_t head = 0; head < shape.num_heads; ++head) {
        const float* before = original.data() + head * shape.head_dim;
        const float* after = heads.data() + head * shape.head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const double c = cos_sin[i], s = cos_sin[half + i];
          const double x1 = before[i], x2 = before[half + i];
          const double first_tolerance =
              3.0 * kUnitRoundoff * (std::abs(x1 * c) + std::abs(x2 * s));
          const double second_tolerance =
              3.0 * kUnitRoundoff * (std::abs(x2 * c) + std::abs(x1 * s));
          EXPECT_NEAR(after[i], x1 * c - x2 * s, first_tolerance) << "head " << head << " i " << i;
          EXPECT_NEAR(after[half + i], x2 * c + x1 * s, second_tolerance)
              << "head " << head << " i " << half + i;
        }
        EXPECT_TRUE(same_bits(before + shape.rotary_dim, after + shape.rotary_dim,
                              shape.head_dim - shape.rotary_dim))
            << "partial rotary touched dims >= rotary_dim in head " << head << " (head_dim "
            << shape.head_dim << ", rotary_dim " << shape.rotary_dim << ")";
      }
    }
  }
}

TEST(Rope, PositionZeroIsIdentity) {
  // At position 0 every angle is 0: cos = 1 and sin = 0 exactly, and x * 1 -/+ y * 0 == x,
  // so the rotation must not change a single bit.
  std::mt19937 rng(5);
  const int64_t num_heads = 4, head_dim = 128, rotary_dim = 64;
  std::vector<float> cos_sin(rotary_dim);
  rope_cos_sin(0, 1000000.0, rotary_dim, cos_sin.data());
  for (int64_t i = 0; i < rotary_dim / 2; ++i) {
    EXPECT_EQ(cos_sin[i], 1.0f);
    EXPECT_EQ(cos_sin[rotary_dim / 2 + i], 0.0f);
  }
  std::vector<float> heads = random_floats(rng, num_heads * head_dim, -5.0f, 5.0f);
  const std::vector<float> original = heads;
  apply_rope(heads.data(), num_heads, head_dim, rotary_dim, cos_sin.data());
  EXPECT_TRUE(same_bits(original.data(), heads.data(), heads.size()));
}

// ---------------------------------------------------------------------------------------------
// silu_mul

TEST(SiluMul, MatchesDoubleReference) {
  // Reference gate / (1 + exp(-gate)) * up in double. fp32: expf <= 2u; 1 + e adds u and passes
  // e's error on scaled by e / (1 + e) <= 1; the division and the product add u each: <= 5u
  // relative. We allow 6u. Gates stay in [-20, 20] so no intermediate over/underflows (the
  // extremes are checked separately below).
  std::mt19937 rng(31);
  const int64_t width = 4096;
  std::vector<float> gate = random_floats(rng, width, -20.0f, 20.0f);
  std::vector<float> up = random_floats(rng, width, -3.0f, 3.0f);
  std::vector<float> out(width);
  silu_mul(gate.data(), up.data(), width, out.data());
  for (int64_t i = 0; i < width; ++i) {
    const double g = gate[i];
    const double expected = g / (1.0 + std::exp(-g)) * double{up[i]};
    ASSERT_NEAR(out[i], expected, 6.0 * kUnitRoundoff * std::abs(expected))
        << "gate " << gate[i] << " up " << up[i];
  }
}

TEST(SiluMul, ExtremeGatesStayFinite) {
  // For gate -> +inf silu(gate) -> gate: exp(-200) underflows to 0, so the result is exactly
  // fl(gate * up). For gate -> -inf silu -> 0: exp(200) overflows to inf and gate / inf = -0;
  // the result must be zero, never NaN.
  const float gate[] = {200.0f, -200.0f, 89.0f, -89.0f};
  const float up[] = {1.5f, 1.5f, -2.0f, -2.0f};
  float out[4];
  silu_mul(gate, up, 4, out);
  EXPECT_EQ(out[0], 200.0f * 1.5f);
  EXPECT_EQ(out[1], 0.0f);
  EXPECT_EQ(out[2], 89.0f * -2.0f);
  EXPECT_FALSE(std::isnan(out[3]));
  EXPECT_LT(std::abs(out[3]), 1e-30f);
}

// ---------------------------------------------------------------------------------------------
// softmax

std::vector<double> reference_softmax(const float* logits, int64_t width) {
  double max_value = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < width; ++i) max_value = std::max(max_value, double{logits[i]});
  std::vector<double> probs(static_cast<size_t>(width));
  double sum = 0.0;
  for (int64_t i = 0; i < width; ++i) sum += probs[i] = std::exp(double{logits[i]} - max_value);
  for (double& p : probs) p /= sum;
  return probs;
}

// Per-element relative bound for softmax over `width` values spanning `range` (max - min):
// x - max rounds with error <= u * range, which expf turns into that much relative error, plus
// 2u of its own; the sum of `width` positive terms adds (width - 1) u and inherits the terms'
// (range + 2) u; 1/sum and the product add u each. Total <= (2 range + width + 6) u; we allow
// (2 range + width + 8) u.
double softmax_relative_tolerance(int64_t width, double range) {
  return (2.0 * range + static_cast<double>(width) + 8.0) * kUnitRoundoff;
}

double value_range(const std::vector<float>& values) {
  auto [low, high] = std::minmax_element(values.begin(), values.end());
  return double{*high} - double{*low};
}

TEST(Softmax, MatchesDoubleReference) {
  std::mt19937 rng(77);
  for (int64_t width : {1, 2, 10, 128, 1000}) {
    for (float offset : {0.0f, 1000.0f, -1000.0f}) {
      // The +-1000 offsets overflow/underflow exp without max subtraction.
      std::vector<float> logits = random_floats(rng, width, -8.0f, 8.0f);
      for (float& logit : logits) logit += offset;
      std::vector<double> expected = reference_softmax(logits.data(), width);
      // Adding the offset rounds the logits, so measure the range after it.
      const double tolerance = softmax_relative_tolerance(width, value_range(logits));
      std::vector<float> probs = logits;
      softmax(probs.data(), width);
      double sum = 0.0;
      for (int64_t i = 0; i < width; ++i) {
        ASSERT_NEAR(probs[i], expected[i], tolerance * expected[i])
            << "width " << width << " offset " << offset << " i " << i;
        sum += probs[i];
      }
      EXPECT_NEAR(sum, 1.0, tolerance) << "width " << width;
    }
  }
}

TEST(Softmax, SingleElementIsExactlyOne) {
  float value = 123.0f;
  softmax(&value, 1);
  EXPECT_EQ(value, 1.0f);
}

// ---------------------------------------------------------------------------------------------
// route_top_k

struct RouteOutput {
  std::vector<float> probs;
  std::vector<int32_t> expert_ids;
  std::vector<float> expert_weights;
  float margin = 0.0f;
};

RouteOutput run_route(const std::vector<float>& logits, int64_t top_k, bool normalize) {
  const int64_t num_experts = static_cast<int64_t>(logits.size());
  RouteOutput output;
  output.probs.assign(num_experts, std::numeric_limits<float>::quiet_NaN());
  output.expert_ids.assign(top_k, -7);
  output.expert_weights.assign(top_k, std::numeric_limits<float>::quiet_NaN());
  output.margin = route_top_k(logits.data(), num_experts, top_k, normalize, output.probs.data(),
                              output.expert_ids.data(), output.expert_weights.data())
                      .margin;
  return output;
}

// Expert ids ordered by probability descending, equal probabilities by ascending id: the first
// k are what route_top_k must return, in this order (torch.topk's sorted order, with the
// documented tie rule).
std::vector<int32_t> ranked_experts(const std::vector<float>& probs) {
  std::vector<int32_t> order(probs.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  });
  return order;
}

// Checks every documented property of one route_top_k result against its own probabilities.
void check_route(const std::vector<float>& logits, int64_t top_k, bool normalize,
                 const RouteOutput& route) {
  const int64_t num_experts = static_cast<int64_t>(logits.size());
  SCOPED_TRACE(testing::Message() << "E " << num_experts << " k " << top_k << " normalize "
                                  << normalize);

  // probabilities = softmax(logits), the same kernel bit for bit.
  std::vector<float> softmax_probs = logits;
  softmax(softmax_probs.data(), num_experts);
  ASSERT_TRUE(same_bits(softmax_probs.data(), route.probs.data(), num_experts));

  // The selection is the top_k of the (prob desc, id asc) ranking, in that order.
  const std::vector<int32_t> ranking = ranked_experts(route.probs);
  for (int64_t slot = 0; slot < top_k; ++slot)
    ASSERT_EQ(route.expert_ids[slot], ranking[slot]) << "slot " << slot;

  // margin = p(k-th) - p((k+1)-th), one fp32 subtraction of the returned probabilities.
  const float expected_margin =
      top_k < num_experts ? route.probs[ranking[top_k - 1]] - route.probs[ranking[top_k]] : 0.0f;
  EXPECT_EQ(route.margin, expected_margin);
  EXPECT_GE(route.margin, 0.0f);

  if (!normalize) {
    for (int64_t slot = 0; slot < top_k; ++slot)
      EXPECT_EQ(route.expert_weights[slot], route.probs[route.expert_ids[slot]]);
    return;
  }
  // Normalised: w_s = p_s / S with S the fp32 sum of the k selected probabilities (rel. error
  // <= (k - 1) u), each division adds u: w_s is within k u of p_s / sum(p) exactly. Summing the
  // k weights here adds (k - 1) u more, so |sum(w) - 1| <= (2k - 1) u; we allow 2k u.
  double selected_sum = 0.0;
  for (int64_t slot = 0; slot < top_k; ++slot) selected_sum += route.probs[route.expert_ids[slot]];
  float weight_sum = 0.0f;
  for (int64_t slot = 0; slot < top_k; ++slot) {
    const double expected = route.probs[route.expert_ids[slot]] / selected_sum;
    EXPECT_NEAR(route.expert_weights[slot], expected,
                (static_cast<double>(top_k) + 1.0) * kUnitRoundoff * expected)
        << "slot " << slot;
    weight_sum += route.expert_weights[slot];
  }
  EXPECT_NEAR(weight_sum, 1.0, 2.0 * static_cast<double>(top_k) * kUnitRoundoff);
  if (top_k == 1) {
    EXPECT_EQ(route.expert_weights[0], 1.0f);  // p / p is exact
  }
}

TEST(RouteTopK, RandomLogitsSatisfyAllProperties) {
  std::mt19937 rng(4242);
  int checked_against_double = 0;
  for (int seed_round = 0; seed_round < 40; ++seed_round) {
    for (int64_t num_experts : {8, 16, 60, 64, 128}) {
      for (int64_t top_k : {1, 2, 4, 6, 8}) {
        std::vector<float> logits = random_floats(rng, num_experts, -4.0f, 4.0f);
        for (bool normalize : {false, true}) {
          RouteOutput route = run_route(logits, top_k, normalize);
          check_route(logits, top_k, normalize, route);
          if (testing::Test::HasFatalFailure()) return;
        }
        // The probabilities against a double softmax, and the selected set against the double
        // top-k whenever the double gap between the k-th and (k+1)-th exceeds what fp32
        // rounding can bridge (twice the per-element bound); otherwise either order is right.
        RouteOutput route = run_route(logits, top_k, false);
        std::vector<double> expected = reference_softmax(logits.data(), num_experts);
        const double tolerance = softmax_relative_tolerance(num_experts, value_range(logits));
        for (int64_t expert = 0; expert < num_experts; ++expert)
          ASSERT_NEAR(route.probs[expert], expected[expert], tolerance * expected[expert]);
        std::vector<int32_t> expected_order(num_experts);
        std::iota(expected_order.begin(), expected_order.end(), 0);
        std::sort(expected_order.begin(), expected_order.end(),
                  [&](int32_t a, int32_t b) { return expected[a] > expected[b]; });
        if (top_k >= num_experts) continue;  // nothing left unselected to compare against
        const double kth = expected[expected_order[top_k - 1]];
        const double next = expected[expected_order[top_k]];
        if (kth - next <= 2.0 * tolerance * kth) continue;
        std::vector<int32_t> selected = route.expert_ids;
        std::vector<int32_t> expected_selected(expected_order.begin(),
                                               expected_order.begin() + top_k);
        std::sort(selected.begin(), selected.end());
        std::sort(expected_selected.begin(), expected_selected.end());
        EXPECT_EQ(selected, expected_selected);
        ++checked_against_double;
      }
    }
  }
  // Random continuous logits almost never produce near-ties; make sure the comparison ran.
  EXPECT_GT(checked_against_double, 900);
}

TEST(RouteTopK, ExactTiesGoToLowerExpertId) {
  // Equal logits give bitwise equal probabilities (same exp argument), so these are exact ties.
  //                               id: 0     1     2     3     4     5     6     7
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 0.0f, 3.0f, 2.0f, 3.0f, 1.0f};
  {
    RouteOutput route = run_route(logits, 2, false);
    EXPECT_EQ(route.expert_ids, (std::vector<int32_t>{1, 2}));
    EXPECT_EQ(route.margin, 0.0f);  // 3rd-best (id 4) ties the 2nd
    check_route(logits, 2, false, route);
  }
  {
    RouteOutput route = run_route(logits, 4, true);
    EXPECT_EQ(route.expert_ids, (std::vector<int32_t>{1, 2, 4, 6}));
    EXPECT_EQ(route.margin, route.probs[6] - route.probs[5]);
    EXPECT_GT(route.margin, 0.0f);
    // Equal probabilities divided by the same sum: the four weights are bitwise equal.
    for (int slot = 1; slot < 4; ++slot)
      EXPECT_EQ(route.expert_weights[slot], route.expert_weights[0]);
    check_route(logits, 4, true, route);
  }
  {
    // Ties among the lower-ranked: 0 and 7 tie at logit 1; k = 6 takes 0 before 7.
    RouteOutput route = run_route(logits, 6, false);
    EXPECT_EQ(route.expert_ids, (std::vector<int32_t>{1, 2, 4, 6, 5, 0}));
    EXPECT_EQ(route.margin, 0.0f);
    check_route(logits, 6, false, route);
  }
  {
    // All equal: the lowest ids win, and the margin is exactly 0.
    const std::vector<float> flat(16, -0.5f);
    RouteOutput route = run_route(flat, 3, true);
    EXPECT_EQ(route.expert_ids, (std::vector<int32_t>{0, 1, 2}));
    EXPECT_EQ(route.margin, 0.0f);
    check_route(flat, 3, true, route);
  }
}

TEST(RouteTopK, AllExpertsSelectedGivesZeroMargin) {
  std::mt19937 rng(8);
  for (int64_t num_experts : {1, 2, 8, 64}) {
    std::vector<float> logits = random_floats(rng, num_experts, -3.0f, 3.0f);
    for (bool normalize : {false, true}) {
      RouteOutput route = run_route(logits, num_experts, normalize);
      EXPECT_EQ(route.margin, 0.0f);
      std::vector<int32_t> ids = route.expert_ids;
      std::sort(ids.begin(), ids.end());
      for (int64_t expert = 0; expert < num_experts; ++expert) EXPECT_EQ(ids[expert], expert);
      check_route(logits, num_experts, normalize, route);
    }
  }
}

TEST(RouteTopK, MarginUsesUnnormalisedProbabilities) {
  // norm_topk_prob rescales the weights only; the margin (a routing-confidence signal) must be
  // the same with and without it.
  std::mt19937 rng(15);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> logits = random_floats(rng, 32, -2.0f, 2.0f);
    EXPECT_EQ(run_route(logits, 4, true).margin, run_route(logits, 4, false).margin);
  }
}

// ---------------------------------------------------------------------------------------------
// attention_decode

struct AttentionCase {
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t capacity;
  int64_t num_positions;
  float q_scale;  // larger values make the softmax peakier
};

struct AttentionInputs {
  std::vector<float> q, k_cache, v_cache;
  std::vector<int32_t> kv_head_of_q;
  float scale = 1.0f;
};

// Random q and caches; cache rows at positions >= num_positions are NaN so any read of them
// would poison the output. kv_head_of_q follows HF repeat_kv: q head h reads kv head
// h / (num_q_heads / num_kv_heads).
AttentionInputs make_attention_inputs(std::mt19937& rng, const AttentionCase& shape) {
  AttentionInputs inputs;
  inputs.q = random_floats(rng, shape.num_q_heads * shape.head_dim, -shape.q_scale, shape.q_scale);
  const size_t cache_size = shape.num_kv_heads * shape.capacity * shape.head_dim;
  inputs.k_cache = random_floats(rng, cache_size, -1.0f, 1.0f);
  inputs.v_cache = random_floats(rng, cache_size, -1.0f, 1.0f);
  for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
    for (int64_t pos = shape.num_positions; pos < shape.capacity; ++pos) {
      const int64_t row = (kv_head * shape.capacity + pos) * shape.head_dim;
      for (int64_t d = 0; d < shape.head_dim; ++d) {
        inputs.k_cache[row + d] = std::numeric_limits<float>::quiet_NaN();
        inputs.v_cache[row + d] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
  const int64_t group_size = shape.num_q_heads / shape.num_kv_heads;
  for (int64_t head = 0; head < shape.num_q_heads; ++head)
    inputs.kv_head_of_q.push_back(static_cast<int32_t>(head / group_size));
  inputs.scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  return inputs;
}

std::vector<float> run_attention(const AttentionInputs& inputs, const AttentionCase& shape) {
  std::vector<float> scores(shape.capacity, 12345.0f);
  std::vector<float> out(shape.num_q_heads * shape.head_dim,
                         std::numeric_limits<float>::quiet_NaN());
  attention_decode(inputs.q.data(), shape.num_q_heads, inputs.kv_head_of_q.data(),
                   inputs.k_cache.data(), inputs.v_cache.data(), shape.capacity, shape.head_dim,
                   shape.num_positions, inputs.scale, scores.data(), out.data());
  return out;
}

// Reference in double: s_p = scale * q . k_p over positions [0, n), w = softmax(s), out = sum_p
// w_p v_p. Also returns each output element's error bound, derived as follows (D = head_dim):
//   scores: a D-term dot product is off by <= D u sum|q k|, the scale adds u:
//           ds <= (D + 1) u scale max_p sum_d |q_d k_pd|;
//   weights: exp's argument s_p - max is off by <= 2 ds + u * range(s); expf adds 2u; softmax's
//            normalisation at most doubles the relative error of the exponentials, and the
//            n-term sum, 1/sum and the product add (n + 1) u:
//            dw/w <= 4 ds + 2u range(s) + 4u + (n + 1) u;
//   output: the products w_p v_p add u and the n-term sum (n - 1) u, all relative to
//           sum_p w_p |v_pd|.
// Bound = (4 ds + 2u range(s) + (2n + 8) u) * sum_p w_p |v_pd|, times 2 as slack for the
// second-order terms the first-order analysis drops.
void reference_attention(const AttentionInputs& inputs, const AttentionCase& shape,
                         std::vector<double>& expected, std::vector<double>& tolerance) {
  const int64_t num_positions = shape.num_positions, head_dim = shape.head_dim;
  expected.assign(shape.num_q_heads * head_dim, 0.0);
  tolerance.assign(shape.num_q_heads * head_dim, 0.0);
  for (int64_t head = 0; head < shape.num_q_heads; ++head) {
    const float* q_head = inputs.q.data() + head * head_dim;
    const int64_t kv_head = inputs.kv_head_of_q[head];
    const float* k_head = inputs.k_cache.data() + kv_head * shape.capacity * head_dim;
    const float* v_head = inputs.v_cache.data() + kv_head * shape.capacity * head_dim;
    std::vector<double> scores(num_positions);
    double max_magnitude_sum = 0.0;
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      double dot = 0.0, magnitude_sum = 0.0;
      for (int64_t d = 0; d < head_dim; ++d) {
        dot += double{q_head[d]} * double{k_head[pos * head_dim + d]};
        magnitude_sum += std::abs(double{q_head[d]} * double{k_head[pos * head_dim + d]});
      }
      scores[pos] = dot * inputs.scale;
      max_magnitude_sum = std::max(max_magnitude_sum, magnitude_sum);
    }
    const double max_score = *std::max_element(scores.begin(), scores.end());
    const double min_score = *std::min_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (double& score : scores) sum += score = std::exp(score - max_score);
    for (double& score : scores) score /= sum;  // now the attention weights
    const double n = static_cast<double>(num_positions);
    const double score_error =
        (static_cast<double>(head_dim) + 1.0) * kUnitRoundoff * inputs.scale * max_magnitude_sum;
    const double relative_bound = 4.0 * score_error +
                                  2.0 * kUnitRoundoff * (max_score - min_score) +
                                  (2.0 * n + 8.0) * kUnitRoundoff;
    for (int64_t d = 0; d < head_dim; ++d) {
      double value = 0.0, magnitude = 0.0;
      for (int64_t pos = 0; pos < num_positions; ++pos) {
        value += scores[pos] * double{v_head[pos * head_dim + d]};
        magnitude += scores[pos] * std::abs(double{v_head[pos * head_dim + d]});
      }
      expected[head * head_dim + d] = value;
      tolerance[head * head_dim + d] = 2.0 * relative_bound * magnitude;
    }
  }
}

void expect_attention_matches_reference(const AttentionInputs& inputs, const AttentionCase& shape) {
  SCOPED_TRACE(testing::Message() << "Hq " << shape.num_q_heads << " Hkv " << shape.num_kv_heads
                                  << " D " << shape.head_dim << " n " << shape.num_positions
                                  << " q_scale " << shape.q_scale);
  std::vector<float> out = run_attention(inputs, shape);
  std::vector<double> expected, tolerance;
  reference_attention(inputs, shape, expected, tolerance);
  for (size_t i = 0; i < out.size(); ++i)
    ASSERT_NEAR(out[i], expected[i], tolerance[i]) << "element " << i;
}

TEST(AttentionDecode, MatchesDoubleReferenceWithGqa) {
  std::mt19937 rng(555);
  const AttentionCase cases[] = {
      {8, 2, 64, 320, 1, 1.0f},   {8, 2, 64, 320, 2, 1.0f},     {8, 2, 64, 320, 17, 1.0f},
      {8, 2, 64, 320, 300, 1.0f}, {8, 2, 64, 300, 300, 4.0f},   {4, 4, 128, 200, 129, 1.0f},
      {6, 1, 32, 64, 50, 2.0f},   {16, 4, 128, 512, 511, 1.0f},
  };
  for (const AttentionCase& shape : cases) {
    AttentionInputs inputs = make_attention_inputs(rng, shape);
    expect_attention_matches_reference(inputs, shape);
  }
}

TEST(AttentionDecode, HonoursArbitraryKvHeadMap) {
  // The kernel must follow kv_head_of_q, not assume h / group_size: with a permuted map the
  // reference (which follows the map) only matches if the kernel reads the same kv heads.
  std::mt19937 rng(556);
  const AttentionCase shape{4, 2, 64, 40, 33, 1.0f};
  AttentionInputs inputs = make_attention_inputs(rng, shape);
  inputs.kv_head_of_q = {1, 0, 1, 0};
  expect_attention_matches_reference(inputs, shape);
  // Heads with identical q that share a kv head give identical bits; different kv heads do not.
  std::copy(inputs.q.begin(), inputs.q.begin() + shape.head_dim,
            inputs.q.begin() + 2 * shape.head_dim);  // head 2 := head 0 (both kv head 1)
  std::copy(inputs.q.begin(), inputs.q.begin() + shape.head_dim,
            inputs.q.begin() + shape.head_dim);  // head 1 := head 0 (kv head 0)
  std::vector<float> out = run_attention(inputs, shape);
  EXPECT_TRUE(same_bits(out.data(), out.data() + 2 * shape.head_dim, shape.head_dim));
  EXPECT_FALSE(same_bits(out.data(), out.data() + shape.head_dim, shape.head_dim));
}

TEST(AttentionDecode, SinglePositionReturnsValueRowExactly) {
  // With one position the weight is exp(0) / exp(0) = 1 exactly, so out = 1 * v bit for bit.
  std::mt19937 rng(557);
  const AttentionCase shape{8, 2, 64, 16, 1, 3.0f};
  AttentionInputs inputs = make_attention_inputs(rng, shape);
  std::vector<float> out = run_attention(inputs, shape);
  for (int64_t head = 0; head < shape.num_q_heads; ++head) {
    const float* v_row =
        inputs.v_cache.data() + inputs.kv_head_of_q[head] * shape.capacity * shape.head_dim;
    EXPECT_TRUE(same_bits(out.data() + head * shape.head_dim, v_row, shape.head_dim))
        << "head " << head;
  }
}

TEST(AttentionDecode, OutputDependsOnlyOnOwnCachePrefix) {
  // Batch invariance for decode: a token's output bits must not depend on what else runs
  // (stale scratch from a longer sequence), on the cache capacity, or on cache rows beyond its
  // own num_positions.
  std::mt19937 rng(558);
  const AttentionCase shape{8, 2, 64, 100, 37, 1.0f};
  AttentionInputs inputs = make_attention_inputs(rng, shape);
  const std::vector<float> alone = run_attention(inputs, shape);

  // Same token after another, longer sequence used the same scratch buffer.
  const AttentionCase other_shape{8, 2, 64, 400, 399, 2.0f};
  AttentionInputs other = make_attention_inputs(rng, other_shape);
  std::vector<float> shared_scratch(400);
  std::vector<float> other_out(other_shape.num_q_heads * other_shape.head_dim);
  std::vector<float> after_other(alone.size());
  attention_decode(other.q.data(), other_shape.num_q_heads, other.kv_head_of_q.data(),
                   other.k_cache.data(), other.v_cache.data(), other_shape.capacity,
                   other_shape.head_dim, other_shape.num_positions, other.scale,
                   shared_scratch.data(), other_out.data());
  attention_decode(inputs.q.data(), shape.num_q_heads, inputs.kv_head_of_q.data(),
                   inputs.k_cache.data(), inputs.v_cache.data(), shape.capacity, shape.head_dim,
                   shape.num_positions, inputs.scale, shared_scratch.data(), after_other.data());
  EXPECT_TRUE(same_bits(alone.data(), after_other.data(), alone.size()));

  // Same prefix in a larger cache whose rows beyond num_positions hold random data.
  const AttentionCase wide_shape{8, 2, 64, 250, 37, 1.0f};
  AttentionInputs wide = make_attention_inputs(rng, wide_shape);
  wide.q = inputs.q;
  for (int64_t kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
    for (int64_t pos = 0; pos < wide_shape.capacity; ++pos) {
      for (int64_t d = 0; d < shape.head_dim; ++d) {
        const int64_t wide_index = (kv_head * wide_shape.capacity + pos) * shape.head_dim + d;
        if (pos < shape.num_positions) {
          const int64_t index = (kv_head * shape.capacity + pos) * shape.head_dim + d;
          wide.k_cache[wide_index] = inputs.k_cache[index];
          wide.v_cache[wide_index] = inputs.v_cache[index];
        } else {
          wide.k_cache[wide_index] = static_cast<float>(pos % 7);
          wide.v_cache[wide_index] = static_cast<float>(d % 5);
        }
      }
    }
  }
  const std::vector<float> in_wide_cache = run_attention(wide, wide_shape);
  EXPECT_TRUE(same_bits(alone.data(), in_wide_cache.data(), alone.size()));
}

// ---------------------------------------------------------------------------------------------
// to_f32

// 16-bit float values decoded straight from the IEEE definition, in double.
double decode_half_precision(uint16_t bits, int exponent_bits, int mantissa_bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int mantissa = bits & ((1 << mantissa_bits) - 1);
  const int bias = (1 << (exponent_bits - 1)) - 1;
  double magnitude;
  if (exponent == (1 << exponent_bits) - 1) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                         : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, 1 - bias - mantissa_bits);
  } else {
    magnitude = std::ldexp((1 << mantissa_bits) + mantissa, exponent - bias - mantissa_bits);
  }
  return sign ? -magnitude : magnitude;
}

void expect_all_16_bit_patterns_decode(DType dtype, int exponent_bits, int mantissa_bits) {
  std::vector<uint16_t> patterns(65536);
  std::iota(patterns.begin(), patterns.end(), uint16_t{0});
  std::vector<float> converted(patterns.size());
  to_f32(patterns.data(), dtype, static_cast<int64_t>(patterns.size()), converted.data());
  for (size_t i = 0; i < patterns.size(); ++i) {
    const double expected = decode_half_precision(patterns[i], exponent_bits, mantissa_bits);
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(converted[i])) << dtype_name(dtype) << " pattern " << i;
      ASSERT_EQ(std::signbit(converted[i]), (patterns[i] & 0x8000u) != 0);
    } else {
      // Every bf16/f16 value is exactly representable in fp32, so the conversion is exact,
      // including the sign of zero.
      ASSERT_EQ(double{converted[i]}, expected) << dtype_name(dtype) << " pattern " << i;
      ASSERT_EQ(std::signbit(converted[i]), std::signbit(expected)) << "pattern " << i;
    }
  }
}

TEST(ToF32, Bf16AllPatternsExact) {
  expect_all_16_bit_patterns_decode(DType::kBF16, 8, 7);
}

TEST(ToF32, F16AllPatternsExact) {
  expect_all_16_bit_patterns_decode(DType::kF16, 5, 10);
}

TEST(ToF32, F32IsBitwiseCopy) {
  // Random bit patterns cover NaN payloads, infinities, subnormals and -0.
  std::mt19937 rng(9);
  std::vector<uint32_t> patterns(10000);
  for (uint32_t& bits : patterns) bits = static_cast<uint32_t>(rng());
  patterns[0] = 0x80000000u;  // -0
  patterns[1] = 0x7fa00001u;  // signalling NaN payload
  patterns[2] = 0x00000001u;  // smallest subnormal
  std::vector<float> converted(patterns.size());
  to_f32(patterns.data(), DType::kF32, static_cast<int64_t>(patterns.size()), converted.data());
  EXPECT_EQ(std::memcmp(patterns.data(), converted.data(), patterns.size() * sizeof(float)), 0);
}

TEST(ToF32, Bf16KeepsNanPayloadAsUpperBits) {
  // bf16 is the top half of an fp32: conversion is a 16-bit shift, NaN payloads included.
  const uint16_t patterns[] = {0x7fc1u, 0xffa5u, 0x3f80u, 0x0001u};
  float converted[4];
  to_f32(patterns, DType::kBF16, 4, converted);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(float_bits(converted[i]), uint32_t{patterns[i]} << 16);
}

}  // namespace
}  // namespace keel::cpu
