#include "fused_adam_launch.cuh"

namespace msgd {
namespace cuda {
template void launch_adam_step<float>(const HostPlan&, const int64_t*, const void*, void*, int64_t*, const StepOptions&,
                                   cudaStream_t);
}  // namespace cuda
}  // namespace msgd
