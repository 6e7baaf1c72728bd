// `keel plan --validate TABLE` (design note in plan_validate.h).
#include "runtime/tools/planning/plan_validate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "runtime/tools/planning/perf_model.h"
#include "runtime/tools/planning/yaml_strict.h"

namespace keel::planning {

using detail::read_optional;
using detail::read_required;

namespace {

struct GroupSpec {
  std::string name, source, model, hardware, quant, kv_dtype = "bf16", efficiency_file, speculative,
                                                    acceptance;
  int tp = 1;
  bool attention_bf16 = false, shared_expert_bf16 = false, expert_parallel = false;
  double reserve_gib = 2.0;
  int64_t max_num_seqs = 256, max_num_batched_tokens = 8192, decode_tokens = 0;
};

std::string resolve(const std::filesystem::path& base, const std::string& relative) {
  const std::filesystem::path path(relative);
  return path.is_absolute() ? relative : (base / path).lexically_normal().string();
}

}  // namespace

ValidationResult validate_plan_table(const std::string& path) {
  YAML::Node root = detail::load_yaml_mapping(path);
  detail::reject_unknown_keys(root, {"kind", "name", "source", "groups"}, path);
  std::string kind;
  read_required(root, "kind", path, kind);
  if (kind != "plan_validation")
    throw_error(path, ": key 'kind' must be 'plan_validation' (got '", kind, "')");
  ValidationResult result;
  result.path = path;
  read_optional(root, "name", path, result.name);
  const std::filesystem::path base = std::filesystem::path(path).parent_path();
  const YAML::Node groups = root["groups"];
  if (!groups || !groups.IsSequence() || groups.size() == 0)
    throw_error(path, ": 'groups' must be a non-empty list");
  for (size_t g = 0; g < groups.size(); ++g) {
    const YAML::Node node = groups[g];
    const std::string where = path + ": groups[" + std::to_string(g) + "]";
    if (!node.IsMap()) throw_error(where, ": expected a mapping");
    detail::reject_unknown_keys(
        node,
        {"name", "source", "model", "hardware", "quant", "tp", "kv_dtype", "attention_bf16",
         "shared_expert_bf16", "expert_parallel", "efficiency_file", "reserve_gib", "max_num_seqs",
         "max_num_batched_tokens", "decode_tokens", "speculative", "acceptance", "rows"},
        where);
    GroupSpec spec;
    read_required(node, "name", where, spec.name);
    read_required(node, "source", where, spec.source);
    read_required(node, "model", where, spec.model);
    read_required(node, "hardware", where, spec.hardware);
    read_required(node, "quant", where, spec.quant);
    read_required(node, "tp", where, spec.tp);
    read_optional(node, "kv_dtype", where, spec.kv_dtype);
    read_optional(node, "attention_bf16", where, spec.attention_bf16);
    read_optional(node, "shared_expert_bf16", where, spec.shared_expert_bf16);
    read_optional(node, "expert_parallel", where, spec.expert_parallel);
    read_optional(node, "efficiency_file", where, spec.efficiency_file);
    read_optional(node, "reserve_gib", where, spec.reserve_gib);
    read_optional(node, "max_num_seqs", where, spec.max_num_seqs);
    read_optional(node, "max_num_batched_tokens", where, spec.max_num_batched_tokens);
    read_optional(node, "decode_tokens", where, spec.decode_tokens);
    read_optional(node, "speculative", where, spec.speculative);
    read_optional(node, "acceptance", where, spec.acceptance);
    if (spec.max_num_seqs < 1) throw_error(where, ": 'max_num_seqs' must be >= 1");
    if (spec.decode_tokens < 0) throw_error(where, ": 'decode_tokens' must be >= 0");

    const ModelSpec model = load_model_spec(resolve(base, spec.model));
    HardwareSpec hardware = load_hardware_spec(resolve(base, spec.hardware));
    if (!spec.efficiency_file.empty())
      apply_efficiency_file(hardware, resolve(base, spec.efficiency_file));
    const QuantSpec quant = quant_from_name(spec.quant);
    PlanOptions options;
    options.kv_dtype = spec.kv_dtype;
    options.attention_bf16 = spec.attention_bf16;
    options.shared_expert_bf16 = spec.shared_expert_bf16;
    options.expert_parallel = spec.expert_parallel;
    options.reserve_gib = spec.reserve_gib;
    options.max_num_seqs = spec.max_num_seqs;
    options.max_num_batched_tokens = spec.max_num_batched_tokens;
    options.speculative = parse_speculative(spec.speculative, spec.acceptance);

    const YAML::Node rows = node["rows"];
    if (!rows || !rows.IsSequence() || rows.size() == 0)
      throw_error(where, ": 'rows' must be a non-empty list");
    for (size_t i = 0; i < rows.size(); ++i) {
      const std::string row_where = where + ": rows[" + std::to_string(i) + "]";
      if (!rows[i].IsMap()) throw_error(row_where, ": expected a mapping");
      detail::reject_unknown_keys(rows[i], {"prompt", "concurrency", "published", "fit", "note"},
                                  row_where);
      ValidationRow row;
      row.group = spec.name;
      row.source = spec.source;
      read_required(rows[i], "prompt", row_where, row.prompt);
      read_required(rows[i], "concurrency", row_where, row.concurrency);
      read_required(rows[i], "published", row_where, row.published);
      read_optional(rows[i], "fit", row_where, row.fit);
      read_optional(rows[i], "note", row_where, row.note);
      if (row.prompt < 0 || row.concurrency < 1 || !(row.published > 0))
        throw_error(row_where, ": needs prompt >= 0, concurrency >= 1 and published > 0");
      row.context = std::max<int64_t>(1, row.prompt + spec.decode_tokens / 2);
      PlanOptions row_options = options;
      row_options.context = row.context;
      const RooflineCostModel cost(model, hardware, quant, spec.tp, row_options);
      row.batch = std::max<int64_t>(
          1, std::min({row.concurrency, spec.max_num_seqs, cost.memory().max_seqs}));
      const StepBreakdown step = cost.breakdown({row.batch, row.batch, 0, row.batch * row.context});
      row.predicted = static_cast<double>(row.batch) * step.tokens_per_seq / step.seconds;
      row.error = row.predicted / row.published - 1.0;
      row.bound = step.bound;
      result.rows.push_back(row);
    }
  }
  for (const ValidationRow& row : result.rows) {
    if (row.fit) {
      result.max_abs_error_fit = std::max(result.max_abs_error_fit, std::fabs(row.error));
    } else {
      ++result.validation_rows;
      result.max_abs_error_validation =
          std::max(result.max_abs_error_validation, std::fabs(row.error));
      if (std::fabs(row.error) <= 0.25) ++result.within_25_percent;
    }
  }
  return result;
}

std::string render_validation_text(const ValidationResult& r) {
  std::ostringstream out;
  out << "keel plan --validate " << r.path;
  if (!r.name.empty()) out << ": " << r.name;
  out << "\n";
  std::string group;
  for (const ValidationRow& row : r.rows) {
    if (row.group != group) {
      group = row.group;
      out << "\n" << group << "\n  source: " << row.source << "\n";
      out << "   prompt   conc  batch  context  published tok/s  predicted tok/s   error  bound\n";
    }
    char line[200];
    std::snprintf(line, sizeof(line),
                  "  %7lld  %5lld  %5lld  %7lld  %15.1f  %15.1f  %+6.1f%%  %s%s\n",
                  static_cast<long long>(row.prompt), static_cast<long long>(row.concurrency),
                  static_cast<long long>(row.batch), static_cast<long long>(row.context),
                  row.published, row.predicted, row.error * 100.0, row.bound,
                  row.fit ? "  (fitted)" : (std::fabs(row.error) > 0.25 ? "  (outside 25%)" : ""));
    out << line;
  }
  char summary[200];
  std::snprintf(summary, sizeof(summary),
                "\nfitted rows: max |error| %.1f%%; validation rows: %d of %d within 25%%, max "
                "|error| %.1f%%\n",
                r.max_abs_error_fit * 100.0, r.within_25_percent, r.validation_rows,
                r.max_abs_error_validation * 100.0);
  out << summary;
  return out.str();
}

nlohmann::json validation_json(const ValidationResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const ValidationRow& row : r.rows)
    rows.push_back({{"group", row.group},
                    {"source", row.source},
                    {"prompt", row.prompt},
                    {"concurrency", row.concurrency},
                    {"batch", row.batch},
                    {"context", row.context},
                    {"published_tokens_per_s", row.published},
                    {"predicted_tokens_per_s", row.predicted},
                    {"error", row.error},
                    {"fit", row.fit},
                    {"bound", row.bound},
                    {"note", row.note}});
  return {{"table", r.path},
          {"name", r.name},
          {"rows", rows},
          {"max_abs_error_fit", r.max_abs_error_fit},
          {"max_abs_error_validation", r.max_abs_error_validation},
          {"validation_rows", r.validation_rows},
          {"within_25_percent", r.within_25_percent}};
}

}  // namespace keel::planning
