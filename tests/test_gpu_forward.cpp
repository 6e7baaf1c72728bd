// The whole forward pass on the CUDA backend against the CPU reference (label gpu): the tiny,
// small and hybrid tiny presets at TP=1 in batch_invariant mode (fixed_order reduce, which also
// selects the canonical GPU GEMM) must give the same greedy tokens and the same logits digest,
// alone and batched with three other prompts. Without a CUDA device the tests report "skipped: no
// CUDA device" instead of failing.
//
// TP=1 needs no NCCL and no MPI: comm/single_gpu/single_gpu_comm.h stands in for
// NcclCommunicator, so the test runs on GPU machines without NCCL; the NCCL path is
// test_nccl_comm's job.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>

#include "comm/single_gpu/single_gpu_comm.h"
#include "kernels/base/check.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gen_model.h"

namespace keel {
namespace {

namespace fs = std::filesystem;

using comm::SingleGpuCommunicator;

// Each test process writes its own checkpoints and removes them at exit (ctest runs tests as
// parallel processes; none may read a directory another is rewriting).
struct ScratchDir {
  std::string path =
      std::string(KEEL_BINARY_DIR) + "/test-gpu-models/pid-" + std::to_string(::getpid());
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string model_dir(const std::string& preset) {
  static ScratchDir scratch;
  std::string dir = scratch.path + "/" + preset;
  if (!fs::exists(dir + "/config.json")) {
    GenModelOptions options;
    options.seed = 3;
    generate_model(load_model_preset(find_model_preset(preset)), options, dir);
  }
  return dir;
}

GenerateRequest request_with(int64_t batch_with, int64_t vocab) {
  GenerateRequest request;
  // The prompt under study goes last, so batching moves its rows within every activation.
  request.prompts = synthetic_prompts(batch_with, vocab, 11);
  request.prompts.push_back({1, 5, 9, 42, 7, 3});
  request.digest_prompt_idx = batch_with;
  request.max_new_tokens = 8;
  request.keep_all_logits = true;  // for the diagnosis below when digests differ
  return request;
}

// Where two runs of the same request first part: the first decode step whose logits differ
// (of the prompt under study) and the largest |a - b| over all its steps. Empty if identical.
std::string first_difference(const GenerateResult& cpu, size_t cpu_prompt,
                             const GenerateResult& cuda, size_t cuda_prompt) {
  const auto& a = cpu.step_logits.at(cpu_prompt);
  const auto& b = cuda.step_logits.at(cuda_prompt);
  if (a.size() != b.size())
    return "step counts differ: cpu " + std::to_string(a.size()) + ", cuda " +
           std::to_string(b.size());
  int64_t first_step = -1;
  double max_abs_diff = 0;
  for (size_t step = 0; step < a.size(); ++step) {
    for (size_t i = 0; i < a[step].size() && i < b[step].size(); ++i) {
      double diff = std::fabs(double{a[step][i]} - double{b[step][i]});
      // Bitwise, not by value: NaN == NaN counts as equal here only if the bits are equal.
      bool differs = std::memcmp(&a[step][i], &b[step][i], sizeof(float)) != 0;
      if (differs && first_step < 0) first_step = static_cast<int64_t>(step);
      if (!std::isnan(diff)) max_abs_diff = std::max(max_abs_diff, diff);
    }
  }
  if (first_step < 0) return "";
  std::ostringstream out;
  out << "first differing decode step " << first_step << " of " << a.size()
      << ", max |cpu - cuda| logit diff " << max_abs_diff;
  return out.str();
}

class GpuForward : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string reason;
    if (cuda_device_count(&reason) == 0)
      GTEST_SKIP() << "skipped: no CUDA device (" << reason << ")";
  }
};

TEST_P(GpuForward, CudaMatchesCpuBitForBitInBatchInvariantMode) {
  std::string dir = model_dir(GetParam());
  EngineOptions cpu_options;
  cpu_options.tp_size = 1;
  cpu_options.reduce = comm::ReduceAlgo::kFixedOrder;
  Engine cpu_engine(dir, cpu_options);
  const int64_t vocab = cpu_engine.config().vocab_size;
  GenerateResult reference = cpu_engine.generate(request_with(0, vocab));
  ASSERT_EQ(reference.logits_digest.size(), 64u);

  SingleGpuCommunicator communicator;
  EngineOptions cuda_options = cpu_options;
  cuda_options.device = Device::kCuda;
  cuda_options.cuda_device = 0;
  cuda_options.tp_size = 0;  // process ranks: the communicator's size
  cuda_options.process_communicator = &communicator;
  Engine cuda_engine(dir, cuda_options);
  for (int64_t batch_with : {0, 3}) {
    SCOPED_TRACE(GetParam() + " batch_with=" + std::to_string(batch_with));
    GenerateResult result = cuda_engine.generate(request_with(batch_with, vocab));
    EXPECT_EQ(result.tokens.back(), reference.tokens.back());
    EXPECT_EQ(result.logits_digest, reference.logits_digest)
        << first_difference(reference, 0, result, static_cast<size_t>(batch_with));
  }
}

// Every KV cache dtype: the CUDA kernels round at append and widen in attention with the CPU's
// math (kernels/math/kv_math.h), so the digests stay equal (small: its default, auto = bf16,
// is covered above; the others would only repeat it slowly on the CPU side).
TEST_P(GpuForward, EveryKvCacheDtypeMatchesCpuBitForBit) {
  if (GetParam() == "small") GTEST_SKIP() << "covered by the default-dtype test";
  std::string dir = model_dir(GetParam());
  for (KvCacheDType kv_dtype : {KvCacheDType::kFp32, KvCacheDType::kBF16, KvCacheDType::kFp8E4M3}) {
    SCOPED_TRACE(GetParam() + " kv_cache_dtype " + std::string(kv_cache_dtype_name(kv_dtype)));
    EngineOptions cpu_options;
    cpu_options.tp_size = 1;
    cpu_options.reduce = comm::ReduceAlgo::kFixedOrder;
    cpu_options.kv_cache_dtype = kv_dtype;
    Engine cpu_engine(dir, cpu_options);
    const int64_t vocab = cpu_engine.config().vocab_size;
    GenerateResult reference = cpu_engine.generate(request_with(0, vocab));
    SingleGpuCommunicator communicator;
    EngineOptions cuda_options = cpu_options;
    cuda_options.device = Device::kCuda;
    cuda_options.cuda_device = 0;
    cuda_options.tp_size = 0;
    cuda_options.process_communicator = &communicator;
    Engine cuda_engine(dir, cuda_options);
    GenerateResult result = cuda_engine.generate(request_with(2, vocab));
    EXPECT_EQ(result.tokens.back(), reference.tokens.back());
    EXPECT_EQ(result.logits_digest, reference.logits_digest)
        << first_difference(reference, 0, result, 2);
  }
}

// tiny-qwen3.5 / tiny-qwen3-next: the Gated DeltaNet ops (conv, gates, recurrence, gated norm)
// and the gated attention run on the device too.
INSTANTIATE_TEST_SUITE_P(Presets, GpuForward,
                         ::testing::Values("tiny", "small", "tiny-qwen3.5", "tiny-qwen3-next"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           std::replace(name.begin(), name.end(), '.', '_');
                           return name;
                         });

}  // namespace
}  // namespace keel
