// The bodies of the Adam family's fused CUDA step (SPEC §6), in the SGD step's launch scheme:
// one CTA = one work item of the plan (fused_adam_plan.h, fused_step_plan.h), rows held in
// registers by teams of threads (Seg, team_sum and the 16-byte accesses of
// fused_step_kernels.cuh), the same skip report and stochastic rounding. Written against simt.h,
// so the host emulator (emu/) runs the same code. The formulas follow csrc/cpu/adam_cpu.cpp:
//
//   Euclidean (AdamW, v per element): the row's gradient is checked first (every g*g finite,
//     one team sum), then m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g g,
//     w <- w (1 - lr wd) - (lr/bc1) m' / (sqrt(v') / sqrt(bc2) + eps), element by element.
//   sphere, v per row: g~ = g - (<w,g>/<w,w>) w, v' = b2 v + (1-b2) ||g~||^2 (summed explicitly),
//     k = 1 / (bc1 (sqrt(v'/bc2) + eps)), m' = b1 m + (1-b1) g~, y = w - lr k m',
//     w <- rho y/||y||, m <- m' - (<y,m'>/<y,y>) y, v <- v'.
//   sphere, v per element: m', v' element-wise from g~, u^ = (m'/bc1) / (sqrt(v'/bc2) + eps),
//     u = u^ - (<w,u^>/<w,w>) w, y = w - lr u, w <- rho y/||y||, m <- T(m'), v <- v'.
//
// Team items (rows up to 8192 float / 4096 double elements) read w, g, m (and v per element)
// once and write them once. Split rows (longer): phase 1 the chunks' <w,w>, <w,g>, <g,g> and the
// finiteness sum (the CTA completing a row forms its direction); phase 2 AdamW writes its chunk,
// a sphere chunk publishes its sums of the moved row (the completing CTA forms the finish and,
// with v per row, the new v); phase 3 recomputes the sphere chunk and writes it.
// Bias corrections come from each tensor's step count in the table (kStepCount).
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_adam_plan.h"
#include "fused_step_kernels.cuh"

namespace msgd {
namespace cuda {

template <typename A>
struct AdamParams {
  Params<A> p;          // tables, plan, workspace, report, layout, lr (as A)
  double lr, beta1, beta2, eps, weight_decay;
  int64_t partial;      // byte offset of the split rows' partial sums (kAdamPartial per chunk)
  int row_v;            // SecondMoment::Row: one v per sphere row
};

template <typename A>
AdamParams<A> make_adam_params(const HostPlan& plan, const int64_t* table, const void* blob, void* ws,
                               int64_t* report, const StepOptions& opt) {
  AdamParams<A> a{};
  a.p = make_params<A>(plan, table, blob, ws, report, opt);
  a.lr = opt.lr;
  a.beta1 = opt.beta1;
  a.beta2 = opt.beta2;
  a.eps = opt.eps;
  a.weight_decay = opt.weight_decay;
  a.partial = plan.adam_partial;
  a.row_v = opt.second_moment == SecondMoment::Row ? 1 : 0;
  return a;
}

// The bias corrections 1 - beta^t of the tensor's step (double, as the CPU kernel).
struct BiasCorrection {
  double bc1, bc2;
};
template <typename A>
MSGD_DEV BiasCorrection bias_correction(const AdamParams<A>& ap, const int64_t* e) {
  const double t = double(e[kStepCount]);
  return {1.0 - std::pow(ap.beta1, t), 1.0 - std::pow(ap.beta2, t)};
}

// V math-type values at p + e0 (a 16-byte path when whole and aligned), zeros outside [0, len).
template <typename A, int V>
MSGD_DEV void load_slot(const A* p, A* o, int64_t e0, int64_t len, bool active, bool vec) {
  if (active && vec && e0 + V <= len) {
    mload<A, V>(p + e0, o);
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q) o[q] = (active && e0 + q < len) ? simt::ldg(p + e0 + q) : A(0);
  }
}
template <typename A, int V>
MSGD_DEV void store_slot(A* p, const A* o, int64_t e0, int64_t len, bool vec) {
  if (vec && e0 + V <= len) {
    mstore<A, V>(p + e0, o);
  } else {
#pragma unroll
    for (int q = 0; q < V; ++q)
      if (e0 + q < len) simt::stg(p + e0 + q, o[q]);
  }
}

// Sum of (g*g - g*g): NaN exactly when some g is not finite or its square overflows (the CPU
// kernel's test of a row's gradient).
template <typename T, int L>
MSGD_DEV typename Traits<T>::A grad_bad(const Seg<T, L>& seg) {
  using A = typename Traits<T>::A;
  A bad = 0;
#pragma unroll
  for (int i = 0; i < Seg<T, L>::K; ++i) bad += seg.g[i] * seg.g[i] - seg.g[i] * seg.g[i];
  return bad;
}

// AdamW on the segment held in seg (w, g, m: m ignored when fresh), v streamed slot by slot;
// leaves the new w, m in seg and writes v. `lane`'s elements of a row (or chunk) of `len`.
template <typename T, int L>
MSGD_DEV void adamw_segment(const AdamParams<typename Traits<T>::A>& ap, const BiasCorrection& bc,
                            Seg<T, L>& seg, typename Traits<T>::A* v, int64_t len, int lane, bool fresh,
                            bool vec) {
  using A = typename Traits<T>::A;
  constexpr int V = Seg<T, L>::V, K = Seg<T, L>::K;
  const A b1 = A(ap.beta1), c1 = A(1 - ap.beta1), b2 = A(ap.beta2), c2 = A(1 - ap.beta2);
  const A step = A(ap.lr / bc.bc1), inv_sqrt_bc2 = A(1 / std::sqrt(bc.bc2)), eps = A(ap.eps);
  const A decay = A(1 - ap.lr * ap.weight_decay);
#pragma unroll
  for (int s = 0; s < K / V; ++s) {
    const int64_t e0 = (int64_t(s) * L + lane) * V;
    A vv[V];
    load_slot<A, V>(v, vv, e0, len, !fresh, vec);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const int i = s * V + q;
      const A gi = seg.g[i];
      const A mi = fresh ? c1 * gi : b1 * seg.m[i] + c1 * gi;
      const A vi = fresh ? c2 * gi * gi : b2 * vv[q] + c2 * gi * gi;
      seg.w[i] = seg.w[i] * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      seg.m[i] = mi;
      vv[q] = vi;
    }
    store_slot<A, V>(v, vv, e0, len, vec);
  }
}

