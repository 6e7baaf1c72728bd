// Built where CUDA is not: the CUDA backend is named but cannot be created.
#include "kernels/base/check.h"
#include "runtime/backend/backend.h"

namespace keel {

int cuda_device_count(std::string* reason_if_none) {
  if (reason_if_none != nullptr)
    *reason_if_none = "keel was built without CUDA (no nvcc at configure time)";
  return 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index, GpuGemm /*gemm*/) {
  throw_error(
      "--backend cuda: this keel was built without CUDA (no nvcc at configure time); "
      "device ",
      device_index, " is unavailable");
}

}  // namespace keel
