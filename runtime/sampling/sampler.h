// Seeded, batch-independent token sampling.
//
// Design note. Reproducibility is keel's core promise: a request's output must not depend on
// what else is batched with it. The sampler therefore keeps no state at all. sample() is a pure
// function of (the bits of one logits row, SamplingParams, position):
//  - randomness comes from a counter-based RNG, uniform(seed, position), instead of a stateful
//    generator whose draws would depend on how many other requests drew before this one;
//  - every reduction (max, softmax sum, nucleus cumulative sum, inverse-CDF walk) runs in one
//    fixed sequential order over one row, like the forward-pass kernels (kernels/cpu/ops.h);
//  - every ranking uses a strict total order (larger logit first, ties to the lower token id),
//    so the result of a sort is unique whatever algorithm or library performs it.
// `position` is chosen by the caller and must itself be request-local (for example the index of
// the generated token within its request, or its absolute sequence position), never a batch slot
// or a global step counter.
//
// Pipeline for temperature > 0 (sample()):
//   1. probs[i] = exp((logit[i] - max_logit) / temperature) in fp32, in increasing id; the sum
//      in increasing id; probs[i] /= sum. Subtracting the max before dividing keeps tiny
//      temperatures from overflowing (the max maps to exp(0) = 1).
//   2. top-k (when 0 < top_k < vocab): keep the top_k highest ranked tokens.
//   3. top-p (when top_p < 1): renormalise the kept probabilities (as HF and vLLM do, top-p is
//      measured on the top-k distribution), walk them in rank order accumulating in fp32 and keep
//      the smallest prefix whose cumulative mass is >= top_p (all of them if rounding never
//      reaches top_p).
//   4. inverse CDF: mass = sum of the kept probabilities in increasing id (double); target =
//      uniform(seed, position) * mass; return the first kept token, in increasing id, whose
//      running sum (double, same order) exceeds target. Scaling the uniform by the kept mass is
//      the renormalisation. Tokens with probability 0 are never returned.
// temperature == 0 is greedy: argmax of the logits, ties to the lower id (no RNG, and top-k /
// top-p cannot change the argmax). Ranking by logit rather than by the rounded fp32 probability
// is the same order (exp is monotone) with rounding ties resolved by the exact logit, which
// keeps top_k == 1 and tiny top_p identical to greedy.
//
// Logprobs always refer to the model's distribution: log_softmax of the original logits at
// temperature 1, before top-k / top-p (what OpenAI's API reports), computed in fp32 as
// (logit - max) - log(sum_i exp(logit_i - max)) with the sum in increasing id.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace keel::sampling {

// OpenAI's upper bound on top_logprobs; keeps per-token result sizes bounded.
inline constexpr int32_t kMaxNumLogprobs = 20;

struct SamplingParams {
  float temperature = 1.0f;  // >= 0, finite; 0 = greedy
  float top_p = 1.0f;        // (0, 1]; 1 = off
  int32_t top_k = -1;        // >= -1; -1 or 0 = off; values >= vocab keep everything
  uint64_t seed = 0;         // RNG key; any value
  int32_t num_logprobs = 0;  // [0, kMaxNumLogprobs]; how many top logprobs to report

  // Throws keel::Error naming the offending field and its accepted range.
  void validate() const;
  bool greedy() const { return temperature == 0.0f; }
};

struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
};

struct SampleResult {
  int32_t token = -1;
  // log_softmax(logits)[token] at temperature 1 (the model's distribution, see the note above).
  float logprob = 0.0f;
  // The min(num_logprobs, vocab) largest model logprobs, descending, ties to the lower id.
  std::vector<TokenLogprob> top_logprobs;
};

// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), as in
// Random123 / cuRAND: a bijection of the 128-bit counter under a 64-bit key.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// A uniform double in [0, 1) that depends only on (seed, position):
//   key     = {seed & 0xffffffff, seed >> 32}
//   counter = {position & 0xffffffff, position >> 32, 0, 0}   (position as uint64)
//   out     = philox4x32_10(counter, key)
//   bits64  = (uint64(out[1]) << 32) | out[0]
//   uniform = (bits64 >> 11) * 2^-53
// Counter words 2 and 3 are left 0, reserved for further independent streams per position.
double uniform(uint64_t seed, uint64_t position);

// Samples one token from one row of `vocab` logits (see the pipeline above). Validates params;
// throws keel::Error on vocab outside [1, INT32_MAX], position < 0, a NaN or +inf logit, or a
// row whose logits are all -inf. -inf logits are allowed (masked tokens: never sampled).
SampleResult sample(const float* logits, int64_t vocab, const SamplingParams& params,
                    int64_t position);

}  // namespace keel::sampling
