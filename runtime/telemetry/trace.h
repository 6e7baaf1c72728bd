// keel_telemetry traces: per-rank spans written as Chrome trace-event JSON, which Perfetto
// (ui.perfetto.dev) and chrome://tracing open directly.
//
// Design:
//  - Each rank records its spans as TraceEvents in its own StepObservation during forward()
//    (runtime/model/model.h; no locks: the rank's thread is the only writer). The engine hands
//    them over after the step (a collective orders the writes before the leader's reads); the
//    writer turns them into TraceSpans and calls write_chrome_trace().
//  - Spans are "X" (complete) events: one record per span with start and duration, so nothing
//    has to pair begin/end events and a buffer never holds half a span.
//  - One process (pid 0) with one thread per rank (tid = rank), named "rank N" by "M" metadata
//    events, so the viewer shows ranks as parallel tracks in rank order whether the ranks were
//    threads or MPI processes.
//  - Times are microseconds (the format's unit) as doubles, from the process's steady clock
//    (shared by all its threads). MPI ranks have separate clocks, which is why each process
//    writes its own file.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
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

// The trace object {"traceEvents":[...], "displayTimeUnit":"ms"}: first a "process_name"
// metadata event, then per rank (ascending) "thread_name" ("rank N") and "thread_sort_index"
// metadata events, then one "X" event per span {"name","cat","ph":"X","ts","dur","pid":0,
// "tid":rank[,"args"]} sorted by (rank, start, longer first). Longer-first at equal starts puts
// an enclosing span before the spans it contains, which is how the viewers nest them.
// Throws keel::Error for a span with a non-finite start or a negative or non-finite duration.
nlohmann::json chrome_trace_json(const std::vector<TraceSpan>& spans,
                                 const std::string& process_name);

// The text of chrome_trace_json(spans, process_name).dump(), handed to `write` in pieces, one
// event at a time: a large trace is never held as one JSON document (a DOM of 200k spans is
// several hundred MB). Validates every span before the first write.
void stream_chrome_trace(const std::vector<TraceSpan>& spans, const std::string& process_name,
                         const std::function<void(std::string_view)>& write);

// Writes the trace to path (replacing the file; for paths keel chose itself, see trace_file.h
// for paths that come from a client). Throws keel::Error naming path when it cannot be
// opened or written.
void write_chrome_trace(const std::string& path, const std::vector<TraceSpan>& spans,
                        const std::string& process_name);

}  // namespace keel::telemetry
