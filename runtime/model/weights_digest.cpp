#include "runtime/model/weights_digest.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/common/sha256.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void hash_u64(Sha256& sha, uint64_t value) {
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(value >> (8 * i));
  sha.update(bytes, sizeof(bytes));
}

// Hashes bytes [offset, offset + size) of `file`.
void hash_range(Sha256& sha, std::ifstream& file, const std::string& path, uint64_t offset,
                uint64_t size) {
  std::vector<char> buffer(std::min<uint64_t>(size, uint64_t{1} << 20));
  file.seekg(static_cast<std::streamoff>(offset));
  while (size > 0) {
    const uint64_t chunk = std::min<uint64_t>(size, buffer.size());
    file.read(buffer.data(), static_cast<std::streamsize>(chunk));
    if (!file) throw_error("weights digest: cannot read ", path, " at byte ", offset);
    sha.update(buffer.data(), chunk);
    offset += chunk;
    size -= chunk;
  }
}

void hash_safetensors(Sha256& sha, std::ifstream& file, const std::string& path,
                      uint64_t file_size) {
  // The header whole; a length that does not fit the file (the loader refuses such files)
  // makes the whole file the "header", so nothing is skipped.
  uint64_t header_end = file_size;
  if (file_size >= 8) {
    unsigned char bytes[8];
    file.read(reinterpret_cast<char*>(bytes), 8);
    if (!file) throw_error("weights digest: cannot read ", path);
    uint64_t header_length = 0;
    for (int i = 0; i < 8; ++i) header_length |= static_cast<uint64_t>(bytes[i]) << (8 * i);
    if (header_length <= file_size - 8) header_end = 8 + header_length;
  }
  hash_range(sha, file, path, 0, header_end);
  const uint64_t data_bytes = file_size - header_end;
  if (data_bytes <= kDigestWindows * kDigestWindowBytes) {
    hash_range(sha, file, path, header_end, data_bytes);
    return;
  }
  const uint64_t last_start = data_bytes - kDigestWindowBytes;
  for (uint64_t i = 0; i < kDigestWindows; ++i)
    hash_range(sha, file, path, header_end + i * last_start / (kDigestWindows - 1),
               kDigestWindowBytes);
}

}  // namespace

std::string checkpoint_digest(const std::string& directory) {
  std::vector<std::string> names;
  std::error_code error;
  for (const fs::directory_entry& entry : fs::directory_iterator(directory, error)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() &&
        (ends_with(name, ".json") || ends_with(name, ".jinja") || ends_with(name, ".safetensors")))
      names.push_back(name);
  }
  if (error) throw_error("weights digest: cannot list ", directory, ": ", error.message());
  std::sort(names.begin(), names.end());
  Sha256 sha;
  const std::string tag = "keel-weights-v1\n";
  sha.update(tag.data(), tag.size());
  for (const std::string& name : names) {
    const std::string path = (fs::path(directory) / name).string();
    std::ifstream file(path, std::ios::binary);
    const uint64_t size = fs::file_size(path, error);
    if (!file || error) throw_error("weights digest: cannot read ", path);
    sha.update(name.data(), name.size() + 1);  // with the terminating NUL
    hash_u64(sha, size);
    if (ends_with(name, ".safetensors")) {
      hash_safetensors(sha, file, path, size);
    } else {
      hash_range(sha, file, path, 0, size);
    }
  }
  return sha.finish_hex();
}

}  // namespace keel
