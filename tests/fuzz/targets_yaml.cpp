// YAML configs: serve configs, deployments and placement files, hardware specs and engine
// efficiency profiles, model presets (planning and gen-model), plan validation tables.
#include "runtime/common/yaml_util.h"
#include "runtime/engine/deployment.h"
#include "runtime/model/gen_model.h"
#include "runtime/serving/serve_config.h"
#include "runtime/tools/planning/hardware_spec.h"
#include "runtime/tools/planning/model_spec.h"
#include "runtime/tools/planning/plan_validate.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

std::string yaml_file(std::string_view input) {
  return keel::fuzz::write_scratch_file("input.yaml", input);
}

}  // namespace

KEEL_FUZZ_TARGET(yaml_serve) {
  const std::string path = yaml_file(input);
  keel::fuzz::expect_clean([&] { keel::load_serve_config(path); });
}

KEEL_FUZZ_TARGET(yaml_deployment) {
  const std::string path = yaml_file(input);
  keel::fuzz::expect_clean([&] { keel::load_deployment(path); });
  keel::fuzz::expect_clean([&] { keel::load_placement_file(path); });
}

KEEL_FUZZ_TARGET(yaml_hardware) {
  const std::string path = yaml_file(input);
  keel::fuzz::expect_clean([&] { keel::planning::load_hardware_spec(path); });
  keel::fuzz::expect_clean([&] {
    keel::planning::HardwareSpec hardware = keel::planning::load_hardware_spec(
        std::string(KEEL_SOURCE_DIR) + "/configs/hardware/4x-rtx-pro-6000.yaml");
    keel::planning::apply_efficiency_file(hardware, path);
  });
  keel::fuzz::expect_clean([&] { keel::planning::validate_plan_table(path); });
}

KEEL_FUZZ_TARGET(yaml_model) {
  const std::string path = yaml_file(input);
  keel::fuzz::expect_clean([&] { keel::planning::load_model_spec(path); });
  keel::fuzz::expect_clean([&] { keel::load_model_preset(path); });
}
