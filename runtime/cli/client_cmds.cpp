// keel bench serve / keel experts / keel profile tail. See client_cmds.h for the design and
// the exact decomposition `profile tail` reports. Notes here are about mechanics:
//  - Flags are parsed by keel_flags (runtime/cli/flags.h), as in the rest of the CLI, with
//    --goodput taking every following word up to the next "--" option.
//  - Plot scripts run through std::system with shell-quoted paths; python is $KEEL_PYTHON,
//    else python3 on PATH, else /usr/bin/python3 (Debian's python3-matplotlib installs for the
//    system interpreter, which a pyenv/venv python3 earlier on PATH does not see).
#include "runtime/cli/client_cmds.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "runtime/cli/flags.h"
#include "runtime/tools/loadgen/loadgen.h"

#ifndef KEEL_SOURCE_DIR
#define KEEL_SOURCE_DIR "."
#endif

namespace keel {
namespace clients {
namespace {

using json = nlohmann::json;

// Thrown for bad command lines (by keel_flags and by the commands' own checks): the commands
// print the message and their help, and return 2.
using flags::UsageError;

std::string trim_slash(std::string url) {
  while (!url.empty() && url.back() == '/') url.pop_back();
  return url;
}

json get_json(const std::string& url) {
  loadgen::HttpResponse response = loadgen::http_get(url);
  if (response.status != 200)
    throw std::runtime_error("GET " + url + ": HTTP " + std::to_string(response.status) + ": " +
                             response.body.substr(0, 300));
  json body = json::parse(response.body, nullptr, false);
  if (body.is_discarded()) throw std::runtime_error("GET " + url + ": response is not JSON");
  return body;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// The python that can import matplotlib (see the note at the top); throws a message naming
// the package when none can.
std::string find_matplotlib_python() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KEEL_PYTHON"); env && *env) {
    candidates.push_back(env);
  } else {
    candidates = {"python3", "/usr/bin/python3"};
  }
  for (const std::string& python : candidates) {
    std::string probe = shell_quote(python) + " -c 'import matplotlib' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) return python;
  }
  throw std::runtime_error(
      "plotting needs python3 with matplotlib, which was not found (tried " + candidates.front() +
      (candidates.size() > 1 ? ", " + candidates.back() : "") +
      "); install the Debian package python3-matplotlib (scripts/setup does), or set "
      "KEEL_PYTHON to a python that has matplotlib");
}

std::string script_path(const std::string& name) {
  const char* env = std::getenv("KEEL_SCRIPTS_DIR");
  std::string dir = env && *env ? env : std::string(KEEL_SOURCE_DIR) + "/scripts";
  std::string path = dir + "/" + name;
  if (!std::filesystem::exists(path))
    throw std::runtime_error("plot script " + path + " not found (set KEEL_SCRIPTS_DIR)");
  return path;
}

void run_plot(const std::string& script, const std::string& input, const std::string& output) {
  std::string python = find_matplotlib_python();
  std::string command = shell_quote(python) + " " + shell_quote(script_path(script)) + " " +
                        shell_quote(input) + " " + shell_quote(output);
  int status = std::system(command.c_str());
  if (status != 0)
    throw std::runtime_error(script + " failed (status " + std::to_string(status) + ")");
}

// A temporary file for JSON handed to a plot script; removed by the destructor.
struct TempFile {
  std::string path;
  TempFile() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "keel-plot-XXXXXX.json").string();
    int fd = ::mkstemps(pattern.data(), 5);
    if (fd < 0) throw std::runtime_error("cannot create a temporary file");
    ::close(fd);
    path = pattern;
  }
  ~TempFile() {
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
  }
};

// Runs `body` with the command's error conventions (see client_cmds.h).
template <typename Body>
int guarded(const std::string& name, const flags::FlagSet& flags, Body body) {
  try {
    return body();
  } catch (const UsageError& error) {
    std::cerr << "keel " << name << ": " << error.what() << "\n" << flags.help();
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "keel " << name << ": error: " << error.what() << "\n";
    return 1;
  }
}

