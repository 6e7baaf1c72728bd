// All-reduce bandwidth of the thread-rank communicator, both algorithms, nccl-tests style:
//   algbw = bytes / time, busbw = algbw * 2 (n - 1) / n.
// Every iteration resets the buffers, synchronises the ranks with a barrier, times the
// all-reduce and verifies every element (exact integer sums); a wrong sum exits non-zero.
// The two algorithms alternate within each iteration so that drift (frequency, noisy
// neighbours) affects both alike. Prints one JSON object on stdout, progress on stderr.
//
// Usage: allreduce [--ranks N] [--min-bytes B] [--max-bytes B] [--iters N] [--warmup N]
//   sizes go from min to max in steps of 4x; B accepts K/M/G suffixes (binary);
//   --iters 0 (default) picks iterations per size to keep the whole run well under a minute.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/machine.h"
#include "comm/communicator.h"
#include "comm/thread_comm.h"
#include "kernels/base/check.h"

namespace {

using keel::comm::Communicator;
using keel::comm::ReduceAlgo;
using Clock = std::chrono::steady_clock;

constexpr ReduceAlgo kAlgos[] = {ReduceAlgo::kNative, ReduceAlgo::kFixedOrder};
constexpr int kNumAlgos = 2;

struct Options {
  int num_ranks = 4;
  size_t min_bytes = size_t{4} << 10;
  size_t max_bytes = size_t{64} << 20;
  int iters = 0;    // 0: automatic per size
  int warmup = -1;  // -1: automatic per size
};

size_t parse_bytes(std::string_view text) {
  size_t multiplier = 1;
  if (!text.empty()) {
    switch (text.back()) {
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
    if (multiplier != 1) text.remove_suffix(1);
  }
  size_t consumed = 0;
  const std::string digits(text);
  const unsigned long long value = std::stoull(digits, &consumed);
  if (consumed != digits.size()) keel::throw_error("bad byte count '", digits, "'");
  return static_cast<size_t>(value) * multiplier;
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (i + 1 >= argc) keel::throw_error("flag ", flag, " needs a value");
    const std::string value = argv[++i];
    try {
      if (flag == "--ranks") {
        options.num_ranks = std::stoi(value);
      } else if (flag == "--min-bytes") {
        options.min_bytes = parse_bytes(value);
      } else if (flag == "--max-bytes") {
        options.max_bytes = parse_bytes(value);
      } else if (flag == "--iters") {
        options.iters = std::stoi(value);
      } else if (flag == "--warmup") {
        options.warmup = std::stoi(value);
      } else {
        keel::throw_error("unknown flag ", flag);
      }
    } catch (const std::logic_error&) {  // std::stoi / std::stoull parse failures
      keel::throw_error("bad value '", value, "' for ", flag);
    }
  }
  if (options.num_ranks < 1 || options.num_ranks > 8) keel::throw_error("--ranks must be 1..8");
  if (options.min_bytes < sizeof(float) || options.max_bytes < options.min_bytes) {
    keel::throw_error("need 4 <= --min-bytes <= --max-bytes");
  }
  if (options.iters < 0) keel::throw_error("--iters must be >= 0");
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

std::vector<SizeResult> run(const Options& options) {
  const int num_ranks = options.num_ranks;
  std::vector<size_t> sizes;
  for (size_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= 4) {
    sizes.push_back(bytes / sizeof(float) * sizeof(float));
  }
  const size_t max_count = sizes.back() / sizeof(float);

  // Small integers: every summation order gives the exact sum, so both algorithms verify
  // against one expected array.
  std::vector<std::vector<float>> inputs(num_ranks, std::vector<float>(max_count));
  std::vector<float> expected(max_count);
  for (size_t i = 0; i < max_count; ++i) {
    float sum = 0.0f;
    for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
      inputs[tp_rank][i] = static_cast<float>((tp_rank + 1) * 1000 + static_cast<int>(i % 997));
      sum += inputs[tp_rank][i];
    }
    expected[i] = sum;
  }

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

    for (int algo_idx = 0; algo_idx < kNumAlgos; ++algo_idx) {
      // Time of one iteration: from the moment the last rank entered (the earliest the
      // collective can make progress) to the moment the last rank left.
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
      for (int tp_rank = 0; tp_rank < num_ranks; ++tp_rank) {
        result.wrong_elements[algo_idx] += wrong[tp_rank][algo_idx];
      }
    }
    std::fprintf(stderr, "%10zu B  native %10.1f us  fixed_order %10.1f us  (%d iters)\n",
                 result.bytes, result.median_us[0], result.median_us[1], result.iters);
  }
  return results;
}

int run_main(int argc, char** argv) {
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const keel::Error& error) {
    std::fprintf(stderr,
                 "allreduce: %s\nusage: allreduce [--ranks N] [--min-bytes B] [--max-bytes B] "
                 "[--iters N] [--warmup N]\n",
                 error.what());
    return 2;
  }

  // Context for the figures: the memory read bandwidth all ranks together can reach (an
  // all-reduce here is memory-bound from a few MB up) and the load of the shared machine.
  const int num_cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double read_bandwidth_gbs =
      keel::bench::measure_read_bandwidth_gbs(size_t{256} << 20, num_cpus);
  const double load_before = keel::bench::one_minute_load_average();

  std::vector<SizeResult> results;
  try {
    results = run(options);
  } catch (const keel::Error& error) {
    std::fprintf(stderr, "allreduce: %s\n", error.what());
    return 1;
  }

  const int num_ranks = options.num_ranks;
  const double bus_factor = num_ranks > 1 ? 2.0 * (num_ranks - 1) / num_ranks : 0.0;
  constexpr size_t kGoalFromBytes = size_t{1} << 20;
  constexpr double kGoalRatio = 0.95;

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
      goal_met &= ratio >= kGoalRatio;
    }
  }

  const nlohmann::json report = {
      {"benchmark", "allreduce"},
      {"backend", "thread"},
      {"machine",
       {{"cpu", keel::bench::machine_name()},
        {"logical_cpus", num_cpus},
        {"read_bandwidth_gbs", read_bandwidth_gbs},
        {"load_average_before", load_before},
        {"load_average_after", keel::bench::one_minute_load_average()}}},
      {"ranks", num_ranks},
      {"timing",
       "time_us: median over iterations of (last rank leaves - last rank enters); best_*: the "
       "fastest iteration; buffers reset and ranks synchronised by a barrier before each "
       "iteration; the two algorithms interleaved; goal judged on medians"},
      {"bandwidth", "algbw = bytes / time; busbw = algbw * 2(n-1)/n; GB/s = 1e9 B/s"},
      {"results", rows},
      {"ratios", ratios},
      {"goal",
       {{"text", "fixed_order busbw >= 0.95x native busbw from 1 MiB up"},
        {"evaluated", any_goal_size},
        {"min_ratio", any_goal_size ? nlohmann::json(min_ratio_from_goal_size) : nlohmann::json()},
        {"met", any_goal_size && goal_met}}},
      {"verified", all_verified},
  };
  std::cout << report.dump(2) << std::endl;
  if (!all_verified) {
    std::fprintf(stderr, "allreduce: WRONG SUMS (see wrong_elements)\n");
    return 1;
  }
  return 0;
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
