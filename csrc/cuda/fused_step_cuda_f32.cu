#include "fused_step_launch.cuh"

namespace msgd {
namespace cuda {
template void launch_fused_step<float>(const HostPlan&, const int64_t*, const void*, void*, int64_t*,
                                    const StepOptions&, cudaStream_t);
}  // namespace cuda
}  // namespace msgd
