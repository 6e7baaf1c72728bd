// NCCL communicator: one GPU per rank, ranks are MPI processes, bootstrapped over MPI.
//
// Design (details and the ordering argument are in nccl_comm.cpp):
//  - Buffers are DEVICE pointers. The Communicator interface takes float*; for this backend
//    every data/send/recv pointer must be device memory of this communicator's GPU (or managed
//    memory). Host pointers are rejected with keel::Error before anything is enqueued.
//  - Every collective is host-synchronous, like the other backends: it is enqueued on the
//    communicator's own stream and the call returns once that stream has drained, so the
//    result is in place when it returns. The stream is a blocking stream (cudaStreamDefault),
//    so it is ordered after work the caller queued on the legacy default stream; work on other
//    streams must be complete (or synchronised) before the call.
//  - all_reduce kNative: ncclAllReduce(ncclSum, ncclFloat32) in place; NCCL picks ring/tree
//    and protocol by message size, so an element's summation order depends on the size.
//  - all_reduce kFixedOrder: every element is ((p0 + p1) + p2) + ... in fp32, rank order,
//    bit-identical to ThreadGroup's kFixedOrder for the same partials. Default implementation
//    (kAllGather): ncclAllGather of every rank's partials into a [num_ranks, count] device
//    scratch buffer (num_ranks * count * 4 bytes), then an on-device kernel writes
//    data[i] = ordered_sum_element(scratch, count, num_ranks, i) (comm/nccl/ordered_sum.h).
//    kReduceScatter: grouped ncclSend/ncclRecv deliver chunk c of every rank to rank c, rank c
//    sums its chunk in rank order, a second grouped exchange gathers the sums: ring-class
//    bytes and a [num_ranks, chunk] scratch (about count * 4 bytes) instead of num_ranks times
//    that. Both give the same bits.
//  - all_gather: ncclAllGather; broadcast: ncclBroadcast of bytes (ncclChar); barrier: a
//    1-element ncclAllReduce on a device word, waited for like every collective.
//  - Errors: every CUDA/NCCL call is checked; failures throw keel::Error
//    "rank R: <collective>: <call> failed: <error string>". While a collective waits, NCCL's
//    asynchronous error state is polled; with options.timeout > 0 a collective that has not
//    completed in time throws "rank R: ... timed out ...". After any failure past the point
//    where work was enqueued, the NCCL communicator is aborted (ncclCommAbort, which also stops
//    its pending kernels) and every later call throws ("unusable after ..."). Invalid local
//    arguments (host pointer, bad root) throw on the offending rank only, before anything is
//    enqueued, and leave the communicator usable; NCCL cannot tell the peers, which then wait
//    in their collective until their own timeout.
//  - Faults: the failure policy is comm/polled_collectives.h's (CPU-tested there, through its
//    DeviceQueue seam); this class supplies the poll (cudaStreamQuery, ncclCommGetAsyncError)
//    and the abort (ncclCommAbort). Communicator::abort(reason) from another thread ends the
//    wait within one poll, and the NCCL communicator is then aborted on the rank's own thread,
//    as after a timeout. peer_faults() probes the ranks' processes on this node
//    (comm/process_probe.h).
//  - Construction and destruction are collective over the MPI communicator's ranks. Use one
//    communicator from one thread at a time; the calling thread may change between calls (each
//    call makes this communicator's GPU current and restores the caller's device).
#pragma once

#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/polled_collectives.h"
#include "comm/process_probe.h"

namespace keel::comm {

struct NcclCommOptions {
  // A collective that has not completed after this long aborts the communicator and throws
  // keel::Error. 0 = wait forever (NCCL's asynchronous errors are still reported).
  std::chrono::milliseconds timeout{0};

