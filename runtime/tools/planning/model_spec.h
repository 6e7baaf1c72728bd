// Architecture description of a model for capacity planning (configs/models/*.yaml with
// `kind: planning`), and the parameter counts of each part derived from it.
//
// Design note. A planning preset carries the Hugging Face config.json fields that determine
// weight, KV-cache and recurrent-state sizes -- nothing the engine needs to run the model. The
// file is strict (unknown keys are errors naming the file and key) and must say `kind: planning`
// so it is never confused with keel's gen-model presets in the same directory (which reject the
// `kind` key). One struct covers the families keel plans for:
//   - GQA attention (Mixtral, Qwen3, OLMoE, gpt-oss with sliding-window layers and sinks);
//   - MLA (DeepSeek-V3: the cache holds the compressed latent kv_lora_rank + qk_rope_head_dim);
//   - hybrid Gated DeltaNet + gated full attention (Qwen3.5 / Qwen3-Next);
//   - MoE with routed and shared experts, and optional dense first layers (DeepSeek-V3).
// Parameter counts (ModelParams) are totals over the whole model in parameters (not bytes), per
// part, so the memory model can apply a quantization and a TP split per part.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tools/planning/quant.h"

namespace keel::planning {

enum class AttentionType { gqa, mla };

// One decoder layer of a quantized checkpoint, keel_layout only: the format of each weight
// matrix keel's RankModel holds for it (runtime/model/model.h LayerWeights). Matrices keel fuses
// (q|k|v, gate|up, the Gated DeltaNet [q|k|v|z] and [b|a]) have one format.
struct LayerQuant {
  bool linear_attention = false;                 // a Gated DeltaNet layer (else full attention)
  bool moe = false;                              // a MoE layer (else a dense MLP)
  MatrixQuant qkv, o_proj;                       // full attention
  MatrixQuant linear_in, linear_ba, linear_out;  // Gated DeltaNet [q|k|v|z], [b|a], out_proj
  MatrixQuant experts_gate_up, experts_down;     // every routed expert of the layer
  MatrixQuant mlp_gate_up, mlp_down;             // the shared expert, or the dense MLP
  // router, shared_expert_gate, embeddings and lm_head: always dense (see plan_checkpoint.h)
};

struct ModelSpec {
  std::string name;    // "Qwen3.5-397B-A17B"
  std::string source;  // where the numbers come from
  std::string path;    // the preset file (for messages)

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;  // all decoder layers (full + linear attention)
  bool tie_word_embeddings = false;
  // Storage dtype of what no quantization touches (embeddings, lm_head, routers, norms): bf16
  // for presets, a checkpoint's torch_dtype (bf16 | fp16 | fp32) for a plan read from one.
  std::string dtype = "bf16";
  // Plan keel's own runtime layout (set for a plan read from a checkpoint directory; what
  // RankModel::weight_bytes() counts), instead of a GPU server's (vLLM/SGLang):
  //   - norms (input/post-attention/final, q/k norms, the gated GDN norm), q/k/v biases, conv1d,
  //     A_log and dt_bias in fp32 (keel converts them at load);
  //   - the embedding table replicated whole on every rank (not vocab-parallel);
  //   - lm_head vocab-parallel, padded: ceil(vocab / tp) rows per rank, held even when tied;
  //   - q/k/v biases sharded with their heads; conv1d, A_log, dt_bias sharded with the GDN heads;
  //     the gated GDN norm, q/k norms and the shared-expert gate replicated;
  //   - the Gated DeltaNet conv state in fp32 (linear_conv_state_dtype).
  bool keel_layout = false;
  // A quantized checkpoint (keel_layout only): every decoder layer's matrix formats, and the
  // checkpoint's quantization method for the report ("modelopt-nvfp4"). Empty: no quantization,
  // every matrix at `dtype`. Such a spec is planned as stored only (QuantSpec::as_stored), each
  // matrix by planning::matrix_bytes.
  std::vector<LayerQuant> layer_quant;
  std::string quant_method;

