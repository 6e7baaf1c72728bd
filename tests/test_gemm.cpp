// Tests of the batch-invariant GEMM (kernels/cpu/gemm.h).
//
// Two kinds of checks:
//  - accuracy against a double-precision reference (bounded error, see reference_bound());
//  - bit identity: every ISA path must reproduce canonical_dot() exactly, for every element,
//    whatever M, N, strides, tile edges or the other rows of the batch.
// Each test runs once per ISA path and is skipped (with a message) when the CPU lacks it.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "kernels/cpu/gemm.h"

namespace keel::cpu {

// Readable parameter values in gtest messages ("avx512" rather than a byte dump).
void PrintTo(Isa isa, std::ostream* out) {
  *out << isa_name(isa);
}

namespace {

constexpr DType kAllDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// Weights in storage form plus the exact fp32 value of each stored element.
struct Weights {
  DType dtype;
  std::vector<uint16_t> half_bits;  // bf16 / f16 storage
  std::vector<float> f32;           // f32 storage
  std::vector<float> stored_value;  // what the kernel reads, widened to fp32 (exact)

  const void* data() const {
    return dtype == DType::kF32 ? static_cast<const void*>(f32.data())
                                : static_cast<const void*>(half_bits.data());
  }
  const void* row(int64_t index, int64_t ld) const {
    return static_cast<const uint8_t*>(data()) + index * ld * dtype_size(dtype);
  }
};

Weights make_weights(DType dtype, int64_t count, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Weights weights{dtype, {}, {}, {}};
  weights.stored_value.resize(count);
  if (dtype == DType::kF32)
    weights.f32.resize(count);
  else
    weights.half_bits.resize(count);
  for (int64_t i = 0; i < count; ++i) {
    float value = normal(rng);
    switch (dtype) {
      case DType::kF32:
        weights.f32[i] = value;
        break;
      case DType::kBF16:
        weights.half_bits[i] = f32_to_bf16(value);
        break;
      case DType::kF16:
        weights.half_bits[i] = f32_to_f16(value);
        break;
    }
    weights.stored_value[i] = load_as_f32(weights.data(), dtype, i);
  }
  return weights;
}

std::vector<float> make_activations(int64_t count, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(count);
  for (float& value : values) value = normal(rng);
  return values;
}

bool same_bits(float a, float b) {
  return float_bits(a) == float_bits(b);
}

std::string describe(float value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.9g (0x%08x)", value, float_bits(value));
  return text;
}

class GemmIsaTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (static_cast<int>(GetParam()) > static_cast<int>(detected_isa())) {
      GTEST_SKIP() << "CPU lacks " << isa_name(GetParam()) << " (detected "
                   << isa_name(detected_isa()) << "); that path is untested on this machine";
    }
    set_active_isa(GetParam());
  }
  void TearDown() override { set_active_isa(detected_isa()); }
};

INSTANTIATE_TEST_SUITE_P(AllIsas, GemmIsaTest,
                         ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& info) {
                           return std::string(isa_name(info.param));
                         });

// Runs gemm with the given strides and checks every output element's bits against
// canonical_dot of its row pair. Returns the number of mismatches (each is reported).
int count_mismatches_vs_canonical(const std::vector<float>& x, int64_t ldx, const Weights& w,
                                  int64_t ldw, int64_t m, int64_t n, int64_t k, int64_t ldy) {
  std::vector<float> y(static_cast<size_t>(std::max<int64_t>(1, m * ldy)),
                       std::numeric_limits<float>::quiet_NaN());
  gemm(GemmArgs{x.data(), ldx, w.data(), w.dtype, ldw, y.data(), ldy, m, n, k});
  int mismatches = 0;
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t col = 0; col < n; ++col) {
      float expected = canonical_dot(x.data() + row * ldx, w.row(col, ldw), w.dtype, k);
      float actual = y[row * ldy + col];
      if (!same_bits(expected, actual)) {
        if (++mismatches <= 5) {
          ADD_FAILURE() << dtype_name(w.dtype) << " m=" << m << " n=" << n << " k=" << k << " at ["
                        << row << "," << col << "]: canonical " << describe(expected) << " vs "
                        << isa_name(active_isa()) << " " << describe(actual);
        }
      }
    }
  }
  return mismatches;
}