  // How kFixedOrder moves data; both give the same bits (see the top of this file).
  enum class FixedOrderImpl : uint8_t { kAllGather, kReduceScatter };
  FixedOrderImpl fixed_order_impl = FixedOrderImpl::kAllGather;
};

// Rank of the calling process among the ranks of `comm` on the same node (0-based): the usual
// GPU index for "one GPU per rank". Collective over `comm`.
int mpi_node_local_rank(MPI_Comm comm);

namespace nccl_detail {

// Owning handles. Each deleter makes its GPU current around the release (CUDA's current device
// is per thread, and the owner may be destroyed on a thread that uses another GPU). Releases
// are best effort: a destructor has nobody to report a failure to.
struct DeviceMemoryDeleter {
  int device = 0;
  void operator()(float* pointer) const noexcept;
};
struct StreamDeleter {
  int device = 0;
  void operator()(cudaStream_t stream) const noexcept;
};
struct CommDeleter {
  void operator()(ncclComm_t comm) const noexcept;  // ncclCommDestroy
};
using DeviceFloats = std::unique_ptr<float, DeviceMemoryDeleter>;
using StreamHandle = std::unique_ptr<CUstream_st, StreamDeleter>;
using CommHandle = std::unique_ptr<ncclComm, CommDeleter>;

// Enqueues out[i] = ordered_sum_element(partials, stride, num_ranks, i) for i < count on
// `stream` (nothing for count 0) and returns cudaGetLastError() of the launch. Defined in
// nccl_comm.cu; the caller's GPU must be current.
cudaError_t launch_ordered_sum(const float* partials, size_t stride, int num_ranks, size_t count,
                               float* out, cudaStream_t stream);

}  // namespace nccl_detail

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm`: rank r of `comm` becomes NCCL rank r on GPU `device` (typically
  // mpi_node_local_rank(comm)). MPI must be initialised; it is used only here, to broadcast
  // the ncclUniqueId and to agree on whether every rank could set up its GPU (so that a rank
  // without a usable GPU makes every rank throw instead of leaving them in ncclCommInitRank).
  NcclCommunicator(MPI_Comm comm, int device, NcclCommOptions options = {});
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return tp_rank_; }
  int size() const override { return num_ranks_; }

  // All pointers are device pointers (see the top of this file).
  void all_reduce(float* data, size_t count, ReduceAlgo algo) override;
  void all_gather(const float* send, size_t count, float* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;

  // Peers on this node found dead or stopped; any thread. abort() (Communicator) from any thread
  // ends the wait in progress within one poll; the NCCL communicator is then aborted
  // (ncclCommAbort) on this thread, as after a timeout.
  std::vector<PeerFault> peer_faults() const override;
  void set_timeout(std::chrono::milliseconds timeout) override;

  int device() const { return device_; }
  // The stream every collective runs on (idle whenever no call is in progress).
  cudaStream_t stream() const { return stream_.get(); }
  const NcclCommOptions& options() const { return options_; }
  // True after a failure aborted the NCCL communicator; every call then throws.
  bool unusable() const { return polled_.aborted(); }
  // Device scratch currently held for kFixedOrder (grown on demand, never shrunk).
  size_t scratch_bytes() const { return scratch_capacity_ * sizeof(float); }

 private:
  struct CallInfo;  // what is in progress, for error messages (nccl_comm.cpp)

  // The device side for polled_: the stream and NCCL's asynchronous error state.
  class Queue final : public DeviceQueue {
   public:
    explicit Queue(NcclCommunicator& owner) : owner_(owner) {}
    bool finished() override;              // throws on an NCCL asynchronous error
    void abort_queue() noexcept override;  // ncclCommAbort, then drains the stream
    const CallInfo* call = nullptr;        // the call in progress, for error messages

   private:
    NcclCommunicator& owner_;
  };

  // Enqueues the collective, then waits for the stream (polled_: NCCL's async error, the
  // timeout, an abort request). Any failure aborts the NCCL communicator before the exception
  // propagates.
  template <typename Enqueue>
  void run_collective(const CallInfo& call, Enqueue&& enqueue);
  // Throws after a failure; an abort requested meanwhile aborts the NCCL communicator first.
  void fail_if_unusable(const CallInfo& call);
  // Throws unless `pointer` is device memory of this GPU or managed memory.
  void check_device_buffer(const CallInfo& call, const void* pointer, const char* name) const;
  // Makes scratch_ hold at least `elems` floats; the stream is idle, contents are dropped.
  void ensure_scratch(const CallInfo& call, size_t elems);
  void fixed_order_by_all_gather(const CallInfo& call, float* data, size_t count);
  void fixed_order_by_reduce_scatter(const CallInfo& call, float* data, size_t count);

  NcclCommOptions options_;
  int device_ = 0;
  int tp_rank_ = 0;
  int num_ranks_ = 1;
  // Declaration order is release order reversed; the destructor releases explicitly anyway:
  // communicator first (it may reference the buffers), then buffers, then the stream.
  nccl_detail::StreamHandle stream_;
  nccl_detail::DeviceFloats barrier_word_;  // 1 float, always 0: 0 + 0 + ... stays 0
  nccl_detail::DeviceFloats scratch_;
  size_t scratch_capacity_ = 0;  // floats
  nccl_detail::CommHandle comm_;
  std::vector<ProcessIdentity> identities_;  // every rank's process, for peer_faults()
  Queue queue_{*this};
  PolledCollectives polled_;  // failure policy over queue_; knows why comm_ was aborted
};

}  // namespace keel::comm
