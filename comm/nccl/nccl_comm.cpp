// NCCL communicator (host side). The kernel is in nccl_comm.cu, the summation in ordered_sum.h.
//
// Bootstrap (constructor, collective over the MPI communicator):
//  1. Every rank validates its device index, makes it current, creates its stream and the
//     barrier word. A failure is recorded, not thrown yet.
//  2. MPI_Allreduce(MIN) of "my setup worked": if any rank failed, every rank throws (the failed
//     rank with its own error), so nobody is left waiting in ncclCommInitRank for a peer that
//     will never come.
//  3. Rank 0 calls ncclGetUniqueId and MPI_Bcasts {id, status}; a failed ncclGetUniqueId makes
//     every rank throw.
//  4. Every rank calls ncclCommInitRank(size, id, rank) with its GPU current.
//
// Memory layout (per rank, device memory):
//  - barrier word: 1 float (4 bytes), zeroed at construction; barrier() all-reduces it in
//    place, and 0 + 0 + ... = 0 keeps it zero forever.
//  - scratch, grown on demand to the largest kFixedOrder message seen, never shrunk:
//      kAllGather:     num_ranks * count floats       = num_ranks * count * 4 bytes
//      kReduceScatter: num_ranks * chunk floats, chunk = round_up(ceil(count / num_ranks), 64)
//                      = about count * 4 bytes (+ up to num_ranks * 256 bytes of padding)
//    Rows of the scratch are rank-major: row r holds rank r's partials.
//
// kFixedOrder, kAllGather (stream order is the whole ordering argument):
//   ncclAllGather(data -> scratch[N, count]); ordered_sum kernel(scratch -> data).
//   The kernel runs after the all-gather completed on this stream, so it sees every rank's
//   partials; the all-gather only reads `data` (peers receive copies, and NCCL allows a send
//   buffer to be reused once the operation completed on the stream), so overwriting `data`
//   afterwards cannot disturb a peer. Each rank computes the same function of the same
//   gathered rows, so every rank ends with the same bits -- the bits ThreadGroup produces.
//
// kFixedOrder, kReduceScatter (chunk c = [c * chunk, min((c + 1) * chunk, count)), owned by
// rank c; chunk boundaries are multiples of 64 floats so every row and chunk is 256-byte
// aligned when `data` is):
//   group { for peers p: send chunk p of data to p; recv p's chunk `me` into scratch row p }
//   copy chunk `me` of data into scratch row `me`; kernel: chunk `me` of data = ordered sum of
//   the N rows;
//   group { for peers p: send chunk `me` of data to p; recv chunk p of data from p }.
//   Phase 1 only reads chunks p != me of data and writes scratch; the kernel then writes only
//   chunk `me`; phase 2 reads only chunk `me` and writes chunks p != me, which phase 1 finished
//   reading (it completed earlier on this stream). Every element of chunk c is summed on rank
//   c with the same function of the same rows, then copied verbatim: same bits everywhere.
//
// Waiting. cudaStreamQuery is polled (spin ~20 us, yield until 200 us, then 50 us sleeps, so
// a small decode all-reduce returns within microseconds while a long wait costs no CPU);
// between polls ncclCommGetAsyncError reports network/peer failures that would otherwise
// leave the NCCL kernel spinning forever, and options.timeout bounds the wait.
//
// Failure after enqueueing (the policy is comm/polled_collectives.h's, CPU-tested; Queue is its
// device side here): the NCCL communicator is aborted (ncclCommAbort stops its pending
// kernels, so the stream drains and the buffers can be freed), the reason is kept, and every
// later call throws "unusable after ...". Peers are not told by NCCL; their own collective
// fails by their timeout or NCCL's asynchronous error detection.
#include "comm/nccl/nccl_comm.h"
#include "comm/mpi_comm.h"
#include "comm/process_probe.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <string>
#include <thread>
#include <utility>

#include "kernels/base/check.h"

