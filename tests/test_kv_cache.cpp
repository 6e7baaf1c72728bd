// The KV cache dtype (kv_cache_dtype: fp32 | bf16 | fp8_e4m3 | auto):
//  - the element rounding of kernels/math/kv_math.h against known answers (bf16 round to
//    nearest even, fp8 e4m3 round to nearest even with saturation at 448 * scale, NaN);
//  - Backend::kv_append stores exactly the rounded elements at their paged slots, and
//    Backend::attention over a bf16 / fp8 pool equals the host math (attention_head_paged over
//    the stored elements) bit for bit on the CPU, the CPU's bits on CUDA (skipped without a
//    device), and a double-precision attention over the rounded K/V within fp32 rounding;
//  - the engine: bf16 KV logits close to fp32 KV logits (bound below), and for every dtype a
//    prompt's bits do not depend on its batch-mates or on where prefill chunks end;
//  - k/v scales read from a checkpoint (ModelOpt and compressed-tensors names), errors;
//  - the setting: parse errors name the key and the value; auto follows the weights.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/math/kv_math.h"
#include "kernels/math/ops_math.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/deployment.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"
#include "runtime/model/kv_cache.h"
#include "runtime/model/safetensors.h"

namespace keel {
namespace {

namespace fs = std::filesystem;
using math::KvDType;

constexpr KvDType kAllKvDTypes[] = {KvDType::kF32, KvDType::kBF16, KvDType::kFp8E4M3};

float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// --- element rounding: known answers ---

TEST(KvMath, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(math::KvBF16::store(1.0f + 0x1p-8f, 1.0f), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
  EXPECT_EQ(math::KvBF16::store(1.0f + 3 * 0x1p-8f, 1.0f), 0x3f82);
  // Just above the half: up.
  EXPECT_EQ(math::KvBF16::store(bits_to_float(0x3f808001u), 1.0f), 0x3f81);
  EXPECT_EQ(math::KvBF16::load(0x3f81, 1.0f), 1.0f + 0x1p-7f);
  EXPECT_EQ(math::KvBF16::store(-2.0f, 1.0f), 0xc000);
  // Overflow rounds to infinity, as bf16 does; NaN stays NaN.
  EXPECT_EQ(math::KvBF16::store(std::numeric_limits<float>::max(), 1.0f), 0x7f80);
  EXPECT_TRUE(std::isnan(math::kv_round_trip(KvDType::kBF16, std::nanf(""), 1.0f)));
  // The scale plays no part in bf16.
  EXPECT_EQ(math::KvBF16::store(3.0f, 7.0f), math::KvBF16::store(3.0f, 1.0f));
}

TEST(KvMath, Fp8E4M3RoundsToNearestEvenAndSaturatesAt448TimesScale) {
  EXPECT_EQ(math::KvFp8E4M3::store(1.0f, 1.0f), 0x38);
  // Between 1 (0x38) and 1.125 (0x39): 1.0625 is the tie, to even (1).
  EXPECT_EQ(math::KvFp8E4M3::store(1.0625f, 1.0f), 0x38);
  EXPECT_EQ(math::KvFp8E4M3::store(1.1875f, 1.0f), 0x3a);  // tie between 0x39 and 0x3a: even
  EXPECT_EQ(math::KvFp8E4M3::store(448.0f, 1.0f), 0x7e);
  EXPECT_EQ(math::KvFp8E4M3::store(1e6f, 1.0f), 0x7e);
  EXPECT_EQ(math::KvFp8E4M3::store(-1e6f, 1.0f), 0xfe);
  EXPECT_EQ(math::KvFp8E4M3::store(std::numeric_limits<float>::infinity(), 1.0f), 0x7e);
  // With a scale the stored value is x / scale and the saturation point 448 * scale.
  const float scale = 0.25f;
  EXPECT_EQ(math::kv_round_trip(KvDType::kFp8E4M3, 112.0f, scale), 112.0f);
  EXPECT_EQ(math::kv_round_trip(KvDType::kFp8E4M3, 500.0f, scale), 112.0f);
  EXPECT_EQ(math::kv_round_trip(KvDType::kFp8E4M3, -500.0f, scale), -112.0f);
  EXPECT_EQ(math::kv_round_trip(KvDType::kFp8E4M3, 3.0f, 2.0f), 3.0f);  // 1.5 exact in e4m3
  // Subnormals: 2^-9 is the smallest, half of it ties to zero.
  EXPECT_EQ(math::KvFp8E4M3::store(0x1p-9f, 1.0f), 0x01);
  EXPECT_EQ(math::KvFp8E4M3::store(0x1p-10f, 1.0f), 0x00);
  // NaN is stored as the NaN code and read back as NaN.
  EXPECT_EQ(math::KvFp8E4M3::store(std::nanf(""), 1.0f), 0x7f);
  EXPECT_TRUE(std::isnan(math::kv_round_trip(KvDType::kFp8E4M3, std::nanf(""), 1.0f)));
  // Load is one multiply: code * scale.
  EXPECT_EQ(math::KvFp8E4M3::load(0x38, 0.5f), 0.5f);
}

TEST(KvMath, Fp32IsExactAndElementBytesFollowTheDtype) {
  const float x = bits_to_float(0x3f812345u);
  EXPECT_EQ(math::kv_round_trip(KvDType::kF32, x, 3.0f), x);
  EXPECT_EQ(math::kv_element_bytes(KvDType::kF32), 4);
  EXPECT_EQ(math::kv_element_bytes(KvDType::kBF16), 2);
  EXPECT_EQ(math::kv_element_bytes(KvDType::kFp8E4M3), 1);
}

// --- the setting ---

TEST(KvCacheSetting, ParsesTheFourNamesAndRefusesOthersNamingKeyAndValue) {
  EXPECT_EQ(parse_kv_cache_dtype("auto"), KvCacheDType::kAuto);
  EXPECT_EQ(parse_kv_cache_dtype("fp32"), KvCacheDType::kFp32);
  EXPECT_EQ(parse_kv_cache_dtype("bf16"), KvCacheDType::kBF16);
  EXPECT_EQ(parse_kv_cache_dtype("fp8_e4m3"), KvCacheDType::kFp8E4M3);
  try {
    parse_kv_cache_dtype("fp8");
    FAIL() << "fp8 accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("kv_cache_dtype 'fp8'"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(resolve_kv_cache_dtype(KvCacheDType::kAuto, DType::kBF16), KvDType::kBF16);
  EXPECT_EQ(resolve_kv_cache_dtype(KvCacheDType::kAuto, DType::kF32), KvDType::kF32);
  EXPECT_EQ(resolve_kv_cache_dtype(KvCacheDType::kAuto, DType::kF16), KvDType::kF32);
  EXPECT_EQ(resolve_kv_cache_dtype(KvCacheDType::kFp8E4M3, DType::kF32), KvDType::kFp8E4M3);
}

// One scratch directory per test process, removed at exit.
struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-kv-cache/pid-" + std::to_string(::getpid());
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string scratch_root() {
  static ScratchDir scratch;
  return scratch.path;
}

TEST(KvCacheSetting, DeploymentFileKeyIsReadAndBadValuesNameFileAndKey) {
  fs::create_directories(scratch_root());
  const std::string path = scratch_root() + "/deploy.yaml";
  std::ofstream(path) << "model: x\nkv_cache_dtype: fp8_e4m3\n";
  EXPECT_EQ(load_deployment(path).engine.kv_cache_dtype, KvCacheDType::kFp8E4M3);
  std::ofstream(path) << "model: x\nkv_cache_dtype: int8\n";
  try {
    load_deployment(path);
    FAIL() << "int8 accepted";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find("kv_cache_dtype 'int8'"), std::string::npos) << message;
  }
}

// --- backend ops over a paged pool of each dtype ---

// Deterministic uniform floats in [-scale, scale).
std::vector<float> uniform_floats(std::mt19937& rng, size_t count, float scale) {
  std::vector<float> values(count);
  for (float& value : values)
    value = (2.0f * static_cast<float>(rng() >> 8) * (1.0f / 16777216.0f) - 1.0f) * scale;
  return values;
}

template <typename T>
DeviceArray upload(Backend& backend, const std::vector<T>& host) {
  DeviceArray array = backend.allocate_bytes(std::max<size_t>(host.size() * sizeof(T), 1));
  backend.copy_from_host(host.data(), host.size() * sizeof(T), array.data());
  return array;
}

template <typename T>
std::vector<T> download(Backend& backend, const DeviceArray& array, size_t count) {
  std::vector<T> host(count);
  backend.copy_to_host(array.data(), count * sizeof(T), host.data());
  return host;
}

// One paged pool: 2 layers, 2 KV heads, 3 sequences with scrambled blocks. Rows hold q heads
// (4, grouped 2 per KV head), then K, then V; every sequence's positions [0, length) are
// appended (in steps of `chunk` tokens, all sequences' tokens of a step in one call).
struct PoolCase {
  static constexpr int64_t kLayers = 2, kKvHeads = 2, kHeadDim = 8, kSeqs = 3, kQHeads = 4;
  int64_t block_size;
  int64_t length;
  int64_t max_blocks_per_seq, num_blocks;
  std::vector<int32_t> block_tables;
  std::vector<float> rows;  // [kSeqs * length][row_stride]: sequence s position p at s*length+p
  static constexpr int64_t kRowStride = (kQHeads + 2 * kKvHeads) * kHeadDim;
  std::vector<float> k_scales{0.03f, 0.5f}, v_scales{0.02f, 2.0f};

  PoolCase(std::mt19937& rng, int64_t block, int64_t len) : block_size(block), length(len) {
    max_blocks_per_seq = (length + block_size - 1) / block_size;
    num_blocks = kSeqs * max_blocks_per_seq + 2;
    std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
    std::shuffle(ids.begin(), ids.end(), rng);
    block_tables.assign(ids.begin(), ids.begin() + kSeqs * max_blocks_per_seq);
    rows = uniform_floats(rng, static_cast<size_t>(kSeqs * length * kRowStride), 3.0f);
    // Values an fp8 pool with scale 0.03 saturates (|x| > 448 * 0.03 = 13.44), and a NaN-free
    // spread of magnitudes.
    rows[static_cast<size_t>(kQHeads * kHeadDim)] = 40.0f;
    rows[static_cast<size_t>(kQHeads * kHeadDim + 1)] = -1e-4f;
  }
  int64_t elements() const { return kLayers * num_blocks * kKvHeads * block_size * kHeadDim; }
  size_t offset(int64_t layer, int64_t seq, int64_t kv_head, int64_t position) const {
    const int64_t block =
        block_tables[static_cast<size_t>(seq * max_blocks_per_seq + position / block_size)];
    return static_cast<size_t>(
        (((layer * num_blocks + block) * kKvHeads + kv_head) * block_size + position % block_size) *
        kHeadDim);
  }
};

// What one backend produced: the pools' bytes after appending everything, and attention of
// every (sequence, position) row over its prefix in layer `layer`.
struct PoolRun {
  std::vector<uint8_t> k_bytes, v_bytes;
  std::vector<float> attention;
};

PoolRun run_pool(Backend& backend, const PoolCase& pc, KvDType dtype, int64_t chunk,
                 int64_t layer) {
  const size_t nbytes = static_cast<size_t>(pc.elements() * math::kv_element_bytes(dtype));
  DeviceArray k = backend.allocate_bytes(nbytes), v = backend.allocate_bytes(nbytes);
  DeviceArray tables = upload(backend, pc.block_tables);
  Backend::KvPoolView view{k.data(),
                           v.data(),
                           PoolCase::kLayers,
                           pc.num_blocks,
                           PoolCase::kKvHeads,
                           pc.block_size,
                           PoolCase::kHeadDim,
                           tables.i32(),
                           pc.max_blocks_per_seq,
                           dtype,
                           pc.k_scales.data(),
                           pc.v_scales.data()};
  const std::vector<int32_t> kv_head_of_q = {0, 0, 1, 1};
  DeviceArray kv_map = upload(backend, kv_head_of_q);
  const int64_t q_width = PoolCase::kQHeads * PoolCase::kHeadDim;
  const int64_t kv_width = PoolCase::kKvHeads * PoolCase::kHeadDim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(PoolCase::kHeadDim));
  PoolRun run;
  run.attention.assign(static_cast<size_t>(PoolCase::kSeqs * pc.length * q_width), 0.0f);
  for (int64_t first = 0; first < pc.length; first += chunk) {
    const int64_t count = std::min(chunk, pc.length - first);
    // This step's rows: every sequence's positions [first, first + count).
    std::vector<float> rows;
    std::vector<int32_t> positions, cache_idx;
    for (int64_t seq = 0; seq < PoolCase::kSeqs; ++seq)
      for (int64_t p = first; p < first + count; ++p) {
        const float* row = pc.rows.data() + (seq * pc.length + p) * PoolCase::kRowStride;
        rows.insert(rows.end(), row, row + PoolCase::kRowStride);
        positions.push_back(static_cast<int32_t>(p));
        cache_idx.push_back(static_cast<int32_t>(seq));
      }
    const int64_t num_rows = static_cast<int64_t>(positions.size());
    DeviceArray rows_d = upload(backend, rows), positions_d = upload(backend, positions),
                cache_d = upload(backend, cache_idx);
    for (int64_t l = 0; l < PoolCase::kLayers; ++l)
      backend.kv_append(rows_d.f32(), PoolCase::kRowStride, q_width, q_width + kv_width,
                        positions_d.i32(), cache_d.i32(), num_rows, l, view);
    DeviceArray out = backend.allocate(DType::kF32, static_cast<size_t>(num_rows * q_width));
    backend.attention(rows_d.f32(), PoolCase::kRowStride, PoolCase::kQHeads, kv_map.i32(),
                      positions_d.i32(), cache_d.i32(), num_rows, layer, view, scale, out.f32());
    const std::vector<float> host =
        download<float>(backend, out, static_cast<size_t>(num_rows * q_width));
    for (int64_t r = 0; r < num_rows; ++r)
      std::copy_n(host.data() + r * q_width, q_width,
                  run.attention.data() + (cache_idx[static_cast<size_t>(r)] * pc.length +
                                          positions[static_cast<size_t>(r)]) *
                                             q_width);
  }
  run.k_bytes = download<uint8_t>(backend, k, nbytes);
  run.v_bytes = download<uint8_t>(backend, v, nbytes);
  return run;
}

bool same_float_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class KvPoolOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    cpu_ = make_cpu_backend();
    if (GetParam() == "cpu") return;
    std::string reason;
    if (cuda_device_count(&reason) == 0)
      GTEST_SKIP() << "skipped: no CUDA device (" << reason << ")";
    cuda_ = make_cuda_backend(0, GpuGemm::kCanonical);
  }
  Backend& backend() { return cuda_ != nullptr ? *cuda_ : *cpu_; }
  std::unique_ptr<Backend> cpu_, cuda_;
};

