// GEMM benchmark: y[M, N] = x[M, K] * w[N, K]^T on one core, for a list of M.
//
// In the same run it measures the two machine ceilings the GEMM is judged against:
//  - peak fp32 FMA rate of one core: independent register-resident FMA chains on the active
//    ISA (enough chains to cover FMA latency on every current x86 core);
//  - single-core memory read bandwidth: a vectorised streaming sum over a buffer far larger
//    than the last-level cache (1 GiB by default).
// For each M it reports time per call, GFLOP/s, achieved weight-read GB/s and both fractions.
// The weights are rotated through enough copies to exceed the L3 several times, so decode
// (M = 1) really streams them from DRAM as a model's layers would. A sample of outputs is
// verified bit for bit against canonical_dot (canonical_qdot for --format nvfp4/mxfp4/fp8/int4,
// whose weight_bytes and GB/s count the packed bytes: codes + scales + zeros + row scales); a
// mismatch makes the program exit with status 1.
// Output: one JSON object on stdout; progress goes to stderr.
//
// Usage: gemm --help (flags: --n --k --format --dtype --m-list --isa --seconds --bw-mib).
// GCC 12 warns about the self-initialised "undefined" vectors inside its own AVX-512 intrinsics
// once they are inlined (GCC bug 105593); silence it for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/check.h"
#include "kernels/base/dtype.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/qgemm.h"
#include "kernels/math/quant_math.h"
#include "runtime/cli/flags.h"

namespace {

using keel::DType;
using keel::cpu::Isa;
using Clock = std::chrono::steady_clock;
using keel::bench::LargeBuffer;

struct Options {
  int64_t n = 4096;
  int64_t k = 4096;
  DType dtype = DType::kBF16;
  keel::math::WeightFormat format = keel::math::WeightFormat::kDense;
  std::vector<int64_t> m_list = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  std::string isa = "auto";
  double seconds = 1.0;
  int64_t bandwidth_buffer_mib = 1024;
};

constexpr const char* kUsage =
    "usage: gemm [flags]\n"
    "y[M, N] = x[M, K] * w[N, K]^T on one core for each M, against the core's FMA peak and\n"
    "memory bandwidth measured in the same run. One JSON object on stdout.\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "gemm: %s\n", message.c_str());
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::string dtype = "bf16";
  keel::flags::FlagSet flags("gemm", kUsage);
  flags.add_int("--n", &options.n, "N", "output features (rows of w)").at_least(1);
  flags.add_int("--k", &options.k, "K", "input features").at_least(1);
  std::string format = "dense";
  flags.add_choice("--format", &format, {"dense", "nvfp4", "mxfp4", "fp8", "int4"},
                   "weight format (dense uses --dtype; int4 is group 128)");
  flags.add_choice("--dtype", &dtype, {"bf16", "f16", "f32"}, "weight dtype (dense)");
  flags.add_int_list("--m-list", &options.m_list, "M,...", "batch rows to time").at_least(1);
  flags.add_choice("--isa", &options.isa, {"auto", "scalar", "avx2", "avx512"}, "kernel ISA");
  flags.add_double("--seconds", &options.seconds, "S", "timing budget per M").above(0);
  flags.add_int("--bw-mib", &options.bandwidth_buffer_mib, "MiB", "bandwidth buffer size")
      .at_least(1);
  flags.parse_or_exit(argc, argv);
  using keel::math::WeightFormat;
  options.format = format == "nvfp4"   ? WeightFormat::kNvfp4
                   : format == "mxfp4" ? WeightFormat::kMxfp4
                   : format == "fp8"   ? WeightFormat::kFp8Block
                   : format == "int4"  ? WeightFormat::kInt4
                                       : WeightFormat::kDense;
  options.dtype = dtype == "f32" ? DType::kF32 : dtype == "f16" ? DType::kF16 : DType::kBF16;
  return options;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return keel::cpu::detected_isa();
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  usage_error("unknown isa '" + name + "'");
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ---- Peak FMA rate: independent chains acc = acc * a + b, all in registers. ----
// Zen 4 and recent Intel cores retire two FMAs per cycle at 4-cycle latency, so 8 chains keep
// both pipes full; 16 (AVX-512) and 12 (AVX2) leave margin without spilling.

__attribute__((target("avx512f"))) double fma_chains_avx512(int64_t iterations) {
  constexpr int kChains = 16;
  __m512 acc[kChains];
  for (int chain = 0; chain < kChains; ++chain) acc[chain] = _mm512_set1_ps(0.01f * chain);
  const __m512 scale = _mm512_set1_ps(0.5f);
  const __m512 offset = _mm512_set1_ps(0.5f);
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
    for (int chain = 0; chain < kChains; ++chain) {
      acc[chain] = _mm512_fmadd_ps(acc[chain], scale, offset);
    }
  }
  __m512 total = _mm512_setzero_ps();
  for (int chain = 0; chain < kChains; ++chain) total = _mm512_add_ps(total, acc[chain]);
  volatile float sink = _mm512_reduce_add_ps(total);
  (void)sink;
  return 2.0 * 16 * kChains * static_cast<double>(iterations);
}

