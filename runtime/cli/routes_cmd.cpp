// `keel routes diff|stats|replay` (routes_cmd.h).
//
// Design note. Thin: parse flags, read the files with RoutingReader, call the pure analyses and
// print either the JSON renderer's output (one object on stdout, for scripts) or the text
// tables. Stats use the placement the header names when it can be computed from the header
// (contiguous, round_robin), so rank balance comes for free on ordinary runs.
#include "runtime/cli/routes_cmd.h"

#include <algorithm>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/cli/flags.h"
#include "runtime/routing/routing_file.h"
#include "runtime/tools/routing_analysis/analysis.h"
#include "scheduler/placement.h"

namespace keel {
namespace {

constexpr const char* kRoutesUsage = R"(usage:
  keel routes diff A B [--json]
      Compare two routing files request by request (paired by request_id, else by order):
      first divergence (request, position, layer, both sides' experts and margins), expert-set
      flips, slot-order-only and score-only differences per layer, requests whose outputs differ.
      Exit 0 identical, 1 differs, 2 error.
  keel routes stats FILE [--epsilon 1e-4] [--top-pairs 10] [--json]
      Per-layer expert load and balance (and per-rank balance for contiguous / round_robin
      placements), most co-activated expert pairs, near-tie rate (margin < epsilon) and margin
      percentiles. Exit 0, or 2 on error.
  keel routes placement FILE [--tp N]
      A balanced expert placement from the file's routed tokens (longest processing time
      first, ceil(E / tp) experts per rank): YAML for a deployment or serve config
      (placement: explicit, explicit_placement: one list per layer) on stdout, with each
      layer's busiest-rank tokens under round_robin and balanced as comments. Exit 0, or 2.
  keel routes replay ...
      Provided by the engine (see keel routes replay --help).
)";

constexpr const char* kReplayMessage =
    "keel routes replay: replay is provided by the engine (see keel routes replay --help)\n";

struct Args {
  std::vector<std::string> positional;
  bool json = false;
  double epsilon = 1e-4;
  size_t top_pairs = 10;
  int tp = 0;         // placement: 0 = the file's tp
  bool help = false;  // --help was given (and the help printed)
};

// Flags after `keel routes SUB`; the files are positionals.
Args parse_args(int argc, char** argv, int first, const std::string& sub) {
  Args args;
  flags::FlagSet flags("keel routes " + sub, kRoutesUsage);
  flags.add_positionals(&args.positional, "FILE");
  flags.add_switch("--json", &args.json, "one JSON object on stdout");
  flags.add_double("--epsilon", &args.epsilon, "E", "stats: near-tie margin");
  flags.add_int("--top-pairs", &args.top_pairs, "N", "stats: co-activated pairs shown");
  flags.add_int("--tp", &args.tp, "N", "placement: ranks (default: the file's tp)").range(0, 64);
  if (!flags.parse(argc, argv, first)) {
    std::cout << flags.help();
    args.help = true;
  }
  return args;
}

int run_diff(const Args& args) {
  if (args.positional.size() != 2) throw_error("diff wants two files (keel routes diff A B)");
  const RoutingFile a = read_routing_file(args.positional[0]);
  const RoutingFile b = read_routing_file(args.positional[1]);
  const RoutingDiff diff = diff_routing(a, b);
  if (args.json) {
    nlohmann::json out = routing_diff_to_json(diff);
    out["a"] = args.positional[0];
    out["b"] = args.positional[1];
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << "a: " << args.positional[0] << "\nb: " << args.positional[1] << "\n"
              << render_routing_diff_text(diff);
  }
  return diff.identical() ? 0 : 1;
}

int run_stats(const Args& args) {
  if (args.positional.size() != 1) throw_error("stats wants one file (keel routes stats FILE)");
  const RoutingFile file = read_routing_file(args.positional[0]);
  RoutingStatsOptions options;
  options.expert_ranks = placement_from_header(file.header);
  options.top_pairs = args.top_pairs;
  const RoutingStats stats = routing_stats(file, args.epsilon, options);
  if (args.json) {
    nlohmann::json out = routing_stats_to_json(stats);
    out["file"] = args.positional[0];
    out["model"] = file.header.model;
    out["placement"] = file.header.placement;
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << "file: " << args.positional[0] << " (model " << file.header.model << ", "
              << file.header.reduce << ", placement " << file.header.placement << ", tp "
              << file.header.tp << ")\n"
              << render_routing_stats_text(stats);
  }
  return 0;
}

int run_placement(const Args& args) {
  if (args.positional.size() != 1)
    throw_error("placement wants one file (keel routes placement FILE)");
  const RoutingFile file = read_routing_file(args.positional[0]);
  const int tp = args.tp > 0 ? args.tp : static_cast<int>(file.header.tp);
  if (tp < 1) throw_error("placement: the file names no tp; pass --tp N");
  const RoutingStats stats = routing_stats(file, args.epsilon);
  // The load was seen under the file's placement, but the comparison is with round_robin,
  // the placement a balanced one replaces by default.
  std::vector<LayerLoad> layers;
  for (const LayerRoutingStats& layer : stats.layers) {
    LayerLoad load{layer.layer, layer.expert_tokens, {}};
    for (size_t e = 0; e < layer.expert_tokens.size(); ++e)
      load.current_ranks.push_back(static_cast<int>(e % static_cast<size_t>(tp)));
    layers.push_back(std::move(load));
  }
  std::cout << "# current = round_robin\n"
            << balanced_placement_file(
                   layers, file.header.num_layers, file.header.num_experts, tp,
                   args.positional[0] + " (" + std::to_string(stats.num_tokens) + " tokens)");
  return 0;
}

}  // namespace

int routes_command(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << kRoutesUsage;
    return 2;
  }
  const std::string sub = argv[2];
  if (sub == "--help" || sub == "-h" || sub == "help") {
    std::cout << kRoutesUsage;
    return 0;
  }
  if (sub == "replay") {
    std::cerr << kReplayMessage;
    return 2;
  }
  try {
    const Args args = parse_args(argc, argv, 3, sub);
    if (args.help) return 0;
    if (sub == "diff") return run_diff(args);
    if (sub == "stats") return run_stats(args);
    if (sub == "placement") return run_placement(args);
    std::cerr << "keel routes: unknown subcommand '" << sub << "'\n" << kRoutesUsage;
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "keel routes " << sub << ": error: " << error.what() << "\n";
    return 2;
  }
}

}  // namespace keel
