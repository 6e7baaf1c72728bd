// The system_fingerprint of keel serve's responses: what decides a response's bits, so a client
// can tell whether two answers were made under the same conditions. Equal fingerprints + the
// same request (seed included) -> the same tokens and logprobs under batch_invariant; under
// fast the batch can still change bits (README, "Determinism at the API").
//
// Format (README, "system_fingerprint"): fields in this fixed order, ';'-separated key=value,
//   keel1;rev=<build revision>;det=<batch_invariant|fast>;reduce=<fixed_order|native>;
//   tp=<ranks>;placement=<contiguous|round_robin|explicit-<8 hex>>;combine=<fp32|
//   round_per_expert>;kv=<fp32|bf16|fp8_e4m3>;act=<fp32|w4a4>;backend=<cpu|cuda>;
//   weights=<16 hex>
// "keel1" names the format; a field added later makes it "keel2". explicit-<hex> is the
// start of the SHA-256 of the explicit placement lists (which rank sums which expert changes
// the bits); weights= is the start of checkpoint_digest() (runtime/model/weights_digest.h).
// CPU threads per rank and the CPU's instruction set are left out: the bits do not depend
// on them (README, "The determinism contract").
#pragma once

#include <string>

#include "runtime/serving/serve_config.h"

namespace keel {

struct FingerprintInputs {
  std::string build_revision;
  Determinism determinism = Determinism::kBatchInvariant;
  comm::ReduceAlgo reduce = comm::ReduceAlgo::kFixedOrder;
  int tp_size = 1;
  PlacementSpec placement;
  CombinePrecision combine = CombinePrecision::kFp32;
  std::string kv_cache_dtype;  // the resolved storage dtype ("auto" is resolved first)
  Nvfp4Activations nvfp4_activations = Nvfp4Activations::kFp32;
  Device backend = Device::kCpu;
  std::string weights_digest;  // checkpoint_digest(), hex
};

std::string system_fingerprint(const FingerprintInputs& inputs);

}  // namespace keel