const json& field(const json& object, const char* name, const std::string& where) {
  auto it = object.find(name);
  if (it == object.end()) throw std::runtime_error(where + ": missing \"" + name + "\"");
  return *it;
}

double number_or(const json& object, const char* name, double fallback) {
  auto it = object.find(name);
  return it != object.end() && it->is_number() ? it->get<double>() : fallback;
}

std::string fixed(double value, int digits) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << value;
  return out.str();
}

}  // namespace

std::pair<int, int> parse_length_range(const std::string& text) {
  auto parse = [&](const std::string& part) {
    size_t used = 0;
    int value = 0;
    try {
      value = std::stoi(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != part.size() || value < 1)
      throw std::runtime_error("length '" + text + "': expected L or MIN:MAX, integers >= 1");
    return value;
  };
  size_t colon = text.find(':');
  if (colon == std::string::npos) {
    int value = parse(text);
    return {value, value};
  }
  int lo = parse(text.substr(0, colon)), hi = parse(text.substr(colon + 1));
  if (hi < lo) throw std::runtime_error("length '" + text + "': MAX < MIN");
  return {lo, hi};
}

// ---- experts ----

std::vector<LayerRow> expert_rows(const json& telemetry, int top) {
  std::vector<LayerRow> rows;
  const json& layers = field(telemetry, "layers", "experts telemetry");
  if (!layers.is_array()) throw std::runtime_error("experts telemetry: \"layers\" is not a list");
  for (const json& layer : layers) {
    if (!layer.value("moe", true)) continue;
    LayerRow row;
    row.layer = field(layer, "layer", "layer").get<int>();
    std::string where = "layer " + std::to_string(row.layer);
    std::vector<int64_t> tokens = field(layer, "tokens", where).get<std::vector<int64_t>>();
    for (int64_t t : tokens) row.tokens += t;
    row.balancedness = number_or(layer, "balancedness", 0.0);
    row.imbalance = number_or(layer, "imbalance", 0.0);
    row.near_ties = layer.value("near_ties", int64_t{0});
    std::vector<int> order(tokens.size());
    for (size_t e = 0; e < order.size(); ++e) order[e] = static_cast<int>(e);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return tokens[a] > tokens[b]; });
    for (int i = 0; i < std::min<int>(top, static_cast<int>(order.size())); ++i) {
      int e = order[static_cast<size_t>(i)];
      row.hottest.push_back({e, tokens[static_cast<size_t>(e)],
                             row.tokens > 0 ? static_cast<double>(tokens[static_cast<size_t>(e)]) /
                                                  static_cast<double>(row.tokens)
                                            : 0.0});
    }
    if (auto seconds = layer.find("expert_seconds");
        seconds != layer.end() && seconds->contains("p99")) {
      std::vector<double> p99 = (*seconds)["p99"].get<std::vector<double>>();
      std::vector<int> slow(p99.size());
      for (size_t e = 0; e < slow.size(); ++e) slow[e] = static_cast<int>(e);
      std::stable_sort(slow.begin(), slow.end(), [&](int a, int b) { return p99[a] > p99[b]; });
      for (int i = 0; i < std::min<int>(top, static_cast<int>(slow.size())); ++i)
        row.slowest.push_back(
            {slow[static_cast<size_t>(i)], p99[static_cast<size_t>(slow[static_cast<size_t>(i)])]});
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

std::string experts_table(const json& telemetry, const std::vector<LayerRow>& rows) {
  std::ostringstream out;
  out << "model " << telemetry.value("model", std::string("?")) << ": "
      << telemetry.value("num_layers", 0) << " layers, " << telemetry.value("num_experts", 0)
      << " experts, top_k " << telemetry.value("top_k", 0) << ", tp " << telemetry.value("tp", 0)
      << ", near-tie epsilon " << number_or(telemetry, "near_tie_epsilon", 0.0) << "\n";
  out << std::left << std::setw(6) << "layer" << std::right << std::setw(10) << "tokens"
      << std::setw(9) << "balanced" << std::setw(10) << "imbalance" << std::setw(11) << "near-ties"
      << "  " << std::left << std::setw(34) << "hottest (id:tokens:share)"
      << "  slowest (id:p99 ms)\n";
  for (const LayerRow& row : rows) {
    std::string hot, slow;
    for (const ExpertTokens& e : row.hottest)
      hot += (hot.empty() ? "" : " ") + std::to_string(e.expert) + ":" + std::to_string(e.tokens) +
             ":" + fixed(e.share, 2);
    for (const ExpertLatency& e : row.slowest)
      slow += (slow.empty() ? "" : " ") + std::to_string(e.expert) + ":" + fixed(e.p99_s * 1e3, 3);
    out << std::left << std::setw(6) << row.layer << std::right << std::setw(10) << row.tokens
        << std::setw(9) << fixed(row.balancedness, 3) << std::setw(10) << fixed(row.imbalance, 3)
        << std::setw(11) << row.near_ties << "  " << std::left << std::setw(34) << hot << "  "
        << slow << "\n";
  }
  return out.str();
}

json expert_rows_json(const std::vector<LayerRow>& rows) {
  json out = json::array();
  for (const LayerRow& row : rows) {
    json hot = json::array(), slow = json::array();
    for (const ExpertTokens& e : row.hottest)
      hot.push_back({{"expert", e.expert}, {"tokens", e.tokens}, {"share", e.share}});
    for (const ExpertLatency& e : row.slowest)
      slow.push_back({{"expert", e.expert}, {"p99_s", e.p99_s}});
    out.push_back({{"layer", row.layer},
                   {"tokens", row.tokens},
                   {"balancedness", row.balancedness},
                   {"imbalance", row.imbalance},
                   {"near_ties", row.near_ties},
                   {"hottest", hot},
                   {"slowest", slow}});
  }
  return out;
}

// ---- profile tail ----

namespace {

const char* const kPhases[] = {"attention", "linear_attention", "router",    "pack",
                               "experts",   "combine",          "allreduce", "other"};

// A step's components (see client_cmds.h): phase maxima over ranks, allreduce split into the
// fastest rank's time and the rank spread, sampling and scheduling.
std::map<std::string, double> step_components(const json& step) {
  std::map<std::string, double> out;
  const json empty = json::object();
  const json& phases = step.contains("phases") ? step["phases"] : empty;
  for (const char* phase : kPhases) {
    std::vector<double> ranks;
    if (auto it = phases.find(phase); it != phases.end() && it->is_array())
      for (const json& v : *it)
        if (v.is_number()) ranks.push_back(v.get<double>());
    double max = ranks.empty() ? 0.0 : *std::max_element(ranks.begin(), ranks.end());
    double min = ranks.empty() ? 0.0 : *std::min_element(ranks.begin(), ranks.end());
    if (std::string(phase) == "allreduce") {
      out["step phase: allreduce"] = min;
      out["allreduce stall (rank skew)"] = max - min;
    } else {
      out[std::string("step phase: ") + phase] = max;
    }
  }
  out["step phase: sampling"] = number_or(step, "sampling_s", 0.0);
  out["step phase: schedule"] = number_or(step, "schedule_s", 0.0);
  return out;
}

bool step_has_request(const json& step, const std::string& id) {
  auto ids = step.find("request_ids");
  if (ids == step.end() || !ids->is_array() || ids->empty()) return true;  // not reported
  for (const json& v : *ids)
    if (v.is_string() && v.get<std::string>() == id) return true;
  return false;
}

}  // namespace

TailReport analyze_tail(const json& requests_doc, const json& steps_doc, double percentile,
                        int examples) {
  TailReport report;
  report.percentile = percentile;
  const json& requests = field(requests_doc, "requests", "telemetry requests");
  const json& steps = field(steps_doc, "steps", "telemetry steps");
  report.window_requests = static_cast<int>(requests.size());
  report.window_steps = static_cast<int>(steps.size());

  std::vector<double> e2es, durations;
  for (const json& r : requests) e2es.push_back(number_or(r, "e2e_s", 0.0));
  for (const json& s : steps) durations.push_back(number_or(s, "seconds", 0.0));
  report.threshold_s = loadgen::percentile(e2es, percentile);
  report.median_step_s = loadgen::percentile(durations, 50);

  // Window medians of each component, the baseline a slow step's components are judged by.
  std::vector<std::map<std::string, double>> components;
  std::map<std::string, std::vector<double>> per_component;
  for (const json& s : steps) {
    components.push_back(step_components(s));
    for (const auto& [name, value] : components.back()) per_component[name].push_back(value);
  }
  std::map<std::string, double> component_median;
  for (const auto& [name, values] : per_component)
    component_median[name] = loadgen::percentile(values, 50);

  std::vector<const json*> slow;
  for (const json& r : requests)
    if (number_or(r, "e2e_s", 0.0) >= report.threshold_s && !requests.empty()) slow.push_back(&r);
  std::stable_sort(slow.begin(), slow.end(), [](const json* a, const json* b) {
    return number_or(*a, "e2e_s", 0.0) > number_or(*b, "e2e_s", 0.0);
  });

  std::map<std::string, double> cause_total;
  std::map<std::string, std::vector<CauseExample>> cause_examples;
  std::map<std::tuple<int, int, int>, double> hot_total;
  report.per_request = json::array();
  for (const json* r : slow) {
    std::string id = r->value("id", std::string());
    double e2e = number_or(*r, "e2e_s", 0.0);
    double ttft = std::min(number_or(*r, "ttft_s", 0.0), e2e);
    double arrival = number_or(*r, "arrival_s", 0.0);
    double queue = std::min(number_or(*r, "queue_s", 0.0), ttft);
    int preemptions = r->value("preemptions", 0);
    double first_step = number_or(*r, "first_step", -1), last_step = number_or(*r, "last_step", -1);
    report.slow_ids.push_back(id);
    report.total_s += e2e;

    std::map<std::string, double> parts;
    std::map<std::tuple<int, int, int>, double> hot_parts;
    parts["queueing"] = queue;
    parts["prefill"] = ttft - queue;
    double decode = e2e - ttft;
    double first_token_at = arrival + ttft;

    std::map<std::string, double> step_parts;
    double covered = 0.0;
    json step_ids = json::array();
    for (size_t i = 0; i < steps.size(); ++i) {
      const json& s = steps[i];
      double sid = number_or(s, "id", -1);
      double seconds = number_or(s, "seconds", 0.0);
      if (sid < first_step || sid > last_step || !step_has_request(s, id)) continue;
      if (number_or(s, "start_s", 0.0) + seconds / 2 <= first_token_at) continue;  // prefill
      step_ids.push_back(s.value("id", 0));
      covered += seconds;
      step_parts["decode (normal pace)"] += std::min(seconds, report.median_step_s);
      double excess = seconds - report.median_step_s;
      if (excess <= 0) continue;
      std::map<std::string, double> weights;
      double sum = 0.0;
      for (const auto& [name, value] : components[i]) {
        weights[name] = std::max(0.0, value - component_median[name]);
        sum += weights[name];
      }
      if (sum <= 0) {  // nothing grew: fall back to the components' sizes
        for (const auto& [name, value] : components[i]) sum += (weights[name] = value);
      }
      if (sum <= 0) {
        step_parts["step (no phase data)"] += excess;
        continue;
      }
      const json& hot = s.contains("hot_experts") ? s["hot_experts"] : json::array();
      for (const auto& [name, weight] : weights) {
        double part = excess * weight / sum;
        if (part <= 0) continue;
        if (name == "step phase: experts" && hot.is_array() && !hot.empty()) {
          step_parts["hot experts"] += part;
          double hot_sum = 0.0;
          for (const json& h : hot) hot_sum += number_or(h, "seconds", 0.0);
          for (const json& h : hot) {
            double share = hot_sum > 0 ? number_or(h, "seconds", 0.0) / hot_sum
                                       : 1.0 / static_cast<double>(hot.size());
            hot_parts[{h.value("layer", 0), h.value("expert", 0), h.value("rank", 0)}] +=
                part * share;
          }
        } else {
          step_parts[name] += part;
        }
      }
    }
    // Fit the step parts into the decode time (see client_cmds.h), the rest is uncovered.
    double scale = covered > decode && covered > 0 ? decode / covered : 1.0;
    for (auto& [name, value] : step_parts) parts[name] += value * scale;
    for (auto& [key, value] : hot_parts) hot_total[key] += value * scale;
    double uncovered = std::max(0.0, decode - covered);
    if (uncovered > 0) parts[preemptions > 0 ? "preemption" : "between steps"] += uncovered;

    json causes = json::object();
    for (const auto& [name, value] : parts) {
      if (value <= 0) continue;
      cause_total[name] += value;
      cause_examples[name].push_back({id, value});
      causes[name] = value;
    }
    report.per_request.push_back({{"id", id},
                                  {"e2e_s", e2e},
                                  {"preemptions", preemptions},
                                  {"steps", step_ids},
                                  {"causes", causes}});
  }
  for (auto& [name, seconds] : cause_total) {
    Cause cause;
    cause.name = name;
    cause.seconds = seconds;
    cause.share = report.total_s > 0 ? seconds / report.total_s : 0.0;
    std::vector<CauseExample>& list = cause_examples[name];
    std::stable_sort(list.begin(), list.end(), [](const CauseExample& a, const CauseExample& b) {
      return a.seconds > b.seconds;
    });
    if (static_cast<int>(list.size()) > examples) list.resize(static_cast<size_t>(examples));
    cause.examples = list;
    report.causes.push_back(std::move(cause));
  }
  std::stable_sort(report.causes.begin(), report.causes.end(),
                   [](const Cause& a, const Cause& b) { return a.seconds > b.seconds; });
  for (const auto& [key, seconds] : hot_total)
    report.hot_experts.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), seconds});
  std::stable_sort(
      report.hot_experts.begin(), report.hot_experts.end(),
      [](const HotExpertTime& a, const HotExpertTime& b) { return a.seconds > b.seconds; });
  return report;
}

