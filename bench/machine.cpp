#include "bench/machine.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

namespace keel::bench {

std::string machine_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "unknown CPU";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return model + " (" + std::to_string(std::thread::hardware_concurrency()) + " cpus)";
}

namespace {

// XOR-folds the buffer with 4 independent 256-bit accumulators so the loop is load-bound.
__attribute__((target("avx2"))) uint64_t stream_read(const std::byte* data, size_t bytes) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (size_t offset = 0; offset + 128 <= bytes; offset += 128) {
    acc0 = _mm256_xor_si256(acc0, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + offset)));
    acc1 = _mm256_xor_si256(acc1, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + offset + 32)));
    acc2 = _mm256_xor_si256(acc2, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + offset + 64)));
    acc3 = _mm256_xor_si256(acc3, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + offset + 96)));
  }
  __m256i folded = _mm256_xor_si256(_mm256_xor_si256(acc0, acc1), _mm256_xor_si256(acc2, acc3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), folded);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

}  // namespace

double measure_read_bandwidth_gbs(size_t bytes, int num_threads, int repeats) {
  num_threads = std::max(1, num_threads);
  bytes = bytes / (128 * static_cast<size_t>(num_threads)) * 128 * static_cast<size_t>(num_threads);
  struct FreeDeleter {
    void operator()(std::byte* pointer) const { std::free(pointer); }
  };
  std::unique_ptr<std::byte, FreeDeleter> buffer(static_cast<std::byte*>(std::aligned_alloc(64, bytes)));
  // Touch every page from the thread that will read it (first-touch placement).
  size_t part = bytes / static_cast<size_t>(num_threads);
  std::vector<uint64_t> sinks(static_cast<size_t>(num_threads));
  auto run_pass = [&](bool fill) {
    std::vector<std::thread> threads;
    for (int t = 0; t < num_threads; ++t)
      threads.emplace_back([&, t] {
        std::byte* begin = buffer.get() + part * static_cast<size_t>(t);
        if (fill) std::fill(begin, begin + part, std::byte{static_cast<unsigned char>(t + 1)});
        sinks[static_cast<size_t>(t)] ^= stream_read(begin, part);
      });
    for (auto& thread : threads) thread.join();
  };
  run_pass(true);
  double best_seconds = 1e30;
  for (int repeat = 0; repeat < repeats; ++repeat) {
    auto start = std::chrono::steady_clock::now();
    run_pass(false);
    best_seconds = std::min(best_seconds,
                            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  volatile uint64_t keep = 0;
  for (uint64_t sink : sinks) keep = keep ^ sink;
  (void)keep;
  return static_cast<double>(bytes) / best_seconds * 1e-9;
}

}  // namespace keel::bench
