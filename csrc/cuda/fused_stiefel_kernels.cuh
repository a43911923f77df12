// Stiefel blocks on CUDA (SPEC §2): one thread steps one p x n block of a kItemStiefel item
// (fused_stiefel_plan.h), up to kBlock blocks per CTA, in the row kernels' launches.
//
// Per block, the formulas of core/stiefel.h as the CPU kernel (stiefel_cpu.cpp) uses them:
// xi = Z - sym(Z Wb^T) Wb (Wb = W / rho), ||xi||^2; d = s_G xi; momentum as the rows
// (row_math.h momentum_step); y = W - lr u; the orthonormal factor of y (QR with positive
// diagonal, or the polar factor by a Jacobi eigen-decomposition of y y^T) times rho; the
// momentum transported by projection at the new point. Written only when the result is
// finite (else the block is left unchanged and reported, as on the CPU); a non-finite
// gradient in an adaptive group holds the whole group.
//
// The blocks of 1x1 and 3x3 convolution kernels are sized at compile time, in per-thread
// arrays (registers where ptxas keeps them, else local memory); other sizes work in the
// block's scratch region of the workspace (fused_stiefel_plan.h: stiefel_fixed_size), which
// only this thread touches (plain loads and stores). Accesses to w, g, m are element by
// element (the blocks are short and rarely 16-byte aligned); a warp's 32 blocks are adjacent
// in memory, so each load instruction's lines are reused by the next ones from L1.
#pragma once

#include "../core/stiefel.h"
#include "fused_stiefel_plan.h"

// The Stiefel item is a call, not inlined into step_block: its per-thread arrays and Jacobi
// sweeps get their own registers and stack frame, and the row items keep theirs.
#if defined(__CUDACC__)
#define MSGD_DEV_CALL __device__ __noinline__
#else
#define MSGD_DEV_CALL inline
#endif

