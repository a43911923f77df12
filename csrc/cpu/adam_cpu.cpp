// The fused CPU step of the Adam family (SPEC §6) on the same tables as the SGD step.
//
// Rows are independent (Adam has no adaptive groups), so every tensor is stepped row by row in
// memory order, in row chunks shared among threads. What a row reads and writes:
//   Euclidean (AdamW, v per element): a first pass checks g (its square must be finite), then
//     one pass updates m, v and w element by element: w, g, m, v read once, w, m, v written.
//   sphere, v per row: the SGD kernel's two-pass form (row_math.h): one pass for the six dot
//     products of w, g, m, then the row's new v, the scalar k of the bias-corrected step and the
//     finish coefficients; one pass writes w and m (the update m' = b1 m + (1 - b1) d, y = w -
//     lr k m' is linear in w, d, m, so the norms the retraction and transport need follow from
//     the dots). The bytes of SGD with momentum: w, g, m read once, w and m written.
//   sphere, v per element: the direction u_hat = m'/(sqrt(v') + eps) is not linear in the row,
//     so a second pass forms m', v', u_hat into per-thread scratch (the row is in cache) with the
//     dots the tangent projection, retraction and transport need, and a third writes w, m, v.
// Stiefel blocks are not stepped here (the Python layer routes them to the reference path).
//
// Compiled once per instruction set, like fused_step_cpu.cpp (MSGD_CPU_VARIANT).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/row_math.h"
#include "adam_cpu.h"
#include "tensor_view.h"

namespace msgd {
namespace MSGD_CPU_NS {
namespace {

using D = double;  // reductions and per-row coefficients

// Sums of products over a row in blocks of kBlock elements: lanes of the math type within a
// block (vectorised), blocks added in double, so long rows keep double-like accuracy. Element
// i goes to lane i % kLanes; the lanes are added in a fixed order: the same bits on every ISA.
template <typename A, int N>
struct LaneSums {
  static constexpr int kLanes = 32 / int(sizeof(A));
  A lane[N][kLanes];
  D total[N];
  LaneSums() { clear(); std::memset(total, 0, sizeof(total)); }
  void clear() { std::memset(lane, 0, sizeof(lane)); }
  void add(int k, int64_t i, A v) { lane[k][i % kLanes] += v; }
  void add_lane(int k, int l, A v) { lane[k][l] += v; }
  void flush() {
    for (int k = 0; k < N; ++k)
      for (int l = 0; l < kLanes; ++l) total[k] += D(lane[k][l]);
    clear();
  }
};
constexpr int64_t kBlock = 256;

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
};

template <typename T>
class AdamWorker {
  using A = typename Math<T>::type;

 public:
  AdamWorker(const StepOptions& opt, int64_t* report) : opt_(opt), report_(report) {}

  void run_rows(int64_t t, const AdamTensor<T>& x, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bool ok;
      if (x.kind == Kind::Euclidean) ok = adamw_row(x, r);
      else if (x.row_v) ok = sphere_row_v(x, r);
      else ok = sphere_element_v(x, r);
      if (!ok) skip(t, r);
    }
  }

 private:
  const StepOptions& opt_;
  int64_t* report_;  // this thread's own report rows
  Vec<A> mh_, vh_, uh_;  // element-v scratch: m', v', u_hat of one row

  void skip(int64_t t, int64_t r) { merge_skip_report(report_ + t * kReportFields, 1, r); }

  static void store_w(const AdamTensor<T>& x, T* w, int64_t i, A value, int64_t base) {
    if constexpr (std::is_same<T, bf16>::value) {
      if (x.round) return store_rounded(w, i, value, RoundingRow{x.round_key, base});
    }
    store(w, i, value);
  }

