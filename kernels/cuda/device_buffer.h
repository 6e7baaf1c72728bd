// Device memory owned by RAII: DeviceBuffer is a move-only handle to one cudaMalloc
// allocation, freed in its destructor. Plain bytes; typed views through as<T>(). Copies between
// host and device are synchronous helpers meant for set-up and tests, not for the hot path.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace keel::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // Allocates `bytes` of device memory (uninitialised); throws keel::Error on failure.
  explicit DeviceBuffer(size_t bytes);

  DeviceBuffer(DeviceBuffer&&) noexcept = default;
  DeviceBuffer& operator=(DeviceBuffer&&) noexcept = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  size_t bytes() const { return bytes_; }
  bool empty() const { return bytes_ == 0; }
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  template <typename T>
  T* as() {
    return static_cast<T*>(data());
  }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(data());
  }

  // Synchronous copies of `bytes` at byte `offset`; throw keel::Error when out of range.
  void upload(const void* host, size_t bytes, size_t offset = 0);
  void download(void* host, size_t bytes, size_t offset = 0) const;
  // Sets every byte to `value` (synchronously).
  void fill_bytes(int value);

 private:
  struct FreeDeleter {
    void operator()(void* pointer) const;
  };
  size_t bytes_ = 0;
  std::unique_ptr<void, FreeDeleter> data_;
};

// A device copy of a host vector.
template <typename T>
DeviceBuffer to_device(const std::vector<T>& host) {
  DeviceBuffer buffer(host.size() * sizeof(T));
  buffer.upload(host.data(), host.size() * sizeof(T));
  return buffer;
}

// The first `count` elements of a device buffer, copied to the host.
template <typename T>
std::vector<T> to_host(const DeviceBuffer& buffer, size_t count) {
  std::vector<T> host(count);
  buffer.download(host.data(), count * sizeof(T));
  return host;
}

}  // namespace keel::cuda
