// A fork-join pool for one rank's kernels: `num_threads - 1` workers plus the calling thread.
//
// run(fn) calls fn(part) once for every part in [0, num_threads()), the caller taking part 0,
// and returns when every part is done. The kernels hand each part a fixed, contiguous range of
// output rows (partition_rows), so every output element is still computed by one thread in the
// canonical sum order: the bits do not depend on the number of threads, and batch invariance
// holds at any thread count.
//
// Synchronisation: one generation counter the workers watch. A decode step runs hundreds of
// short GEMMs back to back, so a worker spins for a while (kSpinSeconds) before it sleeps on the
// counter (std::atomic::wait, a futex); the caller wakes sleepers only when some are asleep, so
// the common back-to-back case costs no system call. The caller waits for the parts in the same
// spin-then-sleep way. An exception thrown by a part is rethrown by run() on the caller.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace keel::cpu {

class WorkerPool {
 public:
  // num_threads >= 1; 1 runs every part on the caller with no worker threads.
  explicit WorkerPool(int num_threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int num_threads() const { return num_threads_; }

  // fn(int part) for part in [0, num_threads()). Not reentrant: a part must not call run().
  template <typename Fn>
  void run(Fn&& fn) {
    if (num_threads_ == 1) {
      fn(0);
      return;
    }
    using Callable = std::remove_reference_t<Fn>;
    run_erased(const_cast<void*>(static_cast<const void*>(&fn)),
               [](void* context, int part) { (*static_cast<Callable*>(context))(part); });
  }

 private:
  using Invoke = void (*)(void* context, int part);
  void run_erased(void* context, Invoke invoke);
  void worker_loop(int part);
  void record_failure();

  const int num_threads_;
  std::vector<std::thread> workers_;

  // The job of the current generation; written by the caller before the generation is bumped.
  void* job_context_ = nullptr;
  Invoke job_invoke_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_workers_{0};
  std::atomic<int> parts_pending_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<bool> stopping_{false};

  std::mutex failure_mutex_;
  std::exception_ptr failure_;
};

// The fixed partition: part `part` of `num_parts` gets rows [first, end) of `num_rows`, in
// chunks that are multiples of `align` rows (the last one takes the remainder). Depends only on
// its arguments, never on timing.
struct RowRange {
  int64_t first = 0;
  int64_t end = 0;
  int64_t count() const { return end - first; }
};

inline RowRange partition_rows(int64_t num_rows, int num_parts, int part, int64_t align) {
  const int64_t num_chunks = (num_rows + align - 1) / align;
  const int64_t chunks_per_part = (num_chunks + num_parts - 1) / num_parts;
  const int64_t first = std::min(num_rows, int64_t{part} * chunks_per_part * align);
  const int64_t end = std::min(num_rows, first + chunks_per_part * align);
  return RowRange{first, end};
}

}  // namespace keel::cpu
