// Tests of the quantized GEMM (kernels/cpu/qgemm.h).
//  - bit identity: every ISA path equals the scalar path (canonical_qdot) for every element, for
//    every format, with awkward codes and scales (E4M3 subnormal and NaN scales, zero blocks,
//    negative-zero codes, int4 zeros 0..16, act order), K tails and odd N;
//  - accuracy: the scalar path against a double-precision sum of x * dequantized_weight;
//  - batch invariance for M = 1..64 at any position;
//  - W4A4: qgemm with input_scale equals qgemm without on the pre-quantized rows, and known
//    answers of the activation quantizer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/qgemm.h"
#include "kernels/math/quant_math.h"

namespace keel::cpu {

void PrintTo(Isa isa, std::ostream* out) {
  *out << isa_name(isa);
}

namespace {

using math::WeightFormat;

// A quantized matrix that owns its storage.
struct QMatrix {
  std::vector<uint8_t> codes;
  std::vector<uint8_t> scales_u8;
  std::vector<float> scales_f32;
  std::vector<uint8_t> zeros;
  std::vector<float> row_scales;
  std::vector<int32_t> group_of_k;
  math::WeightView view;
};

// Random codes and scales for `format`; `act_order` (int4) permutes group membership of k.
QMatrix make_matrix(WeightFormat format, int64_t n, int64_t k, std::mt19937& rng,
                    int64_t int4_group = 32, bool act_order = false) {
  QMatrix q;
  math::WeightView& v = q.view;
  v.format = format;
  v.rows = n;
  v.cols = k;
  std::uniform_int_distribution<int> byte(0, 255);
  const bool packed = format != WeightFormat::kFp8Block;
  v.ld = packed ? (k + 1) / 2 + 1 : k + 3;  // a little row padding
  q.codes.resize(static_cast<size_t>(n * v.ld));
  for (auto& c : q.codes) c = static_cast<uint8_t>(byte(rng));
  switch (format) {
    case WeightFormat::kNvfp4:
      v.group_size = math::kNvfp4Group;
      break;
    case WeightFormat::kMxfp4:
      v.group_size = math::kMxfp4Group;
      break;
    case WeightFormat::kFp8Block:
      v.group_size = math::kFp8BlockGroup;
      break;
    default:
      v.group_size = int4_group;
      break;
  }
  const int64_t groups = (k + v.group_size - 1) / v.group_size;
  v.scale_ld = groups + 1;
  const auto num_scales = static_cast<size_t>(n * v.scale_ld);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (format == WeightFormat::kNvfp4 || format == WeightFormat::kMxfp4) {
    q.scales_u8.resize(num_scales);
    for (auto& s : q.scales_u8) {
      int pick = byte(rng);
      if (format == WeightFormat::kNvfp4) {
        // Mostly normal positive scales, some subnormal (0x01..0x07), some zero blocks, a few
        // negative; no NaN scale 0x7f (it would make the whole output NaN, tested apart).
        s = pick < 20 ? static_cast<uint8_t>(pick % 8) : static_cast<uint8_t>(0x20 + pick % 0x40);
        if (pick > 250) s |= 0x80;
      } else {
        s = static_cast<uint8_t>(pick < 10 ? pick % 3 : 110 + pick % 30);  // incl. 2^-127
      }
    }
    v.scales = q.scales_u8.data();
    if (format == WeightFormat::kNvfp4) {
      q.row_scales.resize(static_cast<size_t>(n));
      for (auto& r : q.row_scales) r = std::ldexp(1.0f + 0.1f * normal(rng), -8);
      v.row_scales = q.row_scales.data();
    }
  } else {
    q.scales_f32.resize(num_scales);
    for (auto& s : q.scales_f32) s = std::ldexp(normal(rng), -6);
    v.scales = q.scales_f32.data();
  }
  if (format == WeightFormat::kFp8Block) {
    // Avoid NaN codes in ordinary tests (they are tested apart), keep subnormals and -0.
    for (auto& c : q.codes) {
      if ((c & 0x7f) == 0x7f) c = static_cast<uint8_t>(c ^ 1);
    }
  }
  if (format == WeightFormat::kInt4) {
    q.zeros.resize(num_scales);
    std::uniform_int_distribution<int> zero(0, 16);
    for (auto& z : q.zeros) z = static_cast<uint8_t>(zero(rng));
    v.zeros = q.zeros.data();
    if (act_order) {
      q.group_of_k.resize(static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i) q.group_of_k[i] = static_cast<int32_t>(i / v.group_size);
      std::shuffle(q.group_of_k.begin(), q.group_of_k.end(), rng);
      v.group_of_k = q.group_of_k.data();
    }
  }
  v.data = q.codes.data();
  return q;
}

std::vector<float> make_activations(int64_t count, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(count));
  for (float& value : values) value = normal(rng);
  return values;
}

bool same_bits(float a, float b) {
  return float_bits(a) == float_bits(b);
}

struct Case {
  WeightFormat format;
  int64_t int4_group;
  bool act_order;
};
const Case kCases[] = {{WeightFormat::kNvfp4, 0, false},    {WeightFormat::kMxfp4, 0, false},
                       {WeightFormat::kFp8Block, 0, false}, {WeightFormat::kInt4, 32, false},
                       {WeightFormat::kInt4, 128, false},   {WeightFormat::kInt4, 24, false},
                       {WeightFormat::kInt4, 32, true}};

std::string describe(const Case& c) {
  return std::string(math::weight_format_name(c.format)) +
         (c.format == WeightFormat::kInt4 ? " g=" + std::to_string(c.int4_group) : "") +
         (c.act_order ? " act-order" : "");
}

class QGemmIsaTest : public ::testing::TestWithParam<Isa> {
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

INSTANTIATE_TEST_SUITE_P(AllIsas, QGemmIsaTest,
                         ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& info) {
                           return std::string(isa_name(info.param));
                         });

int count_mismatches(const std::vector<float>& x, int64_t ldx, const math::WeightView& w, int64_t m,
                     const std::string& what) {
  const int64_t ldy = w.rows + 2;
  std::vector<float> y(static_cast<size_t>(m * ldy), -7.0f);
  qgemm(QGemmArgs{x.data(), ldx, w, y.data(), ldy, m});
  int mismatches = 0;
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t col = 0; col < w.rows; ++col) {
      const float expected = canonical_qdot(x.data() + row * ldx, w, col);
      const float actual = y[row * ldy + col];
      if (!same_bits(expected, actual) && ++mismatches <= 5) {
        ADD_FAILURE() << what << " m=" << m << " at [" << row << "," << col << "]: " << expected
                      << " vs " << actual;
      }
    }
    for (int64_t col = w.rows; col < ldy; ++col) EXPECT_EQ(y[row * ldy + col], -7.0f);
  }
  return mismatches;
}

