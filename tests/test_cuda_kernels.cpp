// CUDA kernels (kernels/cuda) against their CPU twins (kernels/cpu) on random data. Label gpu:
// without a device every test reports "skipped: no CUDA device"; the binary still has to
// compile and link, which is what CPU-only CI checks.
//
// Expectations follow kernels/math/README.md: bit-identical everywhere the math is shared
// (canonical GEMM and the grouped expert GEMM, router, embedding, RMSNorm, RoPE from the host
// table, KV append and attention, the MoE pack/gather/combine with or without a shared expert,
// SiLU, argmax, adds, the five Gated DeltaNet ops: the exp is kernels/math/exp_math.h on both
// sides); within the accuracy bound of any fp32 GEMM for cuBLAS (a different summation order,
// used only in `fast` mode).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "kernels/cpu/gdn.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/gdn.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"

namespace keel {
namespace {

using cuda::DeviceBuffer;
using cuda::to_device;
using cuda::to_host;

constexpr double kUnitRoundoff = 0x1p-24;

using math::PackedRoute;

class CudaKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0)
      GTEST_SKIP() << "skipped: no CUDA device (" << cuda::no_device_reason() << ")";
  }
};

std::vector<float> random_floats(std::mt19937& rng, size_t count, float low, float high) {
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(count);
  for (float& value : values) value = distribution(rng);
  return values;
}

// Bitwise equality of two fp32 vectors, naming the first difference.
testing::AssertionResult same_bits(const std::vector<float>& gpu, const std::vector<float>& cpu) {
  if (gpu.size() != cpu.size())
    return testing::AssertionFailure() << "sizes differ: " << gpu.size() << " vs " << cpu.size();
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (float_bits(gpu[i]) != float_bits(cpu[i]))
      return testing::AssertionFailure()
             << "first difference at " << i << ": gpu " << gpu[i] << " (0x" << std::hex
             << float_bits(gpu[i]) << ") cpu " << cpu[i] << " (0x" << float_bits(cpu[i]) << ")";
  }
  return testing::AssertionSuccess();
}