// Sphere, v per row: m' = cm m + cd d, y = w - lrk m' in place (w <- y, m <- m'); the thread's
// sums {<y,y>, <y,m'>, <m',m'>}.
template <typename T, int L>
MSGD_DEV void row_v_move(Seg<T, L>& seg, typename Traits<T>::A a, typename Traits<T>::A b,
                         typename Traits<T>::A cm, typename Traits<T>::A cd, typename Traits<T>::A lrk,
                         typename Traits<T>::A (&s3)[3]) {
  using A = typename Traits<T>::A;
  A yy = 0, ym = 0, mm = 0;
#pragma unroll
  for (int i = 0; i < Seg<T, L>::K; ++i) {
    const A d = a * seg.g[i] + b * seg.w[i];
    const A mi = cm * seg.m[i] + cd * d;
    const A y = seg.w[i] - lrk * mi;
    seg.w[i] = y;
    seg.m[i] = mi;
    yy += y * y;
    ym += y * mi;
    mm += mi * mi;
  }
  s3[0] = yy; s3[1] = ym; s3[2] = mm;
}

// Sphere, v per element: the element-wise moments of the step.
template <typename A>
struct ElementCoef {
  A a, b;            // d = a g + b w
  A b1, c1, b2, c2;  // m' = b1 m + c1 d, v' = b2 v + c2 d d (b1 = b2 = 0 on the first step)
  A inv_bc1, inv_bc2, eps;
  MSGD_DEV A u_hat(A mi, A vi) const { return (mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + eps); }
};
template <typename A>
MSGD_DEV ElementCoef<A> element_coef(const AdamParams<A>& ap, const BiasCorrection& bc, A a, A b, bool fresh) {
  ElementCoef<A> c;
  c.a = a;
  c.b = b;
  c.b1 = fresh ? A(0) : A(ap.beta1);
  c.c1 = A(1 - ap.beta1);
  c.b2 = fresh ? A(0) : A(ap.beta2);
  c.c2 = A(1 - ap.beta2);
  c.inv_bc1 = A(1 / bc.bc1);
  c.inv_bc2 = A(1 / bc.bc2);
  c.eps = A(ap.eps);
  return c;
}

