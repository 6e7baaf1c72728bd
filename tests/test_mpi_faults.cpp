// Dead and hung ranks under `mpirun -np 4 keel serve` (README "Faults"), on real sockets with
// the production binary: a rank is killed (SIGKILL) or stopped (SIGSTOP) from outside after a
// chosen number of streamed tokens, while streaming and JSON requests are in flight. Asserted:
//  - every in-flight stream ends with an SSE error event naming the rank, then [DONE]; every
//    JSON request gets a 503 whose message names the rank;
//  - both arrive within the 10 s bound of the fault (kill: the watchdog sees the process gone
//    and aborts at once; stop: the 8 s serve collective timeout);
//  - /health answers 503 naming the rank within the bound (stop: once the leader has waited
//    health_stall_ms; kill: from the watchdog's abort until the server exits, it lingers 1 s),
//    and never 200 again;
//  - the job exits non-zero.
// ServeFaults.* are fixed cases; ServeFaultSweep draws fault, rank and step from a seed
// (KEEL_FAULT_SWEEP_SEED, default 2; KEEL_FAULT_SWEEP_CASES, default 4: both faults, ranks
// 1..3) and prints min/median/max of the times; the ctest `fault_sweep` test and
// scripts/fault-sweep run 20 cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "serve_test_util.h"

namespace {

namespace fs = std::filesystem;
using namespace keel::serve_test;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";
constexpr auto kDetectionBound = 10s;

struct Scratch {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-mpi-faults/pid-" + std::to_string(::getpid());
  Scratch() { fs::create_directories(path); }
  ~Scratch() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

const std::string& scratch() {
  static Scratch dir;
  return dir.path;
}

// tiny-chat (a vocabulary the synthetic tokenizer covers) and a serve config with the fault
// defaults (collective_timeout_ms 8000, health_stall_ms 1000): nothing fault-related is set.
const std::string& config_path() {
  static const std::string path = [] {
    const std::string model = scratch() + "/tiny-chat";
    int exit_code = 0;
    const std::string made =
        run_command(kKeel + " gen-model --preset tiny-chat --seed 3 --out " + model, &exit_code);
    EXPECT_EQ(exit_code, 0) << made;
    const std::string config = scratch() + "/serve.yaml";
    std::ofstream file(config);
    file << "model: " << model << "\nmodel_name: tiny\nport: 0\nnum_kv_blocks: 512\n";
    return config;
  }();
  return path;
}

enum class Fault { kKill, kStop };

struct FaultCase {
  Fault fault = Fault::kKill;
  int rank = 1;          // 1..3: rank 0 is the server
  int after_tokens = 1;  // streamed tokens of the first stream before the fault
};

std::string describe(const FaultCase& fault_case) {
  return std::string(fault_case.fault == Fault::kKill ? "kill" : "stop") + " rank " +
         std::to_string(fault_case.rank) + " after " + std::to_string(fault_case.after_tokens) +
         " tokens";
}

// Field 4 of /proc/PID/stat: the parent pid (-1 when unreadable).
pid_t parent_of(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const size_t comm_end = text.rfind(')');
  if (comm_end == std::string::npos) return -1;
  std::istringstream fields(text.substr(comm_end + 1));
  char state = 0;
  pid_t parent = -1;
  fields >> state >> parent;
  return parent;
}

// Rank r's pid: the sibling of rank 0 (a child of the same mpirun) whose environment says
// OMPI_COMM_WORLD_RANK=r.
pid_t rank_pid(pid_t leader_pid, int rank) {
  const pid_t launcher = parent_of(leader_pid);
  const std::string wanted = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = std::stoi(name);
    if (launcher <= 0 || parent_of(pid) != launcher) continue;
    std::ifstream environ(entry.path() / "environ", std::ios::binary);
    std::string variable;
    while (std::getline(environ, variable, '\0'))
      if (variable == wanted) return pid;
  }
  return -1;
}

// One request on its own connection, read as it arrives: what came and when it ended.
struct Client {
  std::string body;
  bool stream = false;
  std::atomic<int> events{0};  // "data: " events seen so far (streams)
  std::string raw;
  Clock::time_point ended;
  std::thread thread;

