// The CUDA plan's Stiefel items (SPEC §2 Stiefel blocks of p <= kMaxStiefelRows rows): the
// work list of one Stiefel tensor, added by build_plan (fused_step_plan.h, which declares
// plan_stiefel_tensor and includes this file at its end).
//
// One thread steps one p x n block (in per-thread arrays for the fixed sizes of
// fused_stiefel_kernels.cuh, 1x1 and 3x3, else in a per-block scratch region of the workspace). An item
// (kind kItemStiefel) holds up to kBlock blocks of one tensor; its `tier` field says which:
//   kStiefelRange   (2)     `count` consecutive blocks from `row` (no adaptive step)
//   kStiefelGroups  (2)     whole adaptive groups of <= kBlock blocks packed into one CTA
//                           (TeamSlots from `pos`): s_G summed on chip in the group's order
//   kStiefelSlice   (1, 2)  a slice of a larger adaptive group (row_index from `pos`): phase 1
//                           publishes each block's ||xi||^2 and arrives at group `group`
//                           (the completing CTA combines it), phase 2 steps with s_G
// `split`: the per-block scratch size in math-type elements (0: the block fits registers);
// `slot`: the byte offset in the workspace of the item's first block's scratch (patched by
// build_plan once the workspace layout is known).
#pragma once

#include <string>
#include <vector>

#include "../core/stiefel.h"
#include "fused_step_plan.h"

namespace msgd {
namespace cuda {

// Whether the kernels hold a p x n block in per-thread arrays (fixed-size code paths: 1x1 and
// 3x3 conv kernels), else the block works in its scratch region of the workspace. Larger fixed
// sizes would put kilobytes of per-thread stack on the kernel (5x5 double: 2 KB), and the
// driver reserves stack for every resident thread of the GPU.
MSGD_HD constexpr bool stiefel_fixed_size(int64_t p, int64_t n) { return p == n && (p == 1 || p == 3); }

// Scratch per block (math-type elements) for the sizes without a fixed-size path: W, xi, m,
// the moved y, sym(Z W^T) and the polar factor's work (3 p^2 + p n).
MSGD_HD constexpr int64_t stiefel_scratch_elems(int64_t p, int64_t n) {
  return stiefel_fixed_size(p, n) ? 0 : 5 * p * n + 4 * p * p;
}

inline std::string plan_stiefel_tensor(const StepTables& tables, int64_t t, bool grp,
                                       const std::vector<int64_t>& groups_of_t, std::vector<Item>* items,
                                       std::vector<TeamSlot>& slots, bool& need_rows, int64_t& scratch_elems) {
  const int64_t* e = tables.table + t * kTensorFields;
  const int64_t rows = e[kRows], len = e[kRowLen], p = e[kBlockRows];
  if (p < 1 || p > kMaxStiefelRows || len % p != 0 || len / p < p)
    return "tensor " + std::to_string(t) + ": Stiefel blocks of " + std::to_string(p) + " rows (row length " +
           std::to_string(len) + ") have no CUDA kernel (p <= " + std::to_string(kMaxStiefelRows) +
           " and p <= n only); they take the reference path";
  if (e[kFlags] & kColumns)
    return "tensor " + std::to_string(t) + ": column Stiefel blocks have no CUDA kernel; they take the reference path";
  const int64_t per_block = stiefel_scratch_elems(p, len / p);
  auto add = [&](int ph, Item it, int64_t blocks) {
    it.split = per_block;
    it.slot = per_block ? scratch_elems : 0;  // elements for now; build_plan makes it bytes
    scratch_elems += per_block * blocks;
    items[ph].push_back(it);
  };
  if (!grp) {
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t c = std::min<int64_t>(kBlock, rows - r0);
      add(1, Item{kItemStiefel, kStiefelRange, int32_t(t), int32_t(c), r0, -1, -1, 0, 0, 0}, c);
    }
    return {};
  }
  const bool sliced = pack_groups(
      tables, groups_of_t, kBlock, slots,
      [&](int64_t first, int64_t count) {
        add(1, Item{kItemStiefel, kStiefelGroups, int32_t(t), int32_t(count), 0, -1, first, 0, 0, 0}, count);
      },
      [&](int64_t k, int64_t pos, int64_t count) {
        Item it{kItemStiefel, kStiefelSlice, int32_t(t), int32_t(count), 0, k, pos, 0, 0, 0};
        add(1, it, count);
        it.split = items[1].back().split;
        it.slot = items[1].back().slot;  // phase 1 works in the same scratch
        items[0].push_back(it);
      });
  need_rows = need_rows || sliced;
  return {};
}

}  // namespace cuda
}  // namespace msgd
