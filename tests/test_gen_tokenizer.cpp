// gen-model's synthetic tokenizer: tokenizer.json loads with keel::Tokenizer and round-trips
// text, its special tokens sit at the ids tokenizer_config.json / config.json name, the files
// are reproducible, its chat template is recognised as ChatML, and too-small vocabularies are
// refused (write_synthetic_tokenizer) or skipped (generate_model).
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/base/check.h"
#include "runtime/model/gen_model.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"

namespace keel {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// Under the running test's name: ctest runs each test as its own process, in parallel, so
// a directory shared between tests (as "small" once was) is rewritten under a reader's feet.
std::string scratch_dir(const std::string& name) {
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = std::string(KEEL_BINARY_DIR) + "/test_gen_tokenizer/" +
                    (test != nullptr ? test->name() : "no_test") + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

ModelPreset small_preset() {
  return load_model_preset(find_model_preset("small"));
}

// One generation per test process for the read-only tests (the small preset: vocab 32000, so the
// full 2000-merge budget applies and the text's pair counts decide where learning stops).
const std::string& small_dir() {
  static const std::string dir = [] {
    std::string path = scratch_dir("small");
    write_synthetic_tokenizer(small_preset(), path);
    return path;
  }();
  return dir;
}

TEST(GenTokenizer, LoadsAndRoundTrips) {
  Tokenizer tokenizer = Tokenizer::load(small_dir() + "/tokenizer.json");
  for (std::string text :
       {std::string("The river starts high in the hills, and the children swim near the mill."),
        std::string("naïve café 日本"), std::string("  spaces\tand\nnew lines\r\n 123 ?!  "),
        std::string("Emoji 😀 and Ünïcödé, Привет"), std::string("")}) {
    std::vector<int32_t> ids = tokenizer.encode(text);
    EXPECT_EQ(tokenizer.decode(ids), text);
    for (int32_t id : ids) EXPECT_LT(id, small_preset().vocab_size);
  }
  // Learned merges make familiar English shorter than its bytes.
  std::string english = "the water in the river and the village by the mill";
  EXPECT_LT(tokenizer.encode(english).size(), english.size() / 2);
}

TEST(GenTokenizer, SpecialTokensMatchTheConfigs) {
  Tokenizer tokenizer = Tokenizer::load(small_dir() + "/tokenizer.json");
  SyntheticTokenizer ids = write_synthetic_tokenizer(small_preset(), scratch_dir("ids"));
  EXPECT_LE(ids.endoftext, 256 + ids.learned_merges);  // merges spelling one string share an id
  EXPECT_EQ(tokenizer.token_id("<|endoftext|>"), ids.endoftext);
  EXPECT_EQ(tokenizer.token_id("<|im_start|>"), ids.im_start);
  EXPECT_EQ(tokenizer.token_id("<|im_end|>"), ids.im_end);
  EXPECT_EQ(ids.im_start, ids.endoftext + 1);
  EXPECT_EQ(ids.im_end, ids.endoftext + 2);
  EXPECT_EQ(tokenizer.vocab_size(), static_cast<size_t>(ids.im_end + 1));
  EXPECT_LE(ids.im_end + 1, 256 + 2000 + 3);
  EXPECT_GT(ids.learned_merges, 100);
  for (int32_t id : {ids.endoftext, ids.im_start, ids.im_end})
    EXPECT_TRUE(tokenizer.is_special(id));

  json config = json::parse(read_text(small_dir() + "/tokenizer_config.json"));
  EXPECT_TRUE(config["bos_token"].is_null());
  EXPECT_EQ(tokenizer.token_id(config["eos_token"].get<std::string>()), ids.im_end);
  EXPECT_EQ(tokenizer.token_id(config["pad_token"].get<std::string>()), ids.endoftext);

  // Special tokens in text are whole ids, so a rendered chat prompt tokenizes cleanly.
  ChatTemplateInfo chat = load_chat_template(small_dir());
  EXPECT_EQ(chat.family, "chatml");
  std::string prompt = render_chat(chat, {{"user", "Hello"}});
  EXPECT_EQ(prompt, "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
  std::vector<int32_t> prompt_ids = tokenizer.encode(prompt);
  EXPECT_EQ(prompt_ids.front(), ids.im_start);
  EXPECT_EQ(tokenizer.decode(prompt_ids), prompt);
  EXPECT_EQ(tokenizer.token_id(chat.stop_tokens.front()), ids.im_end);
}

TEST(GenTokenizer, VocabularyFollowsThePresetSize) {
  ModelPreset preset = small_preset();
  preset.vocab_size = 300;  // room for 41 merges only
  std::string dir = scratch_dir("vocab300");
  SyntheticTokenizer ids = write_synthetic_tokenizer(preset, dir);
  EXPECT_EQ(ids.im_end, 299);
  EXPECT_EQ(Tokenizer::load(dir + "/tokenizer.json").vocab_size(), 300u);
  preset.vocab_size = 259;  // byte tokens and specials only
  ids = write_synthetic_tokenizer(preset, dir);
  EXPECT_EQ(ids.learned_merges, 0);
  EXPECT_EQ(ids.im_end, 258);
  Tokenizer bytes_only = Tokenizer::load(dir + "/tokenizer.json");
  EXPECT_EQ(bytes_only.decode(bytes_only.encode("naïve café 日本")), "naïve café 日本");
}

TEST(GenTokenizer, ReproducibleAndFast) {
  std::string other = scratch_dir("again");
  auto start = std::chrono::steady_clock::now();
  write_synthetic_tokenizer(small_preset(), other);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0);  // well under a second unloaded; generous for sanitizers
  for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
    std::string first = read_text(small_dir() + "/" + file);
    EXPECT_FALSE(first.empty());
    EXPECT_EQ(first, read_text(other + "/" + file)) << file;
  }
}

TEST(GenTokenizer, TooSmallVocabularyIsRefused) {
  ModelPreset preset = small_preset();
  preset.vocab_size = 258;
  try {
    write_synthetic_tokenizer(preset, scratch_dir("too_small"));
    FAIL() << "expected keel::Error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("vocab_size 258"), std::string::npos) << error.what();
  }
}

TEST(GenTokenizer, GenerateModelWritesTokenizerWhenVocabularyAllows) {
  // A very small model with a 512-token vocabulary: weights, tokenizer, and eos in config.json.
  ModelPreset preset = load_model_preset(find_model_preset("tiny"));
  preset.vocab_size = 512;
  std::string dir = scratch_dir("tiny512");
  generate_model(preset, {}, dir);
  json config = json::parse(read_text(dir + "/config.json"));
  Tokenizer tokenizer = Tokenizer::load(dir + "/tokenizer.json");
  EXPECT_EQ(config["eos_token_id"].get<int32_t>(), tokenizer.token_id("<|im_end|>"));
  EXPECT_TRUE(config["bos_token_id"].is_null());
  EXPECT_EQ(tokenizer.vocab_size(), 512u);

  // The tiny preset itself (vocab 256) has no room: weights only, no tokenizer files.
  std::string tiny_dir = scratch_dir("tiny");
  generate_model(load_model_preset(find_model_preset("tiny")), {}, tiny_dir);
  EXPECT_TRUE(fs::exists(tiny_dir + "/config.json"));
  EXPECT_FALSE(fs::exists(tiny_dir + "/tokenizer.json"));
  EXPECT_FALSE(json::parse(read_text(tiny_dir + "/config.json")).contains("eos_token_id"));
}

}  // namespace
}  // namespace keel
