// The engine: a tensor-parallel group of ranks (threads in this process) that each hold a
// RankModel shard and run the same steps in lock-step; rank 0 is the leader that picks tokens
// and broadcasts them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/model.h"
#include "runtime/model/model_config.h"
#include "scheduler/placement.h"

namespace keel {

// Seams for tests only (never set by the CLI, configs or environment variables): the production
// engine has no way to kill or hang itself.
struct EngineTestHooks {
  // Called on every rank before each step it runs (generate and serve; idle steps not counted);
  // a fault test kills or hangs a rank here.
  std::function<void(int tp_rank, int64_t step)> before_step;
};

struct EngineOptions {
  // Thread ranks: tp_size threads in this process. Process ranks: set `process_communicator`
  // (e.g. an MpiCommunicator under mpirun); this process then holds the one rank
  // communicator->rank() of communicator->size(), and tp_size must be 0 or equal to the size.
  int tp_size = 1;
  // CPU backend: threads per rank, splitting each GEMM's output rows (and attention's heads) by a
  // fixed partition; no bits change with it (kernels/cpu/worker_pool.h). 1 on CUDA.
  int threads_per_rank = 1;
  comm::Communicator* process_communicator = nullptr;
  // A collective waiting longer than this for its peers fails (thread ranks: every rank throws;
  // MPI ranks: the communicator's own watchdog). 0 = wait forever.
  int64_t collective_timeout_ms = 0;
  // Where the ranks compute. kCuda: one GPU per rank (device = local rank index); the
  // communicator must then take device pointers (NCCL), so CUDA needs process ranks.
  Device device = Device::kCpu;
  int cuda_device = 0;  // GPU of this process's rank (the node-local rank under mpirun)
  comm::ReduceAlgo reduce = comm::ReduceAlgo::kFixedOrder;
  PlacementSpec placement;
  CombinePrecision combine = CombinePrecision::kFp32;
  // Storage dtype of the paged KV pool (runtime/model/kv_cache.h); auto follows the weights.
  KvCacheDType kv_cache_dtype = KvCacheDType::kAuto;
  // NVFP4 checkpoints only (any other checkpoint refuses kW4A4).
  Nvfp4Activations nvfp4_activations = Nvfp4Activations::kFp32;
  const EngineTestHooks* test_hooks = nullptr;  // tests only; must outlive the engine
};

struct GenerateRequest {
  std::vector<std::vector<int32_t>> prompts;
  int64_t max_new_tokens = 16;
  // Whose logits the digest covers (the request under study; the others are its batch-mates).
  int64_t digest_prompt_idx = 0;
  // Keep every prompt position's logits and every step's logits for every prompt (tests).
  bool keep_all_logits = false;
  // Record every rank's phase and expert-GEMM spans (GenerateResult::rank_traces).
  bool trace = false;
  // Time every expert's FFN (GenerateResult::expert_seconds): telemetry observes every step,
  // which on CUDA waits for each expert's events. Off for pure speed runs (bench/decode).
  bool time_experts = true;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> tokens;  // generated ids per prompt (greedy sampling)
  // SHA-256 over the fp32 bits of every step's logits of prompt digest_prompt_idx, in order.
  std::string logits_digest;
  ExpertCounts expert_counts;  // [layer][expert] tokens routed, all prompts and steps
  // [layer][expert] seconds in each expert's GEMMs (on the rank that holds it), this call.
  std::vector<std::vector<double>> expert_seconds;
  // With keep_all_logits: [prompt][position][vocab] and [prompt][step][vocab].
  std::vector<std::vector<std::vector<float>>> prompt_logits;
  std::vector<std::vector<std::vector<float>>> step_logits;
  // False on process ranks other than 0: only the leader holds tokens, digest and logits.
  bool is_leader = true;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t num_prompt_tokens = 0;
  int64_t num_decode_steps = 0;
  // With trace: [tp rank] the spans of every step, for the ranks in this process.
  std::vector<std::vector<TraceEvent>> rank_traces;
};

// Serving (runtime/serving): the TP group runs steps planned on the leader, in lock-step. Each
// iteration the leader asks its StepSource for a step, broadcasts it to every rank (one fixed
// header, then one int32 payload), all ranks run the forward pass over their shard of the paged
// KV pool, and the leader hands the logits back to the source. With nothing to do the source
// returns kIdle after a short wait, which keeps idle ranks inside collective timeouts.
struct ServeStep {
  enum class Kind : int32_t { kRun = 0, kIdle = 1, kStop = 2 };
  Kind kind = Kind::kIdle;
  StepBatch batch;
  // Telemetry for this step on every rank (RankModel::set_observing).
  bool observe = false;
  bool capture_routing = false;
  bool trace = false;
};

// What a kRun step produced, handed to the leader's source.
struct StepOutput {
  const std::vector<float>* logits = nullptr;  // [batch.logits_rows, vocab]
  // With observe: the leader's observation (routing and margins are replicated, so the leader's
  // are everyone's), every rank's phase seconds, and expert seconds summed over ranks (each
  // expert runs on one rank). With trace: each rank's trace events where this process can see
  // them (thread ranks: all; process ranks: the leader's only).
  const StepObservation* observation = nullptr;
  std::vector<std::array<double, kNumPhases>> rank_phase_seconds;  // [tp]
  std::vector<float> expert_seconds;                               // [layer * num_experts + e]
  std::vector<std::vector<TraceEvent>> rank_traces;                // [tp]
};

class StepSource {
 public:
  virtual ~StepSource() = default;
  // Fills the next step. Called on the leader rank's thread only.
  virtual void next_step(ServeStep& step) = 0;
  // The kRun step just executed (logits bits identical on all ranks).
  virtual void on_step_done(const StepOutput& output) = 0;
  // From the leader's watchdog thread (ServeOptions::stall_ms): why steps stopped progressing
  // ("steps stalled: ...; rank 2 is stopped (...)"), or "" once they progress again.
  virtual void on_stall(const std::string& reason) { (void)reason; }
};

struct ServeOptions {
  int64_t num_kv_blocks = 0;  // per rank; each rank holds its KV heads of every block
  int64_t block_size = 16;
  // Hybrid models: recurrent-state slots per rank (each rank holds its heads' state of every
  // slot), one per sequence that may run at once (the scheduler's max_num_seqs).
  int64_t num_state_slots = 0;
  // Called once on the leader when every rank holds its KV pool (after a collective that every
  // rank reaches only then): what announces the server, so it never says it is ready before a
  // pool that cannot be allocated fails.
  std::function<void()> on_ready;
  // Fault handling (README "Faults", runtime/engine/step_watchdog.h). The leader's watchdog
  // reports a collective wait of stall_ms as stalled steps and aborts at once on a dead peer;
  // 0: no watchdog.
  int64_t stall_ms = 0;
  // Process ranks: every rank first meets the others at a barrier under the communicator's own
  // (start-up) timeout -- ranks load weights at different speeds -- then runs its steps under
  // this one (0: forever; -1: keep the communicator's). Followers get kFollowerGraceMs more, so
  // the leader times out first and answers its clients before the job ends.
  int64_t step_timeout_ms = -1;
  static constexpr int64_t kFollowerGraceMs = 5000;
};

class Engine {
 public:
  // Loads config.json and the weights of `model_dir`, sharded over options.tp_size ranks.
  // Throws keel::Error with context on bad checkpoints or options.
  Engine(const std::string& model_dir, const EngineOptions& options);
  ~Engine();

