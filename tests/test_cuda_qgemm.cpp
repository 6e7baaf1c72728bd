// The CUDA quantized GEMMs (kernels/cuda/qgemm.h) against cpu::qgemm, bit for bit, and the CUDA
// backend's quantized matmul and expert FFN against the CPU backend's. Label gpu: without a
// device every GPU test reports "skipped: no CUDA device"; the launcher checks run anywhere.
//
// Coverage: every format (NVFP4, MXFP4, FP8 block, int4 with group sizes 32, 128 and 24, int4
// act order), NVFP4 W4A4 (two input scales, one saturating the E4M3 block scales, zero
// activation blocks), M in {1, 3, 17}, K with tails inside a chunk and a slab (24, 200, 4104),
// N with a partial column tile, padded strides (untouched padding checked); the grouped GEMM per
// format with empty and uneven groups and per-group input scales, a group subset (offsets not
// starting at 0, as the backend's timed path runs it), mixed formats and dense views in one
// table, and a misfit view giving NaN rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "kernels/cpu/qgemm.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/qgemm.h"
#include "kernels/math/quant_math.h"
#include "runtime/backend/backend.h"

namespace keel {
namespace {

using cuda::DeviceBuffer;
using cuda::to_device;
using cuda::to_host;
using math::WeightFormat;
using math::WeightView;

class CudaQGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0)
      GTEST_SKIP() << "skipped: no CUDA device (" << cuda::no_device_reason() << ")";
  }
};

// ---- matrices ----

// A weight matrix in host memory that owns its storage (view: host pointers).
struct QMatrix {
  std::vector<uint8_t> codes;  // codes, or dense elements as bytes
  std::vector<uint8_t> scales_u8;
  std::vector<float> scales_f32;
  std::vector<uint8_t> zeros;
  std::vector<float> row_scales;
  std::vector<int32_t> group_of_k;
  WeightView view;
};

struct Case {
  WeightFormat format;
  int64_t int4_group = 0;
  bool act_order = false;
  float input_scale = 0;  // NVFP4 W4A4
  DType dense_dtype = DType::kF32;
};

std::string describe(const Case& c) {
  std::string text(math::weight_format_name(c.format));
  if (c.format == WeightFormat::kInt4) text += " g=" + std::to_string(c.int4_group);
  if (c.act_order) text += " act-order";
  if (c.input_scale > 0) text += " w4a4 s=" + std::to_string(c.input_scale);
  if (c.format == WeightFormat::kDense) text += c.dense_dtype == DType::kBF16 ? " bf16" : " f32";
  return text;
}

