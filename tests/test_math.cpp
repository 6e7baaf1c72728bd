// CPU tests of the shared host-device math (kernels/math). They run the pieces in the order
// the CUDA kernels use them (tiled GEMM slabs, parallel attention steps, argmax merge tree,
// combine over packed rows) and check the result is bit-identical to the CPU kernels, so the
// GPU algorithms are covered on machines without a GPU; what remains to trust on a GPU is only
// that the device's +, *, /, sqrtf and fma round as IEEE says (kernels/math/README.md).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/math/gemm_math.h"
#include "kernels/math/moe_math.h"
#include "kernels/math/ops_math.h"

namespace keel {
namespace {

std::vector<float> random_floats(std::mt19937& rng, size_t count, float low, float high) {
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(count);
  for (float& value : values) value = distribution(rng);
  return values;
}

bool same_bits(float a, float b) {
  return float_bits(a) == float_bits(b);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Weights of `dtype` as raw storage (f32 values or half-precision bits).
struct StoredWeights {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> half;
  const void* data() const {
    return dtype == DType::kF32 ? static_cast<const void*>(f32.data())
                                : static_cast<const void*>(half.data());
  }
};

StoredWeights make_weights(DType dtype, const std::vector<float>& values) {
  StoredWeights weights{dtype, {}, {}};
  if (dtype == DType::kF32) {
    weights.f32 = values;
  } else {
    for (float value : values)
      weights.half.push_back(dtype == DType::kBF16 ? f32_to_bf16(value) : f32_to_f16(value));
  }
  return weights;
}

TEST(SharedMath, FmaIsCorrectlyRounded) {
  // a * a = 1 + 2^-11 + 2^-24 needs 25 significant bits: a rounded product is the tie's even
  // neighbour 1 + 2^-11, so only a fused operation keeps the 2^-24.
  const float a = 1.0f + 0x1p-12f;
  const float c = -(1.0f + 0x1p-11f);
  EXPECT_EQ(math::fma_f32(a, a, c), 0x1p-24f);
  EXPECT_EQ(a * a + c, 0.0f);  // -ffp-contract=off: no silent fma here
}

// The CUDA canonical GEMM's order: slabs of 64 k values staged with zero fill, canonical chunks
// of a slab skipped once they start at or past K, fold at the end.
float tiled_canonical_dot(const float* x, const float* w_widened, int64_t k) {
  constexpr int kSlab = 4 * math::kCanonicalLanes;
  float lanes[math::kCanonicalLanes] = {};
  for (int64_t slab_start = 0; slab_start < k; slab_start += kSlab) {
    float x_slab[kSlab];
    float w_slab[kSlab];
    for (int col = 0; col < kSlab; ++col) {
      const bool k_ok = slab_start + col < k;
      x_slab[col] = k_ok ? x[slab_start + col] : 0.0f;
      w_slab[col] = k_ok ? w_widened[slab_start + col] : 0.0f;
    }
    for (int chunk = 0; chunk < kSlab / math::kCanonicalLanes; ++chunk) {
      const int offset = chunk * math::kCanonicalLanes;
      if (slab_start + offset >= k) break;
      math::canonical_accumulate_chunk(lanes, x_slab + offset, w_slab + offset);
    }
  }
  return math::canonical_fold(lanes);
}

TEST(SharedMath, TiledCanonicalOrderMatchesCpuGemm) {
  std::mt19937 rng(11);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t k : {1, 15, 16, 17, 20, 48, 63, 64, 65, 100, 128, 129, 300}) {
      const int64_t m = 3;
      const int64_t n = 5;
      std::vector<float> x = random_floats(rng, static_cast<size_t>(m * k), -2.0f, 2.0f);
      // Negative zeros in x make lanes that are -0 until a zero-filled fma turns them +0: the
      // skipped-chunk rule matters for exactly these.
      for (int64_t i = 0; i < m * k; i += 3) x[static_cast<size_t>(i)] = -0.0f;
      StoredWeights w =
          make_weights(dtype, random_floats(rng, static_cast<size_t>(n * k), -2.0f, 2.0f));
      std::vector<float> widened(static_cast<size_t>(n * k));
      cpu::to_f32(w.data(), dtype, n * k, widened.data());
      std::vector<float> y(static_cast<size_t>(m * n));
      cpu::gemm(x.data(), w.data(), dtype, y.data(), m, n, k);
      for (int64_t row = 0; row < m; ++row) {
        for (int64_t col = 0; col < n; ++col) {
          const float tiled = tiled_canonical_dot(x.data() + row * k, widened.data() + col * k, k);
          ASSERT_TRUE(same_bits(tiled, y[static_cast<size_t>(row * n + col)]))
              << dtype_name(dtype) << " k " << k << " row " << row << " col " << col;
        }
      }
    }
  }
}

TEST(SharedMath, RmsNormPiecesMatchCpuKernel) {
  std::mt19937 rng(12);
  for (int64_t width : {1, 7, 64, 257, 2048}) {
    std::vector<float> x = random_floats(rng, static_cast<size_t>(width), -3.0f, 3.0f);
    std::vector<float> weight = random_floats(rng, static_cast<size_t>(width), 0.5f, 1.5f);
    std::vector<float> expected(x.size());
    cpu::rms_norm(x.data(), weight.data(), 1e-6f, 1, width, expected.data());
    // GPU order: one thread computes inv_rms, then every element independently.
    const float inv_rms = math::rms_inv(math::rms_sum_squares(x.data(), width), width, 1e-6f);
    std::vector<float> pieces(x.size());
    for (int64_t i = width - 1; i >= 0; --i)
      pieces[static_cast<size_t>(i)] = math::rms_scale(x[i], weight[i], inv_rms);
    EXPECT_TRUE(same_bits(pieces, expected)) << "width " << width;
  }
}

TEST(SharedMath, RopeTableRowAndRotationMatchCpuKernel) {
  std::mt19937 rng(13);
  for (int64_t rotary_dim : {32, 64, 128}) {
    for (int64_t position : {0, 1, 7, 1000, 32767}) {
      std::vector<float> expected(static_cast<size_t>(rotary_dim));
      cpu::rope_cos_sin(position, 1e6, rotary_dim, expected.data());
      std::vector<float> row(static_cast<size_t>(rotary_dim));
      math::rope_cos_sin_row(position, static_cast<float>(1e6), rotary_dim, row.data());
      ASSERT_TRUE(same_bits(row, expected));
      const int64_t head_dim = 128;
      std::vector<float> heads = random_floats(rng, 2 * head_dim, -1.0f, 1.0f);
      std::vector<float> by_cpu = heads;
      cpu::apply_rope(by_cpu.data(), 2, head_dim, rotary_dim, row.data());
      // GPU order: each (head, pair) independently.
      const int64_t half = rotary_dim / 2;
      for (int64_t head = 1; head >= 0; --head)
        for (int64_t pair = 0; pair < half; ++pair)
          math::rope_rotate_pair(heads[head * head_dim + pair],
                                 heads[head * head_dim + half + pair], row[pair], row[half + pair]);
      ASSERT_TRUE(same_bits(heads, by_cpu));
    }
  }
}

TEST(SharedMath, AttentionInKernelOrderMatchesCpuKernel) {
  std::mt19937 rng(14);
  const int64_t head_dim = 64;
  const int64_t capacity = 40;
  for (int64_t num_positions : {1, 2, 17, 40}) {
    std::vector<float> q = random_floats(rng, head_dim, -1.0f, 1.0f);
    std::vector<float> k = random_floats(rng, capacity * head_dim, -1.0f, 1.0f);
    std::vector<float> v = random_floats(rng, capacity * head_dim, -1.0f, 1.0f);
    const int32_t kv_head = 0;
    std::vector<float> scratch(capacity);
    std::vector<float> expected(head_dim);
    cpu::attention_decode(q.data(), 1, &kv_head, k.data(), v.data(), capacity, head_dim,
                          num_positions, 0.125f, scratch.data(), expected.data());
    // The CUDA block's steps: scores in parallel, max and sum in one thread, exps and outputs
    // in parallel.
    std::vector<float> scores(num_positions);
    for (int64_t pos = num_positions - 1; pos >= 0; --pos)
      scores[pos] = math::attention_score(q.data(), k.data() + pos * head_dim, head_dim, 0.125f);
    const float max_score = math::row_max(scores.data(), num_positions);
    for (int64_t pos = num_positions - 1; pos >= 0; --pos)
      scores[pos] = math::attention_exp_score(scores[pos], max_score);
    const float inv_sum = math::attention_inv_sum(scores.data(), num_positions);
    std::vector<float> out(head_dim);
    for (int64_t d = head_dim - 1; d >= 0; --d)
      out[d] = math::attention_output_element(scores.data(), inv_sum, v.data(), head_dim,
                                              num_positions, d);
    EXPECT_TRUE(same_bits(out, expected)) << "positions " << num_positions;
  }
}

// Paging moves rows, never reorders sums: attention over a sequence scattered across blocks
// (any block size, blocks out of order, other sequences' rows in between) has the bits of the
// contiguous kernel, for the CPU composition and for the CUDA block's per-element steps.
TEST(SharedMath, PagedAttentionHasTheBitsOfContiguousAttention) {
  std::mt19937 rng(16);
  const int64_t head_dim = 32, capacity = 45, kv_heads = 2, kv_head = 1;
  for (int64_t block_size : {1, 4, 16, 64}) {
    const int64_t blocks_per_seq = (capacity + block_size - 1) / block_size;
    const int64_t num_blocks = 2 * blocks_per_seq + 3;
    // Blocks handed out in a scrambled order: seq's block j is (7 * j + 5) mod num_blocks.
    std::vector<int32_t> table(blocks_per_seq);
    for (int64_t j = 0; j < blocks_per_seq; ++j)
      table[j] = static_cast<int32_t>((7 * j + 5) % num_blocks);
    std::vector<float> q = random_floats(rng, head_dim, -1.0f, 1.0f);
    std::vector<float> k = random_floats(rng, capacity * head_dim, -1.0f, 1.0f);
    std::vector<float> v = random_floats(rng, capacity * head_dim, -1.0f, 1.0f);
    // Paged pool of one layer: [num_blocks][kv_heads][block_size][head_dim], filled with noise,
    // then this sequence's rows written to kv head 1 of its blocks.
    const int64_t block_stride = kv_heads * block_size * head_dim;
    std::vector<float> k_pool = random_floats(rng, num_blocks * block_stride, -9.0f, 9.0f);
    std::vector<float> v_pool = random_floats(rng, num_blocks * block_stride, -9.0f, 9.0f);
    math::PagedKvRows k_rows{k_pool.data() + kv_head * block_size * head_dim, table.data(),
                             block_stride, block_size, head_dim};
    math::PagedKvRows v_rows{v_pool.data() + kv_head * block_size * head_dim, table.data(),
                             block_stride, block_size, head_dim};
    for (int64_t pos = 0; pos < capacity; ++pos) {
      std::copy_n(k.data() + pos * head_dim, head_dim, const_cast<float*>(k_rows.row(pos)));
      std::copy_n(v.data() + pos * head_dim, head_dim, const_cast<float*>(v_rows.row(pos)));
    }
    for (int64_t num_positions : {int64_t{1}, block_size, capacity}) {
      if (num_positions > capacity) continue;
      std::vector<float> scratch(capacity), expected(head_dim), paged(head_dim);
      math::attention_head(q.data(), k.data(), v.data(), head_dim, num_positions, 0.125f,
                           scratch.data(), expected.data());
      math::attention_head_paged(q.data(), k_rows, v_rows, num_positions, 0.125f, scratch.data(),
                                 paged.data());
      EXPECT_TRUE(same_bits(paged, expected)) << "block " << block_size << " n " << num_positions;
      math::attention_head(q.data(), k.data(), v.data(), head_dim, num_positions, 0.125f,
                           scratch.data(), expected.data());
      const float inv_sum = math::attention_exp_scores(scratch.data(), num_positions, [&] {
        float max_score = -INFINITY;
        for (int64_t pos = 0; pos < num_positions; ++pos) {
          scratch[pos] = math::attention_score(q.data(), k_rows.row(pos), head_dim, 0.125f);
          max_score = std::max(max_score, scratch[pos]);
        }
        return max_score;
      }());
      for (int64_t d = head_dim - 1; d >= 0; --d)
        paged[d] =
            math::attention_output_element_paged(scratch.data(), inv_sum, v_rows, num_positions, d);
      EXPECT_TRUE(same_bits(paged, expected)) << "kernel steps, block " << block_size;
    }
  }
}

TEST(SharedMath, SoftmaxAndRouteMatchCpuKernels) {
  std::mt19937 rng(15);
  for (int64_t num_experts : {8, 60, 128}) {
    std::vector<float> logits = random_floats(rng, num_experts, -4.0f, 4.0f);
    logits[3] = logits[5];  // an exact tie
    for (int64_t top_k : {1, 4, 8}) {
      for (bool normalize : {false, true}) {
        std::vector<float> probs_cpu(num_experts), probs_math(num_experts);
        std::vector<int32_t> ids_cpu(top_k), ids_math(top_k);
        std::vector<float> weights_cpu(top_k), weights_math(top_k);
        const float margin_cpu =
            cpu::route_top_k(logits.data(), num_experts, top_k, normalize, probs_cpu.data(),
                             ids_cpu.data(), weights_cpu.data())
                .margin;
        const float margin_math =
            math::route_top_k_token(logits.data(), num_experts, top_k, normalize, probs_math.data(),
                                    ids_math.data(), weights_math.data());
        EXPECT_TRUE(same_bits(margin_cpu, margin_math));
        EXPECT_EQ(ids_cpu, ids_math);
        EXPECT_TRUE(same_bits(weights_cpu, weights_math));
        EXPECT_TRUE(same_bits(probs_cpu, probs_math));
      }
    }
  }
}

TEST(SharedMath, SiluAndSigmoidMatchCpuKernels) {
  std::mt19937 rng(16);
  std::vector<float> gate = random_floats(rng, 1000, -20.0f, 20.0f);
  std::vector<float> up = random_floats(rng, 1000, -2.0f, 2.0f);
  gate[0] = 200.0f;
  gate[1] = -200.0f;
  std::vector<float> expected(gate.size());
  cpu::silu_mul(gate.data(), up.data(), static_cast<int64_t>(gate.size()), expected.data());
  for (size_t i = 0; i < gate.size(); ++i) {
    ASSERT_TRUE(same_bits(math::silu_mul(gate[i], up[i]), expected[i])) << i;
    ASSERT_TRUE(same_bits(math::sigmoid_f32(gate[i]), cpu::sigmoid(gate[i]))) << i;
  }
}

// runtime/model/model.cpp's combine loop, restated: slot outputs in (token, slot) rows.
std::vector<float> reference_combine(const std::vector<float>& slot_out,
                                     const std::vector<float>& weights,
                                     const std::vector<bool>& local, int64_t num_tokens,
                                     int64_t top_k, int64_t hidden, bool round, DType dtype) {
  std::vector<float> out(static_cast<size_t>(num_tokens * hidden), 0.0f);
  for (int64_t token = 0; token < num_tokens; ++token) {
    float* row = out.data() + token * hidden;
    for (int64_t slot = 0; slot < top_k; ++slot) {
      if (!local[static_cast<size_t>(token * top_k + slot)]) continue;
      const float weight = weights[static_cast<size_t>(token * top_k + slot)];
      const float* expert_row = slot_out.data() + (token * top_k + slot) * hidden;
      for (int64_t i = 0; i < hidden; ++i)
        row[i] += round ? round_to_dtype(weight * expert_row[i], dtype) : weight * expert_row[i];
    }
  }
  return out;
}

TEST(SharedMath, CombineOverPackedRowsMatchesModelLoop) {
  std::mt19937 rng(17);
  const int64_t num_tokens = 9;
  const int64_t top_k = 3;
  const int64_t hidden = 33;
  const int64_t pairs = num_tokens * top_k;
  std::vector<float> slot_out = random_floats(rng, static_cast<size_t>(pairs * hidden), -3, 3);
  std::vector<float> weights = random_floats(rng, static_cast<size_t>(pairs), 0.0f, 1.0f);
  std::vector<bool> local(static_cast<size_t>(pairs));
  for (size_t i = 0; i < local.size(); ++i) local[i] = (rng() % 3) != 0;
  // Pack the local pairs in reverse order, as a different batch's packing might.
  std::vector<int32_t> slot_rows(static_cast<size_t>(pairs), -1);
  std::vector<float> packed;
  for (int64_t pair = pairs - 1; pair >= 0; --pair) {
    if (!local[static_cast<size_t>(pair)]) continue;
    slot_rows[static_cast<size_t>(pair)] = static_cast<int32_t>(packed.size() / hidden);
    packed.insert(packed.end(), slot_out.begin() + pair * hidden,
                  slot_out.begin() + (pair + 1) * hidden);
  }
  for (bool round : {false, true}) {
    for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
      const std::vector<float> expected =
          reference_combine(slot_out, weights, local, num_tokens, top_k, hidden, round, dtype);
      std::vector<float> out(expected.size());
      for (int64_t token = 0; token < num_tokens; ++token)
        for (int64_t i = 0; i < hidden; ++i)
          out[static_cast<size_t>(token * hidden + i)] = math::combine_element(
              top_k, weights.data() + token * top_k, slot_rows.data() + token * top_k,
              packed.data(), hidden, i, math::CombinePrecisionArgs{round, dtype});
      EXPECT_TRUE(same_bits(out, expected)) << "round " << round << " " << dtype_name(dtype);
    }
  }
}

