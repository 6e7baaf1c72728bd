// Each renderer follows its template's program step by step (tests/fixtures/chat_templates/
// qwen3_official.jinja and qwen3_5_official.jinja; goldens from transformers in
// qwen3_tools.json, qwen3_5_tools.json). Where a template silently renders nothing for a
// message (Qwen3 and an unknown role), keel refuses instead: a dropped message is a different
// question than the one asked.
#include "runtime/tokenizer/qwen_templates.h"

#include "kernels/base/check.h"
#include "runtime/common/python_json.h"
#include "runtime/common/python_text.h"

namespace keel {

namespace {

constexpr std::string_view kQwen3ToolsHead =
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\n<tools>";
constexpr std::string_view kQwen3ToolsTail =
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";

constexpr std::string_view kQwen35ToolsHead =
    "# Tools\n\nYou have access to the following functions:\n\n<tools>";
constexpr std::string_view kQwen35ToolsTail =
    "\n\nIf you choose to call a function ONLY reply in the following format with NO "
    "suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>"
    "\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second "
    "parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is "
    "no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>";

// The text as it appears inside a Jinja string literal of the template source.
std::string jinja_escaped(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

// The template's loop that finds the last user turn that is a real query (not a tool response
// passed back as a user message); `content_of` is how the template reads a user's content.
template <typename ContentOf>
std::optional<size_t> last_query_index(const std::vector<ChatTurn>& turns, ContentOf content_of) {
  for (size_t i = turns.size(); i-- > 0;) {
    if (turns[i].role != "user") continue;
    const std::string content = content_of(turns[i]);
    if (!(starts_with(content, "<tool_response>") && ends_with(content, "</tool_response>")))
      return i;
  }
  return std::nullopt;
}

// Reasoning and answer of an assistant turn that carries its <think> block inline.
void split_inline_reasoning(std::string& content, std::string& reasoning) {
  const std::string_view text = content;
  reasoning = std::string(lstrip_chars(
      after_last(rstrip_chars(before_first(text, "</think>"), "\n"), "<think>"), "\n"));
  content = std::string(lstrip_chars(after_last(text, "</think>"), "\n"));
}

std::string tools_list(const nlohmann::ordered_json& tools) {
  std::string out;
  for (const auto& tool : tools) out += "\n" + python_json_dumps(tool);
  return out;
}

}  // namespace

void recognise_qwen_template(std::string_view chat_template, ChatTemplateInfo& info) {
  if (!contains(chat_template, "enable_thinking")) return;
  if (contains(chat_template, jinja_escaped(kQwen35ToolsHead)) &&
      contains(chat_template, jinja_escaped(kQwen35ToolsTail))) {
    info.dialect = ChatMLDialect::kQwen3_5;
    info.family = "qwen3.5";
    info.tool_call_syntax = ToolCallSyntax::kQwenXml;
    info.thinking_switch = true;
    // Published Qwen3.5 templates open <think> unless enable_thinking is false; the small
    // models' variant only when it is true.
    info.thinking_default = !contains(chat_template, "enable_thinking is true");
    info.keeps_earlier_reasoning =
        contains(chat_template, "loop.index0 > ns.last_query_index or reasoning_content");
  } else if (contains(chat_template, jinja_escaped(kQwen3ToolsHead)) &&
             contains(chat_template, jinja_escaped(kQwen3ToolsTail)) &&
             contains(chat_template, "reasoning_content")) {
    info.dialect = ChatMLDialect::kQwen3;
    info.family = "qwen3";
    info.tool_call_syntax = ToolCallSyntax::kHermesJson;
    info.thinking_switch = true;
    info.thinking_default = true;  // the model opens <think> itself unless told not to
  }
}

std::string render_qwen3(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                         const ChatRenderOptions& options) {
  std::string out;
  const bool leading_system = !turns.empty() && turns[0].role == "system";
  if (!options.tools.empty()) {
    out += "<|im_start|>system\n";
    if (leading_system) out += turns[0].content + "\n\n";
    out += std::string(kQwen3ToolsHead) + tools_list(options.tools) + std::string(kQwen3ToolsTail);
  } else if (leading_system) {
    out += "<|im_start|>system\n" + turns[0].content + "<|im_end|>\n";
  }
  // The template defaults the index to the last message when no user turn is a query.
  const size_t query = last_query_index(turns, [](const ChatTurn& turn) {
                         return turn.content;
                       }).value_or(turns.empty() ? 0 : turns.size() - 1);
  for (size_t i = 0; i < turns.size(); ++i) {
    const ChatTurn& turn = turns[i];
    const bool last = i + 1 == turns.size();
    if (turn.role == "user" || (turn.role == "system" && i > 0)) {
      out += "<|im_start|>" + turn.role + "\n" + turn.content + "<|im_end|>\n";
    } else if (turn.role == "assistant") {
      std::string content = turn.content;
      std::string reasoning;
      if (turn.reasoning_content) {
        reasoning = *turn.reasoning_content;
      } else if (contains(content, "</think>")) {
        split_inline_reasoning(content, reasoning);
      }
      if ((i > query || !reasoning.empty()) && (last || !reasoning.empty())) {
        out += "<|im_start|>assistant\n<think>\n" + std::string(strip_chars(reasoning, "\n")) +
               "\n</think>\n\n" + std::string(lstrip_chars(content, "\n"));
      } else {
        out += "<|im_start|>assistant\n" + content;
      }
      for (size_t j = 0; j < turn.tool_calls.size(); ++j) {
        if (j > 0 || !content.empty()) out += "\n";
        out += "<tool_call>\n{\"name\": \"" + turn.tool_calls[j].name +
               "\", \"arguments\": " + python_json_dumps(turn.tool_calls[j].arguments) +
               "}\n</tool_call>";
      }
      out += "<|im_end|>\n";
    } else if (turn.role == "tool") {
      if (i == 0 || turns[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + turn.content + "\n</tool_response>";
      if (last || turns[i + 1].role != "tool") out += "<|im_end|>\n";
    } else if (turn.role != "system") {
      throw_error("chat template (", info.family, "): message ", i, " has role '", turn.role,
                  "', which the template does not render (it would be dropped); use system, "
                  "user, assistant or tool");
    }
  }
  out += "<|im_start|>assistant\n";
  if (!options.enable_thinking.value_or(info.thinking_default)) out += "<think>\n\n</think>\n\n";
  return out;
}

namespace {

// Qwen3.5's render_content loops over a list of parts and writes each text as it is (vLLM
// detects the loop and hands the template the list), where other templates get them joined.
std::string looped_content(const ChatTurn& turn) {
  if (turn.content_parts.empty()) return turn.content;
  std::string text;
  for (const std::string& part : turn.content_parts) text += part;
  return text;
}

}  // namespace

std::string render_qwen3_5(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                           const ChatRenderOptions& options) {
  auto fail = [&](std::string_view reason) {
    throw_error("chat template (", info.family, "): ", reason);
  };
  if (turns.empty()) fail("No messages provided.");
  std::string out;
  const bool leading_system = turns[0].role == "system";
  if (!options.tools.empty()) {
    out += "<|im_start|>system\n" + std::string(kQwen35ToolsHead) + tools_list(options.tools) +
           "\n</tools>" + std::string(kQwen35ToolsTail);
    if (leading_system) {
      const std::string system = python_strip(looped_content(turns[0]));
      if (!system.empty()) out += "\n\n" + system;
    }
    out += "<|im_end|>\n";
  } else if (leading_system) {
    out += "<|im_start|>system\n" + python_strip(looped_content(turns[0])) + "<|im_end|>\n";
  }
  const std::optional<size_t> query = last_query_index(
      turns, [](const ChatTurn& turn) { return python_strip(looped_content(turn)); });
  if (!query) fail("No user query found in messages.");
  for (size_t i = 0; i < turns.size(); ++i) {
    const ChatTurn& turn = turns[i];
    const bool last = i + 1 == turns.size();
    std::string content = python_strip(looped_content(turn));
    if (turn.role == "system") {
      if (i > 0) fail("System message must be at the beginning.");
    } else if (turn.role == "user") {
      out += "<|im_start|>user\n" + content + "<|im_end|>\n";
    } else if (turn.role == "assistant") {
      std::string reasoning;
      if (turn.reasoning_content) {
        reasoning = *turn.reasoning_content;
      } else if (contains(content, "</think>")) {
        split_inline_reasoning(content, reasoning);
      }
      reasoning = python_strip(reasoning);
      if (i > *query || (info.keeps_earlier_reasoning && !reasoning.empty())) {
        out += "<|im_start|>assistant\n<think>\n" + reasoning + "\n</think>\n\n" + content;
      } else {
        out += "<|im_start|>assistant\n" + content;
      }
      for (size_t j = 0; j < turn.tool_calls.size(); ++j) {
        const ChatToolCall& call = turn.tool_calls[j];
        if (j > 0) {
          out += "\n";
        } else if (!python_strip(content).empty()) {
          out += "\n\n";
        }
        out += "<tool_call>\n<function=" + call.name + ">\n";
        for (const auto& [name, value] : call.arguments.items()) {
          out += "<parameter=" + name + ">\n" +
                 (value.is_structured() ? python_json_dumps(value) : python_str(value)) +
                 "\n</parameter>\n";
        }
        out += "</function>\n</tool_call>";
      }
      out += "<|im_end|>\n";
    } else if (turn.role == "tool") {
      if (i > 0 && turns[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + content + "\n</tool_response>";
      if (last || turns[i + 1].role != "tool") out += "<|im_end|>\n";
    } else {
      fail("Unexpected message role.");
    }
  }
  out += "<|im_start|>assistant\n";
  out += options.enable_thinking.value_or(info.thinking_default) ? "<think>\n"
                                                                 : "<think>\n\n</think>\n\n";
  return out;
}

}  // namespace keel
