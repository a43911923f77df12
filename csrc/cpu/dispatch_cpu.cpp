// Picks the CPU kernel variant once: AVX2+FMA where the processor has them (and the
// build made that variant), else the baseline build of the same source.
#include "adam_cpu.h"
#include "fused_step_cpu.h"

namespace msgd {

namespace {
bool has_avx2_variant() {
#if defined(MSGD_HAVE_AVX2_VARIANT)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace

const char* cpu_variant() { return has_avx2_variant() ? "avx2" : "generic"; }

void fused_step_cpu(const int64_t* table, int64_t n_tensors, const int64_t* groups,
                    int64_t n_groups, const int64_t* row_index, DType dtype,
                    const StepOptions& opt, int64_t* report, int num_threads) {
#if defined(MSGD_HAVE_AVX2_VARIANT)
  if (has_avx2_variant())
    return fused_step_cpu_avx2(table, n_tensors, groups, n_groups, row_index, dtype, opt, report,
                               num_threads);
#endif
  fused_step_cpu_generic(table, n_tensors, groups, n_groups, row_index, dtype, opt, report,
                         num_threads);
}

void fused_adam_cpu(const int64_t* table, int64_t n_tensors, DType dtype, const StepOptions& opt,
                    int64_t* report, int num_threads) {
#if defined(MSGD_HAVE_AVX2_VARIANT)
  if (has_avx2_variant()) return fused_adam_cpu_avx2(table, n_tensors, dtype, opt, report, num_threads);
#endif
  fused_adam_cpu_generic(table, n_tensors, dtype, opt, report, num_threads);
}

}  // namespace msgd
