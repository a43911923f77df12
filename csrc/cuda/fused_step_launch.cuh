// The launcher of one dtype's kernels; each fused_step_cuda_<dtype>.cu
// instantiates it once, so the four dtypes compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fused_step_cuda.h"
#include "fused_step_kernels.cuh"

namespace msgd {
namespace cuda {

// One CTA of kBlock threads per item. Register budget: one CTA per SM at least,
// so at most 128 registers a thread (ptxas -v: no spills at K = 16 / 8).
template <typename T, int Phase>
__global__ void __launch_bounds__(kBlock, 1) fused_step_kernel(const Params<typename Traits<T>::A> p) {
  __shared__ Smem<typename Traits<T>::A> sm;
  step_block<T, Phase>(p, int64_t(blockIdx.x), sm);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("manifold_sgd CUDA step: ") + what + ": " + cudaGetErrorString(err));
}

// The launches of one step, SGD's or Adam's: `kernels[ph]` over plan.layout.n_items[ph] CTAs of
// kBlock threads for each phase that has items, in order, on `stream`. Completion counters exist
// only with phase 1 (pre-pass groups, split rows). The CTA that completes a group or row resets
// its counter, but a step that failed part way would leave one nonzero and every later step
// would then combine too early (stale group scales, silently): they are cleared on the stream
// first (cudaMemsetAsync, capture-safe). Launch errors (bad configuration, a sticky error of an
// earlier fault) are checked after each launch, named "launch of <phase><1|2|3>"; a fault inside
// a kernel is asynchronous and shows up in a later CUDA call (csrc/cuda/README.md, "Errors").
template <typename P>
void launch_phases(const HostPlan& plan, const P& p, unsigned char* workspace, void (*const (&kernels)[3])(P),
                   const char* phase, cudaStream_t stream) {
  const int64_t* n = plan.layout.n_items;
  for (int ph = 0; ph < 3; ++ph)
    if (n[ph] > 0x7fffffff) throw std::runtime_error("manifold_sgd CUDA step: too many work items");
  if (n[0] > 0) {
    const int64_t counters = plan.layout.split_row - plan.layout.group_count;
    if (counters > 0)
      check_cuda(cudaMemsetAsync(workspace + plan.layout.group_count, 0, size_t(counters), stream),
                 "clearing the completion counters (cudaMemsetAsync)");
  }
  for (int ph = 0; ph < 3; ++ph) {
    if (n[ph] <= 0) continue;
    kernels[ph]<<<unsigned(n[ph]), kBlock, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) check_cuda(err, (std::string("launch of ") + phase + std::to_string(ph + 1)).c_str());
  }
}

template <typename T>
void launch_fused_step(const HostPlan& plan, const int64_t* table_dev, const void* plan_dev, void* workspace,
                       int64_t* report, const StepOptions& opt, cudaStream_t stream) {
  using A = typename Traits<T>::A;
  const Params<A> p = make_params<A>(plan, table_dev, plan_dev, workspace, report, opt);
  void (*const kernels[3])(Params<A>) = {fused_step_kernel<T, 1>, fused_step_kernel<T, 2>,
                                                fused_step_kernel<T, 3>};
  launch_phases(plan, p, p.ws, kernels, "phase ", stream);
}

}  // namespace cuda
}  // namespace msgd
