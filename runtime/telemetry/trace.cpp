// Chrome trace-event JSON writer (see trace.h for the design).
#include "runtime/telemetry/trace.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "kernels/base/check.h"

namespace keel::telemetry {

namespace {

void check_spans(const std::vector<TraceSpan>& spans) {
  for (const TraceSpan& s : spans) {
    if (!std::isfinite(s.start_us) || !std::isfinite(s.dur_us) || s.dur_us < 0)
      throw_error("trace span '", s.name, "' on rank ", s.rank, ": start ", s.start_us,
                  " us, duration ", s.dur_us, " us (need finite values and duration >= 0)");
  }
}

// Every event of the trace in file order: the metadata, then the spans sorted (see trace.h).
void for_each_event(const std::vector<TraceSpan>& spans, const std::string& process_name,
                    const std::function<void(const nlohmann::json&)>& visit) {
  // Sort indices, not spans: args can be large and copying them twice is wasteful.
  std::vector<size_t> order(spans.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const TraceSpan& x = spans[a];
    const TraceSpan& y = spans[b];
    if (x.rank != y.rank) return x.rank < y.rank;
    if (x.start_us != y.start_us) return x.start_us < y.start_us;
    return x.dur_us > y.dur_us;
  });
  visit({{"name", "process_name"},
         {"ph", "M"},
         {"pid", 0},
         {"tid", 0},
         {"args", {{"name", process_name}}}});
  std::set<int32_t> ranks;
  for (const TraceSpan& s : spans) ranks.insert(s.rank);
  for (const int32_t rank : ranks) {
    visit({{"name", "thread_name"},
           {"ph", "M"},
           {"pid", 0},
           {"tid", rank},
           {"args", {{"name", "rank " + std::to_string(rank)}}}});
    visit({{"name", "thread_sort_index"},
           {"ph", "M"},
           {"pid", 0},
           {"tid", rank},
           {"args", {{"sort_index", rank}}}});
  }
  for (const size_t i : order) {
    const TraceSpan& s = spans[i];
    nlohmann::json event = {{"name", s.name},   {"cat", s.category}, {"ph", "X"},
                            {"ts", s.start_us}, {"dur", s.dur_us},   {"pid", 0},
                            {"tid", s.rank}};
    if (!s.args.is_null()) event["args"] = s.args;
    visit(event);
  }
}

}  // namespace

nlohmann::json chrome_trace_json(const std::vector<TraceSpan>& spans,
                                 const std::string& process_name) {
  check_spans(spans);
  nlohmann::json events = nlohmann::json::array();
  for_each_event(spans, process_name,
                 [&](const nlohmann::json& event) { events.push_back(event); });
  return nlohmann::json{{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
}

void stream_chrome_trace(const std::vector<TraceSpan>& spans, const std::string& process_name,
                         const std::function<void(std::string_view)>& write) {
  check_spans(spans);
  // Keys in the order nlohmann::json's dump() puts them (sorted), so the text is the same.
  write("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[");
  bool first = true;
  for_each_event(spans, process_name, [&](const nlohmann::json& event) {
    if (!first) write(",");
    first = false;
    write(event.dump());
  });
  write("]}");
}

void write_chrome_trace(const std::string& path, const std::vector<TraceSpan>& spans,
                        const std::string& process_name) {
  // Validate before touching the file so a bad span does not truncate an old trace.
  check_spans(spans);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw_error("cannot open trace file '", path, "' for writing: ", std::strerror(errno));
  stream_chrome_trace(spans, process_name, [&](std::string_view text) { out << text; });
  out << '\n';
  out.close();
  if (!out) throw_error("failed writing trace file '", path, "': ", std::strerror(errno));
}

}  // namespace keel::telemetry
