// `keel serve`'s profile endpoints on real sockets and real files (tiny-chat, 2 thread ranks):
//  - POST /v1/profile/stop {"path"} writes only new files under trace_dir: an absolute path, a
//    '..' path, a symbolic link planted in trace_dir (to a directory or a file outside), an
//    existing file and a missing directory are all refused, nothing outside trace_dir is
//    created or changed, the existing file keeps its bytes, and every refusal that depends on
//    what exists reads the same; a plain name is written, by the background writer, in full;
//  - profile_max_spans: under load the profile stops by itself at exactly the cap, the buffer
//    does not grow past it with more load, the log warns once, and GET /v1/profile and the
//    stop's answer say the cap stopped it.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/model/gen_model.h"
#include "runtime/model/model_config.h"
#include "scratch_files.h"
#include "serve_test_util.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace keel::serve_test;

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";

using keel::test::read_text;
using keel::test::write_text;

const fs::path& scratch() {
  static const keel::test::ScratchDir dir("test-serve-profile");
  return dir.root();
}

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string out = (scratch() / "tiny-chat").string();
    keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-chat")), {}, out);
    return out;
  }();
  return dir;
}

// A server on tiny-chat whose trace_dir is scratch()/NAME-traces (created empty).
std::vector<std::string> serve_args(const std::string& name, const std::string& extra,
                                    fs::path* trace_dir) {
  *trace_dir = scratch() / (name + "-traces");
  fs::create_directories(*trace_dir);
  const fs::path config = scratch() / (name + ".yaml");
  std::ofstream(config) << "model: " << model_dir() << "\nmodel_name: tiny\ntp: 2\nport: 0\n"
                        << "collective_timeout_ms: 60000\ntrace_dir: " << trace_dir->string()
                        << "\n"
                        << extra;
  return {kKeel, "serve", "--config", config.string()};
}

HttpResponse stop_with_path(int port, const std::string& path) {
  return post(port, "/v1/profile/stop", json{{"path", path}}.dump());
}

json profile_status(int port) {
  HttpResponse response = http(port, "GET", "/v1/profile");
  EXPECT_EQ(response.status, 200) << response.body;
  return json::parse(response.body);
}

