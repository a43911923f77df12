// A row's dot products read with the row (RowDotsPass) and the prefetch of the row read next:
// the first pass of the two-pass form (row_math.h), shared by the SGD step (fused_step_cpu.cpp)
// and the Adam step (adam_cpu.cpp). Included by sources compiled once per instruction set, so
// everything here lives in the variant's namespace (tensor_view.h).
#pragma once

#include <cstring>
#include <type_traits>

#include "../core/row_math.h"
#include "tensor_view.h"

namespace msgd {
namespace MSGD_CPU_NS {

using RowDotsD = double;  // reductions and per-row coefficients

// Prefetches elements [i0, i1) of row x's w, g and m. Always inlined: GCC may take a called
// function that only prefetches for one without side effects and drop the call.
template <typename T>
MSGD_INLINE void prefetch_chunk(const Row<T>& x, int64_t i0, int64_t i1) {
#if defined(__GNUC__)
  using A = typename Math<T>::type;
  constexpr int64_t kLine = 64;
  const char* pw = reinterpret_cast<const char*>(x.w);
  const char* pg = reinterpret_cast<const char*>(x.g);
  const char* pm = reinterpret_cast<const char*>(x.m);
  for (int64_t b = i0 * int64_t(sizeof(T)); b < i1 * int64_t(sizeof(T)); b += kLine) {
    __builtin_prefetch(pw + b, 0, 3);
    __builtin_prefetch(pg + b, 0, 3);
  }
  if (pm)
    for (int64_t b = i0 * int64_t(sizeof(A)); b < i1 * int64_t(sizeof(A)); b += kLine)
      __builtin_prefetch(pm + b, 0, 3);
#else
  (void)x; (void)i0; (void)i1;
#endif
}

// Prefetches row x's share of a pass over elements [c0, c1) of another row of n elements: the
// same fraction of x, so that a row of another length is prefetched along the whole pass.
template <typename T>
MSGD_INLINE void prefetch_share(const Row<T>& x, int64_t c0, int64_t c1, int64_t n) {
  prefetch_chunk(x, c0 * x.n / n, (c1 * x.n + n - 1) / n);
}

// A row's dot products <w,w>, <w,g>, <g,g> (and <w,m>, <g,m>, <m,m> with kReadM).
template <typename T>
struct RowDotsPass {
  using A = typename Math<T>::type;

  // Sums in the math type over blocks of kBlock elements (full-width SIMD), added up in
  // double across blocks: long rows keep double-like accuracy at float speed.
  // Each block also prefetches its share of `next`, the row read after this one.
  static constexpr int64_t kBlock = 256;

  // One block of at most kBlock elements of a row's dot products, summed in the math type
  // and added to `r` in double. Element i goes to lane i % kLanes and the lanes are added
  // in a fixed order at the end, so the sums are the same bits whatever the instruction
  // set (the compiler turns the lane loop into vector registers). The block boundaries
  // depend on the row alone, so a row's sums are the same bits whichever schedule reads it.
  // (An `omp simd reduction` here kept its six accumulators on the stack: six stores per
  // vector of elements, which made the pass store-bound.)
  static constexpr int kLanes = 32 / int(sizeof(A));
#if defined(__GNUC__)
  typedef A Lanes __attribute__((vector_size(32)));
#else
  struct Lanes {  // the same lanes, element by element
    A v[kLanes] = {};
    A& operator[](int l) { return v[l]; }
    A operator[](int l) const { return v[l]; }
    Lanes operator*(const Lanes& o) const { Lanes r; for (int l = 0; l < kLanes; ++l) r.v[l] = v[l] * o.v[l]; return r; }
    Lanes& operator+=(const Lanes& o) { for (int l = 0; l < kLanes; ++l) v[l] += o.v[l]; return *this; }
    Lanes operator-(const Lanes& o) const { Lanes r; for (int l = 0; l < kLanes; ++l) r.v[l] = v[l] - o.v[l]; return r; }
  };
#endif
  template <typename X>
  static void load_lanes(Lanes& v, const X* p, int64_t i) {  // (by reference: no vector ABI)
    if constexpr (std::is_same<X, A>::value) {
      std::memcpy(&v, p + i, sizeof(v));
    } else {
      for (int l = 0; l < kLanes; ++l) v[l] = load(p, i + l);
    }
  }