TEST_P(QGemmIsaTest, BitIdenticalToScalarDefinition) {
  std::mt19937 rng(1);
  for (const Case& c : kCases) {
    for (int64_t k : {16, 48, 100, 4096}) {
      if (c.act_order && k % c.int4_group != 0) continue;
      for (int64_t n : {1, 7, 13}) {
        QMatrix q = make_matrix(c.format, n, k, rng, c.int4_group, c.act_order);
        for (int64_t m : {1, 2, 3, 5, 6}) {
          const int64_t ldx = k + 3;
          std::vector<float> x = make_activations(m * ldx, rng);
          ASSERT_EQ(count_mismatches(x, ldx, q.view, m, describe(c) + " k=" + std::to_string(k)),
                    0);
        }
      }
    }
  }
}

// Enough weight rows to span several L2 weight groups.
TEST_P(QGemmIsaTest, BitIdenticalAcrossWeightGroups) {
  std::mt19937 rng(2);
  for (const Case& c : kCases) {
    QMatrix q = make_matrix(c.format, 301, 4096, rng, c.int4_group, c.act_order);
    std::vector<float> x = make_activations(5 * 4096, rng);
    ASSERT_EQ(count_mismatches(x, 4096, q.view, 5, describe(c)), 0);
  }
}

// NVFP4 block scales in the fp32 subnormal range (a tiny weight_scale_2): the matrix-vector
// path's t * (s / 2) shortcut is inexact there, so those blocks must take the weight-by-weight
// decode; rows with ordinary scales in the same call keep the shortcut. Bits as the definition.
TEST_P(QGemmIsaTest, SubnormalBlockScales) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t k : {256, 4096, 4100}) {
    QMatrix q = make_matrix(WeightFormat::kNvfp4, 7, k, rng);
    for (size_t row = 0; row < q.row_scales.size(); row += 2)
      q.row_scales[row] = std::ldexp(1.0f + 0.1f * normal(rng), -140);
    for (int64_t m : {1, 2}) {
      std::vector<float> x = make_activations(m * k, rng);
      ASSERT_EQ(count_mismatches(x, k, q.view, m, "nvfp4 subnormal k=" + std::to_string(k)), 0);
    }
  }
}

