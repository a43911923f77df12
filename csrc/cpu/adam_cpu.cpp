// The fused CPU step of the Adam family (SPEC §6) on the same tables as the SGD step.
//
// Rows are independent (Adam has no adaptive groups), so every tensor is stepped row by row in
// memory order, in row chunks shared among threads. Each row's first pass reads it from memory
// while it prefetches the next row of its chunk (an element-v row: while its second and write
// passes compute, see Ahead); the later passes read it from cache. What a row reads and writes:
//   Euclidean (AdamW, v per element): a vectorised check of g (its square must be finite;
//     it brings g into cache and prefetches w, m, v), then one vectorised pass updates m, v
//     and w element by element: w, g, m, v read once, w, m, v written.
//   sphere, v per row: the SGD kernel's two-pass form (row_math.h, row_dots.h): one pass for
//     the six dot products of w, g, m, then the row's new v, the scalar k of the
//     bias-corrected step and the finish coefficients; one pass writes w and m (the update
//     m' = b1 m + (1 - b1) d, y = w - lr k m' is linear in w, d, m, so the norms the
//     retraction and transport need follow from the dots). The bytes of SGD with momentum:
//     w, g, m read once, w and m written.
//   sphere, v per element: the direction u_hat = m'/(sqrt(v') + eps) is not linear in the row,
//     so after the pass for <w,w>, <w,g> a second pass forms m', v', u_hat block by block into
//     per-thread scratch (the row is in cache) and sums, in lanes, the dots the tangent
//     projection, retraction and transport need; a third writes w, m, v. The bytes of AdamW:
//     w, g, m, v read once, w, m, v written. From cache the second pass is bound by its
//     multiplies and adds (one vsqrtps and one vdivps per vector of lanes, like AdamW's,
//     are not the limit), so it does only the ones the results need.
//   Stiefel blocks (p x n, one per table row): staged in per-thread scratch in the math type
//     and stepped with the block formulas of core/stiefel.h (projection, QR or polar
//     retraction, transport by projection), v one per block or per element.
//
// Compiled once per instruction set, like fused_step_cpu.cpp (MSGD_CPU_VARIANT). Sums keep a
// fixed lane order (row_dots.h), so the variants differ only where AVX2 contracts a
// multiply-add.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../core/row_math.h"
#include "../core/stiefel.h"
#include "adam_cpu.h"
#include "row_dots.h"
#include "tensor_view.h"

namespace msgd {
namespace MSGD_CPU_NS {
namespace {

using D = double;  // reductions and per-row coefficients

// A tensor-table row decoded once, with Adam's columns.
template <typename T>
struct AdamTensor : TensorView<T> {
  using A = typename Math<T>::type;
  A* v;        // second moment
  bool row_v;  // one v per row
  D bc1, bc2;  // 1 - beta^t

  AdamTensor(const int64_t* e, const StepOptions& opt)
      : TensorView<T>(e), v(reinterpret_cast<A*>(e[kSecondMoment])),
        row_v(row_second_moment(Kind(e[kKind]), opt.second_moment)),
        bc1(1 - std::pow(opt.beta1, D(e[kStepCount]))), bc2(1 - std::pow(opt.beta2, D(e[kStepCount]))) {}

