// Trace files named by a client: confined to trace_dir (no absolute paths, no '..', no symbolic
// links on the way, never an existing file), one uniform refusal whatever exists, and the
// background writer's output equal to the in-memory trace document.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/base/check.h"
#include "runtime/telemetry/trace.h"
#include "runtime/telemetry/trace_file.h"
#include "scratch_files.h"

namespace keel::telemetry {
namespace {

namespace fs = std::filesystem;

using keel::test::read_text;
using keel::test::write_text;

// Each test's own scratch directory (a fresh one per test: the name carries the test's name).
struct Scratch : keel::test::ScratchDir {
  Scratch()
      : keel::test::ScratchDir(std::string("test-trace-file/") +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name()) {}
};

// The message of the keel::Error that `fn` throws ("" if none).
template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TraceName, OnlyPlainRelativeNamesPass) {
  for (const char* good : {"trace.json", "run-1/step_2.json", "a/b/c.trace", "A.B-c_d"})
    EXPECT_FALSE(trace_name_problem(good).has_value()) << good;
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "empty"},
      {"/etc/passwd", "absolute"},
      {"../x.json", "'.'"},
      {"a/../../x.json", "'.'"},
      {"./x.json", "'.'"},
      {"a/.hidden", "'.'"},
      {"a//b.json", "empty component"},
      {"dir/", "empty component"},
      {"a\\b.json", "character"},
      {"x y.json", "character"},
      {std::string("x\0y", 3), "character"},
      {"a/b/c/d/e/f/g/h/i.json", "components"},
      {std::string(300, 'a'), "longer"}};
  for (const auto& [name, reason] : bad) {
    std::optional<std::string> problem = trace_name_problem(name);
    ASSERT_TRUE(problem.has_value()) << name;
    EXPECT_NE(problem->find(reason), std::string::npos) << name << ": " << *problem;
  }
}

TEST(TraceDirectory, CreatesNewFilesBelowItAndRefusesRuleBreakers) {
  Scratch scratch;
  const fs::path traces = scratch.dir("traces");
  fs::create_directories(traces / "sub");
  TraceDirectory directory(traces.string());
  {
    OwnedFd file = directory.create("sub/run.json");
    ASSERT_GE(file.get(), 0);
    ASSERT_EQ(::write(file.get(), "{}", 2), 2);
  }
  EXPECT_EQ(read_text(traces / "sub" / "run.json"), "{}");
  // Absolute and '..' names are refused by rule, before any file system access: the file they
  // name outside is neither created nor touched.
  const fs::path outside = scratch.dir("outside") / "victim.txt";
  write_text(outside, "precious");
  for (const std::string& name : std::vector<std::string>{outside.string(), "../outside/victim.txt",
                                                          "sub/../../outside/victim.txt"}) {
    std::string error = error_of([&] { directory.create(name); });
    EXPECT_NE(error.find("refused"), std::string::npos) << name << ": " << error;
  }
  EXPECT_EQ(read_text(outside), "precious");
  EXPECT_FALSE(fs::exists(scratch.root() / "outside" / "new.json"));
  EXPECT_THROW(TraceDirectory((scratch.root() / "missing").string()), Error);
}

// Whatever stands in the way (an existing file, a symbolic link to a file or a directory
// outside, a dangling link, a missing directory), the answer is the same sentence, nothing
// outside is created or changed and no existing file is truncated.
TEST(TraceDirectory, OneRefusalForEverythingThatExistsOrLeadsOut) {
  Scratch scratch;
  const fs::path outside = scratch.dir("outside");
  write_text(outside / "x.json", "outside file");
  std::vector<std::string> errors;
  auto attempt = [&](const std::string& case_name, auto plant) {
    const fs::path traces = scratch.dir("traces-" + case_name);
    plant(traces);
    TraceDirectory directory(traces.string());
    std::string error = error_of([&] { directory.create("d/x.json"); });
    EXPECT_NE(error, "") << case_name << ": accepted";
    errors.push_back(error);
  };
  attempt("existing", [&](const fs::path& t) {
    fs::create_directories(t / "d");
    write_text(t / "d" / "x.json", "keep me");
  });
  attempt("file-link", [&](const fs::path& t) {
    fs::create_directories(t / "d");
    fs::create_symlink(outside / "x.json", t / "d" / "x.json");
  });
  attempt("dangling-link", [&](const fs::path& t) {
    fs::create_directories(t / "d");
    fs::create_symlink(outside / "absent.json", t / "d" / "x.json");
  });
  attempt("dir-link", [&](const fs::path& t) { fs::create_directory_symlink(outside, t / "d"); });
  attempt("missing-dir", [](const fs::path&) {});
  for (const std::string& error : errors) EXPECT_EQ(error, errors.front());
  EXPECT_NE(errors.front().find("cannot create trace file 'd/x.json'"), std::string::npos)
      << errors.front();
  EXPECT_EQ(read_text(scratch.root() / "traces-existing" / "d" / "x.json"), "keep me");
  EXPECT_EQ(read_text(outside / "x.json"), "outside file");
  EXPECT_FALSE(fs::exists(outside / "absent.json"));
  EXPECT_EQ(std::distance(fs::directory_iterator(outside), fs::directory_iterator()), 1);
}

TEST(TraceDirectory, GeneratedNamesNeverReuseAFile) {
  Scratch scratch;
  const fs::path traces = scratch.dir("traces");
  write_text(traces / "keel-trace-1700000000.json", "older");
  TraceDirectory directory(traces.string());
  auto [first, first_fd] = directory.create_unique(1700000000);
  auto [second, second_fd] = directory.create_unique(1700000000);
  EXPECT_EQ(first, "keel-trace-1700000000-1.json");
  EXPECT_EQ(second, "keel-trace-1700000000-2.json");
  EXPECT_EQ(read_text(traces / "keel-trace-1700000000.json"), "older");
}

TEST(TraceWriter, WritesTheSameDocumentOffTheCallersThread) {
  Scratch scratch;
  const fs::path traces = scratch.dir("traces");
  std::vector<TraceSpan> spans;
  for (int32_t rank = 1; rank >= 0; --rank)
    for (int i = 0; i < 5000; ++i)  // over the writer's 1 MB buffer
      spans.push_back({rank,
                       "expert " + std::to_string(i % 7),
                       "moe",
                       10.0 * i,
                       2.5,
                       {{"step", i / 10}, {"layer", i % 3}}});
  const std::string expected = chrome_trace_json(spans, "keel serve x").dump() + "\n";
  std::string streamed;
  stream_chrome_trace(spans, "keel serve x", [&](std::string_view text) { streamed += text; });
  EXPECT_EQ(streamed + "\n", expected);

  TraceDirectory directory(traces.string());
  TraceWriter writer;
  EXPECT_TRUE(writer.status().is_null());
  writer.start(directory.create("t.json"), "t.json", spans, "keel serve x");
  writer.wait();
  EXPECT_FALSE(writer.busy());
  EXPECT_EQ(writer.status()["state"], "written");
  EXPECT_EQ(writer.status()["spans"], spans.size());
  EXPECT_EQ(read_text(traces / "t.json"), expected);
  // A failing write (bad span) is reported, not thrown into the server.
  TraceSpan bad = spans.front();
  bad.dur_us = -1;
  writer.start(directory.create("bad.json"), "bad.json", {bad}, "p");
  writer.wait();
  EXPECT_EQ(writer.status()["state"], "failed");
  EXPECT_NE(writer.status()["error"].get<std::string>().find("duration"), std::string::npos);
}

}  // namespace
}  // namespace keel::telemetry
