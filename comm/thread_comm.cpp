// Thread-rank communicator: N ranks are threads sharing one GroupState.
//
// Memory layout. GroupState holds one cache-line-sized RankSlot per rank (the pointers the
// rank published for the current collective: what peers read, what peers write; its element
// or byte count; a tag such as the algorithm or the root), one 32-bit barrier word, and a
// mutex/condition variable used only for sleeping waiters and the abort reason. Message data
// is never staged: ranks read and write each other's buffers directly.
//
// Every collective is: publish slot, entry barrier, one work phase, exit barrier.
//
// all_reduce (in place; buffer B_r of rank r; chunk c owned by rank o(c) = c mod N). This is a
// reduce-scatter fused with an all-gather: in the work phase the owner of chunk c reads chunk c
// of every B_k, sums it in the plan's order ((p_s + p_{s+1}) + ...) through an L1 tile, and
// writes the sum into chunk c of every B_k, its own included. Compared with "reduce into my own
// buffer, barrier, every rank pulls the other chunks" this saves one barrier per call and
// (N-1)/N of a message of reads (each all-reduce moves N reads + N writes of the message
// instead of 2N-1 reads + N writes), and measured faster at every size on 4 threads / 2 cores.
//  - kFixedOrder: N chunks; s = 0 for every chunk, so every element is ((p0 + p1) + p2) + ...
//  - kNative: s = c mod N ("ring" style); 1 chunk below 64 KiB (rank 0 sums, peers wait),
//    N chunks below 4 MiB, 2N chunks above, so an element's order depends on the message size.
//  Chunk boundaries are multiples of 16 floats (64 bytes); with count < 16 N some chunks are
//  empty, which is fine.
//
// Ordering argument (why no write races with a read, and nobody sees stale data):
//  1. Rank r fills B_r (before the call) and its slot, then arrives at the entry barrier. The
//     arrivals form one CAS chain on the barrier word and waiters acquire the word the last
//     arriver released (or pass through the mutex), so all of that happens-before any peer's
//     work phase.
//  2. Work phase: chunk c of every buffer is read and written by o(c) only; the chunks are
//     disjoint and 64-byte aligned. Within a chunk, a tile is read from every buffer before
//     it is written to any, so the in-place update never feeds itself.
//  3. Exit barrier: every write of the work phase happens-before any rank returns, so each
//     rank sees all sums in B_r, and no rank reuses B_r or its slot while a peer may still
//     read or write it.
// all_gather: rank r pulls every rank's send into its own recv. broadcast: non-roots copy from
// the root. Same two barriers, same argument (each rank writes only its own output buffer).
//
// Barrier. The barrier word packs {aborted bit 31, generation bits 8..30, arrived count bits
// 0..7}. A rank arrives with one CAS; the last arriver resets the count and bumps the
// generation in the same CAS, so "barrier completed" and "group aborted" are decided on one
// word and every rank sees the same outcome: once the aborted bit is set no entry barrier can
// complete, and a barrier that completed before it is seen as completed by all its waiters.
// The generation needs no wide counter: it can move at most once while a participant waits,
// because the next barrier cannot complete without that participant.
// Waiting: a short pause-spin (peers on other cores arrive within microseconds), then yield
// for up to 100 us (with 4 ranks on 2 cores the late peer usually needs *our* core), then
// sleep on the condition variable so that a long wait costs no CPU.
//
// Entry and exit barriers differ on purpose:
//  - entry barrier (and barrier()): peers may be anywhere, possibly never coming; it honours
//    abort and the timeout.
//  - exit barrier: every rank has passed the entry, and what remains is bounded memory work
//    that cannot throw, so it always completes; it ignores abort and the timeout. This is what
//    guarantees that no rank returns (and frees or rewrites its buffer) while a peer may still
//    touch it, even when the group is aborted mid-collective.
#include "comm/thread_comm.h"
#include "comm/rank_order_sum.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "kernels/base/check.h"

