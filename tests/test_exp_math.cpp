// The shared exp family (kernels/math/exp_math.h): accuracy against double-precision
// references, special values, monotonicity, and that the CPU kernels use exactly these
// functions (so the CUDA kernels, which call the same ones, give the same bits).
//
// The sweeps walk the floats in increasing order with a stride: KEEL_MATH_SWEEP_STRIDE
// (default 1021, ~4M inputs per function, about a second) or 1 for every float, the
// measurement behind the bounds in exp_math.h's header:
//   KEEL_MATH_SWEEP_STRIDE=1 build/tests/test_exp_math --gtest_filter='ExpMathSweep.*'
// A strided subset can only find a smaller maximum than all floats, so asserting the stated
// bounds on it is sound. The references are computed in double from the float input: glibc's
// double exp/log1p are within 1 double ulp, so even after the few double roundings of a
// composition the reference is within ~2^-50 relative of the true value, ~1e-7 float ulp: the
// measured errors are the functions' own.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/cpu/ops.h"
#include "kernels/math/exp_math.h"
#include "kernels/math/ops_math.h"

namespace keel {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

bool same_bits(float a, float b) {
  return float_bits(a) == float_bits(b);
}

// The spacing of floats at the reference value: 2^(e - 23) in [2^e, 2^(e+1)), 2^-149 below
// 2^-126. From the double's exponent bits: the exhaustive sweeps call this billions of times.
double ulp_at(double reference) {
  uint64_t bits = 0;
  std::memcpy(&bits, &reference, sizeof(bits));
  const int64_t exponent =
      std::max<int64_t>(static_cast<int64_t>((bits >> 52) & 0x7ff) - 1023, -126);
  const uint64_t ulp_bits = static_cast<uint64_t>(exponent - 23 + 1023) << 52;
  double ulp = 0.0;
  std::memcpy(&ulp, &ulp_bits, sizeof(ulp));
  return ulp;
}

// Error of `value` in ulps of the reference; infinities and NaNs must match exactly (any
// mismatch is an infinite error).
double ulp_error(float value, double reference) {
  if (std::isnan(reference)) return std::isnan(value) ? 0.0 : HUGE_VAL;
  const float rounded_reference = static_cast<float>(reference);
  if (std::isinf(rounded_reference) || std::isinf(value))
    return value == rounded_reference ? 0.0 : HUGE_VAL;
  return std::fabs(static_cast<double>(value) - reference) / ulp_at(reference);
}

// Total order of non-NaN floats as unsigned keys: -inf < ... < -0 < +0 < ... < +inf.
uint32_t order_key(float value) {
  const uint32_t bits = float_bits(value);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

float from_order_key(uint32_t key) {
  return bits_float((key & 0x80000000u) != 0 ? key & 0x7fffffffu : ~key);
}

uint64_t sweep_stride() {
  const char* text = std::getenv("KEEL_MATH_SWEEP_STRIDE");
  if (text == nullptr) return 1021;
  const long long stride = std::atoll(text);
  return stride > 0 ? static_cast<uint64_t>(stride) : 1021;
}

// kIncreasingFromZero: checked only between swept inputs >= 0 (SiLU has its minimum at -1.278).
enum class Monotone { kNo, kIncreasing, kIncreasingFromZero };

struct SweepResult {
  double max_ulp = 0.0;
  float worst_input = 0.0f;
  uint64_t inputs = 0;
  uint64_t order_violations = 0;  // f(a) > f(b) for consecutive swept a < b
  float first_violation = 0.0f;
};

// f over every stride-th float in [low, high] (in increasing order), against the reference.
template <typename Function, typename Reference>
SweepResult sweep(Function f, Reference ref, float low, float high, uint64_t stride,
                  Monotone monotone) {
  const uint64_t first_key = order_key(low);
  const uint64_t last_key = order_key(high);
  const uint64_t count = (last_key - first_key) / stride + 1;
  const unsigned threads = std::clamp(std::thread::hardware_concurrency(), 1u, 16u);
  std::vector<SweepResult> parts(threads);
  std::vector<float> first_value(threads), last_value(threads);
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      const uint64_t begin = count * t / threads;
      const uint64_t end = count * (t + 1) / threads;
      SweepResult& part = parts[t];
      float previous = 0.0f;
      for (uint64_t i = begin; i < end; ++i) {
        const float x = from_order_key(static_cast<uint32_t>(first_key + i * stride));
        const float y = f(x);
        const double error = ulp_error(y, ref(static_cast<double>(x)));
        if (error > part.max_ulp) {
          part.max_ulp = error;
          part.worst_input = x;
        }
        const bool checked = monotone == Monotone::kIncreasing ||
                             (monotone == Monotone::kIncreasingFromZero && !std::signbit(x));
        if (checked && i > begin && previous > y) {
          if (part.order_violations++ == 0) part.first_violation = x;
        }
        if (i == begin) first_value[t] = y;
        previous = y;
      }
      part.inputs = end - begin;
      last_value[t] = previous;
    });
  }
  for (std::thread& worker : workers) worker.join();
  SweepResult total;
  for (unsigned t = 0; t < threads; ++t) {
    const SweepResult& part = parts[t];
    if (part.max_ulp > total.max_ulp) {
      total.max_ulp = part.max_ulp;
      total.worst_input = part.worst_input;
    }
    total.inputs += part.inputs;
    if (total.order_violations == 0 && part.order_violations > 0)
      total.first_violation = part.first_violation;
    total.order_violations += part.order_violations;
    const uint64_t first_index = count * t / threads;
    const float first_x = from_order_key(static_cast<uint32_t>(first_key + first_index * stride));
    const bool checked = monotone == Monotone::kIncreasing ||
                         (monotone == Monotone::kIncreasingFromZero && !std::signbit(first_x));
    if (checked && t > 0 && parts[t - 1].inputs > 0 && part.inputs > 0 &&
        last_value[t - 1] > first_value[t])
      ++total.order_violations;
  }
  return total;
}