// NaN scale or code codes: the output is NaN where the scalar path's is (NaN payloads and signs
// follow x86 operand order and are not part of the contract), and the K tail past a NaN never
// leaks.
TEST_P(QGemmIsaTest, NanCodesAndScales) {
  std::mt19937 rng(3);
  for (WeightFormat format : {WeightFormat::kNvfp4, WeightFormat::kFp8Block}) {
    const int64_t k = 100;
    QMatrix q = make_matrix(format, 9, k, rng);
    if (format == WeightFormat::kNvfp4) {
      q.scales_u8[2 * q.view.scale_ld + 1] = 0x7f;
      q.scales_u8[5 * q.view.scale_ld + 6] = 0xff;  // the tail block
    } else {
      q.codes[3 * q.view.ld + 17] = 0x7f;
      q.codes[4 * q.view.ld + 99] = 0xff;
    }
    std::vector<float> x = make_activations(2 * k, rng);
    std::vector<float> y(2 * 9);
    // m = 1 takes the matrix-vector path, m = 2 the tile path.
    qgemm(QGemmArgs{x.data(), k, q.view, y.data(), 9, 1});
    qgemm(QGemmArgs{x.data() + k, k, q.view, y.data() + 9, 9, 1});
    std::vector<float> y_tile(2 * 9);
    qgemm(QGemmArgs{x.data(), k, q.view, y_tile.data(), 9, 2});
    for (int64_t i = 0; i < 2 * 9; ++i)
      EXPECT_TRUE(same_bits(y[i], y_tile[i]) || (std::isnan(y[i]) && std::isnan(y_tile[i]))) << i;
    for (int64_t row = 0; row < 2; ++row) {
      for (int64_t col = 0; col < 9; ++col) {
        const float expected = canonical_qdot(x.data() + row * k, q.view, col);
        if (std::isnan(expected)) {
          EXPECT_TRUE(std::isnan(y[row * 9 + col]));
        } else {
          EXPECT_TRUE(same_bits(expected, y[row * 9 + col])) << row << "," << col;
        }
      }
    }
  }
}

// Error of the scalar definition against sum x * dequantized_weight in double: each weight is
// decoded exactly as dequantized_weight (same fp32 operations), so the only error is the
// canonical reduction's: every product passes through at most ceil(K/16) + 4 roundings,
// |y - exact| <= gamma(L + 4) * sum |x w| with u = 2^-24 (as test_gemm's reference_bound),
// plus the double sum's own K * 2^-52 * sum |x w|.
TEST(QGemmScalar, CloseToDoubleReference) {
  std::mt19937 rng(4);
  for (const Case& c : kCases) {
    for (int64_t k : {16, 100, 4096}) {
      if (c.act_order && k % c.int4_group != 0) continue;
      QMatrix q = make_matrix(c.format, 5, k, rng, c.int4_group, c.act_order);
      std::vector<float> x = make_activations(k, rng);
      for (int64_t col = 0; col < 5; ++col) {
        double exact = 0.0;
        double sum_abs = 0.0;
        for (int64_t i = 0; i < k; ++i) {
          const double product = double{x[i]} * double{math::dequantized_weight(q.view, col, i)};
          exact += product;
          sum_abs += std::fabs(product);
        }
        const double depth = static_cast<double>((k + 15) / 16 + 4);
        const double u = std::ldexp(1.0, -24);
        const double bound = depth * u / (1.0 - depth * u) * sum_abs +
                             static_cast<double>(k) * std::ldexp(1.0, -52) * sum_abs;
        EXPECT_LE(std::fabs(double{canonical_qdot(x.data(), q.view, col)} - exact), bound)
            << describe(c) << " k=" << k;
      }
    }
  }
}