namespace keel::comm {

namespace {

constexpr int kMaxRanks = 8;

// Barrier word layout (see the top of this file).
constexpr uint32_t kArrivedMask = 0xFFu;
constexpr uint32_t kGenerationOne = 1u << 8;
constexpr uint32_t kGenerationMask = 0x7FFFFF00u;
constexpr uint32_t kAbortedBit = 1u << 31;
static_assert(kMaxRanks <= static_cast<int>(kArrivedMask));

// Waiting strategy (see the top of this file): pause-spin, then yield for a while, then sleep.
// Tuned on 4 ranks sharing 2 cores, where long spinning starves the peer we wait for.
constexpr int kSpinIterations = 64;
constexpr std::chrono::microseconds kYieldWindow{100};

// kNative chunking thresholds, in message bytes.
constexpr size_t kNativeSingleChunkBelowBytes = size_t{64} << 10;
constexpr size_t kNativeDoubleChunksFromBytes = size_t{4} << 20;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// How all_reduce splits a message: chunk c covers [begin(c), end(c)), is owned (reduced) by
// rank c % num_ranks, and its sum starts at rank first_rank(c).
struct ReducePlan {
  size_t count = 0;
  int num_ranks = 1;
  int num_chunks = 1;
  size_t chunk_elems = 0;
  bool rotate_start = false;

  size_t begin(int chunk_idx) const {
    return std::min(static_cast<size_t>(chunk_idx) * chunk_elems, count);
  }
  size_t end(int chunk_idx) const { return std::min(begin(chunk_idx) + chunk_elems, count); }
  int owner(int chunk_idx) const { return chunk_idx % num_ranks; }
  int first_rank(int chunk_idx) const { return rotate_start ? chunk_idx % num_ranks : 0; }
};

ReducePlan make_reduce_plan(size_t count, ReduceAlgo algo, int num_ranks) {
  ReducePlan plan;
  plan.count = count;
  plan.num_ranks = num_ranks;
  const size_t bytes = count * sizeof(float);
  if (algo == ReduceAlgo::kFixedOrder) {
    // One chunk per rank; the order never depends on the chunking.
    plan.num_chunks = num_ranks;
  } else {
    plan.rotate_start = true;
    if (bytes < kNativeSingleChunkBelowBytes) {
      // Small: one rank sums it all; splitting would only add cache-line ping-pong.
      plan.num_chunks = 1;
    } else if (bytes < kNativeDoubleChunksFromBytes) {
      plan.num_chunks = num_ranks;
    } else {
      plan.num_chunks = 2 * num_ranks;
    }
  }
  plan.chunk_elems = aligned_chunk_elems(count, static_cast<size_t>(plan.num_chunks));
  return plan;
}

}  // namespace

namespace detail {

// What a rank publishes for the current collective. Written by its rank before the entry
// barrier, read by peers between the entry and the exit barrier; the barriers order it.
struct alignas(64) RankSlot {
  const void* source = nullptr;  // what peers read
  void* destination = nullptr;   // what peers write (all_reduce only)
  size_t count = 0;              // elements, or bytes for broadcast
  int tag = 0;                   // algorithm (all_reduce) or root (broadcast): all ranks must agree
  bool bad_arguments = false;
};

enum class BarrierKind { kEntry, kExit };

struct GroupState {
  GroupState(int size, ThreadCommOptions opts) : num_ranks(size), options(opts) {}

  // Arrives at the barrier and returns once all ranks have arrived. An entry barrier throws
  // keel::Error instead when the group is aborted before it completes or the timeout expires.
  // `watch` (may be null) marks the sleeping part of an entry barrier for a watchdog.
  void arrive_and_wait(int tp_rank, const char* collective, BarrierKind kind,
                       CollectiveWatch* watch = nullptr);
  void abort(const std::string& reason);
  bool aborted() const { return (barrier_word.load() & kAbortedBit) != 0; }
  [[noreturn]] void throw_aborted(int tp_rank, const char* collective);

  const int num_ranks;
  const ThreadCommOptions options;
  std::array<RankSlot, kMaxRanks> slots{};
  std::array<std::atomic<bool>, kMaxRanks> claimed{};
  // Collectives each rank has entered so far: who is behind when a collective stalls.
  std::array<std::atomic<uint64_t>, kMaxRanks> calls_entered{};

 private:
  void wake_sleepers();
  void sleep_until_released(int tp_rank, const char* collective, BarrierKind kind,
                            uint32_t my_generation, CollectiveWatch* watch);
  // Called on timeout with the mutex held: aborts the group if our barrier is still incomplete
  // and throws; returns normally if it completed meanwhile.
  void abort_on_timeout(int tp_rank, const char* collective, uint32_t my_generation,
                        std::unique_lock<std::mutex>& lock);