// Polls GET /v1/profile until the background writer is done with the last trace (bounded: a
// few hundred spans take milliseconds; the bound only keeps a broken writer from hanging).
json wait_for_write(int port) {
  json status;
  for (int attempt = 0; attempt < 600; ++attempt) {
    status = profile_status(port);
    if (status["last_trace"].is_object() && status["last_trace"]["state"] != "writing")
      return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ADD_FAILURE() << "trace still being written: " << status.dump();
  return status;
}

int64_t complete_events(const fs::path& trace_file) {
  const json trace = json::parse(read_text(trace_file));
  return std::count_if(trace["traceEvents"].begin(), trace["traceEvents"].end(),
                       [](const json& event) { return event["ph"] == "X"; });
}

const std::string kRequest =
    json{{"prompt", "stone water lantern"}, {"max_tokens", 8}, {"ignore_eos", true}}.dump();

TEST(ServeProfile, StopWritesOnlyNewFilesUnderTraceDir) {
  fs::path traces;
  ServerProcess server(serve_args("confine", "", &traces));
  const int port = server.port();
  const fs::path outside = scratch() / "outside";
  fs::create_directories(outside);
  write_text(outside / "victim.txt", "precious");
  fs::create_directory_symlink(outside, traces / "link");
  fs::create_symlink(outside / "victim.txt", traces / "file-link.json");
  fs::create_symlink(outside / "absent.json", traces / "dangling.json");
  write_text(traces / "existing.json", "keep me");

  EXPECT_EQ(stop_with_path(port, "t.json").status, 409);  // nothing running: nothing created
  EXPECT_FALSE(fs::exists(traces / "t.json"));
  ASSERT_EQ(http(port, "POST", "/v1/profile/start").status, 200);
  ASSERT_EQ(post(port, "/v1/completions", kRequest).status, 200);

  // Refused by the name alone.
  for (const std::string& name :
       std::vector<std::string>{(outside / "victim.txt").string(), "../outside/victim.txt",
                                "link/../../outside/victim.txt"}) {
    HttpResponse response = stop_with_path(port, name);
    EXPECT_EQ(response.status, 400) << name;
    EXPECT_NE(response.body.find("refused"), std::string::npos) << name << ": " << response.body;
  }
  // Refused by what is (or is not) there: one sentence, only the name differs.
  std::vector<std::string> sentences;
  for (const char* name_text : {"link/victim.txt", "link/new.json", "file-link.json",
                                "dangling.json", "existing.json", "missing-dir/new.json"}) {
    const std::string name = name_text;
    HttpResponse response = stop_with_path(port, name);
    EXPECT_EQ(response.status, 400) << name << ": " << response.body;
    std::string sentence = response.body;
    const size_t at = sentence.find(name);
    ASSERT_NE(at, std::string::npos) << name << ": " << response.body;
    sentences.push_back(sentence.replace(at, name.size(), "NAME"));
  }
  for (const std::string& sentence : sentences) EXPECT_EQ(sentence, sentences.front());
  EXPECT_EQ(read_text(outside / "victim.txt"), "precious");
  EXPECT_EQ(read_text(traces / "existing.json"), "keep me");
  EXPECT_FALSE(fs::exists(outside / "absent.json"));
  EXPECT_FALSE(fs::exists(outside / "new.json"));
  EXPECT_FALSE(fs::exists(traces / "missing-dir"));
  EXPECT_EQ(std::distance(fs::directory_iterator(outside), fs::directory_iterator()), 1);

  // The refusals left the profile running; a plain name is written in full.
  HttpResponse stop = stop_with_path(port, "ok.json");
  ASSERT_EQ(stop.status, 200) << stop.body;
  const json answer = json::parse(stop.body);
  EXPECT_EQ(answer["path"], (traces / "ok.json").string());
  EXPECT_EQ(answer["stopped_by_cap"], false);
  const int64_t spans = answer["spans"].get<int64_t>();
  EXPECT_GT(spans, 0);
  const json status = wait_for_write(port);
  EXPECT_EQ(status["last_trace"]["state"], "written") << status.dump();
  EXPECT_EQ(status["tracing"], false);
  EXPECT_EQ(complete_events(traces / "ok.json"), spans);
  EXPECT_EQ(stop_with_path(port, "again.json").status, 409);
  // A name that was written once is never written again.
  ASSERT_EQ(http(port, "POST", "/v1/profile/start").status, 200);
  const std::string written = read_text(traces / "ok.json");
  EXPECT_EQ(stop_with_path(port, "ok.json").status, 400);
  EXPECT_EQ(read_text(traces / "ok.json"), written);
}

TEST(ServeProfile, SpanCapStopsTheProfileUnderLoadAndSaysSo) {
  constexpr int64_t kCap = 500;
  fs::path traces;
  ServerProcess server(
      serve_args("cap", "profile_max_spans: " + std::to_string(kCap) + "\n", &traces));
  const int port = server.port();
  auto load = [&](int clients, int requests_each) {
    std::atomic<int> ok{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c)
      threads.emplace_back([&] {
        for (int r = 0; r < requests_each; ++r)
          if (post(port, "/v1/completions", kRequest).status == 200) ++ok;
      });
    for (std::thread& thread : threads) thread.join();
    EXPECT_EQ(ok.load(), clients * requests_each);
  };
  HttpResponse start = http(port, "POST", "/v1/profile/start");
  ASSERT_EQ(start.status, 200) << start.body;
  EXPECT_EQ(json::parse(start.body)["max_spans"], kCap);
  // Each step gives tens of spans per rank: this load is several times the cap.
  load(8, 4);
  json status = profile_status(port);
  EXPECT_EQ(status["tracing"], false) << status.dump();
  EXPECT_EQ(status["stopped_by_cap"], true);
  EXPECT_EQ(status["spans"], kCap);
  // Stopped: more load adds nothing to the buffer.
  load(8, 2);
  EXPECT_EQ(profile_status(port)["spans"], kCap);
  const std::string log = server.output();
  const std::string warning = "the span cap (500, profile_max_spans) is reached";
  const size_t first = log.find(warning);
  EXPECT_NE(first, std::string::npos) << log;
  EXPECT_EQ(log.find(warning, first + 1), std::string::npos) << "warned more than once";

  HttpResponse stop = post(port, "/v1/profile/stop", "");  // no path: a generated name
  ASSERT_EQ(stop.status, 200) << stop.body;
  const json answer = json::parse(stop.body);
  EXPECT_EQ(answer["spans"], kCap);
  EXPECT_EQ(answer["stopped_by_cap"], true);
  const fs::path file = answer["path"].get<std::string>();
  EXPECT_EQ(file.parent_path(), traces);
  EXPECT_EQ(file.filename().string().rfind("keel-trace-", 0), 0u) << file;
  status = wait_for_write(port);
  EXPECT_EQ(status["last_trace"]["state"], "written") << status.dump();
  EXPECT_EQ(status["stopped_by_cap"], false);  // taken: nothing buffered any more
  EXPECT_EQ(status["spans"], 0);
  EXPECT_EQ(complete_events(file), kCap);
}

TEST(ServeProfile, ProfileMaxSpansFlagOverridesTheConfigAndBadValuesAreRefused) {
  fs::path traces;
  std::vector<std::string> args = serve_args("flag", "profile_max_spans: 500\n", &traces);
  args.insert(args.end(), {"--profile-max-spans", "7"});
  {
    ServerProcess server(args);
    HttpResponse start = http(server.port(), "POST", "/v1/profile/start");
    EXPECT_EQ(json::parse(start.body)["max_spans"], 7);
  }
  args.back() = "0";
  int exit_code = 0;
  std::string command;
  for (const std::string& arg : args) command += arg + " ";
  const std::string output = run_command(command, &exit_code);
  EXPECT_NE(exit_code, 0);
  EXPECT_NE(output.find("--profile-max-spans: '0' must be >= 1"), std::string::npos) << output;
}

}  // namespace
