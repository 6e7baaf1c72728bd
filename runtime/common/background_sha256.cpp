#include "runtime/common/background_sha256.h"

#include <cstring>
#include <utility>

#include "kernels/base/check.h"

namespace keel {

BackgroundSha256::~BackgroundSha256() {
  stop_worker();
}

void BackgroundSha256::update(const void* data, size_t size) {
  if (finished_) throw_error("BackgroundSha256: update after finish_hex");
  if (size == 0) return;
  std::vector<unsigned char> chunk;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!spare_.empty()) {
      chunk = std::move(spare_.back());
      spare_.pop_back();
    }
  }
  chunk.resize(size);
  std::memcpy(chunk.data(), data, size);
  if (!worker_.joinable()) worker_ = std::thread([this] { run(); });
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(chunk));
  }
  changed_.notify_one();
}

void BackgroundSha256::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return closing_ || !queue_.empty(); });
    if (queue_.empty()) return;  // closing with nothing left
    std::vector<unsigned char> chunk = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    sha_.update(chunk.data(), chunk.size());
    lock.lock();
    spare_.push_back(std::move(chunk));
  }
}

void BackgroundSha256::stop_worker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closing_ = true;
  }
  changed_.notify_one();
  if (worker_.joinable()) worker_.join();
}

std::string BackgroundSha256::finish_hex() {
  if (finished_) throw_error("BackgroundSha256: finish_hex called twice");
  stop_worker();  // the worker drains the queue before it returns
  finished_ = true;
  return sha_.finish_hex();
}

}  // namespace keel