// Restates the definition of gemm.h independently of the library (16 lanes, fma in increasing
// k, zero products past the end, 8/4/2/1 fold) so that canonical_dot itself is pinned down.
float definition_dot(const float* x, const float* w_values, int64_t k) {
  float lanes[16] = {};
  int64_t num_chunks = (k + 15) / 16;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int lane = 0; lane < 16; ++lane) {
      int64_t k_idx = chunk * 16 + lane;
      float product_x = k_idx < k ? x[k_idx] : 0.0f;
      float product_w = k_idx < k ? w_values[k_idx] : 0.0f;
      lanes[lane] = std::fma(product_x, product_w, lanes[lane]);
    }
  }
  for (int i = 0; i < 8; ++i) lanes[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) lanes[i] = lanes[i] + lanes[i + 4];
  for (int i = 0; i < 2; ++i) lanes[i] = lanes[i] + lanes[i + 2];
  return lanes[0] + lanes[1];
}

// Error bound of the canonical reduction against the exact dot product of the stored values.
// Each lane is a chain of L = ceil(K/16) fmas (one rounding each, the first exact against the
// +0 start), followed by 4 levels of the fold, so every product passes through at most L + 4
// roundings: |y - exact| <= gamma(L + 4) * sum_k |x_k * w_k|, gamma(n) = n*u / (1 - n*u),
// u = 2^-24 (Higham, Accuracy and Stability, 3.1). The weight dtype does not enter because the
// reference uses the exact widened stored weights; against the unrounded fp32 master weights
// the storage rounding adds u_dtype * sum|x*w| (u_bf16 = 2^-8, u_f16 = 2^-11), see
// GemmIsaTest.CloseToUnroundedWeights. The double reference itself is exact to ~K * 2^-53.
double reference_bound(int64_t k, double sum_abs_products) {
  const double unit_roundoff = std::ldexp(1.0, -24);
  const double depth = static_cast<double>((k + 15) / 16 + 4);
  const double gamma = depth * unit_roundoff / (1.0 - depth * unit_roundoff);
  return gamma * sum_abs_products +
         static_cast<double>(k) * std::ldexp(1.0, -52) * sum_abs_products;
}

TEST(GemmIsa, NamesAndDetection) {
  EXPECT_EQ(isa_name(Isa::kScalar), "scalar");
  EXPECT_EQ(isa_name(Isa::kAvx2), "avx2");
  EXPECT_EQ(isa_name(Isa::kAvx512), "avx512");
  EXPECT_EQ(active_isa(), detected_isa());
  set_active_isa(Isa::kScalar);
  EXPECT_EQ(active_isa(), Isa::kScalar);
  set_active_isa(detected_isa());
  EXPECT_EQ(active_isa(), detected_isa());
}

TEST(GemmIsa, UnsupportedIsaThrows) {
  if (detected_isa() == Isa::kAvx512) {
    GTEST_SKIP() << "CPU supports every path; cannot request one it lacks";
  }
  EXPECT_THROW(set_active_isa(Isa::kAvx512), Error);
  EXPECT_EQ(active_isa(), detected_isa());
}

TEST(CanonicalDot, MatchesRestatedDefinition) {
  std::mt19937 rng(1);
  for (DType dtype : kAllDtypes) {
    for (int64_t k : {1, 2, 15, 16, 17, 31, 32, 33, 100, 1000, 4099}) {
      std::vector<float> x = make_activations(k, rng);
      Weights w = make_weights(dtype, k, rng);
      float expected = definition_dot(x.data(), w.stored_value.data(), k);
      float actual = canonical_dot(x.data(), w.data(), dtype, k);
      EXPECT_TRUE(same_bits(expected, actual)) << dtype_name(dtype) << " k=" << k << ": "
                                               << describe(expected) << " vs " << describe(actual);
    }
  }
}

