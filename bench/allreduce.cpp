// All-reduce bandwidth of a keel communicator, both algorithms, nccl-tests style:
//   algbw = bytes / time, busbw = algbw * 2 (n - 1) / n.
// Every iteration resets the buffers, synchronises the ranks with a barrier, times the
// all-reduce and verifies every element (exact integer sums); a wrong sum exits non-zero.
// The two algorithms alternate within each iteration so that drift (frequency, noisy
// neighbours) affects both alike. Prints one JSON object on stdout, progress on stderr.
//
// Backends:
//  - thread (default): N thread ranks of this process (ThreadGroup).
//  - mpi: one rank per process, MpiCommunicator over MPI_COMM_WORLD; native is Open MPI's
//    all-reduce (MPI_Iallreduce), fixed_order is keel's alltoallv + ordered sum + allgatherv.
//    Launch as: mpirun --allow-run-as-root --oversubscribe -np 4 allreduce --backend mpi
//    Rank 0 prints the JSON (same shape as the thread backend's, plus an "mpi" object).
//
// Usage: allreduce --help (flags: --backend --ranks --min-bytes --max-bytes --iters --warmup);
//   --iters 0 (default) picks iterations per size to keep the whole run well under a minute.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/machine.h"
#include "comm/communicator.h"
#include "comm/mpi_comm.h"
#include "comm/thread_comm.h"
#include "kernels/base/check.h"
#include "runtime/cli/flags.h"

