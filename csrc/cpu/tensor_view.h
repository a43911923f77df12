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

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "../core/dtypes.h"
#include "../core/step.h"
#include "../core/stochastic_round.h"
#include "parallel.h"

#ifndef MSGD_CPU_VARIANT
#define MSGD_CPU_VARIANT generic
#endif
#define MSGD_CAT2(a, b) a##b
#define MSGD_CAT(a, b) MSGD_CAT2(a, b)
#define MSGD_CPU_NS MSGD_CAT(cpu_, MSGD_CPU_VARIANT)

namespace msgd {
namespace MSGD_CPU_NS {

// std::vector with an allocator type of this variant: the vector's out-of-line members (and
// the algorithms run on its iterators) are then this variant's own symbols. With
// std::allocator, the AVX2 build's copies of std::vector<double>::... could stand in for the
// baseline build's at link time (they are the same template instances), and run AVX2
// instructions on a processor without them.
template <typename T>
struct VariantAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = VariantAllocator<U>;
  };
  VariantAllocator() = default;
  template <typename U>
  VariantAllocator(const VariantAllocator<U>&) {}
};
template <typename T>
using Vec = std::vector<T, VariantAllocator<T>>;

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
  bool columns;          // kColumns: row i is column i of the row-major (row_len x rows) matrix
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
        columns((e[kFlags] & kColumns) != 0),
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

// ---- column rows (kColumns) ------------------------------------------------------------
// A column tensor is stepped in tiles of adjacent columns: each tile is gathered into a
// thread's scratch as ordinary rows (tile x row_len, row-major, in cache), stepped by the
// row code, and scattered back; memory sees each element read and written once, as for rows.

// Columns [c0, c0 + n) of the row-major (len x cols) matrix `src` as the rows of dst (n x len).
template <typename X>
void gather_columns(const X* __restrict src, int64_t cols, int64_t len, int64_t c0, int64_t n,
                    X* __restrict dst) {
  constexpr int64_t kAhead = 16;  // rows of the matrix prefetched ahead (the stride defeats the hardware's)
  for (int64_t j = 0; j < len; ++j) {
    const X* s = src + j * cols + c0;
#if defined(__GNUC__)
    if (j + kAhead < len) {
      const char* a = reinterpret_cast<const char*>(s + kAhead * cols);
      for (int64_t b = 0; b < n * int64_t(sizeof(X)); b += 64) __builtin_prefetch(a + b, 0, 0);
    }
#endif
    for (int64_t r = 0; r < n; ++r) dst[r * len + j] = s[r];
  }
}

// The inverse: rows of src (n x len) back to columns [c0, c0 + n) of dst (len x cols).
template <typename X>
void scatter_columns(const X* __restrict src, int64_t cols, int64_t len, int64_t c0, int64_t n,
                     X* __restrict dst) {
  for (int64_t j = 0; j < len; ++j) {
    X* d = dst + j * cols + c0;
    for (int64_t r = 0; r < n; ++r) d[r] = src[r * len + j];
  }
}

// Columns per tile: 64 (a tile's row of the matrix is 128-512 adjacent bytes). Each row of
// the matrix is a page-sized stride from the next, so a tile's gather touches one line per
// page of every array: wide tiles amortise those page walks and line misses (16-column
// tiles measured several times slower); the tile's rows then run from L2.
template <typename T>
int64_t column_tile(int64_t) {
  return 64;
}

// A thread's scratch for one tile: w, g, m (and Adam's element-wise v) as ordinary rows.
template <typename T>
struct ColumnScratch {
  using A = typename Math<T>::type;
  Vec<T> w, g;
  Vec<A> m, v;
};

