// KV cache element storage: how a K or V element is rounded when it is appended to the paged
// pool and widened back to fp32 when attention reads it. Shared by the CPU kernels
// (runtime/backend/cpu_backend.cpp) and the CUDA kernels (kernels/cuda/ops.cu).
//
//   fp32      stored as is (4 bytes); load = the stored float.
//   bf16      store = f32_to_bf16(x) (round to nearest even; NaN stays NaN), 2 bytes;
//             load = bf16_to_f32 (exact).
//   fp8_e4m3  store = f32_to_e4m3(x / scale) (round to nearest even, saturating at +-448, NaN
//             -> 0x7f), 1 byte; load = e4m3_to_f32(code) * scale. `scale` is the layer's
//             per-tensor k_scale or v_scale (a calibrated checkpoint's, else 1).
//
// Rounding happens once per element at append, from that element alone: what a position holds
// depends on its own K/V values and the layer's scale, never on the batch, the chunking or the
// block layout, so batch invariance (README, "The determinism contract") holds for every dtype.
// '/' and '*' are IEEE-rounded on both sides (no fast-math, -fmad=false on nvcc), so the CPU and
// the GPU store the same bytes and read the same floats.
#pragma once

#include <cstdint>

#include "kernels/base/dtype.h"
#include "kernels/math/quant_math.h"

namespace keel::math {

enum class KvDType : uint8_t { kF32, kBF16, kFp8E4M3 };

KEEL_HD inline int64_t kv_element_bytes(KvDType dtype) {
  return dtype == KvDType::kF32 ? 4 : dtype == KvDType::kBF16 ? 2 : 1;
}

// One storage format: its element type, store (round) and load (widen).
struct KvF32 {
  using Storage = float;
  static constexpr KvDType kDType = KvDType::kF32;
  KEEL_HD static Storage store(float x, float /*scale*/) { return x; }
  KEEL_HD static float load(Storage stored, float /*scale*/) { return stored; }
};

struct KvBF16 {
  using Storage = uint16_t;
  static constexpr KvDType kDType = KvDType::kBF16;
  KEEL_HD static Storage store(float x, float /*scale*/) { return f32_to_bf16(x); }
  KEEL_HD static float load(Storage stored, float /*scale*/) { return bf16_to_f32(stored); }
};

struct KvFp8E4M3 {
  using Storage = uint8_t;
  static constexpr KvDType kDType = KvDType::kFp8E4M3;
  KEEL_HD static Storage store(float x, float scale) { return f32_to_e4m3(x / scale); }
  KEEL_HD static float load(Storage stored, float scale) { return e4m3_to_f32(stored) * scale; }
};

// What attention sees of x after a round trip through the cache (tests, references).
KEEL_HD inline float kv_round_trip(KvDType dtype, float x, float scale) {
  switch (dtype) {
    case KvDType::kBF16:
      return KvBF16::load(KvBF16::store(x, scale), scale);
    case KvDType::kFp8E4M3:
      return KvFp8E4M3::load(KvFp8E4M3::store(x, scale), scale);
    case KvDType::kF32:
      break;
  }
  return x;
}

}  // namespace keel::math
