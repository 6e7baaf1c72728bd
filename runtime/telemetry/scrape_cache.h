// keel_telemetry scrape cache: one /metrics body rendered at most once per interval and shared
// by every scrape in between, so N scrapers cost one render per interval, not N.
//
// Design:
//  - get() returns the cached body while it is younger than max_age (its age counts from the
//    moment its render began, i.e. how old the numbers in it are). Otherwise the caller renders,
//    outside the cache's lock, and publishes the new body.
//  - At most one render runs at a time. A scrape that finds a render under way takes the
//    previous body at once (stale by at most max_age plus one render) instead of queueing
//    behind it: a server thread never waits for another's render, except for the very first
//    body, which does not exist yet.
//  - max_age zero turns caching off: every get() renders its own body (renders may overlap).
//  - A render that throws publishes nothing: the exception reaches its caller, and the next
//    get() tries again.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace keel::telemetry {

class ScrapeCache {
 public:
  using Clock = std::chrono::steady_clock;
  using Render = std::function<std::string()>;

  // now: the clock (tests pass a fake one).
  ScrapeCache(Render render, Clock::duration max_age,
              std::function<Clock::time_point()> now = Clock::now);

  std::shared_ptr<const std::string> get();

  Clock::duration max_age() const { return max_age_; }
  // Bodies rendered so far (each get() with caching off counts one).
  uint64_t renders() const;

 private:
  const Render render_;
  const Clock::duration max_age_;
  const std::function<Clock::time_point()> now_;

  mutable std::mutex mutex_;
  std::condition_variable render_done_;
  std::shared_ptr<const std::string> body_;
  Clock::time_point rendered_at_{};
  bool rendering_ = false;
  uint64_t renders_ = 0;
};

}  // namespace keel::telemetry
