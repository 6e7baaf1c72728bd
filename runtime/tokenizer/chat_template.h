// Chat templates without Jinja: a model's tokenizer_config.json names its chat_template as a
// Jinja program; keel recognises which well-known family the program is (ChatML, Llama-3,
// Mistral [INST]) and renders conversations for it in C++, byte for byte as HF transformers'
// apply_chat_template(add_generation_prompt=True, tokenize=False) does for the standard
// templates (tests/test_chat_template.cpp checks against goldens made by transformers).
// Two ChatML programs are rendered with everything they do: Qwen3's and Qwen3.5's templates
// (tools in the system prompt, assistant tool calls and tool results in the history, <think>
// blocks of earlier turns, the enable_thinking switch).
// Kept free of the server library: callers convert their message type to ChatTurn.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel {

enum class ChatFamily {
  kChatML,  // <|im_start|>role\ncontent<|im_end|>\n (Qwen2/Qwen2.5/Qwen3)
  kLlama3,  // <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kMistral  // <s>[INST] user [/INST]assistant</s> (Mistral / Mixtral / Llama-2 style)
};

// ChatML templates whose program does more than ChatML's loop.
enum class ChatMLDialect {
  kPlain,
  kQwen3,   // Qwen3 (Qwen3-0.6B .. Qwen3-235B-A22B): hermes-style JSON tool calls
  kQwen3_5  // Qwen3.5: XML tool calls, <think> opened by the generation prompt
};

// How the model writes a tool call, which decides the output parser.
enum class ToolCallSyntax {
  kNone,        // the template renders no tools
  kHermesJson,  // <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> (Qwen3)
  kQwenXml      // <tool_call>\n<function=NAME>\n<parameter=P>\nV\n</parameter>... (Qwen3.5)
};

// One call of an assistant turn in the history. Arguments are the client's JSON string parsed
// (templates render them as a mapping), keys in the client's order.
struct ChatToolCall {
  std::string name;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::object();
};

struct ChatTurn {
  ChatTurn() = default;
  ChatTurn(std::string role_in, std::string content_in)
      : role(std::move(role_in)), content(std::move(content_in)) {}

  std::string role;  // "system", "user", "assistant", "tool" (others render as given in
                     // plain ChatML/Llama-3)
  std::string content;
  // Text parts when the message's content was a list (content is them joined with "\n", as
  // vLLM joins them for templates that take a string); templates that loop over content
  // (Qwen3.5's) concatenate them instead.
  std::vector<std::string> content_parts;
  std::vector<ChatToolCall> tool_calls;          // assistant turns
  std::optional<std::string> reasoning_content;  // assistant turns (vLLM's field)
};

// What a request adds to its messages.
struct ChatRenderOptions {
  nlohmann::ordered_json tools = nlohmann::ordered_json::array();  // the request's list, as sent
  std::optional<bool> enable_thinking;  // chat_template_kwargs.enable_thinking; unset: default
};

struct ChatTemplateInfo {
  ChatFamily kind = ChatFamily::kChatML;
  // For logs: "chatml", "chatml (Qwen2.5 default system prompt)", "llama3", "mistral", or
  // "chatml (default: no tokenizer_config.json)" / "chatml (default: unrecognised
  // chat_template)" / "chatml (default: no chat_template)" when keel fell back.
  std::string family;
  std::string bos_token;  // "" when the model has none (tokenizer_config "bos_token": null)
  std::string eos_token;
  // Token strings that end an assistant turn for this family (e.g. <|im_end|>, <|eot_id|>,
  // </s>, plus eos_token): the engine should treat their ids as end-of-sequence.
  std::vector<std::string> stop_tokens;
  // ChatML only: system message injected when the conversation does not start with one
  // (Qwen2.5's template does this); "" for none.
  std::string default_system;
  ChatMLDialect dialect = ChatMLDialect::kPlain;
  ToolCallSyntax tool_call_syntax = ToolCallSyntax::kNone;  // kNone: tools are refused
  bool thinking_switch = false;                             // the template reads enable_thinking
  bool thinking_default = false;  // the model thinks when the request does not say
  // Qwen3.5: an assistant turn before the last user query keeps its <think> block when it has
  // reasoning (published copies differ; read from the template).
  bool keeps_earlier_reasoning = false;
};

// Reads model_dir/tokenizer_config.json (chat_template from model_dir/chat_template.jinja when
// the config has none, as transformers 5 saves it). No file, no template or an unrecognised
// one -> ChatML with `family` saying why. Malformed JSON -> keel::Error naming the file.
ChatTemplateInfo load_chat_template(const std::string& model_dir);
// The same from tokenizer_config.json text; source_name is used in error messages.
ChatTemplateInfo chat_template_from_config(std::string_view tokenizer_config_json,
                                           const std::string& source_name);
// Recognises a family from a Jinja chat_template string (the fallback family is ChatML).
ChatTemplateInfo chat_template_from_jinja(std::string_view chat_template, std::string bos_token,
                                          std::string eos_token);

// The prompt text for `turns` followed by the generation prompt for the assistant. Where the
// template raises (Mistral: roles not alternating user/assistant after an optional leading
// system message; Qwen3.5: a late system message, no user query, an unknown role), keel::Error
// with the template's reason. Tools or tool calls given to a template that renders none, and
// roles a template silently drops, are keel::Error too.
std::string render_chat(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                        const ChatRenderOptions& options = {});

}  // namespace keel
