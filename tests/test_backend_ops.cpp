// Every Backend op (runtime/backend/backend.h) on every backend present, against the shared math of
// kernels/math evaluated on the host, with random shapes from a fixed seed, including the odd
// ones: zero rows, one row, sizes that are not multiples of the 16-lane canonical chunk, empty
// experts, no local experts, top_k = E, ties, router replay, paged KV pools with out-of-order
// blocks.
//
// What is asserted: on the CPU backend every output equals the host reference bit for bit (the
// CPU backend is the bit-exact reference, so anything less would hide a divergence). On the CUDA
// backend (canonical GEMM) every output equals the CPU backend's bit for bit: that is the
// promise of kernels/math/README.md. Without a GPU the CUDA instances skip and say why.
//
// Ops whose bits go through exp (kernels/math/exp_math.h, the one exp both backends use):
//   silu_mul, moe_experts (silu between its GEMMs), route_top_k (softmax), attention (softmax),
//   moe_combine with a shared expert (sigmoid gate; cpu::sigmoid is math::sigmoid_f32).

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/base/dtype.h"
#include "kernels/cpu/gemm.h"
#include "kernels/math/gemm_math.h"
#include "kernels/math/moe_math.h"
#include "kernels/math/ops_math.h"
#include "runtime/backend/backend.h"

namespace keel {
namespace {

using math::PackedRoute;

// Array lengths from the int64_t shapes the Backend interface takes.
constexpr size_t to_size(int64_t value) {
  return static_cast<size_t>(value);
}

constexpr DType kAllDTypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// Deterministic values on every standard library: std::uniform_*_distribution is not specified
// bit for bit, the engine's raw output is.
class Rng {
 public:
  explicit Rng(uint32_t seed) : engine_(seed) {}
  // Uniform in [-scale, scale), 24 random bits.
  float uniform(float scale = 1.0f) {
    const float unit = static_cast<float>(engine_() >> 8) * (1.0f / 16777216.0f);
    return (2.0f * unit - 1.0f) * scale;
  }
  // Uniform integer in [0, bound).
  int32_t below(int64_t bound) { return static_cast<int32_t>(engine_() % uint64_t(bound)); }
  std::vector<float> floats(size_t count, float scale = 1.0f) {
    std::vector<float> values(count);
    for (float& value : values) value = uniform(scale);
    return values;
  }
  template <typename T>
  void shuffle(std::vector<T>& values) {
    for (size_t i = values.size(); i > 1; --i) std::swap(values[i - 1], values[to_size(below(i))]);
  }

 private:
  std::mt19937 engine_;
};

// A weight matrix in its storage dtype, generated in fp32 and rounded into that dtype.
struct HostWeights {
  DType dtype = DType::kF32;
  std::vector<uint8_t> bytes;
  const void* data() const { return bytes.data(); }
  size_t count() const { return bytes.size() / dtype_size(dtype); }
};

HostWeights make_weights(Rng& rng, DType dtype, size_t count, float scale) {
  HostWeights weights{dtype, std::vector<uint8_t>(count * dtype_size(dtype))};
  for (size_t i = 0; i < count; ++i) {
    const float value = rng.uniform(scale);
    if (dtype == DType::kF32) {
      std::memcpy(weights.bytes.data() + 4 * i, &value, 4);
    } else {
      const uint16_t stored = dtype == DType::kBF16 ? f32_to_bf16(value) : f32_to_f16(value);
      std::memcpy(weights.bytes.data() + 2 * i, &stored, 2);
    }
  }
  return weights;
}

// Row `row` of a [rows, row_length] weight matrix in its storage dtype.
const void* weight_row(const HostWeights& weights, int64_t row, int64_t row_length) {
  return weights.bytes.data() + to_size(row * row_length) * dtype_size(weights.dtype);
}

// --- device round trips ---

template <typename T>
DeviceArray upload(Backend& backend, const std::vector<T>& host) {
  DeviceArray array = backend.allocate_bytes(host.size() * sizeof(T));
  backend.copy_from_host(host.data(), host.size() * sizeof(T), array.data());
  return array;
}

DeviceArray upload(Backend& backend, const HostWeights& weights) {
  DeviceArray array = backend.allocate(weights.dtype, weights.count());
  backend.copy_from_host(weights.data(), weights.bytes.size(), array.data());
  return array;
}

template <typename T>
std::vector<T> download(Backend& backend, const DeviceArray& array, size_t count) {
  std::vector<T> host(count);
  backend.copy_to_host(array.data(), count * sizeof(T), host.data());
  return host;
}

// --- comparisons ---

std::string hex_bits(float value) {
  std::ostringstream out;
  out << std::setprecision(9) << value << " (0x" << std::hex << float_bits(value) << ")";
  return out.str();
}

// Bit equality of two fp32 arrays, reported as the number of differing elements and the first.
::testing::AssertionResult same_bits(const std::vector<float>& got,
                                     const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  size_t mismatches = 0;
  size_t first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (float_bits(got[i]) == float_bits(want[i])) continue;
    if (mismatches++ == 0) first = i;
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << mismatches << " of " << got.size() << " elements differ; first at " << first << ": got "
         << hex_bits(got[first]) << ", want " << hex_bits(want[first]);
}

// Declared before same_values so its template finds it (PackedRoute's own namespace has none).
bool operator==(const PackedRoute& a, const PackedRoute& b) {
  return a.token_idx == b.token_idx && a.slot_idx == b.slot_idx;
}
std::string describe(const PackedRoute& route) {
  return "{token " + std::to_string(route.token_idx) + ", slot " + std::to_string(route.slot_idx) +
         "}";
}
std::string describe(int32_t value) {
  return std::to_string(value);
}

template <typename T>
::testing::AssertionResult same_values(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i]))
      return ::testing::AssertionFailure() << "first difference at " << i << ": got "
                                           << describe(got[i]) << ", want " << describe(want[i]);
  return ::testing::AssertionSuccess();
}

// --- the fixture ---

// Runs on "cpu" always and on "cuda" where a device exists. No #ifdef is needed: without CUDA
// support keel_runtime links a stub whose cuda_device_count() is 0 with the reason.
// expected(run, reference) is what an op's output must equal: the host reference on the CPU
// backend, the CPU backend's own output on CUDA (the CPU instance checks that one against the
// reference).
class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    cpu_ = make_cpu_backend();
    if (GetParam() == "cpu") return;
    std::string reason;
    if (cuda_device_count(&reason) == 0)
      GTEST_SKIP() << "skipped: no CUDA device (" << reason << ")";
    cuda_ = make_cuda_backend(0, GpuGemm::kCanonical);
  }

  bool on_cuda() const { return cuda_ != nullptr; }
  Backend& backend() { return on_cuda() ? *cuda_ : *cpu_; }
  Backend& cpu_backend() { return *cpu_; }

  template <typename Run, typename Value>
  Value expected(Run&& run, const Value& reference) {
    return on_cuda() ? run(cpu_backend()) : reference;
  }

 private:
  std::unique_ptr<Backend> cpu_;
  std::unique_ptr<Backend> cuda_;
};

