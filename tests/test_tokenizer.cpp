// Tokenizer tests against goldens produced by HF `tokenizers`
// (tests/fixtures/tokenizers/make_tokenizer_fixtures.py): ids, decode, round trips,
// streaming decode, and the errors for unsupported or malformed tokenizer.json files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/base/check.h"
#include "runtime/tokenizer/tokenizer.h"

namespace keel {
namespace {

using nlohmann::json;

const std::string kFixtureDir = std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/tokenizers/";

std::string read_text(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

const json& golden() {
  static const json root = json::parse(read_text(kFixtureDir + "golden.json"));
  return root;
}

Tokenizer load_fixture(const std::string& name) {
  return Tokenizer::load(kFixtureDir + golden()[name]["file"].get<std::string>());
}

// Strict UTF-8 validation (no overlongs, surrogates or truncated sequences).
bool valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    auto byte = [&](size_t k) { return static_cast<uint8_t>(text[k]); };
    uint8_t lead = byte(i);
    size_t extra;
    uint8_t low = 0x80, high = 0xBF;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
      extra = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      extra = 2;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      extra = 3;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    } else {
      return false;
    }
    if (i + extra >= text.size()) return false;
    for (size_t k = 1; k <= extra; ++k) {
      uint8_t next = byte(i + k);
      if (k == 1 ? (next < low || next > high) : (next < 0x80 || next > 0xBF)) return false;
    }
    i += extra + 1;
  }
  return true;
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, EncodeMatchesHuggingFace) {
  Tokenizer tokenizer = load_fixture(GetParam());
  for (const json& test_case : golden()[GetParam()]["cases"]) {
    std::string text = test_case["text"].get<std::string>();
    EXPECT_EQ(tokenizer.encode(text), test_case["ids"].get<std::vector<int32_t>>())
        << "text: " << text;
    EXPECT_EQ(tokenizer.encode(text, /*add_special_tokens=*/true),
              test_case["ids_with_special"].get<std::vector<int32_t>>())
        << "text: " << text;
  }
}

TEST_P(GoldenTest, DecodeMatchesHuggingFace) {
  Tokenizer tokenizer = load_fixture(GetParam());
  for (const json& test_case : golden()[GetParam()]["cases"]) {
    auto ids = test_case["ids"].get<std::vector<int32_t>>();
    auto with_special = test_case["ids_with_special"].get<std::vector<int32_t>>();
    std::string text = test_case["text"].get<std::string>();
    EXPECT_EQ(tokenizer.decode(ids), test_case["decoded"].get<std::string>()) << "text: " << text;
    EXPECT_EQ(tokenizer.decode(ids, /*skip_special_tokens=*/true),
              test_case["decoded_skip_special"].get<std::string>())
        << "text: " << text;
    EXPECT_EQ(tokenizer.decode(with_special), test_case["decoded_with_special"].get<std::string>())
        << "text: " << text;
  }
}

TEST_P(GoldenTest, VocabSizeMatchesHuggingFace) {
  Tokenizer tokenizer = load_fixture(GetParam());
  EXPECT_EQ(tokenizer.vocab_size(), golden()[GetParam()]["vocab_size"].get<size_t>());
}

// Streaming: one id at a time gives decode(all) in total, and no chunk is broken UTF-8.
TEST_P(GoldenTest, StreamDecoderMatchesDecodeAndNeverSplitsCharacters) {
  Tokenizer tokenizer = load_fixture(GetParam());
  for (bool skip_special : {false, true}) {
    for (const json& test_case : golden()[GetParam()]["cases"]) {
      auto ids = test_case["ids_with_special"].get<std::vector<int32_t>>();
      StreamDecoder stream(tokenizer, skip_special);
      std::string streamed;
      for (int32_t id : ids) {
        std::string chunk = stream.push(id);
        EXPECT_TRUE(valid_utf8(chunk))
            << "chunk after id " << id << " of " << test_case["text"].get<std::string>();
        streamed += chunk;
      }
      streamed += stream.finish();
      EXPECT_EQ(streamed, tokenizer.decode(ids, skip_special))
          << "text: " << test_case["text"].get<std::string>();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest,
                         ::testing::Values(std::string("qwen_bpe"), std::string("llama3_bpe"),
                                           std::string("llama_sp"), std::string("metaspace_sp")));

TEST(Tokenizer, ByteLevelRoundTripsArbitraryText) {
  Tokenizer tokenizer = load_fixture("qwen_bpe");
  // The Qwen normalizer is NFC, so the round trip is exact for every NFC-stable string
  // (HF's own decode of the golden ids tells which ones are).
  size_t exact = 0;
  for (const json& test_case : golden()["qwen_bpe"]["cases"]) {
    std::string text = test_case["text"].get<std::string>();
    if (test_case["decoded"].get<std::string>() != text) continue;
    EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text);
    ++exact;
  }
  EXPECT_GT(exact, 150u);
  std::string mixed = "Ünïcödé 中文 🦀 \t\n\r\n  x  'S 'll 12345 <|im_end|> ∑";
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(mixed)), mixed);
}