struct StoredWeights {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> half;
  const void* data() const {
    return dtype == DType::kF32 ? static_cast<const void*>(f32.data())
                                : static_cast<const void*>(half.data());
  }
  size_t bytes() const { return dtype == DType::kF32 ? f32.size() * 4 : half.size() * 2; }
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

DeviceBuffer to_device(const StoredWeights& weights) {
  DeviceBuffer buffer(weights.bytes());
  buffer.upload(weights.data(), weights.bytes());
  return buffer;
}

constexpr DType kAllDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// ---------------------------------------------------------------------------------------------
// Host-only pieces of the CUDA library: these run without a device.

TEST(CudaKernelsHost, RopeTableMatchesCpuRows) {
  for (int64_t rotary_dim : {32, 64, 128}) {
    const int64_t positions = 300;
    const std::vector<float> table = cuda::rope_cos_sin_table(positions, 1e6, rotary_dim);
    std::vector<float> row(static_cast<size_t>(rotary_dim));
    for (int64_t position = 0; position < positions; ++position) {
      cpu::rope_cos_sin(position, 1e6, rotary_dim, row.data());
      ASSERT_EQ(
          std::memcmp(row.data(), table.data() + position * rotary_dim, row.size() * sizeof(float)),
          0)
          << "position " << position << " rotary_dim " << rotary_dim;
    }
  }
}

TEST(CudaKernelsHost, LauncherShapeChecksThrowBeforeTouchingTheDevice) {
  EXPECT_THROW(cuda::rms_norm(nullptr, nullptr, 1e-6f, 1, 0, nullptr), Error);
  EXPECT_THROW(cuda::gemm_canonical(
                   cuda::GemmArgs{nullptr, 2, nullptr, DType::kF32, 4, nullptr, 4, 1, 4, 4}),
               Error);
  EXPECT_THROW(cuda::route_top_k(nullptr, 1, 4, 5, false, nullptr, nullptr, nullptr, nullptr),
               Error);
  EXPECT_THROW(cuda::rope_cos_sin_table(4, 1e4, 3), Error);
  // Value heads not a multiple of key heads; a conv row narrower than its channels.
  EXPECT_THROW(cuda::gdn_recurrence(nullptr, 100, 2, 3, 8, 8, 1.0f, nullptr, nullptr,
                                    math::GdnSequences{}, nullptr, nullptr),
               Error);
  EXPECT_THROW(cuda::gdn_conv(nullptr, 10, 12, nullptr, 4, math::GdnSequences{}, nullptr, nullptr),
               Error);
}

// ---------------------------------------------------------------------------------------------
// Bit-identical kernels.

TEST_F(CudaKernels, EmbeddingGatherIsBitIdentical) {
  std::mt19937 rng(1);
  const int64_t vocab = 50;
  const int64_t hidden = 67;
  const std::vector<int32_t> ids = {3, 0, 49, 3, 17, 50, -1};
  for (DType dtype : kAllDtypes) {
    StoredWeights table =
        make_weights(dtype, random_floats(rng, static_cast<size_t>(vocab * hidden), -2, 2));
    DeviceBuffer table_device = to_device(table);
    DeviceBuffer ids_device = to_device(ids);
    DeviceBuffer out(ids.size() * hidden * sizeof(float));
    cuda::embedding_gather(table_device.data(), dtype, vocab, hidden, ids_device.as<int32_t>(),
                           static_cast<int64_t>(ids.size()), out.as<float>());
    const std::vector<float> gpu = to_host<float>(out, ids.size() * hidden);
    for (size_t t = 0; t < ids.size(); ++t) {
      std::vector<float> expected(static_cast<size_t>(hidden),
                                  std::numeric_limits<float>::quiet_NaN());
      if (ids[t] >= 0 && ids[t] < vocab)
        cpu::to_f32(static_cast<const uint8_t*>(table.data()) +
                        ids[t] * hidden * static_cast<int64_t>(dtype_size(dtype)),
                    dtype, hidden, expected.data());
      std::vector<float> row(gpu.begin() + static_cast<int64_t>(t) * hidden,
                             gpu.begin() + static_cast<int64_t>(t + 1) * hidden);
      if (ids[t] >= 0 && ids[t] < vocab) {
        EXPECT_TRUE(same_bits(row, expected));
      } else {
        for (float value : row) EXPECT_TRUE(std::isnan(value));
      }
    }
  }
}

TEST_F(CudaKernels, RmsNormIsBitIdentical) {
  std::mt19937 rng(2);
  for (int64_t width : {1, 7, 64, 257, 2048, 5000}) {
    const int64_t rows = 5;
    std::vector<float> x = random_floats(rng, static_cast<size_t>(rows * width), -3, 3);
    std::vector<float> weight = random_floats(rng, static_cast<size_t>(width), 0.5f, 1.5f);
    std::vector<float> expected(x.size());
    cpu::rms_norm(x.data(), weight.data(), 1e-6f, rows, width, expected.data());
    DeviceBuffer x_device = to_device(x);
    DeviceBuffer weight_device = to_device(weight);
    // In place, as the qk-norm and the engine use it.
    cuda::rms_norm(x_device.as<float>(), weight_device.as<float>(), 1e-6f, rows, width,
                   x_device.as<float>());
    EXPECT_TRUE(same_bits(to_host<float>(x_device, x.size()), expected));
  }
}

TEST_F(CudaKernels, RmsNormHeadsIsBitIdentical) {
  std::mt19937 rng(3);
  const int64_t tokens = 4, heads = 3, head_dim = 64, token_stride = 7 * head_dim;
  std::vector<float> rows = random_floats(rng, static_cast<size_t>(tokens * token_stride), -2, 2);
  std::vector<float> weight = random_floats(rng, head_dim, 0.5f, 1.5f);
  std::vector<float> expected = rows;
  for (int64_t t = 0; t < tokens; ++t)
    cpu::rms_norm(expected.data() + t * token_stride, weight.data(), 1e-6f, heads, head_dim,
                  expected.data() + t * token_stride);
  DeviceBuffer rows_device = to_device(rows);
  DeviceBuffer weight_device = to_device(weight);
  cuda::rms_norm_heads(rows_device.as<float>(), tokens, token_stride, heads, head_dim,
                       weight_device.as<float>(), 1e-6f);
  EXPECT_TRUE(same_bits(to_host<float>(rows_device, rows.size()), expected));
}

TEST_F(CudaKernels, RopeFromHostTableIsBitIdentical) {
  std::mt19937 rng(4);
  const int64_t tokens = 6, heads = 4, head_dim = 128, rotary_dim = 64;
  const int64_t token_stride = heads * head_dim + 32;
  const std::vector<int32_t> positions = {0, 1, 2, 100, 511, 37};
  const int64_t table_positions = 512;
  std::vector<float> rows = random_floats(rng, static_cast<size_t>(tokens * token_stride), -1, 1);
  std::vector<float> expected = rows;
  std::vector<float> cos_sin(rotary_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    cpu::rope_cos_sin(positions[t], 1e4, rotary_dim, cos_sin.data());
    cpu::apply_rope(expected.data() + t * token_stride, heads, head_dim, rotary_dim,
                    cos_sin.data());
  }
  DeviceBuffer rows_device = to_device(rows);
  DeviceBuffer positions_device = to_device(positions);
  DeviceBuffer table_device = to_device(cuda::rope_cos_sin_table(table_positions, 1e4, rotary_dim));
  cuda::rope(rows_device.as<float>(), tokens, token_stride, heads, head_dim, rotary_dim,
             positions_device.as<int32_t>(), table_device.as<float>(), table_positions);
  EXPECT_TRUE(same_bits(to_host<float>(rows_device, rows.size()), expected));
}

// Every GEMM shape class: tails of the 16-lane chunks and the 64-wide slabs, M and N not
// multiples of the tile, strided operands; all dtypes. cpu::gemm is bit-identical across ISAs.
TEST_F(CudaKernels, CanonicalGemmIsBitIdenticalToCpu) {
  std::mt19937 rng(5);
  struct Shape {
    int64_t m, n, k, pad;
  };
  for (const Shape shape :
       {Shape{1, 1, 1, 0}, Shape{1, 37, 17, 3}, Shape{3, 5, 64, 0}, Shape{17, 33, 65, 5},
        Shape{16, 16, 300, 0}, Shape{40, 70, 1000, 7}, Shape{5, 3, 0, 0}}) {
    for (DType dtype : kAllDtypes) {
      const int64_t ldx = shape.k + shape.pad, ldw = shape.k + 2 * shape.pad,
                    ldy = shape.n + shape.pad;
      std::vector<float> x = random_floats(rng, static_cast<size_t>(shape.m * ldx), -2, 2);
      for (size_t i = 0; i < x.size(); i += 5) x[i] = -0.0f;
      StoredWeights w =
          make_weights(dtype, random_floats(rng, static_cast<size_t>(shape.n * ldw), -2, 2));
      std::vector<float> expected(static_cast<size_t>(shape.m * ldy), 123.0f);
      cpu::gemm(cpu::GemmArgs{x.data(), ldx, w.data(), dtype, ldw, expected.data(), ldy, shape.m,
                              shape.n, shape.k});
      DeviceBuffer x_device = to_device(x);
      DeviceBuffer w_device = to_device(w);
      DeviceBuffer y_device = to_device(std::vector<float>(expected.size(), 123.0f));
      cuda::gemm_canonical(cuda::GemmArgs{x_device.as<float>(), ldx, w_device.data(), dtype, ldw,
                                          y_device.as<float>(), ldy, shape.m, shape.n, shape.k});
      SCOPED_TRACE(testing::Message() << dtype_name(dtype) << " m " << shape.m << " n " << shape.n
                                      << " k " << shape.k);
      EXPECT_TRUE(same_bits(to_host<float>(y_device, expected.size()), expected));
    }
  }
}

TEST_F(CudaKernels, KvAppendAndAttentionAreBitIdentical) {
  std::mt19937 rng(6);
  const int64_t q_heads = 8, kv_heads = 2, head_dim = 64, capacity = 48, num_caches = 2;
  const std::vector<int32_t> kv_head_of_q = {0, 0, 0, 0, 1, 1, 1, 1};
  // A prefill of 5 tokens for cache 0 and decode tokens for cache 1 (its earlier positions
  // already in the cache), all in one step.
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 40, 47};
  const std::vector<int32_t> cache_idx = {0, 0, 0, 0, 0, 1, 1};
  const int64_t tokens = static_cast<int64_t>(positions.size());
  const int64_t q_width = q_heads * head_dim, kv_width = kv_heads * head_dim;
  const int64_t row_stride = q_width + 2 * kv_width;
  const int64_t cache_floats = kv_heads * capacity * head_dim;
  std::vector<float> qkv = random_floats(rng, static_cast<size_t>(tokens * row_stride), -1, 1);
  std::vector<float> k_pool =
      random_floats(rng, static_cast<size_t>(num_caches * cache_floats), -1, 1);
  std::vector<float> v_pool = random_floats(rng, k_pool.size(), -1, 1);