// The row counts every row-wise op is tried with: empty, one, and non-multiples of 16.
constexpr int64_t kRowCounts[] = {0, 1, 7, 33};

// The CPU GEMM has a scalar, an AVX2 and an AVX-512 path that must all be the canonical order;
// the CPU backend runs whichever is active, so the GEMM-based ops try every path this CPU has.
// (On CUDA only the active path runs: the CUDA result is compared with it.)
std::vector<cpu::Isa> isas_to_try(bool on_cuda) {
  if (on_cuda) return {cpu::detected_isa()};
  std::vector<cpu::Isa> isas;
  for (cpu::Isa isa : {cpu::Isa::kScalar, cpu::Isa::kAvx2, cpu::Isa::kAvx512})
    if (static_cast<int>(isa) <= static_cast<int>(cpu::detected_isa())) isas.push_back(isa);
  return isas;
}

// Restores the detected ISA however a test ends.
struct ActiveIsa {
  explicit ActiveIsa(cpu::Isa isa) { cpu::set_active_isa(isa); }
  ~ActiveIsa() { cpu::set_active_isa(cpu::detected_isa()); }
  ActiveIsa(const ActiveIsa&) = delete;
  ActiveIsa& operator=(const ActiveIsa&) = delete;
};

// --- allocation and copies ---

TEST_P(BackendOps, AllocateIsZeroFilledAndCopiesRoundTrip) {
  Backend& device = backend();
  EXPECT_EQ(device.device(), on_cuda() ? Device::kCuda : Device::kCpu);
  for (DType dtype : kAllDTypes) {
    DeviceArray array = device.allocate(dtype, 37);
    EXPECT_EQ(array.dtype(), dtype);
    EXPECT_EQ(array.nbytes(), 37 * dtype_size(dtype));
    EXPECT_EQ(array.device(), device.device());
    std::vector<uint8_t> bytes = download<uint8_t>(device, array, array.nbytes());
    EXPECT_TRUE(std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0; }));
  }
  EXPECT_TRUE(device.allocate_bytes(0).empty());
  Rng rng(1);
  std::vector<float> values = rng.floats(129);
  DeviceArray array = upload(device, values);
  EXPECT_EQ(array.nbytes(), values.size() * sizeof(float));
  EXPECT_TRUE(same_bits(download<float>(device, array, values.size()), values));
  // A zero-byte copy is legal in both directions and touches nothing.
  device.copy_from_host(values.data(), 0, array.data());
  std::vector<float> untouched(1, 42.0f);
  device.copy_to_host(array.data(), 0, untouched.data());
  EXPECT_EQ(untouched[0], 42.0f);
}

// --- embed ---

TEST_P(BackendOps, EmbedWidensTableRowsExactly) {
  Rng rng(2);
  const int64_t vocab = 50;
  for (DType dtype : kAllDTypes) {
    for (int64_t width : {1, 7, 70, 129}) {
      const HostWeights table = make_weights(rng, dtype, to_size(vocab * width), 2.0f);
      for (int64_t num_tokens : kRowCounts) {
        // The first and last ids and repeats.
        std::vector<int32_t> token_ids(to_size(num_tokens));
        for (auto& id : token_ids) id = rng.below(vocab);
        if (num_tokens > 2) {
          token_ids[0] = 0;
          token_ids[1] = int32_t(vocab - 1);
          token_ids[2] = 0;
        }
        std::vector<float> reference(to_size(num_tokens * width));
        for (int64_t token = 0; token < num_tokens; ++token)
          for (int64_t i = 0; i < width; ++i)
            reference[to_size(token * width + i)] =
                load_as_f32(table.data(), dtype, to_size(token_ids[to_size(token)] * width + i));
        auto run = [&](Backend& device) {
          DeviceArray table_d = upload(device, table), ids_d = upload(device, token_ids);
          DeviceArray out = device.allocate(DType::kF32, reference.size());
          device.embed(table_d.data(), dtype, vocab, width, ids_d.i32(), num_tokens, out.f32());
          return download<float>(device, out, reference.size());
        };
        EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
            << dtype_name(dtype) << " width " << width << " tokens " << num_tokens;
      }
    }
  }
}

// --- gemm ---

TEST_P(BackendOps, GemmIsTheCanonicalDotPerElement) {
  Rng rng(3);
  for (cpu::Isa isa : isas_to_try(on_cuda())) {
    const ActiveIsa active(isa);
    for (DType dtype : kAllDTypes) {
      for (int64_t k : {1, 16, 70, 129}) {
        for (int64_t n : {1, 5, 17}) {
          const HostWeights w = make_weights(rng, dtype, to_size(n * k), 1.0f);
          for (int64_t m : kRowCounts) {
            const std::vector<float> x = rng.floats(to_size(m * k), 2.0f);
            std::vector<float> reference(to_size(m * n));
            for (int64_t row = 0; row < m; ++row)
              for (int64_t col = 0; col < n; ++col)
                reference[to_size(row * n + col)] =
                    math::canonical_dot(x.data() + row * k, weight_row(w, col, k), dtype, k);
            auto run = [&](Backend& device) {
              DeviceArray x_d = upload(device, x), w_d = upload(device, w);
              DeviceArray y = device.allocate(DType::kF32, reference.size());
              device.gemm(x_d.f32(), w_d.data(), dtype, y.f32(), m, n, k);
              return download<float>(device, y, reference.size());
            };
            EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
                << cpu::isa_name(isa) << " " << dtype_name(dtype) << " m " << m << " n " << n
                << " k " << k;
          }
        }
      }
    }
  }
}

// A row's bits do not depend on how many other rows share the call (batch invariance): row 0 of
// a 33-row product equals the 1-row product of that row alone.
TEST_P(BackendOps, GemmRowBitsDoNotDependOnBatchSize) {
  Rng rng(4);
  const int64_t m = 33, n = 17, k = 129;
  const HostWeights w = make_weights(rng, DType::kBF16, to_size(n * k), 1.0f);
  const std::vector<float> x = rng.floats(to_size(m * k));
  Backend& device = backend();
  DeviceArray x_d = upload(device, x), w_d = upload(device, w);
  DeviceArray all = device.allocate(DType::kF32, to_size(m * n));
  DeviceArray one = device.allocate(DType::kF32, to_size(n));
  device.gemm(x_d.f32(), w_d.data(), DType::kBF16, all.f32(), m, n, k);
  device.gemm(x_d.f32(), w_d.data(), DType::kBF16, one.f32(), 1, n, k);
  std::vector<float> first_row = download<float>(device, all, to_size(n));
  EXPECT_TRUE(same_bits(first_row, download<float>(device, one, to_size(n))));
}

