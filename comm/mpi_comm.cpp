// MPI communicator: one rank per Open MPI process.
//
// Algorithms.
//  - kNative: MPI_Iallreduce(MPI_IN_PLACE, MPI_SUM). Open MPI's libnbc chooses the schedule
//    (and so each element's summation order) from the message size; every schedule it has
//    either reduces at one rank and broadcasts, or reduces each block at one rank and
//    gathers, so all ranks end with the same bits (test_mpi_comm checks it).
//  - kFixedOrder: reduce-scatter in canonical order + all-gather, the same decomposition as
//    the thread backend's, with the same chunking: N chunks (N = ranks), chunk_elems =
//    round_up(ceil(count / N), 16) so boundaries fall on 64 bytes; chunk c covers
//    [min(c * chunk_elems, count), min((c + 1) * chunk_elems, count)) and is reduced by rank c.
//      1. MPI_Ialltoallv: rank r sends its chunk c to rank c, for every c != r. Rank c
//         receives slot k of its staging buffer from rank k.
//      2. Rank c sums ((p0 + p1) + p2) + ... over k = 0..N-1 in fp32 (its own partial read in
//         place from its data buffer, the others from staging) and stores the sum into chunk c
//         of its own data buffer.
//      3. MPI_Iallgatherv(MPI_IN_PLACE): chunk c travels from rank c to every rank.
//    Bytes moved per rank: (N-1)/N of the message in each phase, like a ring all-reduce.
//    Messages up to options.fixed_order_allgather_max_bytes (2 KiB) take a one-round path
//    instead: MPI_Iallgather of every rank's whole partial into staging, then every rank
//    computes every element ((p0 + p1) + p2) + ... itself. Latency-bound sizes gain a round
//    trip; the bits are the same, as the expression is.
//
// Memory layout. The user's buffer is the alltoallv send buffer and the allgatherv receive
// buffer; the only copy keel owns is `staging_`: N slices of one chunk each
// ([k * my_chunk_elems, (k + 1) * my_chunk_elems) holds rank k's partial of my chunk; slice
// `rank` is unused because the own partial is read in place). On the one-round path, slice k
// holds rank k's whole partial. It grows to the largest need seen and is never shrunk, so
// steady-state calls do not allocate.
//
// Ordering argument (why the bits equal the thread backend's and are the same on every rank).
//  - Each element i lives in exactly one chunk c, and only rank c computes it, as
//    ((p0[i] + p1[i]) + p2[i]) + ... + p{N-1}[i] with plain fp32 adds (the project builds with
//    -ffp-contract=off, and every add is a separate, in-order pass over a tile): that is the
//    documented kFixedOrder value, which depends on neither the chunking nor the transport.
//    The thread backend computes the same expression, so the bits are identical.
//  - Step 2 starts only after the alltoallv request completed (MPI_Test returned true), so
//    every partial has arrived and the send buffer (our data, read by MPI for the other
//    chunks) is no longer read by MPI when chunk `rank` of it is overwritten with the sum;
//    the other chunks of data are not written in step 2.
//  - Step 3 copies bits; every rank receives the one value computed by each chunk's owner.
//  - Collectives on one communicator match in issue order (MPI rule), and each call
//    completes its requests before returning, so consecutive calls cannot mix.
//
// Watchdog / waiting. A blocking MPI call cannot be interrupted, so every collective is
// non-blocking and completed by polling MPI_Test (which also drives libnbc's progress):
// a few back-to-back polls (a peer on another core answers within microseconds), then
// polls separated by sched_yield while the collective may still be moving data (4 ranks on 2
// cores: the peer we wait for usually needs our core), then polls separated by sleeps growing
// to 1 ms so that a long wait (a peer still loading weights) costs no CPU. The deadline
// counts from the call's entry and covers every phase of it.
#include "comm/mpi_comm.h"
#include "comm/process_probe.h"
#include "comm/rank_order_sum.h"
#include "comm/wait_loop.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>
#include <thread>
#include <utility>

#include "kernels/base/check.h"

