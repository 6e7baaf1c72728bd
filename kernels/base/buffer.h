// A move-only, 64-byte aligned byte buffer that knows its dtype and element count. Weights and
// activations live in these; 64-byte alignment lets AVX-512 loads of row starts stay aligned
// when row lengths are multiples of 32 bf16 / 16 fp32 elements; from 2 MiB up the memory is
// on transparent huge pages where the kernel offers them (host_memory.h).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#include "kernels/base/dtype.h"
#include "kernels/base/host_memory.h"

namespace keel {

class Buffer {
 public:
  Buffer() = default;
  Buffer(DType dtype, size_t num_elements) : dtype_(dtype), num_elements_(num_elements) {
    data_.reset(static_cast<std::byte*>(allocate_host_zeroed(num_elements * dtype_size(dtype))));
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
    void operator()(std::byte* pointer) const { free_host(pointer); }
  };
  DType dtype_ = DType::kF32;
  size_t num_elements_ = 0;
  std::unique_ptr<std::byte, FreeDeleter> data_;
};

}  // namespace keel
