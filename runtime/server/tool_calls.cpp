#include "runtime/server/tool_calls.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <stdexcept>

#include "runtime/common/python_json.h"
#include "runtime/common/python_text.h"

namespace keel::server {

namespace {

using ordered = nlohmann::ordered_json;

constexpr std::string_view kToolCallOpen = "<tool_call>";
constexpr std::string_view kToolCallClose = "</tool_call>";
constexpr std::string_view kFunctionOpen = "<function=";
constexpr std::string_view kFunctionClose = "</function>";
constexpr std::string_view kParameterOpen = "<parameter=";
constexpr std::string_view kParameterClose = "</parameter>";

// A block the parser cannot read: the whole output becomes content, as vLLM's `except` does.
struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

std::optional<std::string> content_or_null(std::string_view text) {
  if (text.empty()) return std::nullopt;
  return std::string(text);
}

ToolCallExtraction no_calls(std::string_view text) {
  return ToolCallExtraction{false, {}, std::string(text)};
}

// Regex `$` (no MULTILINE) also matches before a final newline; a lazy group that runs to `$`
// stops there.
size_t lazy_end(std::string_view text) {
  return !text.empty() && text.back() == '\n' ? text.size() - 1 : text.size();
}

// ---- hermes ----------------------------------------------------------------------------------

ToolCallExtraction extract_hermes(std::string_view text) {
  const size_t first = text.find(kToolCallOpen);
  if (first == std::string_view::npos) return no_calls(text);
  // <tool_call>(.*?)</tool_call>|<tool_call>(.*) with DOTALL: closed blocks, then an unclosed
  // last one running to the end.
  std::vector<std::string_view> blocks;
  for (size_t at = first; at != std::string_view::npos; at = text.find(kToolCallOpen, at)) {
    const size_t body = at + kToolCallOpen.size();
    const size_t close = text.find(kToolCallClose, body);
    if (close == std::string_view::npos) {
      blocks.push_back(text.substr(body));
      break;
    }
    blocks.push_back(text.substr(body, close - body));
    at = close + kToolCallClose.size();
  }
  ToolCallExtraction result;
  for (std::string_view block : blocks) {
    const ordered call = ordered::parse(block, nullptr, /*allow_exceptions=*/false);
    // json.loads, then call["name"] (a string, for the response's FunctionCall) and
    // call["arguments"]: any failure makes the whole output content.
    if (call.is_discarded() || !call.is_object() || !call.contains("name") ||
        !call["name"].is_string() || !call.contains("arguments"))
      return no_calls(text);
    result.calls.push_back({call["name"].get<std::string>(), python_json_dumps(call["arguments"])});
  }
  result.tools_called = true;
  result.content = content_or_null(text.substr(0, first));
  return result;
}

// ---- qwen3_coder -----------------------------------------------------------------------------

std::string lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

// str(value).strip().lower() of a schema's "type".
std::string type_name(const ordered& type) {
  return lower(python_strip(python_str(type)));
}

// The called function's parameter schemas: properties of its "parameters", {} when unknown.
ordered parameter_schemas(const ordered& tools, const std::string& function_name) {
  for (const ordered& tool : tools) {
    if (!tool.is_object() || !tool.contains("function")) continue;
    const ordered& function = tool["function"];
    if (!function.is_object() || function.value("name", "") != function_name) continue;
    if (function.contains("parameters") && function["parameters"].is_object() &&
        function["parameters"].contains("properties") &&
        function["parameters"]["properties"].is_object())
      return function["parameters"]["properties"];
    return ordered::object();
  }
  return ordered::object();
}

// Python's int(): optional sign, digits with single underscores between them, whitespace around.
std::optional<ordered> python_int(std::string_view text) {
  std::string digits;
  std::string_view body = strip_chars(text, " \t\n\r\f\v");
  bool negative = false;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
    negative = body[0] == '-';
    body.remove_prefix(1);
  }
  for (size_t i = 0; i < body.size(); ++i) {
    if (std::isdigit(static_cast<unsigned char>(body[i]))) {
      digits += body[i];
    } else if (body[i] != '_' || i == 0 || i + 1 == body.size() || body[i + 1] == '_') {
      return std::nullopt;
    }
  }
  if (digits.empty()) return std::nullopt;
  errno = 0;
  const unsigned long long magnitude = std::strtoull(digits.c_str(), nullptr, 10);
  if (errno == ERANGE) return std::nullopt;  // beyond 64 bits: kept as text
  if (!negative) return ordered(static_cast<uint64_t>(magnitude));
  if (magnitude > static_cast<unsigned long long>(std::numeric_limits<int64_t>::max()) + 1)
    return std::nullopt;
  return ordered(static_cast<int64_t>(0 - magnitude));
}

// Python's float(), then vLLM's "an integral float becomes an int". inf: int(inf) raises an
// error vLLM does not catch, so the output is malformed; nan: kept as text.
std::optional<ordered> python_number(std::string_view text) {
  std::string body(strip_chars(text, " \t\n\r\f\v"));
  body.erase(std::remove(body.begin(), body.end(), '_'), body.end());
  const std::string lowered = lower(body);
  if (body.empty() || contains(lowered, "0x") || contains(lowered, "p")) return std::nullopt;
  char* end = nullptr;
  const double value = std::strtod(body.c_str(), &end);
  if (end != body.c_str() + body.size()) return std::nullopt;
  if (std::isnan(value)) return std::nullopt;
  if (std::isinf(value)) throw Malformed("infinite number parameter");
  if (value == std::trunc(value) && std::fabs(value) < 9.2e18)
    return ordered(static_cast<int64_t>(value));
  return ordered(value);
}

// ast.literal_eval, approximated: JSON values and Python's True / False / None.
std::optional<ordered> python_literal(std::string_view text) {
  const std::string_view body = strip_chars(text, " \t");
  if (body == "True") return ordered(true);
  if (body == "False") return ordered(false);
  if (body == "None") return ordered(nullptr);
  ordered value = ordered::parse(body, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded() || value.is_boolean() || value.is_null()) return std::nullopt;
  return value;
}

// vLLM's Qwen3CoderToolParser._convert_param_value: by the parameter's schema type.
ordered convert_parameter(const std::string& value, const std::string& name,
                          const ordered& schemas) {
  if (!schemas.contains(name)) return ordered(value);
  const ordered& schema = schemas[name];
  std::string type = "string";
  bool allows_null = false;
  if (schema.is_object() && schema.contains("type")) {
    type = type_name(schema["type"]);
    allows_null = type == "null";
  } else if (schema.is_object() && schema.contains("anyOf") && schema["anyOf"].is_array()) {
    bool picked = false;
    for (const ordered& option : schema["anyOf"]) {
      if (!option.is_object() || !option.contains("type")) continue;
      const std::string option_type = type_name(option["type"]);
      if (option_type == "null") {
        allows_null = true;
      } else if (!picked) {
        type = option_type;
        picked = true;
      }
    }
  }
  const std::string lowered = lower(value);
  const bool null_text = lowered == "null" || lowered == "none";
  if (allows_null && null_text) return ordered(nullptr);
  for (const char* text_type : {"string", "str", "text", "varchar", "char", "enum"})
    if (type == text_type) return ordered(value);
  if (null_text) return ordered(nullptr);
  for (const char* integer : {"int", "uint", "long", "short", "unsigned"}) {
    if (starts_with(type, integer)) return python_int(value).value_or(ordered(value));
  }
  if (starts_with(type, "num") || starts_with(type, "float"))
    return python_number(value).value_or(ordered(value));
  if (type == "boolean" || type == "bool" || type == "binary") return ordered(lowered == "true");
  const bool container = type == "object" || type == "array" || type == "arr" ||
                         starts_with(type, "dict") || starts_with(type, "list");
  if (container) {
    ordered parsed = ordered::parse(value, nullptr, /*allow_exceptions=*/false);
    if (!parsed.is_discarded()) return parsed;
  }
  return python_literal(value).value_or(ordered(value));
}

bool is_valid_function_name(std::string_view name) {
  return !name.empty() && name.find_first_of("{}<>\"' \t\n\r") == std::string_view::npos;
}

// One <function=...> body (after "<function=", before "</function>"); nullopt when vLLM drops
// the call (no '>' after the name, or a name that is no identifier).
std::optional<ParsedToolCall> parse_function(std::string_view function, const ordered& tools) {
  const size_t name_end = function.find('>');
  if (name_end == std::string_view::npos) return std::nullopt;
  const std::string name(function.substr(0, name_end));
  if (!is_valid_function_name(name)) return std::nullopt;
  const ordered schemas = parameter_schemas(tools, name);
  const std::string_view parameters = function.substr(name_end + 1);
  ordered arguments = ordered::object();
  // <parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$): each value ends at its
  // closing tag, at the next parameter, or at the end.
  for (size_t at = parameters.find(kParameterOpen); at != std::string_view::npos;) {
    const size_t body = at + kParameterOpen.size();
    const std::string_view rest = parameters.substr(body);
    size_t stop = lazy_end(rest);
    size_t resume = std::string_view::npos;
    for (std::string_view end_tag : {kParameterClose, kParameterOpen, kFunctionClose}) {
      const size_t found = rest.find(end_tag);
      if (found != std::string_view::npos && found < stop) {
        stop = found;
        resume = body + found + (end_tag == kParameterClose ? kParameterClose.size() : 0);
      }
    }
    const std::string_view match = rest.substr(0, stop);
    const size_t value_start = match.find('>');
    if (value_start == std::string_view::npos) throw Malformed("parameter without '>'");
    const std::string parameter_name(match.substr(0, value_start));
    std::string_view value = match.substr(value_start + 1);
    if (!value.empty() && value.front() == '\n') value.remove_prefix(1);
    if (!value.empty() && value.back() == '\n') value.remove_suffix(1);
    arguments[parameter_name] = convert_parameter(std::string(value), parameter_name, schemas);
    at = resume == std::string_view::npos ? std::string_view::npos
                                          : parameters.find(kParameterOpen, resume);
  }
  return ParsedToolCall{name, python_json_dumps(arguments)};
}

ToolCallExtraction extract_qwen_xml(std::string_view text, const ordered& tools) {
  if (!contains(text, kFunctionOpen)) return no_calls(text);
  // <tool_call>(.*?)</tool_call>|<tool_call>(.*?)$; without any block, the whole text.
  std::vector<std::string_view> blocks;
  for (size_t at = text.find(kToolCallOpen); at != std::string_view::npos;) {
    const size_t body = at + kToolCallOpen.size();
    const size_t close = text.find(kToolCallClose, body);
    if (close == std::string_view::npos) {
      blocks.push_back(text.substr(body, lazy_end(text.substr(body))));
      break;
    }
    blocks.push_back(text.substr(body, close - body));
    at = text.find(kToolCallOpen, close + kToolCallClose.size());
  }
  if (blocks.empty()) blocks.push_back(text);
  // <function=(.*?)</function>|<function=(.*)$ within each block.
  std::vector<std::string_view> functions;
  for (std::string_view block : blocks) {
    for (size_t at = block.find(kFunctionOpen); at != std::string_view::npos;) {
      const size_t body = at + kFunctionOpen.size();
      const size_t close = block.find(kFunctionClose, body);
      if (close == std::string_view::npos) {
        functions.push_back(block.substr(body));
        break;
      }
      functions.push_back(block.substr(body, close - body));
      at = block.find(kFunctionOpen, close + kFunctionClose.size());
    }
  }
  ToolCallExtraction result;
  try {
    for (std::string_view function : functions)
      if (auto call = parse_function(function, tools)) result.calls.push_back(std::move(*call));
  } catch (const Malformed&) {
    return no_calls(text);
  }
  if (result.calls.empty()) return no_calls(text);
  // The content ends at the first <tool_call> holding a <function=, else at the first
  // <function=.
  size_t content_end = std::string_view::npos;
  for (size_t at = text.find(kToolCallOpen); at != std::string_view::npos;) {
    const size_t close = text.find(kToolCallClose, at + kToolCallOpen.size());
    const size_t limit = close == std::string_view::npos ? text.size() : close;
    const size_t function = text.find(kFunctionOpen, at + kToolCallOpen.size());
    if (function != std::string_view::npos && function < limit) {
      content_end = at;
      break;
    }
    if (close == std::string_view::npos) break;
    at = text.find(kToolCallOpen, close + kToolCallClose.size());
  }
  if (content_end == std::string_view::npos) content_end = text.find(kFunctionOpen);
  result.tools_called = true;
  result.content = content_or_null(text.substr(0, content_end));
  return result;
}

// Length of the longest suffix of `text` that is a proper prefix of `tag`.
size_t partial_tag_overlap(std::string_view text, std::string_view tag) {
  for (size_t length = std::min(text.size(), tag.size() - 1); length > 0; --length)
    if (text.substr(text.size() - length) == tag.substr(0, length)) return length;
  return 0;
}

}  // namespace

