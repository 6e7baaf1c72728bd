// keel serve's command line:
//   keel serve MODEL_DIR [flags]                    no config file needed
//   keel serve --config FILE [MODEL_DIR] [flags]    the file's keys, then the flags
// vLLM's flag names where the meaning is the same (--tensor-parallel-size/--tp,
// --served-model-name A [B ...], --max-model-len, --max-num-seqs, --max-num-batched-tokens,
// --block-size, --kv-cache-dtype, --enable-prefix-caching, --api-key, --host, --port, --seed),
// keel's own for the rest (--determinism, --placement, --reduce, ...). A config file and flags
// combine: every flag given replaces the file's key; without a file, the defaults are a file's
// that names only `model` (runtime/serving/serve_config.h). Values keel does not implement are
// refused with the flag and the values it does take.
#pragma once

#include <string>

#include "runtime/serving/serve_config.h"

namespace keel {

struct ServeCommand {
  bool help = false;      // --help was given: print help_text and exit 0
  std::string help_text;  // the flags, their defaults and choices
  bool verbose = false;
  ServeConfig config;
};

// Parses argv[first, argc). `env_api_key`: KEEL_API_KEY's value (nullptr when unset), the key
// when --api-key is absent. Throws flags::UsageError for a bad command line and keel::Error for
// a bad config file.
ServeCommand parse_serve_command(int argc, const char* const* argv, int first,
                                 const char* env_api_key);

}  // namespace keel
