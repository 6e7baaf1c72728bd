// Ranks as OpenMPI processes, end to end through the keel binary:
//  - `mpirun -np 4 keel generate --reduce fixed_order --json` prints the same logits_digest and
//    tokens as 4 thread ranks, bit for bit, for every test checkpoint (synthetic presets and
//    the HF fixtures), alone and batched;
//  - a rank that hangs makes the others time out with a clear error and a non-zero exit;
//    a rank that dies ends the job with a non-zero exit instead of hanging.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace {

namespace fs = std::filesystem;

struct RunResult {
  int exit_code = -1;
  std::string output;
  double seconds = 0;
};

RunResult run(const std::string& command) {
  RunResult result;
  auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t bytes;
  while ((bytes = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, bytes);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";
// Test-only launcher whose rank dies or hangs on cue (tests/fault_rank_main.cpp).
const std::string kFaultRank = std::string(KEEL_BINARY_DIR) + "/tests/keel_fault_rank";
const std::string kMpirun = std::string(KEEL_MPIEXEC) + " --allow-run-as-root --oversubscribe";

struct ScratchDir {
  std::string path = std::string(KEEL_BINARY_DIR) + "/test-mpi/pid-" + std::to_string(::getpid());
  ScratchDir() { fs::create_directories(path); }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string scratch() {
  static ScratchDir dir;
  return dir.path;
}

std::string model_path(const std::string& name) {
  if (name.rfind("hf:", 0) == 0)
    return std::string(KEEL_SOURCE_DIR) + "/tests/fixtures/hf/" + name.substr(3);
  std::string dir = scratch() + "/" + name;
  if (!fs::exists(dir + "/config.json")) {
    RunResult made = run(kKeel + " gen-model --preset " + name + " --seed 9 --out " + dir);
    EXPECT_EQ(made.exit_code, 0) << made.output;
  }
  return dir;
}

// The JSON object is the last line that parses (mpirun may add its own lines).
nlohmann::json last_json(const std::string& output) {
  nlohmann::json found;
  size_t start = 0;
  while (start < output.size()) {
    size_t end = output.find('\n', start);
    std::string line =
        output.substr(start, end == std::string::npos ? std::string::npos : end - start);
    nlohmann::json parsed = nlohmann::json::parse(line, nullptr, false);
    if (!parsed.is_discarded() && parsed.is_object()) found = parsed;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return found;
}

class MpiMatchesThreads : public ::testing::TestWithParam<std::string> {};

TEST_P(MpiMatchesThreads, FixedOrderBitsIdenticalToThreadRanks) {
  std::string model = model_path(GetParam());
  for (const char* extra :
       {"--batch-with 0 --placement round_robin", "--batch-with 5 --placement contiguous"}) {
    std::string args = std::string(" generate --model ") + model +
                       " --reduce fixed_order --prompt-ids 3,1,4,1,5 --max-tokens 6 --json " +
                       extra;
    RunResult threads = run(kKeel + args + " --tp 4");
    ASSERT_EQ(threads.exit_code, 0) << threads.output;
    RunResult processes = run(kMpirun + " -np 4 " + kKeel + args);
    ASSERT_EQ(processes.exit_code, 0) << processes.output;
    nlohmann::json thread_json = last_json(threads.output);
    nlohmann::json process_json = last_json(processes.output);
    ASSERT_TRUE(process_json.contains("logits_digest")) << processes.output;
    EXPECT_EQ(process_json["logits_digest"], thread_json["logits_digest"]) << extra;
    EXPECT_EQ(process_json["tokens"], thread_json["tokens"]) << extra;
    EXPECT_EQ(process_json["expert_token_counts"], thread_json["expert_token_counts"]) << extra;
    EXPECT_EQ(process_json["ranks"], "mpi");
    EXPECT_EQ(process_json["tp"], 4);
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, MpiMatchesThreads,
                         ::testing::Values("tiny", "tiny-qwen2", "tiny-mixtral", "hf:qwen3_moe",
                                           "hf:qwen3_moe_bf16", "hf:qwen3_moe_fused",
                                           "hf:qwen2_moe_sharded", "hf:mixtral"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

TEST(MpiFaults, HungRankTimesOutWithAClearErrorOnTheSurvivors) {
  std::string model = model_path("tiny");
  RunResult result = run(kMpirun + " -np 4 " + kFaultRank + " " + model + " 2 3 hang 3000 8");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("rank 2 hangs at step 3"), std::string::npos) << result.output;
  // Every survivor (ranks 0, 1, 3) names itself; the hung rank says nothing.
  for (int rank : {0, 1, 3})
    EXPECT_NE(result.output.find("[keel rank " + std::to_string(rank) + "] FATAL: all_reduce"),
              std::string::npos)
        << "rank " << rank << ":\n"
        << result.output;
  EXPECT_NE(result.output.find("timed out after 3000 ms: a peer rank died or hangs"),
            std::string::npos)
      << result.output;
  EXPECT_LT(result.seconds, 120) << result.output;
}

TEST(MpiFaults, DeadRankEndsTheJobWithNonZeroExit) {
  std::string model = model_path("tiny");
  RunResult result = run(kMpirun + " -np 4 " + kFaultRank + " " + model + " 1 2 kill 5000 8");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("rank 1 dies at step 2"), std::string::npos) << result.output;
  EXPECT_LT(result.seconds, 120) << result.output;
}

TEST(MpiErrors, TpMustMatchTheNumberOfProcesses) {
  RunResult result =
      run(kMpirun + " -np 2 " + kKeel + " generate --model " + model_path("tiny") + " --tp 4");
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.output.find("tp=4 but 2 ranks were launched"), std::string::npos)
      << result.output;
}

}  // namespace