  // CPU: append then attend, as runtime/model/model.cpp does.
  std::vector<float> k_cpu = k_pool, v_cpu = v_pool;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t d = 0; d < head_dim; ++d) {
        const int64_t dst =
            cache_idx[t] * cache_floats + (h * capacity + positions[t]) * head_dim + d;
        k_cpu[dst] = qkv[t * row_stride + q_width + h * head_dim + d];
        v_cpu[dst] = qkv[t * row_stride + q_width + kv_width + h * head_dim + d];
      }
  const float scale = 0.125f;
  std::vector<float> expected(static_cast<size_t>(tokens * q_width));
  std::vector<float> scratch(capacity);
  for (int64_t t = 0; t < tokens; ++t)
    cpu::attention_decode(qkv.data() + t * row_stride, q_heads, kv_head_of_q.data(),
                          k_cpu.data() + cache_idx[t] * cache_floats,
                          v_cpu.data() + cache_idx[t] * cache_floats, capacity, head_dim,
                          positions[t] + 1, scale, scratch.data(), expected.data() + t * q_width);

  // The GPU pool is paged: blocks of 16 positions, each sequence's blocks scattered out of order,
  // holding the same rows as the CPU's contiguous caches.
  const int64_t block_size = 16, blocks_per_seq = capacity / block_size;
  const std::vector<int32_t> block_tables = {4, 1, 3, 0, 5, 2};  // [num_caches][blocks_per_seq]
  auto paged_index = [&](int64_t seq, int64_t h, int64_t pos, int64_t d) {
    const int64_t block =
        block_tables[static_cast<size_t>(seq * blocks_per_seq + pos / block_size)];
    return ((block * kv_heads + h) * block_size + pos % block_size) * head_dim + d;
  };
  auto to_paged = [&](const std::vector<float>& contiguous) {
    std::vector<float> paged(contiguous.size());
    for (int64_t seq = 0; seq < num_caches; ++seq)
      for (int64_t h = 0; h < kv_heads; ++h)
        for (int64_t pos = 0; pos < capacity; ++pos)
          for (int64_t d = 0; d < head_dim; ++d)
            paged[static_cast<size_t>(paged_index(seq, h, pos, d))] =
                contiguous[static_cast<size_t>(seq * cache_floats +
                                               (h * capacity + pos) * head_dim + d)];
    return paged;
  };
  DeviceBuffer qkv_device = to_device(qkv);
  DeviceBuffer k_device = to_device(to_paged(k_pool)), v_device = to_device(to_paged(v_pool));
  DeviceBuffer positions_device = to_device(positions), cache_device = to_device(cache_idx);
  DeviceBuffer map_device = to_device(kv_head_of_q), tables_device = to_device(block_tables);
  DeviceBuffer scores(static_cast<size_t>(tokens * q_heads * capacity) * sizeof(float));
  DeviceBuffer out(expected.size() * sizeof(float));
  cuda::KvPool pool;
  pool.k = k_device.as<float>();
  pool.v = v_device.as<float>();
  pool.num_blocks = num_caches * blocks_per_seq;
  pool.block_stride = kv_heads * block_size * head_dim;
  pool.block_size = block_size;
  pool.num_kv_heads = kv_heads;
  pool.head_dim = head_dim;
  pool.block_tables = tables_device.as<int32_t>();
  pool.max_blocks_per_seq = blocks_per_seq;
  cuda::kv_cache_append(qkv_device.as<float>() + q_width,
                        qkv_device.as<float>() + q_width + kv_width, row_stride, tokens,
                        positions_device.as<int32_t>(), cache_device.as<int32_t>(), pool);
  EXPECT_TRUE(same_bits(to_host<float>(k_device, k_cpu.size()), to_paged(k_cpu)));
  EXPECT_TRUE(same_bits(to_host<float>(v_device, v_cpu.size()), to_paged(v_cpu)));
  cuda::attention(qkv_device.as<float>(), row_stride, tokens, q_heads, map_device.as<int32_t>(),
                  pool, positions_device.as<int32_t>(), cache_device.as<int32_t>(), scale,
                  scores.as<float>(), out.as<float>(), q_width);
  const std::vector<float> gpu = to_host<float>(out, expected.size());
  // Scores, their max, the shared exp (kernels/math/exp_math.h), the sums in position order:
  // the same operations in the same order on both sides.
  EXPECT_TRUE(same_bits(gpu, expected));
}

