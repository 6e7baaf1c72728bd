#include "runtime/server/reasoning.h"

#include <algorithm>

#include "runtime/common/python_text.h"

namespace keel::server {

namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kToolCallOpen = "<tool_call>";
constexpr std::string_view kFunction = "<function";

enum class CallStart { kYes, kNo, kUndecided };

// Whether the text after a <tool_call> begins (after whitespace) with <function[\s=]; undecided
// while what is there could still grow into that.
CallStart follows_function(std::string_view after) {
  const std::string_view rest = python_lstrip(after);
  if (rest.size() <= kFunction.size()) {
    return kFunction.substr(0, rest.size()) == rest ? CallStart::kUndecided : CallStart::kNo;
  }
  if (rest.substr(0, kFunction.size()) != kFunction) return CallStart::kNo;
  const std::string_view next = rest.substr(kFunction.size());
  if (next[0] == '=' || starts_with_python_space(next)) return CallStart::kYes;
  // A multi-byte space may be cut short at the end of the text so far.
  return static_cast<unsigned char>(next[0]) >= 0x80 && next.size() < 3 ? CallStart::kUndecided
                                                                        : CallStart::kNo;
}

size_t partial_tag_overlap(std::string_view text, std::string_view tag) {
  for (size_t length = std::min(text.size(), tag.size() - 1); length > 0; --length)
    if (text.substr(text.size() - length) == tag.substr(0, length)) return length;
  return 0;
}

}  // namespace

ReasoningSplit split_reasoning(std::string_view text, bool thinking_enabled) {
  if (!thinking_enabled) return {std::nullopt, std::string(text)};
  if (text.substr(0, kThinkOpen.size()) == kThinkOpen) text.remove_prefix(kThinkOpen.size());
  auto or_null = [](std::string_view part) -> std::optional<std::string> {
    if (part.empty()) return std::nullopt;
    return std::string(part);
  };
  if (const size_t close = text.find(kThinkClose); close != std::string_view::npos)
    return {std::string(text.substr(0, close)), or_null(text.substr(close + kThinkClose.size()))};
  if (const size_t call = text.find(kToolCallOpen); call != std::string_view::npos) {
    if (follows_function(text.substr(call + kToolCallOpen.size())) == CallStart::kYes)
      return {or_null(text.substr(0, call)), or_null(text.substr(call))};
  }
  return {std::string(text), std::nullopt};
}

ReasoningStream::Delta ReasoningStream::feed(std::string_view delta) {
  text_ += delta;
  return advance(/*at_end=*/false);
}

ReasoningStream::Delta ReasoningStream::finish() {
  return advance(/*at_end=*/true);
}

ReasoningStream::Delta ReasoningStream::advance(bool at_end) {
  Delta out;
  if (!thinking_enabled_) {
    out.content = std::move(text_);
    text_.clear();
    return out;
  }
  if (phase_ == Phase::kStart) {
    // Wait while the output may still become "<think>".
    if (!at_end && text_.size() < kThinkOpen.size() && kThinkOpen.substr(0, text_.size()) == text_)
      return out;
    if (text_.substr(0, kThinkOpen.size()) == kThinkOpen) text_.erase(0, kThinkOpen.size());
    phase_ = Phase::kReasoning;
  }
  if (phase_ == Phase::kContent) {
    out.content = std::move(text_);
    text_.clear();
    return out;
  }
  const std::string_view text = text_;
  // Searches start where sending stopped: no whole tag lies before it (a partial one is held).
  if (const size_t close = text.find(kThinkClose, sent_reasoning_);
      close != std::string_view::npos) {
    out.reasoning = text.substr(sent_reasoning_, close - sent_reasoning_);
    out.content = text.substr(close + kThinkClose.size());
    phase_ = Phase::kContent;
    text_.clear();
    return out;
  }
  // Reasoning may be sent up to here; past it a tag may be forming.
  size_t sendable = text.size() - partial_tag_overlap(text, kThinkClose);
  if (!first_call_checked_) {
    if (first_call_ == std::string::npos) first_call_ = text.find(kToolCallOpen, sent_reasoning_);
    const size_t call = first_call_;
    if (call == std::string_view::npos) {
      sendable = std::min(sendable, text.size() - partial_tag_overlap(text, kToolCallOpen));
    } else {
      const CallStart start = follows_function(text.substr(call + kToolCallOpen.size()));
      if (start == CallStart::kNo) {
        first_call_checked_ = true;  // only the first <tool_call> can end the reasoning
      } else if (at_end && start == CallStart::kYes) {
        out.reasoning = text.substr(sent_reasoning_, call - sent_reasoning_);
        out.content = text.substr(call);
        phase_ = Phase::kContent;
        text_.clear();
        return out;
      } else {
        // A call may start here: hold it until </think> arrives or the output ends.
        sendable = std::min(sendable, call);
      }
    }
  }
  if (at_end) sendable = text.size();
  if (sendable > sent_reasoning_) {
    out.reasoning = text.substr(sent_reasoning_, sendable - sent_reasoning_);
    sent_reasoning_ = sendable;
  }
  return out;
}

}  // namespace keel::server
