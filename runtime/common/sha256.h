// SHA-256 (FIPS 180-4), used for logits digests: a bit-exact fingerprint of fp32 outputs.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace keel {

// Whether this CPU has the x86 SHA extensions, and (tests) whether Sha256 uses them: on by
// default where available; the plain path is the same digest.
bool sha256_has_hardware_path();
void sha256_use_hardware_path(bool use);

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::array<uint8_t, 32> finish();
  std::string finish_hex();

 private:
  void compress_blocks(const uint8_t* data, size_t num_blocks);
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> pending_{};
  size_t pending_size_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace keel