namespace keel::comm {

namespace {

// Polling schedule of the wait (polled_; see the top of this file).
constexpr std::chrono::microseconds kSpinWindow{20};
constexpr std::chrono::microseconds kYieldWindow{200};
constexpr std::chrono::microseconds kSleepStep{50};
// kReduceScatter chunk alignment: 64 floats = 256 bytes, the alignment cudaMalloc gives, so
// every chunk of `data` and every scratch row starts as aligned as the buffer itself.
constexpr size_t kChunkAlignElems = 64;

[[noreturn]] void throw_cuda_failure(int tp_rank, const char* context, const char* call,
                                     cudaError_t status) {
  throw_error("rank ", tp_rank, ": ", context, ": ", call, " failed: ", cudaGetErrorName(status),
              ": ", cudaGetErrorString(status));
}

[[noreturn]] void throw_nccl_failure(int tp_rank, const char* context, const char* call,
                                     ncclResult_t status, ncclComm_t comm) {
  // ncclGetLastError carries NCCL's detailed message (which peer, which CUDA call, ...).
  const char* detail = ncclGetLastError(comm);
  const std::string detail_text =
      detail != nullptr && detail[0] != '\0' ? std::string(" (") + detail + ")" : std::string();
  throw_error("rank ", tp_rank, ": ", context, ": ", call, " failed: ", ncclGetErrorString(status),
              detail_text);
}

void check_mpi(int tp_rank, const char* call, int status) {
  if (status == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(status, text, &length);
  throw_error("rank ", tp_rank, ": NcclCommunicator: ", call,
              " failed: ", std::string(text, static_cast<size_t>(std::max(length, 0))));
}

size_t round_up(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Makes `device` current for a scope and restores the caller's device afterwards: the caller
// may drive several GPUs from one thread, and CUDA's current device is per thread.
class CurrentDevice {
 public:
  CurrentDevice(int device, int tp_rank, const char* context) : device_(device) {
    cudaError_t status = cudaGetDevice(&previous_);
    if (status != cudaSuccess) throw_cuda_failure(tp_rank, context, "cudaGetDevice", status);
    if (previous_ == device_) return;
    status = cudaSetDevice(device_);
    if (status != cudaSuccess) throw_cuda_failure(tp_rank, context, "cudaSetDevice", status);
  }
  ~CurrentDevice() {
    if (previous_ != device_) cudaSetDevice(previous_);  // best effort; nothing to report to
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// Best-effort device switch for deleters, which must not throw.
class CurrentDeviceNoThrow {
 public:
  explicit CurrentDeviceNoThrow(int device) {
    switched_ = cudaGetDevice(&previous_) == cudaSuccess && previous_ != device &&
                cudaSetDevice(device) == cudaSuccess;
  }
  ~CurrentDeviceNoThrow() {
    if (switched_) cudaSetDevice(previous_);
  }
  CurrentDeviceNoThrow(const CurrentDeviceNoThrow&) = delete;
  CurrentDeviceNoThrow& operator=(const CurrentDeviceNoThrow&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// ncclGroupStart/End as a scope: if an enqueue inside the group throws, the group is still
// closed, so the thread's NCCL group state is not left open for later calls.
class NcclGroup {
 public:
  NcclGroup(int tp_rank, const char* context, ncclComm_t comm)
      : tp_rank_(tp_rank), context_(context), comm_(comm) {
    const ncclResult_t status = ncclGroupStart();
    if (status != ncclSuccess) {
      throw_nccl_failure(tp_rank_, context_, "ncclGroupStart()", status, comm_);
    }
  }
  void end() {
    open_ = false;
    const ncclResult_t status = ncclGroupEnd();
    if (status != ncclSuccess)
      throw_nccl_failure(tp_rank_, context_, "ncclGroupEnd()", status, comm_);
  }
  ~NcclGroup() {
    if (open_) ncclGroupEnd();  // unwinding: the communicator is about to be aborted anyway
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

 private:
  int tp_rank_;
  const char* context_;
  ncclComm_t comm_;
  bool open_ = true;
};

}  // namespace

// Checked calls: the message names the rank, the collective (context), the call and the error.
#define KEEL_NCCL_CUDA_CHECK(tp_rank, context, call)                      \
  do {                                                                    \
    const cudaError_t keel_cuda_status_ = (call);                         \
    if (keel_cuda_status_ != cudaSuccess)                                 \
      throw_cuda_failure((tp_rank), (context), #call, keel_cuda_status_); \
  } while (0)

#define KEEL_NCCL_CHECK(tp_rank, context, comm, call)                             \
  do {                                                                            \
    const ncclResult_t keel_nccl_status_ = (call);                                \
    if (keel_nccl_status_ != ncclSuccess)                                         \
      throw_nccl_failure((tp_rank), (context), #call, keel_nccl_status_, (comm)); \
  } while (0)

namespace nccl_detail {

void DeviceMemoryDeleter::operator()(float* pointer) const noexcept {
  CurrentDeviceNoThrow current(device);
  cudaFree(pointer);
}

void StreamDeleter::operator()(cudaStream_t stream) const noexcept {
  CurrentDeviceNoThrow current(device);
  cudaStreamDestroy(stream);
}

void CommDeleter::operator()(ncclComm_t comm) const noexcept {
  ncclCommDestroy(comm);
}

}  // namespace nccl_detail

int mpi_node_local_rank(MPI_Comm comm) {
  int world_rank = 0;
  check_mpi(-1, "MPI_Comm_rank", MPI_Comm_rank(comm, &world_rank));
  MPI_Comm node_comm = MPI_COMM_NULL;
  check_mpi(world_rank, "MPI_Comm_split_type",
            MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node_comm));
  int local_rank = 0;
  const int rank_status = MPI_Comm_rank(node_comm, &local_rank);
  MPI_Comm_free(&node_comm);
  check_mpi(world_rank, "MPI_Comm_rank(node communicator)", rank_status);
  return local_rank;
}

// What a call is doing, for error messages; described only when an error is reported.
struct NcclCommunicator::CallInfo {
  const char* collective = "";
  size_t count = 0;
  const char* unit = nullptr;  // null: no payload (barrier)
  const char* algo = nullptr;  // all_reduce only
  int root = -1;               // broadcast only

  // "all_reduce (fixed_order) of 4096 floats", "broadcast of 12 bytes from rank 0", "barrier".
  std::string describe() const {
    std::string text = collective;
    if (algo != nullptr) text += keel::detail::concat(" (", algo, ")");
    if (unit != nullptr) text += keel::detail::concat(" of ", count, " ", unit);
    if (root >= 0) text += keel::detail::concat(" from rank ", root);
    return text;
  }
};

NcclCommunicator::NcclCommunicator(MPI_Comm comm, int device, NcclCommOptions options)
    : options_(options),
      device_(device),
      stream_(nullptr, nccl_detail::StreamDeleter{device}),
      barrier_word_(nullptr, nccl_detail::DeviceMemoryDeleter{device}),
      scratch_(nullptr, nccl_detail::DeviceMemoryDeleter{device}),
      polled_(*this, queue_,
              WaitSchedule{.spin_window = kSpinWindow,
                           .yield_window = kYieldWindow,
                           .first_sleep = kSleepStep,
                           .max_sleep = kSleepStep}) {
  static constexpr const char* kContext = "NcclCommunicator";
  check_mpi(-1, "MPI_Comm_rank", MPI_Comm_rank(comm, &tp_rank_));
  check_mpi(tp_rank_, "MPI_Comm_size", MPI_Comm_size(comm, &num_ranks_));

  // 1. Local setup; errors are held back until every rank knows whether all succeeded.
  std::string local_problem;
  try {
    if (options_.timeout.count() < 0) {
      throw_error("rank ", tp_rank_, ": ", kContext, ": negative timeout ",
                  options_.timeout.count(), " ms");
    }
    int device_count = 0;
    const cudaError_t count_status = cudaGetDeviceCount(&device_count);
    if (count_status != cudaSuccess) {
      cudaGetLastError();  // not sticky, but leave the error state clean for the caller
      throw_cuda_failure(tp_rank_, kContext, "cudaGetDeviceCount", count_status);
    }
    if (device_ < 0 || device_ >= device_count) {
      throw_error("rank ", tp_rank_, ": ", kContext, ": device ", device_, " out of range [0, ",
                  device_count, ")");
    }
    CurrentDevice current(device_, tp_rank_, kContext);
    // A blocking stream (not cudaStreamNonBlocking): ordered after the caller's work on the
    // legacy default stream, e.g. the cudaMemcpy that filled the buffers.
    cudaStream_t raw_stream = nullptr;
    KEEL_NCCL_CUDA_CHECK(tp_rank_, kContext,
                         cudaStreamCreateWithFlags(&raw_stream, cudaStreamDefault));
    stream_.reset(raw_stream);
    void* raw_word = nullptr;
    KEEL_NCCL_CUDA_CHECK(tp_rank_, kContext, cudaMalloc(&raw_word, sizeof(float)));
    barrier_word_.reset(static_cast<float*>(raw_word));
    KEEL_NCCL_CUDA_CHECK(tp_rank_, kContext, cudaMemset(raw_word, 0, sizeof(float)));
  } catch (const Error& error) {
    local_problem = error.what();
  }

  // 2. Agree: everybody proceeds or everybody throws.
  int local_ok = local_problem.empty() ? 1 : 0;
  int all_ok = 0;
  check_mpi(tp_rank_, "MPI_Allreduce(setup status)",
            MPI_Allreduce(&local_ok, &all_ok, 1, MPI_INT, MPI_MIN, comm));
  if (!local_problem.empty()) throw Error(local_problem);
  if (all_ok == 0) {
    throw_error("rank ", tp_rank_, ": ", kContext,
                ": another rank failed to set up its GPU (its error says why)");
  }

  // 3. Rank 0 creates the id; its status travels with it.
  struct Bootstrap {
    ncclUniqueId id;
    int status;
  } bootstrap{};
  if (tp_rank_ == 0) bootstrap.status = static_cast<int>(ncclGetUniqueId(&bootstrap.id));
  check_mpi(tp_rank_, "MPI_Bcast(ncclUniqueId)",
            MPI_Bcast(&bootstrap, sizeof(bootstrap), MPI_BYTE, 0, comm));
  if (bootstrap.status != static_cast<int>(ncclSuccess)) {
    throw_error("rank ", tp_rank_, ": ", kContext, ": ncclGetUniqueId on rank 0 failed: ",
                ncclGetErrorString(static_cast<ncclResult_t>(bootstrap.status)));
  }

  polled_.set_timeout(options_.timeout);  // checked in step 1

  // The ranks' processes, for peer_faults() (comm/process_probe.h).
  identities_ = exchange_process_identities(comm);

  // 4. Join the NCCL communicator.
  CurrentDevice current(device_, tp_rank_, kContext);
  ncclComm_t raw_comm = nullptr;
  KEEL_NCCL_CHECK(tp_rank_, kContext, nullptr,
                  ncclCommInitRank(&raw_comm, num_ranks_, bootstrap.id, tp_rank_));
  comm_.reset(raw_comm);
}

NcclCommunicator::~NcclCommunicator() {
  CurrentDeviceNoThrow current(device_);
  // Every collective drains the stream before returning, and a failed one aborted the
  // communicator (which stops its kernels), so this does not wait on a peer.
  if (stream_) cudaStreamSynchronize(stream_.get());
  comm_.reset();
  scratch_.reset();
  barrier_word_.reset();
  stream_.reset();
}

bool NcclCommunicator::Queue::finished() {
  const CallInfo& current = *call;
  const int tp_rank = owner_.tp_rank_;
  const cudaError_t status = cudaStreamQuery(owner_.stream_.get());
  if (status == cudaSuccess) return true;
  if (status != cudaErrorNotReady)
    throw_cuda_failure(tp_rank, current.collective, "cudaStreamQuery(stream)", status);
  // NCCL's asynchronous error state: a failed peer or network that would otherwise leave the
  // NCCL kernel spinning forever.
  ncclComm_t nccl = owner_.comm_.get();
  ncclResult_t async_status = ncclSuccess;
  KEEL_NCCL_CHECK(tp_rank, current.collective, nccl, ncclCommGetAsyncError(nccl, &async_status));
  if (async_status != ncclSuccess && async_status != ncclInProgress) {
    const char* detail = ncclGetLastError(nccl);
    throw_error("rank ", tp_rank, ": ", current.describe(),
                ": NCCL asynchronous error: ", ncclGetErrorString(async_status),
                detail != nullptr ? " (" : "", detail != nullptr ? detail : "",
                detail != nullptr ? ")" : "");
  }
  return false;
}

void NcclCommunicator::Queue::abort_queue() noexcept {
  if (!owner_.comm_) return;
  // ncclCommAbort frees the communicator and stops its in-flight kernels (they may be waiting
  // for a peer that never comes); release() because the handle is gone either way.
  CurrentDeviceNoThrow current(owner_.device_);
  ncclCommAbort(owner_.comm_.release());
  if (owner_.stream_) cudaStreamSynchronize(owner_.stream_.get());
  cudaGetLastError();  // the aborted work may leave a non-sticky error behind
}

void NcclCommunicator::fail_if_unusable(const CallInfo& call) {
  polled_.fail_if_unusable([&call] { return call.describe(); });
}

void NcclCommunicator::check_device_buffer(const CallInfo& call, const void* pointer,
                                           const char* name) const {
  if (pointer == nullptr) {
    throw_error("rank ", tp_rank_, ": ", call.describe(), ": null ", name,
                " with a non-zero count");
  }
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw_cuda_failure(tp_rank_, call.collective, "cudaPointerGetAttributes", status);
  }
  if (attributes.type == cudaMemoryTypeManaged) return;
  if (attributes.type == cudaMemoryTypeDevice && attributes.device == device_) return;
  const std::string found = attributes.type == cudaMemoryTypeDevice
                                ? keel::detail::concat("memory of GPU ", attributes.device)
                                : std::string("host memory");
  throw_error("rank ", tp_rank_, ": ", call.describe(), ": ", name,
              " must be device memory of GPU ", device_,
              " (the NCCL backend takes device pointers), found ", found);
}

void NcclCommunicator::ensure_scratch(const CallInfo& call, size_t elems) {
  if (elems <= scratch_capacity_) return;
  // The stream is idle between calls, so the old block is not in use; cudaFree would wait for
  // the device anyway.
  scratch_.reset();
  scratch_capacity_ = 0;
  void* raw = nullptr;
  const cudaError_t status = cudaMalloc(&raw, elems * sizeof(float));
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw_error("rank ", tp_rank_, ": ", call.describe(), ": cudaMalloc of ", elems * sizeof(float),
                " bytes of kFixedOrder scratch failed: ", cudaGetErrorString(status));
  }
  scratch_.reset(static_cast<float*>(raw));
  scratch_capacity_ = elems;
}

template <typename Enqueue>
void NcclCommunicator::run_collective(const CallInfo& call, Enqueue&& enqueue) {
  CurrentDevice current(device_, tp_rank_, call.collective);
  queue_.call = &call;
  polled_.run(
      call.collective, [&call] { return call.describe(); }, enqueue);
}

std::vector<PeerFault> NcclCommunicator::peer_faults() const {
  return probe_local_peers(identities_, tp_rank_);
}

void NcclCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  polled_.set_timeout(timeout);
  options_.timeout = timeout;
}

void NcclCommunicator::all_reduce(float* data, size_t count, ReduceAlgo algo) {
  CallInfo call{.collective = "all_reduce", .count = count, .unit = "floats"};
  if (algo != ReduceAlgo::kNative && algo != ReduceAlgo::kFixedOrder) {
    throw_error("rank ", tp_rank_, ": all_reduce: unknown algorithm ", static_cast<int>(algo));
  }
  call.algo = reduce_algo_name(algo).data();  // names are string literals
  fail_if_unusable(call);
  if (count == 0) return;  // every rank passes the same count, so every rank skips
  check_device_buffer(call, data, "data");

  if (algo == ReduceAlgo::kNative) {
    run_collective(call, [&] {
      KEEL_NCCL_CHECK(
          tp_rank_, call.collective, comm_.get(),
          ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_.get(), stream_.get()));
    });
  } else if (options_.fixed_order_impl == NcclCommOptions::FixedOrderImpl::kReduceScatter) {
    fixed_order_by_reduce_scatter(call, data, count);
  } else {
    fixed_order_by_all_gather(call, data, count);
  }
}

void NcclCommunicator::fixed_order_by_all_gather(const CallInfo& call, float* data, size_t count) {
  const auto ranks = static_cast<size_t>(num_ranks_);
  if (count > std::numeric_limits<size_t>::max() / sizeof(float) / ranks) {
    throw_error("rank ", tp_rank_, ": ", call.describe(), ": scratch size overflows");
  }
  ensure_scratch(call, ranks * count);
  float* gathered = scratch_.get();  // [num_ranks, count], row r = rank r's partials
  run_collective(call, [&] {
    KEEL_NCCL_CHECK(tp_rank_, call.collective, comm_.get(),
                    ncclAllGather(data, gathered, count, ncclFloat32, comm_.get(), stream_.get()));
    KEEL_NCCL_CUDA_CHECK(
        tp_rank_, call.collective,
        nccl_detail::launch_ordered_sum(gathered, count, num_ranks_, count, data, stream_.get()));
  });
}

void NcclCommunicator::fixed_order_by_reduce_scatter(const CallInfo& call, float* data,
                                                     size_t count) {
  const auto ranks = static_cast<size_t>(num_ranks_);
  const size_t chunk = round_up((count + ranks - 1) / ranks, kChunkAlignElems);
  auto chunk_begin = [&](int owner) { return std::min(static_cast<size_t>(owner) * chunk, count); };
  auto chunk_len = [&](int owner) {
    return std::min(chunk_begin(owner) + chunk, count) - chunk_begin(owner);
  };
  ensure_scratch(call, ranks * chunk);
  float* stage = scratch_.get();  // [num_ranks, chunk], row r = rank r's part of my chunk
  const int me = tp_rank_;
  const size_t my_begin = chunk_begin(me);
  const size_t my_len = chunk_len(me);

  run_collective(call, [&] {
    ncclComm_t nccl = comm_.get();
    cudaStream_t stream = stream_.get();
    // Phase 1, reduce-scatter: chunk p of my data goes to its owner p; row p of my stage
    // receives p's partials of my chunk. Empty chunks are skipped on both sides (both sides
    // compute the same lengths).
    NcclGroup scatter(me, call.collective, nccl);
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (peer == me) continue;
      if (chunk_len(peer) > 0) {
        KEEL_NCCL_CHECK(
            me, call.collective, nccl,
            ncclSend(data + chunk_begin(peer), chunk_len(peer), ncclFloat32, peer, nccl, stream));
      }
      if (my_len > 0) {
        KEEL_NCCL_CHECK(me, call.collective, nccl,
                        ncclRecv(stage + static_cast<size_t>(peer) * chunk, my_len, ncclFloat32,
                                 peer, nccl, stream));
      }
    }
    scatter.end();
    // My own row is a local copy (no self send/recv), then the ordered sum of my chunk.
    if (my_len > 0) {
      KEEL_NCCL_CUDA_CHECK(
          me, call.collective,
          cudaMemcpyAsync(stage + static_cast<size_t>(me) * chunk, data + my_begin,
                          my_len * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      KEEL_NCCL_CUDA_CHECK(me, call.collective,
                           nccl_detail::launch_ordered_sum(stage, chunk, num_ranks_, my_len,
                                                           data + my_begin, stream));
    }
    // Phase 2, all-gather: my summed chunk to every peer; chunk p of my data from owner p.
    NcclGroup gather(me, call.collective, nccl);
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (peer == me) continue;
      if (my_len > 0) {
        KEEL_NCCL_CHECK(me, call.collective, nccl,
                        ncclSend(data + my_begin, my_len, ncclFloat32, peer, nccl, stream));
      }
      if (chunk_len(peer) > 0) {
        KEEL_NCCL_CHECK(
            me, call.collective, nccl,
            ncclRecv(data + chunk_begin(peer), chunk_len(peer), ncclFloat32, peer, nccl, stream));
      }
    }
    gather.end();
  });
}

void NcclCommunicator::all_gather(const float* send, size_t count, float* recv) {
  const CallInfo call{.collective = "all_gather", .count = count, .unit = "floats per rank"};
  fail_if_unusable(call);
  if (count == 0) return;
  check_device_buffer(call, send, "send");
  check_device_buffer(call, recv, "recv");
  run_collective(call, [&] {
    // In place when send == recv + rank * count, which NCCL supports.
    KEEL_NCCL_CHECK(tp_rank_, call.collective, comm_.get(),
                    ncclAllGather(send, recv, count, ncclFloat32, comm_.get(), stream_.get()));
  });
}

void NcclCommunicator::broadcast(void* data, size_t bytes, int root) {
  const CallInfo call{.collective = "broadcast", .count = bytes, .unit = "bytes", .root = root};
  fail_if_unusable(call);
  if (root < 0 || root >= num_ranks_) {
    throw_error("rank ", tp_rank_, ": broadcast: root ", root, " out of range [0, ", num_ranks_,
                ")");
  }
  if (bytes == 0) return;
  check_device_buffer(call, data, "data");
  run_collective(call, [&] {
    KEEL_NCCL_CHECK(tp_rank_, call.collective, comm_.get(),
                    ncclBroadcast(data, data, bytes, ncclChar, root, comm_.get(), stream_.get()));
  });
}

void NcclCommunicator::barrier() {
  const CallInfo call{.collective = "barrier"};
  fail_if_unusable(call);
  // Completing an all-reduce needs every rank's contribution, so no rank passes before all
  // have entered; waiting for the stream makes it a host-side barrier.
  run_collective(call, [&] {
    KEEL_NCCL_CHECK(tp_rank_, call.collective, comm_.get(),
                    ncclAllReduce(barrier_word_.get(), barrier_word_.get(), 1, ncclFloat32, ncclSum,
                                  comm_.get(), stream_.get()));
  });
}

}  // namespace keel::comm