  // Row r's v: its one value, or its first element.
  A* v_of(int64_t r) const { return row_v ? v + r : v + r * this->row_len; }
};

// Prefetches elements [i0, i1) of a row's w, g and m (row_dots.h) and, when not null, of its
// per-element v.
//
// The prefetch helpers here are always inlined: GCC takes a function that only prefetches for
// one without side effects and drops the calls to it (a called helper left no prefetch
// instruction in the build at all); inlined into a loop that loads and stores, they stay.
template <typename T>
MSGD_INLINE void prefetch_adam_chunk(const Row<T>& x, const typename Math<T>::type* v, int64_t i0, int64_t i1) {
  prefetch_chunk(x, i0, i1);
#if defined(__GNUC__)
  using A = typename Math<T>::type;
  const char* pv = reinterpret_cast<const char*>(v);
  if (pv)
    for (int64_t b = i0 * int64_t(sizeof(A)); b < i1 * int64_t(sizeof(A)); b += 64) __builtin_prefetch(pv + b, 0, 3);
#endif
}

// Prefetches the cache line that holds p.
MSGD_INLINE void prefetch_line(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// The row read after this one, to prefetch (w, g, m and, with element v, v); none at a chunk's end.
template <typename T>
struct Ahead {
  using A = typename Math<T>::type;
  Row<T> row{};
  const A* v = nullptr;
  bool on = false;
  MSGD_INLINE void prefetch(int64_t i0, int64_t i1) const {
    if (on) prefetch_adam_chunk(row, v, i0, i1);
  }
  // An element-v row interleaves the next row's prefetch with its own arithmetic, one line at
  // a time: the lines of w and g during its second pass, of m and v during its write pass.
  // Its passes are bound by arithmetic from cache, so the loads overlap them (without, the
  // row waited for memory, then computed). Measured slower: a block's lines at once at the
  // start of a block, prefetching in the first pass, and two rows ahead.
  static constexpr int64_t kLineT = 64 / int64_t(sizeof(T)), kLineA = 64 / int64_t(sizeof(A));
  // Element i of the next row's w and g, when i starts a line's worth of elements.
  MSGD_INLINE void prefetch_wg_line(int64_t i) const {
    if (on && (i & (kLineT - 1)) == 0) {
      prefetch_line(row.w + i);
      prefetch_line(row.g + i);
    }
  }
  // Element i of the next row's m and v (element v), when i starts a line's worth of elements.
  MSGD_INLINE void prefetch_mv_line(int64_t i) const {
    if (on && (i & (kLineA - 1)) == 0) {
      prefetch_line(row.m + i);
      prefetch_line(v + i);
    }
  }
};

// A new weight, rounded to nearest or (kRound: bf16 tensors that ask for it) stochastically.
template <bool kRound, typename T, typename A>
inline void store_w(T* w, int64_t i, A value, [[maybe_unused]] const RoundingRow& sr) {
  if constexpr (kRound && std::is_same<T, bf16>::value) store_rounded(w, i, value, sr);
  else store(w, i, value);
}

template <typename T>
class AdamWorker {
  using A = typename Math<T>::type;
  using Dots = RowDotsPass<T>;
  static constexpr int64_t kBlock = Dots::kBlock;
  static constexpr int kLanes = Dots::kLanes;
  using Lanes = typename Dots::Lanes;

 public:
  AdamWorker(const StepOptions& opt, int64_t* report) : opt_(opt), report_(report) {}

  void run_rows(int64_t t, const AdamTensor<T>& x, int64_t r0, int64_t r1) {
    const bool element_v = x.kind != Kind::Euclidean && !x.row_v;
    for (int64_t r = r0; r < r1; ++r) {
      Ahead<T> next;
      if (r + 1 < r1) {
        next.row = x.row(r + 1);
        next.v = x.kind == Kind::Euclidean || element_v ? x.v_of(r + 1) : nullptr;
        next.on = true;
      }
      bool ok;
      if (x.kind == Kind::Stiefel) ok = stiefel_block(x, r);
      else if (x.kind == Kind::Euclidean) ok = rounded(x) ? adamw_row<true>(x, r, next) : adamw_row<false>(x, r, next);
      else if (x.row_v) ok = rounded(x) ? sphere_row_v<true>(x, r, next) : sphere_row_v<false>(x, r, next);
      else ok = rounded(x) ? sphere_element_v<true>(x, r, next) : sphere_element_v<false>(x, r, next);
      if (!ok) skip(t, r);
    }
  }

 private:
  const StepOptions& opt_;
  int64_t* report_;  // this thread's own report rows
  Vec<A> mh_, vh_, uh_;  // element-v scratch: m', v', u_hat of one row
  Vec<A> sw_, sg_, su_, sm_, sv_, small_;  // Stiefel scratch: w, g~, u (then y), m', v', p x p work

  void skip(int64_t t, int64_t r) { merge_skip_report(report_ + t * kReportFields, 1, r); }

  static bool rounded(const AdamTensor<T>& x) {
    if constexpr (std::is_same<T, bf16>::value) return x.round;
    return false;
  }

  // A row's dots pass (row_dots.h), prefetching `next` block by block.
  template <bool kReadM>
  static RowDots<D> dots(const Row<T>& x, const Ahead<T>& next) {
    RowDots<D> rd;
    for (int64_t b0 = 0; b0 < x.n; b0 += kBlock) {
      const int64_t b1 = std::min(x.n, b0 + kBlock);
      next.prefetch(b0, b1);
      Dots::template dots_block<kReadM>(x.w, x.g, x.m, b0, b1, rd);
    }
    Dots::finish_dots(rd);
    return rd;
  }

  // AdamW on a Euclidean row: w <- w (1 - lr wd) - lr (m'/bc1) / (sqrt(v'/bc2) + eps).
  template <bool kRound>
  bool adamw_row(const AdamTensor<T>& x, int64_t r, const Ahead<T>& next) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    T* __restrict w = row.w;
    const T* __restrict g = row.g;
    A* __restrict m = row.m;
    A* __restrict v = x.v_of(r);
    // The check reads g (into cache) block by block while w, m, v of this row stream in.
    const Ahead<T> self{Row<T>{w, g, m, n}, v, true};
    A bad = 0;  // NaN when some g, or its square, is not finite
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = std::min(n, b0 + kBlock);
      self.prefetch(b0, b1);
#pragma omp simd reduction(+ : bad)
      for (int64_t i = b0; i < b1; ++i) {
        const A gi = load(g, i);
        bad += gi * gi - gi * gi;
      }
    }
    if (bad != A(0)) return false;
    const A b1 = x.fresh ? A(0) : A(opt_.beta1), c1 = A(1 - opt_.beta1);
    const A b2 = x.fresh ? A(0) : A(opt_.beta2), c2 = A(1 - opt_.beta2);
    const A step = A(opt_.lr / x.bc1), inv_sqrt_bc2 = A(1 / std::sqrt(x.bc2)), eps = A(opt_.eps);
    const A decay = A(1 - opt_.lr * opt_.weight_decay);
    const RoundingRow sr{x.round_key, r * n};
    for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
      const int64_t c1e = std::min(n, c0 + kBlock);
      next.prefetch(c0, c1e);
      if (x.fresh) {
#pragma omp simd
        for (int64_t i = c0; i < c1e; ++i) {
          const A gi = load(g, i);
          const A mi = c1 * gi;
          const A vi = c2 * gi * gi;
          store_w<kRound>(w, i, load(w, i) * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps), sr);
          m[i] = mi;
          v[i] = vi;
        }
      } else {
#pragma omp simd
        for (int64_t i = c0; i < c1e; ++i) {
          const A gi = load(g, i);
          const A mi = b1 * m[i] + c1 * gi;
          const A vi = b2 * v[i] + c2 * gi * gi;
          store_w<kRound>(w, i, load(w, i) * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps), sr);
          m[i] = mi;
          v[i] = vi;
        }
      }
    }
    return true;
  }

  // <w, d>, <d, d>, <d, m> summed element by element (the row is in cache): where the closed
  // forms from the (w, g, m) dots would cancel.
  static void explicit_dots(const T* w, const T* g, const A* m, int64_t n, D a, D b, DirDots<D>& q) {
    D wd = 0, dd = 0, dm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const D wi = D(load(w, i)), di = a * D(load(g, i)) + b * wi;
      wd += wi * di;
      dd += di * di;
      if (m) dm += di * D(m[i]);
    }
    q.wd = wd; q.dd = dd; q.dm = dm;
  }

  // Elements [c0, c1) of a row-v sphere row's write: d, m' = am m + ad d, y = w - lrk m',
  // then w <- ff y, m <- m' + fq y.
  template <bool kReadM, bool kRound>
  static void row_v_write(T* __restrict w, const T* __restrict g, A* __restrict m, int64_t c0, int64_t c1,
                          A a, A b, A am, A ad, A lrk, A ff, A fq, const RoundingRow& sr) {
#pragma omp simd
    for (int64_t i = c0; i < c1; ++i) {
      const A wi = load(w, i);
      const A di = a * load(g, i) + b * wi;
      const A mi = kReadM ? am * m[i] + ad * di : ad * di;
      const A yi = wi - lrk * mi;
      store_w<kRound>(w, i, ff * yi, sr);
      m[i] = mi + fq * yi;
    }
  }

  // Sphere row, one v per row: m' = b1 m + (1 - b1) d, v' = b2 v + (1 - b2) ||d||^2,
  // y = w - lr k m' with k = 1 / (bc1 (sqrt(v'/bc2) + eps)); w <- rho y/||y||, m <- T(m').
  template <bool kRound>
  bool sphere_row_v(const AdamTensor<T>& x, int64_t r, const Ahead<T>& next) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    const bool read_m = !x.fresh;
    const RowDots<D> rd = read_m ? dots<true>(row, next) : dots<false>(row, next);
    const Direction<D> d = row_direction(Kind::Sphere, rd, D(0));
    if (!d.ok) return false;
    bool cancels = false;
    DirDots<D> q = direction_dots(rd, d.a, d.b, cancels);
    if (cancels) explicit_dots(row.w, row.g, read_m ? row.m : nullptr, n, d.a, d.b, q);
    const D v_old = x.fresh ? D(0) : D(x.v[r]);
    const D v_new = opt_.beta2 * v_old + (1 - opt_.beta2) * q.dd;
    const D k = 1 / (x.bc1 * (std::sqrt(v_new / x.bc2) + opt_.eps));
    const D cm = x.fresh ? D(0) : opt_.beta1, cd = 1 - opt_.beta1;  // m' = cm m + cd d
    const D yd = -opt_.lr * k * cd, ym = -opt_.lr * k * cm;          // y = w + yd d + ym m
    const D yy = gram(q, D(1), yd, ym, D(1), yd, ym);
    const D y_m = gram(q, D(1), yd, ym, D(0), cd, cm);
    const D mm = gram(q, D(0), cd, cm, D(0), cd, cm);
    const D rho = x.radius ? D(x.radius[r]) : D(1);
    const Finish<D> f = row_finish(Kind::Sphere, yy, y_m, mm, rho, D(1e4));
    if (!f.ok || !std::isfinite(v_new)) return false;
    const A a = A(d.a), b = A(d.b), am = A(cm), ad = A(cd), lrk = A(opt_.lr * k);
    const A ff = A(f.f), fq = A(f.q);
    const RoundingRow sr{x.round_key, r * n};
    for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
      const int64_t c1 = std::min(n, c0 + kBlock);
      next.prefetch(c0, c1);
      if (read_m) row_v_write<true, kRound>(row.w, row.g, row.m, c0, c1, a, b, am, ad, lrk, ff, fq, sr);
      else row_v_write<false, kRound>(row.w, row.g, row.m, c0, c1, a, b, am, ad, lrk, ff, fq, sr);
    }
    x.v[r] = A(v_new);
    return true;
  }

  // Each lane's square root, in place (by reference: no vector ABI): one vector instruction
  // where the variant has AVX.
  static void lanes_sqrt(Lanes& x) {
#if defined(__GNUC__) && defined(__AVX__)
    if constexpr (std::is_same<A, float>::value) x = __builtin_ia32_sqrtps256(x);
    else x = __builtin_ia32_sqrtpd256(x);
#else
    for (int l = 0; l < kLanes; ++l) x[l] = std::sqrt(x[l]);
#endif
  }

  // Elements [b0, b1) of an element-v sphere row's first pass: <w,w> and <w,g>, the
  // projection's, in lanes as row_dots.h but with two vectors of lanes per sum (element i goes
  // to vector ((i - b0) / kLanes) % 2, lane i % kLanes): with one, the sums' latency bounds the
  // pass. <g,g> is not needed: a non-finite g makes <w,g> non-finite (so the row is skipped),
  // and a finite g whose square overflows makes v' non-finite (the second pass's check).
  static void element_dots(const T* __restrict w, const T* __restrict g, int64_t b0, int64_t b1, RowDots<D>& r) {
    Lanes ww0{}, ww1{}, wg0{}, wg1{};
    int64_t i = b0;
    for (; i + 2 * kLanes <= b1; i += 2 * kLanes) {
      Lanes w0, g0, w1, g1;
      Dots::load_lanes(w0, w, i);
      Dots::load_lanes(g0, g, i);
      Dots::load_lanes(w1, w, i + kLanes);
      Dots::load_lanes(g1, g, i + kLanes);
      ww0 += w0 * w0;
      wg0 += w0 * g0;
      ww1 += w1 * w1;
      wg1 += w1 * g1;
    }
    for (int l = 0; i < b1; ++i, ++l) {  // the tail, from a multiple of 2 kLanes
      const A wi = load(w, i), gi = load(g, i);
      if (l < kLanes) {
        ww0[l] += wi * wi;
        wg0[l] += wi * gi;
      } else {
        ww1[l - kLanes] += wi * wi;
        wg1[l - kLanes] += wi * gi;
      }
    }
    for (int l = 0; l < kLanes; ++l) { r.ww += D(ww0[l]); r.wg += D(wg0[l]); }
    for (int l = 0; l < kLanes; ++l) { r.ww += D(ww1[l]); r.wg += D(wg1[l]); }
  }

  // The per-row coefficients of an element-v row's second pass:
  //   d = g + b w (the sphere's projection: row_direction's a is 1),
  //   m' = b1 m + c1 d,  v' = b2 v + c2 d d,  u~ = m' / (sqrt(v') + eps~),
  // and u_hat = kappa u~ (kappa = sqrt(bc2) / bc1, eps~ = eps sqrt(bc2)): the same values as
  // SPEC §6 step 4, (m'/bc1) / (sqrt(v'/bc2) + eps), with two multiplies fewer per element (the
  // pass is bound by the multiply-add units, not by the square root and divide). kappa is
  // applied to the row's sums and to the write pass's coefficient.
  struct ElementCoef {
    A b, beta1, c1, beta2, c2, eps;
  };

  // One vector of lanes of the second pass: m', v', u~ from w, g, m, v (m, v unread when fresh).
  template <bool kReadM>
  static void element_lanes(const Lanes& wi, const Lanes& gi, Lanes& mi, Lanes& vi, Lanes& ui, const ElementCoef& c) {
    const Lanes di = gi + c.b * wi;
    if (kReadM) {
      mi = c.beta1 * mi + c.c1 * di;
      vi = c.beta2 * vi + c.c2 * di * di;
    } else {
      mi = c.c1 * di;
      vi = c.c2 * di * di;
    }
    ui = vi;
    lanes_sqrt(ui);
    ui = mi / (ui + c.eps);
  }

  // Elements [b0, b1) of an element-v sphere row's second pass, in one read of the row (from
  // cache): m', v', u~ into the scratch and, lane by lane (as row_dots.h, added to `s` in
  // double), <w,u~>, <u~,u~>, <w,m'>, <u~,m'> and the sum of v' - v' (NaN for a bad v'). The
  // tail runs the same vector code on lanes padded with zeros (which add nothing to the sums).
  template <bool kReadM>
  void element_block(const T* __restrict w, const T* __restrict g, const A* __restrict m,
                     const A* __restrict v, int64_t b0, int64_t b1, const ElementCoef& c, D* s,
                     const Ahead<T>& next) {
    A* __restrict mh = mh_.data();
    A* __restrict vh = vh_.data();
    A* __restrict uh = uh_.data();
    Lanes wu{}, uu{}, wm{}, um{}, bad{};
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes) {
      next.prefetch_wg_line(i);
      Lanes wi, gi, mi, vi, ui;
      Dots::load_lanes(wi, w, i);
      Dots::load_lanes(gi, g, i);
      if (kReadM) {
        Dots::load_lanes(mi, m, i);
        Dots::load_lanes(vi, v, i);
      }
      element_lanes<kReadM>(wi, gi, mi, vi, ui, c);
      std::memcpy(mh + i, &mi, sizeof(mi));
      std::memcpy(vh + i, &vi, sizeof(vi));
      std::memcpy(uh + i, &ui, sizeof(ui));
      wu += wi * ui;
      uu += ui * ui;
      wm += wi * mi;
      um += ui * mi;
      bad += vi - vi;
    }
    if (i < b1) {  // element i still goes to lane i % kLanes
      const int k = int(b1 - i);
      Lanes wi{}, gi{}, mi{}, vi{}, ui;
      for (int l = 0; l < k; ++l) {
        wi[l] = load(w, i + l);
        gi[l] = load(g, i + l);
        if (kReadM) {
          mi[l] = m[i + l];
          vi[l] = v[i + l];
        }
      }
      element_lanes<kReadM>(wi, gi, mi, vi, ui, c);
      for (int l = 0; l < k; ++l) {
        mh[i + l] = mi[l];
        vh[i + l] = vi[l];
        uh[i + l] = ui[l];
      }
      wu += wi * ui;
      uu += ui * ui;
      wm += wi * mi;
      um += ui * mi;
      bad += vi - vi;
    }
    for (int l = 0; l < kLanes; ++l) {
      s[0] += D(wu[l]); s[1] += D(uu[l]); s[2] += D(wm[l]); s[3] += D(um[l]); s[4] += D(bad[l]);
    }
  }

  // Sphere row, one v per element: u_hat = (m'/bc1) / (sqrt(v'/bc2) + eps) element-wise, then
  // its tangent projection u = u_hat - (<w,u_hat>/<w,w>) w, y = w - lr u; w <- rho y/||y||,
  // m <- T(m'), v <- v'.
  template <bool kRound>
  bool sphere_element_v(const AdamTensor<T>& x, int64_t r, const Ahead<T>& next) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    T* __restrict w = row.w;
    A* __restrict m = row.m;
    A* __restrict v = x.v_of(r);
    RowDots<D> rd;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = std::min(n, b0 + kBlock);
      element_dots(w, row.g, b0, b1, rd);
    }
    rd.bad = rd.wg - rd.wg;
    const Direction<D> d = row_direction(Kind::Sphere, rd, D(0));
    if (!d.ok) return false;
    if (mh_.size() < size_t(n)) { mh_.resize(size_t(n)); vh_.resize(size_t(n)); uh_.resize(size_t(n)); }
    const D root_bc2 = std::sqrt(x.bc2), kappa = root_bc2 / x.bc1;
    // (eps~ kept normal: an element with m' = v' = 0, or a padding lane, gives u~ = 0)
    const ElementCoef c{A(d.b), A(opt_.beta1), A(1 - opt_.beta1), A(opt_.beta2), A(1 - opt_.beta2),
                        std::max(A(opt_.eps * root_bc2), std::numeric_limits<A>::min())};
    D s[5] = {0, 0, 0, 0, 0};
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = std::min(n, b0 + kBlock);
      if (x.fresh) element_block<false>(w, row.g, m, v, b0, b1, c, s, next);
      else element_block<true>(w, row.g, m, v, b0, b1, c, s, next);
    }
    const D ww = rd.ww, wu = kappa * s[0], uu_hat = kappa * kappa * s[1], wm = s[2], um = kappa * s[3];
    const D cu = wu / ww;                           // u = u_hat - cu w
    const D wu_t = wu - cu * ww;                    // <w, u>
    const D uu = uu_hat - 2 * cu * wu + cu * cu * ww;
    const D lr = opt_.lr;
    const D yy = ww - 2 * lr * wu_t + lr * lr * uu;
    const D y_m = wm - lr * (um - cu * wm);
    const D rho = x.radius ? D(x.radius[r]) : D(1);
    // <m',m'> only guards the finish against a non-finite m' (row_finish): with v' finite, a
    // non-finite m' makes u~, and so <u~,u~>, non-finite.
    const Finish<D> f = row_finish(Kind::Sphere, yy, y_m, D(0), rho, D(1e4));
    if (!f.ok || !std::isfinite(uu_hat) || s[4] != D(0)) return false;
    const A aw = A(1 + lr * cu), au = A(-lr * kappa), ff = A(f.f), fq = A(f.q);  // y = aw w + au u~
    const A* __restrict mh = mh_.data();
    const A* __restrict vh = vh_.data();
    const A* __restrict uh = uh_.data();
    const RoundingRow sr{x.round_key, r * n};
    for (int64_t c0 = 0; c0 < n; c0 += Ahead<T>::kLineA) {  // a line's worth of m at a time
      next.prefetch_mv_line(c0);
      const int64_t c1 = std::min(n, c0 + Ahead<T>::kLineA);
#pragma omp simd
      for (int64_t i = c0; i < c1; ++i) {
        const A yi = aw * load(w, i) + au * uh[i];
        store_w<kRound>(w, i, ff * yi, sr);
        m[i] = mh[i] + fq * yi;
        v[i] = vh[i];
      }
    }
    return true;
  }

  // A Stiefel block (row r: p x n, row-major; SPEC §6 with the formulas of core/stiefel.h):
  // g~ = g - sym(g Wb^T) Wb with Wb = W/rho; m' = b1 m + (1 - b1) g~; v' = b2 v + (1 - b2)
  // ||g~||^2 (one per block) or b2 v + (1 - b2) g~^2 (per element); u = (m'/bc1) /
  // (sqrt(v'/bc2) + eps), projected onto the tangent space with element v; y = W - lr u;
  // W <- rho Q(y) (QR or polar), m <- m' - sym(m' Q^T) Q. Written only when finite.
  bool stiefel_block(const AdamTensor<T>& x, int64_t r) {
    const Row<T> row = x.row(r);
    const int p = x.block_rows;
    const int64_t len = row.n, n = len / p;
    if (sw_.size() < size_t(len)) {
      for (Vec<A>* b : {&sw_, &sg_, &su_, &sm_, &sv_}) b->resize(size_t(len));
    }
    const size_t small = size_t(3 * p * p) + size_t(len);
    if (small_.size() < small) small_.resize(small);
    A* w0 = sw_.data();
    A* gt = sg_.data();
    A* u = su_.data();
    A* mn = sm_.data();
    A* vn = sv_.data();
    A* work = small_.data();
    const A rho = x.radius ? A(x.radius[r]) : A(1), inv_rho = A(1) / rho;
    A check = 0;  // NaN when something is not finite
    for (int64_t k = 0; k < len; ++k) {
      w0[k] = load(row.w, k);
      gt[k] = load(row.g, k);
      check += gt[k] - gt[k];
    }
    if (check != A(0)) return false;
    stiefel_project(gt, w0, p, n, inv_rho, work);
    const A beta1 = A(opt_.beta1), c1 = A(1 - opt_.beta1), beta2 = A(opt_.beta2), c2 = A(1 - opt_.beta2);
    const A bc1 = A(x.bc1), bc2 = A(x.bc2), eps = A(opt_.eps), lr = A(opt_.lr);
    A* v = x.v_of(r);
    A v_row = 0;
    if (x.row_v) {
      A sq = 0;
      for (int64_t k = 0; k < len; ++k) sq += gt[k] * gt[k];
      v_row = (x.fresh ? A(0) : beta2 * v[0]) + c2 * sq;
      check += v_row - v_row;
    }
    const A den_row = std::sqrt(v_row / bc2) + eps;
    for (int64_t k = 0; k < len; ++k) {
      check += gt[k] - gt[k];
      mn[k] = (x.fresh ? A(0) : beta1 * row.m[k]) + c1 * gt[k];
      if (x.row_v) {
        u[k] = (mn[k] / bc1) / den_row;
      } else {
        vn[k] = (x.fresh ? A(0) : beta2 * v[k]) + c2 * gt[k] * gt[k];
        check += vn[k] - vn[k];
        u[k] = (mn[k] / bc1) / (std::sqrt(vn[k] / bc2) + eps);
      }
    }
    if (check != A(0)) return false;
    if (!x.row_v) stiefel_project(u, w0, p, n, inv_rho, work);
    for (int64_t k = 0; k < len; ++k) u[k] = w0[k] - lr * u[k];  // y
    const bool ok = opt_.retraction == Retraction::Polar ? stiefel_polar(u, p, n, work) : stiefel_qr(u, p, n);
    if (!ok) return false;
    stiefel_project(mn, u, p, n, A(1), work);  // transport: Wb of the new point is Q
    for (int64_t k = 0; k < len; ++k) {
      u[k] *= rho;
      check += u[k] - u[k] + mn[k] - mn[k];
    }
    if (check != A(0)) return false;
    if constexpr (std::is_same<T, bf16>::value) {
      if (x.round) {
        const RoundingRow sr{x.round_key, r * len};
        for (int64_t k = 0; k < len; ++k) store_rounded(row.w, k, u[k], sr);
      } else {
        for (int64_t k = 0; k < len; ++k) store(row.w, k, u[k]);
      }
    } else {
      for (int64_t k = 0; k < len; ++k) store(row.w, k, u[k]);
    }
    for (int64_t k = 0; k < len; ++k) row.m[k] = mn[k];
    if (x.row_v) v[0] = v_row;
    else
      for (int64_t k = 0; k < len; ++k) v[k] = vn[k];
    return true;
  }
};

