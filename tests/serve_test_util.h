// Helpers for end-to-end serving tests: a `keel serve` child process (thread ranks or under
// mpirun) and a minimal blocking HTTP/1.1 client on real sockets.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace keel::serve_test {

// `mpiexec --allow-run-as-root --oversubscribe -np N`, for root on a 2-core machine. Under
// AddressSanitizer the ranks run without leak detection: OpenMPI's own allocations (MCA
// plugins it unloads before exit, hwloc bitmaps) are reported as leaks at every rank's exit
// and no suppression can name frames in an unloaded plugin. Leaks in keel stay covered by the
// same tests' thread-rank servers, which run with detection on.
inline std::vector<std::string> mpirun_command(const std::string& mpiexec, int ranks) {
  std::vector<std::string> command = {mpiexec, "--allow-run-as-root", "--oversubscribe", "-np",
                                      std::to_string(ranks)};
#if defined(__SANITIZE_ADDRESS__)
  const char* options = std::getenv("ASAN_OPTIONS");
  command.push_back("-x");
  command.push_back(std::string("ASAN_OPTIONS=") + (options ? std::string(options) + ":" : "") +
                    "detect_leaks=0");
#endif
  return command;
}

// A `keel serve ...` child. Its stdout+stderr are drained by a thread (a full pipe would stall
// the server); the constructor waits for the "listening on http://HOST:PORT" line (HOST: what
// --host says).
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& argv,
                         std::chrono::seconds startup_timeout = std::chrono::seconds(120),
                         const std::string& host = "127.0.0.1") {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe failed");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], STDOUT_FILENO);
      dup2(fds[1], STDERR_FILENO);
      close(fds[0]);
      close(fds[1]);
      setpgid(0, 0);  // its own group: a test failure can kill mpirun and its ranks together
      std::vector<char*> args;
      for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      char buffer[4096];
      ssize_t bytes;
      while ((bytes = read(fd, buffer, sizeof(buffer))) > 0) {
        std::lock_guard lock(mutex_);
        output_.append(buffer, static_cast<size_t>(bytes));
      }
      close(fd);
    });
    const auto deadline = std::chrono::steady_clock::now() + startup_timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard lock(mutex_);
        const std::string marker = "listening on http://" + host + ":";
        size_t at = output_.find(marker);
        if (at != std::string::npos && output_.find('\n', at) != std::string::npos) {
          port_ = std::stoi(output_.substr(at + marker.size()));
          size_t pid_at = output_.find("(pid ", at);
          if (pid_at != std::string::npos) leader_pid_ = std::stoi(output_.substr(pid_at + 5));
          return;
        }
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        reader_.join();
        throw std::runtime_error("keel serve exited before listening:\n" + output());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    throw std::runtime_error("keel serve did not start listening in time:\n" + output());
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (reader_.joinable()) reader_.join();
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  // The serving process's pid (under mpirun: rank 0's, from the "listening on" line).
  pid_t leader_pid() const { return leader_pid_; }
  // SIGTERM to the serving process (under mpirun: rank 0, the leader, which drains and then
  // stops the other ranks; mpirun itself would tear the job down instead).
  void terminate() const { kill(leader_pid_ > 0 ? leader_pid_ : pid_, SIGTERM); }
  // Waits for exit (up to `timeout`, then SIGKILL); returns the exit code, 128+signal if killed.
  int wait(std::chrono::seconds timeout = std::chrono::seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(-pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    if (reader_.joinable()) reader_.join();
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  std::string output() const {
    std::lock_guard lock(mutex_);
    return output_;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  pid_t leader_pid_ = -1;
  std::thread reader_;
  mutable std::mutex mutex_;
  std::string output_;
};

inline int connect_to(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

inline bool send_all(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    ssize_t bytes = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (bytes <= 0) return false;
    sent += static_cast<size_t>(bytes);
  }
  return true;
}

// `headers`: further header lines, each "Name: value".
inline std::string request_text(const std::string& method, const std::string& path,
                                const std::string& body,
                                const std::vector<std::string>& headers = {}) {
  std::string text = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
  for (const std::string& header : headers) text += header + "\r\n";
  if (!body.empty() || method == "POST")
    text +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  return text + "\r\n" + body;
}

struct HttpResponse {
  int status = 0;                              // 0: no response (connection failed)
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // de-chunked
};

inline std::string dechunk(const std::string& raw) {
  std::string body;
  size_t at = 0;
  while (at < raw.size()) {
    size_t line_end = raw.find("\r\n", at);
    if (line_end == std::string::npos) break;
    size_t size = std::stoul(raw.substr(at, line_end - at), nullptr, 16);
    if (size == 0) break;
    body += raw.substr(line_end + 2, size);
    at = line_end + 2 + size + 2;
  }
  return body;
}

inline HttpResponse parse_response(const std::string& raw) {
  HttpResponse response;
  size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.size() < 12) return response;
  response.status = std::stoi(raw.substr(9, 3));
  size_t line = raw.find("\r\n") + 2;
  while (line < head_end) {
    size_t end = raw.find("\r\n", line);
    std::string header = raw.substr(line, end - line);
    size_t colon = header.find(':');
    if (colon != std::string::npos) {
      std::string name = header.substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string value = header.substr(colon + 1);
      value.erase(0, value.find_first_not_of(' '));
      response.headers[name] = value;
    }
    line = end + 2;
  }
  std::string body = raw.substr(head_end + 4);
  auto chunked = response.headers.find("transfer-encoding");
  response.body =
      chunked != response.headers.end() && chunked->second == "chunked" ? dechunk(body) : body;
  return response;
}

// One request on its own connection (Connection: close); reads until the server closes.
inline HttpResponse http(int port, const std::string& method, const std::string& path,
                         const std::string& body = "",
                         const std::vector<std::string>& headers = {}) {
  int fd = connect_to(port);
  if (fd < 0) return {};
  send_all(fd, request_text(method, path, body, headers));
  std::string raw;
  char buffer[8192];
  ssize_t bytes;
  while ((bytes = recv(fd, buffer, sizeof(buffer), 0)) > 0)
    raw.append(buffer, static_cast<size_t>(bytes));
  close(fd);
  return parse_response(raw);
}

inline HttpResponse post(int port, const std::string& path, const std::string& body) {
  return http(port, "POST", path, body);
}

// The JSON payloads of an SSE body's "data: ..." events, without the final [DONE].
inline std::vector<std::string> sse_events(const std::string& body, bool* saw_done = nullptr) {
  std::vector<std::string> events;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    size_t end = body.find("\n\n", at);
    std::string payload =
        body.substr(at + 6, end == std::string::npos ? std::string::npos : end - at - 6);
    if (payload == "[DONE]") {
      if (saw_done != nullptr) *saw_done = true;
    } else {
      events.push_back(payload);
    }
    if (end == std::string::npos) break;
    at = end + 2;
  }
  return events;
}