// The bounds stated in exp_math.h (measured over all floats, rounded up).
constexpr double kExpMaxUlp = 0.79;
constexpr double kSigmoidMaxUlp = 2.49;
constexpr double kSiluMaxUlp = 2.39;
constexpr double kLog1pMaxUlp = 0.86;
constexpr double kSoftplusMaxUlp = 1.55;

double exp_reference(double x) {
  return std::exp(x);
}
double sigmoid_reference(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}
double silu_reference(double x) {
  return x == -HUGE_VAL ? -0.0 : x / (1.0 + std::exp(-x));
}
double log1p_reference(double x) {
  return std::log1p(x);
}
double softplus_reference(double x) {
  return x > 0.0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <typename Function, typename Reference>
void run_sweep(const char* name, Function f, Reference ref, double bound, Monotone monotone,
               float low = -kInf, float high = kInf) {
  const uint64_t stride = sweep_stride();
  const SweepResult result = sweep(f, ref, low, high, stride, monotone);
  std::printf("[ sweep ] %s over [%g, %g], stride %llu (%llu inputs): max %.4f ulp at %a\n", name,
              static_cast<double>(low), static_cast<double>(high),
              static_cast<unsigned long long>(stride),
              static_cast<unsigned long long>(result.inputs), result.max_ulp,
              static_cast<double>(result.worst_input));
  ::testing::Test::RecordProperty(std::string(name) + "_max_ulp", std::to_string(result.max_ulp));
  EXPECT_LE(result.max_ulp, bound)
      << name << " at " << result.worst_input << " (" << std::hexfloat << result.worst_input << ")";
  EXPECT_EQ(result.order_violations, 0u)
      << name << " decreases at " << std::hexfloat << result.first_violation;
}

TEST(ExpMathSweep, Exp) {
  run_sweep(
      "exp_f32", [](float x) { return math::exp_f32(x); }, exp_reference, kExpMaxUlp,
      Monotone::kIncreasing);
}

TEST(ExpMathSweep, Sigmoid) {
  run_sweep(
      "sigmoid_f32", [](float x) { return math::sigmoid_f32(x); }, sigmoid_reference,
      kSigmoidMaxUlp, Monotone::kIncreasing);
}

TEST(ExpMathSweep, Silu) {
  run_sweep(
      "silu_f32", [](float x) { return math::silu_f32(x); }, silu_reference, kSiluMaxUlp,
      Monotone::kIncreasingFromZero);
}

TEST(ExpMathSweep, Log1p) {
  run_sweep(
      "log1p_f32", [](float x) { return math::log1p_f32(x); }, log1p_reference, kLog1pMaxUlp,
      Monotone::kIncreasing);
}

TEST(ExpMathSweep, Softplus) {
  run_sweep(
      "softplus_f32", [](float x) { return math::softplus_f32(x); }, softplus_reference,
      kSoftplusMaxUlp, Monotone::kIncreasing);
}

// A NaN comes back as it went in, so its bits are the same on both sides too.
TEST(ExpMath, EveryNanComesBackUnchanged) {
  const uint64_t stride = sweep_stride();
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint64_t payload = 1; payload <= 0x7fffffu; payload += stride) {
      const float nan = bits_float(sign | 0x7f800000u | static_cast<uint32_t>(payload));
      ASSERT_TRUE(same_bits(math::exp_f32(nan), nan)) << payload;
      ASSERT_TRUE(same_bits(math::sigmoid_f32(nan), nan)) << payload;
      ASSERT_TRUE(same_bits(math::silu_f32(nan), nan)) << payload;
      ASSERT_TRUE(same_bits(math::log1p_f32(nan), nan)) << payload;
      ASSERT_TRUE(same_bits(math::softplus_f32(nan), nan)) << payload;
    }
  }
}

