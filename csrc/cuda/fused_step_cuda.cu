// Host entry of the fused CUDA step: picks the dtype's launcher (one file per
// dtype, fused_step_cuda_<dtype>.cu) on the caller's device and stream.
#include "fused_step_cuda.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace msgd {
namespace cuda {
template <typename T>
void launch_fused_step(const HostPlan& plan, const int64_t* table_dev, const void* plan_dev, void* workspace,
                       int64_t* report, const StepOptions& opt, cudaStream_t stream);
template <typename T>  // the Adam family (fused_adam_cuda_<dtype>.cu)
void launch_adam_step(const HostPlan& plan, const int64_t* table_dev, const void* plan_dev, void* workspace,
                      int64_t* report, const StepOptions& opt, cudaStream_t stream);
}  // namespace cuda

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("manifold_sgd CUDA step: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launches and restores the caller's device.
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
struct Type {
  using type = T;
};

// f(Type<T>{}) with T the storage type of `dtype` (one launcher per type and file).
template <typename F>
void with_storage_type(DType dtype, F f) {
  switch (dtype) {
    case DType::Float32: return f(Type<float>{});
    case DType::Float64: return f(Type<double>{});
    case DType::BFloat16: return f(Type<bf16>{});
    case DType::Float16: return f(Type<fp16>{});
  }
  throw std::invalid_argument("manifold_sgd CUDA step: unknown dtype");
}

}  // namespace

std::string cuda_versions(int* driver, int* runtime) {
  *driver = 0;
  *runtime = 0;
  std::string err;
  const cudaError_t e1 = cudaDriverGetVersion(driver);
  if (e1 != cudaSuccess) {
    *driver = 0;
    err = std::string("cudaDriverGetVersion: ") + cudaGetErrorString(e1);
  }
  const cudaError_t e2 = cudaRuntimeGetVersion(runtime);
  if (e2 != cudaSuccess) {
    *runtime = 0;
    err += (err.empty() ? "" : "; ") + std::string("cudaRuntimeGetVersion: ") + cudaGetErrorString(e2);
  }
  return err;
}

void fused_step_cuda(const cuda::HostPlan& plan, const int64_t* table_dev, const void* plan_dev,
                     void* workspace, int64_t* report, const StepOptions& opt, int device, void* stream) {
  if (plan.n_tensors == 0) return;
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  with_storage_type(DType(plan.layout.dtype), [&](auto type) {
    using T = typename decltype(type)::type;
    if (opt.algorithm == Algorithm::Adam)
      cuda::launch_adam_step<T>(plan, table_dev, plan_dev, workspace, report, opt, s);
    else
      cuda::launch_fused_step<T>(plan, table_dev, plan_dev, workspace, report, opt, s);
  });
}

}  // namespace msgd
