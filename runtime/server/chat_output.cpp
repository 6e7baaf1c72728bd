#include "runtime/server/chat_output.h"

namespace keel::server {

ChatOutputMessage parse_chat_output(std::string_view text, const ChatOutputOptions& options) {
  ChatOutputMessage message;
  if (options.reasoning) {
    ReasoningSplit split = split_reasoning(text, options.thinking_enabled);
    message.reasoning = std::move(split.reasoning);
    message.content = std::move(split.content);
    if (!options.include_reasoning) message.reasoning.reset();
  } else {
    message.content = std::string(text);
  }
  if (options.tool_calls == ToolCallFormat::kNone) return message;
  ToolCallExtraction extraction =
      extract_tool_calls(options.tool_calls, message.content.value_or(""), options.tools);
  if (extraction.tools_called) {
    message.content = std::move(extraction.content);
    message.tool_calls = std::move(extraction.calls);
  }
  return message;
}

ChatOutputStream::ChatOutputStream(const ChatOutputOptions& options)
    : reasoning_(options.thinking_enabled),
      tool_calls_(options.tool_calls, options.tools),
      reasoning_on_(options.reasoning),
      include_reasoning_(options.include_reasoning) {}

ChatOutputDelta ChatOutputStream::feed(std::string_view text) {
  ChatOutputDelta delta;
  if (reasoning_on_) {
    ReasoningStream::Delta split = reasoning_.feed(text);
    if (include_reasoning_) delta.reasoning = std::move(split.reasoning);
    delta.content = tool_calls_.feed(split.content);
  } else {
    delta.content = tool_calls_.feed(text);
  }
  return delta;
}

ChatOutputDelta ChatOutputStream::finish() {
  ChatOutputDelta delta;
  if (reasoning_on_) {
    ReasoningStream::Delta split = reasoning_.finish();
    if (include_reasoning_) delta.reasoning = std::move(split.reasoning);
    delta.content = tool_calls_.feed(split.content);
  }
  ToolCallStream::Final final = tool_calls_.finish();
  delta.content += final.content;
  delta.tool_calls = std::move(final.calls);
  return delta;
}

}  // namespace keel::server
