// Stiefel blocks on the CPU (SPEC §2): the tangent direction needs the whole p x n block,
// so each block is staged in a per-thread scratch in the math type and stepped there with
// the small-block formulas of core/stiefel.h. The row kernel (fused_step_cpu.cpp) hands
// this unit the Stiefel groups; each of its threads owns one StiefelStepper.
#pragma once

#include <cstdint>
#include <vector>

#include "../core/step.h"
#include "tensor_view.h"

namespace msgd {
namespace MSGD_CPU_NS {

template <typename T>
class StiefelStepper {
  using A = typename Math<T>::type;

 public:
  explicit StiefelStepper(const StepOptions& opt) : opt_(opt) {}

  // Blocks rows[0 .. count) of tensor v, one group: with an adaptive step they share s_G
  // and a bad block holds the group. Blocks left unchanged are added to `report`, the
  // tensor's report row.
  void run_group(const TensorView<T>& v, const int64_t* rows, int64_t count, int64_t* report);

 private:
  const StepOptions& opt_;
  // the staged block: wb_ = W, xi_ = its Riemannian gradient; small_ the p x p work;
  // y_ and mnew_ the new W and m before they are known to be finite
  Vec<A> wb_, xi_, small_, y_, mnew_;

  bool stage(const Row<T>& x, int p, A rho, A& sq);
  bool move(const TensorView<T>& v, const Row<T>& x, A s, A rho, int64_t r);
  void store_block(const TensorView<T>& v, T* w, const A* y, int64_t len, int64_t r) const;
};

extern template class StiefelStepper<float>;
extern template class StiefelStepper<double>;
extern template class StiefelStepper<bf16>;
extern template class StiefelStepper<fp16>;

}  // namespace MSGD_CPU_NS
}  // namespace msgd