namespace keel::comm {

namespace {

using Clock = std::chrono::steady_clock;

// MPI counts and displacements are ints: messages are processed in pieces no larger than
// this (elements or bytes), which keeps every count and displacement of a piece in range.
constexpr size_t kMaxPieceElems = size_t{1} << 28;
constexpr size_t kMaxPieceBytes = size_t{1} << 30;

// Waiting strategy (see the top of this file).
constexpr int kSpinPolls = 32;
constexpr auto kMinYieldWindow = std::chrono::milliseconds(5);
// While the collective may still be moving data, keep yielding: ~1 ms per MB at the
// slowest shared-memory rate seen on the 2-core VM, so big messages never fall into sleeps.
constexpr double kYieldNanosPerByte = 1.0;
constexpr auto kFirstSleep = std::chrono::microseconds(20);
constexpr auto kMaxSleep = std::chrono::microseconds(1000);

// kFixedOrder chunking, identical to the thread backend's (see the top of this file).
struct FixedOrderPlan {
  size_t count = 0;
  size_t chunk_elems = 0;
  size_t begin(int chunk_idx) const {
    return std::min(static_cast<size_t>(chunk_idx) * chunk_elems, count);
  }
  size_t length(int chunk_idx) const {
    return std::min(begin(chunk_idx) + chunk_elems, count) - begin(chunk_idx);
  }
};

FixedOrderPlan make_fixed_order_plan(size_t count, int num_ranks) {
  return {.count = count,
          .chunk_elems = aligned_chunk_elems(count, static_cast<size_t>(num_ranks))};
}

std::string mpi_error_string(int status) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(status, text, &length) != MPI_SUCCESS) {
    return keel::detail::concat("MPI error ", status);
  }
  return std::string(text, static_cast<size_t>(std::max(0, length)));
}

// Buffers of abandoned collectives (OnTimeout::kThrow) that never completed: MPI may still
// read or write them, so they must never be freed. Bounded in practice (one set per broken
// communicator, which only tests create).
template <typename T>
void keep_forever(std::vector<T>&& buffer) {
  static std::mutex mutex;
  static std::vector<std::vector<T>> graveyard;
  std::lock_guard<std::mutex> lock(mutex);
  graveyard.push_back(std::move(buffer));
}

}  // namespace

bool mpi_launched() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  return false;
}

std::vector<ProcessIdentity> exchange_process_identities(MPI_Comm comm) {
  // Fixed-size records, so one MPI_Allgather of bytes carries every rank's identity.
  struct Record {
    int64_t pid = 0;
    uint64_t start_ticks = 0;
    char node[112] = {};
  };
  const ProcessIdentity mine = this_process_identity();
  Record record;
  record.pid = mine.pid;
  record.start_ticks = mine.start_ticks;
  mine.node.copy(record.node, sizeof(record.node) - 1);
  int num_ranks = 1;
  MPI_Comm_size(comm, &num_ranks);
  std::vector<Record> records(static_cast<size_t>(num_ranks));
  const int status = MPI_Allgather(&record, sizeof(Record), MPI_BYTE, records.data(),
                                   sizeof(Record), MPI_BYTE, comm);
  if (status != MPI_SUCCESS) {
    throw_error("exchange_process_identities: MPI_Allgather failed: ", mpi_error_string(status));
  }
  std::vector<ProcessIdentity> identities;
  for (const Record& peer : records)
    identities.push_back({.pid = peer.pid, .start_ticks = peer.start_ticks, .node = peer.node});
  return identities;
}

MpiSession::MpiSession() : MpiSession(nullptr, nullptr) {}

MpiSession::MpiSession(int* argc, char*** argv) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) throw_error("MpiSession: MPI was already finalised and cannot be restarted");
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Query_thread(&thread_level_);
  } else {
    const int status = MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &thread_level_);
    if (status != MPI_SUCCESS) {
      throw_error("MpiSession: MPI_Init_thread failed: ", mpi_error_string(status));
    }
    owns_mpi_ = true;
  }
  if (thread_level_ < MPI_THREAD_FUNNELED) {
    if (owns_mpi_) MPI_Finalize();
    owns_mpi_ = false;
    throw_error("MpiSession: the MPI library provides thread level ", thread_level_,
                "; keel needs at least MPI_THREAD_FUNNELED (", MPI_THREAD_FUNNELED, ")");
  }
}

