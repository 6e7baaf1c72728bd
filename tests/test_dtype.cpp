// Tests for the fp32 <-> bf16/f16 conversions in kernels/base/dtype.h.
//
// The references here are written from the IEEE 754 definition rather than from bit tricks:
// a value rounds to the nearer of its two neighbouring representable values, ties go to the
// one with an even significand, and (as if the exponent were unbounded) anything that rounds
// beyond the largest finite value becomes infinity. Neighbour distances are compared in double;
// they are exact because the neighbours lo <= x <= hi satisfy hi <= 2 * lo (Sterbenz) or lo = 0.
// Exhaustive over all 16-bit patterns; millions of random and structured fp32 inputs otherwise.
// An optional cross-check against numpy/torch runs when Python has them.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/buffer.h"
#include "kernels/base/dtype.h"
#include "kernels/base/host_memory.h"

namespace keel {
namespace {

bool bf16_is_nan(uint16_t bits) {
  return (bits & 0x7fffu) > 0x7f80u;
}
bool f16_is_nan(uint16_t bits) {
  return (bits & 0x7fffu) > 0x7c00u;
}

// Value of a 16-bit pattern decoded straight from the definition, as double.
double f16_value(uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 31) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                         : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

double bf16_value(uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 7) & 0xff;
  const int mantissa = bits & 0x7f;
  double magnitude;
  if (exponent == 255) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                         : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -133);
  } else {
    magnitude = std::ldexp(128 + mantissa, exponent - 134);
  }
  return sign ? -magnitude : magnitude;
}

// Rounds |x| to the nearer of the magnitudes `lo_bits` (value lo) and lo_bits + 1 (value hi);
// ties go to the even pattern. Both patterns are positive; the caller adds the sign.
uint16_t nearest_of(double x, uint16_t lo_bits, double lo, double hi) {
  const double below = x - lo;
  const double above = hi - x;
  if (below < above) return lo_bits;
  if (above < below) return static_cast<uint16_t>(lo_bits + 1);
  return (lo_bits & 1u) ? static_cast<uint16_t>(lo_bits + 1) : lo_bits;
}

// IEEE round-to-nearest-even fp32 -> bf16 (NaN handled by the caller).
uint16_t reference_f32_to_bf16(float value) {
  const uint16_t sign = (float_bits(value) >> 16) & 0x8000u;
  const double x = std::fabs(static_cast<double>(value));
  if (std::isinf(x)) return sign | 0x7f80u;
  // Largest bf16 pattern whose value is <= x: bf16 values are fp32 values with the low 16 bits
  // zero, so that is truncation of the magnitude.
  const uint16_t lo_bits = static_cast<uint16_t>((float_bits(value) & 0x7fffffffu) >> 16);
  const double lo = bf16_value(lo_bits);
  if (lo == x) return sign | lo_bits;
  // Above the largest finite value (0x7f7f) the next step is 2^128 with unbounded exponent,
  // which is what pattern 0x7f80 would mean; rounding up to it yields infinity.
  const double hi = lo_bits == 0x7f7fu ? std::ldexp(1.0, 128) : bf16_value(lo_bits + 1);
  return sign | nearest_of(x, lo_bits, lo, hi);
}

// IEEE round-to-nearest-even fp32 -> f16 (NaN handled by the caller).
uint16_t reference_f32_to_f16(float value) {
  const uint16_t sign = (float_bits(value) >> 16) & 0x8000u;
  const double x = std::fabs(static_cast<double>(value));
  // 65504 is the largest finite f16; with unbounded exponent the next value is 65536, and the
  // midpoint 65520 ties to it (65504 has an odd significand). Both round to infinity.
  if (x >= 65520.0) return sign | 0x7c00u;
  // Binary search for the largest finite positive pattern <= x (positive patterns are ordered
  // like their values).
  uint16_t low = 0, high = 0x7bff;
  while (low < high) {
    uint16_t middle = static_cast<uint16_t>((low + high + 1) / 2);
    if (f16_value(middle) <= x) {
      low = middle;
    } else {
      high = static_cast<uint16_t>(middle - 1);
    }
  }
  const double lo = f16_value(low);
  if (lo == x) return sign | low;
  const double hi = low == 0x7bffu ? 65536.0 : f16_value(low + 1);
  return sign | nearest_of(x, low, lo, hi);
}