TEST(ExpMath, SpecialValues) {
  EXPECT_TRUE(same_bits(math::exp_f32(0.0f), 1.0f));
  EXPECT_TRUE(same_bits(math::exp_f32(-0.0f), 1.0f));
  EXPECT_TRUE(same_bits(math::exp_f32(-kInf), 0.0f));
  EXPECT_TRUE(same_bits(math::exp_f32(kInf), kInf));
  EXPECT_TRUE(same_bits(math::exp_f32(-1e30f), 0.0f));
  EXPECT_TRUE(same_bits(math::exp_f32(1e30f), kInf));
  EXPECT_TRUE(same_bits(math::exp_f32(1.0f), 0x1.5bf0a8p+1f));  // e, correctly rounded

  EXPECT_TRUE(same_bits(math::sigmoid_f32(0.0f), 0.5f));
  EXPECT_TRUE(same_bits(math::sigmoid_f32(kInf), 1.0f));
  EXPECT_TRUE(same_bits(math::sigmoid_f32(-kInf), 0.0f));
  EXPECT_TRUE(same_bits(math::sigmoid_f32(-100.0f),
                        static_cast<float>(sigmoid_reference(-100.0))));  // subnormal, kept

  EXPECT_TRUE(same_bits(math::silu_f32(0.0f), 0.0f));
  EXPECT_TRUE(same_bits(math::silu_f32(-0.0f), -0.0f));
  EXPECT_TRUE(same_bits(math::silu_f32(kInf), kInf));
  EXPECT_TRUE(same_bits(math::silu_f32(-kInf), -0.0f));
  EXPECT_TRUE(same_bits(math::silu_f32(1e30f), 1e30f));

  EXPECT_TRUE(same_bits(math::log1p_f32(0.0f), 0.0f));
  EXPECT_TRUE(same_bits(math::log1p_f32(-0.0f), -0.0f));
  EXPECT_TRUE(same_bits(math::log1p_f32(-1.0f), -kInf));
  EXPECT_TRUE(same_bits(math::log1p_f32(kInf), kInf));
  EXPECT_TRUE(std::isnan(math::log1p_f32(-1.5f)));
  EXPECT_TRUE(std::isnan(math::log1p_f32(-kInf)));
  EXPECT_TRUE(same_bits(math::log1p_f32(0x1p-149f), 0x1p-149f));  // tiny: log1p(x) = x
  EXPECT_TRUE(same_bits(math::log1p_f32(-0x1p-30f), -0x1p-30f));

  EXPECT_TRUE(same_bits(math::softplus_f32(-kInf), 0.0f));
  EXPECT_TRUE(same_bits(math::softplus_f32(kInf), kInf));
  EXPECT_TRUE(same_bits(math::softplus_f32(0.0f), 0x1.62e430p-1f));  // ln 2, correctly rounded
  EXPECT_TRUE(same_bits(math::softplus_f32(30.0f), 30.0f));
}

// Every float whose e^x is subnormal or at the edges of the range, not a strided subset: the
// scaling there rounds, and no result may be flushed to zero or overflow early.
TEST(ExpMath, SubnormalAndOverflowEdgesOverEveryFloat) {
  struct Range {
    float low, high;
  };
  for (const Range range : {Range{-104.5f, -87.0f}, Range{88.0f, 89.5f}}) {
    const SweepResult result = sweep([](float x) { return math::exp_f32(x); }, exp_reference,
                                     range.low, range.high, 1, Monotone::kIncreasing);
    EXPECT_LE(result.max_ulp, kExpMaxUlp) << std::hexfloat << result.worst_input;
    EXPECT_EQ(result.order_violations, 0u) << std::hexfloat << result.first_violation;
  }
  // The thresholds: the largest float with a finite e^x and the smallest with a non-zero one
  // are those of the correctly rounded exp.
  const float largest_finite = 0x1.62e42ep+6f;  // 88.7228317
  EXPECT_TRUE(std::isfinite(math::exp_f32(largest_finite)));
  EXPECT_TRUE(std::isinf(static_cast<float>(exp_reference(std::nextafter(largest_finite, kInf)))));
  EXPECT_TRUE(std::isinf(math::exp_f32(std::nextafter(largest_finite, kInf))));
  const float smallest_nonzero = -0x1.9fe368p+6f;  // -103.972076
  EXPECT_TRUE(same_bits(math::exp_f32(smallest_nonzero), 0x1p-149f));
  EXPECT_EQ(static_cast<float>(exp_reference(std::nextafter(smallest_nonzero, -kInf))), 0.0f);
  EXPECT_TRUE(same_bits(math::exp_f32(std::nextafter(smallest_nonzero, -kInf)), 0.0f));
}