std::string tail_table(const TailReport& report) {
  std::ostringstream out;
  out << report.slow_ids.size() << " of " << report.window_requests << " requests at or above p"
      << report.percentile << " e2e (" << fixed(report.threshold_s * 1e3, 1) << " ms); "
      << report.window_steps << " steps in the window, median step "
      << fixed(report.median_step_s * 1e3, 3) << " ms; slow requests' total "
      << fixed(report.total_s, 3) << " s\n";
  out << std::left << std::setw(4) << "#" << std::setw(32) << "cause" << std::right << std::setw(12)
      << "seconds" << std::setw(8) << "share"
      << "  examples (id:s)\n";
  int rank = 0;
  for (const Cause& cause : report.causes) {
    std::string examples;
    for (const CauseExample& e : cause.examples)
      examples += (examples.empty() ? "" : " ") + e.request_id + ":" + fixed(e.seconds, 3);
    out << std::left << std::setw(4) << ++rank << std::setw(32) << cause.name << std::right
        << std::setw(12) << fixed(cause.seconds, 4) << std::setw(7) << fixed(cause.share * 100, 1)
        << "%  " << examples << "\n";
  }
  if (!report.hot_experts.empty()) {
    out << "hot experts (layer/expert@rank:s):";
    for (size_t i = 0; i < std::min<size_t>(5, report.hot_experts.size()); ++i) {
      const HotExpertTime& h = report.hot_experts[i];
      out << " L" << h.layer << "/E" << h.expert << "@" << h.rank << ":" << fixed(h.seconds, 4);
    }
    out << "\n";
  }
  return out.str();
}