TEST(CanonicalDot, EmptyIsPositiveZero) {
  float x = 1.0f;
  float w = 1.0f;
  EXPECT_TRUE(same_bits(canonical_dot(&x, &w, DType::kF32, 0), 0.0f));
}

TEST_P(GemmIsaTest, CloseToDoubleReference) {
  std::mt19937 rng(2);
  for (DType dtype : kAllDtypes) {
    for (int64_t k : {1, 7, 16, 100, 1000, 4096}) {
      const int64_t m = 5;
      const int64_t n = 11;
      std::vector<float> x = make_activations(m * k, rng);
      Weights w = make_weights(dtype, n * k, rng);
      std::vector<float> y(m * n);
      gemm(x.data(), w.data(), dtype, y.data(), m, n, k);
      for (int64_t row = 0; row < m; ++row) {
        for (int64_t col = 0; col < n; ++col) {
          double exact = 0.0;
          double sum_abs = 0.0;
          for (int64_t i = 0; i < k; ++i) {
            double product = double{x[row * k + i]} * double{w.stored_value[col * k + i]};
            exact += product;
            sum_abs += std::fabs(product);
          }
          double error = std::fabs(double{y[row * n + col]} - exact);
          EXPECT_LE(error, reference_bound(k, sum_abs))
              << dtype_name(dtype) << " k=" << k << " at [" << row << "," << col << "]";
        }
      }
    }
  }
}

// Against fp32 master weights before storage rounding: the dtype's own rounding dominates.
TEST_P(GemmIsaTest, CloseToUnroundedWeights) {
  std::mt19937 rng(3);
  const int64_t m = 3;
  const int64_t n = 9;
  const int64_t k = 777;
  std::vector<float> x = make_activations(m * k, rng);
  std::vector<float> master = make_activations(n * k, rng);
  for (DType dtype : kAllDtypes) {
    std::vector<uint16_t> half_bits(n * k);
    for (int64_t i = 0; i < n * k; ++i) {
      half_bits[i] = dtype == DType::kBF16 ? f32_to_bf16(master[i]) : f32_to_f16(master[i]);
    }
    const void* w = dtype == DType::kF32 ? static_cast<const void*>(master.data())
                                         : static_cast<const void*>(half_bits.data());
    // Rounding of one stored weight: relative u_dtype = 2^-24 (f32), 2^-8 (bf16), 2^-11 (f16),
    // plus, for f16 only, an absolute 2^-25 where |w| < 2^-14 falls into its subnormal range.
    const double dtype_roundoff = dtype == DType::kF32    ? std::ldexp(1.0, -24)
                                  : dtype == DType::kBF16 ? std::ldexp(1.0, -8)
                                                          : std::ldexp(1.0, -11);
    const double subnormal_step = dtype == DType::kF16 ? std::ldexp(1.0, -25) : 0.0;
    std::vector<float> y(m * n);
    gemm(x.data(), w, dtype, y.data(), m, n, k);
    for (int64_t row = 0; row < m; ++row) {
      for (int64_t col = 0; col < n; ++col) {
        double exact = 0.0;
        double sum_abs = 0.0;
        double sum_abs_x = 0.0;
        for (int64_t i = 0; i < k; ++i) {
          double product = double{x[row * k + i]} * double{master[col * k + i]};
          exact += product;
          sum_abs += std::fabs(product);
          sum_abs_x += std::fabs(double{x[row * k + i]});
        }
        // Storage rounding perturbs each product by at most u_dtype |x w| (+ 2^-25 |x| for f16
        // subnormals); the reduction then adds its own bound on the (slightly larger) sum.
        double bound =
            dtype_roundoff * sum_abs + subnormal_step * sum_abs_x +
            reference_bound(k, sum_abs * (1.0 + dtype_roundoff) + subnormal_step * sum_abs_x);
        EXPECT_LE(std::fabs(double{y[row * n + col]} - exact), bound)
            << dtype_name(dtype) << " at [" << row << "," << col << "]";
      }
    }
  }
}