// The host reference: the pool bytes kv_append must leave (every element Kv::store'd at its
// documented slot, everything else zero), and attention as attention_head_paged over them.
template <typename Kv>
PoolRun host_reference(const PoolCase& pc, int64_t layer) {
  using Storage = typename Kv::Storage;
  std::vector<Storage> k(static_cast<size_t>(pc.elements())), v(k.size());
  const int64_t q_width = PoolCase::kQHeads * PoolCase::kHeadDim;
  const int64_t kv_width = PoolCase::kKvHeads * PoolCase::kHeadDim;
  for (int64_t l = 0; l < PoolCase::kLayers; ++l)
    for (int64_t seq = 0; seq < PoolCase::kSeqs; ++seq)
      for (int64_t p = 0; p < pc.length; ++p)
        for (int64_t h = 0; h < PoolCase::kKvHeads; ++h)
          for (int64_t d = 0; d < PoolCase::kHeadDim; ++d) {
            const float* row = pc.rows.data() + (seq * pc.length + p) * PoolCase::kRowStride;
            const size_t at = pc.offset(l, seq, h, p) + static_cast<size_t>(d);
            k[at] = Kv::store(row[q_width + h * PoolCase::kHeadDim + d], pc.k_scales[size_t(l)]);
            v[at] = Kv::store(row[q_width + kv_width + h * PoolCase::kHeadDim + d],
                              pc.v_scales[size_t(l)]);
          }
  PoolRun run;
  run.k_bytes.resize(k.size() * sizeof(Storage));
  run.v_bytes.resize(v.size() * sizeof(Storage));
  std::memcpy(run.k_bytes.data(), k.data(), run.k_bytes.size());
  std::memcpy(run.v_bytes.data(), v.data(), run.v_bytes.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(PoolCase::kHeadDim));
  run.attention.assign(static_cast<size_t>(PoolCase::kSeqs * pc.length * q_width), 0.0f);
  std::vector<float> scores(static_cast<size_t>(pc.length));
  const int64_t block_elements = pc.block_size * PoolCase::kHeadDim;
  for (int64_t seq = 0; seq < PoolCase::kSeqs; ++seq)
    for (int64_t p = 0; p < pc.length; ++p)
      for (int64_t head = 0; head < PoolCase::kQHeads; ++head) {
        const int64_t kv_head = head / 2;
        auto rows_of = [&](const std::vector<Storage>& pool, float s) {
          math::PagedKvRowsOf<Kv> rows;
          rows.head_base =
              pool.data() + (layer * pc.num_blocks * PoolCase::kKvHeads + kv_head) * block_elements;
          rows.block_table = pc.block_tables.data() + seq * pc.max_blocks_per_seq;
          rows.block_stride = PoolCase::kKvHeads * block_elements;
          rows.block_size = pc.block_size;
          rows.head_dim = PoolCase::kHeadDim;
          rows.scale = s;
          return rows;
        };
        const float* q = pc.rows.data() + (seq * pc.length + p) * PoolCase::kRowStride +
                         head * PoolCase::kHeadDim;
        math::attention_head_paged(
            q, rows_of(k, pc.k_scales[size_t(layer)]), rows_of(v, pc.v_scales[size_t(layer)]),
            p + 1, scale, scores.data(),
            run.attention.data() + (seq * pc.length + p) * q_width + head * PoolCase::kHeadDim);
      }
  return run;
}

