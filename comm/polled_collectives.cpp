#include "comm/polled_collectives.h"

#include <vector>

#include "kernels/base/check.h"

namespace keel::comm {

void PolledCollectives::set_timeout(std::chrono::milliseconds timeout) {
  if (timeout.count() < 0)
    throw_error("rank ", owner_.rank(), ": negative collective timeout ", timeout.count(), " ms");
  timeout_ = timeout;
}

void PolledCollectives::abort_requested_meanwhile() {
  abort_queue("aborted: " + owner_.watch().abort_reason());
}

void PolledCollectives::throw_unusable(const std::string& what) const {
  throw_error("rank ", owner_.rank(), ": ", what,
              ": communicator unusable after an earlier failure: ", failure_);
}

void PolledCollectives::throw_unfinished(WaitOutcome outcome, const std::string& what) const {
  if (outcome == WaitOutcome::kAborted)
    throw_error("rank ", owner_.rank(), ": ", what, " aborted: ", owner_.watch().abort_reason());
  const std::vector<PeerFault> faults = owner_.peer_faults();
  throw_error("rank ", owner_.rank(), ": ", what, " timed out after ", timeout_.count(),
              " ms: a peer rank died, hangs, or entered a different collective",
              faults.empty() ? "" : " (", describe_peer_faults(faults, ""),
              faults.empty() ? "" : ")");
}

void PolledCollectives::abort_queue(const std::string& reason) noexcept {
  if (aborted_) return;
  aborted_ = true;
  try {
    failure_ = reason;
  } catch (...) {  // no memory for the reason: the abort matters, the text does not
  }
  queue_.abort_queue();
}

}  // namespace keel::comm
