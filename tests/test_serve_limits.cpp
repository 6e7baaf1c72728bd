// The serve config's connection, timeout, unsent-output and profile keys: defaults equal the
// HTTP server's own, values reach HttpServerConfig in the right units, and out-of-range, NaN
// and non-numeric values are errors naming the key.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "kernels/base/check.h"
#include "runtime/serving/serve_config.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

struct Scratch {
  fs::path dir = fs::temp_directory_path() / ("keel_test_serve_limits_" + std::to_string(getpid()));
  Scratch() { fs::create_directories(dir); }
  ~Scratch() {
    std::error_code ignored;
    fs::remove_all(dir, ignored);
  }
};

std::string write_config(const std::string& name, const std::string& text) {
  static Scratch scratch;
  const fs::path path = scratch.dir / name;
  std::ofstream(path) << "model: m\n" << text;
  return path.string();
}

std::string error_of(const std::string& text) {
  try {
    load_serve_config(write_config("bad.yaml", text));
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ServeLimits, DefaultsAreTheHttpServersOwn) {
  server::HttpServerConfig defaults;
  server::HttpServerConfig applied;
  applied.max_connections = -1;  // so a key that apply_http_limits forgets shows
  apply_http_limits(load_serve_config(write_config("defaults.yaml", "")), applied);
  EXPECT_EQ(applied.max_connections, defaults.max_connections);
  EXPECT_EQ(applied.reserved_connections, defaults.reserved_connections);
  EXPECT_EQ(applied.header_timeout, defaults.header_timeout);
  EXPECT_EQ(applied.body_timeout, defaults.body_timeout);
  EXPECT_EQ(applied.idle_timeout, defaults.idle_timeout);
  EXPECT_EQ(applied.send_timeout, defaults.send_timeout);
  EXPECT_EQ(applied.max_unsent_bytes, defaults.max_unsent_bytes);
  EXPECT_EQ(applied.max_body_bytes, defaults.max_body_bytes);
}

TEST(ServeLimits, ValuesReachTheServerInItsUnits) {
  const ServeConfig config = load_serve_config(
      write_config("set.yaml",
                   "max_connections: 40\nreserved_connections: 3\nheader_timeout_s: 0.25\n"
                   "body_timeout_s: 2\nidle_timeout_s: 1.5\nsend_timeout_s: 7\nmax_unsent_kb: 64\n"
                   "max_body_kb: 8\nprofile_max_spans: 1234\nhttp_threads: 3\n"));
  EXPECT_EQ(config.profile_max_spans, 1234);
  server::HttpServerConfig http;
  apply_http_limits(config, http);
  EXPECT_EQ(http.max_connections, 40);
  EXPECT_EQ(http.reserved_connections, 3);
  EXPECT_EQ(http.header_timeout, std::chrono::milliseconds(250));
  EXPECT_EQ(http.body_timeout, std::chrono::milliseconds(2000));
  EXPECT_EQ(http.idle_timeout, std::chrono::milliseconds(1500));
  EXPECT_EQ(http.send_timeout, std::chrono::milliseconds(7000));
  EXPECT_EQ(http.max_unsent_bytes, size_t{64} * 1024);
  EXPECT_EQ(http.max_body_bytes, size_t{8} * 1024);
  EXPECT_EQ(http.threads, 3);
}

TEST(ServeLimits, BadValuesNameTheKey) {
  const std::pair<const char*, const char*> cases[] = {
      {"max_connections: 0\n", "key 'max_connections' is 0"},
      {"reserved_connections: -1\n", "key 'reserved_connections' is -1"},
      {"header_timeout_s: 0\n", "key 'header_timeout_s' is 0"},
      {"idle_timeout_s: .nan\n", "key 'idle_timeout_s' is .nan"},
      {"send_timeout_s: 4000\n", "key 'send_timeout_s' is 4000"},
      {"body_timeout_s: soon\n", "body_timeout_s"},
      {"max_unsent_kb: 1\n", "key 'max_unsent_kb' is 1"},
      {"profile_max_spans: 0\n", "key 'profile_max_spans' is 0"},
      {"profile_max_spans: 100000001\n", "key 'profile_max_spans' is 100000001"}};
  for (const auto& [text, expected] : cases) {
    const std::string error = error_of(text);
    EXPECT_NE(error.find(expected), std::string::npos) << text << " -> " << error;
  }
}

}  // namespace
}  // namespace keel
