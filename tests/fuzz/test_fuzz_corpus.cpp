// Replays every fuzz target's committed corpus (tests/fuzz/corpus/<target>/: seeds, inputs the
// campaigns found interesting, and every crash found, named crash-*) through the same target
// functions the libFuzzer binaries run, plus hostile inputs built here (nesting millions deep,
// which no fuzzer reaches within its input size limit). A target may only return or throw
// keel::Error; anything else fails here, and a crash fails the whole binary.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/fuzz/fuzz_target.h"

namespace keel::fuzz {
namespace {

namespace fs = std::filesystem;

const fs::path kCorpusRoot = fs::path(KEEL_SOURCE_DIR) / "tests/fuzz/corpus";

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// Runs one input; an exception other than keel::Error (which the target swallows) is a failure
// naming the input.
void run_input(const std::string& target, TargetFn fn, std::string_view input,
               const std::string& label) {
  try {
    fn(input);
  } catch (const std::exception& error) {
    ADD_FAILURE() << "target " << target << ", input " << label
                  << ": escaped with a non-keel exception: " << error.what();
  }
}

class Corpus : public testing::TestWithParam<std::string> {};

TEST_P(Corpus, EveryInputIsHandledCleanly) {
  const std::string& target = GetParam();
  const TargetFn fn = targets().at(target);
  const fs::path dir = kCorpusRoot / target;
  ASSERT_TRUE(fs::is_directory(dir)) << "no corpus for target " << target << " at " << dir;
  std::vector<fs::path> inputs;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.is_regular_file()) inputs.push_back(entry.path());
  std::sort(inputs.begin(), inputs.end());
  ASSERT_FALSE(inputs.empty()) << "empty corpus for " << target;
  for (const fs::path& input : inputs)
    run_input(target, fn, read_file(input), input.filename().string());
}

// Nesting far deeper than any fuzzer input: recursive walks (JSON dump, YAML node building)
// must be refused before they overflow the stack.
TEST_P(Corpus, DeepNestingIsRefusedNotACrash) {
  const std::string& target = GetParam();
  const TargetFn fn = targets().at(target);
  constexpr size_t kDepth = 200'000;  // ~40 MB of stack for a recursive dump
  const std::string arrays = std::string(kDepth, '[') + std::string(kDepth, ']');
  const std::string objects = [&] {
    std::string text;
    for (size_t i = 0; i < kDepth; ++i) text += "{\"a\":";
    text += "1";
    text += std::string(kDepth, '}');
    return text;
  }();
  run_input(target, fn, arrays, "200k nested arrays");
  run_input(target, fn, objects, "200k nested objects");
  // The same inside the field a parser reads first.
  run_input(target, fn, "{\"model\": " + arrays + "}", "nested arrays under a key");
  run_input(target, fn, "{\"best_of\": " + arrays + "}", "nested arrays under best_of");
  run_input(target, fn, "{\"quantization_config\": " + arrays + "}",
            "nested arrays under quantization_config");
  // A safetensors header (8-byte length, then JSON) whose dtype is deep.
  const std::string header = "{\"t\": {\"dtype\": " + arrays + "}}";
  std::string safetensors(8, '\0');
  for (size_t i = 0; i < 8; ++i)
    safetensors[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  run_input(target, fn, safetensors + header, "a safetensors header with a deep dtype");
  run_input(target, fn,
            "POST /v1/completions HTTP/1.1\r\nContent-Length: " + std::to_string(arrays.size()) +
                "\r\n\r\n" + arrays,
            "nested arrays in an HTTP body");
}

std::vector<std::string> target_names() {
  std::vector<std::string> names;
  for (const auto& [name, fn] : targets()) names.push_back(name);
  return names;
}

INSTANTIATE_TEST_SUITE_P(Fuzz, Corpus, testing::ValuesIn(target_names()),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace keel::fuzz
