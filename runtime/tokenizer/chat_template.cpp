// Chat-template families rendered in C++ (see chat_template.h for why there is no Jinja).
//
// Recognition looks for each family's marker token in the Jinja source, Llama-3 first since
// its templates are the most specific: "<|start_header_id|>" -> Llama-3, "<|im_start|>" ->
// ChatML, "[INST]" -> Mistral. Qwen2.5's ChatML template injects a default system message when
// the conversation has none; it is recognised by its text "You are Qwen, created by Alibaba
// Cloud" and the message is copied out of the template rather than hard-coded, so a variant
// wording still renders as the template would.
//
// Qwen3's and Qwen3.5's templates are recognised by their tool instructions and rendered in full
// (qwen_templates.h). Not modelled (rendered as the plain family instead): tools in other
// templates (refused), Llama-3.1's date/"Cutting Knowledge" system header, Llama-2's <<SYS>>
// block, Mistral's leading-space variant (" [INST] ").
#include "runtime/tokenizer/chat_template.h"
#include "runtime/common/json_depth.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "kernels/base/check.h"
#include "runtime/common/python_text.h"
#include "runtime/tokenizer/qwen_templates.h"

namespace keel {

namespace {

using nlohmann::json;

constexpr std::string_view kQwenDefaultSystemMarker = "You are Qwen, created by Alibaba Cloud";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error("cannot read ", path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// tokenizer_config.json stores special tokens as a string, null, or (older files) an
// AddedToken object {"__type": "AddedToken", "content": ...}.
std::string token_field(const json& config, const char* key, const std::string& source) {
  if (!config.contains(key) || config[key].is_null()) return "";
  const json& value = config[key];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  throw_error(source, ": '", key, "' must be a string, null or an object with a string 'content'",
              ", found ", value.dump());
}

void add_stop(std::vector<std::string>& stops, const std::string& token) {
  if (token.empty()) return;
  for (const std::string& existing : stops)
    if (existing == token) return;
  stops.push_back(token);
}

ChatTemplateInfo default_chatml(const std::string& reason, std::string bos, std::string eos) {
  ChatTemplateInfo info = chat_template_from_jinja("", std::move(bos), std::move(eos));
  info.family = "chatml (default: " + reason + ")";
  return info;
}

// Picks the template text out of tokenizer_config's chat_template: a string, or a list of
// {"name", "template"} where "default" applies (else the first entry). nullopt when absent.
std::optional<std::string> template_field(const json& config, const std::string& source) {
  if (!config.contains("chat_template") || config["chat_template"].is_null()) return std::nullopt;
  const json& value = config["chat_template"];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array() && !value.empty()) {
    const json* chosen = &value[0];
    for (const json& entry : value)
      if (entry.is_object() && entry.value("name", "") == "default") chosen = &entry;
    if (chosen->is_object() && chosen->contains("template") && (*chosen)["template"].is_string())
      return (*chosen)["template"].get<std::string>();
  }
  throw_error(source, ": 'chat_template' must be a string or a non-empty list of ",
              "{\"name\", \"template\"} objects, found ", value.dump().substr(0, 200));
}

ChatTemplateInfo from_config(std::string_view text, const std::string& source,
                             const std::string& model_dir) {
  check_json_depth(text, source);
  json config;
  try {
    config = json::parse(text);
  } catch (const json::parse_error& error) {
    throw_error(source, ": malformed JSON: ", error.what());
  }
  if (!config.is_object()) throw_error(source, ": expected a JSON object at the top level");
  std::string bos = token_field(config, "bos_token", source);
  std::string eos = token_field(config, "eos_token", source);
  std::optional<std::string> chat_template = template_field(config, source);
  // transformers 5 writes the template to chat_template.jinja instead of the config.
  std::string jinja_path = model_dir.empty() ? "" : model_dir + "/chat_template.jinja";
  if (!chat_template && !jinja_path.empty() && std::filesystem::exists(jinja_path))
    chat_template = read_file(jinja_path);
  if (!chat_template) return default_chatml("no chat_template", std::move(bos), std::move(eos));
  ChatTemplateInfo info = chat_template_from_jinja(*chat_template, std::move(bos), std::move(eos));
  return info;
}

}  // namespace

ChatTemplateInfo chat_template_from_jinja(std::string_view chat_template, std::string bos_token,
                                          std::string eos_token) {
  ChatTemplateInfo info;
  info.bos_token = std::move(bos_token);
  info.eos_token = std::move(eos_token);
  auto contains = [&](std::string_view marker) {
    return chat_template.find(marker) != std::string_view::npos;
  };
  if (contains("<|start_header_id|>")) {
    info.kind = ChatFamily::kLlama3;
    info.family = "llama3";
    // Llama-3 Instruct's generation_config ends on either; eos_token is one of them.
    add_stop(info.stop_tokens, "<|eot_id|>");
    add_stop(info.stop_tokens, "<|end_of_text|>");
  } else if (contains("<|im_start|>")) {
    info.kind = ChatFamily::kChatML;
    info.family = "chatml";
    size_t marker = chat_template.find(kQwenDefaultSystemMarker);
    if (marker != std::string_view::npos) {
      // The message runs to the end of its Jinja string literal or to <|im_end|>.
      size_t end = chat_template.size();
      for (std::string_view terminator : {"<|im_end|>", "'", "\""})
        end = std::min(end, chat_template.find(terminator, marker));
      info.default_system = std::string(chat_template.substr(marker, end - marker));
      info.family = "chatml (Qwen2.5 default system prompt)";
    } else {
      recognise_qwen_template(chat_template, info);
    }
    // Qwen's generation_config lists both <|im_end|> and <|endoftext|> as eos.
    add_stop(info.stop_tokens, "<|im_end|>");
    add_stop(info.stop_tokens, "<|endoftext|>");
  } else if (contains("[INST]")) {
    info.kind = ChatFamily::kMistral;
    info.family = "mistral";
    add_stop(info.stop_tokens, info.eos_token.empty() ? "</s>" : info.eos_token);
  } else {
    info.kind = ChatFamily::kChatML;
    info.family = chat_template.empty() ? "chatml" : "chatml (default: unrecognised chat_template)";
    add_stop(info.stop_tokens, "<|im_end|>");
    add_stop(info.stop_tokens, "<|endoftext|>");
  }
  add_stop(info.stop_tokens, info.eos_token);
  return info;
}

ChatTemplateInfo chat_template_from_config(std::string_view tokenizer_config_json,
                                           const std::string& source_name) {
  return from_config(tokenizer_config_json, source_name, "");
}

ChatTemplateInfo load_chat_template(const std::string& model_dir) {
  std::string path = model_dir + "/tokenizer_config.json";
  if (!std::filesystem::exists(path))
    return default_chatml("no tokenizer_config.json", "", "<|im_end|>");
  return from_config(read_file(path), path, model_dir);
}

std::string render_chat(const ChatTemplateInfo& info, const std::vector<ChatTurn>& turns,
                        const ChatRenderOptions& options) {
  if (info.tool_call_syntax == ToolCallSyntax::kNone) {
    if (!options.tools.empty())
      throw_error("chat template (", info.family, ") does not render tools; keel renders them ",
                  "for Qwen3's and Qwen3.5's templates");
    for (size_t i = 0; i < turns.size(); ++i)
      if (!turns[i].tool_calls.empty())
        throw_error("chat template (", info.family, ") does not render tool calls (message ", i,
                    "); keel renders them for Qwen3's and Qwen3.5's templates");
  }
  if (options.enable_thinking && !info.thinking_switch)
    throw_error("chat template (", info.family, ") has no enable_thinking switch");
  if (info.dialect == ChatMLDialect::kQwen3) return render_qwen3(info, turns, options);
  if (info.dialect == ChatMLDialect::kQwen3_5) return render_qwen3_5(info, turns, options);
  std::string out;
  switch (info.kind) {
    case ChatFamily::kChatML: {
      if (!info.default_system.empty() && (turns.empty() || turns[0].role != "system"))
        out += "<|im_start|>system\n" + info.default_system + "<|im_end|>\n";
      for (const ChatTurn& turn : turns)
        out += "<|im_start|>" + turn.role + "\n" + turn.content + "<|im_end|>\n";
      out += "<|im_start|>assistant\n";
      break;
    }
    case ChatFamily::kLlama3: {
      for (size_t i = 0; i < turns.size(); ++i) {
        if (i == 0) out += info.bos_token;
        out += "<|start_header_id|>" + turns[i].role + "<|end_header_id|>\n\n" +
               python_strip(turns[i].content) + "<|eot_id|>";
      }
      out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    }
    case ChatFamily::kMistral: {
      // An optional leading system message is folded into the first user turn; after it,
      // roles must alternate user/assistant. The template has no generation prompt: the
      // assistant's reply follows "[/INST]" directly.
      size_t first = 0;
      const std::string* system = nullptr;
      if (!turns.empty() && turns[0].role == "system") {
        system = &turns[0].content;
        first = 1;
      }
      out += info.bos_token;
      for (size_t i = first; i < turns.size(); ++i) {
        const ChatTurn& turn = turns[i];
        bool expect_user = (i - first) % 2 == 0;
        if ((turn.role == "user") != expect_user)
          throw_error("chat template (", info.family, "): after the optional system message, ",
                      "roles must alternate user/assistant/user/...; message ", i, " is '",
                      turn.role, "'");
        if (turn.role == "user") {
          out += "[INST] ";
          if (i == first && system) out += *system + "\n\n";
          out += turn.content + " [/INST]";
        } else if (turn.role == "assistant") {
          out += turn.content + info.eos_token;
        } else {
          throw_error("chat template (", info.family, "): only user and assistant roles are ",
                      "supported after an optional first system message; message ", i, " is '",
                      turn.role, "'");
        }
      }
      break;
    }
  }
  return out;
}

}  // namespace keel
