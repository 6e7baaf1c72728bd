// SHA-256 against FIPS 180-4's known answers, and BackgroundSha256 (the worker-thread digest
// keel generate uses for logits_digest) equal to Sha256 over the same bytes in any chunking,
// including none, with chunk storage reused across many updates.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/common/background_sha256.h"
#include "runtime/common/sha256.h"

namespace keel {
namespace {

std::string hex_of(const std::string& text) {
  Sha256 sha;
  sha.update(text.data(), text.size());
  return sha.finish_hex();
}

TEST(Sha256, KnownAnswers) {
  EXPECT_EQ(hex_of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

// The SHA-extensions path (where the CPU has one) and the plain one agree on every length
// around the block and padding boundaries and on random chunkings of a long message.
TEST(Sha256, HardwarePathEqualsPlainPath) {
  if (!sha256_has_hardware_path())
    GTEST_SKIP() << "this CPU has no SHA extensions; only the plain path runs (KnownAnswers)";
  std::mt19937 rng(11);
  std::vector<unsigned char> bytes(70000);
  for (auto& b : bytes) b = static_cast<unsigned char>(rng());
  auto digest = [&](size_t length, size_t chunk) {
    Sha256 sha;
    for (size_t start = 0; start < length; start += chunk)
      sha.update(bytes.data() + start, std::min(chunk, length - start));
    return sha.finish_hex();
  };
  for (size_t length : {size_t{0}, size_t{1}, size_t{55}, size_t{56}, size_t{63}, size_t{64},
                        size_t{65}, size_t{119}, size_t{128}, size_t{1000}, size_t{70000}}) {
    for (size_t chunk : {size_t{1}, size_t{64}, size_t{100}, size_t{70000}}) {
      sha256_use_hardware_path(false);
      const std::string plain = digest(length, chunk);
      sha256_use_hardware_path(true);
      EXPECT_EQ(digest(length, chunk), plain) << length << " bytes in chunks of " << chunk;
    }
  }
  sha256_use_hardware_path(false);
  EXPECT_EQ(hex_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  sha256_use_hardware_path(true);
  EXPECT_EQ(hex_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(BackgroundSha256, EqualsSha256InAnyChunking) {
  std::mt19937 rng(4);
  std::vector<unsigned char> bytes(300000);
  for (auto& b : bytes) b = static_cast<unsigned char>(rng());
  Sha256 reference;
  reference.update(bytes.data(), bytes.size());
  const std::string expected = reference.finish_hex();
  for (size_t chunk : {size_t{1}, size_t{63}, size_t{64}, size_t{4096}, size_t{300000}}) {
    BackgroundSha256 background;
    for (size_t start = 0; start < bytes.size(); start += chunk)
      background.update(bytes.data() + start, std::min(chunk, bytes.size() - start));
    EXPECT_EQ(background.finish_hex(), expected) << chunk;
  }
  BackgroundSha256 empty;
  EXPECT_EQ(empty.finish_hex(), hex_of(""));
  BackgroundSha256 spent;
  spent.update("abc", 3);
  EXPECT_EQ(spent.finish_hex(), hex_of("abc"));
  EXPECT_THROW(spent.update("x", 1), Error);
  {
    BackgroundSha256 abandoned;
    abandoned.update("abc", 3);
  }  // destroyed unfinished: joins
}

}  // namespace
}  // namespace keel