ToolCallExtraction extract_tool_calls(ToolCallFormat format, std::string_view text,
                                      const nlohmann::ordered_json& tools) {
  switch (format) {
    case ToolCallFormat::kHermesJson:
      return extract_hermes(text);
    case ToolCallFormat::kQwenXml:
      return extract_qwen_xml(text, tools);
    case ToolCallFormat::kNone:
      break;
  }
  return no_calls(text);
}

ToolCallStream::ToolCallStream(ToolCallFormat format, nlohmann::ordered_json tools)
    : format_(format), tools_(std::move(tools)) {}

std::string ToolCallStream::feed(std::string_view delta) {
  text_ += delta;
  if (format_ == ToolCallFormat::kNone) {
    std::string out = text_.substr(sent_);
    sent_ = text_.size();
    return out;
  }
  if (holding_) return "";
  // Where a call may begin: <tool_call>, and for the XML format a bare <function= too.
  std::vector<std::string_view> tags = {kToolCallOpen};
  if (format_ == ToolCallFormat::kQwenXml) tags.push_back(kFunctionOpen);
  size_t sendable = text_.size();
  for (std::string_view tag : tags) {
    const size_t found = text_.find(tag, sent_ > tag.size() ? sent_ - tag.size() : 0);
    if (found != std::string::npos) {
      holding_ = true;
      sendable = std::min(sendable, found);
    }
  }
  if (!holding_)
    for (std::string_view tag : tags)
      sendable = std::min(sendable, text_.size() - partial_tag_overlap(text_, tag));
  std::string out;
  if (sendable > sent_) {
    out = text_.substr(sent_, sendable - sent_);
    sent_ = sendable;
  }
  return out;
}

ToolCallStream::Final ToolCallStream::finish() {
  Final final;
  ToolCallExtraction extraction = extract_tool_calls(format_, text_, tools_);
  // What was sent is a prefix of the content in both outcomes: it stopped before the first tag.
  const std::string content = extraction.tools_called ? extraction.content.value_or("") : text_;
  if (content.size() > sent_) final.content = content.substr(sent_);
  sent_ = std::max(sent_, content.size());
  if (extraction.tools_called) final.calls = std::move(extraction.calls);
  return final;
}

}  // namespace keel::server
