// HF tokenizer.json in C++.
//
// Design. load() turns tokenizer.json into an immutable Impl; anything outside the supported
// subset is rejected with keel::Error naming the file and the component, because a silently
// different tokenization would corrupt every request without any visible failure.
//
// encode(text), following the HF pipeline:
//   1. added tokens (added_tokens[]) are found in the raw text, leftmost-longest, and emitted
//      as their ids; they are never normalized or split;
//   2. each segment between them is normalized (NFC, Prepend, Replace; a Sequence of these);
//   3. pre-tokenized into words: Split with the Qwen2 / Llama-3 regex (hand-written matcher
//      over code points, see split_words), ByteLevel (GPT-2 byte-to-unicode map, applied as
//      a byte -> initial-symbol table), Metaspace (" " -> "▁", prepend scheme, split);
//   4. each word is BPE-merged by rank: a heap of candidate pairs over a linked list of
//      symbols, lowest rank first and leftmost among equal ranks (HF's order), O(n log n) so
//      a long whitespace run cannot go quadratic. Characters missing from the vocabulary use
//      <0xNN> byte tokens (byte_fallback) or unk_token (fused when fuse_unk);
//   5. add_special_tokens applies the TemplateProcessing "single" template.
//
// decode(ids) is defined as the bytes of each token under the decoder (ByteLevel: map the
// characters back to bytes; Replace / ByteFallback / Fuse / Strip for SentencePiece; or
// Metaspace), concatenated and converted to UTF-8 like Rust's from_utf8_lossy. Because that
// is a per-token function plus two pieces of state (first token, leading characters still
// to strip), StreamDecoder runs the very same code one token at a time and holds back only
// an incomplete trailing UTF-8 sequence: its output concatenates to decode() exactly.
//
// Not supported (rejected at load): other model types (WordPiece, Unigram, WordLevel),
// BPE dropout, continuing_subword_prefix / end_of_word_suffix, regex Replace normalizers,
// Split patterns other than the Qwen2 and Llama-3 regexes, ByteLevel use_regex=true,
// Strip decoders that strip the end. Accepted but not modelled: added tokens' single_word
// and normalized flags (all added tokens match the raw, unnormalized text; lstrip/rstrip are
// honoured), the post-processor "pair" template. ByteFallback maps an invalid byte group to U+FFFD
// per maximal invalid subsequence rather than per byte (identical for valid UTF-8).
// \p{L} / \p{N} and NFC come from Python's unicodedata (Unicode 14, unicode_tables.h);
// characters assigned after that classify as punctuation-like "other".
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/common/json_depth.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "kernels/base/check.h"
#include "runtime/tokenizer/unicode.h"