TEST_P(GemmIsaTest, BitIdenticalToCanonicalOnAwkwardShapes) {
  std::mt19937 rng(4);
  for (DType dtype : kAllDtypes) {
    for (int64_t k : {1, 15, 16, 17, 100, 1000}) {
      for (int64_t n : {1, 3, 17}) {
        Weights w = make_weights(dtype, n * k, rng);
        for (int64_t m = 1; m <= 9; ++m) {
          std::vector<float> x = make_activations(m * k, rng);
          ASSERT_EQ(count_mismatches_vs_canonical(x, k, w, k, m, n, k, n), 0);
        }
      }
    }
  }
}

// Enough weight rows to span several L2 weight groups and tile edges inside each.
TEST_P(GemmIsaTest, BitIdenticalAcrossWeightGroups) {
  std::mt19937 rng(5);
  for (DType dtype : kAllDtypes) {
    const int64_t k = 4100;
    const int64_t n = 301;
    const int64_t m = 6;
    Weights w = make_weights(dtype, n * k, rng);
    std::vector<float> x = make_activations(m * k, rng);
    ASSERT_EQ(count_mismatches_vs_canonical(x, k, w, k, m, n, k, n), 0);
  }
}

TEST_P(GemmIsaTest, StridedOperands) {
  std::mt19937 rng(6);
  for (DType dtype : kAllDtypes) {
    const int64_t m = 7;
    const int64_t n = 13;
    const int64_t k = 45;
    const int64_t ldx = k + 5;
    const int64_t ldw = k + 3;
    const int64_t ldy = n + 4;
    std::vector<float> x = make_activations(m * ldx, rng);
    Weights w = make_weights(dtype, n * ldw, rng);
    ASSERT_EQ(count_mismatches_vs_canonical(x, ldx, w, ldw, m, n, k, ldy), 0);

    // The padding of y between rows must be left alone, and the padding of x and w ignored.
    std::vector<float> y(m * ldy, -7.0f);
    gemm(GemmArgs{x.data(), ldx, w.data(), dtype, ldw, y.data(), ldy, m, n, k});
    std::vector<float> x_packed(m * k);
    for (int64_t row = 0; row < m; ++row) {
      std::memcpy(&x_packed[row * k], &x[row * ldx], k * sizeof(float));
    }
    for (int64_t row = 0; row < m; ++row) {
      for (int64_t col = n; col < ldy; ++col) EXPECT_EQ(y[row * ldy + col], -7.0f);
      for (int64_t col = 0; col < n; ++col) {
        float expected = canonical_dot(&x_packed[row * k], w.row(col, ldw), dtype, k);
        EXPECT_TRUE(same_bits(expected, y[row * ldy + col]));
      }
    }
  }
}

// A row's output must not depend on how many rows share the call or where the row sits.
TEST_P(GemmIsaTest, BatchInvariance) {
  std::mt19937 rng(7);
  for (DType dtype : kAllDtypes) {
    const int64_t k = 333;
    const int64_t n = 29;
    Weights w = make_weights(dtype, n * k, rng);
    std::vector<float> probe_row = make_activations(k, rng);
    std::vector<float> alone(n);
    gemm(probe_row.data(), w.data(), dtype, alone.data(), 1, n, k);
    for (int64_t batch = 1; batch <= 64; ++batch) {
      const int64_t position = (batch * 37 + 11) % batch;
      std::vector<float> x = make_activations(batch * k, rng);
      std::memcpy(&x[position * k], probe_row.data(), k * sizeof(float));
      std::vector<float> y(batch * n);
      gemm(x.data(), w.data(), dtype, y.data(), batch, n, k);
      for (int64_t col = 0; col < n; ++col) {
        ASSERT_TRUE(same_bits(alone[col], y[position * n + col]))
            << dtype_name(dtype) << " batch=" << batch << " position=" << position << " col=" << col
            << ": " << describe(alone[col]) << " vs " << describe(y[position * n + col]);
      }
    }
    for (int64_t col = 0; col < n; ++col) {
      EXPECT_TRUE(same_bits(alone[col], canonical_dot(probe_row.data(), w.row(col, k), dtype, k)));
    }
  }
}

