// Released Linear layouts -> keel's layouts (see quant_load.h for the tensors of each format and
// kernels/math/quant_math.h for where they land). Row blocks are cut straight from the mapped
// checkpoint; 4-bit AWQ/GPTQ words are re-packed to keel's [N][K/2] nibbles (same bytes, other
// order) and their fp16 scales widened to fp32 exactly; nothing is dequantized.
#include "runtime/model/quant_load.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/base/check.h"
#include "runtime/model/model.h"

namespace keel {

namespace {

using math::WeightFormat;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// AutoAWQ packs column j of every 8 into nibble kAwqNibble[j] of the word (its pack order is
// [0, 2, 4, 6, 1, 3, 5, 7]; this is the inverse, vLLM's AWQ_REVERSE_ORDER).
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

uint32_t word_at(const TensorView& view, int64_t index) {
  uint32_t word;
  std::memcpy(&word, view.data + static_cast<size_t>(index) * 4, 4);
  return word;
}

// A scalar F32 (or float) tensor of shape [] or [1].
float scalar_value(const Checkpoint& checkpoint, const std::string& name) {
  const TensorView& view = checkpoint.get(name);
  if (view.num_elements() != 1)
    throw_error("checkpoint ", checkpoint.directory(), ", tensor ", name,
                ": expected a scalar, found shape ", view.shape_string());
  const float value = view.f32_at(0);
  if (!(value > 0.0f) || !std::isfinite(value))
    throw_error("checkpoint ", checkpoint.directory(), ", tensor ", name, ": scale ", value,
                " is not a finite positive number");
  return value;
}

void require_method(const QuantConfig& quant, std::initializer_list<QuantMethod> methods,
                    const std::string& tensor, std::string_view layout) {
  if (std::find(methods.begin(), methods.end(), quant.method) != methods.end()) return;
  if (!quant.quantized())
    throw_error("tensor ", tensor, " is ", layout,
                " but the checkpoint declares no quantization (config.json quantization_config "
                "or hf_quant_config.json)");
  throw_error("tensor ", tensor, " is ", layout, " but ", quant.source, " declares ",
              quant_method_name(quant.method));
}

}  // namespace

math::WeightFormat LinearSource::format() const {
  switch (layout) {
    case SourceLayout::kDense:
      return WeightFormat::kDense;
    case SourceLayout::kNvfp4:
      return WeightFormat::kNvfp4;
    case SourceLayout::kMxfp4:
      return WeightFormat::kMxfp4;
    case SourceLayout::kFp8Block:
      return WeightFormat::kFp8Block;
    case SourceLayout::kAwq:
    case SourceLayout::kGptq:
      return WeightFormat::kInt4;
  }
  return WeightFormat::kDense;
}

LinearSource find_linear(const Checkpoint& checkpoint, const QuantConfig& quant,
                         const std::string& module, int64_t rows, int64_t cols) {
  LinearSource source;
  source.module = module;
  source.rows = rows;
  source.cols = cols;
  const std::string prefix = module + ".";
  if (checkpoint.find(prefix + "weight_packed") != nullptr) {
    require_method(quant, {QuantMethod::kCompressedNvfp4}, prefix + "weight_packed",
                   "compressed-tensors NVFP4");
    if (cols % math::kNvfp4Group != 0)
      throw_error("tensor ", prefix, "weight_packed: in_features ", cols,
                  " is not a multiple of 16");
    source.layout = SourceLayout::kNvfp4;
    source.weight =
        &checkpoint.get_typed(prefix + "weight_packed", {rows, cols / 2}, {TensorType::kU8});
    source.scales = &checkpoint.get_typed(prefix + "weight_scale", {rows, cols / 16},
                                          {TensorType::kF8E4M3, TensorType::kU8});
    // Stored as divisors: x_fp4_range = x * global_scale.
    source.global_scale = 1.0f / scalar_value(checkpoint, prefix + "weight_global_scale");
    if (checkpoint.find(prefix + "input_global_scale") != nullptr)
      source.input_scale = 1.0f / scalar_value(checkpoint, prefix + "input_global_scale");
    source.group_size = math::kNvfp4Group;
    return source;
  }
  if (checkpoint.find(prefix + "qweight") != nullptr) {
    require_method(quant, {QuantMethod::kAwq, QuantMethod::kGptq}, prefix + "qweight", "int4");
    const int64_t group = quant.group_size;
    const int64_t groups = ceil_div(cols, group);
    source.group_size = group;
    source.zeros =
        &checkpoint.get_typed(prefix + "qzeros", {groups, ceil_div(rows, 8)}, {TensorType::kI32});
    source.scales = &checkpoint.get_typed(prefix + "scales", {groups, rows},
                                          {TensorType::kF16, TensorType::kBF16, TensorType::kF32});
    if (quant.method == QuantMethod::kAwq) {
      if (rows % 8 != 0)
        throw_error("tensor ", prefix, "qweight: AWQ out_features ", rows,
                    " is not a multiple of 8");
      source.layout = SourceLayout::kAwq;
      source.weight =
          &checkpoint.get_typed(prefix + "qweight", {cols, rows / 8}, {TensorType::kI32});
      return source;
    }
    if (cols % 8 != 0)
      throw_error("tensor ", prefix, "qweight: GPTQ in_features ", cols, " is not a multiple of 8");
    source.layout = SourceLayout::kGptq;
    source.gptq_v1 = !quant.gptq_v2;
    source.weight = &checkpoint.get_typed(prefix + "qweight", {cols / 8, rows}, {TensorType::kI32});
    if (const TensorView* g_idx = checkpoint.find(prefix + "g_idx")) {
      checkpoint.check_shape(*g_idx, {cols});
      if (g_idx->type != TensorType::kI32)
        throw_error("tensor ", prefix, "g_idx: dtype ", tensor_type_name(g_idx->type),
                    ", expected I32");
      bool trivial = true;
      for (int64_t k = 0; k < cols; ++k) {
        const auto value = static_cast<int32_t>(word_at(*g_idx, k));
        if (value < 0 || value >= groups)
          throw_error("tensor ", prefix, "g_idx: entry ", k, " is ", value, ", outside [0, ",
                      groups, ")");
        trivial = trivial && value == k / group;
      }
      if (!trivial) {
        if (!quant.desc_act)
          throw_error("tensor ", prefix, "g_idx is permuted but ", quant.source,
                      " says desc_act false");
        source.group_index = g_idx;
      }
    }
    return source;
  }
  const TensorView* weight = checkpoint.find(prefix + "weight");
  if (weight != nullptr && weight->type == TensorType::kU8) {
    require_method(quant, {QuantMethod::kModelOptNvfp4}, prefix + "weight",
                   "ModelOpt NVFP4 (U8 codes)");
    if (cols % math::kNvfp4Group != 0)
      throw_error("tensor ", prefix, "weight: in_features ", cols, " is not a multiple of 16");
    source.layout = SourceLayout::kNvfp4;
    source.weight = &checkpoint.get_typed(prefix + "weight", {rows, cols / 2}, {TensorType::kU8});
    source.scales = &checkpoint.get_typed(prefix + "weight_scale", {rows, cols / 16},
                                          {TensorType::kF8E4M3, TensorType::kU8});
    source.global_scale = scalar_value(checkpoint, prefix + "weight_scale_2");
    if (checkpoint.find(prefix + "input_scale") != nullptr)
      source.input_scale = scalar_value(checkpoint, prefix + "input_scale");
    source.group_size = math::kNvfp4Group;
    return source;
  }
  if (weight != nullptr && weight->type == TensorType::kF8E4M3) {
    if (checkpoint.find(prefix + "weight_scale_inv") == nullptr)
      throw_error("tensor ", prefix,
                  "weight is F8_E4M3 without weight_scale_inv: per-tensor FP8 "
                  "checkpoints are not implemented (block-128 FP8 only)");
    require_method(quant, {QuantMethod::kFp8Block}, prefix + "weight", "FP8");
    source.layout = SourceLayout::kFp8Block;
    source.weight = &checkpoint.get_typed(prefix + "weight", {rows, cols}, {TensorType::kF8E4M3});
    source.scales = &checkpoint.get_typed(prefix + "weight_scale_inv",
                                          {ceil_div(rows, 128), ceil_div(cols, 128)},
                                          {TensorType::kF32, TensorType::kBF16});
    source.group_size = math::kFp8BlockGroup;
    return source;
  }
  source.weight = &checkpoint.get(prefix + "weight", {rows, cols});
  return source;
}

bool has_fused_expert(const Checkpoint& checkpoint, const std::string& name) {
  return checkpoint.find(name) != nullptr || checkpoint.find(name + "_blocks") != nullptr;
}

LinearSource find_fused_expert(const Checkpoint& checkpoint, const QuantConfig& quant,
                               const std::string& name, int64_t num_experts, int64_t expert,
                               int64_t rows, int64_t cols) {
  LinearSource source;
  source.module = name;
  source.rows = rows;
  source.cols = cols;
  source.outer = expert;
  if (checkpoint.find(name + "_blocks") != nullptr) {
    require_method(quant, {QuantMethod::kMxfp4}, name + "_blocks", "MXFP4");
    if (cols % math::kMxfp4Group != 0)
      throw_error("tensor ", name, "_blocks: in_features ", cols, " is not a multiple of 32");
    source.layout = SourceLayout::kMxfp4;
    source.weight = &checkpoint.get_typed(name + "_blocks", {num_experts, rows, cols / 32, 16},
                                          {TensorType::kU8});
    source.scales = &checkpoint.get_typed(name + "_scales", {num_experts, rows, cols / 32},
                                          {TensorType::kU8, TensorType::kF8E8M0});
    source.group_size = math::kMxfp4Group;
    return source;
  }
  source.weight = &checkpoint.get(name, {num_experts, rows, cols});
  return source;
}

HostWeight::HostWeight(const LinearSource& like, int64_t rows, int64_t cols)
    : format_(like.format()), first_layout_(like.layout), rows_(rows), cols_(cols) {
  switch (format_) {
    case WeightFormat::kDense:
      dense_dtype_ = like.dense_dtype();
      dense_ = Buffer(dense_dtype_, static_cast<size_t>(rows * cols));
      return;
    case WeightFormat::kNvfp4:
    case WeightFormat::kMxfp4:
      group_size_ = like.group_size;
      ld_ = ceil_div(cols, 2);
      scale_ld_ = ceil_div(cols, group_size_);
      scale_bytes_ = 1;
      if (format_ == WeightFormat::kNvfp4) row_scales_.assign(static_cast<size_t>(rows), 0.0f);
      break;
    case WeightFormat::kFp8Block:
      group_size_ = like.group_size;
      ld_ = cols;
      scale_ld_ = ceil_div(cols, group_size_);
      scale_bytes_ = 4;
      break;
    case WeightFormat::kInt4:
      group_size_ = like.group_size;
      ld_ = ceil_div(cols, 2);
      // Act order keeps every group of the source row (a column slice may touch any of them).
      scale_ld_ = like.group_index != nullptr ? ceil_div(like.cols, group_size_)
                                              : ceil_div(cols, group_size_);
      scale_bytes_ = 4;
      zeros_.assign(static_cast<size_t>(rows * scale_ld_), 0);
      if (like.group_index != nullptr) group_of_k_.assign(static_cast<size_t>(cols), -1);
      break;
  }
  codes_.assign(static_cast<size_t>(rows * ld_), 0);
  scales_.assign(static_cast<size_t>(rows * scale_ld_ * scale_bytes_), 0);
}

void HostWeight::check_same_format(const LinearSource& source) const {
  if (source.format() != format_ ||
      (format_ == WeightFormat::kDense && source.dense_dtype() != dense_dtype_) ||
      (format_ != WeightFormat::kDense && source.group_size != group_size_))
    throw_error("tensor ", source.module, ": stored as ", math::weight_format_name(source.format()),
                format_ == WeightFormat::kDense
                    ? std::string(" ") + std::string(dtype_name(source.dense_dtype()))
                    : "",
                " but keel fuses it with parts stored as ", math::weight_format_name(format_),
                format_ == WeightFormat::kDense
                    ? std::string(" ") + std::string(dtype_name(dense_dtype_))
                    : "",
                " (all parts of one fused weight must share a format)");
  if (format_ == WeightFormat::kInt4 && (source.group_index != nullptr) != !group_of_k_.empty())
    throw_error("tensor ", source.module,
                ": act-order and plain GPTQ parts cannot share one fused weight");
}

void HostWeight::copy_rows(const LinearSource& source, int64_t row0, int64_t num_rows, int64_t col0,
                           int64_t dst_row) {
  check_same_format(source);
  KEEL_CHECK(row0 >= 0 && row0 + num_rows <= source.rows && col0 >= 0 &&
                 col0 + cols_ <= source.cols && dst_row + num_rows <= rows_,
             "copy_rows: block outside ", source.module);
  // A slice must start on a group boundary and (unless it runs to the row's end) hold whole
  // groups: otherwise some rank's slice starts inside a group.
  const bool whole_groups = format_ == WeightFormat::kDense ||
                            ((col0 % group_size_ == 0 && col0 % 2 == 0) &&
                             (col0 + cols_ == source.cols || cols_ % group_size_ == 0));
  if (!whole_groups && group_of_k_.empty())
    throw_error("tensor ", source.module, ": a column slice at ", col0, " of width ", cols_,
                " does not start on a quantization group boundary (group ", group_size_,
                "); this tensor-parallel split needs in_features per rank to be a multiple of ",
                group_size_);
  const int64_t src_rows = source.rows;
  const int64_t src_cols = source.cols;
  const int64_t first_row = source.outer * src_rows + row0;  // row index into a fused tensor
  switch (source.layout) {
    case SourceLayout::kDense: {
      const size_t element = dtype_size(dense_dtype_);
      auto* out = static_cast<std::byte*>(dense_.data());
      for (int64_t row = 0; row < num_rows; ++row)
        std::memcpy(out + static_cast<size_t>((dst_row + row) * cols_) * element,
                    source.weight->data +
                        static_cast<size_t>((first_row + row) * src_cols + col0) * element,
                    static_cast<size_t>(cols_) * element);
      return;
    }
    case SourceLayout::kNvfp4:
    case SourceLayout::kMxfp4: {
      const int64_t src_scale_ld = src_cols / group_size_;
      for (int64_t row = 0; row < num_rows; ++row) {
        std::memcpy(codes_.data() + (dst_row + row) * ld_,
                    source.weight->data + (first_row + row) * (src_cols / 2) + col0 / 2,
                    static_cast<size_t>(ld_));
        std::memcpy(scales_.data() + (dst_row + row) * scale_ld_,
                    source.scales->data + (first_row + row) * src_scale_ld + col0 / group_size_,
                    static_cast<size_t>(scale_ld_));
        if (!row_scales_.empty())
          row_scales_[static_cast<size_t>(dst_row + row)] = source.global_scale;
      }
      // Fused layers quantize activations once: the largest of the parts' scales, as vLLM
      // takes for merged layers (ModelOpt exports them equal).
      input_scale_ = std::max(input_scale_, source.input_scale);
      return;
    }
    case SourceLayout::kFp8Block: {
      const int64_t src_scale_cols = ceil_div(src_cols, 128);
      for (int64_t row = 0; row < num_rows; ++row) {
        std::memcpy(codes_.data() + (dst_row + row) * ld_,
                    source.weight->data + (first_row + row) * src_cols + col0,
                    static_cast<size_t>(cols_));
        const int64_t block_row = (row0 + row) / 128;
        for (int64_t group = 0; group < scale_ld_; ++group) {
          const float value = source.scales->f32_at(
              static_cast<size_t>(block_row * src_scale_cols + col0 / 128 + group));
          std::memcpy(scales_.data() + ((dst_row + row) * scale_ld_ + group) * 4, &value, 4);
        }
      }
      return;
    }
    case SourceLayout::kAwq:
    case SourceLayout::kGptq: {
      const bool awq = source.layout == SourceLayout::kAwq;
      const int64_t src_groups = ceil_div(src_cols, group_size_);
      const int64_t packed_cols = ceil_div(src_rows, 8);  // qzeros words per group row
      const int64_t first_group = group_of_k_.empty() ? col0 / group_size_ : 0;
      for (int64_t row = 0; row < num_rows; ++row) {
        const int64_t n = row0 + row;
        uint8_t* codes = codes_.data() + (dst_row + row) * ld_;
        for (int64_t k = 0; k < cols_; ++k) {
          const int64_t kk = col0 + k;
          const uint32_t word = awq ? word_at(*source.weight, kk * (src_rows / 8) + n / 8)
                                    : word_at(*source.weight, (kk / 8) * src_rows + n);
          const int shift = awq ? 4 * kAwqNibble[n % 8] : 4 * static_cast<int>(kk % 8);
          const auto nibble = static_cast<uint8_t>((word >> shift) & 0xfu);
          codes[k / 2] |= static_cast<uint8_t>((k & 1) ? nibble << 4 : nibble);
        }
        for (int64_t group = 0; group < scale_ld_; ++group) {
          const int64_t src_group = first_group + group;
          KEEL_CHECK(src_group < src_groups);
          const uint32_t zero_word = word_at(*source.zeros, src_group * packed_cols + n / 8);
          const int zero_shift = awq ? 4 * kAwqNibble[n % 8] : 4 * static_cast<int>(n % 8);
          int zero = static_cast<int>((zero_word >> zero_shift) & 0xfu);
          if (!awq && source.gptq_v1) zero += 1;  // AutoGPTQ v1 stores zero - 1
          zeros_[static_cast<size_t>((dst_row + row) * scale_ld_ + group)] =
              static_cast<uint8_t>(zero);
          const float scale = source.scales->f32_at(static_cast<size_t>(src_group * src_rows + n));
          std::memcpy(scales_.data() + ((dst_row + row) * scale_ld_ + group) * 4, &scale, 4);
        }
      }
      if (!group_of_k_.empty()) {
        for (int64_t k = 0; k < cols_; ++k) {
          const auto group = static_cast<int32_t>(word_at(*source.group_index, col0 + k));
          int32_t& slot = group_of_k_[static_cast<size_t>(k)];
          if (slot >= 0 && slot != group)
            throw_error("tensor ", source.module,
                        ": its g_idx differs from the other parts keel fuses it with (act-order "
                        "parts of one fused weight must share their permutation)");
          slot = group;
        }
      }
      return;
    }
  }
}

Matrix HostWeight::to_device(Backend& backend, bool nvfp4_w4a4) const {
  Matrix matrix;
  matrix.rows = rows_;
  matrix.cols = cols_;
  matrix.format = format_;
  if (format_ == WeightFormat::kDense) {
    matrix.data = backend.allocate(dense_dtype_, dense_.size());
    backend.copy_from_host(dense_.data(), dense_.nbytes(), matrix.data.data());
    return matrix;
  }
  auto upload = [&](const void* host, size_t bytes) {
    DeviceArray array = backend.allocate_bytes(bytes);
    backend.copy_from_host(host, bytes, array.data());
    return array;
  };
  matrix.data = upload(codes_.data(), codes_.size());
  matrix.scales = upload(scales_.data(), scales_.size());
  if (!zeros_.empty()) matrix.zeros = upload(zeros_.data(), zeros_.size());
  if (!row_scales_.empty()) {
    matrix.row_scales = backend.allocate(DType::kF32, row_scales_.size());
    backend.copy_from_host(row_scales_.data(), row_scales_.size() * sizeof(float),
                           matrix.row_scales.data());
  }
  if (!group_of_k_.empty())
    matrix.group_of_k = upload(group_of_k_.data(), group_of_k_.size() * sizeof(int32_t));
  matrix.ld = ld_;
  matrix.scale_ld = scale_ld_;
  matrix.group_size = group_size_;
  matrix.input_scale = input_scale_;
  if (nvfp4_w4a4) {
    if (format_ != WeightFormat::kNvfp4) {
      // W4A4 applies to NVFP4 weights only; other formats stay weight-only.
    } else if (input_scale_ <= 0.0f) {
      throw_error(
          "W4A4 NVFP4 activations need the checkpoint's input_scale, which is missing "
          "for a weight of ",
          rows_, "x", cols_);
    } else {
      matrix.w4a4 = true;
    }
  }
  return matrix;
}

}  // namespace keel