json tail_report_json(const TailReport& report) {
  json causes = json::array(), hot = json::array();
  for (const Cause& cause : report.causes) {
    json examples = json::array();
    for (const CauseExample& e : cause.examples)
      examples.push_back({{"id", e.request_id}, {"seconds", e.seconds}});
    causes.push_back({{"cause", cause.name},
                      {"seconds", cause.seconds},
                      {"share", cause.share},
                      {"examples", examples}});
  }
  for (const HotExpertTime& h : report.hot_experts)
    hot.push_back(
        {{"layer", h.layer}, {"expert", h.expert}, {"rank", h.rank}, {"seconds", h.seconds}});
  return {{"percentile", report.percentile},
          {"threshold_s", report.threshold_s},
          {"median_step_s", report.median_step_s},
          {"window_requests", report.window_requests},
          {"window_steps", report.window_steps},
          {"slow_ids", report.slow_ids},
          {"total_s", report.total_s},
          {"causes", causes},
          {"hot_experts", hot},
          {"per_request", report.per_request}};
}

}  // namespace clients

// ---- commands ----

namespace {

using clients::UsageError;
using json = nlohmann::json;

const char kBenchUsage[] =
    "usage: keel bench serve --url URL (--rate R [--burstiness B] [--concurrency C] |\n"
    "                        --concurrency C) --num-prompts N --input-len DIST --output-len DIST\n"
    "                        [--dataset JSONL] [--seed S] [--goodput ttft:MS tpot:MS e2el:MS]\n"
    "                        [--save-json F] [--plot PNG] [--model M] [--endpoint PATH]\n"
    "                        [--ignore-eos] [--vocab N] [--timeout S] [--progress]\n"
    "  DIST is L or MIN:MAX (uniform). With --rate, --concurrency caps requests in flight.\n";
const char kExpertsUsage[] = "usage: keel experts --url URL [--top N] [--png FILE] [--json]\n";
const char kProfileUsage[] =
    "usage: keel profile tail --url URL [--percentile 99] [--limit 500] [--examples 3]\n"
    "                         [--save F] [--json]\n";

// Where options start: after argv[1] (the command word) and, for commands with subcommands,
// after the expected subcommand in argv[2].
int options_start(int argc, char** argv, const char* subcommand) {
  if (!subcommand) return 2;
  if (argc < 3 || std::string(argv[2]) != subcommand)
    throw UsageError(std::string("expected '") + subcommand + "' after '" +
                     (argc > 1 ? argv[1] : "") + "'");
  return 3;
}

}  // namespace