// Random codes and scales as tests/test_qgemm.cpp draws them: E4M3 subnormal, zero and negative
// block scales, E8M0 down to 2^-127, -0 and subnormal FP8 codes, int4 zeros 0..16; no NaN (NaN
// payloads are not part of the bit contract).
QMatrix make_matrix(const Case& c, int64_t n, int64_t k, std::mt19937& rng) {
  QMatrix q;
  WeightView& v = q.view;
  v.format = c.format;
  v.rows = n;
  v.cols = k;
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (c.format == WeightFormat::kDense) {
    v.dtype = c.dense_dtype;
    v.ld = k + 5;
    const size_t count = static_cast<size_t>(n * v.ld);
    q.codes.resize(count * dtype_size(c.dense_dtype));
    for (size_t i = 0; i < count; ++i) {
      const float value = normal(rng);
      if (c.dense_dtype == DType::kBF16) {
        const uint16_t bits = f32_to_bf16(value);
        std::memcpy(&q.codes[i * 2], &bits, 2);
      } else {
        std::memcpy(&q.codes[i * 4], &value, 4);
      }
    }
    v.data = q.codes.data();
    return q;
  }
  const bool packed = c.format != WeightFormat::kFp8Block;
  v.ld = packed ? (k + 1) / 2 + 1 : k + 3;  // a little row padding
  q.codes.resize(static_cast<size_t>(n * v.ld));
  for (auto& code : q.codes) code = static_cast<uint8_t>(byte(rng));
  switch (c.format) {
    case WeightFormat::kNvfp4:
      v.group_size = math::kNvfp4Group;
      v.input_scale = c.input_scale;
      break;
    case WeightFormat::kMxfp4:
      v.group_size = math::kMxfp4Group;
      break;
    case WeightFormat::kFp8Block:
      v.group_size = math::kFp8BlockGroup;
      for (auto& code : q.codes)
        if ((code & 0x7f) == 0x7f) code = static_cast<uint8_t>(code ^ 1);
      break;
    default:
      v.group_size = c.int4_group;
      break;
  }
  const int64_t groups = (k + v.group_size - 1) / v.group_size;
  v.scale_ld = groups + 1;
  const auto num_scales = static_cast<size_t>(n * v.scale_ld);
  if (c.format == WeightFormat::kNvfp4 || c.format == WeightFormat::kMxfp4) {
    q.scales_u8.resize(num_scales);
    for (auto& s : q.scales_u8) {
      const int pick = byte(rng);
      if (c.format == WeightFormat::kNvfp4) {
        s = pick < 20 ? static_cast<uint8_t>(pick % 8) : static_cast<uint8_t>(0x20 + pick % 0x40);
        if (pick > 250) s |= 0x80;
      } else {
        s = static_cast<uint8_t>(pick < 10 ? pick % 3 : 110 + pick % 30);
      }
    }
    v.scales = q.scales_u8.data();
    if (c.format == WeightFormat::kNvfp4) {
      q.row_scales.resize(static_cast<size_t>(n));
      for (auto& r : q.row_scales) r = std::ldexp(1.0f + 0.1f * normal(rng), -8);
      v.row_scales = q.row_scales.data();
    }
  } else {
    q.scales_f32.resize(num_scales);
    for (auto& s : q.scales_f32) s = std::ldexp(normal(rng), -6);
    v.scales = q.scales_f32.data();
  }
  if (c.format == WeightFormat::kInt4) {
    q.zeros.resize(num_scales);
    std::uniform_int_distribution<int> zero(0, 16);
    for (auto& z : q.zeros) z = static_cast<uint8_t>(zero(rng));
    v.zeros = q.zeros.data();
    if (c.act_order) {
      q.group_of_k.resize(static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i) q.group_of_k[i] = static_cast<int32_t>(i / v.group_size);
      std::shuffle(q.group_of_k.begin(), q.group_of_k.end(), rng);
      v.group_of_k = q.group_of_k.data();
    }
  }
  v.data = q.codes.data();
  return q;
}

// The device twin of a QMatrix (view: device pointers).
struct DeviceQMatrix {
  DeviceBuffer codes, scales, zeros, row_scales, group_of_k;
  WeightView view;
};

template <typename T>
DeviceBuffer upload_nonempty(const std::vector<T>& host) {
  return host.empty() ? DeviceBuffer() : to_device(host);
}

DeviceQMatrix upload(const QMatrix& q) {
  DeviceQMatrix d;
  d.codes = upload_nonempty(q.codes);
  d.scales = q.scales_u8.empty() ? upload_nonempty(q.scales_f32) : upload_nonempty(q.scales_u8);
  d.zeros = upload_nonempty(q.zeros);
  d.row_scales = upload_nonempty(q.row_scales);
  d.group_of_k = upload_nonempty(q.group_of_k);
  d.view = q.view;
  d.view.data = d.codes.data();
  d.view.scales = q.view.scales == nullptr ? nullptr : d.scales.data();
  d.view.zeros = q.view.zeros == nullptr ? nullptr : d.zeros.as<uint8_t>();
  d.view.row_scales = q.view.row_scales == nullptr ? nullptr : d.row_scales.as<float>();
  d.view.group_of_k = q.view.group_of_k == nullptr ? nullptr : d.group_of_k.as<int32_t>();
  return d;
}

// Normal activations; in every third row one all-zero 16-block (W4A4's zero block scale).
std::vector<float> make_activations(int64_t rows, int64_t ld, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(rows * ld));
  for (float& value : values) value = normal(rng);
  for (int64_t row = 0; row < rows; row += 3)
    for (int64_t i = 16; i < std::min<int64_t>(k, 32); ++i) values[row * ld + i] = 0.0f;
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

