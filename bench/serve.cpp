// bench/serve: serving benchmark over HTTP with keel_loadgen (vLLM benchmark_serving metrics).
//
// Two modes:
//  - --url URL: one load (closed loop --concurrency C, or open loop --rate R) against a server
//    that is already running; prints a table and one JSON object.
//  - --keel BINARY --config-fast F1 --config-invariant F2: the cost of batch invariance. Starts
//    `BINARY serve --config F --port 0` as a child for each config, both up front, taking each
//    URL from the "listening on http://HOST:PORT" line it prints, and keeps both alive to the
//    end (an idle keel server costs next to nothing; loads never overlap). After --warmup
//    requests to each, for each concurrency C of --concurrency-list it runs --rounds R rounds;
//    a round is one closed-loop load against each server, back to back, fast first in even
//    rounds and batch_invariant first in odd ones (ABBA, loadgen::abba_schedule), every load
//    with the same request plan (same seed). On a shared machine whose speed drifts, each
//    per-round ratio pairs two runs taken moments apart and the drift cancels, where running
//    all of one server's loads before the other's let the drift dominate the ratio. Finally
//    SIGTERMs both servers and requires exit status 0 from each. Progress (one line per run)
//    and a table of medians go to stdout, or to stderr with --json.
//    JSON keys (besides "benchmark", "machine", "keel", "load", "servers", "ok"):
//      "concurrency_list", "rounds";
//      "results": one entry per load run: summary_json (vLLM names) plus "mode",
//        "concurrency", "round" (0-based), "position" (0 = first of its round, 1 = second),
//        "num_prompts" and, with ignore_eos, "exact_output_lengths";
//      "medians": one entry per (mode, concurrency): "mode", "concurrency", "rounds" and the
//        median over rounds of "output_throughput", "request_throughput", "median_ttft_ms",
//        "p99_ttft_ms", "median_itl_ms", "p99_itl_ms" (each the median of that key's
//        per-round values in "results");
//      "batch_invariant_over_fast_output_throughput": {"C": median over rounds of the round's
//        batch_invariant/fast output_throughput ratio} (null if no round had a fast figure);
//      "batch_invariant_over_fast_output_throughput_rounds": {"C": [ratio of round 0, 1, ...]}.
// Exit status: 0 if every request succeeded (and every child exited 0), 1 otherwise, 2 on a
// usage or start-up error.
#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bench/machine.h"
#include "runtime/cli/client_cmds.h"
#include "runtime/cli/flags.h"
#include "runtime/tools/loadgen/loadgen.h"

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
  int rounds = 3;  // ABBA rounds per concurrency
};

const char* kUsage =
    "usage (serve --help lists every flag):\n"
    "  serve --url http://HOST:PORT [--concurrency C | --rate R] [load flags]\n"
    "  serve --keel PATH --config-fast F1 --config-invariant F2 [--concurrency-list 1,8,32]\n"
    "        [--rounds R] [--server-arg ARG]... [--startup-timeout S] [--warmup N]\n"
    "        [load flags]\n"
    "--num-prompts defaults to max(4*C, 16). --ignore-eos (\"ignore_eos\": true, exact output\n"
    "lengths) is the default with --keel: both modes then do the same work, and the output\n"
    "token counts are checked.\n";

