// Machine facts that benchmarks report beside their results, measured in the same run: the
// CPU's name, the load while measuring, and achievable memory read bandwidth.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace keel::bench {

// "model name" from /proc/cpuinfo plus the number of online CPUs, e.g. "AMD EPYC (2 cpus)".
std::string machine_name();

// Other processes competing for the cores or for memory bandwidth skew every figure; reports
// include the 1-minute load average so such runs can be recognised.
double one_minute_load_average();

// Memory allocated exactly as the engine allocates its weights (kernels/base/host_memory.h: from
// 2 MiB up 2 MiB aligned, MADV_HUGEPAGE), so the bandwidth probe and a benchmark's weight stream
// see the pages decode sees.
class LargeBuffer {
 public:
  explicit LargeBuffer(size_t bytes);
  ~LargeBuffer();
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;

  template <typename T>
  T* as() {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  void* data_;
};

// Read bandwidth in GB/s (1e9 bytes/s): `num_threads` threads each stream their part of a
// `bytes`-sized buffer (much larger than the last-level cache) with the widest vector loads
// the CPU has and several independent accumulators; best of 8 passes after a warm-up pass.
double measure_read_bandwidth_gbs(size_t bytes, int num_threads);

}  // namespace keel::bench