// --- rms_norm, head_norm, add_bias, add ---

TEST_P(BackendOps, RmsNormIsTheSequentialRowFormula) {
  Rng rng(5);
  const float eps = 1e-6f;
  for (int64_t width : {1, 7, 70, 129}) {
    const std::vector<float> weight = rng.floats(to_size(width), 1.5f);
    for (int64_t num_rows : kRowCounts) {
      const std::vector<float> x = rng.floats(to_size(num_rows * width), 3.0f);
      std::vector<float> reference(x.size());
      for (int64_t row = 0; row < num_rows; ++row)
        math::rms_norm_row(x.data() + row * width, weight.data(), eps, width,
                           reference.data() + row * width);
      for (bool in_place : {false, true}) {
        auto run = [&](Backend& device) {
          DeviceArray x_d = upload(device, x), weight_d = upload(device, weight);
          DeviceArray out = in_place ? DeviceArray() : device.allocate(DType::kF32, x.size());
          float* out_ptr = in_place ? x_d.f32() : out.f32();
          device.rms_norm(x_d.f32(), weight_d.f32(), eps, num_rows, width, out_ptr);
          return download<float>(device, in_place ? x_d : out, x.size());
        };
        EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
            << "width " << width << " rows " << num_rows << " in_place " << in_place;
      }
    }
  }
}

TEST_P(BackendOps, HeadNormNormalisesOnlyItsHeads) {
  Rng rng(6);
  const float eps = 1e-5f;
  for (int64_t head_dim : {8, 12, 64}) {
    for (int64_t num_heads : {1, 3}) {
      for (int64_t first_col : {int64_t{0}, 2 * head_dim + 5}) {
        // Columns before first_col and after the heads must keep their bits.
        const int64_t row_stride = first_col + num_heads * head_dim + 9;
        const std::vector<float> weight = rng.floats(to_size(head_dim), 1.5f);
        for (int64_t num_rows : kRowCounts) {
          const std::vector<float> rows = rng.floats(to_size(num_rows * row_stride), 3.0f);
          std::vector<float> reference = rows;
          for (int64_t row = 0; row < num_rows; ++row)
            for (int64_t head = 0; head < num_heads; ++head) {
              float* vec = reference.data() + row * row_stride + first_col + head * head_dim;
              math::rms_norm_row(vec, weight.data(), eps, head_dim, vec);
            }
          auto run = [&](Backend& device) {
            DeviceArray rows_d = upload(device, rows), weight_d = upload(device, weight);
            device.head_norm(rows_d.f32(), row_stride, first_col, num_heads, head_dim,
                             weight_d.f32(), eps, num_rows);
            return download<float>(device, rows_d, rows.size());
          };
          EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
              << "head_dim " << head_dim << " heads " << num_heads << " first_col " << first_col
              << " rows " << num_rows;
        }
      }
    }
  }
}

TEST_P(BackendOps, AddBiasAddsTheBiasToEveryRow) {
  Rng rng(7);
  for (int64_t width : {1, 7, 129}) {
    const std::vector<float> bias = rng.floats(to_size(width));
    for (int64_t num_rows : kRowCounts) {
      const std::vector<float> x = rng.floats(to_size(num_rows * width), 4.0f);
      std::vector<float> reference = x;
      for (int64_t row = 0; row < num_rows; ++row)
        for (int64_t i = 0; i < width; ++i)
          reference[to_size(row * width + i)] = x[to_size(row * width + i)] + bias[to_size(i)];
      auto run = [&](Backend& device) {
        DeviceArray x_d = upload(device, x), bias_d = upload(device, bias);
        device.add_bias(x_d.f32(), bias_d.f32(), num_rows, width);
        return download<float>(device, x_d, x.size());
      };
      EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
          << "width " << width << " rows " << num_rows;
    }
  }
}

TEST_P(BackendOps, AddIsElementwise) {
  Rng rng(8);
  for (int64_t count : {0, 1, 7, 1000}) {
    const std::vector<float> dst = rng.floats(to_size(count), 8.0f);
    const std::vector<float> src = rng.floats(to_size(count), 1.0f);
    std::vector<float> reference(dst.size());
    for (size_t i = 0; i < dst.size(); ++i) reference[i] = dst[i] + src[i];
    auto run = [&](Backend& device) {
      DeviceArray dst_d = upload(device, dst), src_d = upload(device, src);
      device.add(dst_d.f32(), src_d.f32(), count);
      return download<float>(device, dst_d, dst.size());
    };
    EXPECT_TRUE(same_bits(run(backend()), expected(run, reference))) << "count " << count;
  }
}

// --- rope ---

TEST_P(BackendOps, RopeRotatesQueryAndKeyHeadsAtEachPosition) {
  Rng rng(9);
  const int64_t head_dim = 16, num_q_heads = 3, num_k_heads = 2, max_positions = 300;
  const int64_t k_col = num_q_heads * head_dim;
  // V heads and 3 spare columns follow the K heads; RoPE must leave them alone.
  const int64_t row_stride = k_col + 2 * num_k_heads * head_dim + 3;
  for (double theta : {10000.0, 1000000.0}) {
    for (int64_t rotary_dim : {16, 8}) {  // full and partial rotary
      for (int64_t num_rows : kRowCounts) {
        const std::vector<float> rows = rng.floats(to_size(num_rows * row_stride), 2.0f);
        std::vector<int32_t> positions(to_size(num_rows));
        for (auto& position : positions) position = rng.below(max_positions);
        if (num_rows > 1) {
          positions[0] = 0;
          positions[1] = int32_t(max_positions - 1);
        }
        std::vector<float> reference = rows;
        std::vector<float> cos_sin(to_size(rotary_dim));
        const int64_t half = rotary_dim / 2;
        for (int64_t row = 0; row < num_rows; ++row) {
          math::rope_cos_sin_row(positions[to_size(row)], static_cast<float>(theta), rotary_dim,
                                 cos_sin.data());
          auto rotate = [&](int64_t first_col, int64_t num_heads) {
            for (int64_t head = 0; head < num_heads; ++head) {
              float* vec = reference.data() + row * row_stride + first_col + head * head_dim;
              for (int64_t i = 0; i < half; ++i)
                math::rope_rotate_pair(vec[i], vec[half + i], cos_sin[to_size(i)],
                                       cos_sin[to_size(half + i)]);
            }
          };
          rotate(0, num_q_heads);
          rotate(k_col, num_k_heads);
        }
        auto run = [&](Backend& device) {
          DeviceArray rows_d = upload(device, rows), positions_d = upload(device, positions);
          device.rope(rows_d.f32(), row_stride, num_q_heads, k_col, num_k_heads, head_dim,
                      rotary_dim, theta, positions_d.i32(), num_rows, max_positions);
          return download<float>(device, rows_d, rows.size());
        };
        EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
            << "theta " << theta << " rotary_dim " << rotary_dim << " rows " << num_rows;
      }
    }
  }
}

