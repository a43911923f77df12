#pragma once

#include <cstdint>
#include <string>

#include "../core/step.h"
#include "fused_adam_plan.h"
#include "fused_step_plan.h"

namespace msgd {

// One fused step over every row of every tensor of a bucket on a CUDA device
// (SPEC §3), with the same tables as fused_step_cpu, but resident on the device:
// `table_dev` (n_tensors x kTensorFields, the per-step addresses and flags
// already uploaded), `plan_dev` (the plan's blob, uploaded once), `workspace`
// (plan.layout.ws_bytes, zeroed once when allocated, reused by every step).
// `report` (device, n_tensors x kReportFields) is accumulated, not reset: skipped
// rows are added to column kSkippedRows and the smallest skipped row is kept in
// kFirstSkippedRow (-1 for none), so the caller resets it when it reads it.
// A tensor flagged kStochasticRound (bf16 only) has its new weights rounded
// stochastically with the bits of its kRoundingKey and each element's index.
// opt.algorithm picks the step: SGD (a plan of build_plan) or the Adam family (SPEC §6; a plan of
// build_adam_plan, with each tensor's second moment and step count in the table).
// Launches 1 to 3 kernels on `stream` (a cudaStream_t), after one cudaMemsetAsync
// of the completion counters when phase 1 runs; never synchronises. Throws
// std::runtime_error when the memset or a launch fails (a fault inside a kernel
// surfaces later, in whichever CUDA call comes next).
// The CUDA version the installed driver supports (cudaDriverGetVersion: 0 without
// a driver) and that of the runtime linked into this module (cudaRuntimeGetVersion),
// as 1000 * major + 10 * minor. Creates no context and needs no GPU. Returns an
// error description, or an empty string.
std::string cuda_versions(int* driver, int* runtime);

void fused_step_cuda(const cuda::HostPlan& plan, const int64_t* table_dev, const void* plan_dev,
                     void* workspace, int64_t* report, const StepOptions& opt, int device, void* stream);

}  // namespace msgd
