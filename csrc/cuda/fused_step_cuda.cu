// Host launcher of the fused CUDA step: one kernel per phase, one CTA per work
// item of the plan (fused_step_plan.h); the bodies are in fused_step_kernels.cuh.
#include "fused_step_cuda.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fused_step_kernels.cuh"

namespace msgd {
namespace {

using cuda::kBlock;

// Register budget: 512 threads, one CTA per SM at least, so <= 128 registers.
template <typename T, int Phase>
__global__ void __launch_bounds__(kBlock, 1)
    fused_step_kernel(const cuda::Params<typename cuda::Traits<T>::A> p) {
  __shared__ cuda::Smem<typename cuda::Traits<T>::A> sm;
  cuda::step_block<T, Phase>(p, int64_t(blockIdx.x), sm);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("manifold_sgd CUDA step: ") + what + ": " +
                             cudaGetErrorString(err));
}

// Restores the caller's current device on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device >= 0 && device != prev_) {
      check(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

template <typename T>
void launch(const cuda::HostPlan& plan, const int64_t* table_dev, const void* plan_dev,
            void* workspace, int64_t* report, const StepOptions& opt, bool stochastic, uint64_t seed,
            uint64_t step, cudaStream_t stream) {
  using A = typename cuda::Traits<T>::A;
  cuda::Params<A> p{};
  p.table = table_dev;
  p.blob = static_cast<const unsigned char*>(plan_dev);
  p.ws = static_cast<unsigned char*>(workspace);
  p.report = report;
  p.L = plan.layout;
  p.lr = A(opt.lr);
  p.mu = A(opt.momentum);
  p.wd = A(opt.weight_decay);
  p.curvature = A(opt.curvature);
  p.distance = A(opt.distance);
  p.psi_max_norm = A(opt.psi_max_norm);
  p.adaptive = int(opt.adaptive);
  p.nesterov = opt.nesterov ? 1 : 0;
  p.stochastic = stochastic ? 1 : 0;
  p.seed = seed;
  p.step = step;
  const int64_t* n = plan.layout.n_items;
  for (int ph = 0; ph < 3; ++ph)
    if (n[ph] > INT32_MAX) throw std::runtime_error("manifold_sgd CUDA step: too many work items");
  if (n[0] > 0) {
    fused_step_kernel<T, 1><<<unsigned(n[0]), kBlock, 0, stream>>>(p);
    check(cudaGetLastError(), "launch of phase 1");
  }
  if (n[1] > 0) {
    fused_step_kernel<T, 2><<<unsigned(n[1]), kBlock, 0, stream>>>(p);
    check(cudaGetLastError(), "launch of phase 2");
  }
  if (n[2] > 0) {
    fused_step_kernel<T, 3><<<unsigned(n[2]), kBlock, 0, stream>>>(p);
    check(cudaGetLastError(), "launch of phase 3");
  }
}

}  // namespace

void fused_step_cuda(const cuda::HostPlan& plan, const int64_t* table_dev, const void* plan_dev,
                     void* workspace, int64_t* report, const StepOptions& opt, bool stochastic_rounding,
                     uint64_t seed, uint64_t step, int device, void* stream) {
  if (plan.n_tensors == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (DType(plan.layout.dtype)) {
    case DType::Float32:
      return launch<float>(plan, table_dev, plan_dev, workspace, report, opt, stochastic_rounding, seed, step, s);
    case DType::Float64:
      return launch<double>(plan, table_dev, plan_dev, workspace, report, opt, stochastic_rounding, seed, step, s);
    case DType::BFloat16:
      return launch<bf16>(plan, table_dev, plan_dev, workspace, report, opt, stochastic_rounding, seed, step, s);
    case DType::Float16:
      return launch<fp16>(plan, table_dev, plan_dev, workspace, report, opt, stochastic_rounding, seed, step, s);
  }
  throw std::runtime_error("manifold_sgd CUDA step: unknown dtype");
}

}  // namespace msgd
