// Seeded, batch-independent sampling; the construction is documented in sampler.h.
#include "runtime/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/base/check.h"

namespace keel::sampling {

void SamplingParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    throw_error("SamplingParams.temperature = ", temperature,
                ": must be finite and >= 0 (0 means greedy)");
  }
  // Written so that NaN fails too: !(x > 0) is true for NaN.
  if (!(top_p > 0.0f) || top_p > 1.0f) {
    throw_error("SamplingParams.top_p = ", top_p, ": must be in (0, 1] (1 means off)");
  }
  if (top_k < -1) {
    throw_error("SamplingParams.top_k = ", top_k, ": must be >= -1 (-1 or 0 means off)");
  }
  if (num_logprobs < 0 || num_logprobs > kMaxNumLogprobs) {
    throw_error("SamplingParams.num_logprobs = ", num_logprobs, ": must be in [0, ",
                kMaxNumLogprobs, "]");
  }
  if (!(min_p >= 0.0f) || min_p > 1.0f) {
    throw_error("SamplingParams.min_p = ", min_p, ": must be in [0, 1] (0 means off)");
  }
  const auto check_penalty = [](const char* name, float value) {
    if (!(value >= -kMaxPresenceFrequencyPenalty) || value > kMaxPresenceFrequencyPenalty)
      throw_error("SamplingParams.", name, " = ", value, ": must be in [",
                  -kMaxPresenceFrequencyPenalty, ", ", kMaxPresenceFrequencyPenalty, "]");
  };
  check_penalty("presence_penalty", presence_penalty);
  check_penalty("frequency_penalty", frequency_penalty);
  if (!std::isfinite(repetition_penalty) || !(repetition_penalty > 0.0f)) {
    throw_error("SamplingParams.repetition_penalty = ", repetition_penalty,
                ": must be finite and > 0 (1 means off)");
  }
  for (const LogitBias& entry : logit_bias) {
    if (entry.token < 0) {
      throw_error("SamplingParams.logit_bias: token id ", entry.token, " must be >= 0");
    }
    if (!(entry.bias >= -kMaxLogitBias) || entry.bias > kMaxLogitBias) {
      throw_error("SamplingParams.logit_bias[", entry.token, "] = ", entry.bias, ": must be in [",
                  -kMaxLogitBias, ", ", kMaxLogitBias, "]");
    }
  }
}

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                      std::array<uint32_t, 2> key) {
  // Constants of Random123's philox4x32: round multipliers and Weyl key increments.
  constexpr uint32_t kMultiplier0 = 0xD2511F53u;
  constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  constexpr int kRounds = 10;
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      key[0] += kWeyl0;
      key[1] += kWeyl1;
    }
    const uint64_t product0 = uint64_t{kMultiplier0} * counter[0];
    const uint64_t product1 = uint64_t{kMultiplier1} * counter[2];
    const auto high0 = static_cast<uint32_t>(product0 >> 32);
    const auto low0 = static_cast<uint32_t>(product0);
    const auto high1 = static_cast<uint32_t>(product1 >> 32);
    const auto low1 = static_cast<uint32_t>(product1);
    counter = {high1 ^ counter[1] ^ key[0], low1, high0 ^ counter[3] ^ key[1], low0};
  }
  return counter;
}

double uniform(uint64_t seed, uint64_t position) {
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32)};
  const std::array<uint32_t, 4> counter = {static_cast<uint32_t>(position),
                                           static_cast<uint32_t>(position >> 32), 0u, 0u};
  const std::array<uint32_t, 4> out = philox4x32_10(counter, key);
  const uint64_t bits = (uint64_t{out[1]} << 32) | out[0];
  // The top 53 bits fill a double's mantissa exactly: k * 2^-53 with k < 2^53 is < 1.
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

namespace {

// The one ranking used everywhere: larger logit first, equal logits to the lower id. A strict
// total order (NaN is rejected up front), so any correct sort produces the same sequence.
struct RankByLogit {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Rejects rows no distribution can be formed from; returns the maximum logit.
float checked_max_logit(const float* logits, int64_t vocab) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    const float value = logits[i];
    if (std::isnan(value) || value == std::numeric_limits<float>::infinity()) {
      throw_error("sample: logit of token ", i, " is ", value, " (NaN and +inf are invalid)");
    }
    if (value > max_logit) max_logit = value;
  }
  if (max_logit == -std::numeric_limits<float>::infinity()) {
    throw_error("sample: all ", vocab, " logits are -inf; no token can be sampled");
  }
  return max_logit;
}

// weights[i] = exp((logit[i] - max_logit) / temperature) and their sum, both in increasing id.
float exp_weights(const float* logits, int64_t vocab, float max_logit, float temperature,
                  float* weights) {
  float sum = 0.0f;
  for (int64_t i = 0; i < vocab; ++i) {
    weights[i] = std::exp((logits[i] - max_logit) / temperature);
    sum += weights[i];
  }
  return sum;
}

