// Files keel's tools read back: routing capture files, calibration files (and a server's step
// records, `keel calibrate --from-steps`), simulator arrival traces and load-generator datasets.
#include <nlohmann/json.hpp>

#include "runtime/routing/routing_file.h"
#include "runtime/serving/calibrate.h"
#include "runtime/tools/loadgen/loadgen.h"
#include "runtime/tools/simulation/cost_model.h"
#include "runtime/tools/simulation/simulator.h"
#include "tests/fuzz/fuzz_target.h"

KEEL_FUZZ_TARGET(routing_file) {
  const std::string path = keel::fuzz::write_scratch_file("input.keelrout", input);
  keel::fuzz::expect_clean([&] { keel::read_routing_file(path); });
  keel::fuzz::expect_clean([&] { keel::sim::routing_trace_expert_loads(path); });
}

KEEL_FUZZ_TARGET(calibration) {
  const std::string path = keel::fuzz::write_scratch_file("input.json", input);
  keel::fuzz::expect_clean([&] { keel::sim::CalibratedCostModel::load(path); });
  // keel calibrate --from-steps: the "steps" array of a /v1/telemetry/steps answer.
  const nlohmann::json body = nlohmann::json::parse(input, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.is_object() || !body.contains("steps") ||
      !body["steps"].is_array())
    return;
  keel::fuzz::expect_clean([&] { keel::calibration_from_served_steps(body["steps"], 1); });
}

KEEL_FUZZ_TARGET(trace) {
  const std::string path = keel::fuzz::write_scratch_file("input.jsonl", input);
  keel::fuzz::expect_clean([&] { keel::sim::load_trace(path); });
  // The load generator's errors are std::runtime_error (it links no keel library for them).
  try {
    keel::loadgen::load_dataset(path);
  } catch (const std::runtime_error& error) {
    if (std::string_view(error.what()).rfind("loadgen: ", 0) != 0) throw;
  }
}
