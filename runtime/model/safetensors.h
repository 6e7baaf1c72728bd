// safetensors files: reading (mmap + validated JSON header) and writing.
//
// Format: 8-byte little-endian header length N, then N bytes of JSON
//   {"__metadata__": {str: str}, "<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [b,
//   e]}}
// then the data region; offsets are relative to the data region's start. The reader validates
// everything before any tensor is handed out: header length within the file, JSON well formed,
// known dtype, shape x dtype size == e - b, offsets inside the file, regions non-overlapping.
// Every failure is a keel::Error naming the file and the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/base/dtype.h"

namespace keel {

// What a tensor's elements are on disk. Float weights are F32/BF16/F16 (keel's DType);
// quantized checkpoints add packed codes and scales: U8 (FP4 codes, E8M0 or E4M3 scales written
// as bytes), I8, I32 (AWQ/GPTQ words of 8 nibbles), F8_E4M3 (FP8 weights and NVFP4 block
// scales), F8_E8M0 (MX scales, where a writer names them so).
enum class TensorType : uint8_t { kF32, kBF16, kF16, kU8, kI8, kI32, kF8E4M3, kF8E8M0 };
std::string_view tensor_type_name(TensorType type);  // the safetensors spelling, "F8_E4M3"
size_t tensor_type_size(TensorType type);
// The TensorType of a float DType.
TensorType tensor_type_of(DType dtype);

// A view of one tensor inside a mapped file; valid while its SafetensorsFile lives.
struct TensorView {
  std::string name;
  std::string file;  // path of the file it lives in, for error messages
  TensorType type = TensorType::kF32;
  DType dtype = DType::kF32;  // meaningful only when is_float()
  bool is_float() const {
    return type == TensorType::kF32 || type == TensorType::kBF16 || type == TensorType::kF16;
  }
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;

  int64_t num_elements() const;
  std::string shape_string() const;  // "[1024, 4096]"
  // Element `index` of a float tensor as f32. The data region may start at any byte offset
  // (the format does not require padding the header), so this copies the bytes out rather
  // than dereferencing `data` as float* / uint16_t*, which would be a misaligned load.
  float f32_at(size_t index) const;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`; throws keel::Error on any problem.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent.
  const TensorView* find(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;  // shape x element size bytes, little-endian
  // When set, the stored element type (quantized tensors); `dtype` is then ignored.
  std::optional<TensorType> raw_type = std::nullopt;
  TensorType stored_type() const { return raw_type ? *raw_type : tensor_type_of(dtype); }
};

// Writes tensors in the given order (data_offsets ascending); header padded to 8 bytes as
// the reference implementation does. Throws keel::Error on I/O failure or size mismatch.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace keel