  // AdamW on a Euclidean row: w <- w (1 - lr wd) - lr (m'/bc1) / (sqrt(v'/bc2) + eps).
  bool adamw_row(const AdamTensor<T>& x, int64_t r) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    T* w = row.w;
    const T* g = row.g;
    A* m = row.m;
    A* v = x.v + r * n;
    A bad = 0;  // NaN when some g, or its square, is not finite
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      const A gi = load(g, i);
      bad += gi * gi - gi * gi;
    }
    if (bad != A(0)) return false;
    const A b1 = A(opt_.beta1), c1 = A(1 - opt_.beta1), b2 = A(opt_.beta2), c2 = A(1 - opt_.beta2);
    const A step = A(opt_.lr / x.bc1), inv_sqrt_bc2 = A(1 / std::sqrt(x.bc2)), eps = A(opt_.eps);
    const A decay = A(1 - opt_.lr * opt_.weight_decay);
    const bool fresh = x.fresh;
    for (int64_t i = 0; i < n; ++i) {
      const A gi = load(g, i);
      const A mi = fresh ? c1 * gi : b1 * m[i] + c1 * gi;
      const A vi = fresh ? c2 * gi * gi : b2 * v[i] + c2 * gi * gi;
      const A wi = load(w, i) * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      store_w(x, w, i, wi, r * n);
      m[i] = mi;
      v[i] = vi;
    }
    return true;
  }

  // <w,w>, <w,g>, <g,g> and, unless fresh, <w,m>, <g,m>, <m,m> of a row; bad = NaN for a
  // non-finite g (or an overflowing <g,g>).
  static RowDots<D> dots(const T* w, const T* g, const A* m, int64_t n) {
    using S = LaneSums<A, 6>;
    constexpr int L = S::kLanes;
    S s;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = std::min(n, b0 + kBlock);
      int64_t i = b0;
      for (; i + L <= b1; i += L)  // whole lanes: vectorised
        for (int l = 0; l < L; ++l) {
          const A wi = load(w, i + l), gi = load(g, i + l);
          s.add_lane(0, l, wi * wi);
          s.add_lane(1, l, wi * gi);
          s.add_lane(2, l, gi * gi);
          if (m) {
            const A mi = m[i + l];
            s.add_lane(3, l, wi * mi);
            s.add_lane(4, l, gi * mi);
            s.add_lane(5, l, mi * mi);
          }
        }
      for (; i < b1; ++i) {
        const A wi = load(w, i), gi = load(g, i);
        s.add(0, i, wi * wi);
        s.add(1, i, wi * gi);
        s.add(2, i, gi * gi);
        if (m) {
          const A mi = m[i];
          s.add(3, i, wi * mi);
          s.add(4, i, gi * mi);
          s.add(5, i, mi * mi);
        }
      }
      s.flush();
    }
    RowDots<D> d;
    d.ww = s.total[0]; d.wg = s.total[1]; d.gg = s.total[2];
    d.wm = s.total[3]; d.gm = s.total[4]; d.mm = s.total[5];
    d.bad = d.gg - d.gg;
    return d;
  }

  // ||g - c w||^2 and <w, g - c w>, <d, d>, <d, m> summed element by element (the row is in
  // cache): where the closed forms from the (w, g, m) dots would cancel.
  static void explicit_dots(const T* w, const T* g, const A* m, int64_t n, D c, DirDots<D>& q) {
    D wd = 0, dd = 0, dm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const D wi = D(load(w, i)), di = D(load(g, i)) - c * wi;
      wd += wi * di;
      dd += di * di;
      if (m) dm += di * D(m[i]);
    }
    q.wd = wd; q.dd = dd; q.dm = dm;
  }

  // Sphere row, one v per row: m' = b1 m + (1 - b1) d, v' = b2 v + (1 - b2) ||d||^2,
  // y = w - lr k m' with k = 1 / (bc1 (sqrt(v'/bc2) + eps)); w <- rho y/||y||, m <- T(m').
  bool sphere_row_v(const AdamTensor<T>& x, int64_t r) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    T* w = row.w;
    const T* g = row.g;
    A* m = row.m;
    const A* m_read = x.fresh ? nullptr : m;
    const RowDots<D> rd = dots(w, g, m_read, n);
    const Direction<D> d = row_direction(Kind::Sphere, rd, D(0));
    if (!d.ok) return false;
    bool cancels = false;
    DirDots<D> q = direction_dots(rd, d.a, d.b, cancels);
    if (cancels) explicit_dots(w, g, m_read, n, -d.b, q);
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
    for (int64_t i = 0; i < n; ++i) {
      const A wi = load(w, i);
      const A di = a * load(g, i) + b * wi;
      const A mi = m_read ? am * m[i] + ad * di : ad * di;
      const A yi = wi - lrk * mi;
      store_w(x, w, i, ff * yi, r * n);
      m[i] = mi + fq * yi;
    }
    x.v[r] = A(v_new);
    return true;
  }

  // Sphere row, one v per element: u_hat = (m'/bc1) / (sqrt(v'/bc2) + eps) element-wise, then
  // its tangent projection u = u_hat - (<w,u_hat>/<w,w>) w, y = w - lr u; w <- rho y/||y||,
  // m <- T(m'), v <- v'.
  bool sphere_element_v(const AdamTensor<T>& x, int64_t r) {
    const Row<T> row = x.row(r);
    const int64_t n = row.n;
    T* w = row.w;
    const T* g = row.g;
    A* m = row.m;
    A* v = x.v + r * n;
    const RowDots<D> rd = dots(w, g, nullptr, n);
    const Direction<D> d = row_direction(Kind::Sphere, rd, D(0));
    if (!d.ok) return false;
    if (mh_.size() < size_t(n)) { mh_.resize(size_t(n)); vh_.resize(size_t(n)); uh_.resize(size_t(n)); }
    const A a = A(d.a), b = A(d.b);
    const A b1 = x.fresh ? A(0) : A(opt_.beta1), c1 = A(1 - opt_.beta1);
    const A b2 = x.fresh ? A(0) : A(opt_.beta2), c2 = A(1 - opt_.beta2);
    const A inv_bc1 = A(1 / x.bc1), inv_bc2 = A(1 / x.bc2), eps = A(opt_.eps);
    LaneSums<A, 6> s;  // <w,u_hat>, <u_hat,u_hat>, <w,m'>, <u_hat,m'>, <m',m'>, NaN for a bad v'

    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1e = std::min(n, b0 + kBlock);
      for (int64_t i = b0; i < b1e; ++i) {
        const A wi = load(w, i);
        const A di = a * load(g, i) + b * wi;
        const A mi = x.fresh ? c1 * di : b1 * m[i] + c1 * di;
        const A vi = x.fresh ? c2 * di * di : b2 * v[i] + c2 * di * di;
        const A ui = (mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + eps);
        mh_[size_t(i)] = mi;
        vh_[size_t(i)] = vi;
        uh_[size_t(i)] = ui;
        s.add(0, i, wi * ui);
        s.add(1, i, ui * ui);
        s.add(2, i, wi * mi);
        s.add(3, i, ui * mi);
        s.add(4, i, mi * mi);
        s.add(5, i, vi - vi);
      }
      s.flush();
    }
    const D ww = rd.ww, wu = s.total[0], uu_hat = s.total[1], wm = s.total[2], um = s.total[3];
    const D cu = wu / ww;                           // u = u_hat - cu w
    const D wu_t = wu - cu * ww;                    // <w, u>
    const D uu = uu_hat - 2 * cu * wu + cu * cu * ww;
    const D lr = opt_.lr;
    const D yy = ww - 2 * lr * wu_t + lr * lr * uu;
    const D y_m = wm - lr * (um - cu * wm);
    const D rho = x.radius ? D(x.radius[r]) : D(1);
    const Finish<D> f = row_finish(Kind::Sphere, yy, y_m, s.total[4], rho, D(1e4));
    if (!f.ok || !std::isfinite(uu_hat) || s.total[5] != D(0)) return false;
    const A acu = A(cu), alr = A(lr), ff = A(f.f), fq = A(f.q);
    for (int64_t i = 0; i < n; ++i) {
      const A wi = load(w, i);
      const A yi = wi - alr * (uh_[size_t(i)] - acu * wi);
      store_w(x, w, i, ff * yi, r * n);
      m[i] = mh_[size_t(i)] + fq * yi;
      v[i] = vh_[size_t(i)];
    }
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
