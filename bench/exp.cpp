// Shared exp benchmark: kernels/math/exp_math.h's exp_f32 (the one the CPU and CUDA kernels
// share) against glibc's expf, on one core, alone and inside the CPU loops that use it.
//
// Each case times a "shared" and a "glibc" variant of the same work, alternating between them
// in short batches and keeping each one's fastest batch, so that both see the same machine
// load. The glibc variants are the CPU kernels as they were before the shared exp (the same
// formulas with std::exp, compiled with the same flags):
//  - exp_call: one exp per element through a function that is not inlined (the scalar cost);
//  - exp_loop: a loop of exps over an array, compiled here for baseline x86-64 (SSE2: the
//    shared exp inlined and auto-vectorised 4 wide);
//  - attention_exp_sum: the exps and their sum over a head's scores (512, 4096 positions),
//    math::attention_exp_scores compiled here (SSE2) as well;
//  - silu_mul: cpu::silu_mul over one row (4096, 1536: hidden and MoE intermediate widths);
//  - softmax: cpu::softmax over router rows of 128 and 512 experts;
//  - attention_decode: cpu::attention_decode (16 query heads over 4 KV heads, head_dim 128,
//    2048 positions), where the exps are a small part next to the two dot products.
// The last three are the library kernels, which have AVX2 and AVX-512 clones
// (kernels/cpu/ops.cpp); the glibc variants cannot vectorise (one expf call per element).
// Verification in the same run (exit status 1 on failure): the shared cases' outputs equal the
// math functions bit for bit, and shared and glibc differ by at most the stated ulp bounds.
// Output: one JSON object on stdout; progress goes to stderr.
//
// Usage: exp [--seconds S (timing budget per case, default 0.5)]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench/machine.h"
#include "kernels/base/dtype.h"
#include "kernels/cpu/ops.h"
#include "kernels/math/exp_math.h"
#include "kernels/math/ops_math.h"

