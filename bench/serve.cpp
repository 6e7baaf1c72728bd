// bench/serve: serving benchmark over HTTP with keel_loadgen (vLLM benchmark_serving metrics).
//
// Two modes:
//  - --url URL: one load (closed loop --concurrency C, or open loop --rate R) against a server
//    that is already running; prints a table and one JSON object.
//  - --keel BINARY --config-fast F1 --config-invariant F2: the cost of batch invariance. For
//    each config, starts `BINARY serve --config F --port 0` as a child, takes the URL from the
//    "listening on http://HOST:PORT" line it prints, runs the load at each concurrency of
//    --concurrency-list, then SIGTERMs it and requires exit status 0. Both servers run in this
//    one process invocation, one after the other (never together: each may need the whole
//    machine), so the batch_invariant/fast throughput ratio compares like with like even when
//    absolute figures drift between runs on a shared machine.
// Exit status: 0 if every request succeeded (and every child exited 0), 1 otherwise, 2 on a
// usage or start-up error.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/loadgen/loadgen.h"
#include "bench/machine.h"

namespace {

using keel::loadgen::LoadSpec;
using nlohmann::json;

struct Options {
  LoadSpec spec;
  bool json_only = false;
  bool num_prompts_set = false;
  bool ignore_eos_set = false;
  // Server mode.
  std::string keel_binary;
  std::string config_fast;
  std::string config_invariant;
  std::vector<int> concurrency_list = {1, 8, 32};
  std::vector<std::string> server_args;  // appended to `serve --config F --port 0`
  double startup_timeout_s = 600;
  int warmup = 2;  // requests sent to each fresh server before measuring, not reported
};

std::vector<int> parse_list(const std::string& text) {
  std::vector<int> values;
  size_t start = 0;
  while (start < text.size()) {
    size_t comma = text.find(',', start);
    values.push_back(std::stoi(text.substr(start, comma - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return values;
}

// "L" (fixed) or "MIN:MAX" (uniform).
void parse_range(const std::string& text, int& lo, int& hi) {
  size_t colon = text.find(':');
  lo = std::stoi(text.substr(0, colon));
  hi = colon == std::string::npos ? lo : std::stoi(text.substr(colon + 1));
}

const char* kUsage =
    "usage:\n"
    "  serve --url http://HOST:PORT [--concurrency C | --rate R] [load flags]\n"
    "  serve --keel PATH --config-fast F1 --config-invariant F2 [--concurrency-list 1,8,32]\n"
    "        [--server-arg ARG]... [--startup-timeout S] [--warmup N] [load flags]\n"
    "load flags: --num-prompts N (default max(4*C, 16)) --input-len L|MIN:MAX (64)\n"
    "  --output-len L|MIN:MAX (64) --endpoint /v1/completions --model NAME --vocab N (1000)\n"
    "  --seed S --temperature T --no-stream --ignore-eos | --no-ignore-eos --max-workers N\n"
    "  --timeout S --json\n"
    "--ignore-eos (\"ignore_eos\": true, exact output lengths) is the default with --keel: both\n"
    "modes then do the same work, and the output token counts are checked.\n";

Options parse_options(int argc, char** argv) {
  Options options;
  options.spec.url.clear();
  options.spec.input_len_min = options.spec.input_len_max = 64;
  options.spec.output_len_min = options.spec.output_len_max = 64;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("flag " + flag + " needs a value");
      return argv[++i];
    };
    LoadSpec& spec = options.spec;
    if (flag == "--url") {
      spec.url = value();
    } else if (flag == "--endpoint") {
      spec.endpoint = value();
    } else if (flag == "--model") {
      spec.model = value();
    } else if (flag == "--concurrency") {
      spec.concurrency = std::stoi(value());
      spec.request_rate = 0;
    } else if (flag == "--rate") {
      spec.request_rate = std::stod(value());
    } else if (flag == "--max-workers") {
      spec.max_workers = std::stoi(value());
    } else if (flag == "--num-prompts") {
      spec.num_prompts = std::stoi(value());
      options.num_prompts_set = true;
    } else if (flag == "--input-len") {
      parse_range(value(), spec.input_len_min, spec.input_len_max);
    } else if (flag == "--output-len") {
      parse_range(value(), spec.output_len_min, spec.output_len_max);
    } else if (flag == "--vocab") {
      spec.vocab_hint = std::stoi(value());
    } else if (flag == "--seed") {
      spec.seed = std::stoull(value());
    } else if (flag == "--temperature") {
      spec.temperature = std::stod(value());
    } else if (flag == "--no-stream") {
      spec.stream = false;
    } else if (flag == "--ignore-eos") {
      spec.ignore_eos = true;
      options.ignore_eos_set = true;
    } else if (flag == "--no-ignore-eos") {
      spec.ignore_eos = false;
      options.ignore_eos_set = true;
    } else if (flag == "--timeout") {
      spec.request_timeout_s = std::stod(value());
    } else if (flag == "--json") {
      options.json_only = true;
    } else if (flag == "--keel") {
      options.keel_binary = value();
    } else if (flag == "--config-fast") {
      options.config_fast = value();
    } else if (flag == "--config-invariant") {
      options.config_invariant = value();
    } else if (flag == "--concurrency-list") {
      options.concurrency_list = parse_list(value());
    } else if (flag == "--server-arg") {
      options.server_args.push_back(value());
    } else if (flag == "--startup-timeout") {
      options.startup_timeout_s = std::stod(value());
    } else if (flag == "--warmup") {
      options.warmup = std::stoi(value());
    } else if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  bool server_mode = !options.keel_binary.empty();
  if (server_mode == !options.spec.url.empty())
    throw std::invalid_argument("give exactly one of --url and --keel");
  if (server_mode && (options.config_fast.empty() || options.config_invariant.empty()))
    throw std::invalid_argument("--keel needs --config-fast and --config-invariant");
  if (server_mode && options.concurrency_list.empty())
    throw std::invalid_argument("--concurrency-list is empty");
  // keel honours ignore_eos; without it the two modes could stop at different EOS tokens and
  // the throughput ratio would compare different amounts of work.
  if (server_mode && !options.ignore_eos_set) options.spec.ignore_eos = true;
  return options;
}

int default_num_prompts(int concurrency) {
  return std::max(4 * concurrency, 16);
}

void print_table(const Options& options, const std::string& text) {
  (options.json_only ? std::cerr : std::cout) << text << std::flush;
}

json machine_json() {
  return {{"name", keel::bench::machine_name()},
          {"load_average_1m", keel::bench::one_minute_load_average()}};
}

int run_against_url(const Options& options) {
  LoadSpec spec = options.spec;
  if (!options.num_prompts_set)
    spec.num_prompts = default_num_prompts(spec.request_rate > 0 ? 1 : spec.concurrency);
  keel::loadgen::LoadResult result = keel::loadgen::run_load(spec);
  std::ostringstream title;  // operator<< prints 50, not std::to_string's 50.000000
  if (spec.request_rate > 0) {
    title << "rate " << spec.request_rate << " req/s";
  } else {
    title << "concurrency " << spec.concurrency;
  }
  print_table(options, keel::loadgen::summary_table(result.summary, title.str()));
  json report = {{"benchmark", "serve"},
                 {"machine", machine_json()},
                 {"load", keel::loadgen::spec_json(spec)},
                 {"result", keel::loadgen::summary_json(result.summary)}};
  std::cout << report.dump(2) << std::endl;
  return result.summary.failed == 0 ? 0 : 1;
}

int run_with_servers(const Options& options) {
  struct Mode {
    std::string name;
    std::string config;
  };
  const std::vector<Mode> modes = {{"fast", options.config_fast},
                                   {"batch_invariant", options.config_invariant}};
  json report = {{"benchmark", "serve"}, {"machine", machine_json()}};
  report["keel"] = options.keel_binary;
  report["concurrency_list"] = options.concurrency_list;
  bool ok = true;
  std::map<std::string, std::map<int, double>> throughput;  // mode -> concurrency -> tok/s
  for (const Mode& mode : modes) {
    std::vector<std::string> argv = {options.keel_binary, "serve",  "--config",
                                     mode.config,         "--port", "0"};
    argv.insert(argv.end(), options.server_args.begin(), options.server_args.end());
    keel::loadgen::ServerProcess server(argv);
    std::string url = server.start(
        std::chrono::milliseconds(static_cast<int64_t>(options.startup_timeout_s * 1000)));
    std::cerr << "bench/serve: " << mode.name << " server at " << url << "\n";
    json server_json = {{"config", mode.config}, {"url", url}};
    try {
      if (options.warmup > 0) {
        // The first requests pay one-time costs (page faults in the weights, allocator
        // growth) that belong to neither mode's steady state.
        LoadSpec warmup = options.spec;
        warmup.url = url;
        warmup.request_rate = 0;
        warmup.concurrency = 1;
        warmup.num_prompts = options.warmup;
        warmup.seed = options.spec.seed + 1000003;
        keel::loadgen::LoadResult result = keel::loadgen::run_load(warmup);
        if (result.summary.failed > 0)
          std::cerr << "bench/serve: warm-up failures: " << result.summary.errors.front() << "\n";
      }
      for (int concurrency : options.concurrency_list) {
        LoadSpec spec = options.spec;
        spec.url = url;
        spec.request_rate = 0;
        spec.concurrency = concurrency;
        if (!options.num_prompts_set) spec.num_prompts = default_num_prompts(concurrency);
        keel::loadgen::LoadResult result = keel::loadgen::run_load(spec);
        print_table(options,
                    keel::loadgen::summary_table(result.summary, mode.name + ", concurrency " +
                                                                     std::to_string(concurrency)));
        json entry = keel::loadgen::summary_json(result.summary);
        entry["mode"] = mode.name;
        entry["concurrency"] = concurrency;
        entry["num_prompts"] = spec.num_prompts;
        if (spec.ignore_eos) {
          // Every request must have produced exactly its max_tokens.
          int64_t expected = 0;
          for (const auto& planned : keel::loadgen::plan_requests(spec))
            expected += planned.max_tokens;
          bool exact = result.summary.failed == 0 && result.summary.total_output_tokens == expected;
          entry["exact_output_lengths"] = exact;
          if (!exact) {
            std::cerr << "bench/serve: " << mode.name << " c=" << concurrency << ": "
                      << result.summary.total_output_tokens << " output tokens, expected "
                      << expected << "\n";
            ok = false;
          }
        }
        report["results"].push_back(entry);
        throughput[mode.name][concurrency] = result.summary.output_throughput;
        if (result.summary.failed > 0) ok = false;
      }
    } catch (...) {
      server.stop(std::chrono::milliseconds(30000));
      throw;
    }
    int status = server.stop(std::chrono::milliseconds(60000));
    server_json["exit_status"] = status;
    report["servers"][mode.name] = server_json;
    if (status != 0) {
      std::cerr << "bench/serve: " << mode.name << " server exited with status " << status << "\n";
      ok = false;
    }
  }
  json ratios = json::object();
  for (int concurrency : options.concurrency_list) {
    double fast = throughput["fast"][concurrency];
    double invariant = throughput["batch_invariant"][concurrency];
    ratios[std::to_string(concurrency)] = fast > 0 ? json(invariant / fast) : json(nullptr);
  }
  report["batch_invariant_over_fast_output_throughput"] = ratios;
  LoadSpec load = options.spec;
  load.url.clear();
  report["load"] = keel::loadgen::spec_json(load);
  report["load"].erase("url");  // one per server, under "servers"
  report["load"]["concurrency"] = options.concurrency_list;
  report["load"]["num_prompts"] =
      options.num_prompts_set ? json(options.spec.num_prompts) : json("max(4*concurrency, 16)");
  report["ok"] = ok;
  std::cout << report.dump(2) << std::endl;
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "bench/serve: " << error.what() << "\n" << kUsage;
    return 2;
  }
  try {
    return options.keel_binary.empty() ? run_against_url(options) : run_with_servers(options);
  } catch (const std::exception& error) {
    std::cerr << "bench/serve: error: " << error.what() << "\n";
    return 2;
  }
}
