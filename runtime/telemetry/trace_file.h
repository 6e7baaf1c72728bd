// Trace files whose names come from a client (POST /v1/profile/stop {"path": ...}), confined to
// the server's trace directory, and written off the server's threads.
//
// Design:
//  - A client names a file, the server writes it: without care that is "write wherever the
//    server can". TraceDirectory holds the configured directory open (a descriptor taken at
//    start-up) and creates files only beneath it:
//      1. The name is checked as text first: relative, components of [A-Za-z0-9_.-] separated
//         by single '/', none starting with '.' (so no '.', '..' or hidden files), at most 8
//         components and 255 bytes.
//      2. Each directory component is opened relative to the previous one with O_NOFOLLOW |
//         O_DIRECTORY: a symbolic link anywhere on the way is refused by the kernel, so there is
//         no check-then-use window.
//      3. The file itself is created with O_CREAT | O_EXCL | O_NOFOLLOW: an existing file (or a
//         link planted in its place) is never opened, let alone truncated. keel only writes
//         files it has just created.
//    Every failure of steps 2-3 answers the same sentence, so the reply does not tell whether
//    something exists; the log (the operator's) gets the system's reason.
//  - TraceWriter serialises a trace (stream_chrome_trace: one event at a time) into such a
//    descriptor on its own thread: stopping a large profile returns at once, and a server
//    thread never spends seconds formatting JSON. One write at a time; its state (writing,
//    written, failed and why) is kept for the status endpoint.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/telemetry/trace.h"

namespace keel::telemetry {

// An owned file descriptor (-1: none).
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) : fd_(fd) {}
  ~OwnedFd();
  OwnedFd(OwnedFd&& other) noexcept : fd_(other.release()) {}
  OwnedFd& operator=(OwnedFd&& other) noexcept;
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

// Why `relative` is not an acceptable trace file name (rule 1 above), or nullopt.
std::optional<std::string> trace_name_problem(const std::string& relative);

class TraceDirectory {
 public:
  // Opens `dir` (which must exist and be a directory). Throws keel::Error naming it otherwise.
  explicit TraceDirectory(const std::string& dir);
  const std::string& path() const { return path_; }

  // Creates `relative` as a new, empty file (mode 0644) under the directory. Throws keel::Error
  // with the rule it breaks, or with one uniform sentence when the file cannot be created.
  OwnedFd create(const std::string& relative) const;
  // A new file named keel-trace-<unix seconds>[-N].json (N counts up past existing names).
  // Returns its name and descriptor.
  std::pair<std::string, OwnedFd> create_unique(int64_t unix_seconds) const;

 private:
  std::string path_;
  OwnedFd dir_;
};

class TraceWriter {
 public:
  TraceWriter() = default;
  ~TraceWriter();  // waits for a write in progress: the file is complete when keel exits
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  bool busy() const;
  // Starts writing spans into `file` (as write_chrome_trace would) on a thread of its own.
  // `name` is what status() reports. Requires !busy().
  void start(OwnedFd file, std::string name, std::vector<TraceSpan> spans,
             std::string process_name);
  // The last write: {"path", "spans", "state": "writing" | "written" | "failed"[, "error"]},
  // or null before the first.
  nlohmann::json status() const;
  // Blocks until no write is in progress.
  void wait() const;

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable done_;
  std::thread thread_;
  nlohmann::json status_;
  bool busy_ = false;
};

}  // namespace keel::telemetry
