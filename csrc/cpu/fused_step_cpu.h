#pragma once

#include <cstdint>

#include "../core/step.h"

namespace msgd {

// One fused step over every row of every tensor in the table (SPEC §3).
// Tables must have passed validate_tables. `report` has kReportFields int64
// per tensor. Work is split over `num_threads` threads by bytes; the result
// does not depend on the thread count. Dispatches to the best compiled variant.
void fused_step_cpu(const int64_t* table, int64_t n_tensors, const int64_t* groups,
                    int64_t n_groups, const int64_t* row_index, DType dtype,
                    const StepOptions& opt, int64_t* report, int num_threads);

// The instruction-set variant fused_step_cpu runs on this processor ("avx2" or "generic").
const char* cpu_variant();

// The variants (fused_step_cpu.cpp compiled once per instruction set).
void fused_step_cpu_generic(const int64_t*, int64_t, const int64_t*, int64_t, const int64_t*,
                            DType, const StepOptions&, int64_t*, int);
void fused_step_cpu_avx2(const int64_t*, int64_t, const int64_t*, int64_t, const int64_t*, DType,
                         const StepOptions&, int64_t*, int);

}  // namespace msgd
