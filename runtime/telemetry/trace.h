// keel_telemetry traces: per-rank spans written as Chrome trace-event JSON, which Perfetto
// (ui.perfetto.dev) and chrome://tracing open directly.
//
// Design:
//  - Each rank records into its own TraceBuffer (a plain vector, no locks: the rank's thread is
//    its only writer). Whoever writes the file take()s every rank's spans after the ranks are
//    joined or have handed them over, concatenates them and calls write_chrome_trace().
//  - Spans are "X" (complete) events: one record per span with start and duration, so nothing
//    has to pair begin/end events and a buffer never holds half a span.
//  - One process (pid 0) with one thread per rank (tid = rank), named "rank N" by "M" metadata
//    events, so the viewer shows ranks as parallel tracks in rank order whether the ranks were
//    threads or MPI processes.
//  - Times are microseconds (the format's unit) as doubles; trace_clock_us() is a steady clock
//    shared by all threads of the process. MPI ranks have separate clocks: align them (e.g. a
//    barrier-stamped offset) before merging.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::telemetry {

struct TraceSpan {
  int32_t rank = 0;
  std::string name;
  std::string category;  // the event's "cat": lets the viewer filter, e.g. "attn", "moe", "comm"
  double start_us = 0;
  double dur_us = 0;
  nlohmann::json args;  // shown in the viewer's details pane; omitted when null
};

// Microseconds on std::chrono::steady_clock since the first call in this process.
double trace_clock_us();

class TraceBuffer {
 public:
  explicit TraceBuffer(int32_t rank) : rank_(rank) {}

  void add(std::string name, std::string category, double start_us, double dur_us,
           nlohmann::json args = nullptr) {
    spans_.push_back(
        TraceSpan{rank_, std::move(name), std::move(category), start_us, dur_us, std::move(args)});
  }
  // Moves the spans out and leaves the buffer empty, ready for the next window.
  std::vector<TraceSpan> take() {
    std::vector<TraceSpan> out = std::move(spans_);
    spans_.clear();
    return out;
  }
  int32_t rank() const { return rank_; }
  size_t size() const { return spans_.size(); }
  void reserve(size_t n) { spans_.reserve(n); }

 private:
  int32_t rank_;
  std::vector<TraceSpan> spans_;
};

// The trace object {"traceEvents":[...], "displayTimeUnit":"ms"}: first a "process_name"
// metadata event, then per rank (ascending) "thread_name" ("rank N") and "thread_sort_index"
// metadata events, then one "X" event per span {"name","cat","ph":"X","ts","dur","pid":0,
// "tid":rank[,"args"]} sorted by (rank, start, longer first). Longer-first at equal starts puts
// an enclosing span before the spans it contains, which is how the viewers nest them.
// Throws keel::Error for a span with a non-finite start or a negative or non-finite duration.
nlohmann::json chrome_trace_json(const std::vector<TraceSpan>& spans,
                                 const std::string& process_name);

// Writes chrome_trace_json(spans, process_name) to path (replacing the file). Throws
// keel::Error naming path when it cannot be opened or written.
void write_chrome_trace(const std::string& path, const std::vector<TraceSpan>& spans,
                        const std::string& process_name);

}  // namespace keel::telemetry