// The view of columns [c0, c0 + n) of column tensor v as ordinary rows in `s` (its w and g
// gathered; m gathered when `read_m`, which a tile that is scattered back needs even when
// the step does not read m: a skipped column's m goes back as it was): rows 0..n-1 of the
// result are columns c0.. of v, with
// their radii and the rounding bits of their index in W^T (the key moved by c0 * row_len
// elements, as sr_bits16 counts them).
template <typename T>
TensorView<T> gather_tile(const TensorView<T>& v, int64_t c0, int64_t n, bool read_m, ColumnScratch<T>& s) {
  const size_t size = size_t(n * v.row_len);
  if (s.w.size() < size) { s.w.resize(size); s.g.resize(size); }
  gather_columns(v.w, v.rows, v.row_len, c0, n, s.w.data());
  gather_columns(v.g, v.rows, v.row_len, c0, n, s.g.data());
  TensorView<T> x = v;
  x.columns = false;
  x.rows = n;
  x.w = s.w.data();
  x.g = s.g.data();
  if (v.m) {
    if (s.m.size() < size) s.m.resize(size);
    if (read_m) gather_columns<typename Math<T>::type>(v.m, v.rows, v.row_len, c0, n, s.m.data());
    x.m = s.m.data();
  }
  if (v.radius) x.radius = v.radius + c0;
  x.round_key = v.round_key + uint64_t(c0) * uint64_t(v.row_len) * 0x9E3779B97F4A7C15ull;
  return x;
}

// Writes a stepped tile's w and m back to its columns.
template <typename T>
void scatter_tile(const TensorView<T>& v, const TensorView<T>& x, int64_t c0) {
  scatter_columns(x.w, v.rows, v.row_len, c0, x.rows, v.w);
  if (v.m) scatter_columns<typename Math<T>::type>(x.m, v.rows, v.row_len, c0, x.rows, v.m);
}

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

// Each thread's own skip report rows, merged after the step (the result does not depend on
// how the work was split).
class ThreadReports {
 public:
  ThreadReports(int num_threads, int64_t n_tensors) : n_tensors_(n_tensors) {
    reports_.resize(size_t(std::max(1, num_threads)));
    for (auto& rep : reports_) {  // an empty report: no row skipped, first skipped row -1
      rep.assign(size_t(n_tensors) * kReportFields, 0);
      for (int64_t t = 0; t < n_tensors; ++t) rep[size_t(t * kReportFields + kFirstSkippedRow)] = -1;
    }
  }
  int64_t* of(int thread) { return reports_[size_t(thread)].data(); }
  void merge_into(int64_t* report) const {
    for (int64_t t = 0; t < n_tensors_; ++t) {
      int64_t* out = report + t * kReportFields;
      out[kSkippedRows] = 0;
      out[kFirstSkippedRow] = -1;
      for (const auto& rep : reports_) {
        const int64_t* in = rep.data() + t * kReportFields;
        merge_skip_report(out, in[kSkippedRows], in[kFirstSkippedRow]);
      }
    }
  }

 private:
  int64_t n_tensors_;
  Vec<Vec<int64_t>> reports_;
};

// Runs fn(thread, u0, u1) over units (each with a `cost` in elements) split into contiguous
// ranges of about equal cost, one per thread; fewer threads where the work is small.
template <typename Unit, typename Fn>
void parallel_units(const Vec<Unit>& units, int num_threads, Fn fn) {
  Vec<int64_t> cost(units.size() + 1, 0);
  for (size_t i = 0; i < units.size(); ++i) cost[i + 1] = cost[i] + units[i].cost;
  const int64_t total = cost.back();
  constexpr int64_t kMinPerThread = 1 << 15;  // elements; below this a thread costs more than it saves
  int nt = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kMinPerThread)));
  nt = int(std::min<int64_t>(nt, std::max<int64_t>(int64_t(units.size()), 1)));
  Vec<size_t> bounds(size_t(nt) + 1, units.size());
  bounds[0] = 0;
  for (int i = 1; i < nt; ++i)
    bounds[size_t(i)] = size_t(std::lower_bound(cost.begin(), cost.end(), total * i / nt) - cost.begin());
  parallel_run(nt, [&](int i) { fn(i, bounds[size_t(i)], bounds[size_t(i) + 1]); });
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
