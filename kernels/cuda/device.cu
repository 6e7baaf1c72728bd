// Device discovery through the CUDA runtime. cudaGetDeviceCount fails (rather than returning
// zero) when no driver is loaded, which is the normal case on CPU-only machines.
#include <cuda_runtime.h>

#include "kernels/cuda/device.h"

namespace keel::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later queries start clean
    return 0;
  }
  return count;
}

std::string no_device_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  cudaGetLastError();
  if (status != cudaSuccess) return cudaGetErrorString(status);
  return count == 0 ? "no CUDA device" : "";
}

}  // namespace keel::cuda