// --- paged KV: kv_append and attention ---

// A paged pool of two layers for three sequences whose block tables are a shuffled set of the
// pool's blocks (out of order, with spare blocks no one owns), filled with random values.
struct PagedPool {
  int64_t num_layers = 2, kv_heads = 2, head_dim = 8, num_seqs = 3;
  int64_t block_size = 1, max_blocks_per_seq = 0, num_blocks = 0;
  std::vector<int32_t> block_tables;  // [num_seqs][max_blocks_per_seq]
  std::vector<float> k, v;

  PagedPool(Rng& rng, int64_t block_size_in, int64_t min_capacity) : block_size(block_size_in) {
    max_blocks_per_seq = (min_capacity + block_size - 1) / block_size;
    num_blocks = num_seqs * max_blocks_per_seq + 3;
    std::vector<int32_t> block_ids(to_size(num_blocks));
    std::iota(block_ids.begin(), block_ids.end(), 0);
    rng.shuffle(block_ids);
    block_tables.assign(block_ids.begin(), block_ids.begin() + num_seqs * max_blocks_per_seq);
    const size_t floats = to_size(num_layers * num_blocks * kv_heads * block_size * head_dim);
    k = rng.floats(floats);
    v = rng.floats(floats);
  }
  int64_t capacity() const { return max_blocks_per_seq * block_size; }
  // The documented layout [layer][block][kv_head][block_size][head_dim], restated: the offset
  // of (layer, kv_head, position) of sequence `seq`.
  size_t offset(int64_t layer, int64_t seq, int64_t kv_head, int64_t position) const {
    const int64_t block_id =
        block_tables[to_size(seq * max_blocks_per_seq + position / block_size)];
    return to_size((((layer * num_blocks + block_id) * kv_heads + kv_head) * block_size +
                    position % block_size) *
                   head_dim);
  }
};

// Device copies of a pool and its view.
struct DevicePool {
  DeviceArray k, v, block_tables;
  Backend::KvPoolView view;
  DevicePool(Backend& device, const PagedPool& pool)
      : k(upload(device, pool.k)),
        v(upload(device, pool.v)),
        block_tables(upload(device, pool.block_tables)) {
    view = Backend::KvPoolView{
        k.f32(),         v.f32(),       pool.num_layers,    pool.num_blocks,        pool.kv_heads,
        pool.block_size, pool.head_dim, block_tables.i32(), pool.max_blocks_per_seq};
  }
};

// num_rows tokens at distinct (sequence, position) pairs, including position 0 and the last
// position of the capacity where there are enough rows.
void random_tokens(Rng& rng, const PagedPool& pool, int64_t num_rows,
                   std::vector<int32_t>& positions, std::vector<int32_t>& cache_idx) {
  positions.clear();
  cache_idx.clear();
  while (int64_t(positions.size()) < num_rows) {
    const int32_t seq = rng.below(pool.num_seqs);
    int32_t position = rng.below(pool.capacity());
    if (positions.size() == 0) position = 0;
    if (positions.size() == 1) position = int32_t(pool.capacity() - 1);
    bool taken = false;
    for (size_t i = 0; i < positions.size(); ++i)
      taken |= positions[i] == position && cache_idx[i] == seq;
    if (taken) continue;
    positions.push_back(position);
    cache_idx.push_back(seq);
  }
}

TEST_P(BackendOps, KvAppendWritesEachRowAtItsPagedSlot) {
  Rng rng(10);
  for (int64_t block_size : {1, 4, 16}) {
    const PagedPool pool(rng, block_size, 40);
    const int64_t kv_width = pool.kv_heads * pool.head_dim;
    const int64_t k_col = 3 * pool.head_dim + 1, v_col = k_col + kv_width;  // q heads first
    const int64_t row_stride = v_col + kv_width + 2;
    for (int64_t num_rows : {0, 1, 7, 33}) {
      for (int64_t layer_idx : {0, 1}) {
        std::vector<int32_t> positions, cache_idx;
        random_tokens(rng, pool, num_rows, positions, cache_idx);
        const std::vector<float> rows = rng.floats(to_size(num_rows * row_stride));
        std::vector<float> k_reference = pool.k, v_reference = pool.v;
        for (int64_t row = 0; row < num_rows; ++row)
          for (int64_t kv_head = 0; kv_head < pool.kv_heads; ++kv_head) {
            const size_t at =
                pool.offset(layer_idx, cache_idx[to_size(row)], kv_head, positions[to_size(row)]);
            const float* source = rows.data() + row * row_stride + kv_head * pool.head_dim;
            std::copy_n(source + k_col, pool.head_dim, k_reference.begin() + ptrdiff_t(at));
            std::copy_n(source + v_col, pool.head_dim, v_reference.begin() + ptrdiff_t(at));
          }
        // The whole pool comes back: nothing outside the written slots may change.
        std::vector<float> reference = k_reference;
        reference.insert(reference.end(), v_reference.begin(), v_reference.end());
        auto run = [&](Backend& device) {
          DevicePool pool_d(device, pool);
          DeviceArray rows_d = upload(device, rows), positions_d = upload(device, positions),
                      cache_idx_d = upload(device, cache_idx);
          device.kv_append(rows_d.f32(), row_stride, k_col, v_col, positions_d.i32(),
                           cache_idx_d.i32(), num_rows, layer_idx, pool_d.view);
          std::vector<float> out = download<float>(device, pool_d.k, pool.k.size());
          std::vector<float> v_out = download<float>(device, pool_d.v, pool.v.size());
          out.insert(out.end(), v_out.begin(), v_out.end());
          return out;
        };
        EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
            << "block_size " << block_size << " rows " << num_rows << " layer " << layer_idx;
      }
    }
  }
}