  void start(int port) {
    thread = std::thread([this, port] {
      const int fd = connect_to(port);
      if (fd < 0) return;
      send_all(fd, request_text("POST", "/v1/completions", body));
      char buffer[8192];
      ssize_t bytes;
      size_t counted_to = 0;
      while ((bytes = recv(fd, buffer, sizeof(buffer), 0)) > 0) {
        raw.append(buffer, static_cast<size_t>(bytes));
        size_t at = counted_to;
        while ((at = raw.find("data: ", at)) != std::string::npos) {
          events.fetch_add(1);
          at += 6;
          counted_to = at;
        }
      }
      ended = Clock::now();
      close(fd);
    });
  }
};

void expect_names_rank(const std::string& message, const FaultCase& fault_case) {
  const std::string rank = "rank " + std::to_string(fault_case.rank);
  const std::string what = fault_case.fault == Fault::kKill ? rank + " died" : rank + " is stopped";
  EXPECT_NE(message.find(what), std::string::npos) << describe(fault_case) << ": " << message;
}

// Seconds from the fault to the first /health 503 and to the last client's error.
struct FaultTimes {
  double health_503_s = -1;
  double all_answered_s = -1;
};

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// Runs one case; `times` gets its figures once every assertion before them passed.
void run_fault_case(const FaultCase& fault_case, FaultTimes& times) {
  SCOPED_TRACE(describe(fault_case));
  const std::string mpirun = KEEL_MPIEXEC;
  ServerProcess server({mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "4", kKeel,
                        "serve", "--config", config_path()});
  const pid_t victim = rank_pid(server.leader_pid(), fault_case.rank);
  ASSERT_GT(victim, 0) << server.output();

  // Two streams and two JSON requests, long enough to be in flight when the fault comes.
  const std::string request =
      R"({"model":"tiny","prompt":"hello there","max_tokens":3000,"ignore_eos":true)";
  std::vector<std::unique_ptr<Client>> clients;
  for (int index = 0; index < 4; ++index) {
    auto client = std::make_unique<Client>();
    client->stream = index < 2;
    client->body = request + (client->stream ? R"(,"stream":true})" : "}");
    client->start(server.port());
    clients.push_back(std::move(client));
  }
  // Joins the client threads on every path out (an ASSERT below returns early).
  struct JoinClients {
    std::vector<std::unique_ptr<Client>>& clients;
    ~JoinClients() {
      for (auto& client : clients)
        if (client->thread.joinable()) client->thread.join();
    }
  } join_clients{clients};
  const auto wait_until = Clock::now() + 60s;
  while (clients[0]->events.load() < fault_case.after_tokens && Clock::now() < wait_until)
    std::this_thread::sleep_for(1ms);
  if (clients[0]->events.load() < fault_case.after_tokens) {
    const std::string output = server.output();
    server.wait(0s);  // kills the job, which ends the clients' connections
    FAIL() << "the first stream never reached " << fault_case.after_tokens << " tokens\n" << output;
  }

  const Clock::time_point fault_at = Clock::now();
  kill(victim, fault_case.fault == Fault::kKill ? SIGKILL : SIGSTOP);

  // /health until the server is gone: when it first said 503, and whether it said 200 after.
  Clock::time_point first_unhealthy{};
  std::string unhealthy_body;
  bool healthy_after_unhealthy = false;
  for (int failures = 0; failures < 3 && Clock::now() < fault_at + 30s;) {
    const HttpResponse health = http(server.port(), "GET", "/health");
    if (health.status == 0) {
      ++failures;
    } else if (health.status == 503 && first_unhealthy == Clock::time_point{}) {
      first_unhealthy = Clock::now();
      unhealthy_body = health.body;
    } else if (health.status == 200 && first_unhealthy != Clock::time_point{}) {
      healthy_after_unhealthy = true;
    }
    std::this_thread::sleep_for(20ms);
  }
  for (auto& client : clients) client->thread.join();
  const int exit_code = server.wait(30s);
  EXPECT_NE(exit_code, 0) << server.output();

  // Every request in flight: an SSE error event (streams) or a 503 (JSON) naming the rank,
  // within the bound.
  for (const auto& client : clients) {
    ASSERT_FALSE(client->raw.empty()) << server.output();
    EXPECT_LE(client->ended - fault_at, kDetectionBound) << server.output();
    const HttpResponse response = parse_response(client->raw);
    if (client->stream) {
      EXPECT_EQ(response.status, 200);
      bool saw_done = false;
      const std::vector<std::string> events = sse_events(response.body, &saw_done);
      ASSERT_FALSE(events.empty());
      EXPECT_TRUE(saw_done) << response.body;
      const nlohmann::json last = nlohmann::json::parse(events.back(), nullptr, false);
      ASSERT_TRUE(last.contains("error")) << events.back() << "\n" << server.output();
      expect_names_rank(last["error"]["message"].get<std::string>(), fault_case);
    } else {
      EXPECT_EQ(response.status, 503) << response.body << "\n" << server.output();
      const nlohmann::json body = nlohmann::json::parse(response.body, nullptr, false);
      ASSERT_TRUE(body.contains("error")) << response.body;
      expect_names_rank(body["error"]["message"].get<std::string>(), fault_case);
    }
  }
  // /health: 503 naming the rank within the bound, never 200 after it.
  ASSERT_NE(first_unhealthy, Clock::time_point{}) << server.output();
  EXPECT_LE(first_unhealthy - fault_at, kDetectionBound);
  expect_names_rank(unhealthy_body, fault_case);
  EXPECT_FALSE(healthy_after_unhealthy);

  Clock::time_point last_end = fault_at;
  for (const auto& client : clients) last_end = std::max(last_end, client->ended);
  times.health_503_s = seconds_between(fault_at, first_unhealthy);
  times.all_answered_s = seconds_between(fault_at, last_end);
  std::printf("%s: /health 503 after %.2f s, every client had its error after %.2f s\n",
              describe(fault_case).c_str(), times.health_503_s, times.all_answered_s);
}

void run_fault_case(const FaultCase& fault_case) {
  FaultTimes ignored;
  run_fault_case(fault_case, ignored);
}

TEST(ServeFaults, AKilledRankIsNamedToEveryClientAtOnce) {
  run_fault_case({.fault = Fault::kKill, .rank = 2, .after_tokens = 4});
}

TEST(ServeFaults, AStoppedRankTurnsHealthTo503AndFailsEveryRequestInTime) {
  run_fault_case({.fault = Fault::kStop, .rank = 1, .after_tokens = 2});
}

uint64_t env_number(const char* name, uint64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::stoull(value) : fallback;
}

// "min 0.05 / median 0.07 / max 0.11 s" of `values` (sorted here).
std::string spread(std::vector<double> values) {
  if (values.empty()) return "none";
  std::sort(values.begin(), values.end());
  const size_t count = values.size();
  const double median =
      count % 2 == 1 ? values[count / 2] : (values[count / 2 - 1] + values[count / 2]) / 2;
  char text[96];
  std::snprintf(text, sizeof(text), "min %.2f / median %.2f / max %.2f s", values.front(), median,
                values.back());
  return text;
}

// Seeded: fault kind, rank and step drawn from KEEL_FAULT_SWEEP_SEED (default 2) for
// KEEL_FAULT_SWEEP_CASES cases (default 4, which at seed 2 are stop rank 2, kill rank 1, stop
// rank 3, kill rank 2: both faults on every rank in the default suite). Ends with the spread of
// the times per fault, the figures the README records.
TEST(ServeFaultSweep, RanksKilledOrStoppedAtRandomSteps) {
  const uint64_t seed = env_number("KEEL_FAULT_SWEEP_SEED", 2);
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const uint64_t num_cases = env_number("KEEL_FAULT_SWEEP_CASES", 4);
  std::vector<double> health_s[2], answered_s[2];  // indexed by Fault
  for (uint64_t case_idx = 0; case_idx < num_cases; ++case_idx) {
    FaultCase fault_case;
    fault_case.fault = next() % 2 == 0 ? Fault::kKill : Fault::kStop;
    fault_case.rank = 1 + static_cast<int>(next() % 3);
    fault_case.after_tokens = 1 + static_cast<int>(next() % 40);
    FaultTimes times;
    run_fault_case(fault_case, times);
    if (HasFatalFailure()) return;
    const size_t kind = static_cast<size_t>(fault_case.fault);
    health_s[kind].push_back(times.health_503_s);
    answered_s[kind].push_back(times.all_answered_s);
  }
  for (const Fault fault : {Fault::kKill, Fault::kStop}) {
    const size_t kind = static_cast<size_t>(fault);
    std::printf(
        "sweep seed %llu, %zu %s cases: /health 503 after %s; every client answered after %s\n",
        static_cast<unsigned long long>(seed), health_s[kind].size(),
        fault == Fault::kKill ? "kill" : "stop", spread(health_s[kind]).c_str(),
        spread(answered_s[kind]).c_str());
  }
}

}  // namespace
