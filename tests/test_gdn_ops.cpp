// The Gated DeltaNet Backend ops (runtime/backend/backend.h, kernels/math/gdn_math.h) on the CPU
// backend, the bit-exact reference:
//  1. each op against a naive re-implementation written here from the formulas of backend.h,
//     templated on the arithmetic type: in float (with exp_math.h's functions) it must give the
//     same bits, which pins the reduction orders; in double it must agree within a bound derived
//     below for each op, which pins the formulas themselves;
//  2. chunk invariance: a 12-row sequence through gdn_conv + gdn_recurrence whole, one row per
//     step, five rows per step (state carried in its slot), and batched with other sequences in
//     other slots gives identical output and state bits;
//  3. fresh sequences ignore whatever their slot held (NaNs included);
//  4. the conv state after a 2-row fresh sequence with K = 4 is [0, x0, x1].
// Shapes are deliberately not powers of two (HK = 3, HV = 6, DK = 20, DV = 12).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/math/exp_math.h"
#include "runtime/backend/backend.h"

namespace keel {
namespace {

constexpr double kUnitRoundoff = 0x1p-24;

size_t to_size(int64_t value) {
  return static_cast<size_t>(value);
}

// Deterministic values on every standard library (the engine's raw output, not a distribution).
class Rng {
 public:
  explicit Rng(uint32_t seed) : engine_(seed) {}
  float uniform(float low, float high) {
    const float unit = static_cast<float>(engine_() >> 8) * (1.0f / 16777216.0f);
    return low + (high - low) * unit;
  }
  std::vector<float> floats(size_t count, float low, float high) {
    std::vector<float> values(count);
    for (float& value : values) value = uniform(low, high);
    return values;
  }

