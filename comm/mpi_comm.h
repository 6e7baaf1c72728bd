// Process-rank communicator: each rank is one OpenMPI process (launched by mpirun or srun).
//
// Design (details, measurements and the ordering argument are in mpi_comm.cpp):
//  - Private traffic. The communicator works on an MPI_Comm_dup of the one it is given, so
//    keel's collectives can never match anybody else's messages, and it sets
//    MPI_ERRORS_RETURN on the duplicate so that MPI failures become keel::Error naming the rank.
//  - all_reduce kNative: MPI_Iallreduce(MPI_SUM) in place; the summation order is whatever
//    Open MPI picks for the message size (as with NCCL). Results are identical on all ranks.
//  - all_reduce kFixedOrder: every element is ((p0 + p1) + p2) + ... in fp32, rank order,
//    whatever the message size -- bit-identical to ThreadGroup's kFixedOrder. Reduce-scatter
//    as MPI_Ialltoallv (rank c receives chunk c from every rank), an ordered local sum, then
//    MPI_Iallgatherv of the reduced chunks: ring-class bytes, like the thread backend. Tiny
//    messages (<= 2 KiB by default) instead all-gather every partial and every rank sums all
//    of them in the same order: one round of latency instead of two, same bits.
//  - all_gather: MPI_Iallgather; broadcast: MPI_Ibcast of bytes; barrier: MPI_Ibarrier.
//  - Watchdog: every collective is issued non-blocking and completed by polling MPI_Test
//    (spin, then yield, then short sleeps, so 4 ranks on 2 cores do not starve each other).
//    With options.timeout > 0, a collective that has not completed in time prints one line
//      [keel rank 2] FATAL: all_reduce of 4096 floats timed out after 5000 ms: a peer rank
//      died or hangs
//    to stderr and calls MPI_Abort(comm, 3), so every surviving rank exits non-zero instead of
//    hanging forever (or throws keel::Error, see MpiCommOptions::on_timeout).
//  - Abort: Communicator::abort(reason) from another thread (the serving watchdog, on a dead
//    peer) ends the wait in progress within one poll with keel::Error "rank R: <collective>
//    aborted: <reason>"; the collective stays posted as after a kThrow timeout, and every
//    later call throws. peer_faults() names peers on this node that are dead or stopped (the
//    ranks' pids and start times are exchanged at construction).
//  - Every error message names the rank: "rank R: <collective>...: <problem>" for keel::Error,
//    "[keel rank R] FATAL: ..." for the watchdog's abort line.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/process_probe.h"

namespace keel::comm {

// True when this process was started by a process launcher (mpirun / mpiexec of Open MPI, or
// srun / any PMI or PMIx launcher): one of OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_RANK is set.
// The CLI uses it to choose process ranks (MPI) over thread ranks.
bool mpi_launched();

// Every rank's (pid, start time, node) of `comm`, indexed by rank. Collective over `comm`.
std::vector<ProcessIdentity> exchange_process_identities(MPI_Comm comm);

// RAII MPI initialisation for a whole process: MPI_Init_thread asking for
// MPI_THREAD_SERIALIZED (the engine may run its rank on a thread other than main, one at a
// time); throws keel::Error if the library cannot give at least MPI_THREAD_FUNNELED.
// MPI_Finalize in the destructor. If MPI is already initialised (by the application or an
// earlier session), the session neither initialises nor finalises it; constructing a session
// after MPI was finalised throws (MPI cannot be initialised twice). Not copyable or movable.
class MpiSession {
 public:
  MpiSession();
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  // MPI_THREAD_* level the library provides.
  int thread_level() const { return thread_level_; }
  // True if this session called MPI_Init_thread (and will call MPI_Finalize).
  bool owns_mpi() const { return owns_mpi_; }

 private:
  int thread_level_ = 0;
  bool owns_mpi_ = false;
};

struct MpiCommOptions {
  // A collective that has not completed after this long ends the job (see on_timeout).
  // 0 = wait forever.
  std::chrono::milliseconds timeout{0};

  enum class OnTimeout : uint8_t {
    // Print the FATAL line and MPI_Abort(comm, 3): every rank of the job exits non-zero. What
    // production wants: a started MPI collective cannot be cancelled, so nothing else is safe.
    kAbort,
    // Throw keel::Error with the same text instead (for tests of the timeout path inside one
    // MPI job). The timed-out collective stays posted -- MPI cannot cancel it -- so afterwards:
    //  - every later call on this communicator throws ("unusable after ...");
    //  - the buffers passed to the timed-out call must stay alive until the communicator is
    //    destroyed: a late peer may still complete the collective and MPI then writes them;
    //  - the destructor waits up to one more `timeout` for the abandoned collective (so a late
    //    peer can still finish it), then gives up on it.
    kThrow,
  };
  OnTimeout on_timeout = OnTimeout::kAbort;

