#include "runtime/engine/engine.h"
#include "runtime/engine/step_watchdog.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <spdlog/spdlog.h>
#include "comm/thread_comm.h"
#include "kernels/base/check.h"
#include "kernels/base/host_memory.h"
#include "runtime/common/sha256.h"
#include "runtime/engine/generate_source.h"

namespace keel {

namespace {

constexpr int32_t kGenerateBlockSize = 16;

// Runs fn(tp_rank) on one thread per rank. When a rank throws, the group is aborted so the
// other ranks' pending collectives throw instead of waiting forever; the first error is
// rethrown to the caller.
template <typename Fn>
void run_on_ranks(int tp_size, comm::ThreadGroup* group, Fn&& fn) {
  const int caller_rank = current_rank();
  std::mutex error_mutex;
  std::exception_ptr first_error;
  auto body = [&](int tp_rank) {
    set_current_rank(tp_rank);
    try {
      fn(tp_rank);
    } catch (const std::exception& error) {
      std::lock_guard lock(error_mutex);
      if (!first_error) {
        first_error = std::current_exception();
        if (group != nullptr) group->abort("rank " + std::to_string(tp_rank) + ": " + error.what());
      }
    }
  };
  std::vector<std::jthread> threads;
  for (int tp_rank = 1; tp_rank < tp_size; ++tp_rank) threads.emplace_back(body, tp_rank);
  body(0);
  threads.clear();
  set_current_rank(caller_rank);
  if (first_error) std::rethrow_exception(first_error);
}

// Host memory broadcast on any backend: NCCL communicators take device pointers only, so
// device backends stage the bytes through device memory.
void broadcast_host(Backend& backend, comm::Communicator& communicator, void* data, size_t bytes) {
  if (bytes == 0) return;
  if (backend.device() == Device::kCpu) {
    communicator.broadcast(data, bytes, 0);
    return;
  }
  DeviceArray staging = backend.allocate_bytes(bytes);
  backend.copy_from_host(data, bytes, staging.data());
  communicator.broadcast(staging.data(), bytes, 0);
  backend.copy_to_host(staging.data(), bytes, data);
}

// The step header every rank receives first: what follows and how big it is.
struct StepHeader {
  int32_t kind = 0;
  int32_t num_tokens = 0;
  int32_t num_logits_rows = 0;
  int32_t num_table_entries = 0;
  int64_t max_blocks_per_seq = 0;
  int32_t num_forced_routes = 0;
  int32_t num_state_slots = 0;  // entries of batch.state_slots (hybrid models)
  int32_t flags = 0;            // kObserve | kCaptureRouting | kTrace
};
constexpr int32_t kObserve = 1, kCaptureRouting = 2, kTrace = 4;

}  // namespace

Engine::Engine(const std::string& model_dir, const EngineOptions& options)
    : config_(ModelConfig::load(model_dir + "/config.json")), options_(options) {
  comm::Communicator* process_comm = options.process_communicator;
  if (process_comm != nullptr) {
    if (options.tp_size != 0 && options.tp_size != process_comm->size())
      throw_error("tp=", options.tp_size, " but ", process_comm->size(),
                  " ranks were launched (with mpirun, tp is the number of processes)");
    tp_size_ = process_comm->size();
    local_ranks_ = {process_comm->rank()};
  } else {
    if (options.tp_size < 1 || options.tp_size > 8)
      throw_error("tp must be in [1, 8], got ", options.tp_size);
    tp_size_ = options.tp_size;
    for (int tp_rank = 0; tp_rank < tp_size_; ++tp_rank) local_ranks_.push_back(tp_rank);
  }
  options_.tp_size = tp_size_;
  if (options.device == Device::kCpu) {
    // Spinning workers on shared cores slow every rank down (worker_pool.h spins ~50 us).
    const unsigned cores = std::thread::hardware_concurrency();
    const int64_t compute_threads = int64_t{options.threads_per_rank} * tp_size_;
    if (cores > 0 && process_comm == nullptr && compute_threads > cores)
      spdlog::warn("{} ranks x {} threads = {} compute threads on {} cores: oversubscribed",
                   tp_size_, options.threads_per_rank, compute_threads, cores);
    // Weights from 2 MiB up ask for transparent huge pages (kernels/base/host_memory.h).
    const std::string huge_pages = transparent_huge_pages_mode();
    if (huge_pages == "always" || huge_pages == "madvise")
      spdlog::debug("weights on transparent huge pages (mode {})", huge_pages);
    else
      spdlog::warn(
          "transparent huge pages are '{}' (/sys/kernel/mm/transparent_hugepage/enabled): the "
          "weights stay on 4 KiB pages and decode streams them slower; 'madvise' or 'always' "
          "enables them",
          huge_pages);
  }
  checkpoint_ = std::make_unique<Checkpoint>(Checkpoint::open(model_dir));
  placement_ = std::make_unique<ExpertPlacement>(
      ExpertPlacement::build(options.placement, config_.num_layers, config_.num_experts, tp_size_));
  if (options.threads_per_rank < 1 || options.threads_per_rank > 256)
    throw_error("threads per rank must be in [1, 256], got ", options.threads_per_rank);
  if (options.device == Device::kCuda && options.threads_per_rank != 1)
    throw_error("threads per rank (", options.threads_per_rank,
                ") apply to the cpu backend; --backend cuda computes on the GPU");
  if (options.device == Device::kCuda && process_comm == nullptr)
    throw_error("--backend cuda runs one rank per process and GPU: launch with mpirun -np N");
  ranks_.resize(local_ranks_.size());
  for (size_t local_idx = 0; local_idx < local_ranks_.size(); ++local_idx)
    backends_.push_back(
        options.device == Device::kCuda
            ? make_cuda_backend(options.cuda_device, options.reduce == comm::ReduceAlgo::kFixedOrder
                                                         ? GpuGemm::kCanonical
                                                         : GpuGemm::kCublas)
            : make_cpu_backend(options.threads_per_rank));
  RankOptions rank_options;
  rank_options.reduce = options.reduce;
  rank_options.combine = options.combine;
  if (options.nvfp4_activations == Nvfp4Activations::kW4A4) {
    const QuantMethod method = config_.quant.method;
    if (method != QuantMethod::kModelOptNvfp4 && method != QuantMethod::kCompressedNvfp4)
      throw_error("nvfp4_activations w4a4 needs an NVFP4 checkpoint; ", model_dir, " is ",
                  config_.quant.quantized() ? quant_method_name(method) : "not quantized");
    rank_options.nvfp4_w4a4 = true;
  }
  kv_dtype_ = resolve_kv_cache_dtype(options.kv_cache_dtype, config_.dtype);
  rank_options.kv_dtype = kv_dtype_;
  if (kv_dtype_ == math::KvDType::kFp8E4M3) {
    rank_options.kv_scales = read_kv_scales(config_, *checkpoint_);
    if (rank_options.kv_scales.empty()) {
      if (local_ranks_.front() == 0)
        spdlog::warn(
            "kv_cache_dtype fp8_e4m3: {} has no k/v scales (self_attn.k_scale / v_scale or "
            "k_proj.k_scale / v_proj.v_scale): using 1.0; without calibrated scales fp8 KV is "
            "lossy (values beyond +-448 saturate, small ones lose precision)",
            model_dir);
    } else if (local_ranks_.front() == 0) {
      spdlog::info("kv_cache_dtype fp8_e4m3: per-layer k/v scales from {} (first: {})", model_dir,
                   rank_options.kv_scales.sources.front());
    }
  }
  // Shards load in parallel; errors (bad shapes, dtypes) surface with file and tensor named.
  run_on_ranks(static_cast<int>(local_ranks_.size()), nullptr, [&](int local_idx) {
    int tp_rank = local_ranks_[static_cast<size_t>(local_idx)];
    set_current_rank(tp_rank);
    ranks_[static_cast<size_t>(local_idx)] =
        std::make_unique<RankModel>(config_, *checkpoint_, *placement_, tp_rank, tp_size_,
                                    rank_options, *backends_[static_cast<size_t>(local_idx)]);
  });
}

Engine::~Engine() = default;

int64_t Engine::weight_bytes_per_rank() const {
  return ranks_.front()->weight_bytes();
}

RankModel& Engine::local_model(int tp_rank) {
  for (size_t local_idx = 0; local_idx < local_ranks_.size(); ++local_idx)
    if (local_ranks_[local_idx] == tp_rank) return *ranks_[local_idx];
  KEEL_CHECK(false, "tp rank ", tp_rank, " does not live in this process");
}

GenerateResult Engine::generate(const GenerateRequest& request) {
  const int64_t num_prompts = static_cast<int64_t>(request.prompts.size());
  if (num_prompts == 0) throw_error("generate: no prompts");
  if (request.max_new_tokens < 1) throw_error("generate: max_new_tokens must be >= 1");
  if (request.digest_prompt_idx < 0 || request.digest_prompt_idx >= num_prompts)
    throw_error("generate: digest_prompt_idx ", request.digest_prompt_idx,
                " is not a prompt index");
  int64_t max_prompt = 0;
  for (const auto& prompt : request.prompts) {
    if (prompt.empty()) throw_error("generate: empty prompt");
    for (int32_t id : prompt)
      if (id < 0 || id >= config_.vocab_size)
        throw_error("generate: prompt token id ", id, " is outside the vocabulary [0, ",
                    config_.vocab_size, ")");
    max_prompt = std::max<int64_t>(max_prompt, static_cast<int64_t>(prompt.size()));
  }
  if (max_prompt + request.max_new_tokens > config_.max_position_embeddings)
    throw_error("generate: prompt + max_tokens = ", max_prompt + request.max_new_tokens,
                " exceeds max_position_embeddings ", config_.max_position_embeddings);

  GenerateResult result;
  result.tokens.assign(static_cast<size_t>(num_prompts), {});
  if (request.keep_all_logits) {
    result.prompt_logits.resize(static_cast<size_t>(num_prompts));
    result.step_logits.resize(static_cast<size_t>(num_prompts));
  }
  if (request.time_experts)
    result.expert_seconds.assign(static_cast<size_t>(config_.num_layers),
                                 std::vector<double>(static_cast<size_t>(config_.num_experts)));
  if (request.trace) result.rank_traces.resize(static_cast<size_t>(tp_size_));
  ExpertCounts counts_before = local_model(local_ranks_.front()).expert_counts();
  // The serving step loop, scheduler and sampler: the leader's source plans every step.
  SchedulerConfig scheduler = generate_scheduler_config(request, kGenerateBlockSize);
  // Hybrid models: one recurrent-state slot per prompt (all run at once).
  if (config_.is_hybrid()) scheduler.num_state_slots = static_cast<int32_t>(scheduler.max_num_seqs);
  ServeOptions serve_options;
  serve_options.num_kv_blocks = scheduler.num_kv_blocks;
  serve_options.block_size = scheduler.block_size;
  serve_options.num_state_slots = scheduler.num_state_slots;
  std::unique_ptr<GenerateSource> source;
  if (is_leader_process())
    source = std::make_unique<GenerateSource>(request, config_.vocab_size, scheduler, result);
  own_traces_.assign(local_ranks_.size(), {});
  keep_own_traces_ = request.trace;
  serve(source.get(), serve_options);
  keep_own_traces_ = false;
  if (source != nullptr) source->finish();
  // Process ranks other than the leader see only their own spans (the leader's source gets its
  // own process's); thread ranks are all in the leader's.
  if (request.trace && !is_leader_process())
    result.rank_traces[static_cast<size_t>(local_ranks_.front())] = std::move(own_traces_.front());
  result.is_leader = is_leader_process();
  // Every rank routes every token identically (replicated router, checked when serve stops),
  // so this process's counts are the counts; report this call's share only.
  result.expert_counts = local_model(local_ranks_.front()).expert_counts();
  for (size_t layer = 0; layer < result.expert_counts.size(); ++layer)
    for (size_t expert = 0; expert < result.expert_counts[layer].size(); ++expert)
      result.expert_counts[layer][expert] -= counts_before[layer][expert];
  for (const auto& prompt : request.prompts)
    result.num_prompt_tokens += static_cast<int64_t>(prompt.size());
  result.num_decode_steps = request.max_new_tokens - 1;
  return result;
}

int64_t Engine::kv_block_bytes(int64_t block_size) const {
  return ranks_.front()->kv_block_bytes(block_size);
}

int64_t Engine::state_slot_bytes() const {
  return ranks_.front()->state_slot_bytes();
}

void Engine::serve(StepSource* source, const ServeOptions& options) {
  if (options.num_kv_blocks < 1 || options.block_size < 1)
    throw_error("serve: need at least one KV block of at least one position, got ",
                options.num_kv_blocks, " blocks of ", options.block_size);
  if (is_leader_process() && source == nullptr) throw_error("serve: the leader needs a source");
  if (options_.process_communicator != nullptr) {
    serve_rank(local_ranks_.front(), *options_.process_communicator, source, options);
    return;
  }
  comm::ThreadCommOptions comm_options;
  comm_options.timeout = std::chrono::milliseconds(options_.collective_timeout_ms);
  comm::ThreadGroup group(tp_size_, comm_options);
  run_on_ranks(tp_size_, &group, [&](int tp_rank) {
    auto communicator = group.communicator(tp_rank);
    serve_rank(tp_rank, *communicator, source, options);
  });
}

void Engine::gather_observations(int tp_rank, comm::Communicator& communicator, RankModel& model,
                                 GatherScratch& scratch, StepOutput& output) {
  // Every rank's phase seconds and expert seconds in one all-gather of floats (a few KB; expert
  // seconds per step fit a float's precision): [tp][phases + layers * experts].
  const StepObservation& observation = model.observation();
  const size_t expert_count = observation.expert_seconds.size();
  const size_t width = kNumPhases + expert_count;
  std::vector<float> mine(width);
  for (int phase = 0; phase < kNumPhases; ++phase)
    mine[static_cast<size_t>(phase)] =
        static_cast<float>(observation.phase_seconds[static_cast<size_t>(phase)]);
  std::copy(observation.expert_seconds.begin(), observation.expert_seconds.end(),
            mine.begin() + kNumPhases);
  Backend& backend = model.backend();
  // Reused across steps (the width is fixed by the model); allocated on the first observed step.
  if (scratch.send.nbytes() < width * sizeof(float)) {
    scratch.send = backend.allocate(DType::kF32, width);
    scratch.receive = backend.allocate(DType::kF32, width * static_cast<size_t>(tp_size_));
  }
  DeviceArray& send = scratch.send;
  DeviceArray& receive = scratch.receive;
  backend.copy_from_host(mine.data(), width * sizeof(float), send.data());
  communicator.all_gather(send.f32(), width, receive.f32());
  if (tp_rank != 0) return;
  std::vector<float> all(width * static_cast<size_t>(tp_size_));
  backend.copy_to_host(receive.data(), all.size() * sizeof(float), all.data());
  output.rank_phase_seconds.assign(static_cast<size_t>(tp_size_), {});
  output.expert_seconds.assign(expert_count, 0.0f);
  for (int rank = 0; rank < tp_size_; ++rank) {
    const float* row = all.data() + static_cast<size_t>(rank) * width;
    for (int phase = 0; phase < kNumPhases; ++phase)
      output.rank_phase_seconds[static_cast<size_t>(rank)][static_cast<size_t>(phase)] = row[phase];
    for (size_t index = 0; index < expert_count; ++index)
      output.expert_seconds[index] += row[kNumPhases + index];
  }
  // Thread ranks wrote their events before the all-gather above, which orders them before
  // these reads; process ranks' events stay in their processes.
  output.rank_traces.assign(static_cast<size_t>(tp_size_), {});
  for (size_t local_idx = 0; local_idx < local_ranks_.size(); ++local_idx)
    output.rank_traces[static_cast<size_t>(local_ranks_[local_idx])] =
        ranks_[local_idx]->observation().trace;
}

void Engine::serve_rank(int tp_rank, comm::Communicator& communicator, StepSource* source,
                        const ServeOptions& options) {
  RankModel& model = local_model(tp_rank);
  Backend& backend = model.backend();
  const bool leader = tp_rank == 0;
  KvPool pool =
      model.make_kv_pool(options.num_kv_blocks, options.block_size, options.num_state_slots);
  // Every rank holds its pool once it passes this broadcast (a rank that failed to allocate has
  // thrown and aborted the group, so the others' broadcast throws instead).
  int32_t ready = 1;
  broadcast_host(backend, communicator, &ready, sizeof(ready));
  if (leader && options.on_ready) options.on_ready();
  ServeStep step;
  std::vector<float> logits;
  std::vector<int32_t> payload;
  StepOutput output;
  GatherScratch gather_scratch;
  int64_t run_steps = 0;
  if (options_.process_communicator != nullptr) {
    communicator.barrier();  // under the start-up timeout (see ServeOptions::step_timeout_ms)
    if (options.step_timeout_ms == 0) communicator.set_timeout(std::chrono::milliseconds(0));
    if (options.step_timeout_ms > 0)
      communicator.set_timeout(std::chrono::milliseconds(
          options.step_timeout_ms + (leader ? 0 : ServeOptions::kFollowerGraceMs)));
  }
  std::optional<StepWatchdog> watchdog;
  if (leader && options.stall_ms > 0)
    watchdog.emplace(communicator,
                     WatchdogOptions{.stall = std::chrono::milliseconds(options.stall_ms)},
                     [source](const std::string& reason) { source->on_stall(reason); });
  for (;;) {
    StepHeader header;
    if (leader) {
      source->next_step(step);
      const StepBatch& batch = step.batch;
      header.kind = static_cast<int32_t>(step.kind);
      header.num_tokens = static_cast<int32_t>(batch.token_ids.size());
      header.num_logits_rows = static_cast<int32_t>(batch.logits_rows.size());
      header.num_table_entries = static_cast<int32_t>(batch.block_tables.size());
      header.max_blocks_per_seq = batch.max_blocks_per_seq;
      header.num_forced_routes = static_cast<int32_t>(batch.forced_routes.size());
      header.num_state_slots = static_cast<int32_t>(batch.state_slots.size());
      header.flags = (step.observe ? kObserve : 0) | (step.capture_routing ? kCaptureRouting : 0) |
                     (step.trace ? kTrace : 0);
    }
    broadcast_host(backend, communicator, &header, sizeof(header));
    const auto kind = static_cast<ServeStep::Kind>(header.kind);
    if (kind == ServeStep::Kind::kStop) {
      // The replicated router must have made identical decisions on every rank.
      uint64_t leader_fingerprint = model.routing_fingerprint();
      broadcast_host(backend, communicator, &leader_fingerprint, sizeof(leader_fingerprint));
      KEEL_CHECK(leader_fingerprint == model.routing_fingerprint(), "rank ", tp_rank,
                 " routed tokens differently from rank 0: the replicated router saw different "
                 "bits");
      break;
    }
    if (kind == ServeStep::Kind::kIdle) continue;
    // One payload: token ids, positions, cache rows, logits rows, block tables, forced routes,
    // state slots.
    const size_t num_tokens = static_cast<size_t>(header.num_tokens);
    const size_t num_rows = static_cast<size_t>(header.num_logits_rows);
    const size_t num_entries = static_cast<size_t>(header.num_table_entries);
    const size_t num_forced = static_cast<size_t>(header.num_forced_routes);
    const size_t num_slots = static_cast<size_t>(header.num_state_slots);
    payload.resize(3 * num_tokens + num_rows + num_entries + num_forced + num_slots);
    StepBatch& batch = step.batch;
    if (leader) {
      auto out = payload.begin();
      out = std::copy(batch.token_ids.begin(), batch.token_ids.end(), out);
      out = std::copy(batch.positions.begin(), batch.positions.end(), out);
      out = std::copy(batch.cache_idx.begin(), batch.cache_idx.end(), out);
      out = std::copy(batch.logits_rows.begin(), batch.logits_rows.end(), out);
      out = std::copy(batch.block_tables.begin(), batch.block_tables.end(), out);
      out = std::copy(batch.forced_routes.begin(), batch.forced_routes.end(), out);
      std::copy(batch.state_slots.begin(), batch.state_slots.end(), out);
    }
    broadcast_host(backend, communicator, payload.data(), payload.size() * sizeof(int32_t));
    if (!leader) {
      auto in = payload.begin();
      auto take = [&in](std::vector<int32_t>& field, size_t count) {
        field.assign(in, in + static_cast<std::ptrdiff_t>(count));
        in += static_cast<std::ptrdiff_t>(count);
      };
      take(batch.token_ids, num_tokens);
      take(batch.positions, num_tokens);
      take(batch.cache_idx, num_tokens);
      take(batch.logits_rows, num_rows);
      take(batch.block_tables, num_entries);
      take(batch.forced_routes, num_forced);
      take(batch.state_slots, num_slots);
      batch.max_blocks_per_seq = header.max_blocks_per_seq;
    }
    if (options_.test_hooks != nullptr && options_.test_hooks->before_step)
      options_.test_hooks->before_step(tp_rank, run_steps);
    ++run_steps;
    const bool observe = (header.flags & kObserve) != 0;
    model.set_observing(observe, (header.flags & kCaptureRouting) != 0,
                        (header.flags & kTrace) != 0);
    model.forward(batch, pool, communicator, logits);
    if (observe) gather_observations(tp_rank, communicator, model, gather_scratch, output);
    if (keep_own_traces_ && !is_leader_process()) {
      const auto& events = model.observation().trace;
      own_traces_.front().insert(own_traces_.front().end(), events.begin(), events.end());
    }
    if (leader) {
      output.logits = &logits;
      output.observation = observe ? &model.observation() : nullptr;
      source->on_step_done(output);
    }
  }
}

std::vector<std::vector<int32_t>> synthetic_prompts(int64_t count, int64_t vocab_size,
                                                    uint64_t seed) {
  std::vector<std::vector<int32_t>> prompts;
  uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
  auto next = [&state]() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  for (int64_t prompt = 0; prompt < count; ++prompt) {
    int64_t length = 2 + static_cast<int64_t>(next() % 11);
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < length; ++i)
      ids.push_back(static_cast<int32_t>(next() % static_cast<uint64_t>(vocab_size)));
    prompts.push_back(std::move(ids));
  }
  return prompts;
}

}  // namespace keel
