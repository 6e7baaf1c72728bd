// Error checking for CUDA runtime calls and kernel launches.
//
// KEEL_CUDA_CHECK(call) evaluates a CUDA runtime call once; on failure it throws keel::Error
// naming the call, the CUDA error name and string, the source location and current_rank().
// Launchers check every launch with KEEL_CUDA_CHECK(cudaGetLastError()) right after it, so a bad
// geometry or argument is reported at the launch that caused it, not at the next sync.
// C++17 (included from .cu files and from C++20 tests alike).
#pragma once

#include <cuda_runtime_api.h>

namespace keel::cuda::detail {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file,
                                   int line);

}  // namespace keel::cuda::detail

#define KEEL_CUDA_CHECK(call)                                                               \
  do {                                                                                      \
    const cudaError_t keel_cuda_status_ = (call);                                           \
    if (keel_cuda_status_ != cudaSuccess)                                                   \
      ::keel::cuda::detail::throw_cuda_error(keel_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)