 private:
  std::mt19937 engine_;
};

testing::AssertionResult same_bits(const std::vector<float>& actual,
                                   const std::vector<float>& expected) {
  if (actual.size() != expected.size())
    return testing::AssertionFailure() << "sizes " << actual.size() << " vs " << expected.size();
  if (std::memcmp(actual.data(), expected.data(), actual.size() * sizeof(float)) == 0)
    return testing::AssertionSuccess();
  for (size_t i = 0; i < actual.size(); ++i)
    if (float_bits(actual[i]) != float_bits(expected[i]))
      return testing::AssertionFailure()
             << "first difference at " << i << ": " << actual[i] << " vs " << expected[i];
  return testing::AssertionFailure() << "memcmp differs";
}

// ---------------------------------------------------------------------------------------------
// The naive reference: the formulas of backend.h, loops in the most literal order (for the
// recurrence: column j outer, unlike the CPU kernel). Real = float uses exp_math.h, Real =
// double the C library in double.

float exp_r(float x) {
  return math::exp_f32(x);
}
double exp_r(double x) {
  return std::exp(x);
}
float softplus_r(float x) {
  return math::softplus_f32(x);
}
double softplus_r(double x) {
  return x > 20.0 ? x : std::log1p(std::exp(x));
}
float sigmoid_r(float x) {
  return math::sigmoid_f32(x);
}
double sigmoid_r(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}
float silu_r(float x) {
  return math::silu_f32(x);
}
double silu_r(double x) {
  return x / (1.0 + std::exp(-x));
}
float sqrt_r(float x) {
  return std::sqrt(x);
}
double sqrt_r(double x) {
  return std::sqrt(x);
}

// The step's sequences on the host (the CPU backend's device memory is host memory).
struct HostSeqs {
  std::vector<int32_t> row_starts{0};
  std::vector<int32_t> slots;
  std::vector<int32_t> fresh;
  void add(int32_t num_rows, int32_t slot, bool is_fresh) {
    row_starts.push_back(row_starts.back() + num_rows);
    slots.push_back(slot);
    fresh.push_back(is_fresh ? 1 : 0);
  }
  Backend::RecurrentSeqs view() const {
    return Backend::RecurrentSeqs{row_starts.data(), slots.data(), fresh.data(),
                                  static_cast<int64_t>(slots.size()), row_starts.back()};
  }
};

// Conv reference. Returns out [num_rows][channels] in Real; conv_state updated (float).
template <typename Real>
std::vector<Real> reference_conv(const std::vector<float>& rows, int64_t row_stride,
                                 int64_t channels, const std::vector<float>& weight, int64_t kernel,
                                 const HostSeqs& seqs, std::vector<float>& conv_state,
                                 std::vector<double>* abs_sums) {
  const int64_t num_rows = seqs.row_starts.back();
  std::vector<Real> out(to_size(num_rows * channels));
  if (abs_sums != nullptr) abs_sums->assign(out.size(), 0.0);
  for (size_t seq = 0; seq < seqs.slots.size(); ++seq) {
    const int64_t first = seqs.row_starts[seq];
    const int64_t count = seqs.row_starts[seq + 1] - first;
    float* state = conv_state.data() + int64_t{seqs.slots[seq]} * channels * (kernel - 1);
    auto input = [&](int64_t c, int64_t q) -> float {  // local position q of the sequence
      if (q >= 0) return rows[to_size((first + q) * row_stride + c)];
      if (seqs.fresh[seq] != 0) return 0.0f;
      return state[c * (kernel - 1) + (kernel - 1 + q)];
    };
    for (int64_t r = 0; r < count; ++r) {
      for (int64_t c = 0; c < channels; ++c) {
        Real acc = 0;
        double abs_sum = 0;
        for (int64_t j = 0; j < kernel; ++j) {
          const float x = input(c, r - kernel + 1 + j);
          acc = acc + static_cast<Real>(weight[to_size(c * kernel + j)]) * static_cast<Real>(x);
          abs_sum += std::fabs(double{weight[to_size(c * kernel + j)]} * x);
        }
        out[to_size((first + r) * channels + c)] = silu_r(acc);
        if (abs_sums != nullptr) (*abs_sums)[to_size((first + r) * channels + c)] = abs_sum;
      }
    }
    std::vector<float> new_state(to_size(channels * (kernel - 1)));
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t m = 0; m < kernel - 1; ++m)
        new_state[to_size(c * (kernel - 1) + m)] = input(c, count - (kernel - 1) + m);
    std::copy(new_state.begin(), new_state.end(), state);
  }
  return out;
}

struct RecurrenceShape {
  int64_t hk = 3, hv = 6, dk = 20, dv = 12;
  int64_t qkv_width() const { return 2 * hk * dk + hv * dv; }
  int64_t head_state() const { return dk * dv; }
};

// Recurrence reference: returns out [num_rows][hv * dv]; state (Real) updated in place.
template <typename Real>
std::vector<Real> reference_recurrence(const std::vector<float>& qkv, int64_t qkv_stride,
                                       const RecurrenceShape& shape, float q_scale,
                                       const std::vector<float>& g, const std::vector<float>& beta,
                                       const HostSeqs& seqs, std::vector<Real>& state) {
  const int64_t num_rows = seqs.row_starts.back();
  const int64_t dk = shape.dk, dv = shape.dv, hv = shape.hv, hk = shape.hk;
  std::vector<Real> out(to_size(num_rows * hv * dv));
  for (size_t seq = 0; seq < seqs.slots.size(); ++seq) {
    Real* slot_state = state.data() + int64_t{seqs.slots[seq]} * hv * shape.head_state();
    if (seqs.fresh[seq] != 0)
      std::fill(slot_state, slot_state + hv * shape.head_state(), static_cast<Real>(0));
    for (int64_t t = seqs.row_starts[seq]; t < seqs.row_starts[seq + 1]; ++t) {
      for (int64_t h = 0; h < hv; ++h) {
        Real* s = slot_state + h * shape.head_state();
        const int64_t kh = h / (hv / hk);
        const float* row = qkv.data() + t * qkv_stride;
        const float* q = row + kh * dk;
        const float* k = row + hk * dk + kh * dk;
        const float* v = row + 2 * hk * dk + h * dv;
        Real q_sum = 0, k_sum = 0;
        for (int64_t i = 0; i < dk; ++i) {
          q_sum = q_sum + static_cast<Real>(q[i]) * static_cast<Real>(q[i]);
          k_sum = k_sum + static_cast<Real>(k[i]) * static_cast<Real>(k[i]);
        }
        const Real q_inv = static_cast<Real>(1) / sqrt_r(q_sum + static_cast<Real>(1e-6));
        const Real k_inv = static_cast<Real>(1) / sqrt_r(k_sum + static_cast<Real>(1e-6));
        std::vector<Real> qn(to_size(dk)), kn(to_size(dk));
        for (int64_t i = 0; i < dk; ++i) {
          qn[to_size(i)] = static_cast<Real>(q[i]) * q_inv * static_cast<Real>(q_scale);
          kn[to_size(i)] = static_cast<Real>(k[i]) * k_inv;
        }
        const Real decay = exp_r(static_cast<Real>(g[to_size(t * hv + h)]));
        const Real b = static_cast<Real>(beta[to_size(t * hv + h)]);
        for (int64_t j = 0; j < dv; ++j) {
          for (int64_t i = 0; i < dk; ++i) s[i * dv + j] = decay * s[i * dv + j];
          Real kv = 0;
          for (int64_t i = 0; i < dk; ++i) kv = kv + s[i * dv + j] * kn[to_size(i)];
          const Real d = (static_cast<Real>(v[j]) - kv) * b;
          for (int64_t i = 0; i < dk; ++i) s[i * dv + j] = s[i * dv + j] + kn[to_size(i)] * d;
          Real o = 0;
          for (int64_t i = 0; i < dk; ++i) o = o + s[i * dv + j] * qn[to_size(i)];
          out[to_size(t * hv * dv + h * dv + j)] = o;
        }
      }
    }
  }
  return out;
}

template <typename To, typename From>
std::vector<To> convert(const std::vector<From>& values) {
  return std::vector<To>(values.begin(), values.end());
}

class GdnOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend_ = make_cpu_backend();
};