MpiSession::~MpiSession() {
  if (!owns_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

MpiCommunicator::MpiCommunicator(MPI_Comm parent, MpiCommOptions options) : options_(options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    throw_error("MpiCommunicator: MPI is not initialised (construct an MpiSession first)");
  }
  if (parent == MPI_COMM_NULL) throw_error("MpiCommunicator: parent communicator is null");
  int parent_rank = -1;
  MPI_Comm_rank(parent, &parent_rank);
  if (options_.timeout.count() < 0) {
    throw_error("rank ", parent_rank, ": MpiCommunicator: negative timeout");
  }
  // A private duplicate: keel's collectives can never match another library's, and the
  // error handler set below does not change the caller's communicator.
  const int status = MPI_Comm_dup(parent, &comm_);
  if (status != MPI_SUCCESS) {
    throw_error("rank ", parent_rank,
                ": MpiCommunicator: MPI_Comm_dup failed: ", mpi_error_string(status));
  }
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &tp_rank_);
  MPI_Comm_size(comm_, &num_ranks_);
  const auto per_rank = static_cast<size_t>(num_ranks_);
  send_counts_.resize(per_rank);
  send_displs_.resize(per_rank);
  recv_counts_.resize(per_rank);
  recv_displs_.resize(per_rank);
  sources_.resize(per_rank);
  identities_ = exchange_process_identities(comm_);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // nothing can be freed any more; MPI reclaimed it all
  if (abandoned_request_ != MPI_REQUEST_NULL) {
    // Give a late peer one more timeout to complete the abandoned collective; MPI forbids
    // freeing or cancelling a collective's request, so if it is still pending we leave it
    // (and its staging buffer) to MPI.
    const auto give_up_at = Clock::now() + options_.timeout;
    int done = 0;
    while (MPI_Test(&abandoned_request_, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done &&
           Clock::now() < give_up_at) {
      std::this_thread::sleep_for(kFirstSleep);
    }
    if (!done) {
      std::fprintf(stderr,
                   "[keel rank %d] warning: abandoned %s never completed; its buffers stay "
                   "allocated\n",
                   tp_rank_, abandoned_what_.c_str());
      keep_forever(std::move(staging_));
      keep_forever(std::move(argument_check_));
    }
  }
  // Deferred by MPI until pending operations on it (an abandoned collective) are done.
  MPI_Comm_free(&comm_);
}

std::string MpiCommunicator::CallContext::describe() const {
  if (unit == nullptr) return collective;
  std::string text = keel::detail::concat(collective, " of ", count, " ", unit);
  if (root >= 0) text += keel::detail::concat(" from rank ", root);
  return text;
}

void MpiCommunicator::check_mpi(int status, const CallContext& call, const char* mpi_call) const {
  if (status == MPI_SUCCESS) [[likely]]
    return;
  throw_error("rank ", tp_rank_, ": ", call.collective, ": ", mpi_call,
              " failed: ", mpi_error_string(status));
}

void MpiCommunicator::fail_if_unusable(const CallContext& call) {
  if (watch().abort_requested() && !unusable()) {
    throw_error("rank ", tp_rank_, ": ", call.collective, ": aborted: ", watch().abort_reason());
  }
  if (!unusable()) [[likely]]
    return;
  throw_error("rank ", tp_rank_, ": ", call.collective, ": communicator unusable after an earlier ",
              abandoned_what_, " timed out (MPI cannot cancel a started collective)");
}

void MpiCommunicator::check_arguments(const CallContext& call, const std::string& local_problem,
                                      int64_t tag) {
  if (!options_.verify_arguments || num_ranks_ == 1) {
    if (!local_problem.empty()) {
      throw_error("rank ", tp_rank_, ": ", call.collective, ": ", local_problem);
    }
    return;
  }
  // Every rank sees every rank's {count, tag, bad} and so reaches the same verdict; on a
  // mismatch all of them throw in this same call and nothing else was posted, so the
  // communicator stays usable. argument_check_ holds this rank's fields, then every rank's;
  // it is a member, not a local, so that an abandoned check (OnTimeout::kThrow) cannot leave
  // MPI pointing into a dead stack frame.
  constexpr int kFields = 3;
  argument_check_.resize(static_cast<size_t>(kFields) * (num_ranks_ + 1));
  int64_t* mine = argument_check_.data();
  int64_t* everyone = mine + kFields;
  mine[0] = static_cast<int64_t>(call.count);
  mine[1] = tag;
  mine[2] = local_problem.empty() ? 0 : 1;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(
      MPI_Iallgather(mine, kFields, MPI_INT64_T, everyone, kFields, MPI_INT64_T, comm_, &request),
      call, "MPI_Iallgather (argument check)");
  wait(request, call);

  const std::string_view collective = call.collective;
  const char* count_name = collective == "broadcast" ? "byte count" : "count";
  const char* tag_name = collective == "all_reduce"  ? "algorithm"
                         : collective == "broadcast" ? "root"
                                                     : nullptr;
  auto field = [&](int peer_rank, int index) {
    return everyone[static_cast<size_t>(peer_rank) * kFields + index];
  };
  std::string problem;
  for (int peer_rank = 0; peer_rank < num_ranks_ && problem.empty(); ++peer_rank) {
    if (field(peer_rank, 2) != 0) {
      problem = peer_rank == tp_rank_
                    ? local_problem
                    : keel::detail::concat("rank ", peer_rank, " passed invalid arguments");
    } else if (field(peer_rank, 0) != field(0, 0)) {
      problem = keel::detail::concat("ranks disagree on ", count_name, " (rank 0: ", field(0, 0),
                                     ", rank ", peer_rank, ": ", field(peer_rank, 0), ")");
    } else if (tag_name != nullptr && field(peer_rank, 1) != field(0, 1)) {
      problem = keel::detail::concat("ranks disagree on ", tag_name, " (rank 0: ", field(0, 1),
                                     ", rank ", peer_rank, ": ", field(peer_rank, 1), ")");
    }
  }
  if (!problem.empty()) throw_error("rank ", tp_rank_, ": ", call.collective, ": ", problem);
}

void MpiCommunicator::wait(MPI_Request& request, const CallContext& call) {
  // The yield phase is long enough for the data of the message to move (see the constants).
  const WaitSchedule schedule{
      .spin_polls = kSpinPolls,
      .yield_window =
          kMinYieldWindow + std::chrono::nanoseconds(static_cast<int64_t>(
                                kYieldNanosPerByte * static_cast<double>(call.message_bytes))),
      .first_sleep = kFirstSleep,
      .max_sleep = kMaxSleep};
  const WaitOutcome outcome = wait_until_done(
      [&] {
        int done = 0;
        check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), call, "MPI_Test");
        return done != 0;
      },
      schedule, watch(), call.collective, call.start, options_.timeout);
  if (outcome == WaitOutcome::kDone) return;

  const std::string what = call.describe();
  std::string message;
  if (outcome == WaitOutcome::kAborted) {
    message = keel::detail::concat(what, " aborted: ", watch().abort_reason());
  } else {
    message = keel::detail::concat(what, " timed out after ", options_.timeout.count(),
                                   " ms: a peer rank died or hangs");
    const std::vector<PeerFault> faults = peer_faults();
    if (!faults.empty()) message += " (" + describe_peer_faults(faults, "") + ")";
    if (options_.on_timeout == MpiCommOptions::OnTimeout::kAbort) {
      // One line, flushed before the abort: it is the only trace the job leaves.
      std::fprintf(stderr, "[keel rank %d] FATAL: %s\n", tp_rank_, message.c_str());
      std::fflush(stderr);
      // The other survivors entered the same collective within moments of this rank and
      // time out just as it does; a short grace lets each of them print its own line
      // before MPI_Abort has mpirun kill them.
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      MPI_Abort(comm_, 3);
      std::abort();  // MPI_Abort does not return; never continue past a hung collective
    }
  }
  // kThrow or an abort: MPI cannot cancel the collective; park it (see MpiCommOptions).
  abandoned_request_ = request;
  request = MPI_REQUEST_NULL;
  abandoned_what_ = what;
  throw_error("rank ", tp_rank_, ": ", message);
}