// Column subsets too: computing a slice of the weight rows gives the same bits (tensor-parallel
// shards compute N / tp rows of the same matrix).
TEST_P(GemmIsaTest, ColumnSliceInvariance) {
  std::mt19937 rng(8);
  const int64_t m = 5;
  const int64_t n = 40;
  const int64_t k = 130;
  std::vector<float> x = make_activations(m * k, rng);
  Weights w = make_weights(DType::kBF16, n * k, rng);
  std::vector<float> full(m * n);
  gemm(x.data(), w.data(), DType::kBF16, full.data(), m, n, k);
  for (int64_t first_col : {0, 1, 7, 13}) {
    for (int64_t num_cols : {1, 5, 19}) {
      std::vector<float> slice(m * num_cols);
      gemm(GemmArgs{x.data(), k, w.row(first_col, k), DType::kBF16, k, slice.data(), num_cols, m,
                    num_cols, k});
      for (int64_t row = 0; row < m; ++row) {
        for (int64_t col = 0; col < num_cols; ++col) {
          ASSERT_TRUE(same_bits(full[row * n + first_col + col], slice[row * num_cols + col]));
        }
      }
    }
  }
}

TEST_P(GemmIsaTest, EmptyReductionGivesZeros) {
  const int64_t m = 3;
  const int64_t n = 4;
  std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
  float unused = 1.0f;
  for (DType dtype : kAllDtypes) {
    gemm(GemmArgs{&unused, 0, &unused, dtype, 0, y.data(), n, m, n, 0});
    for (float value : y) EXPECT_TRUE(same_bits(value, 0.0f));
  }
}

TEST_P(GemmIsaTest, EmptyOutputsTouchNothing) {
  std::vector<float> y(4, -1.0f);
  float x = 1.0f;
  float w = 1.0f;
  gemm(GemmArgs{&x, 1, &w, DType::kF32, 1, y.data(), 4, 0, 4, 1});
  gemm(GemmArgs{&x, 1, &w, DType::kF32, 1, y.data(), 0, 2, 0, 1});
  gemm(GemmArgs{nullptr, 1, nullptr, DType::kF32, 1, nullptr, 0, 0, 0, 1});
  for (float value : y) EXPECT_EQ(value, -1.0f);
}

// The tail lanes must perform fma(0, 0, acc), not be skipped: with every product rounding to
// -0, K = 16 leaves all lanes -0 (sum -0), but K = 17 turns lanes 1..15 into +0 and lane 0
// stays -0, so the fold gives +0.
TEST_P(GemmIsaTest, TailLanesFollowDefinitionForSignedZero) {
  const float tiny_negative = std::ldexp(-1.0f, -130);
  const float weight_value = std::ldexp(1.0f, -24);  // exact in f32, bf16 and f16 (subnormal)
  for (DType dtype : kAllDtypes) {
    for (int64_t k : {16, 17, 33}) {
      std::vector<float> x(k, tiny_negative);
      Weights w{dtype, {}, {}, {}};
      if (dtype == DType::kF32)
        w.f32.assign(k, weight_value);
      else {
        uint16_t bits =
            dtype == DType::kBF16 ? f32_to_bf16(weight_value) : f32_to_f16(weight_value);
        w.half_bits.assign(k, bits);
      }
      ASSERT_EQ(load_as_f32(w.data(), dtype, 0), weight_value);
      float expected = canonical_dot(x.data(), w.data(), dtype, k);
      EXPECT_EQ(std::signbit(expected), k == 16) << "k=" << k;
      float y = 1.0f;
      gemm(x.data(), w.data(), dtype, &y, 1, 1, k);
      EXPECT_TRUE(same_bits(expected, y))
          << dtype_name(dtype) << " k=" << k << ": " << describe(expected) << " vs " << describe(y);
    }
  }
}

