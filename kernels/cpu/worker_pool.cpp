// WorkerPool: spin-then-sleep fork-join (see worker_pool.h for the protocol).
//
// The lost-wakeup argument: a worker announces itself in sleeping_workers_ before it re-reads
// the generation, and the caller bumps the generation before it reads sleeping_workers_, all
// sequentially consistent; so either the worker sees the new generation or the caller sees the
// sleeper and wakes it. The same pairing guards caller_sleeping_ and parts_pending_.
#include "kernels/cpu/worker_pool.h"

#include <chrono>
#include <utility>

#include "kernels/base/check.h"

namespace keel::cpu {

namespace {

// Long enough to cover the gap between two GEMMs of a step, short enough that an idle rank's
// workers stop burning a core almost at once.
constexpr double kSpinSeconds = 50e-6;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until `done()` or kSpinSeconds have passed; returns done().
template <typename Done>
bool spin_until(Done&& done) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(kSpinSeconds);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

}  // namespace

WorkerPool::WorkerPool(int num_threads) : num_threads_(num_threads) {
  KEEL_CHECK(num_threads >= 1, "WorkerPool: ", num_threads, " threads");
  workers_.reserve(static_cast<size_t>(num_threads - 1));
  for (int part = 1; part < num_threads; ++part)
    workers_.emplace_back([this, part] { worker_loop(part); });
}

WorkerPool::~WorkerPool() {
  stopping_.store(true, std::memory_order_seq_cst);
  generation_.fetch_add(1, std::memory_order_seq_cst);
  generation_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void WorkerPool::record_failure() {
  std::lock_guard lock(failure_mutex_);
  if (!failure_) failure_ = std::current_exception();
}

void WorkerPool::worker_loop(int part) {
  uint64_t seen = 0;
  for (;;) {
    auto changed = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(changed)) {
      sleeping_workers_.fetch_add(1, std::memory_order_seq_cst);
      while (generation_.load(std::memory_order_seq_cst) == seen)
        generation_.wait(seen, std::memory_order_seq_cst);
      sleeping_workers_.fetch_sub(1, std::memory_order_seq_cst);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stopping_.load(std::memory_order_acquire)) return;
    try {
      job_invoke_(job_context_, part);
    } catch (...) {
      record_failure();
    }
    if (parts_pending_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        caller_sleeping_.load(std::memory_order_seq_cst))
      parts_pending_.notify_all();
  }
}

void WorkerPool::run_erased(void* context, Invoke invoke) {
  job_context_ = context;
  job_invoke_ = invoke;
  parts_pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_seq_cst);
  if (sleeping_workers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();

  try {
    invoke(context, 0);
  } catch (...) {
    record_failure();
  }

  auto finished = [&] { return parts_pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(finished)) {
    caller_sleeping_.store(true, std::memory_order_seq_cst);
    for (int pending; (pending = parts_pending_.load(std::memory_order_seq_cst)) != 0;)
      parts_pending_.wait(pending, std::memory_order_seq_cst);
    caller_sleeping_.store(false, std::memory_order_relaxed);
  }

  std::exception_ptr failure;
  {
    std::lock_guard lock(failure_mutex_);
    failure = std::exchange(failure_, nullptr);
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace keel::cpu