namespace {

using keel::comm::Communicator;
using keel::comm::ReduceAlgo;
using Clock = std::chrono::steady_clock;

constexpr ReduceAlgo kAlgos[] = {ReduceAlgo::kNative, ReduceAlgo::kFixedOrder};
constexpr int kNumAlgos = 2;

struct Options {
  std::string backend = "thread";  // "thread" or "mpi"
  int num_ranks = 4;
  bool ranks_given = false;
  size_t min_bytes = size_t{4} << 10;
  size_t max_bytes = size_t{64} << 20;
  int iters = 0;    // 0: automatic per size
  int warmup = -1;  // -1: automatic per size
};

// "4096", "4K", "64M", "1G" (binary multiples).
size_t parse_bytes(const std::string& flag, std::string_view text) {
  size_t multiplier = 1;
  std::string_view digits = text;
  if (!digits.empty()) {
    switch (digits.back()) {
      case 'K':
      case 'k':
        multiplier = size_t{1} << 10;
        break;
      case 'M':
      case 'm':
        multiplier = size_t{1} << 20;
        break;
      case 'G':
      case 'g':
        multiplier = size_t{1} << 30;
        break;
      default:
        break;
    }
    if (multiplier != 1) digits.remove_suffix(1);
  }
  try {
    const int64_t max = std::numeric_limits<int64_t>::max() / static_cast<int64_t>(multiplier);
    return static_cast<size_t>(keel::flags::parse_integer(flag, digits, 0, max)) * multiplier;
  } catch (const keel::flags::UsageError&) {
    throw keel::flags::UsageError(flag + ": '" + std::string(text) +
                                  "' is not a byte count (N, or N with a K, M or G suffix)");
  }
}

constexpr const char* kUsage =
    "usage: allreduce [flags]\n"
    "All-reduce bus bandwidth of both algorithms (native, fixed_order), nccl-tests style.\n"
    "Sizes go from --min-bytes to --max-bytes in steps of 4x (B accepts K/M/G suffixes);\n"
    "--iters 0 picks iterations per size; with --backend mpi the ranks are the launched\n"
    "processes (mpirun ... allreduce --backend mpi; --ranks, if given, must match).\n";

Options parse_options(int argc, char** argv) {
  Options options;
  std::string min_bytes = "4K", max_bytes = "64M";
  keel::flags::FlagSet flags("allreduce", kUsage);
  flags.add_choice("--backend", &options.backend, {"thread", "mpi"}, "rank kind");
  flags.add_int("--ranks", &options.num_ranks, "N", "thread ranks").range(1, 8).on_set([&] {
    options.ranks_given = true;
  });
  flags.add_string("--min-bytes", &min_bytes, "B", "smallest message");
  flags.add_string("--max-bytes", &max_bytes, "B", "largest message");
  flags.add_int("--iters", &options.iters, "N", "timed iterations per size (0: automatic)")
      .at_least(0);
  flags.add_int("--warmup", &options.warmup, "N", "untimed iterations per size (-1: automatic)");
  flags.parse_or_exit(argc, argv);
  options.min_bytes = parse_bytes("--min-bytes", min_bytes);
  options.max_bytes = parse_bytes("--max-bytes", max_bytes);
  if (options.min_bytes < sizeof(float) || options.max_bytes < options.min_bytes) {
    keel::throw_error("need 4 <= --min-bytes <= --max-bytes");
  }
  return options;
}

// Iterations for one message size: enough to make the median stable for small messages,
// few for the 64 MB ones whose single iteration already takes tens of milliseconds.
int auto_iters(size_t bytes) {
  return static_cast<int>(std::clamp<size_t>((size_t{1} << 30) / bytes, 30, 1000));
}

struct SizeResult {
  size_t bytes = 0;
  int iters = 0;
  double median_us[kNumAlgos] = {};
  double best_us[kNumAlgos] = {};
  size_t wrong_elements[kNumAlgos] = {};
};

// Per iteration and algorithm: when each rank entered and left the all-reduce.
struct Timestamps {
  std::vector<Clock::time_point> enter, leave;  // [iteration * num_ranks + rank]
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 == 1 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

std::vector<size_t> message_sizes(const Options& options) {
  std::vector<size_t> sizes;
  for (size_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= 4) {
    sizes.push_back(bytes / sizeof(float) * sizeof(float));
  }
  return sizes;
}

// Small integers: every summation order gives the exact sum, so both algorithms verify
// against one expected array.
float bench_input(int tp_rank, size_t index) {
  return static_cast<float>((tp_rank + 1) * 1000 + static_cast<int>(index % 997));
}

std::vector<float> expected_sums(int num_ranks, size_t count) {
  std::vector<float> expected(count);
  for (size_t i = 0; i < count; ++i) {
    float sum = 0.0f;
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) sum += bench_input(tp_rank, i);
    expected[i] = sum;
  }
  return expected;
}

// Fills result's times from every rank's timestamps. Time of one iteration: from the moment
// the last rank entered (the earliest the collective can make progress) to the moment the
// last rank left.
void summarise_times(const std::vector<Timestamps>& timestamps, int num_ranks, SizeResult& result) {
  for (int algo_idx = 0; algo_idx < kNumAlgos; ++algo_idx) {
    std::vector<double> iteration_us(result.iters);
    for (int iteration = 0; iteration < result.iters; ++iteration) {
      Clock::time_point last_enter{}, last_leave{};
      for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
        const size_t slot = static_cast<size_t>(iteration) * num_ranks + tp_rank;
        last_enter = std::max(last_enter, timestamps[algo_idx].enter[slot]);
        last_leave = std::max(last_leave, timestamps[algo_idx].leave[slot]);
      }
      iteration_us[iteration] =
          std::chrono::duration<double, std::micro>(last_leave - last_enter).count();
    }
    result.best_us[algo_idx] = *std::min_element(iteration_us.begin(), iteration_us.end());
    result.median_us[algo_idx] = median(std::move(iteration_us));
  }
}

void print_progress(const SizeResult& result) {
  std::fprintf(stderr, "%10zu B  native %10.1f us  fixed_order %10.1f us  (%d iters)\n",
               result.bytes, result.median_us[0], result.median_us[1], result.iters);
}

