// `keel plan` results: the memory plan, the decode table (step time vs batch size), prefill
// throughput and TTFT, the bottleneck of each regime -- as a struct, as text and as JSON.
//
// Design note. The report is computed once (build_plan_report) and rendered twice, so the text
// and the JSON never disagree. The decode table runs B = 1, 2, 4, ... up to the batch that fills
// memory at --context (that batch is the last row), every sequence at --context tokens (the
// worst case the memory plan is sized for). When the model does not fit, the table shows B = 1
// as a hypothetical.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "runtime/tools/planning/perf_model.h"

namespace keel::planning {

struct DecodeRow {
  int64_t batch = 0;
  StepBreakdown step;
  double tokens_per_s = 0;             // batch / step
  double per_stream_tokens_per_s = 0;  // 1 / step
};

struct PlanReport {
  ModelSpec model;
  HardwareSpec hardware;
  QuantSpec quant;
  int tp = 1;
  PlanOptions options;
  MemoryPlan memory;
  ComputePrecision precision = ComputePrecision::bf16;  // linear matmuls, after fallback
  std::vector<DecodeRow> decode;
  DecodeRow single_stream;          // B = 1
  DecodeRow full_batch;             // B = min(max_seqs, max_num_seqs) (1 when it does not fit)
  StepBreakdown prefill_chunk;      // one chunk of min(prompt_len, max_num_batched_tokens)
  double prefill_tokens_per_s = 0;  // prompt_len / TTFT
  double ttft_s = 0;
};

PlanReport build_plan_report(const ModelSpec& model, const HardwareSpec& hardware,
                             const QuantSpec& quant, int tp, const PlanOptions& options);

std::string render_plan_text(const PlanReport& report);
nlohmann::json plan_report_json(const PlanReport& report);

}  // namespace keel::planning