int bench_serve_command(int argc, char** argv) {
  loadgen::LoadSpec spec;
  std::string input_len, output_len, save, plot;
  int concurrency = 1;
  std::vector<std::string> goodput;
  flags::FlagSet flags("keel bench serve", kBenchUsage);
  flags.add_string("--url", &spec.url, "URL", "the server").required();
  flags.add_double("--rate", &spec.request_rate, "R", "open loop: requests/s");
  flags.add_double("--burstiness", &spec.burstiness, "B", "with --rate: gamma shape");
  flags.add_int("--concurrency", &concurrency, "C", "closed-loop workers, or in-flight cap");
  flags.add_int("--num-prompts", &spec.num_prompts, "N", "requests").required();
  flags.add_string("--input-len", &input_len, "DIST", "prompt tokens: L or MIN:MAX");
  flags.add_string("--output-len", &output_len, "DIST", "output tokens: L or MIN:MAX");
  flags.add_string("--dataset", &spec.dataset, "JSONL", "prompts and output lengths");
  flags.add_int("--seed", &spec.seed, "S", "request plan seed");
  flags.add_words("--goodput", &goodput, "KEY:MS", "SLOs: ttft:MS tpot:MS e2el:MS");
  flags.add_string("--save-json", &save, "F", "vLLM-style result file");
  flags.add_string("--plot", &plot, "PNG", "latency CDF (python3 + matplotlib)");
  flags.add_string("--model", &spec.model, "M", "model name sent");
  flags.add_string("--endpoint", &spec.endpoint, "PATH", "completions endpoint");
  flags.add_switch("--ignore-eos", &spec.ignore_eos, "exact output lengths");
  flags.add_int("--vocab", &spec.vocab_hint, "N", "prompt token ids below N");
  flags.add_double("--timeout", &spec.request_timeout_s, "S", "per-request timeout");
  flags.add_switch("--progress", &spec.progress, "progress on stderr (default when a tty)");
  return clients::guarded("bench serve", flags, [&] {
    if (!flags.parse(argc, argv, options_start(argc, argv, "serve"))) {
      std::cout << flags.help();
      return 0;
    }
    if (!flags.given("--rate") && !flags.given("--concurrency"))
      throw UsageError("one of --rate or --concurrency is required");
    spec.url = clients::trim_slash(spec.url);
    if (flags.given("--rate") && !(spec.request_rate > 0)) throw UsageError("--rate must be > 0");
    if (!(spec.burstiness > 0)) throw UsageError("--burstiness must be > 0");
    if (flags.given("--burstiness") && !flags.given("--rate"))
      throw UsageError("--burstiness needs --rate (it shapes open-loop arrivals)");
    if (flags.given("--concurrency")) {
      if (concurrency < 1) throw UsageError("--concurrency must be >= 1");
      if (spec.request_rate > 0) {
        spec.max_workers = concurrency;  // vLLM's --max-concurrency with a rate
      } else {
        spec.concurrency = concurrency;
      }
    }
    if (spec.num_prompts < 1) throw UsageError("--num-prompts N (>= 1) is required");
    if (spec.dataset.empty() && (!flags.given("--input-len") || !flags.given("--output-len")))
      throw UsageError("--input-len and --output-len are required without --dataset");
    if (flags.given("--input-len"))
      std::tie(spec.input_len_min, spec.input_len_max) = clients::parse_length_range(input_len);
    if (flags.given("--output-len"))
      std::tie(spec.output_len_min, spec.output_len_max) = clients::parse_length_range(output_len);
    spec.progress = spec.progress || ::isatty(STDERR_FILENO);
    loadgen::Slo slo = loadgen::parse_slo(goodput);

    loadgen::LoadResult result = loadgen::run_load(spec);
    result.summary = loadgen::summarize(result.records, result.summary.duration_s, slo);
    std::cout << "Traffic request rate: "
              << (spec.request_rate > 0 ? std::to_string(spec.request_rate) : "inf") << "\n"
              << "Burstiness factor: " << spec.burstiness
              << (spec.burstiness == 1.0 ? " (Poisson process)" : " (gamma arrivals)") << "\n"
              << "Maximum request concurrency: "
              << (spec.request_rate > 0 ? std::to_string(spec.max_workers)
                                        : std::to_string(spec.concurrency))
              << "\n"
              << loadgen::summary_table(result.summary, "Serving Benchmark Result");

    // vLLM's --save-result layout: run facts, the metrics, then the per-request arrays.
    json out = {{"date",
                 [] {
                   char text[32];
                   std::time_t now = std::time(nullptr);
                   std::strftime(text, sizeof text, "%Y%m%d-%H%M%S", std::localtime(&now));
                   return std::string(text);
                 }()},
                {"backend", "openai"},
                {"model_id", spec.model},
                {"num_prompts", spec.num_prompts},
                {"request_rate", spec.request_rate > 0 ? json(spec.request_rate) : json("inf")},
                {"burstiness", spec.burstiness},
                {"max_concurrency", spec.request_rate > 0 ? spec.max_workers : spec.concurrency}};
    if (slo.any()) {
      json config = json::object();
      if (slo.ttft_ms) config["ttft"] = *slo.ttft_ms;
      if (slo.tpot_ms) config["tpot"] = *slo.tpot_ms;
      if (slo.e2el_ms) config["e2el"] = *slo.e2el_ms;
      out["goodput_config"] = config;
    }
    out.update(loadgen::summary_json(result.summary));
    json per_request = loadgen::records_json(result.records);
    out["summary_errors"] = out["errors"];  // summary's distinct texts; "errors" is per request
    out.update(per_request);
    out["load"] = loadgen::spec_json(spec);

    std::optional<clients::TempFile> temp;
    if (!save.empty()) {
      clients::write_file(save, out.dump(2) + "\n");
      std::cerr << "keel bench serve: wrote " << save << "\n";
    }
    if (flags.given("--plot")) {
      if (save.empty()) {
        temp.emplace();
        clients::write_file(temp->path, out.dump() + "\n");
      }
      clients::run_plot("plot_latency_cdf.py", save.empty() ? temp->path : save, plot);
      std::cerr << "keel bench serve: wrote " << plot << "\n";
    }
    return result.summary.completed > 0 ? 0 : 1;
  });
}