TEST_P(QGemmIsaTest, BatchInvariance) {
  std::mt19937 rng(5);
  for (const Case& c : kCases) {
    const int64_t k = 336;
    const int64_t n = 11;
    QMatrix q = make_matrix(c.format, n, k, rng, c.int4_group, c.act_order);
    std::vector<float> probe = make_activations(k, rng);
    std::vector<float> alone(n);
    qgemm(QGemmArgs{probe.data(), k, q.view, alone.data(), n, 1});
    for (int64_t col = 0; col < n; ++col) {
      ASSERT_TRUE(same_bits(alone[col], canonical_qdot(probe.data(), q.view, col)));
    }
    for (int64_t batch = 1; batch <= 64; ++batch) {
      const int64_t position = (batch * 37 + 11) % batch;
      std::vector<float> x = make_activations(batch * k, rng);
      std::memcpy(&x[position * k], probe.data(), k * sizeof(float));
      std::vector<float> y(batch * n);
      qgemm(QGemmArgs{x.data(), k, q.view, y.data(), n, batch});
      for (int64_t col = 0; col < n; ++col) {
        ASSERT_TRUE(same_bits(alone[col], y[position * n + col]))
            << describe(c) << " batch=" << batch << " col=" << col;
      }
    }
  }
}

// W4A4: the input scale only pre-quantizes each row; the GEMM itself is unchanged.
TEST_P(QGemmIsaTest, W4A4EqualsPrequantizedRows) {
  std::mt19937 rng(6);
  for (int64_t k : {16, 100, 512}) {
    const int64_t m = 5;
    const int64_t n = 9;
    QMatrix q = make_matrix(WeightFormat::kNvfp4, n, k, rng);
    std::vector<float> x = make_activations(m * k, rng);
    std::vector<float> x_quantized(m * k);
    const float input_scale = 0.01f;
    for (int64_t row = 0; row < m; ++row) {
      math::nvfp4_quantize_activation_row(&x[row * k], k, input_scale, &x_quantized[row * k]);
    }
    std::vector<float> plain(m * n);
    qgemm(QGemmArgs{x_quantized.data(), k, q.view, plain.data(), n, m});
    math::WeightView w4a4 = q.view;
    w4a4.input_scale = input_scale;
    std::vector<float> quantized(m * n);
    qgemm(QGemmArgs{x.data(), k, w4a4, quantized.data(), n, m});
    EXPECT_EQ(std::memcmp(plain.data(), quantized.data(), plain.size() * sizeof(float)), 0);
  }
}

TEST(Nvfp4ActivationQuantizer, KnownAnswers) {
  // amax 12 with s_in = 1: b = e4m3(12 / 6) = 2 exactly, d = 2; x / d on the E2M1 grid.
  float block[16] = {12, -6, 3, 1, 0.5f, -0.25f, 2.5f, 5, 7, -9, 0, 1.5f, -3, 4, 8, -12};
  float out[16];
  math::nvfp4_quantize_activation_block(block, 16, 1.0f, out);
  // x/d: 6 -3 1.5 0.5 0.25 -0.125 1.25 2.5 3.5 -4.5 0 0.75 -1.5 2 4 -6
  // e2m1: 6 -3 1.5 0.5 0 (tie to even) -0 (|.|<=0.25) 1 (tie 1.25->1) 2 (2.5 tie -> 2)
  //       4 (3.5 tie -> 4) -4 0 1 (0.75 tie -> 1) -1.5 2 4 -6
  const float expected[16] = {12, -6, 3, 1, 0, -0.0f, 2, 4, 8, -8, 0, 2, -3, 4, 8, -12};
  for (int i = 0; i < 16; ++i) {
    EXPECT_TRUE(same_bits(out[i], expected[i])) << i << ": " << out[i] << " vs " << expected[i];
  }
  // All-zero block: d = 0, every output +0.
  float zeros[16] = {};
  math::nvfp4_quantize_activation_block(zeros, 16, 0.5f, out);
  for (float value : out) EXPECT_TRUE(same_bits(value, 0.0f));
  // Saturation: amax / (6 s_in) beyond 448 clamps the block scale to 448, d = 448 s_in, and
  // values beyond 6 d saturate to +-6 d.
  float large[3] = {1e6f, -1e6f, 10.0f};
  math::nvfp4_quantize_activation_block(large, 3, 1.0f, out);
  EXPECT_EQ(out[0], 6.0f * 448.0f);
  EXPECT_EQ(out[1], -6.0f * 448.0f);
  EXPECT_EQ(out[2], 0.0f);  // 10 / 448 < 0.25 rounds to 0
}

