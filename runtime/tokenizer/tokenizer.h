// HF tokenizer.json loader and BPE tokenizer (byte-level BPE as in Qwen2/Qwen3, and
// SentencePiece-style BPE with byte fallback as in Llama/Mistral/Mixtral), plus an
// incremental detokenizer for streaming responses. See tokenizer.cpp for what is supported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

class Tokenizer {
 public:
  // Parses and validates tokenizer.json; throws keel::Error naming the file and the
  // component (model, normalizer, pre_tokenizer, decoder, post_processor) on anything
  // unsupported or malformed.
  static Tokenizer load(const std::string& tokenizer_json_path);
  // Same, from JSON text; source_name is used in error messages.
  static Tokenizer from_json_text(std::string_view json_text, const std::string& source_name);

  // Token ids for text. Added/special tokens are matched as whole strings first and never
  // split; add_special_tokens applies the post-processor template (e.g. Llama's <s>).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // Text for ids; invalid UTF-8 (e.g. a lone byte token) becomes U+FFFD like HF.
  // Throws keel::Error for an id outside the vocabulary.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // The bytes token `id` stands for in the middle of a text (byte-level tokens mapped back to
  // their bytes, byte-fallback tokens to their byte, metaspace to a space): possibly part of a
  // UTF-8 sequence (OpenAI's logprobs "bytes"). Throws keel::Error for an id outside the
  // vocabulary.
  std::string token_bytes(int32_t id) const;
  // Id of a vocabulary or added token, -1 when absent.
  int32_t token_id(std::string_view token) const;
  // Token string for an id (as stored in tokenizer.json), nullopt when absent.
  std::optional<std::string> id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;
  // Distinct tokens, model vocabulary plus added tokens (HF get_vocab_size(True)).
  size_t vocab_size() const;

  struct Impl;

 private:
  friend class StreamDecoder;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Immutable after load, so copies share it and concurrent encode/decode is safe.
  std::shared_ptr<const Impl> impl_;
};

// Incremental detokenizer: push() returns the text completed by one more id. Bytes of a
// multi-byte character split across tokens are held back until the character is complete,
// so every returned chunk is valid UTF-8; concatenating all push() results and finish()
// equals Tokenizer::decode of all ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  std::string push(int32_t id);
  // Flushes held-back bytes (an incomplete character becomes U+FFFD).
  std::string finish();

 private:
  std::shared_ptr<const Tokenizer::Impl> impl_;
  bool skip_special_tokens_;
  bool first_token_ = true;             // decoders treat the first token specially
  size_t leading_strip_remaining_ = 0;  // Strip decoder: leading chars still to drop
  std::string pending_bytes_;           // an incomplete UTF-8 sequence at the end
};

}  // namespace keel