// The KV pool in bf16 and fp8 e4m3 (kernels/math/kv_math.h): the GPU stores the very bytes the
// host rounding gives (Kv::store per element, x / scale for fp8) and attention reads them back
// widened exactly as math::attention_head_paged does on the host: bit-identical.
template <typename Kv>
void check_kv_dtype_twin(std::mt19937& rng) {
  using Storage = typename Kv::Storage;
  const int64_t tokens = 19, q_heads = 4, kv_heads = 2, head_dim = 24, block_size = 4;
  const int64_t q_width = q_heads * head_dim, kv_width = kv_heads * head_dim;
  const int64_t row_stride = q_width + 2 * kv_width;
  const int64_t blocks_per_seq = (tokens + block_size - 1) / block_size;
  const float k_scale = 0.05f, v_scale = 0.02f;
  std::vector<float> qkv = random_floats(rng, static_cast<size_t>(tokens * row_stride), -4, 4);
  qkv[static_cast<size_t>(q_width)] = 100.0f;  // saturates fp8 at 448 * 0.05 = 22.4
  std::vector<int32_t> block_tables(static_cast<size_t>(blocks_per_seq));
  for (int64_t j = 0; j < blocks_per_seq; ++j)
    block_tables[static_cast<size_t>(j)] = static_cast<int32_t>((3 * j + 2) % (blocks_per_seq + 1));
  const int64_t num_blocks = blocks_per_seq + 1;
  std::vector<int32_t> positions(static_cast<size_t>(tokens)), cache_idx(positions.size(), 0);
  std::iota(positions.begin(), positions.end(), 0);
  const std::vector<int32_t> kv_head_of_q = {0, 0, 1, 1};
  const int64_t elements = num_blocks * kv_heads * block_size * head_dim;
  // Host: store and attend with the shared math.
  std::vector<Storage> k_host(static_cast<size_t>(elements)), v_host(k_host.size());
  auto slot = [&](int64_t h, int64_t pos) {
    return ((int64_t{block_tables[static_cast<size_t>(pos / block_size)]} * kv_heads + h) *
                block_size +
            pos % block_size) *
           head_dim;
  };
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < kv_width; ++i) {
      const int64_t at = slot(i / head_dim, t) + i % head_dim;
      k_host[static_cast<size_t>(at)] =
          Kv::store(qkv[static_cast<size_t>(t * row_stride + q_width + i)], k_scale);
      v_host[static_cast<size_t>(at)] =
          Kv::store(qkv[static_cast<size_t>(t * row_stride + q_width + kv_width + i)], v_scale);
    }
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> expected(static_cast<size_t>(tokens * q_width)),
      scores(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < q_heads; ++h) {
      auto rows = [&](const std::vector<Storage>& pool, float s) {
        math::PagedKvRowsOf<Kv> view;
        view.head_base = pool.data() + kv_head_of_q[static_cast<size_t>(h)] * block_size * head_dim;
        view.block_table = block_tables.data();
        view.block_stride = kv_heads * block_size * head_dim;
        view.block_size = block_size;
        view.head_dim = head_dim;
        view.scale = s;
        return view;
      };
      math::attention_head_paged(qkv.data() + t * row_stride + h * head_dim, rows(k_host, k_scale),
                                 rows(v_host, v_scale), t + 1, scale, scores.data(),
                                 expected.data() + t * q_width + h * head_dim);
    }
  // Device.
  DeviceBuffer qkv_device = to_device(qkv);
  // Zeroed pools: slots nobody writes must match the host's zeros.
  const std::vector<Storage> zeros(static_cast<size_t>(elements));
  DeviceBuffer k_device = to_device(zeros), v_device = to_device(zeros);
  DeviceBuffer positions_device = to_device(positions), cache_device = to_device(cache_idx);
  DeviceBuffer map_device = to_device(kv_head_of_q), tables_device = to_device(block_tables);
  DeviceBuffer scores_device(static_cast<size_t>(tokens * q_heads * blocks_per_seq * block_size) *
                             sizeof(float));
  DeviceBuffer out(expected.size() * sizeof(float));
  cuda::KvPool pool;
  pool.k = k_device.as<Storage>();
  pool.v = v_device.as<Storage>();
  pool.num_blocks = num_blocks;
  pool.block_stride = kv_heads * block_size * head_dim;
  pool.block_size = block_size;
  pool.num_kv_heads = kv_heads;
  pool.head_dim = head_dim;
  pool.block_tables = tables_device.as<int32_t>();
  pool.max_blocks_per_seq = blocks_per_seq;
  pool.dtype = Kv::kDType;
  pool.k_scale = k_scale;
  pool.v_scale = v_scale;
  cuda::kv_cache_append(qkv_device.as<float>() + q_width,
                        qkv_device.as<float>() + q_width + kv_width, row_stride, tokens,
                        positions_device.as<int32_t>(), cache_device.as<int32_t>(), pool);
  EXPECT_EQ(to_host<Storage>(k_device, k_host.size()), k_host);
  EXPECT_EQ(to_host<Storage>(v_device, v_host.size()), v_host);
  cuda::attention(qkv_device.as<float>(), row_stride, tokens, q_heads, map_device.as<int32_t>(),
                  pool, positions_device.as<int32_t>(), cache_device.as<int32_t>(), scale,
                  scores_device.as<float>(), out.as<float>(), q_width);
  EXPECT_TRUE(same_bits(to_host<float>(out, expected.size()), expected));
}

TEST_F(CudaKernels, Bf16AndFp8KvPoolsAreBitIdentical) {
  std::mt19937 rng(31);
  {
    SCOPED_TRACE("bf16");
    check_kv_dtype_twin<math::KvBF16>(rng);
  }
  {
    SCOPED_TRACE("fp8_e4m3");
    check_kv_dtype_twin<math::KvFp8E4M3>(rng);
  }
}

TEST_F(CudaKernels, SiluMulIsBitIdentical) {
  std::mt19937 rng(7);
  const int64_t rows = 7, width = 300;
  std::vector<float> mid = random_floats(rng, static_cast<size_t>(rows * 2 * width), -12, 12);
  mid[0] = 100.0f;
  mid[1] = -100.0f;
  std::vector<float> expected(static_cast<size_t>(rows * width));
  for (int64_t r = 0; r < rows; ++r)
    cpu::silu_mul(mid.data() + r * 2 * width, mid.data() + r * 2 * width + width, width,
                  expected.data() + r * width);
  DeviceBuffer mid_device = to_device(mid);
  DeviceBuffer out(expected.size() * sizeof(float));
  cuda::silu_mul(mid_device.as<float>(), mid_device.as<float>() + width, 2 * width, rows, width,
                 out.as<float>(), width);
  const std::vector<float> gpu = to_host<float>(out, expected.size());
  // The shared SiLU (kernels/math/exp_math.h) on both sides.
  EXPECT_TRUE(same_bits(gpu, expected));
}

TEST_F(CudaKernels, RouterIsBitIdentical) {
  std::mt19937 rng(8);
  const int64_t tokens = 50, hidden = 96, experts = 64, top_k = 6;
  std::vector<float> x = random_floats(rng, static_cast<size_t>(tokens * hidden), -1, 1);
  for (DType dtype : kAllDtypes) {
    StoredWeights w =
        make_weights(dtype, random_floats(rng, static_cast<size_t>(experts * hidden), -1, 1));
    std::vector<float> logits(static_cast<size_t>(tokens * experts));
    cpu::gemm(x.data(), w.data(), dtype, logits.data(), tokens, experts, hidden);
    DeviceBuffer x_device = to_device(x), w_device = to_device(w);
    DeviceBuffer logits_device(logits.size() * 4), probs_device(logits.size() * 4);
    DeviceBuffer ids_device(static_cast<size_t>(tokens * top_k) * 4);
    DeviceBuffer weights_device(static_cast<size_t>(tokens * top_k) * 4);
    DeviceBuffer margins_device(static_cast<size_t>(tokens) * 4);
    for (bool normalize : {false, true}) {
      cuda::router(x_device.as<float>(), tokens, hidden, w_device.data(), dtype, experts, top_k,
                   normalize, logits_device.as<float>(), probs_device.as<float>(),
                   ids_device.as<int32_t>(), weights_device.as<float>(),
                   margins_device.as<float>());
      EXPECT_TRUE(same_bits(to_host<float>(logits_device, logits.size()), logits));
      const std::vector<float> probs_gpu = to_host<float>(probs_device, logits.size());
      const std::vector<int32_t> ids_gpu = to_host<int32_t>(ids_device, tokens * top_k);
      const std::vector<float> weights_gpu = to_host<float>(weights_device, tokens * top_k);
      const std::vector<float> margins_gpu = to_host<float>(margins_device, tokens);
      // Logits, the shared exp, the softmax sum and the selection rule are the same on both
      // sides: probabilities, ids, weights and margins are identical.
      std::vector<float> probs(logits.size()), weights(static_cast<size_t>(tokens * top_k)),
          margins(static_cast<size_t>(tokens));
      std::vector<int32_t> ids(static_cast<size_t>(tokens * top_k));
      for (int64_t t = 0; t < tokens; ++t)
        margins[t] = cpu::route_top_k(logits.data() + t * experts, experts, top_k, normalize,
                                      probs.data() + t * experts, ids.data() + t * top_k,
                                      weights.data() + t * top_k)
                         .margin;
      EXPECT_TRUE(same_bits(probs_gpu, probs));
      EXPECT_EQ(ids_gpu, ids);
      EXPECT_TRUE(same_bits(weights_gpu, weights));
      EXPECT_TRUE(same_bits(margins_gpu, margins));
    }
  }
}