// Every float of [-4, -1]: where an earlier sigmoid, e^x / (1 + e^x), went down by one ulp
// between neighbours (at -0x1.f1c09ap+0) when the rounding of 1 + e^x stepped up; the strided
// sweep steps over such pairs.
TEST(ExpMath, SigmoidIsMonotoneOverEveryFloatNearItsBend) {
  const SweepResult result = sweep([](float x) { return math::sigmoid_f32(x); }, sigmoid_reference,
                                   -4.0f, -1.0f, 1, Monotone::kIncreasing);
  EXPECT_EQ(result.order_violations, 0u) << std::hexfloat << result.first_violation;
  EXPECT_LE(result.max_ulp, kSigmoidMaxUlp) << std::hexfloat << result.worst_input;
}

std::vector<float> random_floats(std::mt19937& rng, size_t count, float low, float high) {
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(count);
  for (float& value : values) value = distribution(rng);
  return values;
}

// The CPU kernels' outputs are the shared functions' bits, composed in the documented order:
// nothing on the CPU side calls another exp.
TEST(ExpMath, CpuKernelsUseTheSharedFunctions) {
  std::mt19937 rng(31);
  std::vector<float> gate = random_floats(rng, 4099, -30.0f, 30.0f);
  const std::vector<float> up = random_floats(rng, gate.size(), -2.0f, 2.0f);
  gate[0] = -100.0f;  // subnormal silu and sigmoid
  gate[1] = 0.0f;
  gate[2] = -0.0f;
  std::vector<float> out(gate.size());
  cpu::silu_mul(gate.data(), up.data(), static_cast<int64_t>(gate.size()), out.data());
  for (size_t i = 0; i < gate.size(); ++i) {
    ASSERT_TRUE(same_bits(out[i], math::silu_f32(gate[i]) * up[i])) << i;
    ASSERT_TRUE(same_bits(cpu::sigmoid(gate[i]), math::sigmoid_f32(gate[i]))) << i;
  }

  for (int64_t width : {1, 7, 128, 512}) {
    std::vector<float> row = random_floats(rng, static_cast<size_t>(width), -12.0f, 12.0f);
    std::vector<float> expected(row.size());
    float max_value = -kInf;
    for (float value : row) max_value = std::max(max_value, value);
    float sum = 0.0f;
    for (size_t i = 0; i < row.size(); ++i) {
      expected[i] = math::exp_f32(row[i] - max_value);
      sum += expected[i];
    }
    const float inv_sum = 1.0f / sum;
    for (float& value : expected) value *= inv_sum;
    cpu::softmax(row.data(), width);
    for (size_t i = 0; i < row.size(); ++i)
      ASSERT_TRUE(same_bits(row[i], expected[i])) << "width " << width << " i " << i;
  }

  const int64_t head_dim = 16;
  for (int64_t num_positions : {1, 5, 300}) {
    const std::vector<float> q = random_floats(rng, head_dim, -1.0f, 1.0f);
    const std::vector<float> k = random_floats(rng, num_positions * head_dim, -3.0f, 3.0f);
    const std::vector<float> v = random_floats(rng, num_positions * head_dim, -1.0f, 1.0f);
    const int32_t kv_head = 0;
    std::vector<float> scratch(num_positions), out_head(head_dim);
    cpu::attention_decode(q.data(), 1, &kv_head, k.data(), v.data(), num_positions, head_dim,
                          num_positions, 0.25f, scratch.data(), out_head.data());
    std::vector<float> scores(num_positions);
    float max_score = -kInf;
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      float dot = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * k[pos * head_dim + d];
      scores[pos] = dot * 0.25f;
      max_score = std::max(max_score, scores[pos]);
    }
    float sum = 0.0f;
    for (float& score : scores) {
      score = math::exp_f32(score - max_score);
      sum += score;
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t d = 0; d < head_dim; ++d) {
      float acc = 0.0f;
      for (int64_t pos = 0; pos < num_positions; ++pos)
        acc += (scores[pos] * inv_sum) * v[pos * head_dim + d];
      ASSERT_TRUE(same_bits(out_head[d], acc)) << "positions " << num_positions << " d " << d;
    }
  }
}

}  // namespace
}  // namespace keel
