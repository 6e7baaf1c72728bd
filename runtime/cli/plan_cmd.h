// `keel plan ...`: capacity planning for a model on a GPU server (runtime/tools/planning/).
//
// Design note. The subcommand lives in its own library (keel_planning_cli) with one entry point
// so the keel binary can dispatch to it (argv[1] == "plan") and tests can call it in-process with
// a fake argv. It never throws: errors are printed to stderr and turned into exit code 1.
//
//   keel plan --model M.yaml --hardware H.yaml --quant bf16|fp8|nvfp4|mxfp4|int4 --tp N
//             --context TOKENS [--kv-dtype bf16|fp8] [--prompt-len N] [--json]
//             [--efficiency-file F | --bw-eff X --compute-eff Y --layer-overhead-us Z
//              --allreduce-latency-us W]
//             [--gpus N] [--reserve-gib G] [--max-num-batched-tokens T] [--max-num-seqs S]
//             [--expert-imbalance F] [--attention-bf16]
//
// Exit codes: 0 the plan was computed (whether or not the model fits: the verdict is in the
// output), 1 usage error or invalid preset file.
#pragma once

namespace keel {

// argv[0] is the program, argv[1] == "plan".
int plan_command(int argc, char** argv);

}  // namespace keel
