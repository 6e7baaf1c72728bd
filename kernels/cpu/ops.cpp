// CPU reference kernels for the non-GEMM ops. Plain loops with sequential reductions: their
// cost is O(tokens x hidden), small next to the GEMMs, and a fixed order keeps every row's
// bits independent of the batch. The math matches HF transformers' fp32 path.
//
// The arithmetic itself lives in kernels/math/ops_math.h (__host__ __device__), shared with the
// CUDA kernels; this file only walks rows and heads.
#include "kernels/cpu/ops.h"

#include "kernels/math/ops_math.h"

// The loops around exp (silu_mul, softmax and the router's softmax, attention's exps) are
// branch-free and vectorise (kernels/math/exp_math.h); clones for AVX2 and AVX-512 let them
// use the wider vectors where the CPU has them, chosen once when the program loads. Every
// clone runs the same IEEE operations on each element (no fma: -ffp-contract=off), so the bits
// do not depend on which one runs; tests/test_exp_math.cpp compares them with the scalar math.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KEEL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KEEL_VECTOR_CLONES
#endif

namespace keel::cpu {

void rms_norm(const float* x, const float* weight, float eps, int64_t num_rows, int64_t width,
              float* out) {
  for (int64_t row = 0; row < num_rows; ++row)
    math::rms_norm_row(x + row * width, weight, eps, width, out + row * width);
}

void rope_cos_sin(int64_t position, double theta, int64_t rotary_dim, float* cos_sin) {
  // As HF: inv_freq in fp32 from theta ** (2i/dim), angle = position * inv_freq in fp32.
  math::rope_cos_sin_row(position, static_cast<float>(theta), rotary_dim, cos_sin);
}

void apply_rope(float* head_vectors, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                const float* cos_sin) {
  const int64_t half = rotary_dim / 2;
  const float* cos_values = cos_sin;
  const float* sin_values = cos_sin + half;
  for (int64_t head = 0; head < num_heads; ++head) {
    float* vec = head_vectors + head * head_dim;
    for (int64_t i = 0; i < half; ++i)
      math::rope_rotate_pair(vec[i], vec[half + i], cos_values[i], sin_values[i]);
  }
}

KEEL_VECTOR_CLONES void silu_mul(const float* gate, const float* up, int64_t width, float* out) {
  for (int64_t i = 0; i < width; ++i) out[i] = math::silu_mul(gate[i], up[i]);
}

KEEL_VECTOR_CLONES void softmax(float* row, int64_t width) {
  math::softmax_row(row, width);
}

KEEL_VECTOR_CLONES RouteResult route_top_k(const float* router_logits, int64_t num_experts,
                                           int64_t top_k, bool normalize, float* probs_scratch,
                                           int32_t* expert_ids, float* expert_weights,
                                           const int32_t* forced_ids) {
  // Selection by repeated scans: k is small (<= 10), E is at most a few hundred. A strict '>'
  // keeps the lowest id among equal probabilities, the documented tie rule.
  RouteResult result;
  result.margin = math::route_top_k_token(router_logits, num_experts, top_k, normalize,
                                          probs_scratch, expert_ids, expert_weights, forced_ids);
  return result;
}

KEEL_VECTOR_CLONES void attention_decode(const float* q, int64_t num_q_heads,
                                         const int32_t* kv_head_of_q, const float* k_cache,
                                         const float* v_cache, int64_t capacity, int64_t head_dim,
                                         int64_t num_positions, float scale, float* scores_scratch,
                                         float* out) {
  for (int64_t head = 0; head < num_q_heads; ++head) {
    const int64_t kv_offset = int64_t{kv_head_of_q[head]} * capacity * head_dim;
    math::attention_head(q + head * head_dim, k_cache + kv_offset, v_cache + kv_offset, head_dim,
                         num_positions, scale, scores_scratch, out + head * head_dim);
  }
}

void to_f32(const void* src, DType dtype, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, dtype, static_cast<size_t>(i));
}

}  // namespace keel::cpu