Options parse_options(int argc, char** argv) {
  Options options;
  LoadSpec& spec = options.spec;
  spec.url.clear();
  std::string input_len = "64", output_len = "64";
  keel::flags::FlagSet flags("bench/serve", kUsage);
  flags.add_string("--url", &spec.url, "URL", "a running server");
  flags.add_string("--endpoint", &spec.endpoint, "PATH", "completions endpoint");
  flags.add_string("--model", &spec.model, "NAME", "model name sent");
  // Order matters, as it always has: --concurrency after --rate switches to a closed loop.
  flags.add_int("--concurrency", &spec.concurrency, "C", "closed-loop workers")
      .at_least(1)
      .on_set([&] { spec.request_rate = 0; });
  flags.add_double("--rate", &spec.request_rate, "R", "open-loop requests/s").at_least(0);
  flags.add_int("--max-workers", &spec.max_workers, "N", "open loop: most in flight").at_least(0);
  flags.add_int("--num-prompts", &spec.num_prompts, "N", "requests per load")
      .at_least(1)
      .on_set([&] { options.num_prompts_set = true; });
  flags.add_string("--input-len", &input_len, "L|MIN:MAX", "prompt tokens");
  flags.add_string("--output-len", &output_len, "L|MIN:MAX", "output tokens");
  flags.add_int("--vocab", &spec.vocab_hint, "N", "prompt token ids below N").at_least(1);
  flags.add_int("--seed", &spec.seed, "S", "request plan seed");
  flags.add_double("--temperature", &spec.temperature, "T", "sampling temperature").at_least(0);
  flags.add_switch("--no-stream", &spec.stream, "non-streaming requests", false);
  flags.add_switch("--ignore-eos", &spec.ignore_eos, "exact output lengths").on_set([&] {
    options.ignore_eos_set = true;
  });
  flags.add_switch("--no-ignore-eos", &spec.ignore_eos, "stop at EOS", false).on_set([&] {
    options.ignore_eos_set = true;
  });
  flags.add_double("--timeout", &spec.request_timeout_s, "S", "per-request timeout").at_least(0);
  flags.add_switch("--json", &options.json_only, "only the JSON on stdout");
  flags.add_string("--keel", &options.keel_binary, "PATH", "server mode: the keel binary");
  flags.add_string("--config-fast", &options.config_fast, "F1", "server mode: fast config");
  flags.add_string("--config-invariant", &options.config_invariant, "F2",
                   "server mode: batch_invariant config");
  flags
      .add_int_list("--concurrency-list", &options.concurrency_list, "C,...",
                    "server mode: concurrencies")
      .at_least(1);
  flags.add_repeated("--server-arg", &options.server_args, "ARG",
                     "server mode: appended to `serve --config F --port 0`");
  flags.add_double("--startup-timeout", &options.startup_timeout_s, "S", "server start limit")
      .at_least(0);
  flags.add_int("--warmup", &options.warmup, "N", "unreported requests per server").at_least(0);
  flags.add_int("--rounds", &options.rounds, "R", "ABBA rounds per concurrency").at_least(1);
  flags.parse_or_exit(argc, argv);

  std::tie(spec.input_len_min, spec.input_len_max) = keel::clients::parse_length_range(input_len);
  std::tie(spec.output_len_min, spec.output_len_max) =
      keel::clients::parse_length_range(output_len);
  bool server_mode = !options.keel_binary.empty();
  if (server_mode == !options.spec.url.empty())
    throw std::invalid_argument("give exactly one of --url and --keel");
  if (server_mode && (options.config_fast.empty() || options.config_invariant.empty()))
    throw std::invalid_argument("--keel needs --config-fast and --config-invariant");
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

double median_of(std::vector<double> values) {
  return keel::loadgen::percentile(std::move(values), 50);
}

std::string format_fixed(double value, int precision) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(precision) << value;
  return out.str();
}

