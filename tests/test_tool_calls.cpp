// Tool-call and reasoning parsing of model outputs (runtime/server/tool_calls.h, reasoning.h,
// chat_output.h) on the fixtures in tests/fixtures/tool_calls/qwen_outputs.json: the message
// each output becomes, and the same message assembled from streamed deltas for many ways of
// cutting the output into chunks (every tag split at every position included).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "runtime/server/chat_output.h"

namespace keel::server {
namespace {

using ordered = nlohmann::ordered_json;

ordered fixture() {
  std::ifstream file(std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/tool_calls/qwen_outputs.json");
  std::stringstream text;
  text << file.rdbuf();
  return ordered::parse(text.str());
}

ChatOutputOptions options_of(const ordered& test_case, const ordered& tools) {
  ChatOutputOptions options;
  const std::string format = test_case["format"].get<std::string>();
  options.tool_calls = format == "hermes" ? ToolCallFormat::kHermesJson
                       : format == "xml"  ? ToolCallFormat::kQwenXml
                                          : ToolCallFormat::kNone;
  options.reasoning = test_case.value("reasoning", false);
  options.thinking_enabled = test_case.value("thinking", true);
  options.tools = tools;
  return options;
}

std::optional<std::string> optional_string(const ordered& value) {
  if (value.is_null()) return std::nullopt;
  return value.get<std::string>();
}

struct Assembled {
  std::string reasoning;
  std::string content;
  std::vector<ParsedToolCall> calls;
  std::string content_before_finish;
};

Assembled stream(const std::string& text, const std::vector<size_t>& cuts,
                 const ChatOutputOptions& options) {
  ChatOutputStream parser(options);
  Assembled out;
  size_t begin = 0;
  auto take = [&](ChatOutputDelta delta) {
    out.reasoning += delta.reasoning;
    out.content += delta.content;
    for (auto& call : delta.tool_calls) out.calls.push_back(std::move(call));
  };
  for (size_t cut : cuts) {
    take(parser.feed(std::string_view(text).substr(begin, cut - begin)));
    begin = cut;
  }
  take(parser.feed(std::string_view(text).substr(begin)));
  out.content_before_finish = out.content;
  take(parser.finish());
  return out;
}

void expect_calls(const std::vector<ParsedToolCall>& calls, const ordered& expected) {
  ASSERT_EQ(calls.size(), expected.size());
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].name, expected[i]["name"].get<std::string>());
    EXPECT_EQ(calls[i].arguments, expected[i]["arguments"].get<std::string>());
  }
}

TEST(ToolCalls, MessagesMatchTheFixtures) {
  const ordered data = fixture();
  ASSERT_GE(data["cases"].size(), 30u);
  for (const ordered& test_case : data["cases"]) {
    SCOPED_TRACE(test_case["name"].get<std::string>());
    const ChatOutputOptions options = options_of(test_case, data["tools"]);
    const ChatOutputMessage message =
        parse_chat_output(test_case["text"].get<std::string>(), options);
    EXPECT_EQ(message.content, optional_string(test_case["content"]));
    if (options.reasoning) {
      EXPECT_EQ(message.reasoning, optional_string(test_case["reasoning_content"]));
    }
    expect_calls(message.tool_calls, test_case["tool_calls"]);
  }
}

TEST(ToolCalls, StreamedDeltasAssembleToTheMessage) {
  const ordered data = fixture();
  std::mt19937 rng(14);
  for (const ordered& test_case : data["cases"]) {
    SCOPED_TRACE(test_case["name"].get<std::string>());
    const ChatOutputOptions options = options_of(test_case, data["tools"]);
    const std::string text = test_case["text"].get<std::string>();
    const ChatOutputMessage message = parse_chat_output(text, options);
    std::vector<std::vector<size_t>> cuttings;
    // Fixed chunk sizes (1 byte: every tag arrives split at every position) and random cuts.
    for (size_t chunk = 1; chunk <= 7; ++chunk) {
      std::vector<size_t> cuts;
      for (size_t at = chunk; at < text.size(); at += chunk) cuts.push_back(at);
      cuttings.push_back(cuts);
    }
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<size_t> cuts;
      for (size_t at = 1 + rng() % 9; at < text.size(); at += 1 + rng() % 9) cuts.push_back(at);
      cuttings.push_back(cuts);
    }
    cuttings.push_back({});  // the whole output in one delta
    for (const auto& cuts : cuttings) {
      const Assembled assembled = stream(text, cuts, options);
      EXPECT_EQ(assembled.reasoning, message.reasoning.value_or(""));
      EXPECT_EQ(assembled.content, message.content.value_or(""));
      expect_calls(assembled.calls, test_case["tool_calls"]);
    }
  }
}

TEST(ToolCalls, ContentBeforeACallStreamsBeforeTheEnd) {
  ChatOutputOptions options;
  options.tool_calls = ToolCallFormat::kHermesJson;
  const std::string text =
      "Let me check.\n<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>";
  std::vector<size_t> every_byte;
  for (size_t at = 1; at < text.size(); ++at) every_byte.push_back(at);
  const Assembled assembled = stream(text, every_byte, options);
  EXPECT_EQ(assembled.content_before_finish, "Let me check.\n");
  ASSERT_EQ(assembled.calls.size(), 1u);
  // A tag prefix is held back until it is known not to be a tag.
  ToolCallStream held(ToolCallFormat::kHermesJson, ordered::array());
  EXPECT_EQ(held.feed("a <tool"), "a ");
  EXPECT_EQ(held.feed("bar> b"), "<toolbar> b");
  ToolCallStream xml(ToolCallFormat::kQwenXml, ordered::array());
  EXPECT_EQ(xml.feed("x <funct"), "x ");
  EXPECT_EQ(xml.feed("ion=ping>"), "");
  EXPECT_EQ(xml.finish().calls.size(), 1u);
}

TEST(ToolCalls, ReasoningStreamsAsItIsWritten) {
  ReasoningStream parser(/*thinking_enabled=*/true);
  EXPECT_EQ(parser.feed("<thi").reasoning, "");  // may still be <think>
  EXPECT_EQ(parser.feed("nk>step one").reasoning, "step one");
  EXPECT_EQ(parser.feed(", two</th").reasoning, ", two");
  ReasoningStream::Delta end = parser.feed("ink>\n\nanswer");
  EXPECT_EQ(end.reasoning, "");
  EXPECT_EQ(end.content, "\n\nanswer");
  EXPECT_EQ(parser.feed(" more").content, " more");
  // A <tool_call> in the reasoning is held until it proves not to open a function.
  ReasoningStream mention(true);
  EXPECT_EQ(mention.feed("see <tool_call>").reasoning, "see ");
  EXPECT_EQ(mention.feed(" <fun").reasoning, "");
  EXPECT_EQ(mention.feed("ny>").reasoning, "<tool_call> <funny>");
}

}  // namespace
}  // namespace keel::server
