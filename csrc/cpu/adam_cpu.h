#pragma once

#include <cstdint>

#include "../core/step.h"

namespace msgd {

// One fused Adam-family step (SPEC §6; opt.algorithm == Adam) over every row of every tensor in
// the table (rows of every kind but PSI; Stiefel blocks included). Tables must have passed
// validate_tables. `report` has kReportFields int64 per tensor. Work is split over
// `num_threads` threads by bytes; the result does not depend on the thread count. Dispatches to
// the best compiled variant, like fused_step_cpu.
void fused_adam_cpu(const int64_t* table, int64_t n_tensors, DType dtype, const StepOptions& opt,
                    int64_t* report, int num_threads);

// The variants (adam_cpu.cpp compiled once per instruction set).
void fused_adam_cpu_generic(const int64_t*, int64_t, DType, const StepOptions&, int64_t*, int);
void fused_adam_cpu_avx2(const int64_t*, int64_t, DType, const StepOptions&, int64_t*, int);

}  // namespace msgd
