// Which connections the HTTP server keeps when it is full, and what a new one gets.
//
// Design:
//  - Every open connection is in the table with its phase: idle (waiting for the first byte of
//    a request: a fresh or a kept-alive connection), reading (a request is arriving) or busy
//    (its request is being answered: generation, streaming, writing). The server reports the
//    phase changes; the table only decides.
//  - Up to max_connections are regular. When a new connection finds them all taken, room is
//    made by closing a connection that holds a slot without work: first the kept-alive
//    connection idle longest since its last response (no request is lost: HTTP clients reopen
//    a kept-alive connection the server closed), else the one that has been silent since it
//    connected or whose request has been arriving longest, if for over `slow_after` (a client
//    that connects and sends nothing, or sends slowly: a request still arriving after that on
//    loopback or a LAN is an attack, or a link a 429 would not help either). The grace keeps a
//    flood of new connections from closing a fresh one before its request had time to arrive.
//    The new connection takes the closed one's slot.
//  - When every slot is busy (real requests in flight), up to reserved_connections more are
//    admitted as reserve connections: the server answers /health and /metrics on them and
//    gives everything else 429 (too many concurrent requests: retry later, as max_waiting's
//    429), then closes them. Beyond the reserve a connection is refused (429 without reading
//    the request). So /health and /metrics are answered within a bound whatever holds the other
//    connections, and requests past capacity get 429, never 503.
//  - A chosen victim leaves the table at once (its socket closes on its own strand; one whose
//    request arrived at that very moment is let through, so the count can exceed the cap by
//    the few connections that raced). Later calls naming it are ignored.
//  - One mutex; admission scans the table (O(connections)) only when it is full.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace keel::server {

enum class ConnectionPhase : uint8_t { kIdle, kReading, kBusy };
enum class ConnectionSlot : uint8_t { kRegular, kReserve };

struct Admission {
  enum class Verdict : uint8_t { kRegular, kReserve, kRefused };
  Verdict verdict = Verdict::kRefused;
  std::optional<uint64_t> evict;  // close this connection: the new one has taken its slot
  bool evicted_idle = false;      // the victim was a kept-alive idle one (else: silent or slow)
};

struct ConnectionTableCounts {
  int regular = 0;
  int reserve = 0;
  int idle = 0;
  int reading = 0;
  int busy = 0;
};

class ConnectionTable {
 public:
  using Clock = std::chrono::steady_clock;

  ConnectionTable(int max_connections, int reserved_connections,
                  std::chrono::milliseconds slow_after);

  // A new connection `id`, idle from `now`. Registers it unless refused.
  Admission admit(uint64_t id, Clock::time_point now);
  void set_phase(uint64_t id, ConnectionPhase phase, Clock::time_point now);
  void remove(uint64_t id);
  ConnectionTableCounts counts() const;

 private:
  struct Entry {
    ConnectionSlot slot = ConnectionSlot::kRegular;
    ConnectionPhase phase = ConnectionPhase::kIdle;
    Clock::time_point since;  // when the phase began
    bool fresh = true;        // no request has started on it yet
  };
  std::optional<uint64_t> pick_victim_locked(Clock::time_point now) const;
  int& count_of(ConnectionSlot slot) {
    return slot == ConnectionSlot::kRegular ? num_regular_ : num_reserve_;
  }

  const int max_connections_;
  const int reserved_connections_;
  const std::chrono::milliseconds slow_after_;
  mutable std::mutex mutex_;
  std::unordered_map<uint64_t, Entry> entries_;
  int num_regular_ = 0;
  int num_reserve_ = 0;
};

}  // namespace keel::server