// Checks the conversion of one fp32 bit pattern against the references.
::testing::AssertionResult bf16_matches(uint32_t bits) {
  const float value = bits_float(bits);
  const uint16_t got = f32_to_bf16(value);
  if (std::isnan(value)) {
    if (bf16_is_nan(got) && (got & 0x8000u) == ((bits >> 16) & 0x8000u)) {
      return ::testing::AssertionSuccess();
    }
  } else if (got == reference_f32_to_bf16(value)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << std::hex << "f32 bits 0x" << bits << " -> bf16 0x" << got << ", reference 0x"
         << (std::isnan(value) ? 0x7fc0 : reference_f32_to_bf16(value));
}

::testing::AssertionResult f16_matches(uint32_t bits) {
  const float value = bits_float(bits);
  const uint16_t got = f32_to_f16(value);
  if (std::isnan(value)) {
    if (f16_is_nan(got) && (got & 0x8000u) == ((bits >> 16) & 0x8000u)) {
      return ::testing::AssertionSuccess();
    }
  } else if (got == reference_f32_to_f16(value)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << std::hex << "f32 bits 0x" << bits << " (" << value << ") -> f16 0x" << got
         << ", reference 0x" << (std::isnan(value) ? 0x7e00 : reference_f32_to_f16(value));
}

float next_up(float value) {
  return std::nextafter(value, std::numeric_limits<float>::infinity());
}
float next_down(float value) {
  return std::nextafter(value, -std::numeric_limits<float>::infinity());
}

// ---- bf16 ------------------------------------------------------------------------------------

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  EXPECT_EQ(dtype_name(DType::kF32), "F32");
  EXPECT_EQ(dtype_name(DType::kBF16), "BF16");
  EXPECT_EQ(dtype_name(DType::kF16), "F16");
}

TEST(DTypeTest, Bf16AllPatternsRoundTrip) {
  for (uint32_t pattern = 0; pattern <= 0xffffu; ++pattern) {
    const uint16_t bits = static_cast<uint16_t>(pattern);
    const float value = bf16_to_f32(bits);
    ASSERT_EQ(float_bits(value), pattern << 16) << std::hex << pattern;
    const uint16_t back = f32_to_bf16(value);
    if (bf16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << pattern;
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << pattern << " -> " << back;
      ASSERT_EQ(back & 0x8000u, bits & 0x8000u) << std::hex << pattern;
    } else {
      ASSERT_EQ(back, bits) << std::hex << pattern;
      ASSERT_EQ(static_cast<double>(value), bf16_value(bits)) << std::hex << pattern;
    }
  }
}

TEST(DTypeTest, Bf16HalfwayAndSpecialCases) {
  struct Case {
    uint32_t f32_bits;
    uint16_t bf16_bits;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80u},  // 1.0
      {0x3f808000u, 0x3f80u},  // 1 + 2^-8: halfway, 0x3f80 is even -> down
      {0x3f818000u, 0x3f82u},  // 1 + 3*2^-8: halfway, 0x3f81 is odd -> up
      {0x3f807fffu, 0x3f80u},  // just below halfway
      {0x3f808001u, 0x3f81u},  // just above halfway
      {0xbf808000u, 0xbf80u},  // negative mirror: sign does not change the tie rule
      {0xbf818000u, 0xbf82u}, {0x3fffffffu, 0x4000u},  // carry ripples into the exponent
      {0x7f7f7fffu, 0x7f7fu},  // just below the overflow midpoint stays finite
      {0x7f7f8000u, 0x7f80u},  // midpoint above max finite (odd) -> infinity
      {0x7f7fffffu, 0x7f80u},  // FLT_MAX -> infinity
      {0xff7fffffu, 0xff80u}, {0x7f800000u, 0x7f80u},  // +inf
      {0xff800000u, 0xff80u},                          // -inf
      {0x00000000u, 0x0000u}, {0x80000000u, 0x8000u},  // -0 keeps its sign
      {0x00008000u, 0x0000u},                          // subnormal halfway to even zero
      {0x00018000u, 0x0002u},                          // subnormal halfway, odd -> up
      {0x00000001u, 0x0000u},                          // smallest fp32 subnormal
      {0x007fffffu, 0x0080u},  // largest subnormal rounds up to the smallest normal
  };
  for (const Case& test_case : cases) {
    EXPECT_EQ(f32_to_bf16(bits_float(test_case.f32_bits)), test_case.bf16_bits)
        << std::hex << "f32 bits 0x" << test_case.f32_bits;
    EXPECT_TRUE(bf16_matches(test_case.f32_bits));
  }
  // NaNs stay NaN, including payloads that live only in the low 16 bits (plain truncation would
  // turn 0x7f800001 into infinity).
  for (uint32_t nan_bits : {0x7f800001u, 0x7fc00000u, 0xffc00001u, 0x7fffffffu, 0xff800001u}) {
    const uint16_t got = f32_to_bf16(bits_float(nan_bits));
    EXPECT_TRUE(bf16_is_nan(got)) << std::hex << nan_bits << " -> " << got;
    EXPECT_EQ(got & 0x8000u, (nan_bits >> 16) & 0x8000u) << std::hex << nan_bits;
  }
}

