// Tool calls in a model's output, read as vLLM's parsers read them: `hermes` for Qwen3's
// <tool_call>{"name", "arguments"}</tool_call> blocks, `qwen3_coder` for Qwen3.5's
// <tool_call><function=NAME><parameter=P>value</parameter></function></tool_call> blocks.
//
// Non-streamed (extract_tool_calls) follows vLLM's extract_tool_calls: the content is the text
// before the first call, and when a block cannot be read (malformed JSON, a JSON block without
// a string "name" or without "arguments", a parameter without '>'), nothing is a tool call and
// the whole text is content.
//
// Streamed (ToolCallStream): text before the first possible call streams as content, holding
// back a suffix that may be the start of a tag split across tokens; from the first tag on,
// everything is held and read at the end with extract_tool_calls. So a streamed response
// assembles to exactly the non-streamed one, malformed blocks included (vLLM's streaming
// parser sends names and argument fragments as they arrive, and cannot take them back when a
// later block turns out malformed). The cost: calls arrive when generation ends, which is where
// a Qwen model stops after calling.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel::server {

enum class ToolCallFormat {
  kNone,        // no parsing: the output is content
  kHermesJson,  // vLLM --tool-call-parser hermes (Qwen3)
  kQwenXml      // vLLM --tool-call-parser qwen3_coder (Qwen3.5)
};

struct ParsedToolCall {
  std::string name;
  std::string arguments;  // a JSON object as text, written as Python's json.dumps writes it
};

struct ToolCallExtraction {
  bool tools_called = false;
  std::vector<ParsedToolCall> calls;
  std::optional<std::string> content;  // nullopt where vLLM answers null (no text before a call)
};

// `tools`: the request's tools list (the XML format converts parameter values by the types of
// the called function's JSON schema; JSON's arguments are already typed).
ToolCallExtraction extract_tool_calls(ToolCallFormat format, std::string_view text,
                                      const nlohmann::ordered_json& tools);

class ToolCallStream {
 public:
  ToolCallStream(ToolCallFormat format, nlohmann::ordered_json tools);

  // The content that can be sent now ("" while a possible tag is held back).
  std::string feed(std::string_view delta);

  struct Final {
    std::string content;  // content not sent yet
    std::vector<ParsedToolCall> calls;
  };
  // The end of the output: what remains, read as extract_tool_calls reads the whole text.
  Final finish();

 private:
  ToolCallFormat format_;
  nlohmann::ordered_json tools_;
  std::string text_;
  size_t sent_ = 0;       // bytes of text_ sent as content
  bool holding_ = false;  // a tag was seen: nothing more is sent before finish()
};

}  // namespace keel::server
