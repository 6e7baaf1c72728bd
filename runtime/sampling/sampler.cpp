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

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params,
                     int64_t position, float max_logit) {
  if (params.greedy()) return argmax_lower_id(logits, vocab);

  std::vector<float> probs(static_cast<size_t>(vocab));
  const float sum = exp_weights(logits, vocab, max_logit, params.temperature, probs.data());
  const float inv_sum = 1.0f / sum;
  for (float& p : probs) p *= inv_sum;

  const bool use_top_k = params.top_k > 0 && params.top_k < vocab;
  const bool use_top_p = params.top_p < 1.0f;
  std::vector<int32_t> kept;
  if (!use_top_k && !use_top_p) {
    kept.resize(static_cast<size_t>(vocab));
    std::iota(kept.begin(), kept.end(), 0);
  } else {
    std::vector<int32_t> ranked(static_cast<size_t>(vocab));
    std::iota(ranked.begin(), ranked.end(), 0);
    const RankByLogit rank{logits};
    if (use_top_k) {
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

SampleResult sample(const float* logits, int64_t vocab, const SamplingParams& params,
                    int64_t position) {
  params.validate();
  if (vocab < 1 || vocab > std::numeric_limits<int32_t>::max()) {
    throw_error("sample: vocab = ", vocab, ": must be in [1, ", std::numeric_limits<int32_t>::max(),
                "]");
  }
  if (position < 0) throw_error("sample: position = ", position, ": must be >= 0");
  const float max_logit = checked_max_logit(logits, vocab);

  SampleResult result;
  result.token = sample_token(logits, vocab, params, position, max_logit);

  // Model logprobs: log_softmax at temperature 1, independent of the sampling parameters.
  float model_sum = 0.0f;
  for (int64_t i = 0; i < vocab; ++i) model_sum += std::exp(logits[i] - max_logit);
  const float log_model_sum = std::log(model_sum);
  const auto model_logprob = [&](int64_t token) {
    return (logits[token] - max_logit) - log_model_sum;
  };
  result.logprob = model_logprob(result.token);

  if (params.num_logprobs > 0) {
    std::vector<float> logprobs(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) logprobs[i] = model_logprob(i);
    // Ranked by the reported value itself (descending, ties to the lower id), so the list is
    // sorted exactly as documented even where rounding makes distinct logits equal.
    std::vector<int32_t> order(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    const auto count = static_cast<int64_t>(std::min<int64_t>(params.num_logprobs, vocab));
    std::partial_sort(order.begin(), order.begin() + count, order.end(), [&](int32_t a, int32_t b) {
      return logprobs[a] > logprobs[b] || (logprobs[a] == logprobs[b] && a < b);
    });
    result.top_logprobs.reserve(static_cast<size_t>(count));
    for (int64_t rank = 0; rank < count; ++rank) {
      result.top_logprobs.push_back({order[rank], logprobs[order[rank]]});
    }
  }
  return result;
}

}  // namespace keel::sampling