// m' into seg.m, v' into seg.g (the gradient is not needed afterwards), v streamed from memory
// (not read on the first step). Returns the thread's {<w,u^>, <u^,u^>, <w,m'>, <u^,m'>, <m',m'>,
// bad, <w,w>} (bad: NaN for a non-finite v' or u^).
template <typename T, int L>
MSGD_DEV void element_moments(Seg<T, L>& seg, const ElementCoef<typename Traits<T>::A>& c,
                              const typename Traits<T>::A* v, int64_t len, int lane, bool active, bool fresh,
                              bool vec, typename Traits<T>::A (&s7)[7]) {
  using A = typename Traits<T>::A;
  constexpr int V = Seg<T, L>::V, K = Seg<T, L>::K;
  A wu = 0, uu = 0, wm = 0, um = 0, mm = 0, bad = 0, ww = 0;
#pragma unroll
  for (int s = 0; s < K / V; ++s) {
    const int64_t e0 = (int64_t(s) * L + lane) * V;
    A vv[V];
    load_slot<A, V>(v, vv, e0, len, active && !fresh, vec);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const int i = s * V + q;
      const A wi = seg.w[i];
      const A d = c.a * seg.g[i] + c.b * wi;
      const A mi = c.b1 * seg.m[i] + c.c1 * d;
      const A vi = c.b2 * vv[q] + c.c2 * d * d;
      const A u = c.u_hat(mi, vi);
      seg.m[i] = mi;
      seg.g[i] = vi;
      wu += wi * u;
      uu += u * u;
      wm += wi * mi;
      um += u * mi;
      mm += mi * mi;
      bad += (vi - vi) + (u - u);
      ww += wi * wi;
    }
  }
  s7[0] = wu; s7[1] = uu; s7[2] = wm; s7[3] = um; s7[4] = mm; s7[5] = bad; s7[6] = ww;
}

// y = w - lr (u^ - cu w) in place (w <- y); the thread's {<y,y>, <y,m'>, <m',m'>}.
template <typename T, int L>
MSGD_DEV void element_move(Seg<T, L>& seg, const ElementCoef<typename Traits<T>::A>& c, typename Traits<T>::A lr,
                           typename Traits<T>::A cu, typename Traits<T>::A (&s3)[3]) {
  using A = typename Traits<T>::A;
  A yy = 0, ym = 0, mm = 0;
#pragma unroll
  for (int i = 0; i < Seg<T, L>::K; ++i) {
    const A wi = seg.w[i], mi = seg.m[i];
    const A y = wi - lr * (c.u_hat(mi, seg.g[i]) - cu * wi);
    seg.w[i] = y;
    yy += y * y;
    ym += y * mi;
    mm += mi * mi;
  }
  s3[0] = yy; s3[1] = ym; s3[2] = mm;
}

// Stores the segment's v' (held in seg.g by element_moments).
template <typename T, int L>
MSGD_DEV void store_v(const Seg<T, L>& seg, typename Traits<T>::A* v, int64_t len, int lane, bool vec) {
  constexpr int V = Seg<T, L>::V, K = Seg<T, L>::K;
#pragma unroll
  for (int s = 0; s < K / V; ++s) store_slot<typename Traits<T>::A, V>(v, &seg.g[s * V], (int64_t(s) * L + lane) * V,
                                                                        len, vec);
}

// ---- rows held by teams (Range items) -----------------------------------------------

