// Chat templates without Jinja: a model's tokenizer_config.json names its chat_template as a
// Jinja program; keel recognises which well-known family the program is (ChatML, Llama-3,
// Mistral [INST]) and renders conversations for it in C++, byte for byte as HF transformers'
// apply_chat_template(add_generation_prompt=True, tokenize=False) does for the standard
// templates (tests/test_chat_template.cpp checks against goldens made by transformers).
// Kept free of the server library: callers convert their message type to ChatTurn.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace keel {

enum class ChatFamily {
  kChatML,  // <|im_start|>role\ncontent<|im_end|>\n (Qwen2/Qwen2.5/Qwen3)
  kLlama3,  // <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kMistral  // <s>[INST] user [/INST]assistant</s> (Mistral / Mixtral / Llama-2 style)
};

struct ChatTurn {
  std::string role;  // "system", "user", "assistant" (others render as given in ChatML/Llama-3)
  std::string content;
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

// The prompt text for `turns` followed by the generation prompt for the assistant. Mistral's
// template forbids some conversations (roles not alternating user/assistant after an optional
// leading system message): keel::Error, as HF raises.
std::string render_chat(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns);

}  // namespace keel
