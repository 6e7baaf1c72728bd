// Reasoning text of Qwen3 / Qwen3.5 outputs, separated as vLLM's qwen3 reasoning parser does:
//   - thinking disabled (chat_template_kwargs.enable_thinking false): everything is content;
//   - a leading <think> is dropped (Qwen3 writes it, Qwen3.5's prompt already opened it);
//   - reasoning runs to the first </think>, the content follows it;
//   - without </think>, a first <tool_call> followed (after whitespace) by <function= or
//     <function + whitespace ends the reasoning there (Qwen3.5 may call a tool from inside its
//     thinking); otherwise the output was cut short and all of it is reasoning.
// Where keel differs from vLLM, for streaming's sake: vLLM's non-streamed parser drops the text
// before a <think> found anywhere, and splits at </think> even with thinking disabled (its
// streamed parser does neither); keel does neither in both modes, so that the streamed deltas
// (ReasoningStream) concatenate to exactly split_reasoning's result.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace keel::server {

struct ReasoningSplit {
  std::optional<std::string> reasoning;  // nullopt: none (vLLM answers null)
  std::optional<std::string> content;    // nullopt: none
};

ReasoningSplit split_reasoning(std::string_view text, bool thinking_enabled);

class ReasoningStream {
 public:
  explicit ReasoningStream(bool thinking_enabled) : thinking_enabled_(thinking_enabled) {}

  struct Delta {
    std::string reasoning;
    std::string content;
  };
  // What can be sent now; text that may still turn out to be a tag is held back.
  Delta feed(std::string_view delta);
  // The end of the output: everything held, placed as split_reasoning places it.
  Delta finish();

 private:
  enum class Phase { kStart, kReasoning, kContent };
  Delta advance(bool at_end);

  bool thinking_enabled_;
  Phase phase_ = Phase::kStart;
  std::string text_;                       // the output after a leading <think>
  size_t sent_reasoning_ = 0;              // bytes of text_ sent as reasoning
  size_t first_call_ = std::string::npos;  // where the first <tool_call> starts, once seen
  bool first_call_checked_ = false;        // it is known not to end the reasoning
};

}  // namespace keel::server
