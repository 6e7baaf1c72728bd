// tokenizer.json and tokenizer_config.json (chat templates).
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_target.h"

// A tokenizer that loads must also encode and decode without failing in any other way.
KEEL_FUZZ_TARGET(tokenizer) {
  keel::fuzz::expect_clean([&] {
    keel::Tokenizer tokenizer = keel::Tokenizer::from_json_text(input, "tokenizer.json");
    for (const char* text : {"Hello, world!", " a\n\tb  ", "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80",
                             "<|im_start|>user<|im_end|>", "\xff\xfe"}) {
      const std::vector<int32_t> ids = tokenizer.encode(text, true);
      (void)tokenizer.decode(ids, false);
      (void)tokenizer.decode(ids, true);
      keel::StreamDecoder stream(tokenizer);
      for (int32_t id : ids) (void)stream.push(id);
      (void)stream.finish();
    }
    const auto vocab = static_cast<int32_t>(tokenizer.vocab_size());
    for (int32_t id : {0, vocab / 2, vocab - 1}) {
      if (id < 0 || !tokenizer.id_to_token(id)) continue;
      (void)tokenizer.token_bytes(id);
      (void)tokenizer.decode({id});
    }
  });
}

KEEL_FUZZ_TARGET(tokenizer_config) {
  keel::fuzz::expect_clean([&] {
    keel::ChatTemplateInfo info = keel::chat_template_from_config(input, "tokenizer_config.json");
    (void)keel::render_chat(info,
                            {{"system", "s"}, {"user", "u"}, {"assistant", "a"}, {"user", "\xff"}});
    (void)keel::render_chat(info, {});
  });
}