TEST_F(CudaKernels, ArgmaxMatchesEngineRule) {
  std::mt19937 rng(9);
  const int64_t rows = 6, vocab = 5003, stride = 5010;
  std::vector<float> logits = random_floats(rng, static_cast<size_t>(rows * stride), -10, 10);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  logits[0 * stride + 4000] = 50.0f;  // tie between 4000 and 17: 17 wins
  logits[0 * stride + 17] = 50.0f;
  logits[1 * stride + 0] = nan;  // NaN at 0 wins
  logits[2 * stride + 3] = nan;  // NaN elsewhere never wins
  logits[2 * stride + 9] = 40.0f;
  std::fill(logits.begin() + 3 * stride, logits.begin() + 3 * stride + vocab,
            -std::numeric_limits<float>::infinity());
  DeviceBuffer logits_device = to_device(logits);
  DeviceBuffer ids_device(rows * sizeof(int32_t));
  cuda::argmax_rows(logits_device.as<float>(), rows, vocab, stride, ids_device.as<int32_t>());
  const std::vector<int32_t> ids = to_host<int32_t>(ids_device, rows);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t best = 0;  // the greedy scan: the first maximum wins
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[r * stride + i] > logits[r * stride + best]) best = static_cast<int32_t>(i);
    EXPECT_EQ(ids[r], best) << "row " << r;
  }
  EXPECT_EQ(ids[0], 17);
  EXPECT_EQ(ids[1], 0);
  EXPECT_EQ(ids[3], 0);
}

TEST_F(CudaKernels, AddsAreBitIdentical) {
  std::mt19937 rng(10);
  const int64_t rows = 5, width = 77, stride = 80;
  std::vector<float> data = random_floats(rng, static_cast<size_t>(rows * stride), -3, 3);
  std::vector<float> bias = random_floats(rng, width, -1, 1);
  std::vector<float> other = random_floats(rng, data.size(), -3, 3);
  std::vector<float> expected = data;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) expected[r * stride + i] += bias[i];
  for (size_t i = 0; i < expected.size(); ++i) expected[i] += other[i];
  DeviceBuffer data_device = to_device(data), bias_device = to_device(bias),
               other_device = to_device(other);
  cuda::add_bias(data_device.as<float>(), rows, width, stride, bias_device.as<float>());
  cuda::add_in_place(data_device.as<float>(), other_device.as<float>(),
                     static_cast<int64_t>(data.size()));
  EXPECT_TRUE(same_bits(to_host<float>(data_device, data.size()), expected));
}

// ---------------------------------------------------------------------------------------------
// MoE: the device pack against cpu::moe_pack (identical arrays), the gather, the grouped
// expert GEMM against cpu::gemm per expert, and the combine against runtime/model/model.cpp's loop.

struct MoeCase {
  int64_t tokens = 13, top_k = 4, experts = 10, hidden = 70;
  std::vector<int32_t> expert_ids;       // [tokens, top_k], distinct per token
  std::vector<float> route_weights;      // [tokens, top_k]
  std::vector<int32_t> expert_to_local;  // [experts] -> local index or -1
  int64_t num_local = 0;
  std::vector<int32_t> offsets;     // cpu::moe_pack's output
  std::vector<PackedRoute> routes;  // packed, local experts back to back
  std::vector<int32_t> slot_rows;   // [tokens, top_k]
};

MoeCase make_moe_case(std::mt19937& rng, int64_t tokens = 13) {
  MoeCase c;
  c.tokens = tokens;
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::vector<int32_t> order(c.experts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    c.expert_ids.insert(c.expert_ids.end(), order.begin(), order.begin() + c.top_k);
  }
  c.route_weights = random_floats(rng, static_cast<size_t>(c.tokens * c.top_k), 0.0f, 1.0f);
  for (int64_t e = 0; e < c.experts; ++e)
    c.expert_to_local.push_back(e % 3 == 1 ? -1 : static_cast<int32_t>(c.num_local++));
  c.offsets.assign(static_cast<size_t>(c.num_local + 1), 0);
  c.routes.assign(static_cast<size_t>(c.tokens * c.top_k), PackedRoute{});
  c.slot_rows.assign(static_cast<size_t>(c.tokens * c.top_k), 0);
  cpu::moe_pack(c.expert_ids.data(), c.tokens, c.top_k, c.expert_to_local.data(), c.experts,
                c.num_local, c.offsets.data(), c.routes.data(), c.slot_rows.data());
  c.routes.resize(static_cast<size_t>(c.offsets.back()));
  return c;
}