namespace {

using Clock = std::chrono::steady_clock;

bool g_verified = true;

void check(bool condition, const std::string& what) {
  if (condition) return;
  if (g_verified) std::fprintf(stderr, "exp bench: verification failed: %s\n", what.c_str());
  g_verified = false;
}

// Distance in representable floats (0 for equal values, both zeros equal).
int64_t ulp_distance(float a, float b) {
  auto key = [](float value) {
    const int64_t bits = keel::float_bits(value);
    return (bits & 0x80000000) != 0 ? 0x80000000 - bits : bits;
  };
  return std::llabs(key(a) - key(b));
}

std::vector<float> random_floats(std::mt19937& rng, size_t count, float low, float high) {
  std::uniform_real_distribution<float> distribution(low, high);
  std::vector<float> values(count);
  for (float& value : values) value = distribution(rng);
  return values;
}

// ---------------------------------------------------------------------------------------------
// The glibc variants: the CPU kernels' formulas before the shared exp.

__attribute__((noinline)) float glibc_exp_call(float x) {
  return std::exp(x);
}

__attribute__((noinline)) float shared_exp_call(float x) {
  return keel::math::exp_f32(x);
}

void glibc_silu_mul(const float* gate, const float* up, int64_t width, float* out) {
  for (int64_t i = 0; i < width; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void glibc_softmax(float* row, int64_t width) {
  float max_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < width; ++i) max_value = std::max(max_value, row[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < width; ++i) {
    row[i] = std::exp(row[i] - max_value);
    sum += row[i];
  }
  const float inv_sum = 1.0f / sum;
  for (int64_t i = 0; i < width; ++i) row[i] *= inv_sum;
}

float glibc_attention_exp_scores(float* scores, int64_t num_positions, float max_score) {
  float sum = 0.0f;
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    scores[pos] = std::exp(scores[pos] - max_score);
    sum += scores[pos];
  }
  return 1.0f / sum;
}

// cpu::attention_decode's loops (kernels/math/ops_math.h attention_head) with the glibc exp.
void glibc_attention_decode(const float* q, int64_t num_q_heads, const int32_t* kv_head_of_q,
                            const float* k_cache, const float* v_cache, int64_t capacity,
                            int64_t head_dim, int64_t num_positions, float scale, float* scores,
                            float* out) {
  for (int64_t head = 0; head < num_q_heads; ++head) {
    const int64_t kv_offset = int64_t{kv_head_of_q[head]} * capacity * head_dim;
    const float* q_head = q + head * head_dim;
    const float* k_head = k_cache + kv_offset;
    const float* v_head = v_cache + kv_offset;
    float* out_head = out + head * head_dim;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      scores[pos] = keel::math::attention_score(q_head, k_head + pos * head_dim, head_dim, scale);
      max_score = std::max(max_score, scores[pos]);
    }
    const float inv_sum = glibc_attention_exp_scores(scores, num_positions, max_score);
    for (int64_t d = 0; d < head_dim; ++d) out_head[d] = 0.0f;
    for (int64_t pos = 0; pos < num_positions; ++pos) {
      const float weight = scores[pos] * inv_sum;
      const float* v_row = v_head + pos * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) out_head[d] += weight * v_row[d];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timing {
  double shared_seconds = std::numeric_limits<double>::infinity();
  double glibc_seconds = std::numeric_limits<double>::infinity();
};

// Fastest call of each variant; batches of calls alternate between the two until the budget
// is spent (at least 5 batches each).
Timing time_pair(const std::function<void()>& shared, const std::function<void()>& glibc,
                 double budget_seconds) {
  Timing timing;
  auto batch = [](const std::function<void()>& work, double& best) {
    for (int call = 0; call < 8; ++call) {
      const Clock::time_point start = Clock::now();
      work();
      best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    }
  };
  shared();
  glibc();
  const Clock::time_point begin = Clock::now();
  for (int round = 0;; ++round) {
    batch(shared, timing.shared_seconds);
    batch(glibc, timing.glibc_seconds);
    if (round >= 4 && std::chrono::duration<double>(Clock::now() - begin).count() > budget_seconds)
      break;
  }
  return timing;
}

// Keeps results observable so that no benchmarked loop is optimised away.
volatile float g_sink = 0.0f;

nlohmann::json report_case(const std::string& name, int64_t elements, int64_t size,
                           const Timing& timing) {
  const double shared_ns = timing.shared_seconds * 1e9 / static_cast<double>(elements);
  const double glibc_ns = timing.glibc_seconds * 1e9 / static_cast<double>(elements);
  std::fprintf(stderr, "  %-18s %6lld: shared %7.3f ns/elem, glibc %7.3f ns/elem, x%.2f\n",
               name.c_str(), static_cast<long long>(size), shared_ns, glibc_ns,
               glibc_ns / shared_ns);
  return {{"case", name},
          {"size", size},
          {"elements_per_call", elements},
          {"shared_ns_per_element", shared_ns},
          {"glibc_ns_per_element", glibc_ns},
          {"speedup_shared_over_glibc", glibc_ns / shared_ns}};
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "exp: %s\nusage: exp [--seconds S]\n", message.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  double budget_seconds = 0.5;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--seconds" && i + 1 < argc) {
      char* end = nullptr;
      budget_seconds = std::strtod(argv[++i], &end);
      if (end == argv[i] || *end != '\0' || !(budget_seconds > 0.0))
        usage_error("--seconds expects a positive number, got '" + std::string(argv[i]) + "'");
    } else {
      usage_error("unknown argument '" + flag + "'");
    }
  }
  namespace math = keel::math;
  namespace cpu = keel::cpu;
  const double load_average = keel::bench::one_minute_load_average();
  std::fprintf(stderr, "exp bench on %s (load average %.2f)\n", keel::bench::machine_name().c_str(),
               load_average);
  std::mt19937 rng(7);
  nlohmann::json cases = nlohmann::json::array();

  {  // exp alone: inputs over the range where softmax and attention use it, and beyond
    const int64_t n = 4096;
    const std::vector<float> x = random_floats(rng, n, -30.0f, 30.0f);
    std::vector<float> shared(n), glibc(n);
    for (int64_t i = 0; i < n; ++i) {
      shared[i] = math::exp_f32(x[i]);
      glibc[i] = std::exp(x[i]);
      check(keel::float_bits(shared_exp_call(x[i])) == keel::float_bits(shared[i]),
            "exp_f32 inlined == not inlined");
      // 0.76 ulp (shared) + 0.51 ulp (glibc): never two floats apart.
      check(ulp_distance(shared[i], glibc[i]) <= 1, "exp_f32 within 1 ulp of glibc expf");
    }
    cases.push_back(report_case("exp_call", n, n,
                                time_pair(
                                    [&] {
                                      float acc = 0.0f;
                                      for (int64_t i = 0; i < n; ++i) acc += shared_exp_call(x[i]);
                                      g_sink = acc;
                                    },
                                    [&] {
                                      float acc = 0.0f;
                                      for (int64_t i = 0; i < n; ++i) acc += glibc_exp_call(x[i]);
                                      g_sink = acc;
                                    },
                                    budget_seconds)));
    cases.push_back(report_case("exp_loop", n, n,
                                time_pair(
                                    [&] {
                                      for (int64_t i = 0; i < n; ++i)
                                        shared[i] = math::exp_f32(x[i]);
                                      g_sink = shared[n - 1];
                                    },
                                    [&] {
                                      for (int64_t i = 0; i < n; ++i) glibc[i] = std::exp(x[i]);
                                      g_sink = glibc[n - 1];
                                    },
                                    budget_seconds)));
  }

  for (int64_t width : {4096, 1536}) {
    const std::vector<float> gate = random_floats(rng, width, -8.0f, 8.0f);
    const std::vector<float> up = random_floats(rng, width, -2.0f, 2.0f);
    std::vector<float> shared(width), glibc(width);
    cpu::silu_mul(gate.data(), up.data(), width, shared.data());
    glibc_silu_mul(gate.data(), up.data(), width, glibc.data());
    for (int64_t i = 0; i < width; ++i) {
      check(keel::float_bits(shared[i]) == keel::float_bits(math::silu_f32(gate[i]) * up[i]),
            "cpu::silu_mul == silu_f32 * up");
      // Both silus within 3 ulp of the truth, one more rounding for * up: a few ulp apart.
      check(ulp_distance(shared[i], glibc[i]) <= 8, "silu_mul within 8 ulp of the glibc formula");
    }
    cases.push_back(
        report_case("silu_mul", width, width,
                    time_pair([&] { cpu::silu_mul(gate.data(), up.data(), width, shared.data()); },
                              [&] { glibc_silu_mul(gate.data(), up.data(), width, glibc.data()); },
                              budget_seconds)));
  }

  for (int64_t experts : {128, 512}) {
    const std::vector<float> logits = random_floats(rng, experts, -6.0f, 6.0f);
    std::vector<float> shared = logits, glibc = logits, expected = logits;
    cpu::softmax(shared.data(), experts);
    glibc_softmax(glibc.data(), experts);
    math::softmax_row(expected.data(), experts);
    for (int64_t i = 0; i < experts; ++i) {
      check(keel::float_bits(shared[i]) == keel::float_bits(expected[i]),
            "cpu::softmax == math::softmax_row");
      // Each exp within 1 ulp of glibc's, the sum of E of them and the scaling: (E + few) ulp.
      check(std::fabs(shared[i] - glibc[i]) <=
                (static_cast<float>(experts) + 4.0f) * 0x1p-24f * glibc[i],
            "softmax within (E + 4) ulp of the glibc formula");
    }
    cases.push_back(report_case("softmax", experts, experts,
                                time_pair(
                                    [&] {
                                      shared = logits;
                                      cpu::softmax(shared.data(), experts);
                                    },
                                    [&] {
                                      glibc = logits;
                                      glibc_softmax(glibc.data(), experts);
                                    },
                                    budget_seconds)));
  }

  for (int64_t positions : {512, 4096}) {
    const std::vector<float> scores = random_floats(rng, positions, -10.0f, 2.0f);
    const float max_score = *std::max_element(scores.begin(), scores.end());
    std::vector<float> shared = scores, glibc = scores;
    const float shared_inv = math::attention_exp_scores(shared.data(), positions, max_score);
    const float glibc_inv = glibc_attention_exp_scores(glibc.data(), positions, max_score);
    for (int64_t i = 0; i < positions; ++i)
      check(keel::float_bits(shared[i]) == keel::float_bits(math::exp_f32(scores[i] - max_score)),
            "attention_exp_scores == exp_f32(score - max)");
    check(std::fabs(shared_inv - glibc_inv) <=
              (static_cast<float>(positions) + 4.0f) * 0x1p-24f * glibc_inv,
          "attention exp sums within (n + 4) ulp");
    float inv_sum = 0.0f;
    cases.push_back(report_case(
        "attention_exp_sum", positions, positions,
        time_pair(
            [&] {
              shared = scores;
              inv_sum += math::attention_exp_scores(shared.data(), positions, max_score);
            },
            [&] {
              glibc = scores;
              inv_sum += glibc_attention_exp_scores(glibc.data(), positions, max_score);
            },
            budget_seconds)));
    g_sink = inv_sum;
  }

  {
    const int64_t q_heads = 16, kv_heads = 4, head_dim = 128, positions = 2048;
    const std::vector<float> q = random_floats(rng, q_heads * head_dim, -1.0f, 1.0f);
    const std::vector<float> k = random_floats(rng, kv_heads * positions * head_dim, -1.0f, 1.0f);
    const std::vector<float> v = random_floats(rng, kv_heads * positions * head_dim, -1.0f, 1.0f);
    std::vector<int32_t> kv_head_of_q(q_heads);
    for (int64_t h = 0; h < q_heads; ++h)
      kv_head_of_q[h] = static_cast<int32_t>(h / (q_heads / kv_heads));
    std::vector<float> scratch(positions), shared(q_heads * head_dim), glibc(q_heads * head_dim);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    auto run_shared = [&] {
      cpu::attention_decode(q.data(), q_heads, kv_head_of_q.data(), k.data(), v.data(), positions,
                            head_dim, positions, scale, scratch.data(), shared.data());
    };
    auto run_glibc = [&] {
      glibc_attention_decode(q.data(), q_heads, kv_head_of_q.data(), k.data(), v.data(), positions,
                             head_dim, positions, scale, scratch.data(), glibc.data());
    };
    run_shared();
    run_glibc();
    for (size_t i = 0; i < shared.size(); ++i) {
      // Weights within (n + few) ulp relative; outputs are sums of weight * v with |v| <= 1.
      check(std::fabs(shared[i] - glibc[i]) <= 1e-5f, "attention_decode close to glibc exp");
    }
    cases.push_back(report_case("attention_decode", q_heads * positions, positions,
                                time_pair(run_shared, run_glibc, budget_seconds)));
  }

  nlohmann::json report;
  report["machine"] = {
      {"cpu", keel::bench::machine_name()}, {"threads", 1}, {"load_average", load_average}};
  report["timing"] =
      "fastest call of alternating batches; ns per element (per score for "
      "attention_decode)";
  report["cases"] = cases;
  report["verified"] = g_verified;
  std::printf("%s\n", report.dump(2).c_str());
  return g_verified ? 0 : 1;
}