namespace msgd {
namespace cuda {

// A Stiefel item's tier lists its blocks as a team item's kind lists its rows (item_row).
static_assert(int(kStiefelRange) == int(kItemRange) && int(kStiefelGroups) == int(kItemGroups) &&
                  int(kStiefelSlice) == int(kItemGroupSlice),
              "item_row reads a Stiefel item's tier as a team item's kind");

// Storage of one block's work: arrays of P*N (fixed sizes) or pointers into the scratch.
template <typename A, int P, int N>
struct StiefelWork {
  A w[P * N] = {}, z[P * N] = {}, m[P * N] = {}, y[P * N] = {}, s[P * P] = {}, x[3 * P * P + P * N] = {};
  MSGD_DEV StiefelWork(unsigned char*, int64_t, int64_t) {}
};
template <typename A>
struct StiefelWork<A, 0, 0> {  // the scratch: W, xi, m, y (len each), the polar work (3 p^2 + len), sym (p^2)
  A *w, *z, *m, *y, *x, *s;
  MSGD_DEV StiefelWork(unsigned char* base, int64_t len, int64_t p)
      : w(reinterpret_cast<A*>(base)), z(w + len), m(z + len), y(m + len), x(y + len), s(x + 3 * p * p + len) {}
};

template <typename T, int P, int N, int Phase>
MSGD_DEV void stiefel_blocks(const Params<typename Traits<T>::A>& p, const Item& it,
                             Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  const Workspace<A> ws(p);
  const int t = simt::tid();
  const int64_t* e = p.table + int64_t(it.tensor) * kTensorFields;
  const int64_t len = P ? int64_t(P) * N : e[kRowLen];
  const int pb = P ? P : int(e[kBlockRows]);
  const int64_t n = P ? int64_t(N) : len / pb;
  const bool fresh = (e[kFlags] & kMomentumFresh) != 0;
  const bool active = t < it.count;

  const ItemRow ir = item_row(p, it, it.tier, t, active);
  const int64_t row = ir.row;
  const auto at = tensor_at<T>(e, row * len);

  // the block's work: registers/local arrays, or its scratch region
  StiefelWork<A, P, N> wk(p.ws + it.slot + (active ? int64_t(t) * it.split * int64_t(sizeof(A)) : 0), len, pb);

  const float* radius = reinterpret_cast<const float*>(e[kRadius]);
  const A rho = (radius && active) ? A(radius[row]) : A(1);
  const A inv_rho = A(1) / rho;
  A sq = 0;
  bool dir_ok = false;
  if (active) {
    A bad = 0;
    for (int64_t k = 0; k < len; ++k) {
      wk.w[k] = sload<false>(at.w, k);
      const A gk = sload<true>(at.g, k);
      wk.z[k] = gk;
      bad += gk - gk;
    }
    stiefel_project(wk.z, wk.w, pb, n, inv_rho, wk.s);
    for (int64_t k = 0; k < len; ++k) sq += wk.z[k] * wk.z[k];
    dir_ok = bad == A(0) && std::isfinite(sq);
  }

  A scale = A(1);
  bool group_ok = true;
  if (it.tier != kStiefelRange) {
    if (Phase == 1) {  // a slice of a large group: publish the block, then arrive at the group
      if (active) publish_row(ws, ir.pos, sq, dir_ok);
      arrive_group(p, ws, it.group, uint32_t(it.count), sm);
      return;
    }
    if (it.tier == kStiefelGroups) {  // whole groups in this CTA: s_G in the group's order
      cta_group_scale(p, sm, active, t, sq, dir_ok, ir, scale, group_ok);
    } else {  // phase 2 of a slice: s_G from phase 1
      scale = ws.group_scale[it.group];
      group_ok = ws.group_ok[it.group] != 0;
    }
  }
  if constexpr (Phase == 2) {
    if (!active) return;  // no barrier follows
    if (!dir_ok || !group_ok) {
      report_skip(p.report, it.tensor, row);
      return;
    }
    const bool has_m = at.m != nullptr;
    for (int64_t k = 0; k < len; ++k) {
      const A d = scale * wk.z[k];
      A u = d;
      if (has_m) {
        A mk = fresh ? A(0) : simt::ldg(at.m + k);
        u = momentum_step(d, mk, p.mu, fresh, p.nesterov != 0);
        wk.m[k] = mk;
      }
      wk.y[k] = wk.w[k] - p.lr * u;
    }
    bool ok = p.polar ? stiefel_polar(wk.y, pb, n, wk.x) : stiefel_qr(wk.y, pb, n);
    if (ok) {
      A check = 0;
      for (int64_t k = 0; k < len; ++k) {
        wk.y[k] *= rho;
        check += wk.y[k] - wk.y[k];
      }
      if (has_m) {
        stiefel_project(wk.m, wk.y, pb, n, inv_rho, wk.s);
        for (int64_t k = 0; k < len; ++k) check += wk.m[k] - wk.m[k];
      }
      ok = check == A(0);
    }
    if (!ok) {
      report_skip(p.report, it.tensor, row);
      return;
    }
    const SR sr = rounding(e, row * len);
    for (int64_t k = 0; k < len; ++k) sstore(at.w, k, wk.y[k], sr);
    if (has_m)
      for (int64_t k = 0; k < len; ++k) simt::stg(at.m + k, wk.m[k]);
  }
}

// One kItemStiefel item (phases 1 and 2): the fixed-size paths (1x1, 3x3), else the scratch path.
template <typename T, int Phase>
MSGD_DEV_CALL void stiefel_item(const Params<typename Traits<T>::A>& p, const Item& it,
                           Smem<typename Traits<T>::A>& sm) {
  if (it.split == 0) {
    if (p.table[int64_t(it.tensor) * kTensorFields + kBlockRows] == 1)
      return stiefel_blocks<T, 1, 1, Phase>(p, it, sm);
    return stiefel_blocks<T, 3, 3, Phase>(p, it, sm);
  }
  stiefel_blocks<T, 0, 0, Phase>(p, it, sm);
}

}  // namespace cuda
}  // namespace msgd