namespace keel {

namespace {

using nlohmann::json;

constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581 "▁"

// The two Split regexes we implement by hand; they differ only in digit grouping.
constexpr std::string_view kQwenRegex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr std::string_view kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// GPT-2's reversible byte <-> printable code point map: printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100 onwards in byte order.
std::array<uint32_t, 256> byte_to_code_point_table() {
  std::array<uint32_t, 256> table{};
  uint32_t next_free = 256;
  for (uint32_t byte = 0; byte < 256; ++byte) {
    bool printable = (byte >= 0x21 && byte <= 0x7E) || (byte >= 0xA1 && byte <= 0xAC) ||
                     (byte >= 0xAE && byte <= 0xFF);
    table[byte] = printable ? byte : next_free++;
  }
  return table;
}

enum class NormalizerKind { kNfc, kPrepend, kReplace };
struct NormalizerStep {
  NormalizerKind kind;
  std::string pattern;  // Replace: the literal to replace
  std::string content;  // Prepend: the prefix; Replace: the replacement
};

enum class PreTokenizerKind { kSplitRegex, kByteLevel, kMetaspace };
enum class PrependScheme { kAlways, kFirst, kNever };
struct PreTokenizerStep {
  PreTokenizerKind kind = PreTokenizerKind::kSplitRegex;
  size_t max_digit_run = 1;       // Split: \p{N} (1) or \p{N}{1,3} (3)
  bool add_prefix_space = false;  // ByteLevel
  std::string replacement;        // Metaspace
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool special;
  bool lstrip = false;  // the match also swallows whitespace before the token
  bool rstrip = false;  // ... and after it
};

struct MergeResult {
  int32_t rank;
  int32_t merged_id;
};

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

PrependScheme parse_prepend_scheme(const json& node, const std::string& where) {
  if (node.contains("prepend_scheme")) {
    std::string scheme = node["prepend_scheme"].get<std::string>();
    if (scheme == "always") return PrependScheme::kAlways;
    if (scheme == "first") return PrependScheme::kFirst;
    if (scheme == "never") return PrependScheme::kNever;
    throw_error(where, ": unknown prepend_scheme '", scheme, "'");
  }
  // Older files: add_prefix_space (default true).
  return node.value("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

std::string literal_pattern(const json& node, const std::string& where) {
  if (!node.contains("pattern") || !node["pattern"].is_object())
    throw_error(where, ": missing 'pattern'");
  const json& pattern = node["pattern"];
  if (pattern.contains("String")) return pattern["String"].get<std::string>();
  throw_error(where, ": only literal String patterns are supported, found ", pattern.dump());
}

void replace_all(std::string& text, std::string_view pattern, std::string_view replacement) {
  if (pattern.empty() || text.find(pattern) == std::string::npos) return;
  std::string out;
  out.reserve(text.size() + text.size() / 2);
  size_t pos = 0;
  for (size_t hit; (hit = text.find(pattern, pos)) != std::string::npos; pos = hit + pattern.size())
    out.append(text, pos, hit - pos).append(replacement);
  out.append(text, pos);
  text = std::move(out);
}

// Code point classes for the Qwen / Llama-3 split regex.
enum class CharClass : uint8_t { kLetter, kNumber, kNewline, kSpace, kOther };

CharClass classify(uint32_t code_point) {
  if (code_point == '\r' || code_point == '\n') return CharClass::kNewline;
  if (unicode::is_letter(code_point)) return CharClass::kLetter;
  if (unicode::is_number(code_point)) return CharClass::kNumber;
  if (unicode::is_whitespace(code_point)) return CharClass::kSpace;
  return CharClass::kOther;
}

// Contraction suffix after an apostrophe, case-insensitive as in (?i:...): returns how many
// code points after the apostrophe match ('s 't 'm 'd -> 1; 're 've 'll -> 2), else 0.
size_t contraction_length(const std::vector<uint32_t>& cps, size_t apostrophe) {
  auto lower = [&](size_t i) -> uint32_t {
    if (i >= cps.size()) return 0;
    uint32_t c = cps[i];
    if (c == 0x17F) return 's';  // LATIN SMALL LETTER LONG S case-folds to 's'
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  };
  uint32_t first = lower(apostrophe + 1), second = lower(apostrophe + 2);
  if (first == 's' || first == 't' || first == 'm' || first == 'd') return 1;
  if ((first == 'r' && second == 'e') || (first == 'v' && second == 'e') ||
      (first == 'l' && second == 'l'))
    return 2;
  return 0;
}

// Splits text by the Qwen2 regex (max_digit_run 1) or the Llama-3 one (3), "Isolated":
//   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,max} |
//    ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
// Alternatives are tried in order at each position (leftmost-first, like the regex engine);
// every code point belongs to some alternative, so the pieces cover the text.
void split_words(std::string_view text, size_t max_digit_run, std::vector<std::string>& out) {
  std::vector<uint32_t> cps;
  std::vector<CharClass> classes;
  std::vector<size_t> offsets;  // byte offset of each code point, plus the end
  cps.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    size_t length;
    uint32_t code_point = unicode::decode_utf8(text, pos, length);
    cps.push_back(code_point);
    classes.push_back(classify(code_point));
    offsets.push_back(pos);
    pos += length;
  }
  offsets.push_back(text.size());
  const size_t n = cps.size();
  auto is = [&](size_t i, CharClass c) { return i < n && classes[i] == c; };
  auto is_space = [&](size_t i) {
    return i < n && (classes[i] == CharClass::kSpace || classes[i] == CharClass::kNewline);
  };
  auto run_end = [&](size_t i, auto&& predicate) {
    while (i < n && predicate(i)) ++i;
    return i;
  };
  auto letter = [&](size_t i) { return is(i, CharClass::kLetter); };
  auto other = [&](size_t i) { return is(i, CharClass::kOther); };
  auto newline = [&](size_t i) { return is(i, CharClass::kNewline); };

  for (size_t i = 0; i < n;) {
    size_t end = 0;
    if (cps[i] == '\'' && contraction_length(cps, i) > 0) {
      end = i + 1 + contraction_length(cps, i);
    } else if (!newline(i) && !letter(i) && !is(i, CharClass::kNumber) && letter(i + 1)) {
      end = run_end(i + 1, letter);  // one leading non-letter/number, e.g. " word"
    } else if (letter(i)) {
      end = run_end(i, letter);
    } else if (is(i, CharClass::kNumber)) {
      end = i + 1;
      while (end < n && end - i < max_digit_run && is(end, CharClass::kNumber)) ++end;
    } else if (cps[i] == ' ' && other(i + 1)) {
      end = run_end(run_end(i + 1, other), newline);
    } else if (other(i)) {
      end = run_end(run_end(i, other), newline);
    } else {  // whitespace
      size_t space_end = run_end(i, is_space);
      size_t last_newline = n;
      for (size_t j = i; j < space_end; ++j)
        if (newline(j)) last_newline = j;
      if (last_newline != n) {
        end = last_newline + 1;  // \s*[\r\n]+
      } else if (space_end == n || space_end - i == 1) {
        end = space_end;  // \s+(?!\S) at the end of text, or the single-space \s+
      } else {
        end = space_end - 1;  // \s+(?!\S): leave the last space to lead the next word
      }
    }
    out.emplace_back(text.substr(offsets[i], offsets[end] - offsets[i]));
    i = end;
  }
}

// Appends the longest valid UTF-8 prefix of `bytes` to `out` as from_utf8_lossy would,
// replacing each maximal invalid subsequence with U+FFFD. When `final` is false an
// incomplete (but so far valid) sequence at the end stays in `bytes` for later.
void drain_utf8(std::string& bytes, bool final, std::string& out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t length;
    uint32_t code_point = unicode::decode_utf8(bytes, pos, length);
    if (code_point != unicode::kReplacementCharacter || length != 1) {
      out.append(bytes, pos, length);
      pos += length;
      continue;
    }
    // Invalid or truncated: how many bytes form a valid prefix of some sequence?
    auto byte = [&](size_t i) { return static_cast<uint8_t>(bytes[i]); };
    uint8_t lead = byte(pos);
    size_t needed = lead >= 0xC2 && lead <= 0xDF   ? 1
                    : lead >= 0xE0 && lead <= 0xEF ? 2
                    : lead >= 0xF0 && lead <= 0xF4 ? 3
                                                   : 0;
    size_t valid = 1;
    for (; valid <= needed && pos + valid < bytes.size(); ++valid) {
      uint8_t next = byte(pos + valid);
      uint8_t low = 0x80, high = 0xBF;
      if (valid == 1 && lead == 0xE0) low = 0xA0;
      if (valid == 1 && lead == 0xED) high = 0x9F;
      if (valid == 1 && lead == 0xF0) low = 0x90;
      if (valid == 1 && lead == 0xF4) high = 0x8F;
      if (next < low || next > high) break;
    }
    bool truncated = needed > 0 && pos + valid == bytes.size() && valid <= needed;
    if (truncated && !final) break;
    out += "\xEF\xBF\xBD";
    pos += valid;
  }
  bytes.erase(0, pos);
}

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  TokenMap vocab;                        // model vocabulary: what BPE symbols are looked up in
  TokenMap added_vocab;                  // added tokens (take precedence in token_id)
  size_t distinct_token_count = 0;       // size of model vocabulary ∪ added tokens
  std::vector<std::string> id_to_token;  // "" for unused ids
  std::vector<bool> id_present;
  std::vector<bool> id_special;
  std::unordered_map<uint64_t, MergeResult> merges;
  std::vector<AddedToken> added_tokens;                      // longest first
  std::array<std::vector<size_t>, 256> added_by_first_byte;  // indices into added_tokens
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  bool byte_level = false;  // ByteLevel pre-tokenizer: words are raw bytes, symbols per byte
  std::array<int32_t, 256> byte_level_symbol{};  // id of the mapped character of each byte
  std::array<int32_t, 256> byte_fallback_id{};   // id of <0xNN>, -1 when missing
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  int32_t unk_id = -1;
  std::vector<int32_t> template_prefix, template_suffix;  // post-processor "single"