TEST_F(CudaKernels, MoePackMatchesTheCpuSortExactly) {
  std::mt19937 rng(5);
  // Sizes around the pack's tile of 256 pairs, and a prefill-sized batch.
  for (int64_t tokens : {int64_t{0}, int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65},
                         int64_t{300}, int64_t{2048}}) {
    MoeCase c = make_moe_case(rng, tokens);
    DeviceBuffer ids = to_device(c.expert_ids), to_local = to_device(c.expert_to_local);
    DeviceBuffer offsets(static_cast<size_t>(c.num_local + 1) * sizeof(int32_t));
    DeviceBuffer routes(std::max<size_t>(1, c.expert_ids.size()) * sizeof(PackedRoute));
    DeviceBuffer slot_rows(std::max<size_t>(1, c.expert_ids.size()) * sizeof(int32_t));
    cuda::moe_pack(ids.as<int32_t>(), c.tokens, c.top_k, to_local.as<int32_t>(), c.num_local,
                   offsets.as<int32_t>(), routes.as<PackedRoute>(), slot_rows.as<int32_t>());
    SCOPED_TRACE(testing::Message() << "tokens " << tokens);
    EXPECT_EQ(to_host<int32_t>(offsets, c.offsets.size()), c.offsets);
    EXPECT_EQ(to_host<int32_t>(slot_rows, c.slot_rows.size()), c.slot_rows);
    std::vector<int32_t> packed(c.routes.size() * 2), expected;
    routes.download(packed.data(), packed.size() * sizeof(int32_t));
    for (const PackedRoute& route : c.routes) {
      expected.push_back(route.token_idx);
      expected.push_back(route.slot_idx);
    }
    EXPECT_EQ(packed, expected);
  }
}

TEST_F(CudaKernels, GroupedExpertGemmEqualsTheCpuGemmPerExpert) {
  std::mt19937 rng(9);
  MoeCase c = make_moe_case(rng, 40);
  const int64_t rows = c.offsets.back(), n = 37, k = 70;
  std::vector<float> x = random_floats(rng, static_cast<size_t>(rows * k), -2, 2);
  std::vector<std::vector<float>> weights;
  std::vector<DeviceBuffer> weight_buffers;
  std::vector<const void*> table;
  for (int64_t local = 0; local < c.num_local; ++local) {
    weights.push_back(random_floats(rng, static_cast<size_t>(n * k), -1, 1));
    weight_buffers.push_back(to_device(weights.back()));
    table.push_back(weight_buffers.back().data());
  }
  DeviceBuffer table_device(table.size() * sizeof(const void*));
  table_device.upload(table.data(), table.size() * sizeof(const void*));
  DeviceBuffer x_device = to_device(x), offsets = to_device(c.offsets);
  DeviceBuffer y(static_cast<size_t>(std::max<int64_t>(1, rows * n)) * sizeof(float));
  cuda::GroupedGemmArgs args{x_device.as<float>(),
                             k,
                             static_cast<const void* const*>(table_device.data()),
                             DType::kF32,
                             k,
                             y.as<float>(),
                             n,
                             offsets.as<int32_t>(),
                             c.num_local,
                             c.tokens,
                             c.tokens * c.top_k,
                             n,
                             k};
  cuda::gemm_canonical_grouped(args);
  std::vector<float> expected(static_cast<size_t>(rows * n));
  for (int64_t local = 0; local < c.num_local; ++local) {
    const int64_t first = c.offsets[local], count = c.offsets[local + 1] - first;
    if (count > 0)
      cpu::gemm(x.data() + first * k, weights[local].data(), DType::kF32,
                expected.data() + first * n, count, n, k);
  }
  EXPECT_TRUE(same_bits(to_host<float>(y, expected.size()), expected));
}

TEST_F(CudaKernels, MoeGatherAndCombineAreBitIdentical) {
  std::mt19937 rng(11);
  MoeCase c = make_moe_case(rng);
  const int64_t rows = static_cast<int64_t>(c.routes.size());
  std::vector<float> normed = random_floats(rng, static_cast<size_t>(c.tokens * c.hidden), -2, 2);
  DeviceBuffer normed_device = to_device(normed);
  DeviceBuffer routes_device(c.routes.size() * sizeof(PackedRoute));
  routes_device.upload(c.routes.data(), c.routes.size() * sizeof(PackedRoute));
  DeviceBuffer offsets_device = to_device(c.offsets);

  DeviceBuffer expert_in(static_cast<size_t>(c.tokens * c.top_k * c.hidden) * sizeof(float));
  cuda::moe_gather(normed_device.as<float>(), c.hidden, c.hidden, routes_device.as<PackedRoute>(),
                   offsets_device.as<int32_t>(), c.num_local, c.tokens * c.top_k,
                   expert_in.as<float>());
  std::vector<float> expected_in;
  for (const PackedRoute& route : c.routes)
    expected_in.insert(expected_in.end(), normed.begin() + route.token_idx * c.hidden,
                       normed.begin() + (route.token_idx + 1) * c.hidden);
  EXPECT_TRUE(same_bits(to_host<float>(expert_in, expected_in.size()), expected_in));

  // Stand-in expert outputs in packed order, and the CPU's slot_out copy of them.
  std::vector<float> expert_out = random_floats(rng, static_cast<size_t>(rows * c.hidden), -4, 4);
  std::vector<float> slot_out(static_cast<size_t>(c.tokens * c.top_k * c.hidden), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pair = int64_t{c.routes[r].token_idx} * c.top_k + c.routes[r].slot_idx;
    std::copy_n(expert_out.begin() + r * c.hidden, c.hidden, slot_out.begin() + pair * c.hidden);
  }
  DeviceBuffer expert_out_device = to_device(expert_out);
  DeviceBuffer slot_rows = to_device(c.slot_rows);

  DeviceBuffer weights_device = to_device(c.route_weights);
  DeviceBuffer out(static_cast<size_t>(c.tokens * c.hidden) * sizeof(float));
  for (bool round : {false, true}) {
    for (DType dtype : kAllDtypes) {
      // runtime/model/model.cpp's combine (without a shared expert).
      std::vector<float> expected(static_cast<size_t>(c.tokens * c.hidden), 0.0f);
      for (int64_t t = 0; t < c.tokens; ++t)
        for (int64_t s = 0; s < c.top_k; ++s) {
          if (c.expert_to_local[c.expert_ids[t * c.top_k + s]] < 0) continue;
          const float weight = c.route_weights[t * c.top_k + s];
          const float* row = slot_out.data() + (t * c.top_k + s) * c.hidden;
          for (int64_t i = 0; i < c.hidden; ++i)
            expected[t * c.hidden + i] +=
                round ? round_to_dtype(weight * row[i], dtype) : weight * row[i];
        }
      cuda::moe_combine(expert_out_device.as<float>(), c.hidden, slot_rows.as<int32_t>(),
                        weights_device.as<float>(), c.tokens, c.top_k,
                        math::CombinePrecisionArgs{round, dtype}, {}, out.as<float>());
      SCOPED_TRACE(testing::Message() << "round " << round << " " << dtype_name(dtype));
      EXPECT_TRUE(same_bits(to_host<float>(out, expected.size()), expected));
    }
  }

  // With a shared expert: its gate is the shared sigmoid on both sides, so still identical.
  std::vector<float> shared_out =
      random_floats(rng, static_cast<size_t>(c.tokens * c.hidden), -2, 2);
  std::vector<float> gate_logits = random_floats(rng, static_cast<size_t>(c.tokens), -3, 3);
  std::vector<float> expected(static_cast<size_t>(c.tokens * c.hidden), 0.0f);
  for (int64_t t = 0; t < c.tokens; ++t) {
    for (int64_t s = 0; s < c.top_k; ++s) {
      if (c.expert_to_local[c.expert_ids[t * c.top_k + s]] < 0) continue;
      const float weight = c.route_weights[t * c.top_k + s];
      for (int64_t i = 0; i < c.hidden; ++i)
        expected[t * c.hidden + i] += weight * slot_out[(t * c.top_k + s) * c.hidden + i];
    }
    const float gate = cpu::sigmoid(gate_logits[t]);
    for (int64_t i = 0; i < c.hidden; ++i)
      expected[t * c.hidden + i] += gate * shared_out[t * c.hidden + i];
  }
  DeviceBuffer shared_device = to_device(shared_out), gate_device = to_device(gate_logits);
  cuda::moe_combine(expert_out_device.as<float>(), c.hidden, slot_rows.as<int32_t>(),
                    weights_device.as<float>(), c.tokens, c.top_k, math::CombinePrecisionArgs{},
                    cuda::SharedExpertOutput{shared_device.as<float>(), gate_device.as<float>()},
                    out.as<float>());
  EXPECT_TRUE(same_bits(to_host<float>(out, expected.size()), expected));
}