PoolRun host_reference(KvDType dtype, const PoolCase& pc, int64_t layer) {
  switch (dtype) {
    case KvDType::kBF16:
      return host_reference<math::KvBF16>(pc, layer);
    case KvDType::kFp8E4M3:
      return host_reference<math::KvFp8E4M3>(pc, layer);
    case KvDType::kF32:
      break;
  }
  return host_reference<math::KvF32>(pc, layer);
}

TEST_P(KvPoolOps, AppendStoresTheRoundedElementsAndAttentionIsTheSharedMath) {
  std::mt19937 rng(21);
  for (KvDType dtype : kAllKvDTypes) {
    for (int64_t block_size : {1, 4, 16}) {
      SCOPED_TRACE(std::string(kv_cache_dtype_name(dtype)) + " block " +
                   std::to_string(block_size));
      const PoolCase pc(rng, block_size, 37);
      const PoolRun want =
          GetParam() == "cpu" ? host_reference(dtype, pc, 1) : run_pool(*cpu_, pc, dtype, 37, 1);
      const PoolRun got = run_pool(backend(), pc, dtype, 37, 1);
      EXPECT_EQ(got.k_bytes, want.k_bytes);
      EXPECT_EQ(got.v_bytes, want.v_bytes);
      EXPECT_TRUE(same_float_bits(got.attention, want.attention));
      // Batch invariance at the op: appending and attending in chunks of 1 or 5 positions
      // (other sequences' rows in the same calls) gives the same bytes and bits.
      for (int64_t chunk : {1, 5}) {
        const PoolRun chunked = run_pool(backend(), pc, dtype, chunk, 1);
        EXPECT_EQ(chunked.k_bytes, got.k_bytes) << "chunk " << chunk;
        EXPECT_TRUE(same_float_bits(chunked.attention, got.attention)) << "chunk " << chunk;
      }
    }
  }
}

