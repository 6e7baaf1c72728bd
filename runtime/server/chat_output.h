// A chat choice's output turned into an assistant message: reasoning first (reasoning.h), then
// tool calls in what remains (tool_calls.h), as vLLM's serving layer chains its reasoning and
// tool parsers. parse_chat_output reads a finished output; ChatOutputStream turns text deltas
// into message deltas that assemble to exactly parse_chat_output's message.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/server/reasoning.h"
#include "runtime/server/tool_calls.h"

namespace keel::server {

struct ChatOutputOptions {
  bool reasoning = false;        // separate <think> reasoning (Qwen3 / Qwen3.5 templates)
  bool thinking_enabled = true;  // the prompt left thinking on
  // vLLM's include_reasoning: false still splits the reasoning off, then drops it.
  bool include_reasoning = true;
  ToolCallFormat tool_calls = ToolCallFormat::kNone;  // kNone: tools absent or tool_choice none
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();

  bool parses() const { return reasoning || tool_calls != ToolCallFormat::kNone; }
};

struct ChatOutputMessage {
  std::optional<std::string> reasoning;  // only meaningful with options.reasoning
  std::optional<std::string> content;
  std::vector<ParsedToolCall> tool_calls;
};

ChatOutputMessage parse_chat_output(std::string_view text, const ChatOutputOptions& options);

struct ChatOutputDelta {
  std::string reasoning;
  std::string content;
  std::vector<ParsedToolCall> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
};

class ChatOutputStream {
 public:
  explicit ChatOutputStream(const ChatOutputOptions& options);
  ChatOutputDelta feed(std::string_view text);
  ChatOutputDelta finish();

 private:
  ReasoningStream reasoning_;
  ToolCallStream tool_calls_;
  bool reasoning_on_;
  bool include_reasoning_;
};

}  // namespace keel::server
