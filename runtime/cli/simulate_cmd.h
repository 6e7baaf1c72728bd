// `keel simulate`: discrete-event simulation of serving over keel's real scheduler
// (runtime/tools/simulation/simulator.h has the model; cost_model.h the calibration file format).
//
// Design note. One entry point in its own library (keel_simulation_cli) so the keel binary
// dispatches to it (argv[1] == "simulate") and tests call it in-process with a fake argv. It
// never throws: errors go to stderr as "keel simulate: ..." and become exit code 2 (usage or
// bad input); 0 otherwise. With --sweep-rate the exit code is 0 whether or not a rate met the
// SLO (the answer is in the output).
//
//   keel simulate [--config SERVE.yaml] [--block-size N] [--num-kv-blocks N | --kv-block-bytes B]
//                 [--max-num-seqs N] [--max-num-batched-tokens N] [--max-waiting N]
//                 [--cost linear [--base-ms A] [--per-token-ms B] [--per-kv-token-us C]
//                  | --cost roofline ... (needs runtime/planning) | --calibration FILE]
//                 [--expert-fraction F]
//                 (--rate R [--burstiness B] --num-requests N --input-len DIST --output-len DIST
//                  | --trace FILE)
//                 [--zipf S [--num-experts E] [--moe-layers L] | --routing-trace FILE]
//                 [--placement contiguous|round_robin|balanced] [--redundant-experts R] [--tp N]
//                 [--slo ttft:MS tpot:MS e2el:MS] [--sweep-rate MIN:MAX[:STEPS]] [--seed S]
//                 [--json] [--save-json F] [--plot PNG]
// Scheduler settings default to the serve config's (block_size, num_kv_blocks, or kv_cache_mb
// divided by --kv-block-bytes, max_num_seqs, max_num_batched_tokens, max_waiting, tp,
// placement); flags override them. DIST: N | MIN:MAX | lognormal:MEAN:SD.
#pragma once

namespace keel {

// argv[0] is the program, argv[1] == "simulate".
int simulate_command(int argc, char** argv);

}  // namespace keel