  // Before every collective, one extra small all-gather checks that all ranks pass the same
  // count / algorithm / root and valid buffers; on a mismatch every rank throws keel::Error in
  // the same call and the communicator stays usable, as with the thread backend. Without it
  // (the default, one collective cheaper) mismatched arguments are undefined behaviour in MPI
  // (usually a truncation error or a hang that the watchdog turns into an abort); invalid local
  // arguments (null buffers, bad root) still throw on the rank that passed them.
  bool verify_arguments = false;

  // kFixedOrder messages up to this size take the one-round path: MPI_Iallgather of every
  // rank's whole partial, then every rank sums all N partials in rank order itself. That moves
  // N - 1 messages' worth of data per rank instead of 2 (N - 1) / N, but in one collective
  // round instead of two, which wins while latency dominates. The bits are the same either
  // way. Default: 2 KiB, where each partial still travels as one eager message of Open MPI's
  // shared-memory transport (its eager limit is 4 KiB including headers); measured on the
  // 4-rank / 2-core VM: 1-2 KiB ~10-14 us instead of ~16-23 us, 4 KiB and up slower.
  size_t fixed_order_allgather_max_bytes = 2048;
};

// One rank of an MPI job. Construction is collective over `parent` (MPI_Comm_dup), and so is
// destruction (MPI_Comm_free). Use it from one thread at a time; MPI must be initialised (see
// MpiSession) for the communicator's whole lifetime.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm parent = MPI_COMM_WORLD, MpiCommOptions options = {});
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return tp_rank_; }
  int size() const override { return num_ranks_; }

  void all_reduce(float* data, size_t count, ReduceAlgo algo) override;
  void all_gather(const float* send, size_t count, float* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;

  // Peers on this node found dead or stopped (/proc, comm/process_probe.h); any thread.
  std::vector<PeerFault> peer_faults() const override;
  void set_timeout(std::chrono::milliseconds timeout) override;

  // The private duplicate all traffic goes through (for diagnostics; do not free it).
  MPI_Comm mpi_comm() const { return comm_; }
  const MpiCommOptions& options() const { return options_; }
  // True after a collective timed out under OnTimeout::kThrow.
  bool unusable() const { return abandoned_request_ != MPI_REQUEST_NULL; }

 private:
  // The call in progress, for the watchdog and error messages. Described only when needed,
  // so the fast path builds no strings.
  struct CallContext {
    const char* collective = "";
    size_t count = 0;            // elements or bytes, see unit
    const char* unit = nullptr;  // "floats", "floats per rank", "bytes"; null: no payload
    int root = -1;               // broadcast only
    size_t message_bytes = 0;    // bytes the collective moves per rank (sets the yield window)
    std::chrono::steady_clock::time_point start;  // the watchdog's deadline counts from here
    // "all_reduce of 4096 floats", "broadcast of 12 bytes from rank 0", "barrier".
    std::string describe() const;
  };

  // Throws once a collective was abandoned or an abort was requested (Communicator::abort).
  void fail_if_unusable(const CallContext& call);
  // Local argument problems (empty when fine) and, with verify_arguments, agreement across
  // ranks on call.count and `tag`: throws keel::Error on every rank if any rank's arguments
  // are bad or they disagree.
  void check_arguments(const CallContext& call, const std::string& local_problem, int64_t tag);
  // Completes `request` by polling MPI_Test (comm/wait_loop.h); applies the timeout and an
  // abort request, after both of which the collective stays posted (see OnTimeout::kThrow).
  void wait(MPI_Request& request, const CallContext& call);
  // Throws keel::Error "rank R: <collective>: <mpi_call> failed: <MPI error string>".
  void check_mpi(int status, const CallContext& call, const char* mpi_call) const;
  // kFixedOrder on at most kMaxPieceElems elements: alltoallv + ordered sum + allgatherv.
  void fixed_order_piece(float* data, size_t count, const CallContext& call);
  // kFixedOrder for tiny messages: allgather of whole partials + ordered sum on every rank.
  void fixed_order_small(float* data, size_t count, const CallContext& call);

  MpiCommOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int tp_rank_ = 0;
  int num_ranks_ = 1;
  // kFixedOrder receive staging: num_ranks_ slices of one chunk each (of one whole partial
  // each on the one-round path); grown, never shrunk, so steady-state calls allocate nothing.
  std::vector<float> staging_;
  // MPI_Ialltoallv / MPI_Iallgatherv arguments and the sum's source pointers, one per rank,
  // sized once at construction.
  std::vector<int> send_counts_, send_displs_, recv_counts_, recv_displs_;
  std::vector<const float*> sources_;
  // verify_arguments' exchange: this rank's {count, tag, bad}, then every rank's.
  std::vector<int64_t> argument_check_;
  // The collective that timed out under OnTimeout::kThrow (MPI cannot cancel it), and what it
  // was, for the error messages of later calls.
  MPI_Request abandoned_request_ = MPI_REQUEST_NULL;
  std::string abandoned_what_;
  std::vector<ProcessIdentity> identities_;  // every rank's process, for peer_faults()
};

}  // namespace keel::comm