int experts_command(int argc, char** argv) {
  std::string url, png;
  int top = 4;
  bool as_json = false;
  flags::FlagSet flags("keel experts", kExpertsUsage);
  flags.add_string("--url", &url, "URL", "the server").required();
  flags.add_int("--top", &top, "N", "hottest and slowest experts per layer");
  flags.add_string("--png", &png, "FILE", "heatmap (python3 + matplotlib)");
  flags.add_switch("--json", &as_json, "JSON on stdout");
  return clients::guarded("experts", flags, [&] {
    if (!flags.parse(argc, argv, options_start(argc, argv, nullptr))) {
      std::cout << flags.help();
      return 0;
    }
    if (top < 1) throw UsageError("--top must be >= 1");
    json telemetry = clients::get_json(clients::trim_slash(url) + "/v1/telemetry/experts");
    std::vector<clients::LayerRow> rows = clients::expert_rows(telemetry, top);
    if (as_json) {
      std::cout << json{{"telemetry", telemetry}, {"layers", clients::expert_rows_json(rows)}}.dump(
                       2)
                << "\n";
    } else {
      std::cout << clients::experts_table(telemetry, rows);
    }
    if (flags.given("--png")) {
      clients::TempFile temp;
      clients::write_file(temp.path, telemetry.dump() + "\n");
      clients::run_plot("plot_expert_heatmap.py", temp.path, png);
      std::cerr << "keel experts: wrote " << png << "\n";
    }
    return 0;
  });
}

