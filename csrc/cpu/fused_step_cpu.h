#pragma once

#include <cstdint>

#include "../core/step.h"

namespace msgd {

// One fused step over every row of every tensor in the table (SPEC §3).
// Tables must have passed validate_tables. `report` has kReportFields int64
// per tensor. Work is split over `num_threads` threads by bytes; the result
// does not depend on the thread count.
void fused_step_cpu(const int64_t* table, int64_t n_tensors, const int64_t* groups,
                    int64_t n_groups, const int64_t* row_index, DType dtype,
                    const StepOptions& opt, int64_t* report, int num_threads);

}  // namespace msgd