// The reference gathers each sequence's rows contiguously and runs math::attention_head: the
// paged kernel must add the same rows in the same order wherever the blocks live.
TEST_P(BackendOps, AttentionOverPagedPoolEqualsContiguousAttention) {
  Rng rng(11);
  const int64_t num_q_heads = 4;
  const std::vector<int32_t> kv_head_of_q = {0, 0, 1, 1};  // grouped-query attention
  for (int64_t block_size : {1, 4, 16}) {
    const PagedPool pool(rng, block_size, 40);
    const int64_t head_dim = pool.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const int64_t row_stride = (num_q_heads + 2 * pool.kv_heads) * head_dim + 3;
    for (int64_t num_rows : {0, 1, 7, 20}) {
      const int64_t layer_idx = 1;
      std::vector<int32_t> positions, cache_idx;
      random_tokens(rng, pool, num_rows, positions, cache_idx);
      const std::vector<float> rows = rng.floats(to_size(num_rows * row_stride), 2.0f);
      std::vector<float> reference(to_size(num_rows * num_q_heads * head_dim));
      for (int64_t row = 0; row < num_rows; ++row) {
        const int64_t num_positions = positions[to_size(row)] + 1;
        for (int64_t head = 0; head < num_q_heads; ++head) {
          const int64_t kv_head = kv_head_of_q[to_size(head)];
          std::vector<float> k_rows, v_rows, scores(to_size(num_positions));
          for (int64_t position = 0; position < num_positions; ++position) {
            const size_t at = pool.offset(layer_idx, cache_idx[to_size(row)], kv_head, position);
            k_rows.insert(k_rows.end(), pool.k.begin() + ptrdiff_t(at),
                          pool.k.begin() + ptrdiff_t(at) + head_dim);
            v_rows.insert(v_rows.end(), pool.v.begin() + ptrdiff_t(at),
                          pool.v.begin() + ptrdiff_t(at) + head_dim);
          }
          math::attention_head(rows.data() + row * row_stride + head * head_dim, k_rows.data(),
                               v_rows.data(), head_dim, num_positions, scale, scores.data(),
                               reference.data() + (row * num_q_heads + head) * head_dim);
        }
      }
      auto run = [&](Backend& device) {
        DevicePool pool_d(device, pool);
        DeviceArray rows_d = upload(device, rows), positions_d = upload(device, positions),
                    cache_idx_d = upload(device, cache_idx),
                    kv_head_d = upload(device, kv_head_of_q);
        DeviceArray out = device.allocate(DType::kF32, reference.size());
        device.attention(rows_d.f32(), row_stride, num_q_heads, kv_head_d.i32(), positions_d.i32(),
                         cache_idx_d.i32(), num_rows, layer_idx, pool_d.view, scale, out.f32());
        return download<float>(device, out, reference.size());
      };
      EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
          << "block_size " << block_size << " rows " << num_rows;
    }
  }
}

// --- route_top_k ---

struct RouteOutputs {
  std::vector<int32_t> expert_ids;
  std::vector<float> expert_weights, margins;
};

TEST_P(BackendOps, RouteTopKIsTheMathRouterPerRow) {
  Rng rng(12);
  struct Case {
    int64_t num_experts, top_k;
  };
  for (Case shape : {Case{1, 1}, Case{4, 1}, Case{8, 2}, Case{8, 8}, Case{60, 4}, Case{128, 8}}) {
    const int64_t num_experts = shape.num_experts, top_k = shape.top_k;
    for (int64_t num_rows : kRowCounts) {
      std::vector<float> logits = rng.floats(to_size(num_rows * num_experts), 4.0f);
      // Ties: row 1 all equal (the lowest ids win), row 2 with pairs of equal logits.
      if (num_rows > 1) std::fill_n(logits.begin() + num_experts, num_experts, 0.5f);
      if (num_rows > 2)
        for (int64_t expert = 1; expert < num_experts; expert += 2)
          logits[to_size(2 * num_experts + expert)] = logits[to_size(2 * num_experts + expert - 1)];
      for (bool normalize : {false, true}) {
        for (bool replay : {false, true}) {
          // Router replay: a random selection of distinct ids per row, in random slot order.
          std::vector<int32_t> forced;
          for (int64_t row = 0; replay && row < num_rows; ++row) {
            std::vector<int32_t> ids(to_size(num_experts));
            std::iota(ids.begin(), ids.end(), 0);
            rng.shuffle(ids);
            forced.insert(forced.end(), ids.begin(), ids.begin() + top_k);
          }
          RouteOutputs reference{std::vector<int32_t>(to_size(num_rows * top_k)),
                                 std::vector<float>(to_size(num_rows * top_k)),
                                 std::vector<float>(to_size(num_rows))};
          std::vector<float> probs(to_size(num_experts));
          for (int64_t row = 0; row < num_rows; ++row)
            reference.margins[to_size(row)] = math::route_top_k_token(
                logits.data() + row * num_experts, num_experts, top_k, normalize, probs.data(),
                reference.expert_ids.data() + row * top_k,
                reference.expert_weights.data() + row * top_k,
                replay ? forced.data() + row * top_k : nullptr);
          auto run = [&](Backend& device) {
            DeviceArray logits_d = upload(device, logits), forced_d = upload(device, forced);
            DeviceArray ids = device.allocate_bytes(to_size(num_rows * top_k) * sizeof(int32_t));
            DeviceArray weights = device.allocate(DType::kF32, to_size(num_rows * top_k));
            DeviceArray margins = device.allocate(DType::kF32, to_size(num_rows));
            device.route_top_k(logits_d.f32(), num_rows, num_experts, top_k, normalize, ids.i32(),
                               weights.f32(), margins.f32(), replay ? forced_d.i32() : nullptr);
            return RouteOutputs{download<int32_t>(device, ids, to_size(num_rows * top_k)),
                                download<float>(device, weights, to_size(num_rows * top_k)),
                                download<float>(device, margins, to_size(num_rows))};
          };
          const RouteOutputs got = run(backend());
          const RouteOutputs want = expected(run, reference);
          const std::string label = "E " + std::to_string(num_experts) + " top_k " +
                                    std::to_string(top_k) + " rows " + std::to_string(num_rows) +
                                    " normalize " + std::to_string(normalize) + " replay " +
                                    std::to_string(replay);
          EXPECT_TRUE(same_values(got.expert_ids, want.expert_ids)) << label;
          EXPECT_TRUE(same_bits(got.expert_weights, want.expert_weights)) << label;
          EXPECT_TRUE(same_bits(got.margins, want.margins)) << label;
          if (replay) {
            EXPECT_TRUE(same_values(got.expert_ids, forced)) << label;
          }
        }
      }
      // The documented tie rule, checked on the reference itself: all-equal logits pick ids
      // 0 .. top_k-1 in order.
      if (num_rows > 1) {
        std::vector<int32_t> ids(to_size(top_k)), lowest(to_size(top_k));
        std::vector<float> weights(to_size(top_k)), probs(to_size(num_experts));
        math::route_top_k_token(logits.data() + num_experts, num_experts, top_k, false,
                                probs.data(), ids.data(), weights.data());
        std::iota(lowest.begin(), lowest.end(), 0);
        EXPECT_EQ(ids, lowest);
      }
    }
  }
}