  alignas(64) std::atomic<uint32_t> barrier_word{0};
  // Ranks inside the sleeping part of a wait; lets the last arriver skip the mutex and the
  // notify while everybody is still spinning.
  std::atomic<int> num_sleepers{0};
  std::mutex mutex;  // guards abort_reason; pairs with wakeup
  std::condition_variable wakeup;
  std::string abort_reason;
};

void GroupState::arrive_and_wait(int tp_rank, const char* collective, BarrierKind kind,
                                 CollectiveWatch* watch) {
  const bool honours_abort = kind == BarrierKind::kEntry;
  uint32_t word = barrier_word.load();
  uint32_t next = 0;
  bool last_to_arrive = false;
  do {
    if (honours_abort && (word & kAbortedBit) != 0) throw_aborted(tp_rank, collective);
    const uint32_t arrived = (word & kArrivedMask) + 1;
    last_to_arrive = arrived == static_cast<uint32_t>(num_ranks);
    next = last_to_arrive ? (word & kAbortedBit) | ((word + kGenerationOne) & kGenerationMask)
                          : word + 1;
  } while (!barrier_word.compare_exchange_weak(word, next));
  if (last_to_arrive) {
    wake_sleepers();
    return;
  }

  const uint32_t my_generation = word & kGenerationMask;
  // Returns true once the barrier completed; throws if an entry barrier was aborted.
  auto released = [&] {
    const uint32_t seen = barrier_word.load();
    if ((seen & kGenerationMask) != my_generation) return true;
    if (honours_abort && (seen & kAbortedBit) != 0) throw_aborted(tp_rank, collective);
    return false;
  };
  for (int spin = 0; spin < kSpinIterations; ++spin) {
    if (released()) return;
    cpu_relax();
  }
  const auto yield_until = std::chrono::steady_clock::now() + kYieldWindow;
  do {
    if (released()) return;
    std::this_thread::yield();
  } while (std::chrono::steady_clock::now() < yield_until);
  sleep_until_released(tp_rank, collective, kind, my_generation, watch);
}

void GroupState::sleep_until_released(int tp_rank, const char* collective, BarrierKind kind,
                                      uint32_t my_generation, CollectiveWatch* watch) {
  const bool honours_abort = kind == BarrierKind::kEntry;
  const bool has_deadline = honours_abort && options.timeout.count() > 0;
  // The timeout counts from here; the spin and yield phases before took about 100 us.
  const auto now = std::chrono::steady_clock::now();
  const auto deadline = now + options.timeout;
  std::optional<WaitScope> marked;
  if (watch != nullptr) marked.emplace(*watch, collective, now);

  std::unique_lock<std::mutex> lock(mutex);
  num_sleepers.fetch_add(1);
  struct SleeperCount {
    std::atomic<int>& count;
    ~SleeperCount() { count.fetch_sub(1); }
  } sleeper_count{num_sleepers};

  while (true) {
    const uint32_t seen = barrier_word.load();
    if ((seen & kGenerationMask) != my_generation) return;
    if (honours_abort && (seen & kAbortedBit) != 0) {
      lock.unlock();
      throw_aborted(tp_rank, collective);
    }
    if (!has_deadline) {
      wakeup.wait(lock);
    } else if (wakeup.wait_until(lock, deadline) == std::cv_status::timeout) {
      abort_on_timeout(tp_rank, collective, my_generation, lock);
      return;
    }
  }
}

void GroupState::abort_on_timeout(int tp_rank, const char* collective, uint32_t my_generation,
                                  std::unique_lock<std::mutex>& lock) {
  uint32_t word = barrier_word.load();
  // Set the aborted bit only while our barrier is still incomplete, in the same CAS that checks
  // it: a barrier that completed must be passed by all of its ranks.
  while ((word & kGenerationMask) == my_generation && (word & kAbortedBit) == 0) {
    if (!barrier_word.compare_exchange_weak(word, word | kAbortedBit)) continue;
    const uint32_t arrived = word & kArrivedMask;
    // The ranks that never entered this collective (fewer calls entered than this rank).
    std::string missing;
    const uint64_t mine = calls_entered[tp_rank].load(std::memory_order_relaxed);
    for (int peer_rank = 0; peer_rank < num_ranks; ++peer_rank) {
      if (calls_entered[peer_rank].load(std::memory_order_relaxed) >= mine) continue;
      missing += keel::detail::concat(missing.empty() ? "; missing: rank " : ", rank ", peer_rank);
    }
    abort_reason = keel::detail::concat("rank ", tp_rank, " timed out after ",
                                        options.timeout.count(), " ms in ", collective, " (",
                                        arrived, " of ", num_ranks, " ranks arrived", missing, ")");
    lock.unlock();
    wakeup.notify_all();
    throw_error("rank ", tp_rank, ": ", collective, " timed out after ", options.timeout.count(),
                " ms waiting for peers (", arrived, " of ", num_ranks, " ranks arrived", missing,
                ")");
  }
  if ((word & kGenerationMask) != my_generation) return;
  lock.unlock();
  throw_aborted(tp_rank, collective);
}

void GroupState::wake_sleepers() {
  // Dekker-style pairing with the sleeper's num_sleepers increment (both seq_cst): either the
  // sleeper, checking the word after counting itself, sees the new word, or we see it counted
  // and notify it after passing through the mutex (so it is either waiting or not yet checked).
  if (num_sleepers.load() == 0) return;
  { std::lock_guard<std::mutex> lock(mutex); }
  wakeup.notify_all();
}

void GroupState::throw_aborted(int tp_rank, const char* collective) {
  std::string reason;
  {
    std::lock_guard<std::mutex> lock(mutex);
    reason = abort_reason;
  }
  throw_error("collective aborted: ", reason, " (rank ", tp_rank, " in ", collective, ")");
}

void GroupState::abort(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    // Reason and bit change together under the mutex, so whoever sees the bit and then takes
    // the mutex reads the reason that goes with it. The first reason wins.
    if ((barrier_word.load() & kAbortedBit) == 0) {
      abort_reason = reason;
      barrier_word.fetch_or(kAbortedBit);
    }
  }
  wakeup.notify_all();
}

}  // namespace detail

