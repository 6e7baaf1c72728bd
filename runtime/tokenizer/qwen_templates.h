// Qwen3's and Qwen3.5's chat templates rendered in C++ (see chat_template.h), and the texts that
// recognise them: a template is taken for one of these only when its Jinja source contains the
// tool instructions verbatim, so a reworded variant falls back to plain ChatML (and refuses
// tools) instead of being rendered with the wrong words.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "runtime/tokenizer/chat_template.h"

namespace keel {

// Fills dialect, tool_call_syntax and the thinking fields when `chat_template` is Qwen3's or
// Qwen3.5's; leaves `info` alone otherwise.
void recognise_qwen_template(std::string_view chat_template, ChatTemplateInfo& info);

std::string render_qwen3(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                         const ChatRenderOptions& options);
std::string render_qwen3_5(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                           const ChatRenderOptions& options);

}  // namespace keel
