// The launcher of one dtype's Adam-family kernels (SPEC §6); each fused_adam_cuda_<dtype>.cu
// instantiates it once, beside the SGD step's fused_step_cuda_<dtype>.cu.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>

#include "fused_adam_kernels.cuh"
#include "fused_step_launch.cuh"

namespace msgd {
namespace cuda {

// One CTA of kBlock threads per item, as the SGD kernels (same register budget).
template <typename T, int Phase>
__global__ void __launch_bounds__(kBlock, 1) fused_adam_kernel(const AdamParams<typename Traits<T>::A> p) {
  __shared__ Smem<typename Traits<T>::A> sm;
  adam_block<T, Phase>(p, int64_t(blockIdx.x), sm);
}

// As launch_fused_step: 1 to 3 launches on `stream`, after one cudaMemsetAsync of the
// completion counters when phase 1 runs (split rows); errors of a launch raise at once.
template <typename T>
void launch_adam_step(const HostPlan& plan, const int64_t* table_dev, const void* plan_dev, void* workspace,
                      int64_t* report, const StepOptions& opt, cudaStream_t stream) {
  using A = typename Traits<T>::A;
  if (!plan.adam) throw std::runtime_error("manifold_sgd CUDA step: the plan was not built for the Adam step");
  const AdamParams<A> p = make_adam_params<A>(plan, table_dev, plan_dev, workspace, report, opt);
  void (*const kernels[3])(AdamParams<A>) = {fused_adam_kernel<T, 1>, fused_adam_kernel<T, 2>,
                                                    fused_adam_kernel<T, 3>};
  launch_phases(plan, p, p.p.ws, kernels, "the Adam phase ", stream);
}

}  // namespace cuda
}  // namespace msgd
