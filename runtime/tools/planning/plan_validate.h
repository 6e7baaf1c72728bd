// `keel plan --validate TABLE`: the planner's decode throughput against published measurements.
//
// Design note. A validation table (configs/validation/*.yaml, `kind: plan_validation`) holds
// groups of published rows that share one deployment (model, hardware, quantization, TP, engine
// profile, speculative decoding) and cite their source; each row is a prompt length, a
// concurrency and the published decode throughput (tok/s summed over the concurrent requests),
// and says whether the engine profile was fitted to it (`fit: true`). For each row the planner
// runs the decode step of
//   batch   = min(concurrency, max_num_seqs, the sequences that fit in memory at that context)
//   context = prompt + decode_tokens / 2   (the average context while decode_tokens are generated)
// and predicts batch * tokens_per_seq / step seconds. Error = predicted / published - 1. Paths
// in the table are relative to the table's own directory. Unknown keys are refused by name.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace keel::planning {

struct ValidationRow {
  std::string group;
  std::string source;
  int64_t prompt = 0;
  int64_t concurrency = 1;
  double published = 0;  // tok/s
  bool fit = false;      // a calibration point of the group's engine profile
  std::string note;
  // Computed.
  int64_t batch = 0;  // sequences running at once (concurrency capped by memory / max_num_seqs)
  int64_t context = 0;
  double predicted = 0;
  double error = 0;  // predicted / published - 1
  const char* bound = "";
};

struct ValidationResult {
  std::string name;
  std::string path;
  std::vector<ValidationRow> rows;
  double max_abs_error_fit = 0;
  double max_abs_error_validation = 0;
  int within_25_percent = 0;  // validation (non-fit) rows within +-25%
  int validation_rows = 0;
};

// Loads the table and predicts every row. Throws keel::Error naming the file and the key.
ValidationResult validate_plan_table(const std::string& path);

std::string render_validation_text(const ValidationResult& result);
nlohmann::json validation_json(const ValidationResult& result);

}  // namespace keel::planning