__attribute__((target("avx2,fma"))) double fma_chains_avx2(int64_t iterations) {
  constexpr int kChains = 12;
  __m256 acc[kChains];
  for (int chain = 0; chain < kChains; ++chain) acc[chain] = _mm256_set1_ps(0.01f * chain);
  const __m256 scale = _mm256_set1_ps(0.5f);
  const __m256 offset = _mm256_set1_ps(0.5f);
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int chain = 0; chain < kChains; ++chain) {
      acc[chain] = _mm256_fmadd_ps(acc[chain], scale, offset);
    }
  }
  __m256 total = _mm256_setzero_ps();
  for (int chain = 0; chain < kChains; ++chain) total = _mm256_add_ps(total, acc[chain]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  volatile float sink = lanes[0];
  (void)sink;
  return 2.0 * 8 * kChains * static_cast<double>(iterations);
}

// The scalar GEMM path issues one scalar fma at a time; its ceiling is the scalar FMA rate.
__attribute__((target("fma"))) double fma_chains_scalar(int64_t iterations) {
  constexpr int kChains = 12;
  float acc[kChains];
  for (int chain = 0; chain < kChains; ++chain) acc[chain] = 0.01f * chain;
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int chain = 0; chain < kChains; ++chain) {
      acc[chain] = __builtin_fmaf(acc[chain], 0.5f, 0.5f);
    }
  }
  float total = 0.0f;
  for (float value : acc) total += value;
  volatile float sink = total;
  (void)sink;
  return 2.0 * kChains * static_cast<double>(iterations);
}

double measure_peak_gflops(Isa isa) {
  auto run = [isa](int64_t iterations) {
    switch (isa) {
      case Isa::kAvx512:
        return fma_chains_avx512(iterations);
      case Isa::kAvx2:
        return fma_chains_avx2(iterations);
      case Isa::kScalar:
        break;
    }
    return fma_chains_scalar(iterations);
  };
  run(1 << 20);  // warm up clocks
  // Many short runs, best kept: on a shared machine some runs lose their time slice.
  double best = 0.0;
  for (int repeat = 0; repeat < 40; ++repeat) {
    const int64_t iterations = 2'000'000;
    Clock::time_point start = Clock::now();
    double flops = run(iterations);
    best = std::max(best, flops / seconds_since(start) / 1e9);
  }
  return best;
}

// ---- Operands ----

// Cheap deterministic values in [-1, 1): generating hundreds of MiB with mt19937 would
// dominate the run time.
struct SplitMix {
  uint64_t state;
  float next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(z >> 40) * 0x1.0p-23f - 1.0f;
  }
};

void fill_weights(void* w, DType dtype, int64_t count, SplitMix& rng) {
  for (int64_t i = 0; i < count; ++i) {
    float value = rng.next();
    switch (dtype) {
      case DType::kF32:
        static_cast<float*>(w)[i] = value;
        break;
      case DType::kBF16:
        static_cast<uint16_t*>(w)[i] = keel::f32_to_bf16(value);
        break;
      case DType::kF16:
        static_cast<uint16_t*>(w)[i] = keel::f32_to_f16(value);
        break;
    }
  }
}

// One copy of the weights in `format`: codes, then scales, zeros and row scales, each part
// 64-byte aligned inside the copy. `bytes` is what one GEMM call reads (the packed bytes).
struct PackedLayout {
  int64_t codes_bytes = 0;
  int64_t scales_offset = 0;
  int64_t zeros_offset = 0;
  int64_t row_scales_offset = 0;
  int64_t bytes = 0;            // codes + scales + zeros + row scales
  int64_t copy_stride = 0;      // bytes plus alignment padding
  keel::math::WeightView view;  // data pointers relative to 0
};

