#include "comm/single_gpu/single_gpu_comm.h"

#include <cuda_runtime_api.h>

#include "kernels/base/check.h"

namespace keel::comm {

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw_error("SingleGpuCommunicator: ", what, ": ", cudaGetErrorString(status));
}

void synchronize() {
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

}  // namespace

void SingleGpuCommunicator::all_reduce(float* /*data*/, size_t /*count*/, ReduceAlgo /*algo*/) {
  synchronize();
}

void SingleGpuCommunicator::all_gather(const float* send, size_t count, float* recv) {
  if (send != recv && count > 0)
    check_cuda(cudaMemcpy(recv, send, count * sizeof(float), cudaMemcpyDefault), "cudaMemcpy");
  synchronize();
}

void SingleGpuCommunicator::broadcast(void* /*data*/, size_t /*bytes*/, int root) {
  if (root != 0) throw_error("SingleGpuCommunicator: broadcast root ", root, " of 1 rank");
  synchronize();
}

void SingleGpuCommunicator::barrier() {
  synchronize();
}

}  // namespace keel::comm
