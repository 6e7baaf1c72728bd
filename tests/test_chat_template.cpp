// Chat templates: keel's C++ renderings against goldens made by HF transformers'
// apply_chat_template (tests/fixtures/chat_templates/make_chat_template_fixtures.py), family
// recognition, the fallbacks and their log strings, token fields and malformed configs.
#include "runtime/tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/base/check.h"

namespace keel {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const std::string kFixtureDir = std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/chat_templates/";

json read_json(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return json::parse(contents.str());
}

// A fresh empty directory per test under the build tree.
std::string scratch_dir(const std::string& name) {
  std::string dir = std::string(KEEL_BINARY_DIR) + "/test_chat_template/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::vector<ChatTurn> turns_of(const json& messages) {
  std::vector<ChatTurn> turns;
  for (const json& message : messages)
    turns.push_back({message["role"].get<std::string>(), message["content"].get<std::string>()});
  return turns;
}

struct Expected {
  const char* fixture;
  ChatFamily kind;
  const char* family;
};

class HfGolden : public testing::TestWithParam<Expected> {};

TEST_P(HfGolden, RendersLikeTransformers) {
  const Expected& expected = GetParam();
  json fixture = read_json(kFixtureDir + expected.fixture + ".json");
  // Through the file loader, as the server will: tokenizer_config.json in a model directory.
  std::string dir = scratch_dir(expected.fixture);
  std::ofstream(dir + "/tokenizer_config.json") << fixture["tokenizer_config"].dump(1);
  ChatTemplateInfo info = load_chat_template(dir);
  EXPECT_EQ(info.kind, expected.kind);
  EXPECT_EQ(info.family, expected.family);
  ASSERT_GT(fixture["cases"].size(), 2u);
  for (const json& test_case : fixture["cases"]) {
    std::vector<ChatTurn> turns = turns_of(test_case["messages"]);
    SCOPED_TRACE(test_case["messages"].dump());
    if (test_case.contains("error")) {
      EXPECT_THROW(render_chat(info, turns), Error);
    } else {
      EXPECT_EQ(render_chat(info, turns), test_case["rendered"].get<std::string>());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfGolden,
                         testing::Values(Expected{"qwen2_5", ChatFamily::kChatML,
                                                  "chatml (Qwen2.5 default system prompt)"},
                                         Expected{"qwen2_5_list", ChatFamily::kChatML,
                                                  "chatml (Qwen2.5 default system prompt)"},
                                         Expected{"qwen3", ChatFamily::kChatML, "chatml"},
                                         Expected{"chatml", ChatFamily::kChatML, "chatml"},
                                         Expected{"llama3", ChatFamily::kLlama3, "llama3"},
                                         Expected{"mistral", ChatFamily::kMistral, "mistral"}),
                         [](const testing::TestParamInfo<Expected>& info) {
                           return std::string(info.param.fixture);
                         });

TEST(ChatTemplate, QwenDefaultSystemIsCopiedFromTheTemplate) {
  json config = read_json(kFixtureDir + "qwen2_5.json")["tokenizer_config"];
  ChatTemplateInfo info = chat_template_from_config(config.dump(), "qwen2_5");
  EXPECT_EQ(info.default_system,
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  EXPECT_EQ(info.bos_token, "");
  EXPECT_EQ(info.eos_token, "<|im_end|>");
}

TEST(ChatTemplate, StopTokensPerFamily) {
  auto stops = [](const char* fixture) {
    json config = read_json(kFixtureDir + fixture + ".json")["tokenizer_config"];
    return chat_template_from_config(config.dump(), fixture).stop_tokens;
  };
  EXPECT_EQ(stops("chatml"), (std::vector<std::string>{"<|im_end|>", "<|endoftext|>"}));
  EXPECT_EQ(stops("llama3"), (std::vector<std::string>{"<|eot_id|>", "<|end_of_text|>"}));
  EXPECT_EQ(stops("mistral"), (std::vector<std::string>{"</s>"}));
}

TEST(ChatTemplate, AddedTokenObjectsGiveTheirContent) {
  ChatTemplateInfo info = chat_template_from_config(
      read_json(kFixtureDir + "mistral.json")["tokenizer_config"].dump(), "mistral");
  EXPECT_EQ(info.bos_token, "<s>");
  EXPECT_EQ(info.eos_token, "</s>");
}

TEST(ChatTemplate, NoConfigFallsBackToChatML) {
  ChatTemplateInfo info = load_chat_template(scratch_dir("no_config"));
  EXPECT_EQ(info.kind, ChatFamily::kChatML);
  EXPECT_EQ(info.family, "chatml (default: no tokenizer_config.json)");
  EXPECT_EQ(info.eos_token, "<|im_end|>");
  EXPECT_EQ(render_chat(info, {{"user", "hi"}}),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(info.stop_tokens, (std::vector<std::string>{"<|im_end|>", "<|endoftext|>"}));
}

TEST(ChatTemplate, UnrecognisedTemplateFallsBackToChatML) {
  ChatTemplateInfo info = chat_template_from_config(
      R"({"eos_token": "<eos>", "chat_template": "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"})",
      "custom");
  EXPECT_EQ(info.kind, ChatFamily::kChatML);
  EXPECT_EQ(info.family, "chatml (default: unrecognised chat_template)");
  EXPECT_EQ(info.stop_tokens, (std::vector<std::string>{"<|im_end|>", "<|endoftext|>", "<eos>"}));
}

TEST(ChatTemplate, ConfigWithoutTemplateFallsBackOrReadsJinjaFile) {
  std::string dir = scratch_dir("jinja_file");
  std::ofstream(dir + "/tokenizer_config.json") << R"({"bos_token": null, "eos_token": "</s>"})";
  EXPECT_EQ(load_chat_template(dir).family, "chatml (default: no chat_template)");
  // transformers 5 saves the template next to the config as chat_template.jinja.
  std::ofstream(dir + "/chat_template.jinja")
      << read_json(kFixtureDir + "mistral.json")["tokenizer_config"]["chat_template"]
             .get<std::string>();
  ChatTemplateInfo info = load_chat_template(dir);
  EXPECT_EQ(info.kind, ChatFamily::kMistral);
  EXPECT_EQ(render_chat(info, {{"user", "hi"}}), "[INST] hi [/INST]");
}

TEST(ChatTemplate, Llama3TrimsUnicodeWhitespaceLikePython) {
  ChatTemplateInfo info = chat_template_from_jinja("<|start_header_id|>", "<B>", "<|eot_id|>");
  // U+00A0, U+3000 and U+2028 are whitespace to Python's str.strip; U+200B is not.
  EXPECT_EQ(render_chat(info, {{"user", "\xC2\xA0\xE3\x80\x80 x \xE2\x80\xA8"},
                               {"user", "\xE2\x80\x8Bx\n"}}),
            "<B><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n\xE2\x80\x8Bx<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // Content of only whitespace, and invalid UTF-8 at the edges (kept, never "whitespace").
  EXPECT_EQ(render_chat(info, {{"user", " \t\n"}, {"user", "\xFF x \xC2"}}),
            "<B><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n\xFF x \xC2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplate, MistralRejectsWhatTheTemplateRejects) {
  ChatTemplateInfo info = chat_template_from_jinja("[INST]", "<s>", "</s>");
  EXPECT_THROW(render_chat(info, {{"user", "a"}, {"system", "b"}}), Error);
  EXPECT_THROW(render_chat(info, {{"system", "a"}, {"assistant", "b"}}), Error);
  EXPECT_EQ(render_chat(info, {{"system", "s"}}), "<s>");
}

TEST(ChatTemplate, MalformedConfigIsAnErrorNamingTheFile) {
  std::string dir = scratch_dir("malformed");
  std::ofstream(dir + "/tokenizer_config.json") << R"({"chat_template": "x", )";
  try {
    load_chat_template(dir);
    FAIL() << "expected keel::Error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(dir + "/tokenizer_config.json"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find("malformed JSON"), std::string::npos) << error.what();
  }
  EXPECT_THROW(chat_template_from_config(R"({"chat_template": 5})", "t"), Error);
  EXPECT_THROW(chat_template_from_config(R"({"chat_template": []})", "t"), Error);
  EXPECT_THROW(chat_template_from_config(R"({"eos_token": 7})", "t"), Error);
  EXPECT_THROW(chat_template_from_config(R"([1, 2])", "t"), Error);
}

}  // namespace
}  // namespace keel
