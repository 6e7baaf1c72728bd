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
// Logits processing, before any sampling (process_logits(); the order and formulas of vLLM's
// v1 sampler, which follow OpenAI's definitions for presence/frequency and HF's for
// repetition), on a copy of the row, token by token so each logit sees only its own terms:
//   a. banned tokens (min_tokens not yet reached: the stop tokens) -> -inf;
//   b. logit_bias: logit += bias;
//   c. repetition_penalty r over the request's prompt AND generated tokens: a token that
//      occurs in either has logit / r when the logit is > 0, logit * r otherwise;
//   d. frequency_penalty f and presence_penalty p over the generated tokens only:
//      logit -= f * count(token in output) + p * (token in output ? 1 : 0).
// Every term depends only on the request's own tokens (TokenHistory), never on a batch-mate,
// so processing is batch-invariant by construction. A positive logit divided by a tiny
// repetition penalty that would overflow saturates at the largest float (never +inf).
//
// Pipeline for temperature > 0 (sample()), on the processed logits:
//   1. probs[i] = exp((logit[i] - max_logit) / temperature) in fp32, in increasing id; the sum
//      in increasing id; probs[i] /= sum. Subtracting the max before dividing keeps tiny
//      temperatures from overflowing (the max maps to exp(0) = 1).
//   2. min_p (when > 0): keep the tokens with probs[i] >= min_p * max_i probs[i] (a prefix of
//      the ranking, as probs are monotone in the logit); vLLM applies it to the temperature-
//      scaled distribution before top-k / top-p, as here.
//   2b. top-k (when 0 < top_k < vocab): keep the top_k highest ranked of those.
//   3. top-p (when top_p < 1): renormalise the kept probabilities (as HF and vLLM do, top-p is
//      measured on the top-k distribution), walk them in rank order accumulating in fp32 and keep
//      the smallest prefix whose cumulative mass is >= top_p (all of them if rounding never
//      reaches top_p).
//   4. inverse CDF: mass = sum of the kept probabilities in increasing id (double); target =
//      uniform(seed, position) * mass; return the first kept token, in increasing id, whose
//      running sum (double, same order) exceeds target. Scaling the uniform by the kept mass is
//      the renormalisation. Tokens with probability 0 are never returned.
// temperature == 0 is greedy: argmax of the processed logits, ties to the lower id (no RNG, and
// min_p / top-k / top-p cannot change the argmax). Ranking by logit rather than by the rounded fp32
// probability is the same order (exp is monotone) with rounding ties resolved by the exact logit,
// which keeps top_k == 1 and tiny top_p identical to greedy.
//
// Logprobs always refer to the model's distribution: log_softmax of the original logits at
// temperature 1, before processing (penalties, bias) and before min_p / top-k / top-p (vLLM's
// default logprobs_mode raw_logprobs), computed in fp32 as
// (logit - max) - log(sum_i exp(logit_i - max)) with the sum in increasing id.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

namespace keel::sampling {

// OpenAI's upper bound on top_logprobs; keeps per-token result sizes bounded.
inline constexpr int32_t kMaxNumLogprobs = 20;
// OpenAI's ranges for logit_bias values and for the presence / frequency penalties.
inline constexpr float kMaxLogitBias = 100.0f;
inline constexpr float kMaxPresenceFrequencyPenalty = 2.0f;

struct LogitBias {
  int32_t token = 0;
  float bias = 0.0f;
};

struct SamplingParams {
  float temperature = 1.0f;           // >= 0, finite; 0 = greedy
  float top_p = 1.0f;                 // (0, 1]; 1 = off
  int32_t top_k = -1;                 // >= -1; -1 or 0 = off; values >= vocab keep everything
  uint64_t seed = 0;                  // RNG key; any value
  int32_t num_logprobs = 0;           // [0, kMaxNumLogprobs]; how many top logprobs to report
  float min_p = 0.0f;                 // [0, 1]; 0 = off
  float presence_penalty = 0.0f;      // [-2, 2]; 0 = off
  float frequency_penalty = 0.0f;     // [-2, 2]; 0 = off
  float repetition_penalty = 1.0f;    // finite, > 0; 1 = off
  std::vector<LogitBias> logit_bias;  // ids >= 0 (checked against the vocab by sample()),
                                      // bias in [-100, 100]

  // Throws keel::Error naming the offending field and its accepted range.
  void validate() const;
  bool greedy() const { return temperature == 0.0f; }
  // True when process_logits() can change a logit (given a non-empty history or bans).
  bool processes_logits() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
           !logit_bias.empty();
  }
};

// The request's own tokens, all that logits processing may look at.
struct TokenHistory {
  std::span<const int32_t> prompt;  // for repetition_penalty
  std::span<const int32_t> output;  // generated so far: repetition, frequency, presence
  std::span<const int32_t> banned;  // forced to -inf (min_tokens: the stop tokens)
};

struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
};

// One position's model logprobs (log_softmax at temperature 1) for a chosen token.
struct TokenLogprobs {
  float logprob = 0.0f;
  // vLLM's rank: how many tokens have a logprob >= this token's (1 for the argmax; ties count
  // against the token).
  int64_t rank = 0;
  // The min(num_top, vocab) largest logprobs, descending, ties to the lower id.
  std::vector<TokenLogprob> top;
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

// Applies steps a-d above to `logits` in place. Throws keel::Error on a token id (history,
// bans, logit_bias) outside [0, vocab).
void process_logits(float* logits, int64_t vocab, const SamplingParams& params,
                    const TokenHistory& history);

// Samples one token from one row of `vocab` logits (processing, then the pipeline above).
// Validates params; throws keel::Error on vocab outside [1, INT32_MAX], position < 0, a NaN or
// +inf logit, a row whose logits are all -inf (before or after processing), or a token id
// outside the vocab. -inf logits are allowed (masked tokens: never sampled).
SampleResult sample(const float* logits, int64_t vocab, const SamplingParams& params,
                    int64_t position, const TokenHistory& history = {});

// Model logprobs of `token` under one row (prompt_logprobs; sample() reports the same numbers
// for the sampled token). Throws keel::Error on the inputs sample() refuses, a token outside
// [0, vocab) or num_top outside [0, kMaxNumLogprobs].
TokenLogprobs token_logprobs(const float* logits, int64_t vocab, int32_t token, int32_t num_top);

}  // namespace keel::sampling