const Case kCases[] = {
    {WeightFormat::kNvfp4},
    {WeightFormat::kNvfp4, 0, false, 0.01f},
    {WeightFormat::kNvfp4, 0, false, 1e-4f},  // block scales saturate at 448
    {WeightFormat::kMxfp4},
    {WeightFormat::kFp8Block},
    {WeightFormat::kInt4, 32},
    {WeightFormat::kInt4, 128},
    {WeightFormat::kInt4, 24},
    {WeightFormat::kInt4, 32, true},
};

// ---- host-side launcher checks (no device needed) ----

TEST(CudaQGemmHost, LauncherChecksThrowBeforeTouchingTheDevice) {
  std::mt19937 rng(1);
  QMatrix q = make_matrix({WeightFormat::kNvfp4}, 4, 32, rng);
  // The host pointers are never dereferenced: every call below fails its checks first.
  auto run = [&](const WeightView& w, int64_t ldx = 32, int64_t ldy = 4) {
    cuda::qgemm(cuda::QGemmArgs{nullptr, ldx, w, nullptr, ldy, 1});
  };
  WeightView dense = q.view;
  dense.format = WeightFormat::kDense;
  EXPECT_THROW(run(dense), Error);
  WeightView wrong_group = q.view;
  wrong_group.group_size = 32;
  EXPECT_THROW(run(wrong_group), Error);
  WeightView no_row_scales = q.view;
  no_row_scales.row_scales = nullptr;
  EXPECT_THROW(run(no_row_scales), Error);
  WeightView few_scales = q.view;
  few_scales.scale_ld = 1;
  EXPECT_THROW(run(few_scales), Error);
  WeightView short_rows = q.view;
  short_rows.ld = 15;
  EXPECT_THROW(run(short_rows), Error);
  WeightView mx_input_scale = make_matrix({WeightFormat::kMxfp4}, 4, 32, rng).view;
  mx_input_scale.input_scale = 0.5f;
  EXPECT_THROW(run(mx_input_scale), Error);
  QMatrix int4 = make_matrix({WeightFormat::kInt4, 32}, 4, 32, rng);
  WeightView no_zeros = int4.view;
  no_zeros.zeros = nullptr;
  EXPECT_THROW(run(no_zeros), Error);
  EXPECT_THROW(run(q.view, /*ldx=*/31), Error);
  EXPECT_THROW(run(q.view, 32, /*ldy=*/3), Error);
  // A good view but null x / y.
  EXPECT_THROW(run(q.view), Error);
  try {
    run(wrong_group);
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("nvfp4"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("group size"), std::string::npos) << error.what();
  }
  // Grouped: shapes and strides are checked on the host, the views only on the device.
  EXPECT_THROW(cuda::qgemm_grouped(cuda::GroupedQGemmArgs{nullptr, 31, nullptr, nullptr, 4, nullptr,
                                                          2, 4, 8, 4, 32}),
               Error);
  EXPECT_THROW(cuda::qgemm_grouped(cuda::GroupedQGemmArgs{nullptr, 32, nullptr, nullptr, 4, nullptr,
                                                          2, 4, 8, 4, 32}),
               Error);
  // No groups or no rows: nothing to launch, nothing to check.
  EXPECT_NO_THROW(cuda::qgemm_grouped(
      cuda::GroupedQGemmArgs{nullptr, 32, nullptr, nullptr, 4, nullptr, 0, 4, 8, 4, 32}));
}

// ---- the plain GEMM ----

TEST_F(CudaQGemm, BitIdenticalToCpuQGemm) {
  std::mt19937 rng(7);
  for (const Case& c : kCases) {
    for (int64_t k : {24, 200, 4104}) {
      // Act order permutes whole groups: K a multiple of the group size.
      const int64_t kk = c.act_order ? (k / c.int4_group + 1) * c.int4_group : k;
      for (int64_t n : {7, 37}) {
        QMatrix q = make_matrix(c, n, kk, rng);
        DeviceQMatrix d = upload(q);
        for (int64_t m : {1, 3, 17}) {
          SCOPED_TRACE(testing::Message()
                       << describe(c) << " m=" << m << " n=" << n << " k=" << kk);
          const int64_t ldx = kk + 3, ldy = n + 2;
          std::vector<float> x = make_activations(m, ldx, kk, rng);
          std::vector<float> expected(static_cast<size_t>(m * ldy), -7.0f);
          cpu::qgemm(cpu::QGemmArgs{x.data(), ldx, q.view, expected.data(), ldy, m});
          DeviceBuffer x_device = to_device(x);
          DeviceBuffer y = to_device(std::vector<float>(expected.size(), -7.0f));
          cuda::qgemm(cuda::QGemmArgs{x_device.as<float>(), ldx, d.view, y.as<float>(), ldy, m});
          ASSERT_TRUE(same_bits(to_host<float>(y, expected.size()), expected));
        }
      }
    }
  }
}

