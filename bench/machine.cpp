// GCC 12 warns about the self-initialised "undefined" vectors inside its own AVX-512 intrinsics
// once they are inlined (GCC bug 105593); silence it for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <new>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/host_memory.h"

namespace keel::bench {

std::string machine_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "unknown CPU";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      size_t start = line.find_first_not_of(" \t", line.find(':') + 1);
      if (start != std::string::npos) model = line.substr(start);
      break;
    }
  }
  return model + " (" + std::to_string(std::thread::hardware_concurrency()) + " cpus)";
}

double one_minute_load_average() {
  std::ifstream loadavg("/proc/loadavg");
  double load = -1.0;
  loadavg >> load;
  return load;
}

LargeBuffer::LargeBuffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
  try {
    data_ = allocate_host_zeroed(bytes_);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "bench: cannot allocate %zu bytes\n", bytes_);
    std::exit(2);
  }
}

LargeBuffer::~LargeBuffer() {
  free_host(data_);
}

namespace {

__attribute__((target("avx512f"))) float stream_sum_avx512(const float* data, size_t count) {
  __m512 acc[8];
  for (__m512& lane_sum : acc) lane_sum = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 128 <= count; i += 128) {
#pragma GCC unroll 8
    for (int part = 0; part < 8; ++part)
      acc[part] = _mm512_add_ps(acc[part], _mm512_load_ps(data + i + 16 * part));
  }
  __m512 total = _mm512_setzero_ps();
  for (__m512 lane_sum : acc) total = _mm512_add_ps(total, lane_sum);
  float sum = _mm512_reduce_add_ps(total);
  for (; i < count; ++i) sum += data[i];
  return sum;
}

__attribute__((target("avx2"))) float stream_sum_avx2(const float* data, size_t count) {
  __m256 acc[8];
  for (__m256& lane_sum : acc) lane_sum = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 64 <= count; i += 64) {
#pragma GCC unroll 8
    for (int part = 0; part < 8; ++part)
      acc[part] = _mm256_add_ps(acc[part], _mm256_load_ps(data + i + 8 * part));
  }
  alignas(32) float lanes[8];
  __m256 total = _mm256_setzero_ps();
  for (__m256 lane_sum : acc) total = _mm256_add_ps(total, lane_sum);
  _mm256_store_ps(lanes, total);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  for (; i < count; ++i) sum += data[i];
  return sum;
}

float stream_sum_plain(const float* data, size_t count) {
  float sums[8] = {};
  size_t i = 0;
  for (; i + 8 <= count; i += 8)
    for (int part = 0; part < 8; ++part) sums[part] += data[i + part];
  float sum = 0.0f;
  for (float part_sum : sums) sum += part_sum;
  for (; i < count; ++i) sum += data[i];
  return sum;
}

float stream_sum(const float* data, size_t count) {
  if (__builtin_cpu_supports("avx512f")) return stream_sum_avx512(data, count);
  if (__builtin_cpu_supports("avx2")) return stream_sum_avx2(data, count);
  return stream_sum_plain(data, count);
}

}  // namespace

double measure_read_bandwidth_gbs(size_t bytes, int num_threads) {
  num_threads = std::max(1, num_threads);
  // Each thread's part is a whole number of 512-byte blocks so every part stays aligned.
  size_t part_floats = bytes / sizeof(float) / static_cast<size_t>(num_threads) / 128 * 128;
  LargeBuffer buffer(part_floats * sizeof(float) * static_cast<size_t>(num_threads));
  float* data = buffer.as<float>();
  std::vector<float> sinks(static_cast<size_t>(num_threads));
  auto pass = [&](bool fill) {
    std::vector<std::thread> threads;
    for (int t = 0; t < num_threads; ++t)
      threads.emplace_back([&, t] {
        float* part = data + part_floats * static_cast<size_t>(t);
        // Real writes from the reading thread: untouched anonymous pages would all map the
        // shared zero page.
        if (fill)
          for (size_t i = 0; i < part_floats; ++i) part[i] = static_cast<float>(i & 1023) * 0.001f;
        sinks[static_cast<size_t>(t)] += stream_sum(part, part_floats);
      });
    for (auto& thread : threads) thread.join();
  };
  pass(true);
  double best_seconds = 1e30;
  for (int repeat = 0; repeat < 8; ++repeat) {
    auto start = std::chrono::steady_clock::now();
    pass(false);
    best_seconds =
        std::min(best_seconds,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  volatile float keep = 0;
  for (float sink : sinks) keep = keep + sink;
  (void)keep;
  return static_cast<double>(buffer.bytes()) / best_seconds * 1e-9;
}

}  // namespace keel::bench
