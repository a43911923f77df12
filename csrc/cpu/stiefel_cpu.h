// Stiefel blocks on the CPU (SPEC §2): the tangent direction needs the whole p x n block.
// Small blocks (p * n <= kLaneElems) are stepped several at a time, one block per lane of a
// SIMD vector: a batch of blocks is gathered into a per-thread structure-of-arrays scratch
// (element e of every block in one vector), stepped there by the small-block formulas of
// core/stiefel.h written over vectors (sizes fixed at compile time for 1x1, 3x3, 5x5, 7x7
// kernels), and scattered back; 8 consecutive 3x3 float blocks (72 contiguous floats) are
// gathered and scattered by vector loads and an in-register transpose. The polar factor of a
// 3x3 block is Newton's iteration on the block (the Gram/Jacobi route where a block is near
// the rank tolerance or does not converge). Each lane does the same operations whatever the other lanes
// hold, so a block's result does not depend on the batch it falls in. Larger blocks are
// staged one at a time and stepped by core/stiefel.h itself. The row kernel
// (fused_step_cpu.cpp) hands this unit runs of Stiefel groups; each of its threads owns one
// StiefelStepper.
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

  // Groups [k0, k1) of the group table (kGroupFields per group, rows in row_index), all of
  // tensor v: with an adaptive step a group's blocks share s_G and a bad block holds the
  // group. Blocks left unchanged are added to `report`, the tensor's report row.
  void run_groups(const TensorView<T>& v, const int64_t* groups, const int64_t* row_index,
                  int64_t k0, int64_t k1, int64_t* report);
  // Blocks [r0, r1) of tensor v in memory order, no adaptive step (groups do not matter).
  void run_rows(const TensorView<T>& v, int64_t r0, int64_t r1, int64_t* report);

 private:
  const StepOptions& opt_;
  // the lane path: blocks to step, their scales; per-block results of the scale pass
  Vec<int64_t> blocks_;
  Vec<A> scale_, sq_;
  Vec<char> ok_;
  Vec<A> lanes_;  // the structure-of-arrays scratch (aligned inside)

  void run_group(const TensorView<T>& v, const int64_t* rows, int64_t count, int64_t* report);

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