template <typename T, int L>
MSGD_DEV void adam_team_item(const AdamParams<typename Traits<T>::A>& ap, const Item& it,
                             Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  const Params<A>& p = ap.p;
  const int t = simt::tid();
  const int team = t / L, lane = t % L;
  const auto [e, n, kind, fresh] = item_tensor(p.table, it);
  const bool active = team < it.count;
  const int64_t row = active ? it.row + team : 0;
  const bool row_v = kind != Kind::Euclidean && ap.row_v != 0;
  const auto at = tensor_at<T, Buffers::Adam>(e, row * n, row, row_v);
  A* const v = row_v ? at.v_row : at.v;  // the row's one v, or its elements' from the first
  const bool vec = at.aligned();
  const BiasCorrection bc = bias_correction(ap, e);
  const SR sr = rounding(e, row * n);

  Seg<T, L> seg;
  if (kind == Kind::Euclidean) {  // AdamW
    seg.load(at.w, at.g, fresh ? nullptr : at.m, n, lane, active, vec);
    A bad[1] = {grad_bad(seg)};
    team_sum<L, 1>(bad, sm);
    const bool go = active && bad[0] == A(0);
    if (active && !go && lane == 0) report_skip(p.report, it.tensor, row);
    if (!go) return;  // no barrier follows
    adamw_segment<T, L>(ap, bc, seg, v, n, lane, fresh, vec);
    seg.store(at.w, at.m, n, lane, vec, sr);
    return;
  }

  seg.load(at.w, at.g, (row_v && !fresh) ? at.m : nullptr, n, lane, active, vec);
  A s4[4];
  seg.sums(s4);
  team_sum<L, 4>(s4, sm);
  RowSums<A> rs;
  rs.ww = s4[0]; rs.wg = s4[1]; rs.gg = s4[2]; rs.bad = s4[3];
  const Direction<A> d = row_direction(Kind::Sphere, rs, A(0));
  const float* radius = reinterpret_cast<const float*>(e[kRadius]);
  const A rho = (radius && active) ? A(radius[row]) : A(1);
  bool fin_ok;
  Finish<A> f;
  double v_new = 0;
  if (row_v) {
    A tan[1] = {seg.tangent_sq(d.a, d.b)};  // ||g~||^2, summed explicitly
    team_sum<L, 1>(tan, sm);
    const double v_old = (fresh || !active) ? 0.0 : double(simt::ldg(v));
    v_new = ap.beta2 * v_old + (1 - ap.beta2) * double(tan[0]);
    const double k = 1 / (bc.bc1 * (std::sqrt(v_new / bc.bc2) + ap.eps));
    A s3[3];
    row_v_move<T, L>(seg, d.a, d.b, fresh ? A(0) : A(ap.beta1), A(1 - ap.beta1), A(ap.lr * k), s3);
    team_sum<L, 3>(s3, sm);
    f = row_finish(Kind::Sphere, s3[0], s3[1], s3[2], rho, A(1e4));
    fin_ok = f.ok && std::isfinite(v_new);
  } else {
    // m of the row, read after the direction (its registers were not needed before)
    if (!fresh) {
      constexpr int V = Seg<T, L>::V;
#pragma unroll
      for (int s = 0; s < Seg<T, L>::K / V; ++s)
        load_slot<A, V>(at.m, &seg.m[s * V], (int64_t(s) * L + lane) * V, n, active, vec);
    }
    const ElementCoef<A> c = element_coef(ap, bc, d.a, d.b, fresh);
    A s7[7];
    element_moments<T, L>(seg, c, v, n, lane, active, fresh, vec, s7);
    A s2[2] = {s7[0], s7[5]};  // <w,u^>, bad
    team_sum<L, 2>(s2, sm);
    const A cu = s2[0] / rs.ww;  // u = u^ - cu w
    A s3[3];
    element_move<T, L>(seg, c, A(ap.lr), cu, s3);
    team_sum<L, 3>(s3, sm);
    f = row_finish(Kind::Sphere, s3[0], s3[1], s3[2], rho, A(1e4));
    fin_ok = f.ok && s2[1] == A(0);
  }
  const bool go = active && d.ok;
  if (active && !go && lane == 0) report_skip(p.report, it.tensor, row);
  if (go && !fin_ok && lane == 0) report_skip(p.report, it.tensor, row);
  if (!(go && fin_ok)) return;
  if (!row_v) store_v<T, L>(seg, v, n, lane, vec);  // before finish: seg.g holds v'
  seg.finish(f.f, f.p, f.q);
  seg.store(at.w, at.m, n, lane, vec, sr);
  if (row_v && lane == 0) simt::stg(v, A(v_new));
}

// ---- chunks of split rows ---------------------------------------------------------------

// The split rows' partial sums (kAdamPartial a chunk; arrive_split, combine_split).
template <typename A>
MSGD_DEV A* adam_partials(const AdamParams<A>& ap) {
  return reinterpret_cast<A*>(ap.p.ws + ap.partial);
}

