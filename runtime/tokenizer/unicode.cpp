#include "runtime/tokenizer/unicode.h"

#include <algorithm>
#include <vector>

#include "runtime/tokenizer/unicode_tables.h"

namespace keel::unicode {

namespace {

// Hangul syllables compose and decompose algorithmically (Unicode ch. 3.12).
constexpr uint32_t kHangulBase = 0xAC00, kJamoLBase = 0x1100, kJamoVBase = 0x1161,
                   kJamoTBase = 0x11A7;
constexpr uint32_t kJamoLCount = 19, kJamoVCount = 21, kJamoTCount = 28;
constexpr uint32_t kHangulNCount = kJamoVCount * kJamoTCount, kHangulCount = 11172;

template <typename RangeT, size_t N>
bool in_ranges(const RangeT (&ranges)[N], uint32_t code_point) {
  auto it = std::upper_bound(std::begin(ranges), std::end(ranges), code_point,
                             [](uint32_t value, const RangeT& r) { return value < r.first; });
  return it != std::begin(ranges) && code_point <= std::prev(it)->last;
}

uint8_t combining_class(uint32_t code_point) {
  if (code_point < 0x300) return 0;
  const auto& runs = unicode_tables::kCombiningClass;
  auto it = std::upper_bound(
      std::begin(runs), std::end(runs), code_point,
      [](uint32_t value, const unicode_tables::ClassRun& r) { return value < r.first; });
  if (it == std::begin(runs) || code_point > std::prev(it)->last) return 0;
  return std::prev(it)->combining_class;
}

void decompose(uint32_t code_point, std::vector<uint32_t>& out) {
  if (code_point >= kHangulBase && code_point < kHangulBase + kHangulCount) {
    uint32_t index = code_point - kHangulBase;
    out.push_back(kJamoLBase + index / kHangulNCount);
    out.push_back(kJamoVBase + (index % kHangulNCount) / kJamoTCount);
    if (index % kJamoTCount != 0) out.push_back(kJamoTBase + index % kJamoTCount);
    return;
  }
  const auto& table = unicode_tables::kDecomposition;
  auto it = std::lower_bound(
      std::begin(table), std::end(table), code_point,
      [](const unicode_tables::Decomposition& d, uint32_t value) { return d.code_point < value; });
  if (it == std::end(table) || it->code_point != code_point) {
    out.push_back(code_point);
    return;
  }
  decompose(it->first, out);
  if (it->second != 0) decompose(it->second, out);
}

// Primary composite of (first, second), 0 when they do not compose.
uint32_t compose(uint32_t first, uint32_t second) {
  if (first >= kJamoLBase && first < kJamoLBase + kJamoLCount && second >= kJamoVBase &&
      second < kJamoVBase + kJamoVCount)
    return kHangulBase + ((first - kJamoLBase) * kJamoVCount + (second - kJamoVBase)) * kJamoTCount;
  if (first >= kHangulBase && first < kHangulBase + kHangulCount &&
      (first - kHangulBase) % kJamoTCount == 0 && second > kJamoTBase &&
      second < kJamoTBase + kJamoTCount)
    return first + (second - kJamoTBase);
  const auto& table = unicode_tables::kComposition;
  auto it =
      std::lower_bound(std::begin(table), std::end(table), std::pair{first, second},
                       [](const unicode_tables::Composition& c, std::pair<uint32_t, uint32_t> key) {
                         return std::pair{c.first, c.second} < key;
                       });
  if (it == std::end(table) || it->first != first || it->second != second) return 0;
  return it->composite;
}

}  // namespace

uint32_t decode_utf8(std::string_view text, size_t pos, size_t& length) {
  auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  uint8_t lead = byte(pos);
  length = 1;
  if (lead < 0x80) return lead;
  size_t needed;
  uint32_t code_point;
  uint8_t low = 0x80, high = 0xBF;  // allowed range of the second byte (no overlongs/surrogates)
  if (lead >= 0xC2 && lead <= 0xDF) {
    needed = 1;
    code_point = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    needed = 2;
    code_point = lead & 0x0F;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    needed = 3;
    code_point = lead & 0x07;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return kReplacementCharacter;
  }
  if (pos + needed >= text.size()) return kReplacementCharacter;  // truncated
  for (size_t i = 1; i <= needed; ++i) {
    uint8_t next = byte(pos + i);
    if (i == 1 ? (next < low || next > high) : (next < 0x80 || next > 0xBF))
      return kReplacementCharacter;
    code_point = (code_point << 6) | (next & 0x3F);
  }
  length = needed + 1;
  return code_point;
}

void append_utf8(std::string& out, uint32_t code_point) {
  if (code_point < 0x80) {
    out += static_cast<char>(code_point);
  } else if (code_point < 0x800) {
    out += static_cast<char>(0xC0 | (code_point >> 6));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += static_cast<char>(0xE0 | (code_point >> 12));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code_point >> 18));
    out += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  }
}

bool is_valid_utf8(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    size_t length;
    uint32_t code_point = decode_utf8(text, pos, length);
    if (code_point == kReplacementCharacter && length == 1) return false;
    pos += length;
  }
  return true;
}

bool is_letter(uint32_t code_point) {
  if (code_point < 0x80) return (code_point | 0x20) >= 'a' && (code_point | 0x20) <= 'z';
  return in_ranges(unicode_tables::kLetterRanges, code_point);
}

bool is_number(uint32_t code_point) {
  if (code_point < 0x80) return code_point >= '0' && code_point <= '9';
  return in_ranges(unicode_tables::kNumberRanges, code_point);
}

bool is_whitespace(uint32_t code_point) {
  switch (code_point) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return code_point >= 0x2000 && code_point <= 0x200A;
  }
}

std::string nfc(std::string_view text) {
  // Fast path: every code point below U+0300 is its own NFC form and composes with nothing
  // before it, and all of them have UTF-8 lead bytes below 0xCC.
  if (std::all_of(text.begin(), text.end(), [](char c) { return static_cast<uint8_t>(c) < 0xCC; }))
    return std::string(text);
  if (!is_valid_utf8(text)) return std::string(text);
  std::vector<uint32_t> code_points;
  code_points.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    size_t length;
    decompose(decode_utf8(text, pos, length), code_points);
    pos += length;
  }
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t start = 0; start < code_points.size();) {
    if (combining_class(code_points[start]) == 0) {
      ++start;
      continue;
    }
    size_t end = start;
    while (end < code_points.size() && combining_class(code_points[end]) != 0) ++end;
    std::stable_sort(
        code_points.begin() + start, code_points.begin() + end,
        [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
    start = end;
  }
  // Canonical composition (the algorithm of UAX #15): a mark composes with the last starter
  // unless a mark of the same or higher class (or a starter) sits in between.
  std::vector<uint32_t> composed;
  composed.reserve(code_points.size());
  constexpr size_t kNoStarter = static_cast<size_t>(-1);
  size_t starter_index = kNoStarter;
  int last_class = 0;  // combining class of the last code point kept in `composed`
  for (uint32_t code_point : code_points) {
    int current_class = combining_class(code_point);
    if (starter_index != kNoStarter && (last_class < current_class || last_class == 0)) {
      uint32_t composite = compose(composed[starter_index], code_point);
      if (composite != 0) {
        composed[starter_index] = composite;
        continue;
      }
    }
    if (current_class == 0) starter_index = composed.size();
    last_class = current_class;
    composed.push_back(code_point);
  }
  std::string out;
  out.reserve(text.size());
  for (uint32_t code_point : composed) append_utf8(out, code_point);
  return out;
}

}  // namespace keel::unicode