// --- permute_rows ---

TEST_P(BackendOps, PermuteRowsSelectsRowsAndWritesNothingElse) {
  Rng rng(13);
  const int64_t num_src_rows = 9;
  for (int64_t width : {1, 33}) {
    const std::vector<float> src = rng.floats(to_size(num_src_rows * width));
    for (int64_t num_rows : {0, 1, 7, 20}) {
      std::vector<PackedRoute> routes(to_size(num_rows));
      for (auto& route : routes) route = PackedRoute{rng.below(num_src_rows), rng.below(4)};
      // Two spare destination rows that must keep their sentinel bits.
      const std::vector<float> dst(to_size((num_rows + 2) * width), -7.0f);
      std::vector<float> reference = dst;
      for (int64_t row = 0; row < num_rows; ++row)
        std::copy_n(src.begin() + routes[to_size(row)].token_idx * width, width,
                    reference.begin() + row * width);
      auto run = [&](Backend& device) {
        DeviceArray src_d = upload(device, src), routes_d = upload(device, routes),
                    dst_d = upload(device, dst);
        device.permute_rows(src_d.f32(), static_cast<const PackedRoute*>(routes_d.data()), num_rows,
                            width, dst_d.f32());
        return download<float>(device, dst_d, dst.size());
      };
      EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
          << "width " << width << " rows " << num_rows;
    }
  }
}

// --- the MoE dispatch: moe_pack, moe_gather, moe_experts, moe_combine ---

// One routing scenario of one MoE layer on one rank.
struct Routing {
  std::string name;
  int64_t num_tokens = 0, top_k = 0, num_experts = 0;
  std::vector<int32_t> expert_ids;       // [num_tokens, top_k], distinct per token
  std::vector<int32_t> expert_to_local;  // [num_experts], -1 off this rank
  int64_t num_local() const {
    return std::count_if(expert_to_local.begin(), expert_to_local.end(),
                         [](int32_t local) { return local >= 0; });
  }
};

// The pack's definition (kernels/math/moe_math.h), restated: local experts in order, each
// holding its (token, slot) pairs in increasing pair order.
struct Packing {
  std::vector<int32_t> offsets, slot_rows;
  std::vector<PackedRoute> routes;
};

Packing reference_pack(const Routing& routing) {
  const int64_t num_pairs = routing.num_tokens * routing.top_k;
  Packing packing;
  packing.offsets.push_back(0);
  packing.slot_rows.assign(to_size(num_pairs), -1);
  for (int64_t local = 0; local < routing.num_local(); ++local) {
    for (int64_t pair = 0; pair < num_pairs; ++pair) {
      if (routing.expert_to_local[to_size(routing.expert_ids[to_size(pair)])] != local) continue;
      packing.slot_rows[to_size(pair)] = int32_t(packing.routes.size());
      packing.routes.push_back(
          PackedRoute{int32_t(pair / routing.top_k), int32_t(pair % routing.top_k)});
    }
    packing.offsets.push_back(int32_t(packing.routes.size()));
  }
  return packing;
}

// Each token's top_k distinct experts drawn from `candidates` (at least top_k of them).
std::vector<int32_t> random_choices(Rng& rng, int64_t num_tokens, int64_t top_k,
                                    std::vector<int32_t> candidates) {
  std::vector<int32_t> expert_ids;
  for (int64_t token = 0; token < num_tokens; ++token) {
    rng.shuffle(candidates);
    expert_ids.insert(expert_ids.end(), candidates.begin(), candidates.begin() + top_k);
  }
  return expert_ids;
}

std::vector<Routing> routing_scenarios(Rng& rng) {
  const int64_t num_experts = 8, top_k = 2;
  // Local experts 1, 3, 4, 6 on this rank (local indices 0..3), the others elsewhere.
  const std::vector<int32_t> some_local = {-1, 0, -1, 1, 2, -1, 3, -1};
  const std::vector<int32_t> all_experts = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<Routing> scenarios;
  for (int64_t num_tokens : {0, 1, 7, 33})
    scenarios.push_back({"random/" + std::to_string(num_tokens), num_tokens, top_k, num_experts,
                         random_choices(rng, num_tokens, top_k, all_experts), some_local});
  // Local experts 3 and 6 never chosen: two empty experts between non-empty ones.
  scenarios.push_back({"empty_experts", 19, top_k, num_experts,
                       random_choices(rng, 19, top_k, {0, 1, 2, 4, 5, 7}), some_local});
  // Every token sends one slot to local expert 4 (in a random slot), the other elsewhere.
  {
    Routing all_on_one{"all_on_one_expert", 17, top_k, num_experts, {}, some_local};
    for (int64_t token = 0; token < all_on_one.num_tokens; ++token) {
      const int32_t other = std::vector<int32_t>{0, 2, 5, 7}[to_size(rng.below(4))];
      if (rng.below(2) == 0) {
        all_on_one.expert_ids.insert(all_on_one.expert_ids.end(), {4, other});
      } else {
        all_on_one.expert_ids.insert(all_on_one.expert_ids.end(), {other, 4});
      }
    }
    scenarios.push_back(all_on_one);
  }
  scenarios.push_back({"no_local_experts", 7, top_k, num_experts,
                       random_choices(rng, 7, top_k, all_experts),
                       std::vector<int32_t>(to_size(num_experts), -1)});
  // All experts local, in a permuted local order, and top_k = E.
  scenarios.push_back(
      {"all_local_top_k_E", 11, 4, 4, random_choices(rng, 11, 4, {0, 1, 2, 3}), {2, 0, 3, 1}});
  return scenarios;
}

TEST_P(BackendOps, MoePackIsTheStableCountingSort) {
  Rng rng(14);
  for (const Routing& routing : routing_scenarios(rng)) {
    const Packing reference = reference_pack(routing);
    const int64_t num_pairs = routing.num_tokens * routing.top_k;
    const int64_t num_local = routing.num_local();
    auto run = [&](Backend& device) {
      DeviceArray ids_d = upload(device, routing.expert_ids),
                  to_local_d = upload(device, routing.expert_to_local);
      // Junk first: every output element the pack defines must be written.
      DeviceArray offsets = upload(device, std::vector<int32_t>(to_size(num_local + 1), 12345));
      DeviceArray routes = upload(device, std::vector<PackedRoute>(to_size(num_pairs), {-7, -7}));
      DeviceArray slot_rows = upload(device, std::vector<int32_t>(to_size(num_pairs), 999));
      device.moe_pack(ids_d.i32(), routing.num_tokens, routing.top_k, to_local_d.i32(),
                      routing.num_experts, num_local, offsets.i32(),
                      static_cast<PackedRoute*>(routes.data()), slot_rows.i32());
      Packing packing;
      packing.offsets = download<int32_t>(device, offsets, to_size(num_local + 1));
      // Rows past offsets[num_local] are capacity, not output.
      packing.routes = download<PackedRoute>(device, routes, to_size(packing.offsets.back()));
      packing.slot_rows = download<int32_t>(device, slot_rows, to_size(num_pairs));
      return packing;
    };
    const Packing got = run(backend());
    const Packing want = expected(run, reference);
    EXPECT_TRUE(same_values(got.offsets, want.offsets)) << routing.name;
    EXPECT_TRUE(same_values(got.routes, want.routes)) << routing.name;
    EXPECT_TRUE(same_values(got.slot_rows, want.slot_rows)) << routing.name;
  }
}