std::vector<SizeResult> run(const Options& options) {
  const int num_ranks = options.num_ranks;
  const std::vector<size_t> sizes = message_sizes(options);
  const size_t max_count = sizes.back() / sizeof(float);

  std::vector<std::vector<float>> inputs(num_ranks, std::vector<float>(max_count));
  for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
    for (size_t i = 0; i < max_count; ++i) inputs[tp_rank][i] = bench_input(tp_rank, i);
  }
  const std::vector<float> expected = expected_sums(num_ranks, max_count);

  std::vector<SizeResult> results(sizes.size());
  std::vector<Timestamps> timestamps(kNumAlgos);
  keel::comm::ThreadGroup group(num_ranks);
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.reserve(num_ranks);
  for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank)
    comms.push_back(group.communicator(tp_rank));

  for (size_t size_idx = 0; size_idx < sizes.size(); ++size_idx) {
    SizeResult& result = results[size_idx];
    result.bytes = sizes[size_idx];
    const size_t count = result.bytes / sizeof(float);
    result.iters = options.iters > 0 ? options.iters : auto_iters(result.bytes);
    const int warmup = options.warmup >= 0 ? options.warmup : std::max(2, result.iters / 10);
    for (Timestamps& stamps : timestamps) {
      stamps.enter.assign(static_cast<size_t>(result.iters) * num_ranks, {});
      stamps.leave.assign(static_cast<size_t>(result.iters) * num_ranks, {});
    }
    std::vector<std::vector<size_t>> wrong(num_ranks, std::vector<size_t>(kNumAlgos, 0));

    std::vector<std::string> rank_errors(num_ranks);
    std::vector<std::thread> threads;
    threads.reserve(num_ranks);
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
      threads.emplace_back([&, tp_rank] {
        try {
          keel::set_current_rank(tp_rank);
          Communicator& comm = *comms[tp_rank];
          std::vector<float> buffer(count);
          for (int iteration = -warmup; iteration < result.iters; ++iteration) {
            for (int turn = 0; turn < kNumAlgos; ++turn) {
              // Alternate which algorithm goes first: neither always runs on a colder cache.
              const int algo_idx = (turn + (iteration & 1)) % kNumAlgos;
              std::memcpy(buffer.data(), inputs[tp_rank].data(), count * sizeof(float));
              comm.barrier();
              const auto enter = Clock::now();
              comm.all_reduce(buffer.data(), count, kAlgos[algo_idx]);
              const auto leave = Clock::now();
              if (iteration >= 0) {
                const size_t slot = static_cast<size_t>(iteration) * num_ranks + tp_rank;
                timestamps[algo_idx].enter[slot] = enter;
                timestamps[algo_idx].leave[slot] = leave;
              }
              for (size_t i = 0; i < count; ++i)
                wrong[tp_rank][algo_idx] += buffer[i] != expected[i];
            }
          }
        } catch (const keel::Error& error) {
          // Unblock the peers, as the engine would, and report after the join.
          rank_errors[tp_rank] = error.what();
          group.abort(rank_errors[tp_rank]);
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (const std::string& error : rank_errors) {
      if (!error.empty()) keel::throw_error(error);
    }

    summarise_times(timestamps, num_ranks, result);
    for (int algo_idx = 0; algo_idx < kNumAlgos; ++algo_idx) {
      for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
        result.wrong_elements[algo_idx] += wrong[tp_rank][algo_idx];
      }
    }
    print_progress(result);
  }
  return results;
}

// The MPI backend: this process is one rank. Same loop as the thread backend's rank body;
// the timestamps go to rank 0, which alone fills in the times (other ranks' results carry
// only their own wrong-element counts, summed at rank 0 too). steady_clock is
// CLOCK_MONOTONIC, shared by all processes of one host, so rank 0 can compare the ranks'
// timestamps; on several hosts each iteration's time is the slowest rank's own
// (leave - enter) instead.
std::vector<SizeResult> run_mpi(const Options& options, keel::comm::MpiCommunicator& comm,
                                bool single_host) {
  const int tp_rank = comm.rank();
  const int num_ranks = comm.size();
  const std::vector<size_t> sizes = message_sizes(options);
  const size_t max_count = sizes.back() / sizeof(float);
  std::vector<float> input(max_count);
  for (size_t i = 0; i < max_count; ++i) input[i] = bench_input(tp_rank, i);
  const std::vector<float> expected = expected_sums(num_ranks, max_count);
  std::vector<float> buffer(max_count);

  std::vector<SizeResult> results(sizes.size());
  for (size_t size_idx = 0; size_idx < sizes.size(); ++size_idx) {
    SizeResult& result = results[size_idx];
    result.bytes = sizes[size_idx];
    const size_t count = result.bytes / sizeof(float);
    result.iters = options.iters > 0 ? options.iters : auto_iters(result.bytes);
    const int warmup = options.warmup >= 0 ? options.warmup : std::max(2, result.iters / 10);
    // This rank's timestamps in nanoseconds: [algo][iteration][enter, leave].
    std::vector<int64_t> my_stamps(static_cast<size_t>(kNumAlgos) * result.iters * 2);
    uint64_t wrong[kNumAlgos] = {};
    for (int iteration = -warmup; iteration < result.iters; ++iteration) {
      for (int turn = 0; turn < kNumAlgos; ++turn) {
        // Alternate which algorithm goes first: neither always runs on a colder cache.
        const int algo_idx = (turn + (iteration & 1)) % kNumAlgos;
        std::memcpy(buffer.data(), input.data(), count * sizeof(float));
        comm.barrier();
        const auto enter = Clock::now();
        comm.all_reduce(buffer.data(), count, kAlgos[algo_idx]);
        const auto leave = Clock::now();
        if (iteration >= 0) {
          const size_t slot = (static_cast<size_t>(algo_idx) * result.iters + iteration) * 2;
          my_stamps[slot] =
              std::chrono::duration_cast<std::chrono::nanoseconds>(enter.time_since_epoch())
                  .count();
          my_stamps[slot + 1] =
              std::chrono::duration_cast<std::chrono::nanoseconds>(leave.time_since_epoch())
                  .count();
        }
        for (size_t i = 0; i < count; ++i) wrong[algo_idx] += buffer[i] != expected[i];
      }
    }

    // Outside the timed loop: plain blocking MPI on WORLD is fine here.
    std::vector<int64_t> all_stamps(tp_rank == 0 ? my_stamps.size() * num_ranks : 0);
    MPI_Gather(my_stamps.data(), static_cast<int>(my_stamps.size()), MPI_INT64_T, all_stamps.data(),
               static_cast<int>(my_stamps.size()), MPI_INT64_T, 0, MPI_COMM_WORLD);
    uint64_t total_wrong[kNumAlgos] = {};
    MPI_Reduce(wrong, total_wrong, kNumAlgos, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
    if (tp_rank != 0) continue;

    std::vector<Timestamps> timestamps(kNumAlgos);
    for (int algo_idx = 0; algo_idx < kNumAlgos; ++algo_idx) {
      Timestamps& stamps = timestamps[algo_idx];
      stamps.enter.assign(static_cast<size_t>(result.iters) * num_ranks, {});
      stamps.leave.assign(static_cast<size_t>(result.iters) * num_ranks, {});
      for (int iteration = 0; iteration < result.iters; ++iteration) {
        for (int rank = 0; rank < num_ranks; ++rank) {
          const size_t source = rank * my_stamps.size() +
                                (static_cast<size_t>(algo_idx) * result.iters + iteration) * 2;
          const size_t slot = static_cast<size_t>(iteration) * num_ranks + rank;
          int64_t enter_ns = all_stamps[source];
          const int64_t leave_ns = all_stamps[source + 1];
          // Several hosts: clocks are not comparable; align every rank's entry at 0 so the
          // iteration's time becomes the slowest rank's own duration.
          if (!single_host) enter_ns = 0;
          stamps.enter[slot] = Clock::time_point(std::chrono::nanoseconds(enter_ns));
          stamps.leave[slot] = Clock::time_point(
              std::chrono::nanoseconds(single_host ? leave_ns : leave_ns - all_stamps[source]));
        }
      }
      result.wrong_elements[algo_idx] = total_wrong[algo_idx];
    }
    summarise_times(timestamps, num_ranks, result);
    print_progress(result);
  }
  return results;
}

// What differs between the backends' reports.
struct ReportContext {
  const char* backend = "thread";
  int num_ranks = 1;
  int num_cpus = 1;
  double read_bandwidth_gbs = 0.0;
  double load_before = 0.0;
  double goal_ratio = 0.95;
  const char* goal_text = "";
  const char* timing = "";
  nlohmann::json extra;  // backend-specific object, added under its own key when not null
  const char* extra_key = "";
};

// Prints the JSON report on stdout; returns whether every element of every run verified.
bool print_report(const std::vector<SizeResult>& results, const ReportContext& context) {
  const int num_ranks = context.num_ranks;
  const double bus_factor = num_ranks > 1 ? 2.0 * (num_ranks - 1) / num_ranks : 0.0;
  constexpr size_t kGoalFromBytes = size_t{1} << 20;

  nlohmann::json rows = nlohmann::json::array();
  nlohmann::json ratios = nlohmann::json::array();
  bool all_verified = true;
  bool goal_met = true;
  double min_ratio_from_goal_size = 0.0;
  bool any_goal_size = false;
  for (const SizeResult& result : results) {
    double busbw[kNumAlgos] = {};
    double best_busbw[kNumAlgos] = {};
    auto algbw_gbs = [&](double microseconds) {
      return microseconds > 0 ? static_cast<double>(result.bytes) / (microseconds * 1e-6) / 1e9
                              : 0.0;
    };
    for (int algo_idx = 0; algo_idx < kNumAlgos; ++algo_idx) {
      const double algbw = algbw_gbs(result.median_us[algo_idx]);
      busbw[algo_idx] = algbw * bus_factor;
      best_busbw[algo_idx] = algbw_gbs(result.best_us[algo_idx]) * bus_factor;
      const bool verified = result.wrong_elements[algo_idx] == 0;
      all_verified &= verified;
      rows.push_back({{"bytes", result.bytes},
                      {"algo", keel::comm::reduce_algo_name(kAlgos[algo_idx])},
                      {"iters", result.iters},
                      {"time_us", result.median_us[algo_idx]},
                      {"algbw_gbps", algbw},
                      {"busbw_gbps", busbw[algo_idx]},
                      {"best_time_us", result.best_us[algo_idx]},
                      {"best_busbw_gbps", best_busbw[algo_idx]},
                      {"verified", verified},
                      {"wrong_elements", result.wrong_elements[algo_idx]}});
    }
    const double ratio = busbw[0] > 0 ? busbw[1] / busbw[0] : 0.0;
    // Medians only: the fastest of a few dozen iterations on an oversubscribed machine is an
    // outlier, not a figure to compare algorithms by.
    ratios.push_back({{"bytes", result.bytes}, {"fixed_over_native_busbw", ratio}});
    if (result.bytes >= kGoalFromBytes) {
      min_ratio_from_goal_size = any_goal_size ? std::min(min_ratio_from_goal_size, ratio) : ratio;
      any_goal_size = true;
      goal_met &= ratio >= context.goal_ratio;
    }
  }

  nlohmann::json report = {
      {"benchmark", "allreduce"},
      {"backend", context.backend},
      {"machine",
       {{"cpu", keel::bench::machine_name()},
        {"logical_cpus", context.num_cpus},
        {"read_bandwidth_gbs", context.read_bandwidth_gbs},
        {"load_average_before", context.load_before},
        {"load_average_after", keel::bench::one_minute_load_average()}}},
      {"ranks", num_ranks},
      {"timing", context.timing},
      {"bandwidth", "algbw = bytes / time; busbw = algbw * 2(n-1)/n; GB/s = 1e9 B/s"},
      {"results", rows},
      {"ratios", ratios},
      {"goal",
       {{"text", context.goal_text},
        {"evaluated", any_goal_size},
        {"min_ratio", any_goal_size ? nlohmann::json(min_ratio_from_goal_size) : nlohmann::json()},
        {"met", any_goal_size && goal_met}}},
      {"verified", all_verified},
  };
  if (!context.extra.is_null()) report[context.extra_key] = context.extra;
  std::cout << report.dump(2) << std::endl;
  if (!all_verified) std::fprintf(stderr, "allreduce: WRONG SUMS (see wrong_elements)\n");
  return all_verified;
}

constexpr const char* kTimingText =
    "time_us: median over iterations of (last rank leaves - last rank enters); best_*: the "
    "fastest iteration; buffers reset and ranks synchronised by a barrier before each "
    "iteration; the two algorithms interleaved; goal judged on medians";

// Context for the figures: the memory read bandwidth all ranks together can reach (an
// all-reduce here is memory-bound from a few MB up) and the load of the shared machine.
void measure_machine(ReportContext& context) {
  context.num_cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  context.read_bandwidth_gbs =
      keel::bench::measure_read_bandwidth_gbs(size_t{256} << 20, context.num_cpus);
  context.load_before = keel::bench::one_minute_load_average();
}

int run_thread_main(const Options& options) {
  ReportContext context;
  measure_machine(context);

  std::vector<SizeResult> results;
  try {
    results = run(options);
  } catch (const keel::Error& error) {
    std::fprintf(stderr, "allreduce: %s\n", error.what());
    return 1;
  }

  context.backend = "thread";
  context.num_ranks = options.num_ranks;
  context.goal_ratio = 0.95;
  context.goal_text = "fixed_order busbw >= 0.95x native busbw from 1 MiB up";
  context.timing = kTimingText;
  return print_report(results, context) ? 0 : 1;
}

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string version(text, static_cast<size_t>(std::max(0, length)));
  return version.substr(0, version.find_first_of(",\n"));
}

int run_mpi_main(const Options& options) {
  if (!keel::comm::mpi_launched()) {
    std::fprintf(stderr,
                 "allreduce: --backend mpi runs one rank per process; launch it with mpirun, "
                 "e.g. mpirun --allow-run-as-root --oversubscribe -np 4 allreduce --backend "
                 "mpi\n");
    return 2;
  }
  keel::comm::MpiSession session;
  int exit_code = 1;
  {
    keel::comm::MpiCommOptions comm_options;
    // A rank that dies or hangs ends the whole job (FATAL line + MPI_Abort) instead of leaving
    // the others waiting forever.
    comm_options.timeout = std::chrono::seconds(120);
    keel::comm::MpiCommunicator comm(MPI_COMM_WORLD, comm_options);
    const int tp_rank = comm.rank();
    keel::set_current_rank(tp_rank);
    if (options.ranks_given && options.num_ranks != comm.size()) {
      if (tp_rank == 0) {
        std::fprintf(stderr, "allreduce: --ranks %d but %d processes were launched\n",
                     options.num_ranks, comm.size());
      }
      return 2;
    }
    // Are all ranks on one host (so that their steady_clock readings are comparable)?
    MPI_Comm host_comm = MPI_COMM_NULL;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &host_comm);
    int host_size = 0;
    MPI_Comm_size(host_comm, &host_size);
    MPI_Comm_free(&host_comm);
    const bool single_host = host_size == comm.size();

    ReportContext context;
    // Rank 0 measures the machine while its peers wait in the barrier (past the watchdog's
    // yield window they poll with sleeps, so they do not compete for the cores).
    if (tp_rank == 0) measure_machine(context);
    comm.barrier();

    std::vector<SizeResult> results;
    try {
      results = run_mpi(options, comm, single_host);
    } catch (const std::exception& error) {
      // The peers are inside collectives waiting for this rank: end the whole job now.
      std::fprintf(stderr, "allreduce: rank %d: %s\n", tp_rank, error.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }

    int verified = 0;
    if (tp_rank == 0) {
      context.backend = "mpi";
      context.num_ranks = comm.size();
      context.goal_ratio = 1.0;
      context.goal_text =
          "fixed_order busbw >= 1.0x native (Open MPI all-reduce) busbw from 1 MiB up";
      context.timing = single_host
                           ? "time_us: median over iterations of (last rank leaves - last rank "
                             "enters), from all ranks' steady_clock (CLOCK_MONOTONIC, one host); "
                             "best_*: the fastest iteration; buffers reset and ranks "
                             "synchronised by a barrier before each iteration; the two "
                             "algorithms interleaved; goal judged on medians"
                           : "time_us: median over iterations of the slowest rank's own (leave - "
                             "enter) (ranks on several hosts: clocks not comparable); best_*: the "
                             "fastest iteration; buffers reset and ranks synchronised by a "
                             "barrier before each iteration; the two algorithms interleaved; "
                             "goal judged on medians";
      context.extra_key = "mpi";
      context.extra = {
          {"library", mpi_library_version()},
          {"processes", comm.size()},
          {"single_host", single_host},
          {"native",
           "MPI_Iallreduce(MPI_IN_PLACE, MPI_FLOAT, MPI_SUM); Open MPI picks the "
           "algorithm"},
          {"fixed_order",
           "MPI_Ialltoallv (chunk c to rank c) + fp32 sum in rank order + "
           "MPI_Iallgatherv (in place)"},
          {"wait", "MPI_Test polling: spin, then sched_yield, then sleeps (keel watchdog)"}};
      verified = print_report(results, context) ? 1 : 0;
    }
    comm.broadcast(&verified, sizeof(verified), 0);
    exit_code = verified != 0 ? 0 : 1;
  }
  return exit_code;
}

int run_main(int argc, char** argv) {
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const keel::Error& error) {
    std::fprintf(stderr, "allreduce: %s (see allreduce --help)\n", error.what());
    return 2;
  }
  return options.backend == "mpi" ? run_mpi_main(options) : run_thread_main(options);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const std::exception& error) {  // e.g. out of memory for the 64 MB buffers
    std::fprintf(stderr, "allreduce: %s\n", error.what());
    return 1;
  }
}