namespace {

using detail::BarrierKind;
using detail::GroupState;

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<GroupState> group, int tp_rank)
      : group_(std::move(group)), tp_rank_(tp_rank) {}

  int rank() const override { return tp_rank_; }
  int size() const override { return group_->num_ranks; }

  void all_reduce(float* data, size_t count, ReduceAlgo algo) override;
  void all_gather(const float* send, size_t count, float* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void barrier() override;

  // Peers that have not entered the collective this rank waits in (kBehind); any thread.
  std::vector<PeerFault> peer_faults() const override;
  // Aborts the whole group (ThreadGroup::abort): every rank's wait throws.
  void abort(const std::string& reason) override {
    watch().request_abort(reason);
    group_->abort(reason);
  }

 private:
  // Common start of every collective: fail fast when aborted, injected delay, call counting.
  void enter(const char* collective);
  // Publishes this rank's slot and passes the entry barrier.
  void publish_and_enter(const char* collective, const detail::RankSlot& publication);
  // After the entry barrier: all ranks compare the same published slots, so they all reach the
  // same verdict; on a mismatch they all pass one more barrier (nobody reads slots any more)
  // and throw together, leaving the group usable.
  void check_agreement(const char* collective, const char* count_name, const char* tag_name,
                       const std::string& local_problem);
  void exit_barrier(const char* collective) {
    group_->arrive_and_wait(tp_rank_, collective, BarrierKind::kExit);
  }
  const void* peer_source(int peer_rank) const { return group_->slots[peer_rank].source; }
  void* peer_destination(int peer_rank) const { return group_->slots[peer_rank].destination; }

  std::shared_ptr<GroupState> group_;
  const int tp_rank_;
  uint64_t call_index_ = 0;
};

void ThreadCommunicator::enter(const char* collective) {
  if (group_->aborted()) group_->throw_aborted(tp_rank_, collective);
  const uint64_t call_index = call_index_++;
  const auto max_delay = group_->options.max_injected_delay;
  if (max_delay.count() > 0) {
    const uint64_t draw =
        splitmix64(group_->options.delay_seed ^
                   splitmix64((static_cast<uint64_t>(tp_rank_) << 48) ^ call_index));
    const auto delay = std::chrono::microseconds(
        static_cast<int64_t>(draw % (static_cast<uint64_t>(max_delay.count()) + 1)));
    std::this_thread::sleep_for(delay);
  }
  group_->calls_entered[tp_rank_].store(call_index + 1, std::memory_order_relaxed);
}

