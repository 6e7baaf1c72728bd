// Host allocations for weights, KV pools and activations. Small blocks are 64-byte aligned (row
// starts on cache lines). From 2 MiB up a block is 2 MiB aligned, rounded up to whole 2 MiB, and
// marked MADV_HUGEPAGE before it is zeroed, so the kernel backs it with transparent huge pages
// wherever it offers them ("always" or "madvise"): decode streams the weights, and on 4 KiB pages
// the TLB misses of a stream cost a measurable share of its bandwidth.
#pragma once

#include <cstddef>
#include <string>

namespace keel {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// Zeroed, aligned as above; throws std::bad_alloc. Release with free_host.
void* allocate_host_zeroed(size_t bytes);
void free_host(void* pointer);

// The kernel's transparent-huge-page mode, the bracketed word of
// /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise", "never"), or "unknown".
std::string transparent_huge_pages_mode();

}  // namespace keel
