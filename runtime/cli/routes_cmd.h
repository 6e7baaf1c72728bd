// `keel routes ...`: inspect routing files (runtime/routing/routing_file.h).
//
// Design note. The subcommand lives in its own library (keel_routing_cli) with one entry point so
// the keel binary can dispatch to it (argv[1] == "routes") and tests can call it in-process with
// a fake argv. It never throws: errors are printed to stderr and turned into an exit code.
//
//   keel routes diff A B [--json]                     compare two routing files
//   keel routes stats FILE [--epsilon E] [--top-pairs N] [--json]
//   keel routes replay ...                            provided by the engine (exit 2 here)
//
// Exit codes (as diff(1) and cmp(1), so scripts can branch on them):
//   0  diff: routing identical; stats: done
//   1  diff: routing differs (set flips, order-only or score-only differences, row counts,
//      unpaired requests or different outputs; header-only differences do not count)
//   2  usage error, unreadable or corrupt file, or replay (not available in this library)
#pragma once

namespace keel {

// argv[0] is the program, argv[1] == "routes", argv[2] the subcommand.
int routes_command(int argc, char** argv);

}  // namespace keel