  // Decoder, as per-token transformations plus first-token/leading-strip state.
  bool decode_byte_level = false;
  std::unordered_map<uint32_t, uint8_t> code_point_to_byte;
  std::vector<std::pair<std::string, std::string>> decode_replacements;
  bool decode_byte_fallback = false;
  std::string strip_content;  // Strip decoder after Fuse: leading content to drop
  size_t strip_leading = 0;
  bool metaspace_decode = false;
  std::string metaspace_replacement;
  bool metaspace_drop_in_first = false;

  [[noreturn]] void fail(const std::string& component, const std::string& message) const {
    throw_error(source, ": ", component, ": ", message);
  }

  void parse_model(const json& root);
  void parse_added_tokens(const json& root);
  void parse_normalizer(const json& node);
  void parse_pre_tokenizer(const json& node);
  void parse_post_processor(const json& node);
  void parse_decoder(const json& node);

  void encode_segment(std::string_view segment, bool at_text_start,
                      std::vector<int32_t>& ids) const;
  void bpe_word(std::string_view word, std::vector<int32_t>& ids) const;
  // Appends the decoded bytes of one token; `first` is true for the first non-skipped token.
  void token_bytes(int32_t id, bool first, std::string& out) const;
};

void Tokenizer::Impl::parse_model(const json& root) {
  if (!root.contains("model") || !root["model"].is_object()) fail("model", "missing");
  const json& model = root["model"];
  std::string type = model.value("type", "");
  if (type.empty() && model.contains("merges")) type = "BPE";  // very old files omit it
  if (type != "BPE") fail("model", "unsupported type '" + type + "' (supported: BPE)");
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      model["dropout"].get<double>() != 0.0)
    fail("model", "BPE dropout is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && !model[key].get<std::string>().empty())
      fail("model", std::string(key) + " is not supported");
  if (!model.contains("vocab") || !model["vocab"].is_object())
    fail("model", "missing or malformed 'vocab'");
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      fail("model", "vocab entry '" + token + "' has a bad id " + id.dump());
    vocab.emplace(token, static_cast<int32_t>(id.get<int64_t>()));
  }
  byte_fallback = model.value("byte_fallback", false);
  fuse_unk = model.value("fuse_unk", false);
  ignore_merges = model.value("ignore_merges", false);
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    std::string unk = model["unk_token"].get<std::string>();
    auto it = vocab.find(unk);
    if (it == vocab.end()) fail("model", "unk_token '" + unk + "' is not in the vocabulary");
    unk_id = it->second;
  }
  if (!model.contains("merges") || !model["merges"].is_array())
    fail("model", "missing or malformed 'merges'");
  const json& merge_list = model["merges"];
  merges.reserve(merge_list.size());
  for (size_t rank = 0; rank < merge_list.size(); ++rank) {
    const json& merge = merge_list[rank];
    std::string left, right;
    if (merge.is_string()) {  // "a b"
      const std::string& text = merge.get_ref<const std::string&>();
      size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        fail("model", "merge #" + std::to_string(rank) + " '" + text +
                          "' is not two tokens separated by one space");
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {  // ["a", "b"]
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      fail("model", "merge #" + std::to_string(rank) + " is malformed: " + merge.dump());
    }
    auto left_it = vocab.find(left), right_it = vocab.find(right),
         merged_it = vocab.find(left + right);
    if (left_it == vocab.end() || right_it == vocab.end() || merged_it == vocab.end())
      fail("model", "merge #" + std::to_string(rank) + " '" + left + " " + right +
                        "' uses a token that is not in the vocabulary");
    // A repeated pair keeps its first (lowest) rank, as in HF.
    merges.emplace(pair_key(left_it->second, right_it->second),
                   MergeResult{static_cast<int32_t>(rank), merged_it->second});
  }
  byte_fallback_id.fill(-1);
  if (byte_fallback) {
    char name[8];
    for (int byte = 0; byte < 256; ++byte) {
      std::snprintf(name, sizeof(name), "<0x%02X>", byte);
      auto it = vocab.find(std::string_view(name));
      if (it != vocab.end()) byte_fallback_id[byte] = it->second;
    }
  }
}

