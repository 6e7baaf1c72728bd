// Machine facts that benchmarks report beside their results, measured in the same run:
// the CPU's name and its achievable memory read bandwidth.
#pragma once

#include <cstddef>
#include <string>

namespace keel::bench {

// "model name" from /proc/cpuinfo plus the number of online CPUs, e.g. "AMD EPYC (2 cpus)".
std::string machine_name();

// Read bandwidth in GB/s (1e9 bytes/s): `num_threads` threads each stream their part of a
// `bytes`-sized buffer (much larger than the last-level cache) with 256-bit loads; best of
// `repeats` passes after one warm-up pass.
double measure_read_bandwidth_gbs(size_t bytes, int num_threads, int repeats = 5);

}  // namespace keel::bench