// Attention over the rounded K/V in double: the fp32 kernel is within fp32 rounding of it (the
// bound: a few ulps of the largest |v| per accumulated term, 64 positions at most here). The
// rounding of K/V itself is not in this error: the reference reads the same rounded values.
TEST_P(KvPoolOps, AttentionIsCloseToADoubleReferenceOverTheRoundedKv) {
  std::mt19937 rng(22);
  for (KvDType dtype : kAllKvDTypes) {
    SCOPED_TRACE(std::string(kv_cache_dtype_name(dtype)));
    const PoolCase pc(rng, 4, 29);
    const int64_t layer = 0;
    const PoolRun got = run_pool(backend(), pc, dtype, 29, layer);
    const int64_t q_width = PoolCase::kQHeads * PoolCase::kHeadDim;
    const int64_t kv_width = PoolCase::kKvHeads * PoolCase::kHeadDim;
    const double scale = 1.0 / std::sqrt(static_cast<double>(PoolCase::kHeadDim));
    const float k_scale = pc.k_scales[size_t(layer)], v_scale = pc.v_scales[size_t(layer)];
    double worst = 0;
    for (int64_t seq = 0; seq < PoolCase::kSeqs; ++seq)
      for (int64_t p = 0; p < pc.length; ++p)
        for (int64_t head = 0; head < PoolCase::kQHeads; ++head) {
          const int64_t kv_head = head / 2;
          const float* q = pc.rows.data() + (seq * pc.length + p) * PoolCase::kRowStride +
                           head * PoolCase::kHeadDim;
          auto kv = [&](int64_t pos, int64_t col, float s) {
            const float* row = pc.rows.data() + (seq * pc.length + pos) * PoolCase::kRowStride;
            return static_cast<double>(
                math::kv_round_trip(dtype, row[col + kv_head * PoolCase::kHeadDim], s));
          };
          std::vector<double> scores(static_cast<size_t>(p + 1));
          double max_score = -INFINITY, sum = 0, max_v = 0;
          for (int64_t pos = 0; pos <= p; ++pos) {
            double dot = 0;
            for (int64_t d = 0; d < PoolCase::kHeadDim; ++d)
              dot += static_cast<double>(q[d]) * kv(pos, q_width + d, k_scale);
            scores[size_t(pos)] = dot * scale;
            max_score = std::max(max_score, scores[size_t(pos)]);
          }
          for (double& s : scores) sum += (s = std::exp(s - max_score));
          for (int64_t d = 0; d < PoolCase::kHeadDim; ++d) {
            double out = 0;
            for (int64_t pos = 0; pos <= p; ++pos) {
              const double value = kv(pos, q_width + kv_width + d, v_scale);
              out += scores[size_t(pos)] / sum * value;
              max_v = std::max(max_v, std::abs(value));
            }
            const float kernel = got.attention[size_t((seq * pc.length + p) * q_width +
                                                      head * PoolCase::kHeadDim + d)];
            const double error = std::abs(kernel - out) / std::max(max_v, 1e-30);
            worst = std::max(worst, error);
          }
        }
    // fp32 scores (8-term dots of |q|,|k| <= 3: |score| <= 26 with ~1e-6 relative error), the
    // shared exp (< 2 ulp), and a 29-term sum: well inside 64 * 2^-24 * (1 + |score|).
    EXPECT_LT(worst, 64 * 0x1p-24 * 27) << "relative to max |v|";
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, KvPoolOps, ::testing::Values("cpu", "cuda"));

// --- the engine ---

std::string model_dir(const std::string& preset) {
  const std::string dir = scratch_root() + "/" + preset;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 3;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

EngineOptions options_for(int tp, KvCacheDType kv_dtype) {
  EngineOptions options;
  options.tp_size = tp;
  options.reduce = comm::ReduceAlgo::kFixedOrder;
  options.placement.kind = PlacementKind::kRoundRobin;
  options.kv_cache_dtype = kv_dtype;
  return options;
}

std::vector<int32_t> prompt_of(int64_t length, int64_t vocab, int32_t salt) {
  std::vector<int32_t> prompt;
  for (int64_t i = 0; i < length; ++i)
    prompt.push_back(static_cast<int32_t>((i * 37 + salt * 11 + 5) % vocab));
  return prompt;
}

// One sequence fed `chunk` prompt tokens per step beside `others` one-token sequences, then
// greedy decode; the logits of the prompt's last token and of every decode step.
class ChunkedSource final : public StepSource {
 public:
  ChunkedSource(std::vector<int32_t> prompt, int64_t chunk, int64_t decode_steps, int64_t others)
      : tokens_(std::move(prompt)),
        prompt_length_(static_cast<int64_t>(tokens_.size())),
        chunk_(chunk),
        decode_steps_(decode_steps),
        others_(others) {}

  void next_step(ServeStep& step) override {
    step = ServeStep{};
    const int64_t total = prompt_length_ + decode_steps_;
    if (fed_ >= total) {
      step.kind = ServeStep::Kind::kStop;
      return;
    }
    const int64_t count =
        fed_ < prompt_length_ ? std::min(chunk_, prompt_length_ - fed_) : int64_t{1};
    StepBatch& batch = step.batch;
    batch.set_contiguous_block_tables(others_ + 1, total + 1, 4);
    for (int64_t other = 0; other < others_; ++other) {
      batch.token_ids.push_back(static_cast<int32_t>(other + 1));
      batch.positions.push_back(static_cast<int32_t>(step_));
      batch.cache_idx.push_back(static_cast<int32_t>(other));
    }
    for (int64_t i = 0; i < count; ++i) {
      batch.token_ids.push_back(tokens_[static_cast<size_t>(fed_ + i)]);
      batch.positions.push_back(static_cast<int32_t>(fed_ + i));
      batch.cache_idx.push_back(static_cast<int32_t>(others_));
    }
    batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size()) - 1);
    fed_ += count;
    step.kind = ServeStep::Kind::kRun;
  }

  void on_step_done(const StepOutput& output) override {
    ++step_;
    if (fed_ < prompt_length_) return;
    logits_.push_back(*output.logits);
    if (static_cast<int64_t>(tokens_.size()) < prompt_length_ + decode_steps_) {
      const std::vector<float>& row = *output.logits;
      tokens_.push_back(
          static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
    }
  }

  std::vector<std::vector<float>> logits_;

 private:
  std::vector<int32_t> tokens_;
  int64_t prompt_length_, chunk_, decode_steps_, others_;
  int64_t fed_ = 0, step_ = 0;
};

std::vector<std::vector<float>> run_chunked(Engine& engine, const std::vector<int32_t>& prompt,
                                            int64_t chunk, int64_t others) {
  ChunkedSource source(prompt, chunk, 5, others);
  ServeOptions options;
  options.block_size = 4;
  options.num_kv_blocks = (others + 1) * ((static_cast<int64_t>(prompt.size()) + 6 + 3) / 4);
  engine.serve(&source, options);
  return source.logits_;
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!same_float_bits(a[i], b[i])) return false;
  return true;
}

