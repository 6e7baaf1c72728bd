// `keel serve` on the hybrid Gated DeltaNet MoE (gen-model's tiny-qwen3.5, the published
// Qwen3.5 vision-language layout) end to end, on real sockets:
//  - batch_invariant at the API: a seeded, sampled request with logprobs returns the same
//    text, tokens and logprob bits alone, amid 16 concurrent requests, with a prefill budget of
//    5 tokens and blocks of 4 (each sequence's recurrent state carried across chunks in its slot),
//    and on 4 MPI ranks instead of 4 threads;
//  - prefix caching asked for on a hybrid model is turned off with a warning naming why;
//  - /metrics counts the recurrent-state slots; an image content part is a 400 naming it;
//  - routing records captured while serving replay bit for bit.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "runtime/model/gen_model.h"
#include "scratch_files.h"
#include "serve_test_util.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace keel::serve_test;

const std::string kKeel = std::string(KEEL_BINARY_DIR) + "/bin/keel";

const std::string& scratch() {
  static const keel::test::ScratchDir dir("test-serve-hybrid");
  static const std::string path = dir.path();
  return path;
}

const std::string& model_dir() {
  static const std::string dir = [] {
    std::string out = scratch() + "/tiny-qwen3.5";
    keel::GenModelOptions options;
    options.seed = 7;
    keel::generate_model(keel::load_model_preset(keel::find_model_preset("tiny-qwen3.5")), options,
                         out);
    return out;
  }();
  return dir;
}

std::string write_config(const std::string& name, const std::string& extra) {
  std::string path = scratch() + "/" + name + ".yaml";
  std::ofstream file(path);
  file << "model: " << model_dir() << "\nmodel_name: tiny-hybrid\ntp: 4\nplacement: round_robin\n"
       << "determinism: batch_invariant\nport: 0\ncollective_timeout_ms: 60000\n"
       << "drain_timeout_s: 60\nmax_num_seqs: 24\n"
       << extra;
  return path;
}

std::vector<std::string> serve_args(const std::string& config) {
  return {kKeel, "serve", "--config", config};
}

const std::string kProbe = json{
    {"prompt",
     "The river runs past the mill and under the old stone bridge, where the town keeps its "
     "boats in winter and its lanterns in summer."},
    {"max_tokens", 20},
    {"temperature", 0.9},
    {"top_p", 0.95},
    {"seed", 4321},
    {"logprobs", 3},
    {"ignore_eos", true}}.dump();

std::string mate_request(int index) {
  std::string prompt;
  for (int word = 0; word <= index % 7; ++word)
    prompt += "stone water lantern " + std::to_string(index);
  return json{{"prompt", prompt},
              {"max_tokens", 12 + index % 3 * 6},
              {"temperature", index % 2 == 0 ? 0.0 : 0.7},
              {"seed", index},
              {"stream", index % 3 == 0},
              {"ignore_eos", true}}
      .dump();
}

std::string probe_amid_mates(int port) {
  std::vector<std::thread> mates;
  std::atomic<int> mate_ok{0};
  for (int index = 0; index < 16; ++index)
    mates.emplace_back([&, index] {
      if (post(port, "/v1/completions", mate_request(index)).status == 200) ++mate_ok;
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  HttpResponse probe = post(port, "/v1/completions", kProbe);
  for (std::thread& mate : mates) mate.join();
  EXPECT_EQ(mate_ok.load(), 16);
  return completion_essence(probe);
}

TEST(ServeHybrid, SeededRequestKeepsItsBitsAloneAmidSixteenChunkedAndOnMpiRanks) {
  std::string alone;
  {
    ServerProcess server(serve_args(write_config("main", "max_num_batched_tokens: 256\n")));
    alone = completion_essence(post(server.port(), "/v1/completions", kProbe));
    ASSERT_NE(alone.find("\"length\""), std::string::npos) << alone;
    EXPECT_EQ(completion_essence(post(server.port(), "/v1/completions", kProbe)), alone) << "twice";
    EXPECT_EQ(probe_amid_mates(server.port()), alone) << "amid 16 concurrent requests";
    EXPECT_EQ(metric_value(server.port(), "keel_state_slots_total"), 24);
    EXPECT_EQ(metric_value(server.port(), "keel_state_slots_used"), 0) << "every slot given back";

    // The vision tower is not loaded: an image part is refused by name.
    HttpResponse image = post(
        server.port(), "/v1/chat/completions",
        json{{"messages",
              json::array({json{{"role", "user"},
                                {"content", json::array({json{{"type", "image_url"},
                                                              {"image_url", {{"url", "x"}}}}})}}})},
             {"max_tokens", 4}}
            .dump());
    EXPECT_EQ(image.status, 400) << image.body;
    EXPECT_NE(image.body.find("image_url"), std::string::npos) << image.body;
  }
  {
    // Prefill in chunks of at most 5 tokens, blocks of 4: the recurrence resumes from each
    // sequence's slot at every chunk. Prefix caching is asked for and refused with a reason.
    ServerProcess chunked(serve_args(write_config(
        "chunked",
        "max_num_batched_tokens: 5\nblock_size: 4\nnum_kv_blocks: 512\nprefix_caching: true\n")));
    EXPECT_EQ(completion_essence(post(chunked.port(), "/v1/completions", kProbe)), alone)
        << "budget 5";
    EXPECT_EQ(probe_amid_mates(chunked.port()), alone) << "budget 5, amid 16";
    chunked.terminate();
    EXPECT_EQ(chunked.wait(), 0) << chunked.output();
    EXPECT_NE(chunked.output().find("prefix caching is off"), std::string::npos)
        << chunked.output();
  }
  {
    std::vector<std::string> command = mpirun_command(KEEL_MPIEXEC, 4);
    command.insert(command.end(), {kKeel, "serve", "--config", write_config("mpi", "")});
    ServerProcess mpi(command);
    EXPECT_EQ(completion_essence(post(mpi.port(), "/v1/completions", kProbe)), alone)
        << "4 MPI ranks";
    EXPECT_EQ(probe_amid_mates(mpi.port()), alone) << "4 MPI ranks, amid 16";
    mpi.terminate();
    EXPECT_EQ(mpi.wait(), 0) << mpi.output();
  }
}

TEST(ServeHybrid, CapturedRoutingReplaysBitForBit) {
  const std::string capture = scratch() + "/capture.keelrt";
  {
    ServerProcess server(serve_args(write_config("capture", "routing_capture: " + capture + "\n")));
    for (int index = 0; index < 2; ++index)
      ASSERT_EQ(post(server.port(), "/v1/completions", mate_request(index)).status, 200);
    ASSERT_EQ(post(server.port(), "/v1/completions", kProbe).status, 200);
    server.terminate();
    ASSERT_EQ(server.wait(), 0) << server.output();
  }
  int exit_code = -1;
  std::string output = run_command(kKeel + " routes replay " + capture + " --json", &exit_code);
  ASSERT_EQ(exit_code, 0) << output;
  json report = json::parse(output.substr(output.find('{')));
  EXPECT_EQ(report["total"], 3);
  EXPECT_TRUE(report["all_reproduced"].get<bool>());
  output = run_command(kKeel + " routes replay " + capture + " --no-force --json", &exit_code);
  EXPECT_EQ(exit_code, 0) << output;
}

}  // namespace