  GenerateResult generate(const GenerateRequest& request);

  // Runs serving steps until the source says kStop. Thread ranks: the whole group runs inside
  // this call. Process ranks: every process calls it; the leader (rank 0) passes its source,
  // the others nullptr and follow. Throws (after stopping the group) if a step fails.
  void serve(StepSource* source, const ServeOptions& options);
  // Bytes of one KV block of `block_size` positions on the first rank of this process.
  int64_t kv_block_bytes(int64_t block_size) const;
  // The KV pool's storage dtype (options().kv_cache_dtype resolved against the checkpoint).
  math::KvDType kv_dtype() const { return kv_dtype_; }
  // Bytes of one sequence's recurrent state (hybrid models; 0 otherwise) on that rank.
  int64_t state_slot_bytes() const;
  bool is_leader_process() const { return local_ranks_.front() == 0; }

  const ModelConfig& config() const { return config_; }
  const ExpertPlacement& placement() const { return *placement_; }
  int tp_size() const { return tp_size_; }
  const EngineOptions& options() const { return options_; }
  // Weight bytes held by the first rank that lives in this process.
  int64_t weight_bytes_per_rank() const;

 private:
  RankModel& local_model(int tp_rank);
  void serve_rank(int tp_rank, comm::Communicator& communicator, StepSource* source,
                  const ServeOptions& options);
  // After an observed step: every rank contributes; the leader fills `output`.
  struct GatherScratch {  // device buffers of the per-step all-gather, reused across steps
    DeviceArray send, receive;
  };
  void gather_observations(int tp_rank, comm::Communicator& communicator, RankModel& model,
                           GatherScratch& scratch, StepOutput& output);

  ModelConfig config_;
  EngineOptions options_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<ExpertPlacement> placement_;
  int tp_size_ = 1;
  math::KvDType kv_dtype_ = math::KvDType::kF32;
  std::vector<int> local_ranks_;                    // tp ranks that live in this process
  std::vector<std::unique_ptr<Backend>> backends_;  // parallel to local_ranks_
  std::vector<std::unique_ptr<RankModel>> ranks_;   // parallel to local_ranks_
  // generate() with tracing on process ranks: a non-leader process's own spans.
  bool keep_own_traces_ = false;
  std::vector<std::vector<TraceEvent>> own_traces_;
};

// Deterministic synthetic prompts for --batch-with: `count` prompts with lengths in [2, 12]
// and ids in [0, vocab), from a fixed seed.
std::vector<std::vector<int32_t>> synthetic_prompts(int64_t count, int64_t vocab_size,
                                                    uint64_t seed);

}  // namespace keel