class KvEngine : public ::testing::TestWithParam<KvCacheDType> {};

// Rounding happens at append, per element: a prompt's bits are the same whole or in chunks of
// 1 and 5 tokens, alone or beside 3 other sequences, batched with other prompts or not, for
// every KV dtype (and at TP 2, where each rank rounds its own heads).
TEST_P(KvEngine, ChunkingAndBatchMatesDoNotChangeBits) {
  for (int tp : {1, 2}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    Engine engine(model_dir("tiny"), options_for(tp, GetParam()));
    const std::vector<int32_t> prompt = prompt_of(21, engine.config().vocab_size, 1);
    const auto whole = run_chunked(engine, prompt, 1000, 0);
    ASSERT_EQ(whole.size(), 6u);
    for (int64_t chunk : {1, 5})
      EXPECT_TRUE(same_bits(run_chunked(engine, prompt, chunk, 0), whole)) << "chunk " << chunk;
    EXPECT_TRUE(same_bits(run_chunked(engine, prompt, 5, 3), whole)) << "beside 3 others";

    const int64_t vocab = engine.config().vocab_size;
    GenerateRequest alone;
    alone.prompts = {prompt_of(9, vocab, 7)};
    alone.max_new_tokens = 6;
    alone.keep_all_logits = true;
    const GenerateResult reference = engine.generate(alone);
    GenerateRequest batched = alone;
    batched.prompts = {prompt_of(4, vocab, 1), prompt_of(13, vocab, 2), prompt_of(9, vocab, 7)};
    batched.digest_prompt_idx = 2;
    const GenerateResult result = engine.generate(batched);
    EXPECT_EQ(result.tokens[2], reference.tokens[0]);
    EXPECT_EQ(result.logits_digest, reference.logits_digest);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KvEngine,
                         ::testing::Values(KvCacheDType::kFp32, KvCacheDType::kBF16,
                                           KvCacheDType::kFp8E4M3),
                         [](const auto& info) {
                           return std::string(kv_cache_dtype_name(info.param));
                         });

// Largest |a - b| over every logit, relative to max(1, the row's largest |logit|).
double worst_relative(const std::vector<std::vector<std::vector<float>>>& a,
                      const std::vector<std::vector<std::vector<float>>>& b) {
  double worst = 0;
  for (size_t p = 0; p < a.size(); ++p)
    for (size_t s = 0; s < a[p].size(); ++s) {
      double row_max = 1;
      for (float x : b[p][s]) row_max = std::max(row_max, std::abs(double{x}));
      for (size_t i = 0; i < a[p][s].size(); ++i)
        worst = std::max(worst, std::abs(double{a[p][s][i]} - double{b[p][s][i]}) / row_max);
    }
  return worst;
}

// bf16 KV vs fp32 KV on tiny (bf16 weights, 2 layers, head_dim 16) and tiny-qwen2 (f32
// weights, qkv bias): every K/V element moves by at most 2^-9 relative (bf16's half ulp), so
// scores move by <= 2^-9 * sum |q_d k_d| * scale and outputs by ~2^-9 of |v|; the residual
// stream carries that through 2 layers (and, in decode, through tokens whose own K/V were
// rounded) into the logits. The bound, 5% of max(1, the row's largest |logit|) (~25x 2^-9),
// is what a KV cache of bf16 quality must meet on these 2-layer models; measured when written:
// tiny 0.13% (prompt) / 0.12% (decode), tiny-qwen2 0.15% / 2.1% (a decode row whose largest
// logit is ~1, so the error counts in absolute terms). Measured values are printed. Greedy
// tokens agree on these prompts.
TEST(KvEngineAccuracy, Bf16KvIsCloseToFp32Kv) {
  for (const std::string preset : {"tiny", "tiny-qwen2"}) {
    SCOPED_TRACE(preset);
    Engine fp32(model_dir(preset), options_for(1, KvCacheDType::kFp32));
    Engine bf16(model_dir(preset), options_for(1, KvCacheDType::kBF16));
    EXPECT_EQ(bf16.kv_dtype(), KvDType::kBF16);
    const int64_t vocab = fp32.config().vocab_size;
    GenerateRequest request;
    request.prompts = {prompt_of(17, vocab, 3), prompt_of(5, vocab, 8)};
    request.max_new_tokens = 8;
    request.keep_all_logits = true;
    const GenerateResult want = fp32.generate(request);
    const GenerateResult got = bf16.generate(request);
    const double prompt_error = worst_relative(got.prompt_logits, want.prompt_logits);
    const double step_error = worst_relative(got.step_logits, want.step_logits);
    std::printf("%s: bf16 KV vs fp32 KV, worst relative logit error %.3g (prompt) %.3g (steps)\n",
                preset.c_str(), prompt_error, step_error);
    EXPECT_LT(prompt_error, 5e-2);
    EXPECT_LT(step_error, 5e-2);
    EXPECT_GT(prompt_error, 0.0) << "bf16 KV must actually round";
    EXPECT_EQ(got.tokens, want.tokens);
    // The pool is half the bytes.
    EXPECT_EQ(bf16.kv_block_bytes(16) * 2, fp32.kv_block_bytes(16));
  }
}

TEST(KvEngineAccuracy, AutoFollowsTheCheckpointDtype) {
  EXPECT_EQ(Engine(model_dir("tiny"), options_for(1, KvCacheDType::kAuto)).kv_dtype(),
            KvDType::kBF16);  // bf16 weights
  EXPECT_EQ(Engine(model_dir("tiny-qwen2"), options_for(1, KvCacheDType::kAuto)).kv_dtype(),
            KvDType::kF32);  // f32 weights
  EXPECT_EQ(Engine(model_dir("tiny-mixtral"), options_for(1, KvCacheDType::kAuto)).kv_dtype(),
            KvDType::kF32);  // f16 weights
}

// --- k/v scales from the checkpoint ---

// A copy of `preset`'s checkpoint with extra tensors (scales) added to its safetensors file.
std::string checkpoint_with(const std::string& preset, const std::string& name,
                            const std::vector<std::pair<std::string, float>>& extra) {
  const std::string source = model_dir(preset);
  const std::string dir = scratch_root() + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(source + "/config.json", dir + "/config.json");
  std::vector<TensorToWrite> tensors;
  {
    const auto file = SafetensorsFile::open(source + "/model.safetensors");
    for (const auto& [tensor_name, view] : file->tensors()) {
      TensorToWrite tensor{tensor_name, view.dtype, view.shape, {}};
      tensor.bytes.assign(view.data, view.data + view.nbytes);
      tensors.push_back(std::move(tensor));
    }
  }
  for (const auto& [tensor_name, value] : extra) {
    TensorToWrite tensor{tensor_name, DType::kF32, {}, std::vector<std::byte>(4)};
    std::memcpy(tensor.bytes.data(), &value, 4);
    tensors.push_back(std::move(tensor));
  }
  write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

TEST(KvScales, ModelOptAndCompressedTensorsNamesAreRead) {
  // tiny: 2 full-attention layers.
  const std::string modelopt = checkpoint_with("tiny", "modelopt",
                                               {{"model.layers.0.self_attn.k_proj.k_scale", 0.5f},
                                                {"model.layers.0.self_attn.v_proj.v_scale", 0.25f},
                                                {"model.layers.1.self_attn.k_proj.k_scale", 2.0f},
                                                {"model.layers.1.self_attn.v_proj.v_scale", 4.0f}});
  const ModelConfig config = ModelConfig::load(modelopt + "/config.json");
  KvScales scales = read_kv_scales(config, Checkpoint::open(modelopt));
  EXPECT_EQ(scales.k, (std::vector<float>{0.5f, 2.0f}));
  EXPECT_EQ(scales.v, (std::vector<float>{0.25f, 4.0f}));

  const std::string ct = checkpoint_with("tiny", "compressed-tensors",
                                         {{"model.layers.0.self_attn.k_scale", 0.125f},
                                          {"model.layers.0.self_attn.v_scale", 0.0625f},
                                          {"model.layers.1.self_attn.kv_scale", 3.0f}});
  scales = read_kv_scales(config, Checkpoint::open(ct));
  EXPECT_EQ(scales.k, (std::vector<float>{0.125f, 3.0f}));
  EXPECT_EQ(scales.v, (std::vector<float>{0.0625f, 3.0f}));

  // None: empty (1.0 everywhere, with a warning at start-up).
  EXPECT_TRUE(read_kv_scales(config, Checkpoint::open(model_dir("tiny"))).empty());
}

TEST(KvScales, PartialOrBadScalesAreRefusedNamingTheTensor) {
  const ModelConfig config = ModelConfig::load(model_dir("tiny") + "/config.json");
  auto message_of = [&](const std::string& dir) {
    try {
      read_kv_scales(config, Checkpoint::open(dir));
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  const std::string only_k = checkpoint_with(
      "tiny", "only-k",
      {{"model.layers.0.self_attn.k_scale", 1.0f}, {"model.layers.1.self_attn.k_scale", 1.0f}});
  EXPECT_NE(message_of(only_k).find("model.layers.0.self_attn.k_scale has no v scale"),
            std::string::npos)
      << message_of(only_k);
  const std::string one_layer = checkpoint_with(
      "tiny", "one-layer",
      {{"model.layers.1.self_attn.k_scale", 1.0f}, {"model.layers.1.self_attn.v_scale", 1.0f}});
  EXPECT_NE(message_of(one_layer).find("not for others"), std::string::npos)
      << message_of(one_layer);
  const std::string negative = checkpoint_with(
      "tiny", "negative",
      {{"model.layers.0.self_attn.kv_scale", -1.0f}, {"model.layers.1.self_attn.kv_scale", 1.0f}});
  EXPECT_NE(message_of(negative).find("model.layers.0.self_attn.kv_scale is -1"), std::string::npos)
      << message_of(negative);
}

// fp8 with the checkpoint's scales stores x / scale, saturating at 448 * scale: scales of 1 in
// the checkpoint give exactly the bits of no scales (the default), and scales of 1/4096 (K/V
// saturate beyond 0.11) are really applied: other bits, and far from fp32 KV. (Within E4M3's
// normal range the relative rounding error does not depend on the scale, so a calibrated
// scale's gain is at the range ends only: no saturation, fewer subnormals.)
TEST(KvScales, Fp8KvUsesTheCheckpointScales) {
  auto scales_of = [](float value) {
    std::vector<std::pair<std::string, float>> scales;
    for (int layer : {0, 1}) {
      scales.emplace_back("model.layers." + std::to_string(layer) + ".self_attn.k_scale", value);
      scales.emplace_back("model.layers." + std::to_string(layer) + ".self_attn.v_scale", value);
    }
    return scales;
  };
  const std::string ones = checkpoint_with("tiny", "fp8-ones", scales_of(1.0f));
  const std::string tiny_scales = checkpoint_with("tiny", "fp8-tiny", scales_of(1.0f / 4096));
  GenerateRequest request;
  Engine fp32(ones, options_for(1, KvCacheDType::kFp32));
  request.prompts = {prompt_of(12, fp32.config().vocab_size, 5)};
  request.max_new_tokens = 4;
  request.keep_all_logits = true;
  const GenerateResult want = fp32.generate(request);
  const GenerateResult unscaled =
      Engine(model_dir("tiny"), options_for(1, KvCacheDType::kFp8E4M3)).generate(request);
  const GenerateResult with_ones =
      Engine(ones, options_for(1, KvCacheDType::kFp8E4M3)).generate(request);
  const GenerateResult saturating =
      Engine(tiny_scales, options_for(1, KvCacheDType::kFp8E4M3)).generate(request);
  EXPECT_EQ(with_ones.logits_digest, unscaled.logits_digest);
  EXPECT_NE(saturating.logits_digest, unscaled.logits_digest);
  const double unscaled_error = worst_relative(unscaled.prompt_logits, want.prompt_logits);
  const double saturating_error = worst_relative(saturating.prompt_logits, want.prompt_logits);
  std::printf("fp8 KV vs fp32 KV: worst relative logit error %.3g (scale 1), %.3g (1/4096)\n",
              unscaled_error, saturating_error);
  EXPECT_GT(saturating_error, 2 * unscaled_error);
}

}  // namespace
}  // namespace keel
