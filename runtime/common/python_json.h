// JSON text as Python writes it. Chat templates render tools and tool-call arguments with
// transformers' `tojson` filter (json.dumps(x, ensure_ascii=False)), and vLLM's tool parsers
// return arguments as json.dumps(...) strings; both print ", " and ": " separators, keep the
// object's key order, leave non-ASCII characters unescaped and print floats as Python's repr
// does ("1.0", "1e-05", "1e+16"). nlohmann's dump() differs in every one of these, so templates
// and parsers use these functions instead. ordered_json keeps the client's key order.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace keel {

// json.dumps(value, ensure_ascii=False).
std::string python_json_dumps(const nlohmann::ordered_json& value);
// Python's repr(float) for a double: the shortest digits that round-trip, in fixed notation for
// decimal exponents in [-4, 16) and scientific ("1e-05", "1.5e+16") otherwise; "inf", "nan".
std::string python_float_repr(double value);
// Jinja's `| string` filter (Python's str()) of a JSON scalar: strings as they are, "True" /
// "False", "None", integers in decimal, floats as python_float_repr. Containers: dumps.
std::string python_str(const nlohmann::ordered_json& value);

}  // namespace keel
