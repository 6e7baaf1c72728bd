// See host_memory.h. aligned_alloc + madvise rather than mmap: blocks stay plain heap blocks
// released by free(), and a kernel without THP just ignores the advice.
#include "kernels/base/host_memory.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>

namespace keel {

void* allocate_host_zeroed(size_t bytes) {
  const bool huge = bytes >= kHugePageBytes;
  const size_t alignment = huge ? kHugePageBytes : 64;
  const size_t padded =
      std::max<size_t>(alignment, (bytes + alignment - 1) / alignment * alignment);
  void* data = std::aligned_alloc(alignment, padded);
  if (data == nullptr) throw std::bad_alloc();
  if (huge) madvise(data, padded, MADV_HUGEPAGE);  // advice only: failure changes nothing
  std::memset(data, 0, padded);
  return data;
}

void free_host(void* pointer) {
  std::free(pointer);
}

std::string transparent_huge_pages_mode() {
  std::ifstream file("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(file, line)) return "unknown";
  const size_t open = line.find('['), close = line.find(']');
  if (open == std::string::npos || close == std::string::npos || close < open) return "unknown";
  return line.substr(open + 1, close - open - 1);
}

}  // namespace keel