// A row's bits do not depend on the batch: row r of M = 17 equals the same row alone.
TEST_F(CudaQGemm, RowsAreBatchInvariant) {
  std::mt19937 rng(11);
  const int64_t n = 21, k = 200, m = 17;
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const int64_t kk = c.act_order ? 224 : k;
    QMatrix q = make_matrix(c, n, kk, rng);
    DeviceQMatrix d = upload(q);
    std::vector<float> x = make_activations(m, kk, kk, rng);
    DeviceBuffer x_device = to_device(x);
    DeviceBuffer y_batch(static_cast<size_t>(m * n) * sizeof(float));
    cuda::qgemm(cuda::QGemmArgs{x_device.as<float>(), kk, d.view, y_batch.as<float>(), n, m});
    const std::vector<float> batch = to_host<float>(y_batch, static_cast<size_t>(m * n));
    DeviceBuffer y_row(static_cast<size_t>(n) * sizeof(float));
    for (int64_t row : {int64_t{0}, int64_t{5}, m - 1}) {
      cuda::qgemm(
          cuda::QGemmArgs{x_device.as<float>() + row * kk, kk, d.view, y_row.as<float>(), n, 1});
      EXPECT_TRUE(
          same_bits(to_host<float>(y_row, static_cast<size_t>(n)),
                    std::vector<float>(batch.begin() + row * n, batch.begin() + (row + 1) * n)))
          << "row " << row;
    }
  }
}

// ---- the grouped GEMM ----

// Runs the grouped GEMM on `matrices` (one per group) over rows split by `offsets`, and its CPU
// reference (cpu::matmul per group); y rows outside [offsets[first_group], offsets.back()) stay
// -7. The device view of group `misfit_group` is made one 16-block wider than k (the CPU skips
// that group).
struct GroupedRun {
  std::vector<float> gpu, cpu;
};
GroupedRun run_grouped(const std::vector<QMatrix>& matrices, const std::vector<int32_t>& offsets,
                       int64_t n, int64_t k, std::mt19937& rng, int64_t first_group = 0,
                       int64_t misfit_group = -1) {
  const int64_t total_rows = offsets.back();
  const int64_t ldx = k + 1, ldy = n + 3;
  std::vector<float> x = make_activations(total_rows, ldx, k, rng);
  GroupedRun run;
  run.cpu.assign(static_cast<size_t>(total_rows * ldy), -7.0f);
  std::vector<DeviceQMatrix> device;
  std::vector<WeightView> views;
  int64_t max_rows = 0;
  for (size_t g = static_cast<size_t>(first_group); g < matrices.size(); ++g) {
    const int64_t first = offsets[g], rows = offsets[g + 1] - first;
    max_rows = std::max(max_rows, rows);
    if (rows > 0 && static_cast<int64_t>(g) != misfit_group)
      cpu::matmul(x.data() + first * ldx, ldx, matrices[g].view, run.cpu.data() + first * ldy, ldy,
                  rows);
    device.push_back(upload(matrices[g]));
    views.push_back(device.back().view);
    if (static_cast<int64_t>(g) == misfit_group) views.back().cols += 16;
  }
  DeviceBuffer views_device(views.size() * sizeof(WeightView));
  views_device.upload(views.data(), views.size() * sizeof(WeightView));
  DeviceBuffer x_device = to_device(x), offsets_device = to_device(offsets);
  DeviceBuffer y = to_device(std::vector<float>(run.cpu.size(), -7.0f));
  const int64_t num_groups = static_cast<int64_t>(matrices.size()) - first_group;
  cuda::qgemm_grouped(cuda::GroupedQGemmArgs{
      x_device.as<float>(), ldx, views_device.as<WeightView>(), y.as<float>(), ldy,
      offsets_device.as<int32_t>() + first_group, num_groups, max_rows, total_rows + 5, n, k});
  run.gpu = to_host<float>(y, run.cpu.size());
  return run;
}

