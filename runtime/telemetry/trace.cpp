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

nlohmann::json chrome_trace_json(const std::vector<TraceSpan>& spans,
                                 const std::string& process_name) {
  for (const TraceSpan& s : spans) {
    if (!std::isfinite(s.start_us) || !std::isfinite(s.dur_us) || s.dur_us < 0)
      throw_error("trace span '", s.name, "' on rank ", s.rank, ": start ", s.start_us,
                  " us, duration ", s.dur_us, " us (need finite values and duration >= 0)");
  }
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

  nlohmann::json events = nlohmann::json::array();
  events.push_back({{"name", "process_name"},
                    {"ph", "M"},
                    {"pid", 0},
                    {"tid", 0},
                    {"args", {{"name", process_name}}}});
  std::set<int32_t> ranks;
  for (const TraceSpan& s : spans) ranks.insert(s.rank);
  for (const int32_t rank : ranks) {
    events.push_back({{"name", "thread_name"},
                      {"ph", "M"},
                      {"pid", 0},
                      {"tid", rank},
                      {"args", {{"name", "rank " + std::to_string(rank)}}}});
    events.push_back({{"name", "thread_sort_index"},
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
    events.push_back(std::move(event));
  }
  return nlohmann::json{{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
}

void write_chrome_trace(const std::string& path, const std::vector<TraceSpan>& spans,
                        const std::string& process_name) {
  // Build (and validate) before touching the file so a bad span does not truncate an old trace.
  const std::string text = chrome_trace_json(spans, process_name).dump();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw_error("cannot open trace file '", path, "' for writing: ", std::strerror(errno));
  out << text << '\n';
  out.close();
  if (!out) throw_error("failed writing trace file '", path, "': ", std::strerror(errno));
}

}  // namespace keel::telemetry