int64_t align64(int64_t bytes) {
  return (bytes + 63) / 64 * 64;
}

PackedLayout packed_layout(keel::math::WeightFormat format, DType dtype, int64_t n, int64_t k) {
  using keel::math::WeightFormat;
  PackedLayout layout;
  keel::math::WeightView& v = layout.view;
  v.format = format;
  v.dtype = dtype;
  v.rows = n;
  v.cols = k;
  if (format == WeightFormat::kDense) {
    v.ld = k;
    layout.codes_bytes = n * k * static_cast<int64_t>(keel::dtype_size(dtype));
    layout.bytes = layout.codes_bytes;
    layout.copy_stride = align64(layout.bytes);
    return layout;
  }
  v.group_size = format == WeightFormat::kNvfp4   ? keel::math::kNvfp4Group
                 : format == WeightFormat::kMxfp4 ? keel::math::kMxfp4Group
                 : format == WeightFormat::kInt4  ? 128
                                                  : keel::math::kFp8BlockGroup;
  v.ld = format == WeightFormat::kFp8Block ? k : (k + 1) / 2;
  v.scale_ld = (k + v.group_size - 1) / v.group_size;
  const int64_t scale_bytes =
      format == WeightFormat::kNvfp4 || format == WeightFormat::kMxfp4 ? 1 : 4;
  layout.codes_bytes = n * v.ld;
  const int64_t scales = n * v.scale_ld * scale_bytes;
  const int64_t zeros = format == WeightFormat::kInt4 ? n * v.scale_ld : 0;
  const int64_t row_scales = format == WeightFormat::kNvfp4 ? n * 4 : 0;
  layout.scales_offset = align64(layout.codes_bytes);
  layout.zeros_offset = layout.scales_offset + align64(scales);
  layout.row_scales_offset = layout.zeros_offset + align64(zeros);
  layout.bytes = layout.codes_bytes + scales + zeros + row_scales;
  layout.copy_stride = layout.row_scales_offset + align64(row_scales);
  return layout;
}

// The view of the copy at `base`.
keel::math::WeightView view_at(const PackedLayout& layout, const uint8_t* base) {
  keel::math::WeightView v = layout.view;
  v.data = base;
  if (v.format == keel::math::WeightFormat::kDense) return v;
  v.scales = base + layout.scales_offset;
  if (v.format == keel::math::WeightFormat::kInt4) v.zeros = base + layout.zeros_offset;
  if (v.format == keel::math::WeightFormat::kNvfp4) {
    v.row_scales = reinterpret_cast<const float*>(base + layout.row_scales_offset);
  }
  return v;
}

// Random codes with realistic scales (so outputs stay finite): NVFP4 E4M3 scales in
// [2^-4, 2^2), MXFP4 exponents near 2^0, fp32 scales ~ 2^-6, int4 zeros 0..16.
void fill_packed(const PackedLayout& layout, uint8_t* base, SplitMix& rng) {
  using keel::math::WeightFormat;
  const keel::math::WeightView& v = layout.view;
  if (v.format == WeightFormat::kDense) {
    fill_weights(base, v.dtype, v.rows * v.cols, rng);
    return;
  }
  auto random_byte = [&rng] { return static_cast<uint8_t>((rng.next() + 1.0f) * 127.99f); };
  for (int64_t i = 0; i < layout.codes_bytes; ++i) {
    uint8_t code = random_byte();
    if (v.format == WeightFormat::kFp8Block && (code & 0x7f) == 0x7f) code ^= 1;
    base[i] = code;
  }
  const int64_t num_scales = v.rows * v.scale_ld;
  for (int64_t i = 0; i < num_scales; ++i) {
    switch (v.format) {
      case WeightFormat::kNvfp4:
        base[layout.scales_offset + i] = static_cast<uint8_t>(0x18 + random_byte() % 0x30);
        break;
      case WeightFormat::kMxfp4:
        base[layout.scales_offset + i] = static_cast<uint8_t>(120 + random_byte() % 8);
        break;
      default:
        reinterpret_cast<float*>(base + layout.scales_offset)[i] = rng.next() * 0.015625f;
        break;
    }
  }
  if (v.format == WeightFormat::kInt4) {
    for (int64_t i = 0; i < num_scales; ++i) base[layout.zeros_offset + i] = random_byte() % 17;
  }
  if (v.format == WeightFormat::kNvfp4) {
    for (int64_t i = 0; i < v.rows; ++i) {
      reinterpret_cast<float*>(base + layout.row_scales_offset)[i] = 0.01f;
    }
  }
}