std::vector<PeerFault> ThreadCommunicator::peer_faults() const {
  std::vector<PeerFault> faults;
  const CollectiveWatch::Snapshot snapshot = watch().snapshot();
  if (!snapshot.waiting) return faults;
  const uint64_t mine = group_->calls_entered[tp_rank_].load(std::memory_order_relaxed);
  for (int peer_rank = 0; peer_rank < group_->num_ranks; ++peer_rank) {
    const uint64_t theirs = group_->calls_entered[peer_rank].load(std::memory_order_relaxed);
    if (peer_rank == tp_rank_ || theirs >= mine) continue;
    faults.push_back({.rank = peer_rank,
                      .kind = PeerFault::Kind::kBehind,
                      .detail = keel::detail::concat("has not entered ", snapshot.collective, " #",
                                                     mine, "; its last was #", theirs)});
  }
  return faults;
}

void ThreadCommunicator::publish_and_enter(const char* collective,
                                           const detail::RankSlot& publication) {
  group_->slots[tp_rank_] = publication;
  group_->arrive_and_wait(tp_rank_, collective, BarrierKind::kEntry, &watch());
}

void ThreadCommunicator::check_agreement(const char* collective, const char* count_name,
                                         const char* tag_name, const std::string& local_problem) {
  std::string problem;
  const detail::RankSlot& reference = group_->slots[0];
  for (int peer_rank = 0; peer_rank < group_->num_ranks && problem.empty(); ++peer_rank) {
    const detail::RankSlot& slot = group_->slots[peer_rank];
    if (slot.bad_arguments) {
      problem = peer_rank == tp_rank_
                    ? local_problem
                    : keel::detail::concat("rank ", peer_rank, " passed invalid arguments");
    } else if (slot.count != reference.count) {
      problem =
          keel::detail::concat("ranks disagree on ", count_name, " (rank 0: ", reference.count,
                               ", rank ", peer_rank, ": ", slot.count, ")");
    } else if (tag_name != nullptr && slot.tag != reference.tag) {
      problem = keel::detail::concat("ranks disagree on ", tag_name, " (rank 0: ", reference.tag,
                                     ", rank ", peer_rank, ": ", slot.tag, ")");
    }
  }
  if (problem.empty()) return;
  exit_barrier(collective);
  throw_error("rank ", tp_rank_, ": ", collective, ": ", problem);
}

void ThreadCommunicator::all_reduce(float* data, size_t count, ReduceAlgo algo) {
  static constexpr const char* kName = "all_reduce";
  enter(kName);
  std::string local_problem;
  if (data == nullptr && count > 0) local_problem = "null data with a non-zero count";
  if (algo != ReduceAlgo::kNative && algo != ReduceAlgo::kFixedOrder) {
    local_problem = keel::detail::concat("unknown algorithm ", static_cast<int>(algo));
  }
  const int num_ranks = group_->num_ranks;
  if (num_ranks == 1) {
    if (!local_problem.empty()) throw_error("rank ", tp_rank_, ": ", kName, ": ", local_problem);
    return;
  }
  publish_and_enter(kName, {.source = data,
                            .destination = data,
                            .count = count,
                            .tag = static_cast<int>(algo),
                            .bad_arguments = !local_problem.empty()});
  check_agreement(kName, "count", "algorithm", local_problem);

  const ReducePlan plan = make_reduce_plan(count, algo, num_ranks);
  // The one work phase: for each chunk this rank owns, sum it across all buffers in the plan's
  // order and write the sum into that chunk of every buffer.
  std::array<const float*, kMaxRanks> sources{};
  std::array<float*, kMaxRanks> destinations{};
  for (int chunk_idx = tp_rank_; chunk_idx < plan.num_chunks; chunk_idx += num_ranks) {
    const size_t begin = plan.begin(chunk_idx);
    const size_t len = plan.end(chunk_idx) - begin;
    if (len == 0) continue;
    for (int k = 0; k < num_ranks; ++k) {
      const int source_rank = (plan.first_rank(chunk_idx) + k) % num_ranks;
      sources[k] = static_cast<const float*>(peer_source(source_rank)) + begin;
      destinations[k] = static_cast<float*>(peer_destination(k)) + begin;
    }
    sum_in_rank_order(sources.data(), num_ranks, destinations.data(), num_ranks, len);
  }
  exit_barrier(kName);  // nobody reuses its buffer while a peer may still write it
}

