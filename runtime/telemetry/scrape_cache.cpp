// One render per interval for every scraper (see scrape_cache.h for the design).
#include "runtime/telemetry/scrape_cache.h"

#include <utility>

#include "kernels/base/check.h"

namespace keel::telemetry {

ScrapeCache::ScrapeCache(Render render, Clock::duration max_age,
                         std::function<Clock::time_point()> now)
    : render_(std::move(render)), max_age_(max_age), now_(std::move(now)) {
  if (!render_) throw_error("scrape cache: no render function");
  if (max_age_ < Clock::duration::zero()) throw_error("scrape cache: negative max age");
}

std::shared_ptr<const std::string> ScrapeCache::get() {
  if (max_age_ == Clock::duration::zero()) {
    auto body = std::make_shared<const std::string>(render_());
    std::lock_guard lock(mutex_);
    ++renders_;
    return body;
  }
  std::unique_lock lock(mutex_);
  while (true) {
    if (body_ && now_() - rendered_at_ < max_age_) return body_;
    if (!rendering_) break;
    if (body_) return body_;  // someone is rendering: the previous body rather than a queue
    render_done_.wait(lock);  // the first body of all: nothing to hand out yet
  }
  rendering_ = true;
  const Clock::time_point started = now_();
  lock.unlock();
  std::shared_ptr<const std::string> body;
  try {
    body = std::make_shared<const std::string>(render_());
  } catch (...) {
    lock.lock();
    rendering_ = false;
    render_done_.notify_all();
    throw;
  }
  lock.lock();
  body_ = body;
  rendered_at_ = started;
  rendering_ = false;
  ++renders_;
  render_done_.notify_all();
  return body;
}

uint64_t ScrapeCache::renders() const {
  std::lock_guard lock(mutex_);
  return renders_;
}

}  // namespace keel::telemetry