TEST(Tokenizer, SpecialTokensAreNeverSplit) {
  Tokenizer tokenizer = load_fixture("qwen_bpe");
  int32_t im_start = tokenizer.token_id("<|im_start|>");
  int32_t im_end = tokenizer.token_id("<|im_end|>");
  ASSERT_GE(im_start, 0);
  ASSERT_GE(im_end, 0);
  EXPECT_TRUE(tokenizer.is_special(im_start));
  auto ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), im_start);
  EXPECT_EQ(ids.back(), im_end);
  EXPECT_EQ(tokenizer.decode(ids, /*skip_special_tokens=*/true), "user\nhi");
  EXPECT_EQ(tokenizer.id_to_token(im_end), std::optional<std::string>("<|im_end|>"));
  EXPECT_EQ(tokenizer.token_id("definitely not a token"), -1);
  EXPECT_EQ(tokenizer.id_to_token(-5), std::nullopt);
}

// CJK and emoji are rare in both fixtures' training corpus: their UTF-8 bytes end up in
// different tokens (byte tokens for SentencePiece, byte symbols for byte-level BPE).
TEST(Tokenizer, StreamingHoldsBackSplitCharacters) {
  for (const char* name : {"llama_sp", "qwen_bpe"}) {
    Tokenizer tokenizer = load_fixture(name);
    std::string text =
        "\xF0\x9F\xA6\x80 \xE2\x88\x91\xE2\x88\xAB \xF0\x9F\x98\x80!";  // "🦀 ∑∫ 😀!"
    auto ids = tokenizer.encode(text);
    StreamDecoder stream(tokenizer);
    std::string streamed;
    size_t empty_chunks = 0;
    for (int32_t id : ids) {
      std::string chunk = stream.push(id);
      EXPECT_TRUE(valid_utf8(chunk)) << name;
      empty_chunks += chunk.empty();
      streamed += chunk;
    }
    streamed += stream.finish();
    EXPECT_GT(empty_chunks, 0u) << name << ": expected partial characters to be held back";
    EXPECT_EQ(streamed, text) << name;
  }
}

TEST(Tokenizer, DecodingAnUnknownIdThrows) {
  Tokenizer tokenizer = load_fixture("qwen_bpe");
  EXPECT_THROW(tokenizer.decode({0, static_cast<int32_t>(tokenizer.vocab_size()) + 100}), Error);
  EXPECT_THROW(tokenizer.decode({-1}), Error);
}

