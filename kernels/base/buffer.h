// A move-only, 64-byte aligned byte buffer that knows its dtype and element count. Weights and
// activations live in these; 64-byte alignment lets AVX-512 loads of row starts stay aligned
// when row lengths are multiples of 32 bf16 / 16 fp32 elements.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#include "kernels/base/dtype.h"

namespace keel {

class Buffer {
 public:
  Buffer() = default;
  Buffer(DType dtype, size_t num_elements) : dtype_(dtype), num_elements_(num_elements) {
    size_t bytes = (num_elements * dtype_size(dtype) + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    void* raw = std::aligned_alloc(64, bytes);
    if (raw == nullptr) throw std::bad_alloc();
    std::memset(raw, 0, bytes);
    data_.reset(static_cast<std::byte*>(raw));
  }
  Buffer(Buffer&&) noexcept = default;
  Buffer& operator=(Buffer&&) noexcept = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  DType dtype() const { return dtype_; }
  size_t size() const { return num_elements_; }
  size_t nbytes() const { return num_elements_ * dtype_size(dtype_); }
  bool empty() const { return num_elements_ == 0; }
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  float* f32() { return reinterpret_cast<float*>(data_.get()); }
  const float* f32() const { return reinterpret_cast<const float*>(data_.get()); }

 private:
  struct FreeDeleter {
    void operator()(std::byte* pointer) const { std::free(pointer); }
  };
  DType dtype_ = DType::kF32;
  size_t num_elements_ = 0;
  std::unique_ptr<std::byte, FreeDeleter> data_;
};

}  // namespace keel