// The greedy rule (first maximum wins), restated (runtime/sampling/sampler.cpp's argmax).
int32_t engine_argmax(const std::vector<float>& logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
  return best;
}

// The CUDA argmax's order: strided per-thread scans, then a pairwise tree over the threads.
int32_t tree_argmax(const std::vector<float>& logits, int threads) {
  std::vector<float> values(static_cast<size_t>(threads), 0.0f);
  std::vector<int32_t> indices(static_cast<size_t>(threads), -1);
  for (int t = 0; t < threads; ++t) {
    for (size_t i = static_cast<size_t>(t); i < logits.size(); i += static_cast<size_t>(threads)) {
      const float value = logits[i];
      const bool candidate = i == 0 || value == value;
      if (candidate &&
          math::argmax_prefers(value, static_cast<int32_t>(i), values[t], indices[t])) {
        values[t] = value;
        indices[t] = static_cast<int32_t>(i);
      }
    }
  }
  for (int width = threads / 2; width >= 1; width /= 2)
    for (int t = 0; t < width; ++t)
      if (math::argmax_prefers(values[t + width], indices[t + width], values[t], indices[t])) {
        values[t] = values[t + width];
        indices[t] = indices[t + width];
      }
  return indices[0];
}

TEST(SharedMath, ArgmaxTreeMatchesSequentialScan) {
  std::mt19937 rng(18);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows = {
      {1.0f},
      {nan, 5.0f, 7.0f},
      {3.0f, nan, 2.0f, nan},
      {-inf, -inf, -inf},
      {0.0f, -0.0f, 0.0f},
      {-0.0f, 0.0f},
      {1.0f, 9.0f, 9.0f, 2.0f, 9.0f},
  };
  for (int round = 0; round < 50; ++round) {
    std::vector<float> row = random_floats(rng, 1 + rng() % 3000, -10.0f, 10.0f);
    // Ties and NaNs at random places.
    for (int j = 0; j < 4; ++j) row[rng() % row.size()] = 10.0f;
    if (round % 3 == 0) row[rng() % row.size()] = nan;
    rows.push_back(row);
  }
  for (const std::vector<float>& row : rows) {
    const int32_t expected = engine_argmax(row);
    ASSERT_EQ(math::argmax_row(row.data(), static_cast<int64_t>(row.size())), expected);
    for (int threads : {1, 2, 32, 256}) ASSERT_EQ(tree_argmax(row, threads), expected);
  }
}

}  // namespace
}  // namespace keel