// A piece of work for one thread: rows [a, b) of tensor t (columns [a, b) of a kColumns tensor).
struct RowRange {
  int64_t t, a, b, cost;
};

// Columns [c0, c1) of column tensor t (kColumns), tile by tile: gathered into the scratch as
// rows (w, g, m, an element-wise v; a per-row v is the tensor's own, at column c), stepped by
// `rows` (an AdamWorker whose report is `rows_report`, one tensor's), scattered back.
template <typename T>
void adam_columns(const AdamTensor<T>& x, int64_t t, int64_t c0, int64_t c1, AdamWorker<T>& rows,
                  int64_t* rows_report, ColumnScratch<T>& s, int64_t* report) {
  using A = typename Math<T>::type;
  const int64_t tile = column_tile<T>(x.row_len);
  for (int64_t c = c0; c < c1; c += tile) {
    const int64_t n = std::min(tile, c1 - c);
    AdamTensor<T> y = x;
    static_cast<TensorView<T>&>(y) = gather_tile<T>(x, c, n, true, s);
    if (x.row_v) {
      y.v = x.v + c;
    } else {
      if (s.v.size() < size_t(n * x.row_len)) s.v.resize(size_t(n * x.row_len));
      gather_columns<A>(x.v, x.rows, x.row_len, c, n, s.v.data());
      y.v = s.v.data();
    }
    rows_report[kSkippedRows] = 0;
    rows_report[kFirstSkippedRow] = -1;
    rows.run_rows(0, y, 0, n);
    merge_skip_report(report + t * kReportFields, rows_report[kSkippedRows], rows_report[kFirstSkippedRow] + c);
    scatter_tile<T>(x, y, c);
    if (!x.row_v) scatter_columns<A>(y.v, x.rows, x.row_len, c, n, x.v);
  }
}

