// The on-device ordered sum of the NCCL backend's kFixedOrder all-reduce.
//
// Algorithm. A grid-stride loop: thread t of a grid of T threads writes elements t, t + T, ...
// and each element is ordered_sum_element() from comm/nccl/ordered_sum.h, the same function the
// CPU test checks against ThreadGroup's fixed_order. Threads never cooperate on one element, so
// the grid shape cannot change any element's summation order: the bits depend only on the
// partials.
//
// Memory layout. `partials` is num_ranks rows of `stride` floats (row r = rank r's partials);
// the kernel reads num_ranks * count * 4 bytes and writes count * 4 bytes. Consecutive threads
// read consecutive floats of each row, so every row is read coalesced.
//
// Compiled with -fmad=false (comm/nccl/CMakeLists.txt) so that nvcc can never contract an
// add with a multiply; the sum itself is a chain of plain fp32 adds written in order.
#include "comm/nccl/nccl_comm.h"
#include "comm/nccl/ordered_sum.h"

namespace keel::comm::nccl_detail {

namespace {

constexpr unsigned kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; larger messages loop. The cap
// keeps the grid small for huge messages without affecting results (see above).
constexpr size_t kMaxBlocks = 4096;

__global__ void ordered_sum_kernel(const float* __restrict__ partials, size_t stride, int num_ranks,
                                   size_t count, float* __restrict__ out) {
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  ordered_sum_strided(partials, stride, num_ranks, count, first, step, out);
}

}  // namespace

cudaError_t launch_ordered_sum(const float* partials, size_t stride, int num_ranks, size_t count,
                               float* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;  // a zero-block launch is an error, and there is no work
  const size_t wanted_blocks = (count + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const unsigned blocks =
      static_cast<unsigned>(wanted_blocks < kMaxBlocks ? wanted_blocks : kMaxBlocks);
  ordered_sum_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(partials, stride, num_ranks, count,
                                                              out);
  // Reports a bad launch (geometry, invalid stream, no device) at the launch that caused it.
  return cudaGetLastError();
}

}  // namespace keel::comm::nccl_detail