std::vector<PeerFault> MpiCommunicator::peer_faults() const {
  return probe_local_peers(identities_, tp_rank_);
}

void MpiCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  if (timeout.count() < 0) throw_error("rank ", tp_rank_, ": MpiCommunicator: negative timeout");
  options_.timeout = timeout;
}

void MpiCommunicator::all_reduce(float* data, size_t count, ReduceAlgo algo) {
  const CallContext call{.collective = "all_reduce",
                         .count = count,
                         .unit = "floats",
                         .message_bytes = count * sizeof(float),
                         .start = Clock::now()};
  fail_if_unusable(call);
  std::string local_problem;
  if (data == nullptr && count > 0) local_problem = "null data with a non-zero count";
  if (algo != ReduceAlgo::kNative && algo != ReduceAlgo::kFixedOrder) {
    local_problem = keel::detail::concat("unknown algorithm ", static_cast<int>(algo));
  }
  check_arguments(call, local_problem, static_cast<int64_t>(algo));
  if (num_ranks_ == 1 || count == 0) return;

  // Pieces keep MPI's int counts in range; kFixedOrder's bits do not depend on the split
  // (every element's order is fixed) and kNative's order may depend on the size anyway.
  for (size_t offset = 0; offset < count; offset += kMaxPieceElems) {
    const size_t piece = std::min(kMaxPieceElems, count - offset);
    if (algo == ReduceAlgo::kFixedOrder) {
      if (piece * sizeof(float) <= options_.fixed_order_allgather_max_bytes) {
        fixed_order_small(data + offset, piece, call);
      } else {
        fixed_order_piece(data + offset, piece, call);
      }
    } else {
      MPI_Request request = MPI_REQUEST_NULL;
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data + offset, static_cast<int>(piece), MPI_FLOAT,
                               MPI_SUM, comm_, &request),
                call, "MPI_Iallreduce");
      wait(request, call);
    }
  }
}