int profile_command(int argc, char** argv) {
  std::string url, save;
  double percentile = 99.0;
  int limit = 500, examples = 3;
  bool as_json = false;
  flags::FlagSet flags("keel profile tail", kProfileUsage);
  flags.add_string("--url", &url, "URL", "the server").required();
  flags.add_double("--percentile", &percentile, "P", "requests slower than this percentile")
      .range(0, 100);
  flags.add_int("--limit", &limit, "N", "most recent finished requests read").at_least(1);
  flags.add_int("--examples", &examples, "N", "slowest requests shown");
  flags.add_string("--save", &save, "F", "requests, steps and report as JSON");
  flags.add_switch("--json", &as_json, "JSON on stdout");
  return clients::guarded("profile tail", flags, [&] {
    if (!flags.parse(argc, argv, options_start(argc, argv, "tail"))) {
      std::cout << flags.help();
      return 0;
    }
    std::string base = clients::trim_slash(url);
    json requests =
        clients::get_json(base + "/v1/telemetry/requests?limit=" + std::to_string(limit));
    if (!requests.contains("requests") || !requests["requests"].is_array())
      throw std::runtime_error("telemetry requests: missing \"requests\" list");
    if (requests["requests"].empty())
      throw std::runtime_error("the server reports no finished requests yet");
    // The steps of the whole window: its median step is the baseline slow steps are judged by.
    int64_t first = std::numeric_limits<int64_t>::max(), last = -1;
    for (const json& r : requests["requests"]) {
      if (r.contains("first_step") && r["first_step"].is_number_integer() &&
          r["first_step"].get<int64_t>() >= 0)
        first = std::min(first, r["first_step"].get<int64_t>());
      if (r.contains("last_step") && r["last_step"].is_number_integer())
        last = std::max(last, r["last_step"].get<int64_t>());
    }
    json steps = json{{"steps", json::array()}};
    if (last >= 0 && first <= last)
      steps = clients::get_json(base + "/v1/telemetry/steps?first=" + std::to_string(first) +
                                "&last=" + std::to_string(last));
    clients::TailReport report = clients::analyze_tail(requests, steps, percentile, examples);
    json report_json = clients::tail_report_json(report);
    if (as_json) {
      std::cout << report_json.dump(2) << "\n";
    } else {
      std::cout << clients::tail_table(report);
    }
    if (flags.given("--save")) {
      json saved = {{"url", base},
                    {"requests", requests["requests"]},
                    {"steps", steps.value("steps", json::array())},
                    {"report", report_json}};
      clients::write_file(save, saved.dump(2) + "\n");
      std::cerr << "keel profile tail: wrote " << save << "\n";
    }
    return 0;
  });
}

}  // namespace keel