void Tokenizer::Impl::parse_added_tokens(const json& root) {
  if (!root.contains("added_tokens") || root["added_tokens"].is_null()) return;
  if (!root["added_tokens"].is_array()) fail("added_tokens", "must be an array");
  for (const json& entry : root["added_tokens"]) {
    if (!entry.contains("id") || !entry.contains("content"))
      fail("added_tokens", "entry without id/content: " + entry.dump());
    AddedToken token{entry["content"].get<std::string>(), entry["id"].get<int32_t>(),
                     entry.value("special", false), entry.value("lstrip", false),
                     entry.value("rstrip", false)};
    if (token.id < 0) fail("added_tokens", "negative id for '" + token.content + "'");
    added_vocab[token.content] = token.id;
    if (!token.content.empty()) added_tokens.push_back(std::move(token));
  }
  std::stable_sort(
      added_tokens.begin(), added_tokens.end(),
      [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (size_t i = 0; i < added_tokens.size(); ++i)
    added_by_first_byte[static_cast<uint8_t>(added_tokens[i].content[0])].push_back(i);
}

void Tokenizer::Impl::parse_normalizer(const json& node) {
  if (node.is_null()) return;
  std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const json& child : node["normalizers"]) parse_normalizer(child);
  } else if (type == "NFC") {
    normalizers.push_back({NormalizerKind::kNfc, "", ""});
  } else if (type == "Prepend") {
    normalizers.push_back({NormalizerKind::kPrepend, "", node["prepend"].get<std::string>()});
  } else if (type == "Replace") {
    normalizers.push_back({NormalizerKind::kReplace,
                           literal_pattern(node, source + ": normalizer Replace"),
                           node["content"].get<std::string>()});
  } else {
    fail("normalizer",
         "unsupported type '" + type + "' (supported: NFC, Prepend, Replace, Sequence)");
  }
}

