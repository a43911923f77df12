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

#if defined(__SSE2__)
#include <immintrin.h>
#endif

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

#if defined(__GNUC__)
#define MSGD_INLINE inline __attribute__((always_inline))
#define MSGD_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list
#else
#define MSGD_INLINE inline
#define MSGD_INLINE_LAMBDA
#endif

// Transposes, in blocks of kB x kB elements held in vector registers: dst[c * ds + r] =
// src[r * ss + c] for r < nr, c < nc (strides in elements). A column gather copied element
// by element (a strided store each) took most of a column step's time; by blocks, a tile's
// gather and scatter cost about what the row code on the tile costs.
template <size_t kSize>
struct BlockTranspose {  // any element of kSize bytes: element by element, in 8 x 8 blocks
  static constexpr int64_t kB = 8;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    for (int64_t r = 0; r < kB; ++r)
      for (int64_t c = 0; c < kB; ++c) d[c * ds + r] = s[r * ss + c];
  }
};

#if defined(__SSE2__)
template <>
struct BlockTranspose<2> {  // bf16, fp16: 8 x 8 in eight 128-bit registers
  static constexpr int64_t kB = 8;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    __m128i r[8], a[8], b[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ss));
    for (int i = 0; i < 8; i += 2) {
      a[i] = _mm_unpacklo_epi16(r[i], r[i + 1]);
      a[i + 1] = _mm_unpackhi_epi16(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4)
      for (int k = 0; k < 2; ++k) {
        b[h + 2 * k] = _mm_unpacklo_epi32(a[h + k], a[h + k + 2]);
        b[h + 2 * k + 1] = _mm_unpackhi_epi32(a[h + k], a[h + k + 2]);
      }
    // b[0..3]: columns (0,1), (2,3), (4,5), (6,7) of rows 0-3; b[4..7]: of rows 4-7
    for (int k = 0; k < 4; ++k) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (2 * k) * ds), _mm_unpacklo_epi64(b[k], b[k + 4]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (2 * k + 1) * ds), _mm_unpackhi_epi64(b[k], b[k + 4]));
    }
  }
};
#endif