// ---------------------------------------------------------------------------------------------
// cuBLAS: a different summation order, so only within the accuracy bound of any fp32 GEMM.

// ---------------------------------------------------------------------------------------------
// Gated DeltaNet (kernels/math/gdn_math.h): all five ops bit-identical to kernels/cpu/gdn.cpp.

// A step's sequences on the host and on the device: {rows, slot, fresh} per sequence.
struct GdnStep {
  std::vector<int32_t> row_starts{0}, slots, fresh;
  DeviceBuffer row_starts_device, slots_device, fresh_device;
  GdnStep(std::initializer_list<std::array<int32_t, 3>> pieces) {
    for (const auto& piece : pieces) {
      row_starts.push_back(row_starts.back() + piece[0]);
      slots.push_back(piece[1]);
      fresh.push_back(piece[2]);
    }
    row_starts_device = to_device(row_starts);
    slots_device = to_device(slots);
    fresh_device = to_device(fresh);
  }
  int64_t num_rows() const { return row_starts.back(); }
  math::GdnSequences host() const {
    return {row_starts.data(), slots.data(), fresh.data(), static_cast<int64_t>(slots.size())};
  }
  math::GdnSequences device() const {
    return {row_starts_device.as<int32_t>(), slots_device.as<int32_t>(), fresh_device.as<int32_t>(),
            static_cast<int64_t>(slots.size())};
  }
};

TEST_F(CudaKernels, GdnConvIsBitIdentical) {
  std::mt19937 rng(40);
  for (int64_t kernel : {1, 2, 4}) {
    const int64_t channels = 1003, row_stride = 1010, num_slots = 4;
    // Continuing with more and with fewer rows than K - 1, fresh, empty, a decode row.
    const GdnStep step({{6, 2, 0}, {1, 0, 0}, {5, 3, 1}, {0, 1, 0}, {1, 1, 0}});
    const std::vector<float> rows =
        random_floats(rng, static_cast<size_t>(step.num_rows() * row_stride), -2, 2);
    const std::vector<float> weight =
        random_floats(rng, static_cast<size_t>(channels * kernel), -1, 1);
    std::vector<float> state =
        random_floats(rng, static_cast<size_t>(num_slots * channels * (kernel - 1)), -2, 2);
    DeviceBuffer rows_device = to_device(rows);
    DeviceBuffer weight_device = to_device(weight);
    DeviceBuffer state_device = to_device(state);
    DeviceBuffer out_device(static_cast<size_t>(step.num_rows() * channels) * sizeof(float));
    std::vector<float> out(static_cast<size_t>(step.num_rows() * channels));
    cpu::gdn_conv(rows.data(), row_stride, channels, weight.data(), kernel, step.host(),
                  state.data(), out.data());
    cuda::gdn_conv(rows_device.as<float>(), row_stride, channels, weight_device.as<float>(), kernel,
                   step.device(), state_device.as<float>(), out_device.as<float>());
    EXPECT_TRUE(same_bits(to_host<float>(out_device, out.size()), out)) << "kernel " << kernel;
    EXPECT_TRUE(same_bits(to_host<float>(state_device, state.size()), state))
        << "kernel " << kernel;
  }
}

TEST_F(CudaKernels, GdnGatesAreBitIdentical) {
  std::mt19937 rng(41);
  const int64_t num_rows = 37, num_heads = 64, row_stride = 200, a_col = 130, b_col = 3;
  std::vector<float> rows = random_floats(rng, static_cast<size_t>(num_rows * row_stride), -12, 25);
  const std::vector<float> a_log = random_floats(rng, num_heads, -3, 3);
  const std::vector<float> dt_bias = random_floats(rng, num_heads, -2, 2);
  std::vector<float> g(static_cast<size_t>(num_rows * num_heads)), beta(g.size());
  cpu::gdn_gates(rows.data(), row_stride, a_col, b_col, num_heads, a_log.data(), dt_bias.data(),
                 num_rows, g.data(), beta.data());
  DeviceBuffer rows_device = to_device(rows), a_log_device = to_device(a_log),
               dt_bias_device = to_device(dt_bias);
  DeviceBuffer g_device(g.size() * sizeof(float)), beta_device(g.size() * sizeof(float));
  cuda::gdn_gates(rows_device.as<float>(), row_stride, a_col, b_col, num_heads,
                  a_log_device.as<float>(), dt_bias_device.as<float>(), num_rows,
                  g_device.as<float>(), beta_device.as<float>());
  EXPECT_TRUE(same_bits(to_host<float>(g_device, g.size()), g));
  EXPECT_TRUE(same_bits(to_host<float>(beta_device, beta.size()), beta));
}