void Tokenizer::Impl::parse_pre_tokenizer(const json& node) {
  if (node.is_null()) return;
  std::string type = node.value("type", "");
  if (byte_level) fail("pre_tokenizer", "ByteLevel must be the last pre-tokenizer");
  if (type == "Sequence") {
    for (const json& child : node["pretokenizers"]) parse_pre_tokenizer(child);
  } else if (type == "Split") {
    std::string pattern;
    if (node.contains("pattern") && node["pattern"].contains("Regex"))
      pattern = node["pattern"]["Regex"].get<std::string>();
    PreTokenizerStep step;
    step.kind = PreTokenizerKind::kSplitRegex;
    if (pattern == kQwenRegex) {
      step.max_digit_run = 1;
    } else if (pattern == kLlama3Regex) {
      step.max_digit_run = 3;
    } else {
      fail("pre_tokenizer", "unsupported Split pattern " + node["pattern"].dump() +
                                " (supported: the Qwen2 and Llama-3 regexes)");
    }
    if (node.value("behavior", "Isolated") != "Isolated" || node.value("invert", false))
      fail("pre_tokenizer", "Split supports only behavior Isolated without invert");
    pre_tokenizers.push_back(step);
  } else if (type == "ByteLevel") {
    if (node.value("use_regex", true))
      fail("pre_tokenizer", "ByteLevel with use_regex=true (GPT-2 regex) is not supported");
    PreTokenizerStep step;
    step.kind = PreTokenizerKind::kByteLevel;
    step.add_prefix_space = node.value("add_prefix_space", false);
    pre_tokenizers.push_back(step);
    byte_level = true;
  } else if (type == "Metaspace") {
    PreTokenizerStep step;
    step.kind = PreTokenizerKind::kMetaspace;
    step.replacement = node.value("replacement", std::string(kMetaspace));
    step.prepend_scheme = parse_prepend_scheme(node, source + ": pre_tokenizer Metaspace");
    step.split = node.value("split", true);
    pre_tokenizers.push_back(step);
  } else {
    fail("pre_tokenizer",
         "unsupported type '" + type + "' (supported: Sequence, Split, ByteLevel, Metaspace)");
  }
}

void Tokenizer::Impl::parse_post_processor(const json& node) {
  if (node.is_null()) return;
  std::string type = node.value("type", "");
  if (type == "Sequence") {
    for (const json& child : node["processors"]) parse_post_processor(child);
  } else if (type == "ByteLevel") {
    // Only adjusts offsets; ids are unchanged.
  } else if (type == "TemplateProcessing") {
    template_prefix.clear();
    template_suffix.clear();
    bool seen_sequence = false;
    for (const json& piece : node["single"]) {
      if (piece.contains("Sequence")) {
        seen_sequence = true;
      } else if (piece.contains("SpecialToken")) {
        std::string name = piece["SpecialToken"]["id"].get<std::string>();
        if (!node["special_tokens"].contains(name))
          fail("post_processor", "template token '" + name + "' missing from special_tokens");
        for (const json& id : node["special_tokens"][name]["ids"])
          (seen_sequence ? template_suffix : template_prefix).push_back(id.get<int32_t>());
      } else {
        fail("post_processor", "unknown template piece " + piece.dump());
      }
    }
  } else {
    fail("post_processor",
         "unsupported type '" + type + "' (supported: TemplateProcessing, ByteLevel, Sequence)");
  }
}

void Tokenizer::Impl::parse_decoder(const json& node) {
  if (node.is_null()) return;
  std::string type = node.value("type", "");
  bool fused = false;
  auto parse_step = [&](const json& step, bool in_sequence) {
    std::string step_type = step.value("type", "");
    if (step_type == "ByteLevel") {
      decode_byte_level = true;
      auto table = byte_to_code_point_table();
      for (int byte = 0; byte < 256; ++byte)
        code_point_to_byte[table[byte]] = static_cast<uint8_t>(byte);
    } else if (step_type == "Replace") {
      if (decode_byte_fallback || fused)
        fail("decoder", "Replace is supported only before ByteFallback and Fuse");
      decode_replacements.emplace_back(literal_pattern(step, source + ": decoder Replace"),
                                       step["content"].get<std::string>());
    } else if (step_type == "ByteFallback") {
      decode_byte_fallback = true;
    } else if (step_type == "Fuse") {
      fused = true;
    } else if (step_type == "Strip") {
      if (!fused && in_sequence)
        fail("decoder", "Strip is supported only after Fuse (it strips the whole text)");
      if (step.value("stop", 0) != 0) fail("decoder", "Strip with stop > 0 is not supported");
      strip_content = step["content"].get<std::string>();
      strip_leading = step.value("start", 0);
    } else if (step_type == "Metaspace") {
      metaspace_decode = true;
      metaspace_replacement = step.value("replacement", std::string(kMetaspace));
      metaspace_drop_in_first =
          parse_prepend_scheme(step, source + ": decoder Metaspace") != PrependScheme::kNever;
    } else {
      fail("decoder", "unsupported type '" + step_type +
                          "' (supported: ByteLevel, Metaspace, Sequence of Replace, "
                          "ByteFallback, Fuse, Strip)");
    }
  };
  if (type == "Sequence") {
    for (const json& step : node["decoders"]) parse_step(step, true);
  } else {
    parse_step(node, false);
  }
}