TEST(Tokenizer, StreamingFlushesIncompleteBytesAsReplacement) {
  Tokenizer tokenizer = load_fixture("llama_sp");
  int32_t lead_byte = tokenizer.token_id("<0xE4>");
  ASSERT_GE(lead_byte, 0);
  StreamDecoder stream(tokenizer);
  EXPECT_EQ(stream.push(lead_byte), "");
  EXPECT_EQ(stream.finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(tokenizer.decode({lead_byte}), "\xEF\xBF\xBD");
}

TEST(Tokenizer, MergesAsSpaceSeparatedStringsLoadTheSame) {
  json root = json::parse(read_text(kFixtureDir + "qwen_bpe.json"));
  for (json& merge : root["model"]["merges"])
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  Tokenizer pairs = load_fixture("qwen_bpe");
  Tokenizer strings = Tokenizer::from_json_text(root.dump(), "strings.json");
  for (const json& test_case : golden()["qwen_bpe"]["cases"]) {
    std::string text = test_case["text"].get<std::string>();
    EXPECT_EQ(strings.encode(text), pairs.encode(text));
  }
}

// Encoding time must grow linearly with the text, not quadratically: 1 MB against 256 KB of the
// same text in one run (a ratio, so machine speed and sanitizers cancel; linear is 4x, quadratic
// 16x; 10x leaves room for noise). Absolute speed belongs in bench/, not here.
TEST(Tokenizer, EncodingTimeGrowsLinearlyWithTheText) {
  Tokenizer tokenizer = load_fixture("qwen_bpe");
  std::string paragraph =
      "The quick brown fox jumps over the lazy dog. It's 2024, and we're serving 128 experts "
      "with 3.14159 probability!\n\tdef main():\n        return 42\n";
  auto encode_seconds = [&](size_t bytes, std::vector<int32_t>& ids, std::string& text) {
    text.clear();
    while (text.size() < bytes) text += paragraph;
    auto start = std::chrono::steady_clock::now();
    ids = tokenizer.encode(text);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::vector<int32_t> ids;
  std::string text;
  const double quarter = encode_seconds(1u << 18, ids, text);
  const double whole = encode_seconds(1u << 20, ids, text);
  EXPECT_GT(ids.size(), text.size() / 10);
  EXPECT_LT(whole, 10 * quarter) << "256 KB took " << quarter << " s, 1 MB took " << whole << " s";
  EXPECT_EQ(tokenizer.decode(ids), text);
}

// A whitespace run is a single pre-token; merging must not be quadratic in its length.
TEST(Tokenizer, LongWhitespaceRunIsFast) {
  Tokenizer tokenizer = load_fixture("qwen_bpe");
  std::string text(200000, ' ');
  auto start = std::chrono::steady_clock::now();
  auto ids = tokenizer.encode(text);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
  EXPECT_EQ(tokenizer.decode(ids), text);
}

// Bad files: keel::Error naming the file and the component.
class BadTokenizerTest : public ::testing::Test {
 protected:
  void expect_error(const json& root, const std::string& expected_fragment) {
    std::filesystem::path path =
        std::filesystem::temp_directory_path() /
        ("keel_bad_tokenizer_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
         "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".json");
    {
      std::ofstream file(path);
      file << root.dump();
    }
    try {
      Tokenizer::load(path.string());
      ADD_FAILURE() << "expected keel::Error containing '" << expected_fragment << "'";
    } catch (const Error& error) {
      std::string message = error.what();
      EXPECT_NE(message.find(path.string()), std::string::npos) << message;
      EXPECT_NE(message.find(expected_fragment), std::string::npos) << message;
    }
    std::filesystem::remove(path);
  }
  json base() { return json::parse(read_text(kFixtureDir + "qwen_bpe.json")); }
};

TEST_F(BadTokenizerTest, MissingModel) {
  json root = base();
  root.erase("model");
  expect_error(root, "model: missing");
}

TEST_F(BadTokenizerTest, UnknownModelType) {
  json root = base();
  root["model"]["type"] = "WordPiece";
  expect_error(root, "model: unsupported type 'WordPiece'");
}

TEST_F(BadTokenizerTest, MergeWithUnknownToken) {
  json root = base();
  root["model"]["merges"][3] = json::array({"no-such-token", "x"});
  expect_error(root, "merge #3");
}

TEST_F(BadTokenizerTest, MalformedMerge) {
  json root = base();
  root["model"]["merges"][0] = "a b c";
  expect_error(root, "merge #0");
}

TEST_F(BadTokenizerTest, UnsupportedPreTokenizerRegex) {
  json root = base();
  root["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+";
  expect_error(root, "pre_tokenizer: unsupported Split pattern");
}

TEST_F(BadTokenizerTest, UnsupportedNormalizerAndDecoder) {
  json root = base();
  root["normalizer"] = {{"type", "Lowercase"}};
  expect_error(root, "normalizer: unsupported type 'Lowercase'");
  root = base();
  root["decoder"] = {{"type", "WordPiece"}};
  expect_error(root, "decoder: unsupported type 'WordPiece'");
}

TEST_F(BadTokenizerTest, NotJson) {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("keel_not_json_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream file(path);
    file << "{ not json";
  }
  try {
    Tokenizer::load(path.string());
    ADD_FAILURE() << "expected keel::Error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(path.string()), std::string::npos);
  }
  std::filesystem::remove(path);
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
}

}  // namespace
}  // namespace keel
