// Fuzz targets: one function per parser of outside input, taking the raw bytes. The same
// functions run under libFuzzer (fuzz_main.cpp, built with -DKEEL_FUZZ=ON and clang, driven by
// scripts/fuzz) and in the default test suite (test_fuzz_corpus.cpp replays the committed
// corpus and every crash found through them, with no fuzzer library).
//
// The contract each target checks: the parser returns, or throws keel::Error (a clear message
// naming what is wrong). Any other exception escapes the target and is a finding, as is a crash
// or a sanitizer report.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

namespace keel::fuzz {

using TargetFn = void (*)(std::string_view input);

// Every target linked into this binary, by name (the corpus directory's name).
std::map<std::string, TargetFn>& targets();

struct RegisterTarget {
  RegisterTarget(const char* name, TargetFn fn) { targets()[name] = fn; }
};

// A file in a per-process scratch directory (under $TMPDIR or /tmp) for parsers that take a
// path; removed with the process's scratch directory at exit.
std::string scratch_dir();
// Writes `contents` to scratch_dir()/name and returns the path.
std::string write_scratch_file(const std::string& name, std::string_view contents);

// Runs `parse`, swallowing keel::Error (the expected outcome for bad input).
template <typename Fn>
void expect_clean(Fn&& parse);

}  // namespace keel::fuzz

#include "kernels/base/check.h"

template <typename Fn>
void keel::fuzz::expect_clean(Fn&& parse) {
  try {
    parse();
  } catch (const keel::Error&) {
  }
}

// KEEL_FUZZ_TARGET(name) { ... uses `input` ... } defines and registers a target.
#define KEEL_FUZZ_TARGET(name)                                                                  \
  static void keel_fuzz_target_##name(std::string_view input);                                  \
  static const ::keel::fuzz::RegisterTarget keel_fuzz_register_##name(#name,                    \
                                                                      keel_fuzz_target_##name); \
  static void keel_fuzz_target_##name(std::string_view input)