int run_with_servers(const Options& options) {
  using keel::loadgen::Summary;
  struct Mode {
    std::string name;
    std::string config;
  };
  // Arm 0 (A) and arm 1 (B) of the ABBA schedule.
  const std::vector<Mode> modes = {{"fast", options.config_fast},
                                   {"batch_invariant", options.config_invariant}};
  json report = {{"benchmark", "serve"}, {"machine", machine_json()}};
  report["keel"] = options.keel_binary;
  report["concurrency_list"] = options.concurrency_list;
  report["rounds"] = options.rounds;
  bool ok = true;

  std::vector<std::unique_ptr<keel::loadgen::ServerProcess>> servers;
  std::vector<std::string> urls;
  auto stop_all = [&](std::chrono::milliseconds timeout) {
    for (size_t arm = 0; arm < servers.size(); ++arm) {
      int status = servers[arm]->stop(timeout);
      report["servers"][modes[arm].name] = {{"config", modes[arm].config},
                                            {"url", arm < urls.size() ? urls[arm] : std::string()},
                                            {"exit_status", status}};
      if (status != 0) {
        std::cerr << "bench/serve: " << modes[arm].name << " server exited with status " << status
                  << "\n";
        ok = false;
      }
    }
    servers.clear();
  };

  std::ostringstream table;
  try {
    for (const Mode& mode : modes) {
      std::vector<std::string> argv = {options.keel_binary, "serve",  "--config",
                                       mode.config,         "--port", "0"};
      argv.insert(argv.end(), options.server_args.begin(), options.server_args.end());
      servers.push_back(std::make_unique<keel::loadgen::ServerProcess>(argv));
      urls.push_back(servers.back()->start(
          std::chrono::milliseconds(static_cast<int64_t>(options.startup_timeout_s * 1000))));
      std::cerr << "bench/serve: " << mode.name << " server at " << urls.back() << "\n";
    }
    for (size_t arm = 0; arm < modes.size() && options.warmup > 0; ++arm) {
      // The first requests pay one-time costs (page faults in the weights, allocator growth)
      // that belong to neither mode's steady state.
      LoadSpec warmup = options.spec;
      warmup.url = urls[arm];
      warmup.request_rate = 0;
      warmup.concurrency = 1;
      warmup.num_prompts = options.warmup;
      warmup.seed = options.spec.seed + 1000003;
      keel::loadgen::LoadResult result = keel::loadgen::run_load(warmup);
      if (result.summary.failed > 0 && !result.summary.errors.empty())
        std::cerr << "bench/serve: " << modes[arm].name
                  << " warm-up failures: " << result.summary.errors.front() << "\n";
    }

    json ratio_medians = json::object();
    json ratio_rounds = json::object();
    table << "medians over " << options.rounds << " ABBA round(s); ratio = batch_invariant/fast "
          << "output throughput, median of per-round ratios\n"
          << std::left << std::setw(16) << "mode" << std::right << std::setw(5) << "conc"
          << std::setw(11) << "out tok/s" << std::setw(8) << "req/s" << std::setw(10) << "TTFT med"
          << std::setw(10) << "TTFT p99" << std::setw(9) << "ITL med" << std::setw(9) << "ITL p99"
          << std::setw(8) << "ratio"
          << "  per-round ratios\n";
    for (int concurrency : options.concurrency_list) {
      LoadSpec spec = options.spec;
      spec.request_rate = 0;
      spec.concurrency = concurrency;
      if (!options.num_prompts_set) spec.num_prompts = default_num_prompts(concurrency);
      int64_t expected_output_tokens = 0;
      for (const auto& planned : keel::loadgen::plan_requests(spec))
        expected_output_tokens += planned.max_tokens;
      // summaries[arm][round]; a round's two runs share the plan (same spec, same seed).
      std::vector<std::vector<Summary>> summaries(modes.size(),
                                                  std::vector<Summary>(options.rounds));
      for (const keel::loadgen::ScheduledRun& run : keel::loadgen::abba_schedule(options.rounds)) {
        const Mode& mode = modes[run.arm];
        spec.url = urls[run.arm];
        keel::loadgen::LoadResult result = keel::loadgen::run_load(spec);
        const Summary& summary = result.summary;
        summaries[run.arm][run.round] = summary;
        print_table(options,
                    "bench/serve: c=" + std::to_string(concurrency) + " round " +
                        std::to_string(run.round) + " " + mode.name + ": " +
                        format_fixed(summary.output_throughput, 1) + " tok/s, TTFT med " +
                        format_fixed(summary.ttft_ms.median, 1) + " ms, ITL med " +
                        format_fixed(summary.itl_ms.median, 2) + " ms" +
                        (summary.failed > 0 ? ", " + std::to_string(summary.failed) + " failed"
                                            : std::string()) +
                        "\n");
        json entry = keel::loadgen::summary_json(summary);
        entry["mode"] = mode.name;
        entry["concurrency"] = concurrency;
        entry["round"] = run.round;
        entry["position"] = run.position;
        entry["num_prompts"] = spec.num_prompts;
        if (spec.ignore_eos) {
          // Every request must have produced exactly its max_tokens.
          bool exact = summary.failed == 0 && summary.total_output_tokens == expected_output_tokens;
          entry["exact_output_lengths"] = exact;
          if (!exact) {
            std::cerr << "bench/serve: " << mode.name << " c=" << concurrency << " round "
                      << run.round << ": " << summary.total_output_tokens
                      << " output tokens, expected " << expected_output_tokens << "\n";
            ok = false;
          }
        }
        report["results"].push_back(entry);
        if (summary.failed > 0) {
          std::cerr << "bench/serve: " << mode.name << " c=" << concurrency << " round "
                    << run.round << ": " << summary.failed << " failed, first error: "
                    << (summary.errors.empty() ? std::string() : summary.errors.front()) << "\n";
          ok = false;
        }
      }

      std::vector<double> ratios;
      json round_ratios = json::array();
      for (int round = 0; round < options.rounds; ++round) {
        double fast = summaries[0][round].output_throughput;
        double invariant = summaries[1][round].output_throughput;
        if (fast > 0) {
          ratios.push_back(invariant / fast);
          round_ratios.push_back(invariant / fast);
        } else {
          round_ratios.push_back(nullptr);
        }
      }
      std::string key = std::to_string(concurrency);
      ratio_medians[key] = ratios.empty() ? json(nullptr) : json(median_of(ratios));
      ratio_rounds[key] = round_ratios;

      for (size_t arm = 0; arm < modes.size(); ++arm) {
        auto median_over_rounds = [&](auto field) {
          std::vector<double> values;
          for (const Summary& summary : summaries[arm]) values.push_back(field(summary));
          return median_of(values);
        };
        json medians = {
            {"mode", modes[arm].name},
            {"concurrency", concurrency},
            {"rounds", options.rounds},
            {"output_throughput",
             median_over_rounds([](const Summary& s) { return s.output_throughput; })},
            {"request_throughput",
             median_over_rounds([](const Summary& s) { return s.request_throughput; })},
            {"median_ttft_ms",
             median_over_rounds([](const Summary& s) { return s.ttft_ms.median; })},
            {"p99_ttft_ms", median_over_rounds([](const Summary& s) { return s.ttft_ms.p99; })},
            {"median_itl_ms", median_over_rounds([](const Summary& s) { return s.itl_ms.median; })},
            {"p99_itl_ms", median_over_rounds([](const Summary& s) { return s.itl_ms.p99; })}};
        report["medians"].push_back(medians);
        table << std::left << std::setw(16) << modes[arm].name << std::right << std::setw(5)
              << concurrency << std::setw(11)
              << format_fixed(medians["output_throughput"].get<double>(), 1) << std::setw(8)
              << format_fixed(medians["request_throughput"].get<double>(), 2) << std::setw(10)
              << format_fixed(medians["median_ttft_ms"].get<double>(), 1) << std::setw(10)
              << format_fixed(medians["p99_ttft_ms"].get<double>(), 1) << std::setw(9)
              << format_fixed(medians["median_itl_ms"].get<double>(), 2) << std::setw(9)
              << format_fixed(medians["p99_itl_ms"].get<double>(), 2);
        if (arm == 1) {
          table << std::setw(8)
                << (ratios.empty() ? std::string("-") : format_fixed(median_of(ratios), 3)) << " ";
          for (const json& ratio : round_ratios)
            table << " "
                  << (ratio.is_null() ? std::string("-") : format_fixed(ratio.get<double>(), 3));
        }
        table << "\n";
      }
    }
    report["batch_invariant_over_fast_output_throughput"] = ratio_medians;
    report["batch_invariant_over_fast_output_throughput_rounds"] = ratio_rounds;
  } catch (...) {
    stop_all(std::chrono::milliseconds(30000));
    throw;
  }
  stop_all(std::chrono::milliseconds(60000));
  print_table(options, table.str());

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
