// The CUDA plan of the Adam family's step (SPEC §6): the SGD plan's work list (fused_step_plan.h)
// built without adaptive groups, plus a workspace region of its own for the split rows' partial
// sums (Adam's second phase combines up to 7 sums per chunk where SGD's combine 4). Host only.
//
// Items and launches are those of the SGD plan without groups: Range items (rows that fit a
// team) in the main phase; a row longer than a tier-4 team holds is split in chunks over up to
// three launches (pre-pass, main, and a finish pass for sphere rows).
#pragma once

#include <string>

#include "fused_step_plan.h"

namespace msgd {
namespace cuda {

// Math-type values per chunk in the Adam plan's partial-sum region.
constexpr int kAdamPartial = 8;

// Builds the plan of an Adam step. The tables must have passed validate_tables with Adam options
// (no PSI rows, first and second moments present). Returns an error message, or "" on success.
inline std::string build_adam_plan(const StepTables& tables, HostPlan& out) {
  // the Adam kernels step rows only: column rows (granularity "column") take the reference path
  for (int64_t t = 0; t < tables.n_tensors; ++t)
    if (tables.table[t * kTensorFields + kFlags] & kColumns)
      return "tensor " + std::to_string(t) + ": column rows (granularity 'column') have no Adam CUDA kernel yet; "
             "they take the reference path";
  for (int64_t t = 0; t < tables.n_tensors; ++t)  // the Stiefel items are the SGD kernels' only
    if (Kind(tables.table[t * kTensorFields + kKind]) == Kind::Stiefel)
      return "tensor " + std::to_string(t) +
             ": Stiefel blocks have no CUDA kernel for ManifoldAdam yet; they take the reference path";
  std::string err = build_plan(tables, false, out);
  if (!err.empty()) return err;
  PlanLayout& L = out.layout;
  const int64_t A = math_bytes(DType(tables.dtype));
  out.adam = true;
  out.adam_partial = detail::align16(L.ws_bytes);
  L.ws_bytes = std::max<int64_t>(detail::align16(out.adam_partial + L.n_chunks * kAdamPartial * A), 16);
  return {};
}

// The per-step guard of an Adam step: the table's static columns still match the plan, and every
// tensor has its moments and a step count. Returns an error message or "".
inline std::string check_adam_step_table(const HostPlan& plan, const int64_t* table, int64_t n_tensors,
                                         const StepOptions& opt) {
  if (!plan.adam || opt.algorithm != Algorithm::Adam)
    return "the plan and the options are for different algorithms (sgd vs adam): build the plan for the step";
  if (n_tensors != plan.n_tensors) return "the table has a different number of tensors than the plan";
  return check_table_tensors(plan, table, n_tensors, [](const int64_t* e) -> const char* {
    if (!e[kMomentum] || !e[kSecondMoment]) return "Adam needs first and second moment buffers";
    if (e[kStepCount] < 1) return "Adam's step count must be >= 1";
    return nullptr;
  });
}

}  // namespace cuda
}  // namespace msgd