// ---------------------------------------------------------------------------------------------
// 1. Each op against the reference.

TEST_F(GdnOps, ConvMatchesReference) {
  Rng rng(11);
  const int64_t channels = 37, kernel = 4, row_stride = 45, num_slots = 3;
  HostSeqs seqs;
  seqs.add(5, 2, false);  // continues from a random state
  seqs.add(1, 0, true);
  seqs.add(2, 1, false);  // fewer rows than K - 1: part of the old state survives
  const int64_t num_rows = seqs.row_starts.back();
  const std::vector<float> rows = rng.floats(to_size(num_rows * row_stride), -2.0f, 2.0f);
  const std::vector<float> weight = rng.floats(to_size(channels * kernel), -1.0f, 1.0f);
  const std::vector<float> initial_state =
      rng.floats(to_size(num_slots * channels * (kernel - 1)), -2.0f, 2.0f);

  std::vector<float> state = initial_state;
  std::vector<float> out(to_size(num_rows * channels));
  backend_->gdn_conv(rows.data(), row_stride, channels, weight.data(), kernel, seqs.view(),
                     state.data(), out.data());

  std::vector<float> float_state = initial_state;
  EXPECT_TRUE(same_bits(out, reference_conv<float>(rows, row_stride, channels, weight, kernel, seqs,
                                                   float_state, nullptr)));
  EXPECT_TRUE(same_bits(state, float_state));

  // Double: the fp32 sum of K products has error <= K u sum|w x| (gamma_K); SiLU's slope is
  // below 1.1 and silu_f32 adds <= 2.39 ulp <= 4.8 u |result|. Bound: 1.1 K u sum|w x| + 5 u
  // |result|, doubled for margin.
  std::vector<float> double_state = initial_state;
  std::vector<double> abs_sums;
  const std::vector<double> expected = reference_conv<double>(
      rows, row_stride, channels, weight, kernel, seqs, double_state, &abs_sums);
  for (size_t i = 0; i < out.size(); ++i) {
    const double bound = 2.0 * (1.1 * kernel * kUnitRoundoff * abs_sums[i] +
                                5.0 * kUnitRoundoff * std::fabs(expected[i]));
    EXPECT_NEAR(out[i], expected[i], bound) << "element " << i;
  }
  EXPECT_TRUE(same_bits(state, double_state));  // the state is copies of inputs: exact
}

