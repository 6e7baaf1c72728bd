// Confined trace-file creation and the background trace writer (see trace_file.h).
#include "runtime/telemetry/trace_file.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "kernels/base/check.h"

namespace keel::telemetry {

OwnedFd::~OwnedFd() {
  if (fd_ >= 0) ::close(fd_);
}

OwnedFd& OwnedFd::operator=(OwnedFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.release();
  }
  return *this;
}

namespace {

constexpr size_t kMaxNameBytes = 255;
constexpr size_t kMaxComponents = 8;

bool allowed_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.';
}

std::vector<std::string> components(const std::string& relative) {
  std::vector<std::string> parts;
  size_t at = 0;
  while (true) {
    size_t slash = relative.find('/', at);
    parts.push_back(
        relative.substr(at, slash == std::string::npos ? std::string::npos : slash - at));
    if (slash == std::string::npos) return parts;
    at = slash + 1;
  }
}

void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    ssize_t written = ::write(fd, text.data(), text.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      throw_error(std::strerror(errno));
    }
    text.remove_prefix(static_cast<size_t>(written));
  }
}

}  // namespace

std::optional<std::string> trace_name_problem(const std::string& relative) {
  if (relative.empty()) return "it is empty";
  if (relative.size() > kMaxNameBytes)
    return "it is longer than " + std::to_string(kMaxNameBytes) + " bytes";
  if (relative.front() == '/') return "it is absolute; give a name relative to trace_dir";
  const std::vector<std::string> parts = components(relative);
  if (parts.size() > kMaxComponents)
    return "it has more than " + std::to_string(kMaxComponents) + " components";
  for (const std::string& part : parts) {
    if (part.empty()) return "it has an empty component ('//' or a trailing '/')";
    if (part.front() == '.')
      return "a component starts with '.' ('.', '..' and hidden names are not allowed)";
    for (char c : part)
      if (!allowed_char(c)) return "it has a character outside [A-Za-z0-9_.-] and '/'";
  }
  return std::nullopt;
}

TraceDirectory::TraceDirectory(const std::string& dir) : path_(dir) {
  dir_ = OwnedFd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_.get() < 0)
    throw_error("trace_dir '", dir, "' is not a directory keel can open: ", std::strerror(errno));
}

OwnedFd TraceDirectory::create(const std::string& relative) const {
  if (std::optional<std::string> problem = trace_name_problem(relative))
    throw_error("trace path '", relative, "' is refused: ", *problem);
  const std::vector<std::string> parts = components(relative);
  // The same sentence whatever failed: the client must not learn what exists.
  auto refuse = [&](const std::string& part, int error) {
    spdlog::warn("profile: cannot create trace file '{}' under {} (at '{}': {})", relative, path_,
                 part, std::strerror(error));
    throw_error("cannot create trace file '", relative,
                "' under trace_dir: the path must name a file that does not exist yet, in "
                "trace_dir or a subdirectory of it, reached without symbolic links");
  };
  OwnedFd current;
  int parent = dir_.get();
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    OwnedFd next(
        ::openat(parent, parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (next.get() < 0) refuse(parts[i], errno);
    current = std::move(next);
    parent = current.get();
  }
  OwnedFd file(::openat(parent, parts.back().c_str(),
                        O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (file.get() < 0) refuse(parts.back(), errno);
  return file;
}

std::pair<std::string, OwnedFd> TraceDirectory::create_unique(int64_t unix_seconds) const {
  const std::string stem = "keel-trace-" + std::to_string(unix_seconds);
  for (int n = 0; n < 1000; ++n) {
    std::string name = stem + (n == 0 ? "" : "-" + std::to_string(n)) + ".json";
    OwnedFd file(::openat(dir_.get(), name.c_str(),
                          O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (file.get() >= 0) return {name, std::move(file)};
    if (errno != EEXIST)
      throw_error("cannot create a trace file in trace_dir '", path_, "': ", std::strerror(errno));
  }
  throw_error("cannot create a trace file in trace_dir '", path_, "': ", stem,
              "*.json names are all taken");
}

TraceWriter::~TraceWriter() {
  if (thread_.joinable()) thread_.join();
}

bool TraceWriter::busy() const {
  std::lock_guard lock(mutex_);
  return busy_;
}

void TraceWriter::start(OwnedFd file, std::string name, std::vector<TraceSpan> spans,
                        std::string process_name) {
  std::lock_guard lock(mutex_);
  KEEL_CHECK(!busy_, "TraceWriter::start while a write is in progress");
  if (thread_.joinable()) thread_.join();  // finished: busy_ is false
  busy_ = true;
  status_ = {{"path", name}, {"spans", spans.size()}, {"state", "writing"}};
  thread_ = std::thread([this, file = std::move(file), name = std::move(name),
                         spans = std::move(spans), process_name = std::move(process_name)] {
    std::string error;
    try {
      // Buffered: a trace is millions of small pieces.
      std::string pending;
      stream_chrome_trace(spans, process_name, [&](std::string_view text) {
        pending += text;
        if (pending.size() >= (1 << 20)) {
          write_all(file.get(), pending);
          pending.clear();
        }
      });
      pending += '\n';
      write_all(file.get(), pending);
    } catch (const std::exception& e) {
      error = e.what();
      spdlog::error("profile: writing trace '{}' failed: {}", name, error);
    }
    std::lock_guard done(mutex_);
    status_["state"] = error.empty() ? "written" : "failed";
    if (!error.empty()) status_["error"] = error;
    busy_ = false;
    done_.notify_all();
  });
}

nlohmann::json TraceWriter::status() const {
  std::lock_guard lock(mutex_);
  return status_;
}

void TraceWriter::wait() const {
  std::unique_lock lock(mutex_);
  done_.wait(lock, [this] { return !busy_; });
}

}  // namespace keel::telemetry