  // Full (softmax) attention layers: num_layers - linear_attention_layers.
  AttentionType attention = AttentionType::gqa;
  int64_t num_attention_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  bool attention_bias = false;    // biases on q/k/v (and on o_proj when attention_o_bias)
  bool attention_o_bias = true;   // gpt-oss: o_proj bias too; Qwen2-MoE: q/k/v only
  bool attn_output_gate = false;  // Qwen3.5: q_proj also emits a sigmoid gate (2x q width)
  bool qk_norm = false;
  int64_t sliding_window = 0;         // tokens; 0 = none
  int64_t sliding_window_layers = 0;  // how many of the full-attention layers use the window
  bool attention_sinks = false;       // gpt-oss: one learned sink logit per head

  // MLA (DeepSeek-V2/V3).
  int64_t q_lora_rank = 0;  // 0: plain q_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  // Gated DeltaNet (linear attention) layers.
  int64_t linear_attention_layers = 0;
  int64_t linear_num_key_heads = 0;
  int64_t linear_num_value_heads = 0;
  int64_t linear_key_head_dim = 0;
  int64_t linear_value_head_dim = 0;
  int64_t linear_conv_kernel_dim = 0;
  std::string linear_state_dtype = "fp32";  // recurrent state (HF mamba_ssm_dtype)
  // Conv state: bf16 as vLLM/SGLang keep it; keel's own runtime keeps it in fp32 (a plan built
  // from a checkpoint directory counts keel's layout).
  std::string linear_conv_state_dtype = "bf16";

  // MoE.
  int64_t num_experts = 0;  // 0: dense model
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_shared_experts = 0;
  int64_t shared_expert_intermediate_size = 0;
  bool shared_expert_gate = false;  // Qwen: a [1, hidden] sigmoid gate on the shared expert
  bool mlp_bias = false;            // gpt-oss: biases on expert projections
  int64_t dense_layers = 0;         // leading dense-MLP layers (DeepSeek-V3: 3)
  int64_t dense_intermediate_size = 0;

  // Published totals, for the report's sanity line (0 = unknown).
  double reference_total_params_b = 0;
  double reference_active_params_b = 0;

  int64_t full_attention_layers() const { return num_layers - linear_attention_layers; }
  int64_t moe_layers() const { return num_experts > 0 ? num_layers - dense_layers : 0; }
  bool is_moe() const { return num_experts > 0; }
};

// Parameters per part, totals over the whole model.
struct ModelParams {
  double routed_experts = 0;         // all experts of all MoE layers (projections + biases)
  double shared_experts = 0;         // shared expert projections (+ gate)
  double dense_mlp = 0;              // dense MLP layers
  double attention = 0;              // full-attention projections (q/k/v/o or MLA), quantizable
  double attention_bf16 = 0;         // norms, qk-norms, biases, sinks (kept bf16)
  double linear_attention = 0;       // Gated DeltaNet in/out projections, quantizable
  double linear_attention_bf16 = 0;  // conv1d, A_log, dt_bias, gated norm
  double router = 0;                 // router weights (bf16)
  double layer_norms = 0;            // per-layer input/post-attention RMSNorms + final norm (bf16)
  double embeddings = 0;
  double lm_head = 0;  // 0 when tied

  double expert_params = 0;  // one routed expert (projections + biases)
  double total() const {
    return routed_experts + shared_experts + dense_mlp + attention + attention_bf16 +
           linear_attention + linear_attention_bf16 + router + layer_norms + embeddings + lm_head;
  }
  // Parameters a token touches (embedding lookup excluded; lm_head included; top-k experts).
  double active_per_token = 0;
};

ModelParams count_params(const ModelSpec& model);

// Loads and validates a `kind: planning` preset. Throws keel::Error naming the file and key.
ModelSpec load_model_spec(const std::string& path);

// Validates cross-field constraints (throws keel::Error naming `where`).
void validate_model_spec(const ModelSpec& model, const std::string& where);

}  // namespace keel::planning