int32_t argmax_lower_id(const float* logits, int64_t vocab) {
  int32_t best = 0;
  // Strict '>' keeps the lowest id among equal maxima.
  for (int64_t i = 1; i < vocab; ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

// Nucleus filter on tokens already in rank order: keeps the smallest prefix whose renormalised
// cumulative probability (fp32, rank order) reaches top_p; returns the prefix length.
size_t nucleus_prefix(const std::vector<int32_t>& ranked, const std::vector<float>& probs,
                      float top_p) {
  float ranked_mass = 0.0f;
  for (const int32_t token : ranked) ranked_mass += probs[token];
  float cumulative = 0.0f;
  for (size_t rank = 0; rank < ranked.size(); ++rank) {
    cumulative += probs[ranked[rank]] / ranked_mass;
    if (cumulative >= top_p) return rank + 1;
  }
  return ranked.size();  // rounding kept the total just below top_p: keep everything
}

// Inverse CDF over `kept` (increasing ids) with probabilities `probs`. Accumulates in double so
// that the 53-bit uniform keeps its resolution for small probabilities.
int32_t inverse_cdf(const std::vector<int32_t>& kept, const std::vector<float>& probs,
                    double uniform_value) {
  double kept_mass = 0.0;
  for (const int32_t token : kept) kept_mass += static_cast<double>(probs[token]);
  const double target = uniform_value * kept_mass;
  double cumulative = 0.0;
  int32_t last_positive = -1;
  for (const int32_t token : kept) {
    if (probs[token] == 0.0f) continue;  // zero mass: never returned
    cumulative += static_cast<double>(probs[token]);
    last_positive = token;
    if (target < cumulative) return token;
  }
  // Only reachable when u * mass rounded up to mass; the walk above summed the same terms in
  // the same order, so this is the last token of the CDF.
  KEEL_CHECK(last_positive >= 0, "the top-ranked token always has positive probability");
  return last_positive;
}

// Sorted distinct ids of `tokens` with their counts, each id checked against the vocab.
std::vector<std::pair<int32_t, int64_t>> counted_ids(std::span<const int32_t> tokens, int64_t vocab,
                                                     const char* what) {
  std::vector<int32_t> sorted(tokens.begin(), tokens.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::pair<int32_t, int64_t>> counts;
  for (const int32_t token : sorted) {
    if (token < 0 || token >= vocab) {
      throw_error("process_logits: ", what, " token id ", token, " is outside the vocab [0, ",
                  vocab, ")");
    }
    if (!counts.empty() && counts.back().first == token) {
      ++counts.back().second;
    } else {
      counts.emplace_back(token, 1);
    }
  }
  return counts;
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params,
                     int64_t position, float max_logit) {
  if (params.greedy()) return argmax_lower_id(logits, vocab);

  std::vector<float> probs(static_cast<size_t>(vocab));
  const float sum = exp_weights(logits, vocab, max_logit, params.temperature, probs.data());
  const float inv_sum = 1.0f / sum;
  for (float& p : probs) p *= inv_sum;

  const bool use_top_k = params.top_k > 0 && params.top_k < vocab;
  const bool use_top_p = params.top_p < 1.0f;
  const bool use_min_p = params.min_p > 0.0f;
  std::vector<int32_t> kept;
  if (!use_top_k && !use_top_p && !use_min_p) {
    kept.resize(static_cast<size_t>(vocab));
    std::iota(kept.begin(), kept.end(), 0);
  } else {
    std::vector<int32_t> ranked(static_cast<size_t>(vocab));
    std::iota(ranked.begin(), ranked.end(), 0);
    const RankByLogit rank{logits};
    if (use_min_p) {
      // The argmax has probability exp(0) / sum, the largest; the kept set {probs >= min_p *
      // max} is a prefix of the ranking because probs never decrease with the logit.
      const float threshold =
          params.min_p * probs[static_cast<size_t>(argmax_lower_id(logits, vocab))];
      ranked.erase(std::remove_if(ranked.begin(), ranked.end(),
                                  [&](int32_t token) { return probs[token] < threshold; }),
                   ranked.end());
    }
    if (use_top_k && params.top_k < static_cast<int64_t>(ranked.size())) {
      std::partial_sort(ranked.begin(), ranked.begin() + params.top_k, ranked.end(), rank);
      ranked.resize(static_cast<size_t>(params.top_k));
    } else {
      std::sort(ranked.begin(), ranked.end(), rank);
    }
    if (use_top_p) ranked.resize(nucleus_prefix(ranked, probs, params.top_p));
    // The inverse CDF walks increasing ids, so the sample depends only on the kept set.
    std::sort(ranked.begin(), ranked.end());
    kept = std::move(ranked);
  }
  return inverse_cdf(kept, probs, uniform(params.seed, static_cast<uint64_t>(position)));
}

}  // namespace

namespace {

void check_row_shape(int64_t vocab) {
  if (vocab < 1 || vocab > std::numeric_limits<int32_t>::max()) {
    throw_error("sample: vocab = ", vocab, ": must be in [1, ", std::numeric_limits<int32_t>::max(),
                "]");
  }
}

// Model logprobs of `token` (and the top num_top) for a row already checked, max known.
TokenLogprobs model_logprobs(const float* logits, int64_t vocab, float max_logit, int32_t token,
                             int32_t num_top) {
  float model_sum = 0.0f;
  for (int64_t i = 0; i < vocab; ++i) model_sum += std::exp(logits[i] - max_logit);
  const float log_model_sum = std::log(model_sum);
  const auto model_logprob = [&](int64_t id) { return (logits[id] - max_logit) - log_model_sum; };
  TokenLogprobs result;
  result.logprob = model_logprob(token);
  for (int64_t i = 0; i < vocab; ++i) result.rank += model_logprob(i) >= result.logprob ? 1 : 0;
  if (num_top > 0) {
    std::vector<float> logprobs(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) logprobs[i] = model_logprob(i);
    // Ranked by the reported value itself (descending, ties to the lower id), so the list is
    // sorted exactly as documented even where rounding makes distinct logits equal.
    std::vector<int32_t> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    const auto count = static_cast<int64_t>(std::min<int64_t>(num_top, vocab));
    std::partial_sort(order.begin(), order.begin() + count, order.end(), [&](int32_t a, int32_t b) {
      return logprobs[a] > logprobs[b] || (logprobs[a] == logprobs[b] && a < b);
    });
    result.top.reserve(static_cast<size_t>(count));
    for (int64_t rank = 0; rank < count; ++rank) {
      result.top.push_back({order[rank], logprobs[order[rank]]});
    }
  }
  return result;
}

}  // namespace

void process_logits(float* logits, int64_t vocab, const SamplingParams& params,
                    const TokenHistory& history) {
  for (const int32_t token : history.banned) {
    if (token < 0 || token >= vocab) {
      throw_error("process_logits: banned token id ", token, " is outside the vocab [0, ", vocab,
                  ")");
    }
    logits[token] = -std::numeric_limits<float>::infinity();
  }
  for (const LogitBias& entry : params.logit_bias) {
    if (entry.token < 0 || entry.token >= vocab) {
      throw_error("process_logits: logit_bias token id ", entry.token, " is outside the vocab [0, ",
                  vocab, ")");
    }
    logits[entry.token] += entry.bias;
  }
  if (params.repetition_penalty != 1.0f) {
    std::vector<int32_t> seen(history.prompt.begin(), history.prompt.end());
    seen.insert(seen.end(), history.output.begin(), history.output.end());
    const float penalty = params.repetition_penalty;
    for (const auto& [token, count] : counted_ids(seen, vocab, "history")) {
      (void)count;
      float& logit = logits[token];
      logit = logit > 0.0f ? logit / penalty : logit * penalty;
      // Dividing a large logit by a tiny penalty must not create +inf (an invalid row).
      if (logit == std::numeric_limits<float>::infinity())
        logit = std::numeric_limits<float>::max();
    }
  }
  if (params.frequency_penalty != 0.0f || params.presence_penalty != 0.0f) {
    for (const auto& [token, count] : counted_ids(history.output, vocab, "output")) {
      logits[token] -=
          params.frequency_penalty * static_cast<float>(count) + params.presence_penalty;
    }
  }
}

SampleResult sample(const float* logits, int64_t vocab, const SamplingParams& params,
                    int64_t position, const TokenHistory& history) {
  params.validate();
  check_row_shape(vocab);
  if (position < 0) throw_error("sample: position = ", position, ": must be >= 0");
  const float max_logit = checked_max_logit(logits, vocab);

  const float* sampled_row = logits;
  float sampled_max = max_logit;
  std::vector<float> processed;
  if (params.processes_logits() || !history.banned.empty()) {
    processed.assign(logits, logits + vocab);
    process_logits(processed.data(), vocab, params, history);
    sampled_row = processed.data();
    sampled_max = checked_max_logit(sampled_row, vocab);
  }

  SampleResult result;
  result.token = sample_token(sampled_row, vocab, params, position, sampled_max);
  // Model logprobs: log_softmax of the raw row at temperature 1, whatever the processing.
  TokenLogprobs logprobs =
      model_logprobs(logits, vocab, max_logit, result.token, params.num_logprobs);
  result.logprob = logprobs.logprob;
  result.top_logprobs = std::move(logprobs.top);
  return result;
}

TokenLogprobs token_logprobs(const float* logits, int64_t vocab, int32_t token, int32_t num_top) {
  check_row_shape(vocab);
  if (token < 0 || token >= vocab) {
    throw_error("token_logprobs: token id ", token, " is outside the vocab [0, ", vocab, ")");
  }
  if (num_top < 0 || num_top > kMaxNumLogprobs) {
    throw_error("token_logprobs: num_top = ", num_top, ": must be in [0, ", kMaxNumLogprobs, "]");
  }
  return model_logprobs(logits, vocab, checked_max_logit(logits, vocab), token, num_top);
}

}  // namespace keel::sampling