TEST_F(CudaKernels, GdnRecurrenceIsBitIdentical) {
  std::mt19937 rng(42);
  struct Shape {
    int64_t hk, hv, dk, dv;
  };
  // Odd sizes, Qwen3.5's per-rank heads (4 k-heads, 16 v-heads of 128), and more value
  // columns than threads in a block (300 > 256).
  for (const Shape shape : {Shape{3, 6, 20, 12}, Shape{4, 16, 128, 128}, Shape{1, 2, 33, 300}}) {
    const int64_t qkv_stride = 2 * shape.hk * shape.dk + shape.hv * shape.dv + 5;
    const int64_t num_slots = 3;
    const float q_scale = 1.0f / std::sqrt(static_cast<float>(shape.dk));
    const GdnStep step({{9, 1, 0}, {4, 2, 1}, {0, 0, 0}, {1, 0, 0}});
    const std::vector<float> qkv =
        random_floats(rng, static_cast<size_t>(step.num_rows() * qkv_stride), -1, 1);
    const std::vector<float> g =
        random_floats(rng, static_cast<size_t>(step.num_rows() * shape.hv), -2, 0);
    const std::vector<float> beta =
        random_floats(rng, static_cast<size_t>(step.num_rows() * shape.hv), 0, 1);
    std::vector<float> state =
        random_floats(rng, static_cast<size_t>(num_slots * shape.hv * shape.dk * shape.dv), -1, 1);
    DeviceBuffer qkv_device = to_device(qkv), g_device = to_device(g),
                 beta_device = to_device(beta), state_device = to_device(state);
    std::vector<float> out(static_cast<size_t>(step.num_rows() * shape.hv * shape.dv));
    DeviceBuffer out_device(out.size() * sizeof(float));
    cpu::gdn_recurrence(qkv.data(), qkv_stride, shape.hk, shape.hv, shape.dk, shape.dv, q_scale,
                        g.data(), beta.data(), step.host(), state.data(), out.data());
    cuda::gdn_recurrence(qkv_device.as<float>(), qkv_stride, shape.hk, shape.hv, shape.dk, shape.dv,
                         q_scale, g_device.as<float>(), beta_device.as<float>(), step.device(),
                         state_device.as<float>(), out_device.as<float>());
    EXPECT_TRUE(same_bits(to_host<float>(out_device, out.size()), out)) << "dk " << shape.dk;
    EXPECT_TRUE(same_bits(to_host<float>(state_device, state.size()), state)) << "dk " << shape.dk;
  }
}

TEST_F(CudaKernels, GdnGatedNormIsBitIdentical) {
  std::mt19937 rng(43);
  const int64_t num_rows = 9, num_heads = 16, head_dim = 128, z_stride = num_heads * head_dim + 9;
  const std::vector<float> x =
      random_floats(rng, static_cast<size_t>(num_rows * num_heads * head_dim), -3, 3);
  const std::vector<float> z = random_floats(rng, static_cast<size_t>(num_rows * z_stride), -6, 6);
  const std::vector<float> weight = random_floats(rng, head_dim, 0.5f, 1.5f);
  std::vector<float> expected(x.size());
  cpu::gdn_gated_norm(x.data(), z.data(), z_stride, weight.data(), 1e-6f, num_rows, num_heads,
                      head_dim, expected.data());
  DeviceBuffer x_device = to_device(x), z_device = to_device(z), weight_device = to_device(weight);
  // In place, as the layer uses it.
  cuda::gdn_gated_norm(x_device.as<float>(), z_device.as<float>(), z_stride,
                       weight_device.as<float>(), 1e-6f, num_rows, num_heads, head_dim,
                       x_device.as<float>());
  EXPECT_TRUE(same_bits(to_host<float>(x_device, x.size()), expected));
}

TEST_F(CudaKernels, SigmoidGateMulIsBitIdentical) {
  std::mt19937 rng(44);
  const int64_t num_rows = 7, width = 1031, gate_stride = 2 * width;
  std::vector<float> x = random_floats(rng, static_cast<size_t>(num_rows * width), -3, 3);
  std::vector<float> gate =
      random_floats(rng, static_cast<size_t>(num_rows * gate_stride), -100, 30);
  DeviceBuffer x_device = to_device(x), gate_device = to_device(gate);
  cpu::sigmoid_gate_mul(x.data(), num_rows, width, gate.data(), gate_stride);
  cuda::sigmoid_gate_mul(x_device.as<float>(), num_rows, width, gate_device.as<float>(),
                         gate_stride);
  EXPECT_TRUE(same_bits(to_host<float>(x_device, x.size()), x));
}

TEST_F(CudaKernels, CublasGemmWithinFp32Bound) {
  std::mt19937 rng(12);
  cuda::CublasGemm cublas;
  const int64_t m = 33, n = 50, k = 257;
  std::vector<float> x = random_floats(rng, static_cast<size_t>(m * k), -1, 1);
  DeviceBuffer x_device = to_device(x);
  for (DType dtype : kAllDtypes) {
    StoredWeights w = make_weights(dtype, random_floats(rng, static_cast<size_t>(n * k), -1, 1));
    std::vector<float> widened(static_cast<size_t>(n * k));
    cpu::to_f32(w.data(), dtype, n * k, widened.data());
    DeviceBuffer w_device = to_device(w);
    for (cuda::CublasInputs inputs :
         {cuda::CublasInputs::kWidenWeights, cuda::CublasInputs::kNarrowActivations}) {
      DeviceBuffer y_device(static_cast<size_t>(m * n) * sizeof(float));
      cublas.gemm(cuda::GemmArgs{x_device.as<float>(), k, w_device.data(), dtype, k,
                                 y_device.as<float>(), n, m, n, k},
                  inputs);
      const std::vector<float> y = to_host<float>(y_device, m * n);
      // Any order of fp32 sums: (k + 2) u sum |x w|; narrowed x adds its dtype's unit roundoff.
      const bool narrowed =
          inputs == cuda::CublasInputs::kNarrowActivations && dtype != DType::kF32;
      const double input_error = !narrowed ? 0.0 : dtype == DType::kBF16 ? 0x1p-8 : 0x1p-11;
      for (int64_t row = 0; row < m; ++row)
        for (int64_t col = 0; col < n; ++col) {
          double exact = 0.0, magnitude = 0.0;
          for (int64_t i = 0; i < k; ++i) {
            exact += double{x[row * k + i]} * widened[col * k + i];
            magnitude += std::abs(double{x[row * k + i]} * widened[col * k + i]);
          }
          ASSERT_NEAR(y[row * n + col], exact,
                      (input_error + (k + 2.0) * kUnitRoundoff) * magnitude)
              << dtype_name(dtype) << " row " << row << " col " << col;
        }
    }
  }
}

}  // namespace
}  // namespace keel