TEST(QGemmCrossIsa, AllAvailablePathsAgree) {
  std::mt19937 rng(7);
  for (const Case& c : kCases) {
    const int64_t m = 9;
    const int64_t n = 17;
    const int64_t k = 4000;
    QMatrix q = make_matrix(c.format, n, k, rng, c.int4_group, c.act_order);
    std::vector<float> x = make_activations(m * k, rng);
    set_active_isa(Isa::kScalar);
    std::vector<float> scalar_y(m * n);
    qgemm(QGemmArgs{x.data(), k, q.view, scalar_y.data(), n, m});
    for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
      if (static_cast<int>(isa) > static_cast<int>(detected_isa())) continue;
      set_active_isa(isa);
      std::vector<float> y(m * n);
      qgemm(QGemmArgs{x.data(), k, q.view, y.data(), n, m});
      EXPECT_EQ(std::memcmp(y.data(), scalar_y.data(), y.size() * sizeof(float)), 0)
          << isa_name(isa) << " " << describe(c);
    }
  }
  set_active_isa(detected_isa());
}

// The row-parallel matmul (qgemm.h with a WorkerPool) gives matmul's bits for every format, at
// every thread count, with N not a multiple of the partition's 16-row chunks, M = 1 (the
// matrix-vector path) and M > 1, and W4A4 (each worker quantizes the rows itself).
TEST(QGemmParallel, BitsEqualOneThreadAtAnyThreadCount) {
  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = 203, k = 300;
  std::vector<uint16_t> bf16_weights(static_cast<size_t>(n * k));
  for (auto& w : bf16_weights) w = f32_to_bf16(normal(rng));
  std::vector<QMatrix> matrices;
  for (WeightFormat format :
       {WeightFormat::kNvfp4, WeightFormat::kMxfp4, WeightFormat::kFp8Block, WeightFormat::kInt4})
    matrices.push_back(make_matrix(format, n, k, rng, 32, format == WeightFormat::kInt4));
  matrices.push_back(make_matrix(WeightFormat::kNvfp4, n, k, rng));
  matrices.back().view.input_scale = 0.01f;  // W4A4
  QMatrix dense;
  dense.view.dtype = DType::kBF16;
  dense.view.data = bf16_weights.data();
  dense.view.rows = n;
  dense.view.cols = dense.view.ld = k;
  std::vector<math::WeightView> views;
  for (const QMatrix& q : matrices) views.push_back(q.view);
  views.push_back(dense.view);
  std::deque<WorkerPool> pools;  // not movable
  for (int threads : {1, 2, 3, 4}) pools.emplace_back(threads);
  for (int64_t m : {1, 2, 9}) {
    std::vector<float> x(static_cast<size_t>(m * k));
    for (auto& v : x) v = normal(rng);
    for (const math::WeightView& w : views) {
      std::vector<float> serial(static_cast<size_t>(m * n));
      matmul(x.data(), k, w, serial.data(), n, m);
      for (WorkerPool& pool : pools) {
        std::vector<float> parallel(serial.size(), -1.0f);
        matmul(x.data(), k, w, parallel.data(), n, m, pool);
        EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), serial.size() * sizeof(float)), 0)
            << math::weight_format_name(w.format) << " m=" << m << " threads "
            << pool.num_threads();
      }
    }
  }
}

// weight_rows slices every array of the view by whole rows: a slice's products are the full
// matrix's rows.
TEST(QGemmParallel, WeightRowsIsASliceOfRows) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = 40, k = 256;
  std::vector<float> x(static_cast<size_t>(k));
  for (auto& v : x) v = normal(rng);
  for (WeightFormat format :
       {WeightFormat::kNvfp4, WeightFormat::kMxfp4, WeightFormat::kFp8Block, WeightFormat::kInt4}) {
    QMatrix q = make_matrix(format, n, k, rng, 64, format == WeightFormat::kInt4);
    std::vector<float> full(static_cast<size_t>(n));
    matmul(x.data(), k, q.view, full.data(), n, 1);
    const math::WeightView slice = math::weight_rows(q.view, 13, 20);
    std::vector<float> part(20);
    matmul(x.data(), k, slice, part.data(), 20, 1);
    for (int64_t row = 0; row < 20; ++row)
      EXPECT_EQ(float_bits(part[row]), float_bits(full[13 + row]))
          << math::weight_format_name(format) << " row " << row;
  }
}

}  // namespace
}  // namespace keel::cpu
