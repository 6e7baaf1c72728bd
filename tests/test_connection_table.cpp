// ConnectionTable: who is admitted, who is closed to make room, and when the reserve and the
// refusal apply, on a hand-driven clock (no sockets, no sleeping).
#include <gtest/gtest.h>

#include <chrono>

#include "runtime/server/connection_table.h"

namespace {

using namespace keel::server;
using namespace std::chrono_literals;
using Clock = ConnectionTable::Clock;
using Verdict = Admission::Verdict;

const Clock::time_point t0 = Clock::time_point{} + 1000s;

TEST(ConnectionTable, AdmitsUpToTheCapThenClosesTheLongestKeptAliveFirst) {
  ConnectionTable table(3, 1, 1000ms);
  EXPECT_EQ(table.admit(1, t0).verdict, Verdict::kRegular);
  EXPECT_EQ(table.admit(2, t0).verdict, Verdict::kRegular);
  EXPECT_EQ(table.admit(3, t0).verdict, Verdict::kRegular);
  // Each serves a request, then waits for the next: 2 went idle first, 1 last.
  for (uint64_t id : {1, 2, 3}) table.set_phase(id, ConnectionPhase::kBusy, t0 + 1s);
  table.set_phase(2, ConnectionPhase::kIdle, t0 + 2s);
  table.set_phase(3, ConnectionPhase::kIdle, t0 + 3s);
  table.set_phase(1, ConnectionPhase::kIdle, t0 + 4s);
  // No grace for kept-alive connections: 2 goes at once.
  Admission fourth = table.admit(4, t0 + 4s);
  EXPECT_EQ(fourth.verdict, Verdict::kRegular);
  ASSERT_TRUE(fourth.evict.has_value());
  EXPECT_EQ(*fourth.evict, 2u);
  EXPECT_TRUE(fourth.evicted_idle);
  ConnectionTableCounts counts = table.counts();
  EXPECT_EQ(counts.regular, 3);
  EXPECT_EQ(counts.reserve, 0);
  EXPECT_EQ(counts.idle, 3);
  // A later call about the closed connection changes nothing.
  table.set_phase(2, ConnectionPhase::kBusy, t0 + 5s);
  table.remove(2);
  EXPECT_EQ(table.counts().regular, 3);
  EXPECT_EQ(table.counts().busy, 0);
  // 4 is fresh (nothing sent yet): a kept-alive one goes before it, even one idle for less.
  Admission fifth = table.admit(5, t0 + 10s);
  ASSERT_TRUE(fifth.evict.has_value());
  EXPECT_EQ(*fifth.evict, 3u);
}

TEST(ConnectionTable, FreshConnectionsAreClosedOnlyAfterTheGrace) {
  ConnectionTable table(1, 0, 1000ms);
  table.admit(1, t0);
  // Connected 0.5 s ago, nothing sent yet: it may be about to send; the newcomer is refused.
  EXPECT_EQ(table.admit(2, t0 + 500ms).verdict, Verdict::kRefused);
  Admission later = table.admit(3, t0 + 1500ms);  // silent for 1.5 s: it goes
  ASSERT_TRUE(later.evict.has_value());
  EXPECT_EQ(*later.evict, 1u);
  EXPECT_FALSE(later.evicted_idle);  // silent since it connected: counted with the slow ones
}

TEST(ConnectionTable, SlowRequestsAreClosedOnlyAfterTheGraceAndOnlyWhenNoneIsIdle) {
  ConnectionTable table(2, 0, 1000ms);
  table.admit(1, t0);
  table.admit(2, t0);
  table.set_phase(1, ConnectionPhase::kReading, t0);
  table.set_phase(2, ConnectionPhase::kReading, t0 + 100ms);
  // Both requests have been arriving for under a second: nobody is closed, no reserve: refused.
  Admission early = table.admit(3, t0 + 900ms);
  EXPECT_EQ(early.verdict, Verdict::kRefused);
  EXPECT_FALSE(early.evict.has_value());
  // Past the grace the one arriving longest goes.
  Admission later = table.admit(4, t0 + 1500ms);
  EXPECT_EQ(later.verdict, Verdict::kRegular);
  ASSERT_TRUE(later.evict.has_value());
  EXPECT_EQ(*later.evict, 1u);
  EXPECT_FALSE(later.evicted_idle);
  // A kept-alive idle connection is preferred to an older slow one.
  table.set_phase(4, ConnectionPhase::kBusy, t0 + 1600ms);
  table.set_phase(4, ConnectionPhase::kIdle, t0 + 1700ms);
  Admission idle_first = table.admit(5, t0 + 5s);
  ASSERT_TRUE(idle_first.evict.has_value());
  EXPECT_EQ(*idle_first.evict, 4u);
}

TEST(ConnectionTable, BusySlotsLeaveTheReserveThenRefusal) {
  ConnectionTable table(2, 2, 1000ms);
  table.admit(1, t0);
  table.admit(2, t0);
  table.set_phase(1, ConnectionPhase::kBusy, t0);
  table.set_phase(2, ConnectionPhase::kBusy, t0);
  EXPECT_EQ(table.admit(3, t0 + 1s).verdict, Verdict::kReserve);
  EXPECT_EQ(table.admit(4, t0 + 1s).verdict, Verdict::kReserve);
  table.set_phase(3, ConnectionPhase::kBusy, t0 + 1s);
  table.set_phase(4, ConnectionPhase::kBusy, t0 + 1s);
  Admission refused = table.admit(5, t0 + 2s);
  EXPECT_EQ(refused.verdict, Verdict::kRefused);
  EXPECT_EQ(table.counts().regular + table.counts().reserve, 4);  // 5 was not registered
  // A reserve connection that closes frees its reserve slot, not a regular one.
  table.remove(3);
  EXPECT_EQ(table.counts().reserve, 1);
  EXPECT_EQ(table.admit(6, t0 + 3s).verdict, Verdict::kReserve);
  // A regular slot freed is regular again.
  table.remove(1);
  EXPECT_EQ(table.admit(7, t0 + 4s).verdict, Verdict::kRegular);
  // An idle reserve connection can be closed to make room; the new one inherits the reserve
  // slot, so the regular count never passes the cap.
  table.set_phase(6, ConnectionPhase::kIdle, t0 + 4s);
  Admission inherit = table.admit(8, t0 + 5s);
  ASSERT_TRUE(inherit.evict.has_value());
  EXPECT_EQ(*inherit.evict, 6u);
  EXPECT_EQ(inherit.verdict, Verdict::kReserve);
  EXPECT_EQ(table.counts().regular, 2);
  EXPECT_EQ(table.counts().reserve, 2);
}

}  // namespace