// Rows that end exactly at an unmapped page: the K tail must not read past the last element.
TEST_P(GemmIsaTest, NoReadsPastRowEnd) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mapping =
      mmap(nullptr, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapping, MAP_FAILED);
  auto* base = static_cast<uint8_t*>(mapping);
  // Layout: [x page][guard][w page][guard]; operands are placed flush against the guards.
  ASSERT_EQ(mprotect(base + page, page, PROT_NONE), 0);
  ASSERT_EQ(mprotect(base + 3 * page, page, PROT_NONE), 0);
  std::mt19937 rng(9);
  for (DType dtype : kAllDtypes) {
    for (int64_t k : {1, 15, 17, 31, 47}) {
      const int64_t m = 3;
      const int64_t n = 5;
      auto* x = reinterpret_cast<float*>(base + page - m * k * sizeof(float));
      uint8_t* w = base + 3 * page - n * k * dtype_size(dtype);
      std::vector<float> x_values = make_activations(m * k, rng);
      Weights weights = make_weights(dtype, n * k, rng);
      std::memcpy(x, x_values.data(), m * k * sizeof(float));
      std::memcpy(w, weights.data(), n * k * dtype_size(dtype));
      std::vector<float> y(m * n);
      gemm(x, w, dtype, y.data(), m, n, k);
      for (int64_t row = 0; row < m; ++row) {
        for (int64_t col = 0; col < n; ++col) {
          float expected = canonical_dot(x + row * k, weights.row(col, k), dtype, k);
          EXPECT_TRUE(same_bits(expected, y[row * n + col])) << dtype_name(dtype) << " k=" << k;
        }
      }
    }
  }
  munmap(mapping, 4 * page);
}

// Same bits whichever path computed them (the cross-ISA contract, checked directly).
TEST(GemmCrossIsa, AllAvailablePathsAgree) {
  std::mt19937 rng(10);
  const int64_t m = 11;
  const int64_t n = 23;
  const int64_t k = 517;
  std::vector<float> x = make_activations(m * k, rng);
  for (DType dtype : kAllDtypes) {
    Weights w = make_weights(dtype, n * k, rng);
    std::vector<float> scalar_y(m * n);
    set_active_isa(Isa::kScalar);
    gemm(x.data(), w.data(), dtype, scalar_y.data(), m, n, k);
    for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
      if (static_cast<int>(isa) > static_cast<int>(detected_isa())) continue;
      set_active_isa(isa);
      std::vector<float> y(m * n);
      gemm(x.data(), w.data(), dtype, y.data(), m, n, k);
      EXPECT_EQ(std::memcmp(y.data(), scalar_y.data(), y.size() * sizeof(float)), 0)
          << isa_name(isa) << " " << dtype_name(dtype);
    }
  }
  set_active_isa(detected_isa());
}

TEST(GemmDeathTest, RejectsBadArguments) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  float x[4] = {};
  float w[4] = {};
  float y[4] = {};
  EXPECT_DEATH(gemm(GemmArgs{x, 2, w, DType::kF32, 2, y, 2, -1, 2, 2}), "negative size");
  EXPECT_DEATH(gemm(GemmArgs{x, 1, w, DType::kF32, 2, y, 2, 2, 2, 2}), "leading dimension");
  EXPECT_DEATH(gemm(GemmArgs{x, 2, w, DType::kF32, 1, y, 2, 2, 2, 2}), "leading dimension");
  EXPECT_DEATH(gemm(GemmArgs{x, 2, w, DType::kF32, 2, y, 1, 2, 2, 2}), "ldy");
  EXPECT_DEATH(gemm(GemmArgs{nullptr, 2, w, DType::kF32, 2, y, 2, 2, 2, 2}), "null input");
  EXPECT_DEATH(gemm(GemmArgs{x, 2, nullptr, DType::kF32, 2, y, 2, 2, 2, 2}), "null input");
  EXPECT_DEATH(gemm(GemmArgs{x, 2, w, DType::kF32, 2, nullptr, 2, 2, 2, 2}), "null output");
}

}  // namespace
}  // namespace keel::cpu