// Device copies of a reference packing and the dispatch that points at them.
struct DeviceDispatch {
  DeviceArray offsets, routes, slot_rows;
  Backend::MoeDispatch dispatch;
  DeviceDispatch(Backend& device, const Routing& routing, const Packing& packing)
      : offsets(upload(device, packing.offsets)),
        routes(upload(device, packing.routes)),
        slot_rows(upload(device, packing.slot_rows)) {
    dispatch.offsets = offsets.i32();
    dispatch.routes = static_cast<const PackedRoute*>(routes.data());
    dispatch.slot_rows = slot_rows.i32();
    dispatch.num_local = routing.num_local();
    dispatch.num_tokens = routing.num_tokens;
    dispatch.top_k = routing.top_k;
  }
};

TEST_P(BackendOps, MoeGatherCopiesEachPackedRowsToken) {
  Rng rng(15);
  for (const Routing& routing : routing_scenarios(rng)) {
    for (int64_t width : {1, 70}) {
      const Packing packing = reference_pack(routing);
      const std::vector<float> x = rng.floats(to_size(routing.num_tokens * width));
      const size_t packed_rows = packing.routes.size();
      std::vector<float> reference(packed_rows * to_size(width));
      for (size_t row = 0; row < packed_rows; ++row)
        std::copy_n(x.begin() + packing.routes[row].token_idx * width, width,
                    reference.begin() + ptrdiff_t(row) * width);
      auto run = [&](Backend& device) {
        DeviceDispatch dispatch(device, routing, packing);
        DeviceArray x_d = upload(device, x);
        DeviceArray expert_in = device.allocate(
            DType::kF32, to_size(std::max<int64_t>(dispatch.dispatch.max_rows(), 1) * width));
        device.moe_gather(x_d.f32(), width, dispatch.dispatch, expert_in.f32());
        return download<float>(device, expert_in, reference.size());
      };
      EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
          << routing.name << " width " << width;
    }
  }
}

// The local experts' weights on one device, and the pointer tables the ExpertTable names
// (built as runtime/model.cpp's pointer_table does: host pointers to device arrays, uploaded).
struct DeviceExperts {
  std::vector<DeviceArray> gate_up, down;
  DeviceArray gate_up_table, down_table;
  Backend::ExpertTable table;
  DeviceExperts(Backend& device, const std::vector<HostWeights>& gate_up_host,
                const std::vector<HostWeights>& down_host, DType dtype, int64_t hidden,
                int64_t inter) {
    std::vector<const void*> gate_up_pointers, down_pointers;
    for (size_t local = 0; local < gate_up_host.size(); ++local) {
      gate_up.push_back(upload(device, gate_up_host[local]));
      down.push_back(upload(device, down_host[local]));
      gate_up_pointers.push_back(gate_up.back().data());
      down_pointers.push_back(down.back().data());
    }
    gate_up_table = upload(device, gate_up_pointers);
    down_table = upload(device, down_pointers);
    table.gate_up = static_cast<const void* const*>(gate_up_table.data());
    table.down = static_cast<const void* const*>(down_table.data());
    table.dtype = dtype;
    table.hidden = hidden;
    table.inter = inter;
  }
};

struct ExpertRun {
  std::vector<float> expert_out;
  std::vector<double> seconds, start_s;
};

TEST_P(BackendOps, MoeExpertsRunEachExpertsFfnOverItsRows) {
  Rng rng(16);
  struct Dims {
    int64_t hidden, inter;
  };
  const std::vector<Routing> scenarios = routing_scenarios(rng);
  for (cpu::Isa isa : isas_to_try(on_cuda())) {
    const ActiveIsa active(isa);
    for (DType dtype : kAllDTypes) {
      for (Dims dims : {Dims{70, 19}, Dims{16, 33}}) {
        const int64_t hidden = dims.hidden, inter = dims.inter;
        for (const Routing& routing : scenarios) {
          const int64_t num_local = routing.num_local();
          const Packing packing = reference_pack(routing);
          std::vector<HostWeights> gate_up, down;
          for (int64_t local = 0; local < num_local; ++local) {
            gate_up.push_back(make_weights(rng, dtype, to_size(2 * inter * hidden), 0.3f));
            down.push_back(make_weights(rng, dtype, to_size(hidden * inter), 0.3f));
          }
          const size_t packed_rows = packing.routes.size();
          const std::vector<float> expert_in = rng.floats(packed_rows * to_size(hidden), 2.0f);
          // Reference: per local expert and packed row, canonical dots for gate_up, the math
          // silu_mul, canonical dots for down.
          std::vector<float> reference(packed_rows * to_size(hidden));
          std::vector<float> mid(to_size(2 * inter)), act(to_size(inter));
          for (int64_t local = 0; local < num_local; ++local) {
            const HostWeights& gu = gate_up[to_size(local)];
            const HostWeights& dn = down[to_size(local)];
            for (int64_t row = packing.offsets[to_size(local)];
                 row < packing.offsets[to_size(local + 1)]; ++row) {
              const float* in_row = expert_in.data() + row * hidden;
              for (int64_t j = 0; j < 2 * inter; ++j)
                mid[to_size(j)] =
                    math::canonical_dot(in_row, weight_row(gu, j, hidden), dtype, hidden);
              for (int64_t i = 0; i < inter; ++i)
                act[to_size(i)] = math::silu_mul(mid[to_size(i)], mid[to_size(inter + i)]);
              for (int64_t h = 0; h < hidden; ++h)
                reference[to_size(row * hidden + h)] =
                    math::canonical_dot(act.data(), weight_row(dn, h, inter), dtype, inter);
            }
          }
          auto run_with = [&](Backend& device, bool timed) {
            DeviceDispatch dispatch(device, routing, packing);
            DeviceExperts experts(device, gate_up, down, dtype, hidden, inter);
            const size_t max_rows = to_size(std::max<int64_t>(dispatch.dispatch.max_rows(), 1));
            std::vector<float> padded_in = expert_in;
            padded_in.resize(max_rows * to_size(hidden));
            DeviceArray in_d = upload(device, padded_in);
            DeviceArray mid_d = device.allocate(DType::kF32, max_rows * to_size(2 * inter));
            DeviceArray act_d = device.allocate(DType::kF32, max_rows * to_size(inter));
            DeviceArray out_d = device.allocate(DType::kF32, max_rows * to_size(hidden));
            // -1 marks "not written": every expert's entry must be set, 0 for empty ones.
            ExpertRun result{{},
                             std::vector<double>(to_size(num_local), -1.0),
                             std::vector<double>(to_size(num_local), -1.0)};
            const Backend::ExpertTimes times{result.seconds.data(), result.start_s.data()};
            device.moe_experts(in_d.f32(), dispatch.dispatch, experts.table, mid_d.f32(),
                               act_d.f32(), out_d.f32(), timed ? &times : nullptr);
            result.expert_out = download<float>(device, out_d, reference.size());
            return result;
          };
          auto run = [&](Backend& device) { return run_with(device, false).expert_out; };
          const std::string label =
              std::string(cpu::isa_name(isa)) + " " + std::string(dtype_name(dtype)) + " hidden " +
              std::to_string(hidden) + " inter " + std::to_string(inter) + " " + routing.name;
          const std::vector<float> want = expected(run, reference);
          EXPECT_TRUE(same_bits(run(backend()), want)) << label;
          // Timing changes how the experts are launched, never their bits.
          const ExpertRun timed = run_with(backend(), true);
          EXPECT_TRUE(same_bits(timed.expert_out, want)) << label << " timed";
          for (int64_t local = 0; local < num_local; ++local) {
            const bool has_rows =
                packing.offsets[to_size(local + 1)] > packing.offsets[to_size(local)];
            if (has_rows) {
              EXPECT_GT(timed.seconds[to_size(local)], 0.0) << label << " local " << local;
              EXPECT_GT(timed.start_s[to_size(local)], 0.0) << label << " local " << local;
            } else {
              EXPECT_EQ(timed.seconds[to_size(local)], 0.0) << label << " local " << local;
              EXPECT_EQ(timed.start_s[to_size(local)], 0.0) << label << " local " << local;
            }
          }
        }
      }
    }
  }
}