struct MResult {
  int64_t m;
  int64_t calls;
  double median_seconds;
  double min_seconds;
  int64_t verified_outputs;
  int64_t mismatches;
};

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  const Isa isa = parse_isa(options.isa);
  try {
    keel::cpu::set_active_isa(isa);
  } catch (const keel::Error& error) {
    std::fprintf(stderr, "gemm: %s\n", error.what());
    return 2;
  }
  const int64_t n = options.n;
  const int64_t k = options.k;
  const DType dtype = options.dtype;
  const keel::math::WeightFormat format = options.format;
  const std::string format_name(keel::math::weight_format_name(format));
  const std::string isa_name(keel::cpu::isa_name(isa));

  const double load_average = keel::bench::one_minute_load_average();
  std::fprintf(stderr, "gemm bench: n=%lld k=%lld format=%s dtype=%s isa=%s (load average %.2f)\n",
               static_cast<long long>(n), static_cast<long long>(k), format_name.c_str(),
               std::string(keel::dtype_name(dtype)).c_str(), isa_name.c_str(), load_average);
  const double peak_gflops = measure_peak_gflops(isa);
  std::fprintf(stderr, "peak fp32 FMA (one core, %s): %.1f GFLOP/s\n", isa_name.c_str(),
               peak_gflops);
  const double bandwidth_gbs = keel::bench::measure_read_bandwidth_gbs(
      static_cast<size_t>(options.bandwidth_buffer_mib) << 20, 1);
  std::fprintf(stderr, "memory read bandwidth (one core, %lld MiB stream): %.1f GB/s\n",
               static_cast<long long>(options.bandwidth_buffer_mib), bandwidth_gbs);

  // Enough weight copies that their total is at least 256 MiB, 8x a typical L3 slice.
  const PackedLayout layout = packed_layout(format, dtype, n, k);
  const int64_t weight_bytes = layout.bytes;  // packed: codes + scales + zeros + row scales
  const int64_t copy_stride = layout.copy_stride;
  const int64_t num_copies =
      std::max<int64_t>(1, ((int64_t{256} << 20) + weight_bytes - 1) / weight_bytes);
  LargeBuffer weights(static_cast<size_t>(copy_stride * num_copies));
  SplitMix rng{12345};
  fill_packed(layout, weights.as<uint8_t>(), rng);
  for (int64_t copy = 1; copy < num_copies; ++copy) {
    std::memcpy(weights.as<uint8_t>() + copy * copy_stride, weights.as<uint8_t>(),
                static_cast<size_t>(copy_stride));
  }
  const keel::math::WeightView first_view = view_at(layout, weights.as<uint8_t>());

  const int64_t max_m = *std::max_element(options.m_list.begin(), options.m_list.end());
  std::vector<float> x(static_cast<size_t>(max_m * k));
  for (float& value : x) value = rng.next();
  std::vector<float> y(static_cast<size_t>(max_m * n));

  std::vector<MResult> results;
  bool all_verified = true;
  int64_t next_copy = 0;
  for (int64_t m : options.m_list) {
    auto weight_copy = [&] {
      const uint8_t* copy = weights.as<uint8_t>() + next_copy * copy_stride;
      next_copy = (next_copy + 1) % num_copies;
      return copy;
    };
    keel::cpu::matmul(x.data(), k, view_at(layout, weight_copy()), y.data(), n, m);  // warm-up
    std::vector<double> call_seconds;
    Clock::time_point budget_start = Clock::now();
    while (call_seconds.size() < 3 || seconds_since(budget_start) < options.seconds) {
      const keel::math::WeightView w = view_at(layout, weight_copy());
      Clock::time_point start = Clock::now();
      keel::cpu::matmul(x.data(), k, w, y.data(), n, m);
      call_seconds.push_back(seconds_since(start));
    }
    std::sort(call_seconds.begin(), call_seconds.end());

    // Bit-exact check of a sample of the last call's outputs (all copies hold the same values).
    MResult result{m,
                   static_cast<int64_t>(call_seconds.size()),
                   call_seconds[call_seconds.size() / 2],
                   call_seconds.front(),
                   0,
                   0};
    std::mt19937_64 pick(static_cast<uint64_t>(m));
    const int64_t samples = std::min<int64_t>(256, m * n);
    for (int64_t sample = 0; sample < samples; ++sample) {
      int64_t row = static_cast<int64_t>(pick() % static_cast<uint64_t>(m));
      int64_t col = static_cast<int64_t>(pick() % static_cast<uint64_t>(n));
      float expected =
          format == keel::math::WeightFormat::kDense
              ? keel::cpu::canonical_dot(x.data() + row * k,
                                         weights.as<uint8_t>() + col * k * keel::dtype_size(dtype),
                                         dtype, k)
              : keel::cpu::canonical_qdot(x.data() + row * k, first_view, col);
      float actual = y[row * n + col];
      ++result.verified_outputs;
      if (keel::float_bits(expected) != keel::float_bits(actual)) {
        if (result.mismatches++ < 5) {
          std::fprintf(stderr, "MISMATCH m=%lld y[%lld,%lld]: canonical %.9g vs %.9g\n",
                       static_cast<long long>(m), static_cast<long long>(row),
                       static_cast<long long>(col), expected, actual);
        }
      }
    }
    all_verified = all_verified && result.mismatches == 0;
    const double gflops = 2.0 * m * n * k / result.median_seconds / 1e9;
    std::fprintf(
        stderr,
        "M=%4lld  %9.3f ms  %7.1f GFLOP/s (%4.1f%% of peak)  %6.1f GB/s weights "
        "(%4.1f%% of bw)  %s\n",
        static_cast<long long>(m), result.median_seconds * 1e3, gflops,
        100.0 * gflops / peak_gflops,
        static_cast<double>(weight_bytes) / result.median_seconds / 1e9,
        100.0 * static_cast<double>(weight_bytes) / result.median_seconds / 1e9 / bandwidth_gbs,
        result.mismatches == 0 ? "verified" : "MISMATCH");
    results.push_back(result);
  }

  nlohmann::json report;
  report["machine"] = {
      {"cpu", keel::bench::machine_name()}, {"threads", 1}, {"load_average", load_average}};
  report["isa"] = isa_name;
  report["format"] = format_name;
  if (format == keel::math::WeightFormat::kDense) {
    report["dtype"] = std::string(keel::dtype_name(dtype));
  }
  report["weight_bytes"] = weight_bytes;
  report["n"] = n;
  report["k"] = k;
  report["peak_gflops"] = peak_gflops;
  report["mem_bw_gbs"] = bandwidth_gbs;
  report["weight_copies"] = num_copies;
  report["verified"] = all_verified;
  nlohmann::json rows = nlohmann::json::array();
  for (const MResult& result : results) {
    // Rates from the median call; the *_best figures use the fastest call, comparable with the
    // best-of-many ceilings on a machine shared with other work.
    const double flops = 2.0 * static_cast<double>(result.m * n * k);
    const double gflops = flops / result.median_seconds / 1e9;
    const double gflops_best = flops / result.min_seconds / 1e9;
    const double weight_gbs = static_cast<double>(weight_bytes) / result.median_seconds / 1e9;
    const double weight_gbs_best = static_cast<double>(weight_bytes) / result.min_seconds / 1e9;
    rows.push_back({{"m", result.m},
                    {"calls", result.calls},
                    {"median_ms", result.median_seconds * 1e3},
                    {"min_ms", result.min_seconds * 1e3},
                    {"gflops", gflops},
                    {"weight_gbs", weight_gbs},
                    {"fraction_of_peak_fma", gflops / peak_gflops},
                    {"fraction_of_mem_bw", weight_gbs / bandwidth_gbs},
                    {"gflops_best", gflops_best},
                    {"weight_gbs_best", weight_gbs_best},
                    {"fraction_of_peak_fma_best", gflops_best / peak_gflops},
                    {"fraction_of_mem_bw_best", weight_gbs_best / bandwidth_gbs},
                    {"verified_outputs", result.verified_outputs},
                    {"mismatches", result.mismatches}});
  }
  report["results"] = rows;
  std::printf("%s\n", report.dump(2).c_str());
  return all_verified ? 0 : 1;
}