void MpiCommunicator::fixed_order_small(float* data, size_t count, const CallContext& call) {
  // Every rank gets every partial and evaluates the same expression for every element, so all
  // ranks agree bit for bit without a second round.
  const size_t staging_elems = count * static_cast<size_t>(num_ranks_);
  if (staging_.size() < staging_elems) staging_.resize(staging_elems);
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(data, static_cast<int>(count), MPI_FLOAT, staging_.data(),
                           static_cast<int>(count), MPI_FLOAT, comm_, &request),
            call, "MPI_Iallgather");
  wait(request, call);
  for (int source_rank = 0; source_rank < num_ranks_; ++source_rank) {
    sources_[source_rank] = staging_.data() + static_cast<size_t>(source_rank) * count;
  }
  sum_in_rank_order(sources_.data(), num_ranks_, &data, 1, count);
}

void MpiCommunicator::fixed_order_piece(float* data, size_t count, const CallContext& call) {
  const FixedOrderPlan plan = make_fixed_order_plan(count, num_ranks_);
  const size_t my_begin = plan.begin(tp_rank_);
  const size_t my_len = plan.length(tp_rank_);
  const size_t staging_elems = my_len * static_cast<size_t>(num_ranks_);
  if (staging_.size() < staging_elems) staging_.resize(staging_elems);

  // 1. Reduce-scatter's exchange: chunk c of every rank goes to rank c. Our own partial of
  //    our chunk stays where it is (counts 0 to and from ourselves).
  for (int peer_rank = 0; peer_rank < num_ranks_; ++peer_rank) {
    const bool self = peer_rank == tp_rank_;
    send_counts_[peer_rank] = self ? 0 : static_cast<int>(plan.length(peer_rank));
    send_displs_[peer_rank] = static_cast<int>(plan.begin(peer_rank));
    recv_counts_[peer_rank] = self ? 0 : static_cast<int>(my_len);
    recv_displs_[peer_rank] = static_cast<int>(static_cast<size_t>(peer_rank) * my_len);
  }
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(
      MPI_Ialltoallv(data, send_counts_.data(), send_displs_.data(), MPI_FLOAT, staging_.data(),
                     recv_counts_.data(), recv_displs_.data(), MPI_FLOAT, comm_, &request),
      call, "MPI_Ialltoallv");
  wait(request, call);

  // 2. The canonical order: ((p0 + p1) + p2) + ..., p_rank read in place.
  if (my_len > 0) {
    for (int source_rank = 0; source_rank < num_ranks_; ++source_rank) {
      sources_[source_rank] = source_rank == tp_rank_
                                  ? data + my_begin
                                  : staging_.data() + static_cast<size_t>(source_rank) * my_len;
    }
    float* destination = data + my_begin;
    sum_in_rank_order(sources_.data(), num_ranks_, &destination, 1, my_len);
  }

  // 3. All-gather of the reduced chunks, in place.
  for (int peer_rank = 0; peer_rank < num_ranks_; ++peer_rank) {
    recv_counts_[peer_rank] = static_cast<int>(plan.length(peer_rank));
    recv_displs_[peer_rank] = static_cast<int>(plan.begin(peer_rank));
  }
  check_mpi(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, recv_counts_.data(),
                            recv_displs_.data(), MPI_FLOAT, comm_, &request),
            call, "MPI_Iallgatherv");
  wait(request, call);
}