TEST_F(GdnOps, GatesMatchReference) {
  Rng rng(12);
  const int64_t num_heads = 7, row_stride = 23, a_col = 9, b_col = 2, num_rows = 11;
  std::vector<float> rows = rng.floats(to_size(num_rows * row_stride), -8.0f, 8.0f);
  rows[to_size(3 * row_stride + a_col)] = 25.0f;  // softplus's x > 20 branch
  const std::vector<float> a_log = rng.floats(to_size(num_heads), -3.0f, 2.0f);
  const std::vector<float> dt_bias = rng.floats(to_size(num_heads), -2.0f, 2.0f);
  std::vector<float> g(to_size(num_rows * num_heads)), beta(g.size());
  backend_->gdn_gates(rows.data(), row_stride, a_col, b_col, num_heads, a_log.data(),
                      dt_bias.data(), num_rows, g.data(), beta.data());
  for (int64_t t = 0; t < num_rows; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const size_t index = to_size(t * num_heads + h);
      const float a = rows[to_size(t * row_stride + a_col + h)];
      const float b = rows[to_size(t * row_stride + b_col + h)];
      const float a_sum = a + dt_bias[to_size(h)];
      EXPECT_EQ(float_bits(g[index]), float_bits((-exp_r(a_log[to_size(h)])) * softplus_r(a_sum)));
      EXPECT_EQ(float_bits(beta[index]), float_bits(sigmoid_r(b)));
      // Double: exp <= 0.79 ulp, softplus <= 1.55 ulp, the product 0.5 ulp (an ulp <= 2u
      // relative); rounding a + dt_bias (<= u |a_sum|) moves softplus by at most that much
      // relative to its value (softplus' / softplus <= 1). sigmoid <= 2.49 ulp. Doubled.
      const double g_expected = -std::exp(double{a_log[to_size(h)]}) *
                                softplus_r(double{a} + double{dt_bias[to_size(h)]});
      const double g_bound = 2.0 * std::fabs(g_expected) * kUnitRoundoff *
                             (2.0 * (0.79 + 1.55 + 0.5) + std::fabs(a_sum));
      EXPECT_NEAR(g[index], g_expected, g_bound) << "row " << t << " head " << h;
      const double beta_expected = sigmoid_r(double{b});
      EXPECT_NEAR(beta[index], beta_expected, 2.0 * 2.0 * 2.49 * kUnitRoundoff * beta_expected);
    }
  }
}

TEST_F(GdnOps, RecurrenceMatchesReference) {
  Rng rng(13);
  const RecurrenceShape shape;
  const int64_t qkv_stride = shape.qkv_width() + 3, num_slots = 3;
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(shape.dk));
  HostSeqs seqs;
  seqs.add(9, 1, false);
  seqs.add(4, 2, true);
  seqs.add(3, 0, false);
  const int64_t num_rows = seqs.row_starts.back();
  const std::vector<float> qkv = rng.floats(to_size(num_rows * qkv_stride), -1.0f, 1.0f);
  const std::vector<float> g = rng.floats(to_size(num_rows * shape.hv), -2.0f, 0.0f);
  const std::vector<float> beta = rng.floats(to_size(num_rows * shape.hv), 0.0f, 1.0f);
  const std::vector<float> initial_state =
      rng.floats(to_size(num_slots * shape.hv * shape.head_state()), -1.0f, 1.0f);

  std::vector<float> state = initial_state;
  std::vector<float> out(to_size(num_rows * shape.hv * shape.dv));
  backend_->gdn_recurrence(qkv.data(), qkv_stride, shape.hk, shape.hv, shape.dk, shape.dv, q_scale,
                           g.data(), beta.data(), seqs.view(), state.data(), out.data());

  std::vector<float> float_state = initial_state;
  EXPECT_TRUE(same_bits(out, reference_recurrence<float>(qkv, qkv_stride, shape, q_scale, g, beta,
                                                         seqs, float_state)));
  EXPECT_TRUE(same_bits(state, float_state));

  // Double. With |kn| = 1, beta in [0, 1] and exp(g) <= 1 each step maps a column of S by a
  // matrix of norm <= 1 and adds beta kn v_j, so |S column| <= |initial column| + T max|v| =: B
  // (T = the sequence's rows; here B <= sqrt(DK) + T). One row's sums over DK terms err by
  // <= (DK + 4) u times the sum of |terms| <= (DK + 4) u B, the normalisations by a few u; the
  // step's map is non-expanding, so errors add up over the rows: <= T (DK + 8) u B per state
  // entry, and the outputs (|qn| = q_scale) by <= that times q_scale. Doubled for margin.
  std::vector<double> double_state = convert<double>(initial_state);
  const std::vector<double> expected =
      reference_recurrence<double>(qkv, qkv_stride, shape, q_scale, g, beta, seqs, double_state);
  const double max_rows = 9.0;
  const double state_bound = 2.0 * max_rows * (static_cast<double>(shape.dk) + 8.0) *
                             kUnitRoundoff * (std::sqrt(static_cast<double>(shape.dk)) + max_rows);
  for (size_t i = 0; i < out.size(); ++i)
    EXPECT_NEAR(out[i], expected[i], state_bound * q_scale) << "output " << i;
  for (size_t i = 0; i < state.size(); ++i)
    EXPECT_NEAR(state[i], double_state[i], state_bound) << "state " << i;
}

