// Python's str methods that chat templates call (Jinja's `trim` is str.strip()), for the C++
// renderings of those templates.
#pragma once

#include <string>
#include <string_view>

namespace keel {

// str.strip(): Unicode whitespace as Python defines it, not only ASCII; invalid UTF-8 is never
// whitespace.
std::string python_strip(std::string_view text);
// str.lstrip() (Unicode whitespace).
std::string_view python_lstrip(std::string_view text);
// Whether text begins with a character Python's str.isspace() / regex \s accepts.
bool starts_with_python_space(std::string_view text);
// str.lstrip(chars) / str.rstrip(chars) / str.strip(chars) with ASCII `chars`.
std::string_view lstrip_chars(std::string_view text, std::string_view chars);
std::string_view rstrip_chars(std::string_view text, std::string_view chars);
std::string_view strip_chars(std::string_view text, std::string_view chars);
// text.split(separator)[0] and text.split(separator)[-1].
std::string_view before_first(std::string_view text, std::string_view separator);
std::string_view after_last(std::string_view text, std::string_view separator);

}  // namespace keel
