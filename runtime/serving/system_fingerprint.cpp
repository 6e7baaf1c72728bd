#include "runtime/serving/system_fingerprint.h"

#include <nlohmann/json.hpp>

#include "runtime/common/sha256.h"

namespace keel {

std::string system_fingerprint(const FingerprintInputs& inputs) {
  std::string placement(placement_kind_name(inputs.placement.kind));
  if (inputs.placement.kind == PlacementKind::kExplicit) {
    const std::string lists = nlohmann::json(inputs.placement.explicit_ranks).dump();
    Sha256 sha;
    sha.update(lists.data(), lists.size());
    placement += "-" + sha.finish_hex().substr(0, 8);
  }
  std::string text = "keel1";
  auto field = [&](const char* key, const std::string& value) {
    text += std::string(";") + key + "=" + value;
  };
  field("rev", inputs.build_revision);
  field("det", std::string(determinism_name(inputs.determinism)));
  field("reduce", std::string(comm::reduce_algo_name(inputs.reduce)));
  field("tp", std::to_string(inputs.tp_size));
  field("placement", placement);
  field("combine", std::string(combine_precision_name(inputs.combine)));
  field("kv", inputs.kv_cache_dtype);
  field("act", std::string(nvfp4_activations_name(inputs.nvfp4_activations)));
  field("backend", std::string(device_name(inputs.backend)));
  field("weights", inputs.weights_digest.substr(0, 16));
  return text;
}

}  // namespace keel