TEST_F(GdnOps, GatedNormMatchesReference) {
  Rng rng(14);
  const int64_t num_rows = 5, num_heads = 3, head_dim = 19, z_stride = 61;
  const float eps = 1e-6f;
  const int64_t width = num_heads * head_dim;
  const std::vector<float> x = rng.floats(to_size(num_rows * width), -3.0f, 3.0f);
  const std::vector<float> z = rng.floats(to_size(num_rows * z_stride), -6.0f, 6.0f);
  const std::vector<float> weight = rng.floats(to_size(head_dim), 0.5f, 1.5f);
  std::vector<float> out(x.size());
  backend_->gdn_gated_norm(x.data(), z.data(), z_stride, weight.data(), eps, num_rows, num_heads,
                           head_dim, out.data());
  std::vector<float> in_place = x;
  backend_->gdn_gated_norm(in_place.data(), z.data(), z_stride, weight.data(), eps, num_rows,
                           num_heads, head_dim, in_place.data());
  EXPECT_TRUE(same_bits(in_place, out));
  for (int64_t t = 0; t < num_rows; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const float* x_head = x.data() + t * width + h * head_dim;
      float sum = 0.0f;
      double sum_double = 0.0;
      for (int64_t i = 0; i < head_dim; ++i) {
        sum += x_head[i] * x_head[i];
        sum_double += double{x_head[i]} * x_head[i];
      }
      const float inv_rms = 1.0f / std::sqrt(sum / static_cast<float>(head_dim) + eps);
      const double inv_rms_double = 1.0 / std::sqrt(sum_double / head_dim + eps);
      for (int64_t i = 0; i < head_dim; ++i) {
        const float zi = z[to_size(t * z_stride + h * head_dim + i)];
        const float actual = out[to_size(t * width + h * head_dim + i)];
        EXPECT_EQ(float_bits(actual),
                  float_bits((weight[to_size(i)] * (x_head[i] * inv_rms)) * silu_r(zi)));
        // Double: the sum of squares errs by <= D u relative (all terms positive), which moves
        // inv_rms by <= D u / 2; the division, sqrt, +eps, three products: <= 6 u; silu_f32
        // <= 2.39 ulp <= 4.8 u. Relative bound (D / 2 + 11) u, doubled.
        const double expected =
            (weight[to_size(i)] * (x_head[i] * inv_rms_double)) * silu_r(double{zi});
        EXPECT_NEAR(actual, expected,
                    2.0 * (head_dim / 2.0 + 11.0) * kUnitRoundoff * std::fabs(expected));
      }
    }
  }
}

