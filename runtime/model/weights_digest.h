// A cheap digest of a checkpoint directory, for the system_fingerprint of keel serve's
// responses: two servers whose digests match were started on the same checkpoint files (up to
// what the sampling below can miss).
//
// What it covers, exactly (SHA-256, hex): the text "keel-weights-v1\n", then for every regular
// file at the top of the directory whose name ends in .json, .jinja or .safetensors, in byte
// order of the names: the name, a NUL byte, the file size as 8 bytes little-endian, then
//   - .json / .jinja files (config.json, quantization configs, the safetensors index,
//     tokenizer.json, tokenizer_config.json, a chat template): every byte;
//   - .safetensors files: the 8-byte header length and the whole JSON header (every tensor's
//     name, dtype, shape and offsets), then the data region whole when it is at most
//     kDigestWindows x kDigestWindowBytes (256 KiB), else kDigestWindows windows of
//     kDigestWindowBytes at offsets floor(i * (data_bytes - kDigestWindowBytes) /
//     (kDigestWindows - 1)), i = 0..kDigestWindows-1 (the first and last bytes included).
// So it reads at most 256 KiB of tensor data per shard (a 397B checkpoint: tens of MB, most of
// it headers), and it sees any change of shape, dtype, layout, size, config or tokenizer, any
// change of a small checkpoint's values, and a change of a large checkpoint's values wherever
// it touches a window (a fine-tune or re-quantization changes every window); an edit confined
// to bytes between windows is not seen. Other files (README, .git) do not count.
#pragma once

#include <cstddef>
#include <string>

namespace keel {

inline constexpr size_t kDigestWindows = 64;
inline constexpr size_t kDigestWindowBytes = 4096;

// Throws keel::Error naming the directory or file when one cannot be read.
std::string checkpoint_digest(const std::string& directory);

}  // namespace keel