#if defined(__AVX__)
template <>
struct BlockTranspose<4> {  // float: 8 x 8 in eight 256-bit registers
  static constexpr int64_t kB = 8;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(s + i * ss));
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {  // u[h + k]: columns k | k + 4 of rows h..h+3
      u[h + 0] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(reinterpret_cast<float*>(d + k * ds), _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
      _mm256_storeu_ps(reinterpret_cast<float*>(d + (k + 4) * ds), _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
  }
};

template <>
struct BlockTranspose<8> {  // double: 4 x 4 in four 256-bit registers
  static constexpr int64_t kB = 4;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    __m256d r[4], t[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_pd(reinterpret_cast<const double*>(s + i * ss));
    t[0] = _mm256_unpacklo_pd(r[0], r[1]);  // columns 0 | 2 of rows 0, 1
    t[1] = _mm256_unpackhi_pd(r[0], r[1]);  // columns 1 | 3
    t[2] = _mm256_unpacklo_pd(r[2], r[3]);
    t[3] = _mm256_unpackhi_pd(r[2], r[3]);
    _mm256_storeu_pd(reinterpret_cast<double*>(d), _mm256_permute2f128_pd(t[0], t[2], 0x20));
    _mm256_storeu_pd(reinterpret_cast<double*>(d + ds), _mm256_permute2f128_pd(t[1], t[3], 0x20));
    _mm256_storeu_pd(reinterpret_cast<double*>(d + 2 * ds), _mm256_permute2f128_pd(t[0], t[2], 0x31));
    _mm256_storeu_pd(reinterpret_cast<double*>(d + 3 * ds), _mm256_permute2f128_pd(t[1], t[3], 0x31));
  }
};
#elif defined(__SSE2__)
template <>
struct BlockTranspose<4> {  // float: 4 x 4 in four 128-bit registers
  static constexpr int64_t kB = 4;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    __m128 r[4], t[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm_loadu_ps(reinterpret_cast<const float*>(s + i * ss));
    t[0] = _mm_unpacklo_ps(r[0], r[1]);  // a00 a10 a01 a11
    t[1] = _mm_unpacklo_ps(r[2], r[3]);  // a20 a30 a21 a31
    t[2] = _mm_unpackhi_ps(r[0], r[1]);  // a02 a12 a03 a13
    t[3] = _mm_unpackhi_ps(r[2], r[3]);  // a22 a32 a23 a33
    _mm_storeu_ps(reinterpret_cast<float*>(d), _mm_movelh_ps(t[0], t[1]));
    _mm_storeu_ps(reinterpret_cast<float*>(d + ds), _mm_movehl_ps(t[1], t[0]));
    _mm_storeu_ps(reinterpret_cast<float*>(d + 2 * ds), _mm_movelh_ps(t[2], t[3]));
    _mm_storeu_ps(reinterpret_cast<float*>(d + 3 * ds), _mm_movehl_ps(t[3], t[2]));
  }
};

template <>
struct BlockTranspose<8> {  // double: 2 x 2 in two 128-bit registers
  static constexpr int64_t kB = 2;
  template <typename X>
  MSGD_INLINE static void block(const X* __restrict s, int64_t ss, X* __restrict d, int64_t ds) {
    const __m128d r0 = _mm_loadu_pd(reinterpret_cast<const double*>(s));
    const __m128d r1 = _mm_loadu_pd(reinterpret_cast<const double*>(s + ss));
    _mm_storeu_pd(reinterpret_cast<double*>(d), _mm_unpacklo_pd(r0, r1));
    _mm_storeu_pd(reinterpret_cast<double*>(d + ds), _mm_unpackhi_pd(r0, r1));
  }
};
#endif

// dst[c * ds + r] = src[r * ss + c] for r < nr, c < nc: whole blocks, the edges element by
// element. The blocks go in the order of the matrix's rows (kSrcIsMatrix: src's, the gather;
// else dst's, the scatter), 64 bytes' worth of them at a time, so that each scratch row is
// read or written a whole cache line at a time; the matrix's rows kAhead ahead are
// prefetched (they are a matrix row apart, which defeats the hardware's prefetcher).
template <bool kSrcIsMatrix, typename X>
void transpose(const X* __restrict src, int64_t ss, X* __restrict dst, int64_t ds, int64_t nr, int64_t nc) {
  using K = BlockTranspose<sizeof(X)>;
  constexpr int64_t kB = K::kB;
  constexpr int64_t kO = std::max<int64_t>(kB, 64 / int64_t(sizeof(X)));  // a multiple of kB
  constexpr int64_t kAhead = 3 * kO;  // a DRAM latency's worth of blocks ahead, or more
  const int64_t outer = kSrcIsMatrix ? nr : nc, inner = kSrcIsMatrix ? nc : nr;
  const int64_t inner_full = inner - inner % kB;
  auto at = [&](int64_t o, int64_t i) {
    const int64_t r = kSrcIsMatrix ? o : i, c = kSrcIsMatrix ? i : o;
    dst[c * ds + r] = src[r * ss + c];
  };
  for (int64_t oo = 0; oo < outer; oo += kO) {
    const int64_t oe = std::min(outer, oo + kO);
    const int64_t of = oe - (oe - oo) % kB;  // [oo, of): rows of whole blocks
#if defined(__GNUC__)
    for (int64_t o = oo + kAhead; o < std::min(outer, oe + kAhead); ++o) {
      const char* a = kSrcIsMatrix ? reinterpret_cast<const char*>(src + o * ss)
                                   : reinterpret_cast<const char*>(dst + o * ds);
      // into L2, not non-temporal: the gathered lines of w and m are written by the scatter
      for (int64_t b = 0; b < inner * int64_t(sizeof(X)); b += 64) __builtin_prefetch(a + b, kSrcIsMatrix ? 0 : 1, 2);
    }
#endif
    for (int64_t i0 = 0; i0 < inner_full; i0 += kB)
      for (int64_t o0 = oo; o0 < of; o0 += kB) {
        const int64_t r0 = kSrcIsMatrix ? o0 : i0, c0 = kSrcIsMatrix ? i0 : o0;
        K::block(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds);
      }
    for (int64_t o = oo; o < oe; ++o)  // the edges
      for (int64_t i = o < of ? inner_full : 0; i < inner; ++i) at(o, i);
  }
}

// Columns [c0, c0 + n) of the row-major (len x cols) matrix `src` as the rows of dst (n x len).
template <typename X>
void gather_columns(const X* __restrict src, int64_t cols, int64_t len, int64_t c0, int64_t n,
                    X* __restrict dst) {
  transpose<true>(src + c0, cols, dst, len, len, n);
}

// The inverse: rows of src (n x len) back to columns [c0, c0 + n) of dst (len x cols).
template <typename X>
void scatter_columns(const X* __restrict src, int64_t cols, int64_t len, int64_t c0, int64_t n,
                     X* __restrict dst) {
  transpose<false>(src, len, dst + c0, cols, n, len);
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