void MpiCommunicator::all_gather(const float* send, size_t count, float* recv) {
  const CallContext call{.collective = "all_gather",
                         .count = count,
                         .unit = "floats per rank",
                         .message_bytes = count * static_cast<size_t>(num_ranks_) * sizeof(float),
                         .start = Clock::now()};
  fail_if_unusable(call);
  std::string local_problem;
  if ((send == nullptr || recv == nullptr) && count > 0) {
    local_problem = "null send or recv buffer with a non-zero count";
  } else if (count > static_cast<size_t>(INT_MAX) / static_cast<size_t>(num_ranks_)) {
    local_problem = keel::detail::concat("count ", count, " per rank exceeds MPI's int range");
  }
  check_arguments(call, local_problem, 0);
  if (count == 0) return;
  float* my_slot = recv + static_cast<size_t>(tp_rank_) * count;
  if (num_ranks_ == 1) {
    // memmove: an in-place gather passes send == recv.
    if (send != my_slot) std::memmove(my_slot, send, count * sizeof(float));
    return;
  }
  // MPI forbids aliasing send and recv; the in-place form is MPI_IN_PLACE.
  const void* send_arg = send == my_slot ? MPI_IN_PLACE : send;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(send_arg, static_cast<int>(count), MPI_FLOAT, recv,
                           static_cast<int>(count), MPI_FLOAT, comm_, &request),
            call, "MPI_Iallgather");
  wait(request, call);
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  const CallContext call{.collective = "broadcast",
                         .count = bytes,
                         .unit = "bytes",
                         .root = root,
                         .message_bytes = bytes,
                         .start = Clock::now()};
  fail_if_unusable(call);
  std::string local_problem;
  if (root < 0 || root >= num_ranks_) {
    local_problem = keel::detail::concat("root ", root, " out of range [0, ", num_ranks_, ")");
  } else if (data == nullptr && bytes > 0) {
    local_problem = "null data with a non-zero size";
  }
  check_arguments(call, local_problem, root);
  if (num_ranks_ == 1 || bytes == 0) return;
  auto* byte_data = static_cast<char*>(data);
  for (size_t offset = 0; offset < bytes; offset += kMaxPieceBytes) {
    const size_t piece = std::min(kMaxPieceBytes, bytes - offset);
    MPI_Request request = MPI_REQUEST_NULL;
    check_mpi(
        MPI_Ibcast(byte_data + offset, static_cast<int>(piece), MPI_BYTE, root, comm_, &request),
        call, "MPI_Ibcast");
    wait(request, call);
  }
}

void MpiCommunicator::barrier() {
  const CallContext call{.collective = "barrier", .start = Clock::now()};
  fail_if_unusable(call);
  if (num_ranks_ == 1) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibarrier(comm_, &request), call, "MPI_Ibarrier");
  wait(request, call);
}

}  // namespace keel::comm