void Tokenizer::Impl::bpe_word(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges) {
    std::string mapped;
    if (byte_level) {
      static const auto table = byte_to_code_point_table();
      for (char c : word) unicode::append_utf8(mapped, table[static_cast<uint8_t>(c)]);
    }
    auto it = vocab.find(byte_level ? std::string_view(mapped) : word);
    if (it != vocab.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  // Initial symbols: one per byte (byte-level) or per character.
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  bool previous_was_unk = false;
  auto push_unknown = [&](std::string_view character) {
    if (byte_fallback) {
      bool all_bytes = std::all_of(character.begin(), character.end(), [&](char c) {
        return byte_fallback_id[static_cast<uint8_t>(c)] >= 0;
      });
      if (all_bytes) {
        for (char c : character) symbols.push_back(byte_fallback_id[static_cast<uint8_t>(c)]);
        previous_was_unk = false;
        return;
      }
    }
    if (unk_id < 0) return;  // HF drops characters it cannot represent
    if (fuse_unk && previous_was_unk) return;
    symbols.push_back(unk_id);
    previous_was_unk = true;
  };
  if (byte_level) {
    for (char c : word) {
      int32_t id = byte_level_symbol[static_cast<uint8_t>(c)];
      if (id >= 0) {
        symbols.push_back(id);
        previous_was_unk = false;
      } else {
        push_unknown(std::string_view(&c, 1));
      }
    }
  } else {
    for (size_t pos = 0; pos < word.size();) {
      size_t length;
      unicode::decode_utf8(word, pos, length);
      std::string_view character = word.substr(pos, length);
      auto it = vocab.find(character);
      if (it != vocab.end()) {
        symbols.push_back(it->second);
        previous_was_unk = false;
      } else {
        push_unknown(character);
      }
      pos += length;
    }
  }
  if (symbols.size() > 1) {
    // Linked list of symbols plus a min-heap of (rank, position) candidate merges; stale
    // candidates are recognized by their ids no longer matching and skipped.
    const int n = static_cast<int>(symbols.size());
    std::vector<int> next(n), previous(n);
    for (int i = 0; i < n; ++i) {
      next[i] = i + 1 < n ? i + 1 : -1;
      previous[i] = i - 1;
    }
    struct Candidate {
      int32_t rank;
      int position;
      int32_t left_id, right_id;
      bool operator>(const Candidate& other) const {
        return rank != other.rank ? rank > other.rank : position > other.position;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto consider = [&](int left) {
      if (left < 0 || next[left] < 0) return;
      auto it = merges.find(pair_key(symbols[left], symbols[next[left]]));
      if (it != merges.end())
        queue.push({it->second.rank, left, symbols[left], symbols[next[left]]});
    };
    for (int i = 0; i + 1 < n; ++i) consider(i);
    std::vector<bool> alive(n, true);
    while (!queue.empty()) {
      Candidate candidate = queue.top();
      queue.pop();
      int left = candidate.position;
      int right = alive[left] ? next[left] : -1;
      if (right < 0 || symbols[left] != candidate.left_id || symbols[right] != candidate.right_id)
        continue;
      symbols[left] = merges.at(pair_key(candidate.left_id, candidate.right_id)).merged_id;
      alive[right] = false;
      next[left] = next[right];
      if (next[right] >= 0) previous[next[right]] = left;
      consider(previous[left]);
      consider(left);
    }
    for (int i = 0; i >= 0; i = next[i]) ids.push_back(symbols[i]);
    return;
  }
  ids.insert(ids.end(), symbols.begin(), symbols.end());
}

void Tokenizer::Impl::encode_segment(std::string_view segment, bool at_text_start,
                                     std::vector<int32_t>& ids) const {
  std::string normalized(segment);
  for (const NormalizerStep& step : normalizers) {
    switch (step.kind) {
      case NormalizerKind::kNfc:
        normalized = unicode::nfc(normalized);
        break;
      case NormalizerKind::kPrepend:
        if (!normalized.empty()) normalized.insert(0, step.content);
        break;
      case NormalizerKind::kReplace:
        replace_all(normalized, step.pattern, step.content);
        break;
    }
  }
  if (normalized.empty()) return;
  std::vector<std::string> words{std::move(normalized)}, next_words;
  for (const PreTokenizerStep& step : pre_tokenizers) {
    next_words.clear();
    for (size_t index = 0; index < words.size(); ++index) {
      std::string& word = words[index];
      switch (step.kind) {
        case PreTokenizerKind::kSplitRegex:
          split_words(word, step.max_digit_run, next_words);
          break;
        case PreTokenizerKind::kByteLevel:
          // Bytes stay raw; bpe_word maps each byte to its symbol directly.
          if (step.add_prefix_space && !word.starts_with(' ')) word.insert(0, " ");
          next_words.push_back(std::move(word));
          break;
        case PreTokenizerKind::kMetaspace: {
          replace_all(word, " ", step.replacement);
          bool prepend =
              step.prepend_scheme == PrependScheme::kAlways ||
              (step.prepend_scheme == PrependScheme::kFirst && at_text_start && index == 0);
          if (prepend && !word.starts_with(step.replacement)) word.insert(0, step.replacement);
          if (!step.split) {
            next_words.push_back(std::move(word));
            break;
          }
          // Each replacement starts a new word (HF MergedWithNext).
          size_t start = 0;
          for (size_t hit = word.find(step.replacement, 1); hit != std::string::npos;
               hit = word.find(step.replacement, hit + 1)) {
            if (hit > start) next_words.push_back(word.substr(start, hit - start));
            start = hit;
          }
          next_words.push_back(word.substr(start));
          break;
        }
      }
    }
    std::swap(words, next_words);
  }
  for (const std::string& word : words) bpe_word(word, ids);
}

void Tokenizer::Impl::token_bytes(int32_t id, bool first, std::string& out) const {
  const std::string& token = id_to_token[id];
  if (decode_byte_level) {
    // Characters outside the byte map (e.g. in an added token) make HF keep the token's own
    // UTF-8 bytes.
    std::string bytes;
    for (size_t pos = 0; pos < token.size();) {
      size_t length;
      uint32_t code_point = unicode::decode_utf8(token, pos, length);
      auto it = code_point_to_byte.find(code_point);
      if (it == code_point_to_byte.end()) {
        out += token;
        return;
      }
      bytes += static_cast<char>(it->second);
      pos += length;
    }
    out += bytes;
    return;
  }
  if (decode_byte_fallback && token.size() == 6 && token.starts_with("<0x") && token[5] == '>') {
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int high = hex(token[3]), low = hex(token[4]);
    if (high >= 0 && low >= 0) {
      out += static_cast<char>(high * 16 + low);
      return;
    }
  }
  std::string text = token;
  for (const auto& [pattern, replacement] : decode_replacements)
    replace_all(text, pattern, replacement);
  if (metaspace_decode)
    replace_all(text, metaspace_replacement, first && metaspace_drop_in_first ? "" : " ");
  out += text;
}

Tokenizer Tokenizer::from_json_text(std::string_view json_text, const std::string& source_name) {
  auto impl = std::make_shared<Impl>();
  impl->source = source_name;
  check_json_depth(json_text, source_name);
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& error) {
    throw_error(source_name, ": not valid JSON: ", error.what());
  }
  if (!root.is_object()) throw_error(source_name, ": top level is not a JSON object");
  try {
    impl->parse_model(root);
    impl->parse_added_tokens(root);
    impl->parse_normalizer(root.value("normalizer", json()));
    impl->parse_pre_tokenizer(root.value("pre_tokenizer", json()));
    impl->parse_post_processor(root.value("post_processor", json()));
    impl->parse_decoder(root.value("decoder", json()));
  } catch (const json::exception& error) {
    // A field of the wrong JSON type somewhere in a component.
    throw_error(source_name, ": malformed tokenizer.json: ", error.what());
  }
  // Byte-level words are raw bytes; their initial symbols are the vocabulary ids of the
  // mapped characters.
  auto table = byte_to_code_point_table();
  for (int byte = 0; byte < 256; ++byte) {
    std::string mapped;
    unicode::append_utf8(mapped, table[byte]);
    auto it = impl->vocab.find(mapped);
    impl->byte_level_symbol[byte] = it == impl->vocab.end() ? -1 : it->second;
  }
  int32_t max_id = -1;
  for (const auto& [token, id] : impl->vocab) max_id = std::max(max_id, id);
  for (const auto& [token, id] : impl->added_vocab) max_id = std::max(max_id, id);
  impl->id_to_token.assign(static_cast<size_t>(max_id + 1), "");
  impl->id_present.assign(static_cast<size_t>(max_id + 1), false);
  impl->id_special.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [token, id] : impl->vocab) {
    impl->id_to_token[id] = token;
    impl->id_present[id] = true;
  }
  for (const AddedToken& token : impl->added_tokens) {
    impl->id_to_token[token.id] = token.content;  // added token content wins for its id
    impl->id_present[token.id] = true;
    impl->id_special[token.id] = token.special;
  }
  impl->distinct_token_count = impl->vocab.size();
  for (const auto& [token, id] : impl->added_vocab)
    impl->distinct_token_count += impl->vocab.find(token) == impl->vocab.end();
  for (int32_t id : impl->template_prefix)
    if (id < 0 || id > max_id) impl->fail("post_processor", "template id out of range");
  for (int32_t id : impl->template_suffix)
    if (id < 0 || id > max_id) impl->fail("post_processor", "template id out of range");
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::string& tokenizer_json_path) {
  std::ifstream file(tokenizer_json_path, std::ios::binary);
  if (!file) throw_error(tokenizer_json_path, ": cannot open tokenizer file");
  std::stringstream contents;
  contents << file.rdbuf();
  return from_json_text(contents.str(), tokenizer_json_path);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const Impl& impl = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids = impl.template_prefix;
  size_t segment_start = 0;
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* match = nullptr;
    for (size_t index : impl.added_by_first_byte[static_cast<uint8_t>(text[pos])]) {
      if (text.substr(pos).starts_with(impl.added_tokens[index].content)) {
        match = &impl.added_tokens[index];  // longest first, so the first hit is longest
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t match_start = pos, match_end = pos + match->content.size();
    if (match->lstrip) {
      while (match_start > segment_start) {
        size_t previous = match_start - 1;
        while (previous > segment_start && (static_cast<uint8_t>(text[previous]) & 0xC0) == 0x80)
          --previous;
        size_t length;
        if (!unicode::is_whitespace(unicode::decode_utf8(text, previous, length))) break;
        match_start = previous;
      }
    }
    if (match->rstrip) {
      size_t length;
      while (match_end < text.size() &&
             unicode::is_whitespace(unicode::decode_utf8(text, match_end, length)))
        match_end += length;
    }
    if (match_start > segment_start)
      impl.encode_segment(text.substr(segment_start, match_start - segment_start),
                          segment_start == 0, ids);
    ids.push_back(match->id);
    pos = match_end;
    segment_start = pos;
  }
  if (segment_start < text.size())
    impl.encode_segment(text.substr(segment_start), segment_start == 0, ids);
  if (add_special_tokens)
    ids.insert(ids.end(), impl.template_suffix.begin(), impl.template_suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  StreamDecoder decoder(*this, skip_special_tokens);
  std::string text;
  for (int32_t id : ids) text += decoder.push(id);
  text += decoder.finish();
  return text;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_present.size() || !impl_->id_present[id])
    throw_error(impl_->source, ": no token bytes for id ", id, " (not in the vocabulary)");
  std::string bytes;
  impl_->token_bytes(id, /*first=*/false, bytes);
  return bytes;
}

int32_t Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_vocab.find(token); it != impl_->added_vocab.end()) return it->second;
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_token.size() || !impl_->id_present[id])
    return std::nullopt;
  return impl_->id_to_token[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_special.size() && impl_->id_special[id];
}