TEST_F(CudaQGemm, GroupedEqualsCpuQGemmPerGroup) {
  std::mt19937 rng(13);
  const std::vector<int32_t> offsets = {0, 3, 3, 20, 21, 41};  // an empty group, uneven ones
  const int64_t n = 37;
  for (const Case& c : kCases) {
    const int64_t k = c.act_order ? 224 : 200;
    std::vector<QMatrix> matrices;
    for (size_t g = 0; g + 1 < offsets.size(); ++g) {
      Case group_case = c;
      // W4A4 groups each with their own input scale, one group without.
      if (c.input_scale > 0) group_case.input_scale = g == 2 ? 0.0f : c.input_scale * float(g + 1);
      matrices.push_back(make_matrix(group_case, n, k, rng));
    }
    SCOPED_TRACE(describe(c));
    GroupedRun all = run_grouped(matrices, offsets, n, k, rng);
    EXPECT_TRUE(same_bits(all.gpu, all.cpu));
    // Groups 2.. only, offsets read from offsets[2] = 3 on (the backend's per-expert path).
    GroupedRun subset = run_grouped(matrices, offsets, n, k, rng, /*first_group=*/2);
    EXPECT_TRUE(same_bits(subset.gpu, subset.cpu));
  }
}

TEST_F(CudaQGemm, GroupedMixesFormatsAndDenseViews) {
  std::mt19937 rng(17);
  const int64_t n = 19, k = 192;
  const std::vector<Case> cases = {{WeightFormat::kNvfp4, 0, false, 0.02f},
                                   {WeightFormat::kInt4, 32, true},
                                   {WeightFormat::kFp8Block},
                                   {WeightFormat::kMxfp4},
                                   {WeightFormat::kDense, 0, false, 0, DType::kBF16},
                                   {WeightFormat::kDense, 0, false, 0, DType::kF32},
                                   {WeightFormat::kNvfp4}};
  std::vector<QMatrix> matrices;
  for (const Case& c : cases) matrices.push_back(make_matrix(c, n, k, rng));
  const std::vector<int32_t> offsets = {0, 2, 19, 20, 20, 25, 42, 43};
  GroupedRun run = run_grouped(matrices, offsets, n, k, rng);
  EXPECT_TRUE(same_bits(run.gpu, run.cpu));
}

TEST_F(CudaQGemm, GroupedViewThatDoesNotFitGivesNanRows) {
  std::mt19937 rng(19);
  const int64_t n = 9, k = 64, ldy = n + 3;
  std::vector<QMatrix> matrices;
  for (int g = 0; g < 3; ++g) matrices.push_back(make_matrix({WeightFormat::kFp8Block}, n, k, rng));
  const std::vector<int32_t> offsets = {0, 4, 9, 12};
  GroupedRun run = run_grouped(matrices, offsets, n, k, rng, 0, /*misfit_group=*/1);
  for (int64_t row = 0; row < offsets.back(); ++row) {
    for (int64_t col = 0; col < n; ++col) {
      const size_t at = static_cast<size_t>(row * ldy + col);
      if (row >= offsets[1] && row < offsets[2]) {
        EXPECT_TRUE(std::isnan(run.gpu[at])) << "row " << row << " col " << col;
      } else {
        EXPECT_EQ(float_bits(run.gpu[at]), float_bits(run.cpu[at])) << "row " << row;
      }
    }
  }
}

// ---- the CUDA backend: quantized matmul and expert FFN against the CPU backend ----

