// From the scheduler's plan to the ranks' step: the one translation `keel serve` and
// `keel generate` share. Sequence i of the plan is row i of the step's block tables; its tokens
// follow in plan order.
#pragma once

#include "runtime/model/model.h"
#include "scheduler/batch_scheduler.h"

namespace keel {

// Logits rows: the last token of every sequence whose chunk ends its prompt or decodes
// (plan.needs_logits), or with `every_prompt_position` every token of every sequence.
StepBatch step_batch_from_plan(const StepPlan& plan, bool every_prompt_position = false);
// The same with `every_position_of_seq[i]` choosing, per plan sequence, every token of its
// chunk (prompt logprobs) or only the last one when it needs logits.
StepBatch step_batch_from_plan(const StepPlan& plan,
                               const std::vector<bool>& every_position_of_seq);

}  // namespace keel
