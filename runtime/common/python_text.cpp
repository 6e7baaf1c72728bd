#include "runtime/common/python_text.h"

#include <cstdint>

namespace keel {

namespace {

// Python's str.strip() (Jinja's `trim` filter) removes Unicode whitespace, not only ASCII.
bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Decodes the UTF-8 code point starting at text[pos]; length 1 and an impossible code point for
// an invalid byte, so invalid input is never treated as whitespace.
uint32_t code_point_at(std::string_view text, size_t pos, size_t& length) {
  auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  uint8_t lead = byte(pos);
  length = lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 0;
  if (length == 0 || pos + length > text.size()) {
    length = 1;
    return 0xFFFFFFFF;
  }
  if (length == 1) return lead;
  uint32_t cp = lead & (0x7F >> length);
  for (size_t i = 1; i < length; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) {
      length = 1;
      return 0xFFFFFFFF;
    }
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  return cp;
}

}  // namespace

std::string python_strip(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    size_t length = 0;
    if (!is_python_space(code_point_at(text, begin, length))) break;
    begin += length;
  }
  // From the end: step back over continuation bytes to the start of the last code point.
  size_t end = text.size();
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    size_t length = 0;
    uint32_t cp = code_point_at(text, start, length);
    if (start + length != end || !is_python_space(cp)) break;
    end = start;
  }
  return std::string(text.substr(begin, end - begin));
}

std::string_view python_lstrip(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    size_t length = 0;
    if (!is_python_space(code_point_at(text, begin, length))) break;
    begin += length;
  }
  return text.substr(begin);
}

bool starts_with_python_space(std::string_view text) {
  size_t length = 0;
  return !text.empty() && is_python_space(code_point_at(text, 0, length));
}

std::string_view lstrip_chars(std::string_view text, std::string_view chars) {
  const size_t begin = text.find_first_not_of(chars);
  return begin == std::string_view::npos ? std::string_view() : text.substr(begin);
}

std::string_view rstrip_chars(std::string_view text, std::string_view chars) {
  const size_t last = text.find_last_not_of(chars);
  return last == std::string_view::npos ? std::string_view() : text.substr(0, last + 1);
}

std::string_view strip_chars(std::string_view text, std::string_view chars) {
  return rstrip_chars(lstrip_chars(text, chars), chars);
}

std::string_view before_first(std::string_view text, std::string_view separator) {
  return text.substr(0, text.find(separator));
}

std::string_view after_last(std::string_view text, std::string_view separator) {
  const size_t at = text.rfind(separator);
  return at == std::string_view::npos ? text : text.substr(at + separator.size());
}

}  // namespace keel
