// The per-row formulas of SPEC §2–3, written once for every backend.
//
// Every kind's step has the same shape, which is what lets one loop serve all:
//   direction   d_i = a * g_i + b * w_i          (Riemannian gradient times s_G)
//   momentum    m_i = mu * m_i + d_i  (first step: m_i = d_i);  u_i = m_i or d_i + mu * m_i
//   move        y_i = w_i - lr * u_i
//   finish      w_i <- f * y_i,   m_i <- p * m_i + q * y_i      (retraction, transport, guard)
#pragma once

#include <cmath>

#include "step.h"

namespace msgd {

// Dot products over one row, read together with the row.
template <typename D>
struct RowDots {
  D ww = 0, wg = 0, wm = 0, gg = 0, gm = 0, mm = 0;
  D bad = 0;  // sum of (g - g): NaN exactly when some g is not finite
};

template <typename A>
using RowSums = RowDots<A>;

// The coefficients of d = a*g + b*w before the adaptive scale s_G.
template <typename A>
struct Direction {
  A a, b;
  bool ok;  // the row has a usable Riemannian gradient
};

template <typename A>
MSGD_HD Direction<A> row_direction(Kind kind, const RowSums<A>& r, A weight_decay) {
  bool finite = r.bad == A(0);  // false for NaN
  switch (kind) {
    case Kind::Sphere: {  // g~ = g - (<w,g>/<w,w>) w
      bool ok = finite && r.ww > A(0) && std::isfinite(r.ww);
      A c = ok ? r.wg / r.ww : A(0);
      return {A(1), -c, ok && std::isfinite(c)};
    }
    case Kind::Psi:  // g~ = ||w||^2 g
      return {r.ww, A(0), finite && std::isfinite(r.ww)};
    default:  // Euclidean: g~ = g + weight_decay * w
      return {A(1), weight_decay, finite};
  }
}

// ||g~||^2 for the group norm when it follows from the sums without cancellation;
// the sphere's is summed explicitly by the caller (g - c w can be much smaller than g).
template <typename A>
MSGD_HD A psi_tangent_sq(const RowSums<A>& r) { return r.ww * r.ww * r.gg; }

// Momentum with the torch.optim.SGD convention; returns u.
template <typename A>
MSGD_HD A momentum_step(A d, A& m, A mu, bool fresh, bool nesterov) {
  m = fresh ? d : mu * m + d;
  return nesterov ? d + mu * m : m;
}

// Coefficients of the finish from the sums over the moved row y and the new momentum.
template <typename A>
struct Finish {
  A f, p, q;
  bool ok;  // false: the result is not finite; the row is left unchanged
};

template <typename A>
MSGD_HD Finish<A> row_finish(Kind kind, A yy, A ym, A mm, A radius, A psi_max_norm) {
  bool finite = std::isfinite(yy) && std::isfinite(mm) && std::isfinite(ym);
  switch (kind) {
    case Kind::Sphere: {  // R(y) = rho y/||y||;  T(m) = m - (<y,m>/<y,y>) y
      bool ok = finite && yy > A(0);
      A f = ok ? radius / sqrt(yy) : A(0);
      A q = ok ? -ym / yy : A(0);
      return {f, A(1), q, ok};
    }
    case Kind::Psi: {  // guard: a row above psi_max_norm is divided by its norm, m too
      A n = sqrt(yy);
      A f = n > psi_max_norm ? A(1) / n : A(1);
      return {f, f, A(0), finite};
    }
    default:
      return {A(1), A(1), A(0), finite};
  }
}

// ---- The two-pass form: every result is a combination of the row's w, d and m ---------
//
// The finish needs only ||y||^2, <y, m'> and ||m'||^2, which follow from the dot products
// of w, d and m, themselves from those of w, g and m. A kernel therefore reads a row once
// for the dots and once to write the result, forming d, m', y and the finished w and m
// element by element in the order of the reference (the sphere's projection d = g - c w
// cancels there, per element, not in some folded coefficient).

template <typename D>
struct DirDots {
  D ww = 0, wd = 0, wm = 0, dd = 0, dm = 0, mm = 0;
};

// The (w, d, m) dots from the (w, g, m) ones. `cancels` is true when <d, d> and <w, d>
// would lose most of their digits this way (a gradient nearly along w on the sphere):
// the caller then sums them explicitly.
template <typename D>
MSGD_HD DirDots<D> direction_dots(const RowDots<D>& r, D a, D b, bool& cancels) {
  DirDots<D> q;
  q.ww = r.ww;
  q.wm = r.wm;
  q.mm = r.mm;
  q.wd = a * r.wg + b * r.ww;
  q.dm = a * r.gm + b * r.wm;
  q.dd = a * a * r.gg + D(2) * a * b * r.wg + b * b * r.ww;
  const D big = a * a * r.gg + b * b * r.ww;
  cancels = q.dd < big / D(16);
  return q;
}

template <typename D>
struct Combination {
  D a, b;     // d = a g + b w
  D f, p, q;  // the finish: w <- f y, m <- p m' + q y
  bool ok;
};

template <typename D>
MSGD_HD D gram(const DirDots<D>& r, D xw, D xd, D xm, D zw, D zd, D zm) {
  return xw * zw * r.ww + xd * zd * r.dd + xm * zm * r.mm + (xw * zd + xd * zw) * r.wd +
         (xw * zm + xm * zw) * r.wm + (xd * zm + xm * zd) * r.dm;
}

// The finish coefficients of a row from its (w, d, m) dots: m' = mu m + d, u and y = w - lr u
// are linear in (w, d, m), so ||y||^2, <y, m'> and ||m'||^2 follow from the dots.
// `has_m`: momentum on; `fresh`: first step (m' = d, the old m is not read).
template <typename D>
MSGD_HD Combination<D> row_combination(Kind kind, const DirDots<D>& r, D a, D b, D lr, D mu,
                                       bool has_m, bool fresh, bool nesterov, D radius,
                                       D psi_max_norm) {
  const D am = (has_m && !fresh) ? mu : D(0);
  const D mw = 0, md = 1, mm = am;  // m' = mu m + d
  D ud = 1, um = 0;                 // u = d without momentum
  if (has_m) {
    if (nesterov) { ud = D(1) + mu * md; um = mu * mm; }
    else { ud = md; um = mm; }
  }
  const D yw = 1, yd = -lr * ud, ym = -lr * um;  // y = w - lr u
  const D yy = gram(r, yw, yd, ym, yw, yd, ym);
  const D ymm = has_m ? gram(r, yw, yd, ym, mw, md, mm) : D(0);
  const D mmm = has_m ? gram(r, mw, md, mm, mw, md, mm) : D(0);
  Finish<D> f = row_finish(kind, yy, ymm, mmm, radius, psi_max_norm);
  return {a, b, f.f, f.p, f.q, f.ok};
}

}  // namespace msgd