TEST_F(CudaQGemm, BackendMatmulAndExpertsEqualTheCpuBackend) {
  std::mt19937 rng(23);
  std::unique_ptr<Backend> cpu_backend = make_cpu_backend();
  std::unique_ptr<Backend> cuda_backend = make_cuda_backend(0, GpuGemm::kCublas);

  // matmul: quantized views take the canonical quantized GEMM even in cuBLAS mode.
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const int64_t m = 5, n = 33, k = c.act_order ? 160 : 136;
    QMatrix q = make_matrix(c, n, k, rng);
    DeviceQMatrix d = upload(q);
    std::vector<float> x = make_activations(m, k, k, rng);
    std::vector<float> expected(static_cast<size_t>(m * n));
    cpu_backend->matmul(x.data(), q.view, expected.data(), m);
    DeviceBuffer x_device = to_device(x), y(expected.size() * sizeof(float));
    cuda_backend->matmul(x_device.as<float>(), d.view, y.as<float>(), m);
    EXPECT_TRUE(same_bits(to_host<float>(y, expected.size()), expected));
  }

  // moe_experts: 3 local experts, NVFP4 W4A4 gate_up and int4 act-order down, one expert empty.
  const int64_t hidden = 72, inter = 40, num_tokens = 9;
  const std::vector<int32_t> offsets = {0, 4, 4, 9};
  const int64_t num_local = 3, rows = offsets.back();
  std::vector<QMatrix> gate_up, down;
  std::vector<DeviceQMatrix> gate_up_device, down_device;
  std::vector<WeightView> gate_up_host_views, down_host_views, gate_up_views, down_views;
  for (int64_t e = 0; e < num_local; ++e) {
    gate_up.push_back(make_matrix({WeightFormat::kNvfp4, 0, false, 0.01f * float(e + 1)}, 2 * inter,
                                  hidden, rng));
    down.push_back(make_matrix({WeightFormat::kInt4, 8, true}, hidden, inter, rng));
  }
  for (int64_t e = 0; e < num_local; ++e) {
    gate_up_device.push_back(upload(gate_up[e]));
    down_device.push_back(upload(down[e]));
    gate_up_host_views.push_back(gate_up[e].view);
    down_host_views.push_back(down[e].view);
    gate_up_views.push_back(gate_up_device.back().view);
    down_views.push_back(down_device.back().view);
  }
  DeviceBuffer gate_up_table = to_device(gate_up_views), down_table = to_device(down_views);
  std::vector<float> expert_in = make_activations(rows, hidden, hidden, rng);

  Backend::MoeDispatch cpu_dispatch;
  cpu_dispatch.offsets = offsets.data();
  cpu_dispatch.num_local = num_local;
  cpu_dispatch.num_tokens = num_tokens;
  cpu_dispatch.top_k = 1;
  Backend::ExpertTable cpu_table;
  cpu_table.gate_up_views = gate_up_host_views.data();
  cpu_table.down_views = down_host_views.data();
  cpu_table.hidden = hidden;
  cpu_table.inter = inter;
  std::vector<float> mid(static_cast<size_t>(rows * 2 * inter)),
      act(static_cast<size_t>(rows * inter));
  std::vector<float> expected(static_cast<size_t>(rows * hidden));
  cpu_backend->moe_experts(expert_in.data(), cpu_dispatch, cpu_table, mid.data(), act.data(),
                           expected.data(), nullptr);

  DeviceBuffer offsets_device = to_device(offsets), in_device = to_device(expert_in);
  DeviceBuffer mid_device(mid.size() * sizeof(float)), act_device(act.size() * sizeof(float));
  Backend::MoeDispatch dispatch = cpu_dispatch;
  dispatch.offsets = offsets_device.as<int32_t>();
  Backend::ExpertTable table = cpu_table;
  table.gate_up_views = gate_up_table.as<WeightView>();
  table.down_views = down_table.as<WeightView>();
  for (bool timed : {false, true}) {
    SCOPED_TRACE(timed ? "timed, expert by expert" : "untimed, all experts at once");
    DeviceBuffer out = to_device(std::vector<float>(expected.size(), -7.0f));
    std::vector<double> seconds(static_cast<size_t>(num_local)), starts(seconds.size());
    const Backend::ExpertTimes times{seconds.data(), starts.data()};
    cuda_backend->moe_experts(in_device.as<float>(), dispatch, table, mid_device.as<float>(),
                              act_device.as<float>(), out.as<float>(), timed ? &times : nullptr);
    EXPECT_TRUE(same_bits(to_host<float>(out, expected.size()), expected));
  }
}

}  // namespace
}  // namespace keel
