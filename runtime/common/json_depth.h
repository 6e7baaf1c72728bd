// How deeply JSON text nests, measured on the text before it is parsed. nlohmann::json parses
// iteratively, but dump(), copies and comparisons recurse once per level: a 4 MB body of '['
// nests two million deep and overflows a thread's stack the first time an error message
// quotes it. Parsers of outside input refuse text past a depth no legitimate document needs.
// Header-only: the HTTP layer (keel_server) and the file readers (keel_runtime_io) share it
// without a library between them.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "kernels/base/check.h"

namespace keel {

// Deep enough for any request, config or tokenizer keel reads (JSON schemas in tool
// definitions nest a few tens of levels); shallow enough for every recursive walk.
inline constexpr size_t kMaxJsonDepth = 256;

// The deepest nesting of '[' and '{' outside strings (escapes honoured). Malformed text gets a
// number too; the parser reports what is wrong with it.
inline size_t json_nesting_depth(std::string_view text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// Throws keel::Error "WHERE: JSON nests deeper than 256 levels" for text past kMaxJsonDepth.
inline void check_json_depth(std::string_view text, const std::string& where) {
  if (json_nesting_depth(text) > kMaxJsonDepth)
    throw_error(where, ": JSON nests deeper than ", kMaxJsonDepth, " levels");
}

}  // namespace keel
