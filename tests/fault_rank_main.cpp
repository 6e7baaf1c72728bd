// keel_fault_rank: a test-only launcher for the dead/hung-rank tests (test_mpi_engine). Under
// mpirun it runs `keel generate`'s process-rank path with one rank made to die (SIGKILL) or hang
// before a chosen step, through the engine's test seam (EngineTestHooks); the production keel
// binary has no such switch.
//   keel_fault_rank MODEL_DIR RANK STEP kill|hang COLLECTIVE_TIMEOUT_MS MAX_TOKENS
#include <mpi.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>

#include "comm/mpi_comm.h"
#include "kernels/base/check.h"
#include "runtime/engine/engine.h"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr,
                 "usage: keel_fault_rank MODEL_DIR RANK STEP kill|hang TIMEOUT_MS MAX_TOKENS\n");
    return 2;
  }
  const std::string action = argv[4];
  if (action != "kill" && action != "hang") {
    std::fprintf(stderr, "keel_fault_rank: action must be kill or hang, got '%s'\n", argv[4]);
    return 2;
  }
  const int fault_rank = std::stoi(argv[2]);
  const int64_t fault_step = std::stoll(argv[3]);
  keel::comm::MpiSession session;
  keel::comm::MpiCommOptions comm_options;
  comm_options.timeout = std::chrono::milliseconds(std::stoll(argv[5]));
  keel::comm::MpiCommunicator communicator(MPI_COMM_WORLD, comm_options);
  keel::set_current_rank(communicator.rank());
  keel::EngineTestHooks hooks;
  hooks.before_step = [&](int tp_rank, int64_t step) {
    if (tp_rank != fault_rank || step != fault_step) return;
    std::fprintf(stderr, "keel_fault_rank: rank %d %s at step %lld\n", tp_rank,
                 action == "hang" ? "hangs" : "dies", static_cast<long long>(step));
    std::fflush(stderr);
    if (action == "kill") std::raise(SIGKILL);
    std::this_thread::sleep_for(std::chrono::hours(24));
  };
  try {
    keel::EngineOptions options;
    options.tp_size = 0;  // one rank per process: the launch decides
    options.process_communicator = &communicator;
    options.collective_timeout_ms = std::stoll(argv[5]);
    options.test_hooks = &hooks;
    keel::Engine engine(argv[1], options);
    keel::GenerateRequest request;
    request.prompts = {{1, 5, 9, 42, 7, 3}};
    request.max_new_tokens = std::stoll(argv[6]);
    engine.generate(request);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "keel_fault_rank: rank %d: error: %s\n", communicator.rank(),
                 error.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  return 0;
}