// What a determinism test compares of a completion: text, token strings and every logprob as
// printed (the printed double is the exact value of the fp32 logprob, so equal strings mean
// equal bits), finish reason and usage; or the HTTP error.
inline std::string completion_essence(const HttpResponse& response) {
  if (response.status != 200)
    return "HTTP " + std::to_string(response.status) + ": " + response.body;
  nlohmann::json body = nlohmann::json::parse(response.body);
  const nlohmann::json& choice = body["choices"][0];
  return choice["text"].dump() + "\n" + choice["logprobs"].dump() + "\n" +
         choice["finish_reason"].dump() + "\n" + body["usage"].dump();
}

// The value of the first sample of metric `name` (labelled or not) on GET /metrics, or -1 when
// absent.
inline double metric_value(int port, const std::string& name) {
  HttpResponse response = http(port, "GET", "/metrics");
  size_t at = response.body.find("\n" + name + "{");
  if (at == std::string::npos) at = response.body.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  size_t space = response.body.find(' ', response.body.find_first_of("} ", at + 1));
  return std::stod(response.body.substr(space + 1));
}

// Runs a shell command; its stdout and stderr, and its exit code in *exit_code.
inline std::string run_command(const std::string& command, int* exit_code) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  std::string output;
  char buffer[4096];
  size_t bytes;
  while ((bytes = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, bytes);
  const int status = pclose(pipe);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return output;
}

// `promtool check metrics` over an exposition (written to `path` first): its exit status (0
// clean, 3 lint findings, 127 promtool missing) and its findings.
struct PromtoolResult {
  int status = -1;
  std::string findings;
};
inline PromtoolResult promtool_check(const std::string& exposition, const std::string& path) {
  {
    std::ofstream file(path, std::ios::binary);
    file << exposition;
  }
  PromtoolResult result;
  result.findings = run_command("promtool check metrics < '" + path + "'", &result.status);
  return result;
}

}  // namespace keel::serve_test