TEST_F(GdnOps, SigmoidGateMulMatchesReference) {
  Rng rng(15);
  const int64_t num_rows = 4, width = 29, gate_stride = 40;
  const std::vector<float> x = rng.floats(to_size(num_rows * width), -3.0f, 3.0f);
  std::vector<float> gate = rng.floats(to_size(num_rows * gate_stride), -10.0f, 10.0f);
  gate[5] = -95.0f;  // sigmoid's e^x tail
  std::vector<float> out = x;
  backend_->sigmoid_gate_mul(out.data(), num_rows, width, gate.data(), gate_stride);
  for (int64_t t = 0; t < num_rows; ++t) {
    for (int64_t i = 0; i < width; ++i) {
      const float xi = x[to_size(t * width + i)];
      const float gi = gate[to_size(t * gate_stride + i)];
      const float actual = out[to_size(t * width + i)];
      EXPECT_EQ(float_bits(actual), float_bits(xi * sigmoid_r(gi)));
      // Double: sigmoid_f32 <= 2.49 ulp, the product 0.5 ulp; an ulp is <= 2 u relative for
      // normal results. For subnormal ones (the gate of -95) sigmoid's ulp is 2^-149, scaled
      // by |x| <= 3: <= (3 * 2.49 + 0.5) 2^-149 < 8 * 2^-149. Doubled.
      const double expected = xi * sigmoid_r(double{gi});
      EXPECT_NEAR(actual, expected,
                  2.0 * (3.0 * 2.0 * kUnitRoundoff * std::fabs(expected) + 8.0 * 0x1p-149));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2-4. Chunk invariance, fresh sequences, the conv state.

constexpr int64_t kKernel = 4;
constexpr int64_t kNumSlots = 4;

// One logical sequence: its inputs by position (conv rows of width row_stride, g and beta).
struct SequenceData {
  std::vector<float> rows, g, beta;
};

// One sequence's piece of a step.
struct Chunk {
  int seq_id;
  int64_t first_position;
  int64_t num_rows;
  int32_t slot;
  bool fresh;
};

// What a sequence produced, by position: conv output and recurrence output rows.
struct SequenceOutputs {
  std::map<int64_t, std::vector<float>> conv, recurrence;
};

class GdnChunks : public ::testing::Test {
 protected:
  void SetUp() override {
    Rng rng(21);
    weight_ = rng.floats(to_size(channels() * kKernel), -0.6f, 0.6f);
    for (int seq = 0; seq < 3; ++seq) {
      SequenceData data;
      data.rows = rng.floats(to_size(kMaxPositions * row_stride()), -1.5f, 1.5f);
      data.g = rng.floats(to_size(kMaxPositions * shape_.hv), -1.5f, 0.0f);
      data.beta = rng.floats(to_size(kMaxPositions * shape_.hv), 0.0f, 1.0f);
      sequences_.push_back(data);
    }
    conv_state_.assign(to_size(kNumSlots * channels() * (kKernel - 1)), 0.0f);
    ssm_state_.assign(to_size(kNumSlots * shape_.hv * shape_.head_state()), 0.0f);
  }

  int64_t channels() const { return shape_.qkv_width(); }
  int64_t row_stride() const { return channels() + 7; }  // the conv reads a wider row
  float q_scale() const { return 1.0f / std::sqrt(static_cast<float>(shape_.dk)); }

  // Runs one step (gdn_conv, then gdn_recurrence on its output) over the chunks, in order.
  void run_step(const std::vector<Chunk>& chunks) {
    HostSeqs seqs;
    std::vector<float> rows, g, beta;
    for (const Chunk& chunk : chunks) {
      const SequenceData& data = sequences_[to_size(chunk.seq_id)];
      seqs.add(static_cast<int32_t>(chunk.num_rows), chunk.slot, chunk.fresh);
      const int64_t first = chunk.first_position, end = first + chunk.num_rows;
      rows.insert(rows.end(), data.rows.begin() + first * row_stride(),
                  data.rows.begin() + end * row_stride());
      g.insert(g.end(), data.g.begin() + first * shape_.hv, data.g.begin() + end * shape_.hv);
      beta.insert(beta.end(), data.beta.begin() + first * shape_.hv,
                  data.beta.begin() + end * shape_.hv);
    }
    const int64_t num_rows = seqs.row_starts.back();
    const int64_t out_width = shape_.hv * shape_.dv;
    std::vector<float> conv_out(to_size(num_rows * channels()));
    std::vector<float> rec_out(to_size(num_rows * out_width));
    backend_->gdn_conv(rows.data(), row_stride(), channels(), weight_.data(), kKernel, seqs.view(),
                       conv_state_.data(), conv_out.data());
    backend_->gdn_recurrence(conv_out.data(), channels(), shape_.hk, shape_.hv, shape_.dk,
                             shape_.dv, q_scale(), g.data(), beta.data(), seqs.view(),
                             ssm_state_.data(), rec_out.data());
    for (size_t s = 0; s < chunks.size(); ++s) {
      for (int64_t r = 0; r < chunks[s].num_rows; ++r) {
        const int64_t row = seqs.row_starts[s] + r;
        SequenceOutputs& outputs = outputs_[chunks[s].seq_id];
        outputs.conv[chunks[s].first_position + r] = std::vector<float>(
            conv_out.begin() + row * channels(), conv_out.begin() + (row + 1) * channels());
        outputs.recurrence[chunks[s].first_position + r] = std::vector<float>(
            rec_out.begin() + row * out_width, rec_out.begin() + (row + 1) * out_width);
      }
    }
  }

  std::vector<float> conv_slot(int32_t slot) const {
    const int64_t size = channels() * (kKernel - 1);
    return std::vector<float>(conv_state_.begin() + slot * size,
                              conv_state_.begin() + (slot + 1) * size);
  }
  std::vector<float> ssm_slot(int32_t slot) const {
    const int64_t size = shape_.hv * shape_.head_state();
    return std::vector<float>(ssm_state_.begin() + slot * size,
                              ssm_state_.begin() + (slot + 1) * size);
  }
  void fill_slot_with(int32_t slot, float value) {
    const int64_t conv_size = channels() * (kKernel - 1);
    std::fill(conv_state_.begin() + slot * conv_size, conv_state_.begin() + (slot + 1) * conv_size,
              value);
    const int64_t ssm_size = shape_.hv * shape_.head_state();
    std::fill(ssm_state_.begin() + slot * ssm_size, ssm_state_.begin() + (slot + 1) * ssm_size,
              value);
  }

  static constexpr int64_t kMaxPositions = 12;
  RecurrenceShape shape_;
  std::unique_ptr<Backend> backend_ = make_cpu_backend();
  std::vector<float> weight_;
  std::vector<SequenceData> sequences_;
  std::vector<float> conv_state_, ssm_state_;
  std::map<int, SequenceOutputs> outputs_;
};

// The result of sequence 0 (12 rows) however it was stepped: outputs and final states.
struct SequenceResult {
  SequenceOutputs outputs;
  std::vector<float> conv_state, ssm_state;
};

TEST_F(GdnChunks, ChunkingAndBatchingDoNotChangeBits) {
  const int32_t slot = 2;
  auto finish = [&](int32_t result_slot) {
    SequenceResult result{outputs_[0], conv_slot(result_slot), ssm_slot(result_slot)};
    outputs_.clear();
    return result;
  };

  run_step({{0, 0, 12, slot, true}});
  const SequenceResult whole = finish(slot);
  ASSERT_EQ(whole.outputs.recurrence.size(), 12u);

  for (int64_t chunk_rows : {1, 5}) {
    for (int64_t first = 0; first < 12; first += chunk_rows)
      run_step({{0, first, std::min<int64_t>(chunk_rows, 12 - first), slot, first == 0}});
    const SequenceResult chunked = finish(slot);
    for (int64_t position = 0; position < 12; ++position) {
      EXPECT_TRUE(same_bits(chunked.outputs.conv.at(position), whole.outputs.conv.at(position)))
          << "chunks of " << chunk_rows << ", position " << position;
      EXPECT_TRUE(
          same_bits(chunked.outputs.recurrence.at(position), whole.outputs.recurrence.at(position)))
          << "chunks of " << chunk_rows << ", position " << position;
    }
    EXPECT_TRUE(same_bits(chunked.conv_state, whole.conv_state)) << "chunks of " << chunk_rows;
    EXPECT_TRUE(same_bits(chunked.ssm_state, whole.ssm_state)) << "chunks of " << chunk_rows;
  }

  // Batched: sequence 0 in slot 3 among others, every slot holding random values first.
  // Step 1: sequence 1 (fresh, slot 0), sequence 0's first 5 rows, sequence 2 (continuing from
  // slot 1's random state). Step 2: sequence 0's other 7 rows first, then sequence 2 and an
  // empty continuing piece of sequence 1 (which must leave slot 0 as it was).
  Rng rng(5);
  for (float& value : conv_state_) value = rng.uniform(-1.0f, 1.0f);
  for (float& value : ssm_state_) value = rng.uniform(-1.0f, 1.0f);
  const int32_t batch_slot = 3;
  run_step({{1, 0, 3, 0, true}, {0, 0, 5, batch_slot, true}, {2, 0, 7, 1, false}});
  const std::vector<float> slot0_conv = conv_slot(0), slot0_ssm = ssm_slot(0);
  run_step({{0, 5, 7, batch_slot, false}, {2, 7, 2, 1, false}, {1, 3, 0, 0, false}});
  EXPECT_TRUE(same_bits(conv_slot(0), slot0_conv)) << "an empty piece must keep its state";
  EXPECT_TRUE(same_bits(ssm_slot(0), slot0_ssm)) << "an empty piece must keep its state";
  const SequenceResult batched = finish(batch_slot);
  for (int64_t position = 0; position < 12; ++position) {
    EXPECT_TRUE(same_bits(batched.outputs.conv.at(position), whole.outputs.conv.at(position)))
        << "batched, position " << position;
    EXPECT_TRUE(
        same_bits(batched.outputs.recurrence.at(position), whole.outputs.recurrence.at(position)))
        << "batched, position " << position;
  }
  EXPECT_TRUE(same_bits(batched.conv_state, whole.conv_state));
  EXPECT_TRUE(same_bits(batched.ssm_state, whole.ssm_state));
}

TEST_F(GdnChunks, FreshSequencesIgnoreStaleSlots) {
  const int32_t slot = 1;
  run_step({{0, 0, 6, slot, true}});
  const SequenceOutputs clean = outputs_[0];
  const std::vector<float> clean_conv = conv_slot(slot), clean_ssm = ssm_slot(slot);
  for (float stale : {3.5f, bits_float(0x7fc00000u)}) {  // garbage, then NaN
    outputs_.clear();
    fill_slot_with(slot, stale);
    run_step({{0, 0, 6, slot, true}});
    for (int64_t position = 0; position < 6; ++position) {
      EXPECT_TRUE(same_bits(outputs_[0].conv.at(position), clean.conv.at(position)))
          << "stale " << stale << ", position " << position;
      EXPECT_TRUE(same_bits(outputs_[0].recurrence.at(position), clean.recurrence.at(position)))
          << "stale " << stale << ", position " << position;
    }
    EXPECT_TRUE(same_bits(conv_slot(slot), clean_conv)) << "stale " << stale;
    EXPECT_TRUE(same_bits(ssm_slot(slot), clean_ssm)) << "stale " << stale;
  }
}

TEST_F(GdnChunks, ConvStateAfterTwoFreshRowsIsZeroThenTheInputs) {
  const int32_t slot = 0;
  fill_slot_with(slot, 9.0f);
  run_step({{0, 0, 2, slot, true}});
  const std::vector<float> state = conv_slot(slot);
  const std::vector<float>& rows = sequences_[0].rows;
  for (int64_t c = 0; c < channels(); ++c) {
    const float* channel_state = state.data() + c * (kKernel - 1);
    EXPECT_EQ(float_bits(channel_state[0]), float_bits(0.0f)) << "channel " << c;
    EXPECT_EQ(float_bits(channel_state[1]), float_bits(rows[to_size(c)])) << "channel " << c;
    EXPECT_EQ(float_bits(channel_state[2]), float_bits(rows[to_size(row_stride() + c)]))
        << "channel " << c;
  }
}

}  // namespace
}  // namespace keel