TEST_P(BackendOps, SiluMulIsTheMathActivation) {
  Rng rng(17);
  for (int64_t width : {1, 7, 129}) {
    for (int64_t num_rows : kRowCounts) {
      std::vector<float> gate_up = rng.floats(to_size(num_rows * 2 * width), 6.0f);
      // Saturating gates (exp overflows to inf, or underflows to 0) and signed zeros.
      const float extremes[] = {-100.0f, 100.0f, -0.0f, 0.0f, -88.5f, 89.0f};
      for (size_t i = 0; i < std::size(extremes) && i < gate_up.size() / 2; ++i)
        gate_up[i] = extremes[i];
      std::vector<float> reference(to_size(num_rows * width));
      for (int64_t row = 0; row < num_rows; ++row)
        for (int64_t i = 0; i < width; ++i)
          reference[to_size(row * width + i)] = math::silu_mul(
              gate_up[to_size(row * 2 * width + i)], gate_up[to_size(row * 2 * width + width + i)]);
      auto run = [&](Backend& device) {
        DeviceArray gate_up_d = upload(device, gate_up);
        DeviceArray out = device.allocate(DType::kF32, reference.size());
        device.silu_mul(gate_up_d.f32(), num_rows, width, out.f32());
        return download<float>(device, out, reference.size());
      };
      EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
          << "width " << width << " rows " << num_rows;
    }
  }
}

TEST_P(BackendOps, MoeCombineIsTheCanonicalSlotOrderSum) {
  Rng rng(18);
  const std::vector<Routing> scenarios = routing_scenarios(rng);
  for (const Routing& routing : scenarios) {
    const Packing packing = reference_pack(routing);
    const int64_t num_tokens = routing.num_tokens, top_k = routing.top_k;
    for (int64_t width : {1, 70}) {
      const size_t packed_rows = packing.routes.size();
      const std::vector<float> expert_out = rng.floats(packed_rows * to_size(width), 3.0f);
      const std::vector<float> weights = rng.floats(to_size(num_tokens * top_k));
      const std::vector<float> shared = rng.floats(to_size(num_tokens * width), 2.0f);
      const std::vector<float> gate_logits = rng.floats(to_size(num_tokens), 5.0f);
      for (DType round_dtype : kAllDTypes) {
        for (bool with_shared : {false, true}) {
          const math::CombinePrecisionArgs precision{round_dtype != DType::kF32, round_dtype};
          std::vector<float> reference(to_size(num_tokens * width));
          for (int64_t token = 0; token < num_tokens; ++token) {
            for (int64_t i = 0; i < width; ++i) {
              float acc = math::combine_element(top_k, weights.data() + token * top_k,
                                                packing.slot_rows.data() + token * top_k,
                                                expert_out.data(), width, i, precision);
              if (with_shared)
                acc = math::combine_add_shared(acc, math::sigmoid_f32(gate_logits[to_size(token)]),
                                               shared[to_size(token * width + i)]);
              reference[to_size(token * width + i)] = acc;
            }
          }
          auto run = [&](Backend& device) {
            DeviceArray expert_out_d = upload(device, expert_out),
                        slot_rows_d = upload(device, packing.slot_rows),
                        weights_d = upload(device, weights), shared_d = upload(device, shared),
                        gate_d = upload(device, gate_logits);
            // Filled with junk: the combine overwrites, it does not accumulate into out.
            DeviceArray out = upload(device, std::vector<float>(reference.size(), 99.0f));
            device.moe_combine(expert_out_d.f32(), width, slot_rows_d.i32(), weights_d.f32(),
                               num_tokens, top_k, round_dtype,
                               with_shared ? shared_d.f32() : nullptr,
                               with_shared ? gate_d.f32() : nullptr, out.f32());
            return download<float>(device, out, reference.size());
          };
          EXPECT_TRUE(same_bits(run(backend()), expected(run, reference)))
              << routing.name << " width " << width << " round " << dtype_name(round_dtype)
              << " shared " << with_shared;
        }
      }
    }
  }
}

// --- timed_seconds ---

TEST_P(BackendOps, TimedSecondsRunsTheWorkOnceAndReturnsADuration) {
  Backend& device = backend();
  int calls = 0;
  const double seconds = device.timed_seconds([&] {
    ++calls;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  });
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(std::isfinite(seconds));
  EXPECT_GE(seconds, 0.0);
  // The CPU backend reads the steady clock around the work, so it sees the whole sleep; CUDA
  // events time the stream, which holds no work here, so only the sign is promised there.
  if (!on_cuda()) {
    EXPECT_GE(seconds, 0.002);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOps, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace keel