TEST(DTypeTest, Bf16RandomAgainstReference) {
  std::mt19937 generator(20240601u);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 4'000'000; ++i) {
    const uint32_t bits = any_bits(generator);
    ASSERT_TRUE(bf16_matches(bits));
  }
  // Values near the decision points: every bf16 neighbourhood in a band of exponents, at the
  // midpoint and one fp32 ulp either side.
  for (uint32_t upper = 0x3f00u; upper < 0x4100u; ++upper) {
    const uint32_t midpoint = (upper << 16) | 0x8000u;
    for (uint32_t bits : {midpoint - 1, midpoint, midpoint + 1, upper << 16}) {
      ASSERT_TRUE(bf16_matches(bits));
      ASSERT_TRUE(bf16_matches(bits | 0x80000000u));
    }
  }
}

// ---- f16 -------------------------------------------------------------------------------------

TEST(DTypeTest, F16AllPatternsRoundTrip) {
  for (uint32_t pattern = 0; pattern <= 0xffffu; ++pattern) {
    const uint16_t bits = static_cast<uint16_t>(pattern);
    const float value = f16_to_f32(bits);
    const uint16_t back = f32_to_f16(value);
    if (f16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << pattern;
      ASSERT_TRUE(f16_is_nan(back)) << std::hex << pattern << " -> " << back;
      ASSERT_EQ(back & 0x8000u, bits & 0x8000u) << std::hex << pattern;
      continue;
    }
    // Decoding is exact (subnormals included): compare with the definition.
    ASSERT_EQ(static_cast<double>(value), f16_value(bits)) << std::hex << pattern;
    ASSERT_EQ(std::signbit(value), (bits & 0x8000u) != 0) << std::hex << pattern;
    ASSERT_EQ(back, bits) << std::hex << pattern;
  }
}

TEST(DTypeTest, F16HalfwayAndSpecialCases) {
  struct Case {
    float value;
    uint16_t f16_bits;
  };
  const Case cases[] = {
      {1.0f, 0x3c00u},
      {1.0f + 0x1p-11f, 0x3c00u},      // halfway, 0x3c00 even -> down
      {1.0f + 3 * 0x1p-11f, 0x3c02u},  // halfway, 0x3c01 odd -> up
      {next_up(1.0f + 0x1p-11f), 0x3c01u},
      {next_down(1.0f + 3 * 0x1p-11f), 0x3c01u},
      {-(1.0f + 3 * 0x1p-11f), 0xbc02u},
      {2047.5f, 0x6800u},              // halfway between 2047 (odd) and 2048: carry into exponent
      {2046.5f, 0x67feu},              // halfway between 2046 (even) and 2047
      {65504.0f, 0x7bffu},             // max finite
      {next_down(65520.0f), 0x7bffu},  // just below the overflow midpoint
      {65520.0f, 0x7c00u},             // overflow midpoint ties to "65536" -> infinity
      {-65520.0f, 0xfc00u},
      {65536.0f, 0x7c00u},
      {1e10f, 0x7c00u},
      {std::numeric_limits<float>::max(), 0x7c00u},
      {std::numeric_limits<float>::infinity(), 0x7c00u},
      {-std::numeric_limits<float>::infinity(), 0xfc00u},
      {0.0f, 0x0000u},
      {-0.0f, 0x8000u},
      {0x1p-14f, 0x0400u},             // smallest normal
      {next_down(0x1p-14f), 0x0400u},  // rounds up out of the subnormal range
      {1023.5f * 0x1p-24f, 0x0400u},   // halfway between largest subnormal (odd) and 2^-14
      {1022.5f * 0x1p-24f, 0x03feu},   // halfway, 0x3fe even -> down
      {0x1p-24f, 0x0001u},             // smallest subnormal
      {0x1p-25f, 0x0000u},             // halfway between 0 (even) and 2^-24 -> 0
      {next_up(0x1p-25f), 0x0001u},
      {-0x1p-25f, 0x8000u},     // negative underflow keeps the sign
      {3 * 0x1p-25f, 0x0002u},  // 1.5 units: halfway, 1 odd -> 2
      {5 * 0x1p-25f, 0x0002u},  // 2.5 units: halfway, 2 even -> 2
      {next_down(5 * 0x1p-25f), 0x0002u},
      {next_up(5 * 0x1p-25f), 0x0003u},
      {0x1p-149f, 0x0000u},  // fp32 subnormal input
      {0x1p-126f, 0x0000u},
  };
  for (const Case& test_case : cases) {
    EXPECT_EQ(f32_to_f16(test_case.value), test_case.f16_bits) << std::hexfloat << test_case.value;
    EXPECT_TRUE(f16_matches(float_bits(test_case.value)));
  }
  for (uint32_t nan_bits : {0x7f800001u, 0x7fc00000u, 0xffc00001u, 0x7f801fffu, 0xff800001u}) {
    const uint16_t got = f32_to_f16(bits_float(nan_bits));
    EXPECT_TRUE(f16_is_nan(got)) << std::hex << nan_bits << " -> " << got;
    EXPECT_EQ(got & 0x8000u, (nan_bits >> 16) & 0x8000u) << std::hex << nan_bits;
  }
}