  // Prefetches the line of `p` that holds element i when the vector of elements [i, i +
  // kLanes) starts in it, so that a block's loop spreads its prefetches over its iterations.
  template <typename X>
  MSGD_INLINE static void prefetch_lane_line(const X* p, int64_t i) {
#if defined(__GNUC__)
    if (((i * int64_t(sizeof(X))) & 63) < kLanes * int64_t(sizeof(X))) __builtin_prefetch(p + i, 0, 3);
#else
    (void)p; (void)i;
#endif
  }

  template <bool kReadM, bool kWG = true>
  static void dots_block(const T* __restrict w, const T* __restrict g, const A* __restrict m,
                         int64_t b0, int64_t b1, RowDots<RowDotsD>& r, const Row<T>* pf = nullptr) {
    Lanes ww{}, wg{}, wm{}, gg{}, gm{}, mm{};
    int64_t i = b0;
    auto lanes_step = [&](int64_t at) MSGD_INLINE_LAMBDA {
      Lanes wi, gi;
      load_lanes(wi, w, at);
      load_lanes(gi, g, at);
      if (kWG) {
        ww += wi * wi;
        wg += wi * gi;
        gg += gi * gi;
      }
      if (kReadM) {
        Lanes mi;
        load_lanes(mi, m, at);
        wm += wi * mi;
        gm += gi * mi;
        mm += mi * mi;
      }
    };
    if (pf) {  // the lines of pf's elements [b0, b1) prefetched along the loop
      for (; i + kLanes <= b1; i += kLanes) {
        prefetch_lane_line(pf->w, i);
        prefetch_lane_line(pf->g, i);
        if (pf->m) prefetch_lane_line(pf->m, i);
        lanes_step(i);
      }
    }
    for (; i + kLanes <= b1; i += kLanes) lanes_step(i);
    for (int l = 0; i < b1; ++l, ++i) {  // the tail: element i still goes to lane i % kLanes
      const A wi = load(w, i), gi = load(g, i);
      if (kWG) {
        ww[l] += wi * wi;
        wg[l] += wi * gi;
        gg[l] += gi * gi;
      }
      if (kReadM) {
        const A mi = m[i];
        wm[l] += wi * mi;
        gm[l] += gi * mi;
        mm[l] += mi * mi;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      if (kWG) { r.ww += RowDotsD(ww[l]); r.wg += RowDotsD(wg[l]); r.gg += RowDotsD(gg[l]); }
      if (kReadM) { r.wm += RowDotsD(wm[l]); r.gm += RowDotsD(gm[l]); r.mm += RowDotsD(mm[l]); }
    }
  }

  // A non-finite g makes <g, g> non-finite; so does a finite g whose square overflows, and
  // such a row could not be stepped either (its direction's norm overflows the same way).
  static void finish_dots(RowDots<RowDotsD>& r) { r.bad = r.gg - r.gg; }

  template <bool kReadM>
  static RowDots<RowDotsD> dots(const T* __restrict w, const T* __restrict g, const A* __restrict m,
                         int64_t n, const Row<T>* next) {
    RowDots<RowDotsD> r;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
      if (next) prefetch_share(*next, b0, b1, n);
      dots_block<kReadM>(w, g, m, b0, b1, r);
    }
    finish_dots(r);
    return r;
  }

  // The m dots <w,m>, <g,m>, <m,m> of a row whose <w,w>, <w,g>, <g,g> (and `bad`) `r`
  // already holds from a pass without m: the same blocks and lanes as dots<true>, so the
  // result is the same bits as dots<true> of the row.
  static void add_m_dots(const T* __restrict w, const T* __restrict g, const A* __restrict m,
                         int64_t n, RowDots<RowDotsD>& r) {
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
      dots_block<true, false>(w, g, m, b0, b1, r);
    }
  }
};

}  // namespace MSGD_CPU_NS
}  // namespace msgd