template <typename T>
void run_adam(const int64_t* table, int64_t n_tensors, const StepOptions& opt, int64_t* report, int num_threads) {
  constexpr int64_t kUnitElems = 1 << 16;
  Vec<RowRange> units;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* e = table + t * kTensorFields;
    const int64_t rows = e[kRows], len = e[kRowLen];
    int64_t step = std::max<int64_t>(1, kUnitElems / len);
    if (e[kFlags] & kColumns) step = std::max<int64_t>(1, step / column_tile<T>(len)) * column_tile<T>(len);
    for (int64_t r = 0; r < rows; r += step)
      units.push_back(RowRange{t, r, std::min(rows, r + step), (std::min(rows, r + step) - r) * len});
  }
  ThreadReports reports(num_threads, n_tensors);
  parallel_units(units, num_threads, [&](int i, size_t u0, size_t u1) {
    AdamWorker<T> worker(opt, reports.of(i));
    int64_t tile_report[kReportFields] = {0, -1};
    AdamWorker<T> tile_worker(opt, tile_report);  // column tiles (adam_columns)
    ColumnScratch<T> scratch;
    for (size_t u = u0; u < u1; ++u) {
      const RowRange& x = units[u];
      const AdamTensor<T> view(table + x.t * kTensorFields, opt);
      if (view.columns) adam_columns(view, x.t, x.a, x.b, tile_worker, tile_report, scratch, reports.of(i));
      else worker.run_rows(x.t, view, x.a, x.b);
    }
  });
  reports.merge_into(report);
}

}  // namespace
}  // namespace MSGD_CPU_NS

void MSGD_CAT(fused_adam_cpu_, MSGD_CPU_VARIANT)(const int64_t* table, int64_t n_tensors, DType dtype,
                                                 const StepOptions& opt, int64_t* report, int num_threads) {
  using MSGD_CPU_NS::run_adam;
  switch (dtype) {
    case DType::Float32: return run_adam<float>(table, n_tensors, opt, report, num_threads);
    case DType::Float64: return run_adam<double>(table, n_tensors, opt, report, num_threads);
    case DType::BFloat16: return run_adam<bf16>(table, n_tensors, opt, report, num_threads);
    case DType::Float16: return run_adam<fp16>(table, n_tensors, opt, report, num_threads);
  }
}

}  // namespace msgd
