// Linear weights as released (dense or quantized), cut into keel's layouts.
//
// A LinearSource is one checkpoint Linear [rows = out, cols = in] (or one expert of a fused 3-D
// expert tensor) with the tensors of its format found and their shapes checked:
//   dense          <m>.weight F32/BF16/F16 (or the fused 3-D tensor)
//   ModelOpt NVFP4 <m>.weight U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_scale_2 and
//                  input_scale F32 scalars (dequant multipliers)
//   CT NVFP4       <m>.weight_packed U8, weight_scale F8_E4M3, weight_global_scale and
//                  input_global_scale F32 [1] stored as DIVISORS (keel takes 1 / value)
//   FP8 block      <m>.weight F8_E4M3 [N, K], weight_scale_inv F32/BF16 [ceil(N/128), ceil(K/128)]
//   AWQ            <m>.qweight I32 [K, N/8] (nibble of column j at 4 * [0,4,1,5,2,6,3,7][j % 8]),
//                  qzeros I32 [K/G, N/8] (same order), scales F16 [K/G, N]
//   GPTQ           <m>.qweight I32 [K/8, N] (nibble k % 8), qzeros I32 [K/G, N/8] (nibble
//                  n % 8; v1 stores zero - 1), scales F16 [K/G, N], g_idx I32 [K]
//   MXFP4 experts  <name>_blocks U8 [E, N, K/32, 16], <name>_scales U8 [E, N, K/32]
// HostWeight is a matrix in keel's layout (kernels/math/quant_math.h) being assembled on the
// host from row blocks of one or more sources of the same format (q|k|v, gate|up); the codes
// are moved or re-packed, never widened to floats.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/base/buffer.h"
#include "kernels/math/quant_math.h"
#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/quant_config.h"

namespace keel {

struct Matrix;

enum class SourceLayout : uint8_t { kDense, kNvfp4, kMxfp4, kFp8Block, kAwq, kGptq };

struct LinearSource {
  std::string module;  // for messages
  SourceLayout layout = SourceLayout::kDense;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t outer = 0;                   // expert index into a fused 3-D tensor (0 otherwise)
  const TensorView* weight = nullptr;  // dense weight, codes (U8/F8/I32 qweight)
  const TensorView* scales = nullptr;
  const TensorView* zeros = nullptr;
  const TensorView* group_index = nullptr;  // GPTQ g_idx
  float global_scale = 0;                   // NVFP4 dequant multiplier
  float input_scale = 0;                    // NVFP4 activation dequant multiplier
  int64_t group_size = 0;
  bool gptq_v1 = true;

  math::WeightFormat format() const;
  DType dense_dtype() const { return weight->dtype; }
};

// The Linear `module` (name without ".weight") of shape [rows, cols].
LinearSource find_linear(const Checkpoint& checkpoint, const QuantConfig& quant,
                         const std::string& module, int64_t rows, int64_t cols);
// Expert `expert` of fused 3-D tensors `name` (e.g. "...mlp.experts.gate_up_proj", dense
// [E, rows, cols] or MXFP4 name_blocks / name_scales).
LinearSource find_fused_expert(const Checkpoint& checkpoint, const QuantConfig& quant,
                               const std::string& name, int64_t num_experts, int64_t expert,
                               int64_t rows, int64_t cols);
// True when `name` (fused expert tensors) exists in either layout.
bool has_fused_expert(const Checkpoint& checkpoint, const std::string& name);

class HostWeight {
 public:
  // A [rows, cols] matrix in the format of `like` (dense: its dtype).
  HostWeight(const LinearSource& like, int64_t rows, int64_t cols);

  // Copies rows [row0, row0 + num_rows) and columns [col0, col0 + cols()) of `source` to rows
  // starting at dst_row. A column slice of a quantized weight must start on a group boundary.
  void copy_rows(const LinearSource& source, int64_t row0, int64_t num_rows, int64_t col0,
                 int64_t dst_row);

  Matrix to_device(Backend& backend, bool nvfp4_w4a4) const;
  math::WeightFormat format() const { return format_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  void check_same_format(const LinearSource& source) const;

  math::WeightFormat format_;
  SourceLayout first_layout_;
  int64_t rows_, cols_;
  DType dense_dtype_ = DType::kF32;
  Buffer dense_;                // kDense
  std::vector<uint8_t> codes_;  // [rows][ld_]
  int64_t ld_ = 0;
  std::vector<uint8_t> scales_;  // [rows][scale_ld_] of scale_bytes_ each
  int64_t scale_ld_ = 0;
  int64_t scale_bytes_ = 0;
  std::vector<uint8_t> zeros_;       // int4 [rows][scale_ld_]
  std::vector<float> row_scales_;    // NVFP4 [rows]
  std::vector<int32_t> group_of_k_;  // int4 act order [cols]
  int64_t group_size_ = 0;
  float input_scale_ = 0;
};

}  // namespace keel
