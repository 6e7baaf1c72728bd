// Checkpoint files: the safetensors header (and the tensors it describes), the sharded index,
// config.json and the quantization configs.
#include <filesystem>

#include "runtime/model/checkpoint.h"
#include "runtime/model/model_config.h"
#include "runtime/model/quant_config.h"
#include "runtime/model/safetensors.h"
#include "tests/fuzz/fuzz_target.h"

namespace keel::fuzz {
namespace {

// A tensor's first and last elements read the way the loader reads them (misaligned data
// regions included).
void touch_tensors(const SafetensorsFile& file) {
  for (const auto& [name, view] : file.tensors()) {
    if (!view.is_float() || view.nbytes == 0) continue;
    (void)view.f32_at(0);
    (void)view.f32_at(static_cast<size_t>(view.num_elements() - 1));
  }
}

// Shards of a real sharded checkpoint beside the fuzzed index, so an index that names them
// reaches the tensor lookups.
std::string index_dir() {
  static const std::string dir = [] {
    const std::string path = scratch_dir() + "/index";
    const std::string fixture =
        std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/hf/qwen2_moe_sharded";
    std::filesystem::create_directories(path);
    for (const auto& entry : std::filesystem::directory_iterator(fixture))
      if (entry.path().extension() == ".safetensors")
        std::filesystem::copy_file(entry.path(), path + "/" + entry.path().filename().string(),
                                   std::filesystem::copy_options::overwrite_existing);
    return path;
  }();
  return dir;
}

}  // namespace
}  // namespace keel::fuzz

KEEL_FUZZ_TARGET(safetensors_header) {
  const std::string path = keel::fuzz::write_scratch_file("input.safetensors", input);
  keel::fuzz::expect_clean([&] { keel::fuzz::touch_tensors(*keel::SafetensorsFile::open(path)); });
}

KEEL_FUZZ_TARGET(safetensors_index) {
  const std::string dir = keel::fuzz::index_dir();
  keel::fuzz::write_scratch_file("index/model.safetensors.index.json", input);
  keel::fuzz::expect_clean([&] {
    keel::Checkpoint checkpoint = keel::Checkpoint::open(dir);
    (void)checkpoint.find("model.embed_tokens.weight");
  });
}

KEEL_FUZZ_TARGET(model_config) {
  keel::fuzz::expect_clean([&] { keel::ModelConfig::parse(std::string(input), "config.json"); });
}

// The same text as a config.json quantization_config and as a ModelOpt hf_quant_config.json.
KEEL_FUZZ_TARGET(quant_config) {
  const std::string text(input);
  keel::fuzz::expect_clean([&] { keel::parse_quant_config(text, "quantization_config", false); });
  keel::fuzz::expect_clean([&] { keel::parse_quant_config(text, "hf_quant_config.json", true); });
}
