// Private to runtime/model/*.cpp: the timing wrapper every layer file uses.
#pragma once

#include <chrono>

#include "runtime/model/model.h"

namespace keel {

inline double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename Fn>
void RankModel::timed(Phase phase, int64_t layer, Fn&& work) {
  if (!observe_) {
    work();
    return;
  }
  const double start = steady_seconds();
  const double seconds = backend_.timed_seconds(work);
  observation_.phase_seconds[static_cast<size_t>(phase)] += seconds;
  if (trace_)
    observation_.trace.push_back({phase, static_cast<int32_t>(layer), -1, start, seconds});
}

}  // namespace keel
