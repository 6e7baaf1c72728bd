// The Unicode pieces the tokenizer needs: UTF-8 decoding, \p{L} / \p{N} / \s classification
// and NFC normalization (tables generated into unicode_tables.h by gen_unicode_tables.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace keel::unicode {

inline constexpr uint32_t kReplacementCharacter = 0xFFFD;

// Decodes the code point at text[pos]; sets length to its byte length. Invalid bytes decode
// as U+FFFD with length 1 so callers always make progress and keep the raw bytes.
uint32_t decode_utf8(std::string_view text, size_t pos, size_t& length);
void append_utf8(std::string& out, uint32_t code_point);
bool is_valid_utf8(std::string_view text);

bool is_letter(uint32_t code_point);      // \p{L}
bool is_number(uint32_t code_point);      // \p{N}
bool is_whitespace(uint32_t code_point);  // \s (Unicode White_Space)

// Canonical composition (NFC). Text that is not valid UTF-8 is returned unchanged.
std::string nfc(std::string_view text);

}  // namespace keel::unicode