TEST(DTypeTest, F16RandomAgainstReference) {
  std::mt19937 generator(20240602u);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 2'000'000; ++i) ASSERT_TRUE(f16_matches(any_bits(generator)));
  // Uniform bit patterns mostly land far outside f16's range; also draw exponents from the
  // interesting band: below the smallest subnormal up to beyond the overflow threshold.
  std::uniform_int_distribution<uint32_t> exponent(101, 144);
  std::uniform_int_distribution<uint32_t> mantissa(0, 0x7fffff);
  for (int i = 0; i < 2'000'000; ++i) {
    const uint32_t sign = (i & 1) ? 0x80000000u : 0u;
    ASSERT_TRUE(f16_matches(sign | (exponent(generator) << 23) | mantissa(generator)));
  }
}

TEST(DTypeTest, F16EveryMidpointAgainstReference) {
  // For every finite positive f16 value: the value, the midpoint to the next one, and one fp32
  // ulp either side of each, with both signs.
  for (uint16_t bits = 0; bits <= 0x7bffu; ++bits) {
    const double lo = f16_value(bits);
    const double hi = bits == 0x7bffu ? 65536.0 : f16_value(static_cast<uint16_t>(bits + 1));
    const float value = static_cast<float>(lo);
    const float midpoint = static_cast<float>((lo + hi) / 2);  // exact in fp32
    ASSERT_EQ(static_cast<double>(midpoint), (lo + hi) / 2);
    for (float probe : {value, next_up(value), next_down(value), midpoint, next_up(midpoint),
                        next_down(midpoint)}) {
      ASSERT_TRUE(f16_matches(float_bits(probe)));
      ASSERT_TRUE(f16_matches(float_bits(-probe)));
    }
  }
}

TEST(DTypeTest, RoundToDtypeAndLoad) {
  EXPECT_EQ(round_to_dtype(1.0f + 0x1p-11f, DType::kF16), 1.0f);
  EXPECT_EQ(round_to_dtype(1.0f + 3 * 0x1p-8f, DType::kBF16), 1.0f + 0x1p-6f);
  EXPECT_EQ(round_to_dtype(1.0f + 0x1p-20f, DType::kF32), 1.0f + 0x1p-20f);
  const uint16_t bf16_data[] = {0x3f80u, 0xc000u};
  const uint16_t f16_data[] = {0x3c00u, 0xc000u};
  const float f32_data[] = {0.5f, -3.0f};
  EXPECT_EQ(load_as_f32(bf16_data, DType::kBF16, 1), -2.0f);
  EXPECT_EQ(load_as_f32(f16_data, DType::kF16, 1), -2.0f);
  EXPECT_EQ(load_as_f32(f32_data, DType::kF32, 1), -3.0f);
}

// ---- optional cross-check against numpy (f16) and torch (bf16) -----------------------------