void ThreadCommunicator::all_gather(const float* send, size_t count, float* recv) {
  static constexpr const char* kName = "all_gather";
  enter(kName);
  std::string local_problem;
  if ((send == nullptr || recv == nullptr) && count > 0) {
    local_problem = "null send or recv buffer with a non-zero count";
  }
  const int num_ranks = group_->num_ranks;
  if (num_ranks == 1) {
    if (!local_problem.empty()) throw_error("rank ", tp_rank_, ": ", kName, ": ", local_problem);
    // memmove: an in-place gather passes send == recv.
    if (count > 0 && send != recv) std::memmove(recv, send, count * sizeof(float));
    return;
  }
  publish_and_enter(kName,
                    {.source = send, .count = count, .bad_arguments = !local_problem.empty()});
  check_agreement(kName, "count", nullptr, local_problem);
  if (count > 0) {
    for (int peer_rank = 0; peer_rank < num_ranks; ++peer_rank) {
      const auto* source = static_cast<const float*>(peer_source(peer_rank));
      float* destination = recv + static_cast<size_t>(peer_rank) * count;
      // Our own send may be our slot of recv (in-place gather); peers' sends are theirs.
      if (source != destination) std::memmove(destination, source, count * sizeof(float));
    }
  }
  exit_barrier(kName);
}

void ThreadCommunicator::broadcast(void* data, size_t bytes, int root) {
  static constexpr const char* kName = "broadcast";
  enter(kName);
  const int num_ranks = group_->num_ranks;
  std::string local_problem;
  if (root < 0 || root >= num_ranks) {
    local_problem = keel::detail::concat("root ", root, " out of range [0, ", num_ranks, ")");
  } else if (data == nullptr && bytes > 0) {
    local_problem = "null data with a non-zero size";
  }
  if (num_ranks == 1) {
    if (!local_problem.empty()) throw_error("rank ", tp_rank_, ": ", kName, ": ", local_problem);
    return;
  }
  publish_and_enter(
      kName,
      {.source = data, .count = bytes, .tag = root, .bad_arguments = !local_problem.empty()});
  check_agreement(kName, "byte count", "root", local_problem);
  if (tp_rank_ != root && bytes > 0) std::memcpy(data, peer_source(root), bytes);
  exit_barrier(kName);
}

void ThreadCommunicator::barrier() {
  static constexpr const char* kName = "barrier";
  enter(kName);
  if (group_->num_ranks == 1) return;
  group_->arrive_and_wait(tp_rank_, kName, BarrierKind::kEntry, &watch());
}

}  // namespace

ThreadGroup::ThreadGroup(int size, ThreadCommOptions options) {
  if (size < 1 || size > kMaxRanks) {
    throw_error("ThreadGroup: size ", size, " out of range [1, ", kMaxRanks, "]");
  }
  if (options.max_injected_delay.count() < 0 || options.timeout.count() < 0) {
    throw_error("ThreadGroup: negative injected delay or timeout");
  }
  state_ = std::make_shared<detail::GroupState>(size, options);
}

ThreadGroup::~ThreadGroup() = default;

int ThreadGroup::size() const {
  return state_->num_ranks;
}

std::unique_ptr<Communicator> ThreadGroup::communicator(int rank) {
  if (rank < 0 || rank >= state_->num_ranks) {
    throw_error("ThreadGroup::communicator: rank ", rank, " out of range [0, ", state_->num_ranks,
                ")");
  }
  // Two communicators for one rank would both publish into its slot and break the barrier.
  if (state_->claimed[rank].exchange(true)) {
    throw_error("ThreadGroup::communicator: rank ", rank, " already has a communicator");
  }
  return std::make_unique<ThreadCommunicator>(state_, rank);
}

void ThreadGroup::abort(const std::string& reason) {
  state_->abort(reason);
}

bool ThreadGroup::aborted() const {
  return state_->aborted();
}

}  // namespace keel::comm
