// DeviceBuffer (cudaMalloc/cudaFree under RAII) and the error path of KEEL_CUDA_CHECK.
#include <cuda_runtime.h>

#include "kernels/base/check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_buffer.h"

namespace keel::cuda {

namespace detail {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  // Clear a non-sticky error so that the next call does not report it a second time.
  cudaGetLastError();
  throw_error("rank ", current_rank(), ": CUDA call ", call, " failed at ", file, ":", line, ": ",
              cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

}  // namespace detail

void DeviceBuffer::FreeDeleter::operator()(void* pointer) const {
  // A destructor cannot throw; a failing cudaFree means the context is already gone.
  cudaFree(pointer);
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  void* raw = nullptr;
  KEEL_CUDA_CHECK(cudaMalloc(&raw, bytes));
  data_.reset(raw);
}

void DeviceBuffer::upload(const void* host, size_t bytes, size_t offset) {
  if (offset > bytes_ || bytes > bytes_ - offset)
    throw_error("DeviceBuffer::upload: ", bytes, " bytes at offset ", offset,
                " exceed the buffer of ", bytes_, " bytes");
  if (bytes == 0) return;
  KEEL_CUDA_CHECK(
      cudaMemcpy(static_cast<char*>(data()) + offset, host, bytes, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* host, size_t bytes, size_t offset) const {
  if (offset > bytes_ || bytes > bytes_ - offset)
    throw_error("DeviceBuffer::download: ", bytes, " bytes at offset ", offset,
                " exceed the buffer of ", bytes_, " bytes");
  if (bytes == 0) return;
  KEEL_CUDA_CHECK(
      cudaMemcpy(host, static_cast<const char*>(data()) + offset, bytes, cudaMemcpyDeviceToHost));
}

void DeviceBuffer::fill_bytes(int value) {
  if (bytes_ == 0) return;
  KEEL_CUDA_CHECK(cudaMemset(data(), value, bytes_));
}

}  // namespace keel::cuda
