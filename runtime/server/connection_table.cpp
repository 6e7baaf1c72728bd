// Connection admission under a cap (see connection_table.h for the policy).
#include "runtime/server/connection_table.h"

#include "kernels/base/check.h"

namespace keel::server {

ConnectionTable::ConnectionTable(int max_connections, int reserved_connections,
                                 std::chrono::milliseconds slow_after)
    : max_connections_(max_connections),
      reserved_connections_(reserved_connections),
      slow_after_(slow_after) {
  KEEL_CHECK(max_connections >= 1, "max_connections must be >= 1");
  KEEL_CHECK(reserved_connections >= 0, "reserved_connections must be >= 0");
}

std::optional<uint64_t> ConnectionTable::pick_victim_locked(Clock::time_point now) const {
  std::optional<uint64_t> kept_alive, slow;
  Clock::time_point kept_alive_since = Clock::time_point::max();
  Clock::time_point slow_since = Clock::time_point::max();
  for (const auto& [id, entry] : entries_) {
    if (entry.phase == ConnectionPhase::kBusy) continue;
    if (entry.phase == ConnectionPhase::kIdle && !entry.fresh) {
      if (entry.since < kept_alive_since) {
        kept_alive = id;
        kept_alive_since = entry.since;
      }
    } else if (now - entry.since > slow_after_ && entry.since < slow_since) {
      slow = id;
      slow_since = entry.since;
    }
  }
  return kept_alive ? kept_alive : slow;
}

Admission ConnectionTable::admit(uint64_t id, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  Admission admission;
  ConnectionSlot slot = ConnectionSlot::kRegular;
  if (num_regular_ >= max_connections_) {
    if (std::optional<uint64_t> victim = pick_victim_locked(now)) {
      auto it = entries_.find(*victim);
      slot = it->second.slot;
      admission.evict = *victim;
      admission.evicted_idle = it->second.phase == ConnectionPhase::kIdle && !it->second.fresh;
      count_of(slot) -= 1;
      entries_.erase(it);
    } else if (num_reserve_ < reserved_connections_) {
      slot = ConnectionSlot::kReserve;
    } else {
      admission.verdict = Admission::Verdict::kRefused;
      return admission;
    }
  }
  count_of(slot) += 1;
  entries_[id] = Entry{slot, ConnectionPhase::kIdle, now, /*fresh=*/true};
  admission.verdict = slot == ConnectionSlot::kRegular ? Admission::Verdict::kRegular
                                                       : Admission::Verdict::kReserve;
  return admission;
}

void ConnectionTable::set_phase(uint64_t id, ConnectionPhase phase, Clock::time_point now) {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(id);
  if (it == entries_.end() || it->second.phase == phase) return;
  it->second.phase = phase;
  it->second.since = now;
  if (phase != ConnectionPhase::kIdle) it->second.fresh = false;
}

void ConnectionTable::remove(uint64_t id) {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  count_of(it->second.slot) -= 1;
  entries_.erase(it);
}

ConnectionTableCounts ConnectionTable::counts() const {
  std::lock_guard lock(mutex_);
  ConnectionTableCounts counts;
  counts.regular = num_regular_;
  counts.reserve = num_reserve_;
  for (const auto& [id, entry] : entries_) {
    if (entry.phase == ConnectionPhase::kIdle) ++counts.idle;
    if (entry.phase == ConnectionPhase::kReading) ++counts.reading;
    if (entry.phase == ConnectionPhase::kBusy) ++counts.busy;
  }
  return counts;
}

}  // namespace keel::server