size_t Tokenizer::vocab_size() const {
  return impl_->distinct_token_count;
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : impl_(tokenizer.impl_),
      skip_special_tokens_(skip_special_tokens),
      leading_strip_remaining_(impl_->strip_leading) {}

std::string StreamDecoder::push(int32_t id) {
  const Tokenizer::Impl& impl = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= impl.id_present.size() || !impl.id_present[id])
    throw_error(impl.source, ": cannot decode token id ", id, " (not in the vocabulary)");
  if (skip_special_tokens_ && impl.id_special[id]) return {};
  size_t before = pending_bytes_.size();
  impl.token_bytes(id, first_token_, pending_bytes_);
  first_token_ = false;
  // Strip decoder: drop leading copies of the content from the start of the whole text.
  const std::string& content = impl.strip_content;
  while (leading_strip_remaining_ > 0 && !content.empty() && pending_bytes_.size() > before) {
    std::string_view added = std::string_view(pending_bytes_).substr(before);
    if (added.starts_with(content)) {
      pending_bytes_.erase(before, content.size());
      --leading_strip_remaining_;
    } else if (content.starts_with(added)) {
      break;  // a partial match could still complete with the next token; rare, keep it
    } else {
      leading_strip_remaining_ = 0;
    }
  }
  std::string out;
  drain_utf8(pending_bytes_, false, out);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out;
  drain_utf8(pending_bytes_, true, out);
  return out;
}

}  // namespace keel