TEST(DTypeTest, MatchesNumpyAndTorch) {
  if (std::system("python3 -c 'import numpy' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "python3 with numpy not available; numpy/torch cross-check skipped";
  }
  const bool have_torch = std::system("python3 -c 'import torch' >/dev/null 2>&1") == 0;
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("keel_test_dtype_" + std::to_string(::getpid()));
  fs::create_directories(dir);

  // Inputs: random patterns, the f16-relevant band, and all f16 midpoints.
  std::vector<uint32_t> inputs;
  std::mt19937 generator(7u);
  std::uniform_int_distribution<uint32_t> any_bits;
  std::uniform_int_distribution<uint32_t> exponent(101, 144);
  for (int i = 0; i < 200'000; ++i) inputs.push_back(any_bits(generator));
  for (int i = 0; i < 200'000; ++i) {
    inputs.push_back((any_bits(generator) & 0x807fffffu) | (exponent(generator) << 23));
  }
  for (uint16_t bits = 0; bits < 0x7bffu; ++bits) {
    const double midpoint = (f16_value(bits) + f16_value(static_cast<uint16_t>(bits + 1))) / 2;
    inputs.push_back(float_bits(static_cast<float>(midpoint)));
  }
  {
    std::ofstream out(dir / "inputs.bin", std::ios::binary);
    out.write(reinterpret_cast<const char*>(inputs.data()),
              static_cast<std::streamsize>(inputs.size() * sizeof(uint32_t)));
  }
  {
    std::ofstream script(dir / "convert.py");
    script << R"PY(
import sys, numpy as np
d = sys.argv[1]
x = np.fromfile(d + "/inputs.bin", dtype="<u4").view(np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    x.astype(np.float16).view("<u2").tofile(d + "/f16.bin")
if sys.argv[2] == "1":
    import torch
    torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("<u2").tofile(
        d + "/bf16.bin")
)PY";
  }
  const std::string command = "python3 '" + (dir / "convert.py").string() + "' '" + dir.string() +
                              "' " + (have_torch ? "1" : "0");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;

  auto read_halves = [&](const char* name) {
    std::vector<uint16_t> halves(inputs.size());
    std::ifstream in(dir / name, std::ios::binary);
    in.read(reinterpret_cast<char*>(halves.data()),
            static_cast<std::streamsize>(halves.size() * sizeof(uint16_t)));
    EXPECT_EQ(static_cast<size_t>(in.gcount()), halves.size() * sizeof(uint16_t)) << name;
    return halves;
  };
  const std::vector<uint16_t> numpy_f16 = read_halves("f16.bin");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const uint16_t ours = f32_to_f16(bits_float(inputs[i]));
    if (f16_is_nan(numpy_f16[i])) {
      ASSERT_TRUE(f16_is_nan(ours)) << std::hex << inputs[i];
    } else {
      ASSERT_EQ(ours, numpy_f16[i]) << std::hex << "f32 bits 0x" << inputs[i];
    }
  }
  if (have_torch) {
    const std::vector<uint16_t> torch_bf16 = read_halves("bf16.bin");
    for (size_t i = 0; i < inputs.size(); ++i) {
      const uint16_t ours = f32_to_bf16(bits_float(inputs[i]));
      if (bf16_is_nan(torch_bf16[i])) {
        ASSERT_TRUE(bf16_is_nan(ours)) << std::hex << inputs[i];
      } else {
        ASSERT_EQ(ours, torch_bf16[i]) << std::hex << "f32 bits 0x" << inputs[i];
      }
    }
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
}

}  // namespace
}  // namespace keel

namespace keel {
namespace {

// Host buffers: zeroed; 64-byte aligned, and from 2 MiB up 2 MiB aligned (the huge-page
// advice then covers whole pages); the THP mode reads as one of the kernel's words.
TEST(HostMemory, AlignmentZeroingAndTheHugePageMode) {
  for (size_t bytes :
       {size_t{1}, size_t{100}, kHugePageBytes - 1, kHugePageBytes, 3 * kHugePageBytes + 5}) {
    Buffer buffer(DType::kF32, (bytes + 3) / 4);
    const auto address = reinterpret_cast<uintptr_t>(buffer.data());
    EXPECT_EQ(address % 64, 0u) << bytes;
    if (buffer.nbytes() >= kHugePageBytes) {
      EXPECT_EQ(address % kHugePageBytes, 0u) << bytes;
    }
    const auto* bytes_view = static_cast<const unsigned char*>(buffer.data());
    EXPECT_TRUE(std::all_of(bytes_view, bytes_view + buffer.nbytes(), [](unsigned char b) {
      return b == 0;
    })) << bytes;
  }
  const std::string mode = transparent_huge_pages_mode();
  EXPECT_TRUE(mode == "always" || mode == "madvise" || mode == "never" || mode == "unknown")
      << mode;
}

}  // namespace
}  // namespace keel
