// What the CPU kernel's units share: a tensor-table row decoded once (TensorView), a row's
// pointers (Row), stochastic rounding of a row's new bf16 weights, the skip report rule and
// the group scale rule.
//
// The CPU kernel's sources are compiled once per instruction set (MSGD_CPU_VARIANT, see
// CMakeLists.txt and dispatch_cpu.cpp). Everything they define with external linkage lives
// in a namespace named after the variant, so the variants' copies (the same code built with
// and without AVX2+FMA, which contracts multiply-adds: other bits) never stand in for one
// another at link time.
#pragma once

#include <cstdint>

#include "../core/dtypes.h"
#include "../core/step.h"
#include "../core/stochastic_round.h"

#ifndef MSGD_CPU_VARIANT
#define MSGD_CPU_VARIANT generic
#endif
#define MSGD_CAT2(a, b) a##b
#define MSGD_CAT(a, b) MSGD_CAT2(a, b)
#define MSGD_CPU_NS MSGD_CAT(cpu_, MSGD_CPU_VARIANT)

namespace msgd {
namespace MSGD_CPU_NS {

template <typename T>
struct Row {
  T* w;
  const T* g;
  typename Math<T>::type* m;  // null without momentum
  int64_t n;
};

// One row of the tensor table (step.h, TensorField), decoded.
template <typename T>
struct TensorView {
  using A = typename Math<T>::type;

  Kind kind;
  bool fresh;            // kMomentumFresh: the first step sets m = d
  const float* radius;   // per-row radius, null for radius 1
  bool round;            // kStochasticRound (bf16 only, validated)
  uint64_t round_key;    // its key
  int64_t rows, row_len;
  int block_rows;        // Stiefel: rows p of each p x (row_len / p) block
  T* w;
  const T* g;
  A* m;                  // null without momentum

  explicit TensorView(const int64_t* e)
      : kind(Kind(e[kKind])),
        fresh((e[kFlags] & kMomentumFresh) != 0),
        radius(reinterpret_cast<const float*>(e[kRadius])),
        round((e[kFlags] & kStochasticRound) != 0),
        round_key(uint64_t(e[kRoundingKey])),
        rows(e[kRows]),
        row_len(e[kRowLen]),
        block_rows(int(e[kBlockRows])),
        w(reinterpret_cast<T*>(e[kParam])),
        g(reinterpret_cast<const T*>(e[kGrad])),
        m(reinterpret_cast<A*>(e[kMomentum])) {}

  Row<T> row(int64_t r) const {
    return {w + r * row_len, g + r * row_len, m ? m + r * row_len : nullptr, row_len};
  }
};

// Stochastic rounding of one row's new bf16 weights (stochastic_round.h): the tensor's key
// and the tensor-wide index of the row's first element.
struct RoundingRow {
  uint64_t key;
  int64_t base;
};

inline void store_rounded(bf16* p, int64_t i, float v, const RoundingRow& sr) {
  p[i] = to_bf16_stochastic(v, sr_bits16(sr.key, uint64_t(sr.base + i)));
}

// Adds `skipped` rows, the first of them `first`, to a report row (kReportFields): counts
// add, the smallest first skipped row stays. One skipped row, or a thread's whole report.
inline void merge_skip_report(int64_t* out, int64_t skipped, int64_t first) {
  if (skipped == 0) return;
  if (out[kSkippedRows] == 0 || first < out[kFirstSkippedRow]) out[kFirstSkippedRow] = first;
  out[kSkippedRows] += skipped;
}

// SPEC §3 step 2 for one group of `count` rows (or Stiefel blocks): R_G^2 is the sum of the
// rows' ||g~||^2 in the group's row order, sq(j, out) giving row j's (the order fixes the
// bits, so every schedule sums through here). A row whose sq returns false holds the
// group: returns false, s untouched.
template <typename S, typename SqOf>
bool group_scale(const StepOptions& opt, int64_t count, SqOf sq, S& s) {
  S sum_sq = 0;
  for (int64_t j = 0; j < count; ++j) {
    S x = 0;
    if (!sq(j, x)) return false;
    sum_sq += x;
  }
  s = adaptive_scale(opt.adaptive, sum_sq, S(opt.curvature), S(opt.distance));
  return true;
}

}  // namespace MSGD_CPU_NS
}  // namespace msgd