template <typename T, int Phase>
MSGD_DEV void adam_split_item(const AdamParams<typename Traits<T>::A>& ap, const Item& it,
                              Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  constexpr int L = kBlock;
  constexpr int64_t kChunk = int64_t(kBlock) * SlotsOf<A>::K;
  const Params<A>& p = ap.p;
  const Workspace<A> ws(p);
  const int t = simt::tid();
  const auto [e, n, kind, fresh] = item_tensor(p.table, it);
  const bool row_v = kind != Kind::Euclidean && ap.row_v != 0;
  const int64_t base = it.chunk * kChunk;
  const int64_t len = n - base < kChunk ? n - base : kChunk;
  const auto at = tensor_at<T, Buffers::Adam>(e, it.row * n + base, it.row, row_v);
  const bool vec = at.aligned();
  A* srow = ws.split_row + it.split * 8;  // {a, b, dir_ok, f, p, q, fin_ok, lr k (row v) | cu (element v)}
  const BiasCorrection bc = bias_correction(ap, e);
  Seg<T, L> seg;

  if constexpr (Phase == 1) {
    seg.load(at.w, at.g, nullptr, len, t, true, vec);
    A s4[4];
    seg.sums(s4);
    s4[3] = grad_bad(seg);
    team_sum<L, 4>(s4, sm);
    if (!arrive_split<kAdamPartial>(ws, it, adam_partials(ap), s4, sm)) return;
    if (t == 0) {
      simt::fence();
      double v4[4];
      combine_split<kAdamPartial>(adam_partials(ap), it, v4);
      if (kind == Kind::Euclidean) {
        simt::stg(srow + 2, v4[3] == 0.0 ? A(1) : A(0));
      } else {
        RowSums<double> rs;
        rs.ww = v4[0]; rs.wg = v4[1]; rs.gg = v4[2]; rs.bad = v4[3];
        const Direction<double> d = row_direction(Kind::Sphere, rs, 0.0);
        simt::stg(srow + 0, A(d.a));
        simt::stg(srow + 1, A(d.b));
        simt::stg(srow + 2, d.ok ? A(1) : A(0));
      }
    }
    return;
  } else {
    if (srow[2] == A(0)) {  // a non-finite gradient: the row is left unchanged
      if (Phase == 2 && it.chunk == 0 && t == 0) report_skip(p.report, it.tensor, it.row);
      return;
    }
    if (kind == Kind::Euclidean) {  // AdamW: phase 2 writes the chunk
      if constexpr (Phase == 2) {
        seg.load(at.w, at.g, fresh ? nullptr : at.m, len, t, true, vec);
        adamw_segment<T, L>(ap, bc, seg, at.v, len, t, fresh, vec);
        seg.store(at.w, at.m, len, t, vec, rounding(e, it.row * n + base));
      }
      return;
    }
    if (Phase == 3 && srow[6] == A(0)) return;  // finish not finite: row unchanged
    const A a = srow[0], b = srow[1];
    const SR sr = rounding(e, it.row * n + base);
    if (row_v) {
      seg.load(at.w, at.g, fresh ? nullptr : at.m, len, t, true, vec);
      const A cm = fresh ? A(0) : A(ap.beta1), cd = A(1 - ap.beta1);
      if constexpr (Phase == 2) {
        // the (w, d, m) dots of the chunk, d formed element-wise (no cancellation in <d,d>)
        A q1[4] = {0, 0, 0, 0}, q2[2] = {0, 0};  // {ww, wd, dd, wm}, {dm, mm}
#pragma unroll
        for (int i = 0; i < Seg<T, L>::K; ++i) {
          const A wi = seg.w[i], mi = seg.m[i];
          const A di = a * seg.g[i] + b * wi;
          q1[0] += wi * wi; q1[1] += wi * di; q1[2] += di * di; q1[3] += wi * mi;
          q2[0] += di * mi; q2[1] += mi * mi;
        }
        team_sum<L, 4>(q1, sm);
        team_sum<L, 2>(q2, sm);
        const A q6[6] = {q1[0], q1[1], q1[2], q1[3], q2[0], q2[1]};
        if (!arrive_split<kAdamPartial>(ws, it, adam_partials(ap), q6, sm)) return;
        if (t == 0) {
          simt::fence();
          double s[6];
          combine_split<kAdamPartial>(adam_partials(ap), it, s);
          DirDots<double> q;
          q.ww = s[0]; q.wd = s[1]; q.dd = s[2]; q.wm = s[3]; q.dm = s[4]; q.mm = s[5];
          const double v_old = fresh ? 0.0 : double(simt::ldg(at.v_row));
          const double v_new = ap.beta2 * v_old + (1 - ap.beta2) * q.dd;
          const double k = 1 / (bc.bc1 * (std::sqrt(v_new / bc.bc2) + ap.eps));
          const double dm_ = fresh ? 0.0 : ap.beta1, dd_ = 1 - ap.beta1;  // m' = dm_ m + dd_ d
          const double yd = -ap.lr * k * dd_, ym = -ap.lr * k * dm_;      // y = w + yd d + ym m
          const double yy = gram(q, 1.0, yd, ym, 1.0, yd, ym);
          const double y_m = gram(q, 1.0, yd, ym, 0.0, dd_, dm_);
          const double mm = gram(q, 0.0, dd_, dm_, 0.0, dd_, dm_);
          const float* radius = reinterpret_cast<const float*>(e[kRadius]);
          const double rho = radius ? double(radius[it.row]) : 1.0;
          const Finish<double> f = row_finish(Kind::Sphere, yy, y_m, mm, rho, 1e4);
          const bool ok = f.ok && std::isfinite(v_new);
          simt::stg(srow + 3, A(f.f));
          simt::stg(srow + 4, A(f.p));
          simt::stg(srow + 5, A(f.q));
          simt::stg(srow + 6, ok ? A(1) : A(0));
          simt::stg(srow + 7, A(ap.lr * k));
          if (ok) simt::stg(at.v_row, A(v_new));
          else report_skip(p.report, it.tensor, it.row);
        }
      } else {
        A s3[3];
        row_v_move<T, L>(seg, a, b, cm, cd, srow[7], s3);
        seg.finish(srow[3], srow[4], srow[5]);
        seg.store(at.w, at.m, len, t, vec, sr);
      }
      return;
    }
    // v per element
    seg.load(at.w, at.g, fresh ? nullptr : at.m, len, t, true, vec);
    const ElementCoef<A> c = element_coef(ap, bc, a, b, fresh);
    A s7[7];
    element_moments<T, L>(seg, c, at.v, len, t, true, fresh, vec, s7);
    if constexpr (Phase == 2) {
      A q1[4] = {s7[0], s7[1], s7[2], s7[3]}, q2[3] = {s7[4], s7[5], s7[6]};
      team_sum<L, 4>(q1, sm);
      team_sum<L, 3>(q2, sm);
      const A q7[7] = {q1[0], q1[1], q1[2], q1[3], q2[0], q2[1], q2[2]};
      if (!arrive_split<kAdamPartial>(ws, it, adam_partials(ap), q7, sm)) return;
      if (t == 0) {
        simt::fence();
        double s[7];
        combine_split<kAdamPartial>(adam_partials(ap), it, s);
        const double wu = s[0], uu = s[1], wm = s[2], um = s[3], mm = s[4], ww = s[6];
        const double cu = wu / ww;  // u = u^ - cu w
        const double wu_t = wu - cu * ww;
        const double uu_t = uu - 2 * cu * wu + cu * cu * ww;
        const double yy = ww - 2 * ap.lr * wu_t + ap.lr * ap.lr * uu_t;
        const double y_m = wm - ap.lr * (um - cu * wm);
        const float* radius = reinterpret_cast<const float*>(e[kRadius]);
        const double rho = radius ? double(radius[it.row]) : 1.0;
        const Finish<double> f = row_finish(Kind::Sphere, yy, y_m, mm, rho, 1e4);
        const bool ok = f.ok && std::isfinite(uu) && s[5] == 0.0;
        simt::stg(srow + 3, A(f.f));
        simt::stg(srow + 4, A(f.p));
        simt::stg(srow + 5, A(f.q));
        simt::stg(srow + 6, ok ? A(1) : A(0));
        simt::stg(srow + 7, A(cu));
        if (!ok) report_skip(p.report, it.tensor, it.row);
      }
    } else {
      A s3[3];
      element_move<T, L>(seg, c, A(ap.lr), srow[7], s3);
      store_v<T, L>(seg, at.v, len, t, vec);
      seg.finish(srow[3], srow[4], srow[5]);
      seg.store(at.w, at.m, len, t, vec, sr);
    }
  }
}

// ---- one CTA, one item ----------------------------------------------------------

template <typename T, int Phase>
MSGD_DEV void adam_block(const AdamParams<typename Traits<T>::A>& ap, int64_t b,
                         Smem<typename Traits<T>::A>& sm) {
  const Item it = reinterpret_cast<const Item*>(ap.p.blob + ap.p.L.items[Phase - 1])[b];
  if (it.kind == kItemSplit) {
    adam_split_item<T, Phase>(ap, it, sm);
    return;
  }
  if constexpr (Phase == 2) {  // the Adam plan has Range items only (no adaptive groups)
    switch (it.tier) {
      case 0: adam_team_item<T, tier_lanes(0)>(ap, it, sm); break;
      case 1: adam_team_item<T, tier_lanes(1)>(ap, it, sm); break;
      case 2: adam_team_item<T, tier_lanes(2)>(ap, it, sm); break;
      case 3: adam_team_item<T, tier_lanes(3)>(ap, it, sm); break;
      default: adam_team_item<T, tier_lanes(4)>(ap, it, sm); break;
    }
  }
}

}  // namespace cuda
}  // namespace msgd
