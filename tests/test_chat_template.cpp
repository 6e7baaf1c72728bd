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
#include "runtime/common/python_json.h"

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

using ordered = nlohmann::ordered_json;

// Fixture messages as the server hands them over: tool-call arguments already parsed, in the
// client's key order (the fixture is read as ordered JSON for that).
std::vector<ChatTurn> turns_of(const ordered& messages) {
  std::vector<ChatTurn> turns;
  for (const ordered& message : messages) {
    ChatTurn turn{message["role"].get<std::string>(), message["content"].get<std::string>()};
    if (message.contains("tool_calls"))
      for (const ordered& call : message["tool_calls"])
        turn.tool_calls.push_back(
            {call["function"]["name"].get<std::string>(), call["function"]["arguments"]});
    if (message.contains("reasoning_content"))
      turn.reasoning_content = message["reasoning_content"].get<std::string>();
    turns.push_back(std::move(turn));
  }
  return turns;
}

ChatRenderOptions options_of(const ordered& test_case) {
  ChatRenderOptions options;
  if (test_case.contains("tools")) options.tools = test_case["tools"];
  if (test_case.contains("enable_thinking"))
    options.enable_thinking = test_case["enable_thinking"].get<bool>();
  return options;
}

ordered read_ordered(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream contents;
  contents << file.rdbuf();
  return ordered::parse(contents.str());
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
  for (const ordered& test_case : read_ordered(kFixtureDir + expected.fixture + ".json")["cases"]) {
    std::vector<ChatTurn> turns = turns_of(test_case["messages"]);
    SCOPED_TRACE(test_case.dump());
    if (test_case.contains("error")) {
      EXPECT_THROW(render_chat(info, turns, options_of(test_case)), Error);
    } else {
      EXPECT_EQ(render_chat(info, turns, options_of(test_case)),
                test_case["rendered"].get<std::string>());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, HfGolden,
    testing::Values(
        Expected{"qwen2_5", ChatFamily::kChatML, "chatml (Qwen2.5 default system prompt)"},
        Expected{"qwen2_5_list", ChatFamily::kChatML, "chatml (Qwen2.5 default system prompt)"},
        Expected{"qwen3", ChatFamily::kChatML, "chatml"},
        Expected{"chatml", ChatFamily::kChatML, "chatml"},
        Expected{"llama3", ChatFamily::kLlama3, "llama3"},
        Expected{"mistral", ChatFamily::kMistral, "mistral"},
        Expected{"qwen3_tools", ChatFamily::kChatML, "qwen3"},
        Expected{"qwen3_5_tools", ChatFamily::kChatML, "qwen3.5"},
        Expected{"qwen3_5_tools_v2", ChatFamily::kChatML, "qwen3.5"}),
    [](const testing::TestParamInfo<Expected>& info) { return std::string(info.param.fixture); });

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

ChatTemplateInfo info_of(const char* fixture) {
  json config = read_json(kFixtureDir + fixture + ".json")["tokenizer_config"];
  return chat_template_from_config(config.dump(), fixture);
}

TEST(ChatTemplate, QwenTemplatesAreRecognisedWithTheirToolSyntax) {
  ChatTemplateInfo qwen3 = info_of("qwen3_tools");
  EXPECT_EQ(qwen3.dialect, ChatMLDialect::kQwen3);
  EXPECT_EQ(qwen3.tool_call_syntax, ToolCallSyntax::kHermesJson);
  EXPECT_TRUE(qwen3.thinking_switch);
  EXPECT_TRUE(qwen3.thinking_default);
  ChatTemplateInfo qwen35 = info_of("qwen3_5_tools");
  EXPECT_EQ(qwen35.dialect, ChatMLDialect::kQwen3_5);
  EXPECT_EQ(qwen35.tool_call_syntax, ToolCallSyntax::kQwenXml);
  EXPECT_TRUE(qwen35.thinking_default);
  EXPECT_TRUE(qwen35.keeps_earlier_reasoning);
  EXPECT_FALSE(info_of("qwen3_5_tools_v2").keeps_earlier_reasoning);
  // The modelled Qwen3 template without tool instructions stays plain ChatML, as do the others.
  for (const char* plain : {"qwen3", "qwen2_5", "chatml"}) {
    EXPECT_EQ(info_of(plain).dialect, ChatMLDialect::kPlain) << plain;
    EXPECT_EQ(info_of(plain).tool_call_syntax, ToolCallSyntax::kNone) << plain;
  }
  // A reworded tool instruction is not taken for Qwen3's.
  std::string reworded =
      read_json(kFixtureDir + "qwen3_tools.json")["tokenizer_config"]["chat_template"]
          .get<std::string>();
  reworded.replace(reworded.find("You may call"), 12, "You can call");
  EXPECT_EQ(chat_template_from_jinja(reworded, "", "<|im_end|>").dialect, ChatMLDialect::kPlain);
}

TEST(ChatTemplate, SmallQwen35VariantThinksOnlyWhenAsked) {
  std::string source =
      read_json(kFixtureDir + "qwen3_5_tools.json")["tokenizer_config"]["chat_template"]
          .get<std::string>();
  const std::string standard = "enable_thinking is defined and enable_thinking is false";
  source.replace(source.find(standard), standard.size(),
                 "enable_thinking is defined and enable_thinking is true");
  ChatTemplateInfo info = chat_template_from_jinja(source, "", "<|im_end|>");
  ASSERT_EQ(info.dialect, ChatMLDialect::kQwen3_5);
  EXPECT_FALSE(info.thinking_default);
  const std::string prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(render_chat(info, {{"user", "hi"}}), prompt + "<think>\n\n</think>\n\n");
  EXPECT_EQ(render_chat(info, {{"user", "hi"}}, {.enable_thinking = true}), prompt + "<think>\n");
}

// Content sent as a list of text parts: the API layer joins them with "\n" (what vLLM hands a
// template that takes a string); Qwen3.5's template loops over the parts and writes each text
// as it is, so its rendering is that of the parts concatenated.
TEST(ChatTemplate, TextPartsAreJoinedUnlessTheTemplateLoopsOverThem) {
  auto parts_turn = [](std::string role) {
    ChatTurn turn{std::move(role), " a\nb "};
    turn.content_parts = {" a", "b "};
    return turn;
  };
  for (const char* fixture : {"qwen3_5_tools", "qwen3_5_tools_v2"}) {
    ChatTemplateInfo info = info_of(fixture);
    EXPECT_EQ(render_chat(info, {parts_turn("system"), parts_turn("user")}),
              render_chat(info, {{"system", " ab "}, {"user", " ab "}}))
        << fixture;
  }
  for (const char* fixture : {"qwen3_tools", "chatml"}) {
    ChatTemplateInfo info = info_of(fixture);
    EXPECT_EQ(render_chat(info, {parts_turn("user")}), render_chat(info, {{"user", " a\nb "}}))
        << fixture;
  }
}

TEST(ChatTemplate, ToolsAndThinkingAreRefusedWhereTheTemplateHasNone) {
  ChatTemplateInfo chatml = info_of("chatml");
  ChatRenderOptions with_tools;
  with_tools.tools = ordered::parse(R"([{"type": "function", "function": {"name": "f"}}])");
  EXPECT_THROW(render_chat(chatml, {{"user", "hi"}}, with_tools), Error);
  ChatTurn call_turn{"assistant", ""};
  call_turn.tool_calls.push_back({"f", ordered::object()});
  EXPECT_THROW(render_chat(chatml, {{"user", "hi"}, call_turn}), Error);
  EXPECT_THROW(render_chat(chatml, {{"user", "hi"}}, {.enable_thinking = false}), Error);
  EXPECT_THROW(render_chat(info_of("llama3"), {{"user", "hi"}}, with_tools), Error);
  // Qwen3's template would drop a developer message without a word: keel refuses it.
  EXPECT_THROW(render_chat(info_of("qwen3_tools"), {{"developer", "x"}, {"user", "hi"}}), Error);
}

TEST(PythonJson, FloatsPrintAsPythonRepr) {
  EXPECT_EQ(python_float_repr(1.0), "1.0");
  EXPECT_EQ(python_float_repr(-0.0), "-0.0");
  EXPECT_EQ(python_float_repr(0.1), "0.1");
  EXPECT_EQ(python_float_repr(1e-4), "0.0001");
  EXPECT_EQ(python_float_repr(1e-5), "1e-05");
  EXPECT_EQ(python_float_repr(1.5e-7), "1.5e-07");
  EXPECT_EQ(python_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(123456789012345678.0), "1.2345678901234568e+17");
  EXPECT_EQ(python_float_repr(2.5e300), "2.5e+300");
  EXPECT_EQ(python_float_repr(123.456), "123.456");
}

TEST(PythonJson, DumpsLikePython) {
  ordered value = ordered::parse(
      R"({"z": 1, "a": [true, null, 2.0, -3], "s": "q\"\\\n\t\u0001\u00e9\u007f", "o": {}})");
  EXPECT_EQ(
      python_json_dumps(value),
      "{\"z\": 1, \"a\": [true, null, 2.0, -3], \"s\": \"q\\\"\\\\\\n\\t\\u0001\xC3\xA9\x7F\", "
      "\"o\": {}}");
  EXPECT_EQ(python_str(ordered(true)), "True");
  EXPECT_EQ(python_str(ordered(nullptr)), "None");
  EXPECT_EQ(python_str(ordered("text")), "text");
  EXPECT_EQ(python_str(ordered(7)), "7");
  EXPECT_EQ(python_str(ordered(0.5)), "0.5");
}

}  // namespace
}  // namespace keel
