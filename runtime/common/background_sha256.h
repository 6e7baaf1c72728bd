// SHA-256 of a byte stream computed on a worker thread, so a step loop that fingerprints every
// step's logits (keel generate's logits_digest) pays one copy per update instead of the hash.
// update() copies the bytes and queues them; the worker hashes the chunks in the order given,
// so the digest is exactly Sha256's over the concatenation. finish_hex() waits for the queue.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/common/sha256.h"

namespace keel {

class BackgroundSha256 {
 public:
  BackgroundSha256() = default;
  ~BackgroundSha256();
  BackgroundSha256(const BackgroundSha256&) = delete;
  BackgroundSha256& operator=(const BackgroundSha256&) = delete;

  void update(const void* data, size_t size);
  // The hex digest of everything given; the object is then spent (a further update throws).
  std::string finish_hex();

 private:
  void run();
  void stop_worker();

  Sha256 sha_;
  std::thread worker_;  // started by the first update
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::vector<unsigned char>> queue_;
  std::vector<std::vector<unsigned char>> spare_;  // hashed chunks' storage, reused
  bool closing_ = false;
  bool finished_ = false;
};

}  // namespace keel
