// The bodies of the fused CUDA step (one CTA = one work item of the plan; see
// fused_step_plan.h). Written against simt.h so that the same code runs on a
// GPU (fused_step_cuda.cu) and in the host emulator (emu/).
//
// Per row, everything follows csrc/core/row_math.h, as the CPU kernel does:
//   load w, g, m once into registers -> team sums <w,w>,<w,g>,<g,g>,bad
//   -> direction d = a g + b w (times s_G) -> momentum, y = w - lr u, sums of
//   y and m -> finish f, p, q -> store w = f y, m = p m + q y once.
// Sums are per-thread sequential over the thread's elements, then a fixed
// butterfly (sub-warp teams) or warp butterfly + warp partials in warp order
// (multi-warp teams): every thread of a team ends with the same bits, and the
// result does not depend on timing (no float atomics anywhere).
//
// Every write to the workspace (data other CTAs of the same launch read) goes
// through simt::stg, so that the emulator can hold it back until the writer's
// simt::fence() (or the end of its CTA) and catch a missing fence.
#pragma once

#include <cstdint>

#include "../core/row_math.h"
#include "../core/stochastic_round.h"
#include "fused_step_plan.h"
#include "simt.h"

namespace msgd {
namespace cuda {

template <typename T> struct Traits;
template <> struct Traits<float> { using A = float; static constexpr int V = 4; };
template <> struct Traits<double> { using A = double; static constexpr int V = 2; };
template <> struct Traits<bf16> { using A = float; static constexpr int V = 8; };
template <> struct Traits<fp16> { using A = float; static constexpr int V = 8; };

template <typename A> struct SlotsOf { static constexpr int K = 16; };
template <> struct SlotsOf<double> { static constexpr int K = 8; };

template <typename A>
struct Params {
  const int64_t* table;  // device tensor table (n_tensors x kTensorFields)
  const unsigned char* blob;
  unsigned char* ws;
  int64_t* report;       // n_tensors x kReportFields, accumulated
  PlanLayout L;
  A lr, mu, wd, curvature, distance, psi_max_norm;
  int adaptive;
  int nesterov;
  int polar;  // Stiefel blocks: the polar retraction (else QR)
};

// The kernels' parameters for one step of `plan`: the launcher's and the emulator's alike.
template <typename A>
Params<A> make_params(const HostPlan& plan, const int64_t* table, const void* blob, void* ws, int64_t* report,
                      const StepOptions& opt) {
  Params<A> p{};
  p.table = table;
  p.blob = static_cast<const unsigned char*>(blob);
  p.ws = static_cast<unsigned char*>(ws);
  p.report = report;
  p.L = plan.layout;
  p.lr = A(opt.lr);
  p.mu = A(opt.momentum);
  p.wd = A(opt.weight_decay);
  p.curvature = A(opt.curvature);
  p.distance = A(opt.distance);
  p.psi_max_norm = A(opt.psi_max_norm);
  p.adaptive = int(opt.adaptive);
  p.nesterov = opt.nesterov ? 1 : 0;
  p.polar = opt.retraction == Retraction::Polar ? 1 : 0;
  return p;
}

template <typename A>
struct Smem {
  A red[kWarps * 4];  // warp partials of a team reduction
  A tan[kBlock];      // Groups items: ||g~||^2 of each team's row
  int ok[kBlock];     // Groups items: the row's direction is finite
  int flag[2];
  A col[kWarps * kColumnsPerItem * 4];  // Columns items: each warp's partial sums per column
  A coef[kColumnsPerItem * 8];          // Columns items: a, b, go, f, p, q, finish ok per column
};

// ---- 16-byte vectors of each storage type -------------------------------------

MSGD_DEV void unpack(const uint32_t (&r)[4], float* o) {
  for (int j = 0; j < 4; ++j) o[j] = bits_float(r[j]);
}
MSGD_DEV void unpack(const uint32_t (&r)[4], double* o) {
  o[0] = simt::bits_double(r[0], r[1]);
  o[1] = simt::bits_double(r[2], r[3]);
}
MSGD_DEV void unpack_bf16(const uint32_t (&r)[4], float* o) {
  for (int j = 0; j < 4; ++j) {
    o[2 * j] = to_float(bf16{uint16_t(r[j] & 0xffffu)});
    o[2 * j + 1] = to_float(bf16{uint16_t(r[j] >> 16)});
  }
}
MSGD_DEV void unpack_fp16(const uint32_t (&r)[4], float* o) {
  for (int j = 0; j < 4; ++j) {
    o[2 * j] = to_float(fp16{uint16_t(r[j] & 0xffffu)});
    o[2 * j + 1] = to_float(fp16{uint16_t(r[j] >> 16)});
  }
}

// V elements of the storage type at p (16 bytes) into math-type registers.
template <bool RO>
MSGD_DEV void vload(const float* p, float* o) {
  uint32_t r[4];
  if (RO) simt::ld16_ro(p, r); else simt::ld16(p, r);
  unpack(r, o);
}
template <bool RO>
MSGD_DEV void vload(const double* p, double* o) {
  uint32_t r[4];
  if (RO) simt::ld16_ro(p, r); else simt::ld16(p, r);
  unpack(r, o);
}
template <bool RO>
MSGD_DEV void vload(const bf16* p, float* o) {
  uint32_t r[4];
  if (RO) simt::ld16_ro(p, r); else simt::ld16(p, r);
  unpack_bf16(r, o);
}
template <bool RO>
MSGD_DEV void vload(const fp16* p, float* o) {
  uint32_t r[4];
  if (RO) simt::ld16_ro(p, r); else simt::ld16(p, r);
  unpack_fp16(r, o);
}

// Stochastic rounding state of one row: whether its tensor asks for it
// (kStochasticRound, bf16 only), the tensor's key (kRoundingKey), and the
// tensor-wide index of the row's first element.
struct SR {
  bool on;
  uint64_t key;
  int64_t base;
};

MSGD_DEV SR rounding(const int64_t* e, int64_t base) {
  return SR{(e[kFlags] & kStochasticRound) != 0, uint64_t(e[kRoundingKey]), base};
}

MSGD_DEV void vstore(float* p, const float* v, const SR&, int64_t) {
  uint32_t r[4];
  for (int j = 0; j < 4; ++j) r[j] = float_bits(v[j]);
  simt::st16(p, r);
}
MSGD_DEV void vstore(double* p, const double* v, const SR&, int64_t) {
  uint32_t r[4];
  simt::double_bits(v[0], r[0], r[1]);
  simt::double_bits(v[1], r[2], r[3]);
  simt::st16(p, r);
}
MSGD_DEV uint16_t bf16_out(float v, const SR& sr, int64_t e) {
  return sr.on ? to_bf16_stochastic(v, sr_bits16(sr.key, uint64_t(sr.base + e))).bits : to_bf16(v).bits;
}
MSGD_DEV void vstore(bf16* p, const float* v, const SR& sr, int64_t e0) {
  uint32_t r[4];
  for (int j = 0; j < 4; ++j)
    r[j] = uint32_t(bf16_out(v[2 * j], sr, e0 + 2 * j)) |
           (uint32_t(bf16_out(v[2 * j + 1], sr, e0 + 2 * j + 1)) << 16);
  simt::st16(p, r);
}
MSGD_DEV void vstore(fp16* p, const float* v, const SR&, int64_t) {
  uint32_t r[4];
  for (int j = 0; j < 4; ++j)
    r[j] = uint32_t(to_fp16(v[2 * j]).bits) | (uint32_t(to_fp16(v[2 * j + 1]).bits) << 16);
  simt::st16(p, r);
}
// One element (misaligned rows, row tails), through explicit global accesses.
template <bool RO> MSGD_DEV float sload(const float* p, int64_t e) { return RO ? simt::ldg_ro(p + e) : simt::ldg(p + e); }
template <bool RO> MSGD_DEV double sload(const double* p, int64_t e) { return RO ? simt::ldg_ro(p + e) : simt::ldg(p + e); }
template <bool RO> MSGD_DEV float sload(const bf16* p, int64_t e) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p) + e;
  return to_float(bf16{RO ? simt::ldg_ro(q) : simt::ldg(q)});
}
template <bool RO> MSGD_DEV float sload(const fp16* p, int64_t e) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p) + e;
  return to_float(fp16{RO ? simt::ldg_ro(q) : simt::ldg(q)});
}
MSGD_DEV void sstore(float* p, int64_t e, float v, const SR&) { simt::stg(p + e, v); }
MSGD_DEV void sstore(double* p, int64_t e, double v, const SR&) { simt::stg(p + e, v); }
MSGD_DEV void sstore(bf16* p, int64_t e, float v, const SR& sr) {
  simt::stg(reinterpret_cast<uint16_t*>(p) + e, bf16_out(v, sr, e));
}
MSGD_DEV void sstore(fp16* p, int64_t e, float v, const SR&) {
  simt::stg(reinterpret_cast<uint16_t*>(p) + e, to_fp16(v).bits);
}

// Math-type momentum: V values = V*sizeof(A)/16 vectors.
template <typename A, int V>
MSGD_DEV void mload(const A* p, A* o) {
  constexpr int per = 16 / int(sizeof(A));
  for (int h = 0; h < V / per; ++h) vload<false>(p + h * per, o + h * per);
}
template <typename A, int V>
MSGD_DEV void mstore(A* p, const A* v) {
  constexpr int per = 16 / int(sizeof(A));
  const SR none{false, 0, 0};
  for (int h = 0; h < V / per; ++h) vstore(p + h * per, v + h * per, none, 0);
}

// ---- a tensor's buffers at an element offset -------------------------------------

MSGD_DEV bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whose buffers a table entry holds: SGD's (m where momentum is on) or the Adam family's (m
// always, the plan's guard requires it, and v).
enum class Buffers { Sgd, Adam };

// Pointers into one tensor's buffers (its table entry) at one element offset of a row.
template <typename T, Buffers B>
struct TensorAt {
  using A = typename Traits<T>::A;
  T* w;
  const T* g;
  A* m;            // null: an SGD tensor without momentum
  A* v;            // Adam, v per element: the second moment at the offset; SGD: null
  A* v_row;        // Adam, v per row: the row's one v; SGD: null
  bool v_per_row;  // Adam: v per row (SecondMoment::Row on a sphere row): v_row in use, not v
  // Every buffer in use 16-byte aligned at the offset: the rows' 16-byte vector accesses apply.
  MSGD_DEV bool aligned() const {
    return aligned16(w) && aligned16(g) && ((B == Buffers::Sgd && m == nullptr) || aligned16(m)) &&
           (B == Buffers::Sgd || v_per_row || aligned16(v));
  }
};

// The buffers of table entry `e` at element `offset` of row `row` (Adam's v per row: `v_per_row`).
template <typename T, Buffers B = Buffers::Sgd>
MSGD_DEV TensorAt<T, B> tensor_at(const int64_t* e, int64_t offset, int64_t row = 0, bool v_per_row = false) {
  using A = typename Traits<T>::A;
  constexpr bool adam = B == Buffers::Adam;
  TensorAt<T, B> at;
  at.w = reinterpret_cast<T*>(e[kParam]) + offset;
  at.g = reinterpret_cast<const T*>(e[kGrad]) + offset;
  at.m = (adam || e[kMomentum]) ? reinterpret_cast<A*>(e[kMomentum]) + offset : nullptr;
  at.v = adam ? reinterpret_cast<A*>(e[kSecondMoment]) + offset : nullptr;
  at.v_row = adam ? reinterpret_cast<A*>(e[kSecondMoment]) + row : nullptr;
  at.v_per_row = v_per_row;
  return at;
}

// The table entry of an item's tensor, with the fields every item body reads first.
struct ItemTensor {
  const int64_t* e;
  int64_t row_len;
  Kind kind;
  bool fresh;  // the momentum buffer holds no history yet (kMomentumFresh)
};

MSGD_DEV ItemTensor item_tensor(const int64_t* table, const Item& it) {
  const int64_t* e = table + int64_t(it.tensor) * kTensorFields;
  return ItemTensor{e, e[kRowLen], Kind(e[kKind]), (e[kFlags] & kMomentumFresh) != 0};
}

// ---- a team's segment of a row in registers ------------------------------------
//
// Thread `lane` of a team of L holds vectors v = s*L + lane (s < K/V), i.e.
// elements v*V .. v*V+V-1. A whole in-range vector at 16-byte-aligned
// addresses is one access per array; the rest (misaligned rows, the tail) is
// loaded element by element into the same registers, so the arithmetic and
// its rounding do not depend on alignment.

template <typename T, int L>
struct Seg {
  using A = typename Traits<T>::A;
  static constexpr int V = Traits<T>::V;
  static constexpr int K = SlotsOf<A>::K;
  A w[K], g[K], m[K];

  MSGD_DEV void load(const T* wp, const T* gp, const A* mp, int64_t len, int lane, bool active,
                     bool vec) {
#pragma unroll
    for (int s = 0; s < K / V; ++s) {
      const int64_t e0 = (int64_t(s) * L + lane) * V;
      if (active && vec && e0 + V <= len) {
        vload<false>(wp + e0, &w[s * V]);
        vload<true>(gp + e0, &g[s * V]);
        if (mp) {
          mload<A, V>(mp + e0, &m[s * V]);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) m[s * V + q] = A(0);
        }
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const int64_t e = e0 + q;
          const bool in = active && e < len;
          w[s * V + q] = in ? A(sload<false>(wp, e)) : A(0);
          g[s * V + q] = in ? A(sload<true>(gp, e)) : A(0);
          m[s * V + q] = (in && mp) ? simt::ldg(mp + e) : A(0);
        }
      }
    }
  }

  // Stores w (and m when mp) for the in-range elements.
  MSGD_DEV void store(T* wp, A* mp, int64_t len, int lane, bool vec, const SR& sr) const {
#pragma unroll
    for (int s = 0; s < K / V; ++s) {
      const int64_t e0 = (int64_t(s) * L + lane) * V;
      if (vec && e0 + V <= len) {
        vstore(wp + e0, &w[s * V], sr, e0);
        if (mp) mstore<A, V>(mp + e0, &m[s * V]);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const int64_t e = e0 + q;
          if (e < len) {
            sstore(wp, e, w[s * V + q], sr);
            if (mp) simt::stg(mp + e, m[s * V + q]);
          }
        }
      }
    }
  }

  MSGD_DEV void sums(A (&s4)[4]) const {
    A ww = 0, wg = 0, gg = 0, bad = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      ww += w[i] * w[i];
      wg += w[i] * g[i];
      gg += g[i] * g[i];
      bad += g[i] - g[i];
    }
    s4[0] = ww; s4[1] = wg; s4[2] = gg; s4[3] = bad;
  }

  // sum of (a g + b w)^2 over this thread's elements (SPEC: ||g~||^2, summed explicitly)
  MSGD_DEV A tangent_sq(A a, A b) const {
    A acc = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const A v = a * g[i] + b * w[i];
      acc += v * v;
    }
    return acc;
  }

  // SPEC §3 steps 3-4 in place: w <- y = w - lr u, m <- new momentum; returns the
  // thread's sums {<y,y>, <y,m>, <m,m>}. Padding elements stay 0.
  MSGD_DEV void move(A a, A b, bool has_m, A mu, bool fresh, bool nesterov, A lr, A (&s3)[3]) {
    A yy = 0, ym = 0, mm = 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const A d = a * g[i] + b * w[i];
      A mi = m[i];
      const A u = has_m ? momentum_step(d, mi, mu, fresh, nesterov) : d;
      const A y = w[i] - lr * u;
      w[i] = y;
      m[i] = mi;
      yy += y * y;
      ym += y * mi;
      mm += mi * mi;
    }
    s3[0] = yy; s3[1] = ym; s3[2] = mm;
  }

  // SPEC §3 steps 4-6: w <- f y, m <- p m + q y.
  MSGD_DEV void finish(A f, A p, A q) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      m[i] = p * m[i] + q * w[i];
      w[i] = f * w[i];
    }
  }
};

// Sum of v over the team of L threads containing this one; every thread of the
// team gets the same bits. All threads of the CTA call it together.
template <int L, int N, typename A>
MSGD_DEV void team_sum(A (&v)[N], Smem<A>& sm) {
  static_assert(N <= 4, "team_sum: at most 4 values");
  if constexpr (L > 1 && L <= 32) {
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1)
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += simt::shfl_xor(v[i], off);
  } else if constexpr (L > 32) {
    static_assert(L % 32 == 0 && L <= kBlock, "team_sum: team of whole warps");
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += simt::shfl_xor(v[i], off);
    const int t = simt::tid();
    if (t % 32 == 0)
#pragma unroll
      for (int i = 0; i < N; ++i) sm.red[(t / 32) * N + i] = v[i];
    simt::sync();
    const int first = (t / L) * (L / 32);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A acc = sm.red[first * N + i];
      for (int w = 1; w < L / 32; ++w) acc += sm.red[(first + w) * N + i];
      v[i] = acc;
    }
    simt::sync();
  }
}

template <typename A>
struct Workspace {
  A* row_tan;
  int32_t* row_ok;
  A* group_scale;
  int32_t* group_ok;
  uint32_t* group_count;
  uint32_t* split_count;
  A* split_row;
  A* partial;

  MSGD_DEV explicit Workspace(const Params<A>& p)
      : row_tan(reinterpret_cast<A*>(p.ws + p.L.row_tan)),
        row_ok(reinterpret_cast<int32_t*>(p.ws + p.L.row_ok)),
        group_scale(reinterpret_cast<A*>(p.ws + p.L.group_scale)),
        group_ok(reinterpret_cast<int32_t*>(p.ws + p.L.group_ok)),
        group_count(reinterpret_cast<uint32_t*>(p.ws + p.L.group_count)),
        split_count(reinterpret_cast<uint32_t*>(p.ws + p.L.split_count)),
        split_row(reinterpret_cast<A*>(p.ws + p.L.split_row)),
        partial(reinterpret_cast<A*>(p.ws + p.L.partial)) {}
};

MSGD_DEV void report_skip(int64_t* report, int64_t t, int64_t row) {
  simt::atomic_add(report + t * kReportFields + kSkippedRows, int64_t(1));
  simt::atomic_min_unsigned(report + t * kReportFields + kFirstSkippedRow, row);
}

// The CTA that completes group k sums its rows' ||g~||^2 (row_index order,
// strided over threads, then the fixed team reduction) into s_G and ok_G.
template <typename A>
MSGD_DEV void combine_group(const Params<A>& p, const Workspace<A>& ws, int64_t k, Smem<A>& sm) {
  const int64_t* groups = reinterpret_cast<const int64_t*>(p.blob + p.L.groups);
  const int64_t start = groups[k * kGroupFields + kGroupStart];
  const int64_t count = groups[k * kGroupFields + kGroupCount];
  A v[2] = {A(0), A(0)};
  for (int64_t j = simt::tid(); j < count; j += kBlock) {
    v[0] += simt::load_cg(ws.row_tan + start + j);
    v[1] += simt::load_cg(ws.row_ok + start + j) ? A(0) : A(1);
  }
  team_sum<kBlock, 2>(v, sm);
  if (simt::tid() == 0) {
    simt::stg(ws.group_scale + k, adaptive_scale(Adaptive(p.adaptive), v[0], p.curvature, p.distance));
    simt::stg(ws.group_ok + k, int32_t(v[1] == A(0) ? 1 : 0));
  }
}

// Counts `rows` arrivals at group k (after this CTA's row_tan/row_ok writes, each
// fenced by its writer); if they complete the group, this CTA combines it.
template <typename A>
MSGD_DEV void arrive_group(const Params<A>& p, const Workspace<A>& ws, int64_t k, uint32_t rows,
                           Smem<A>& sm) {
  simt::sync();
  if (simt::tid() == 0) {
    const int64_t* groups = reinterpret_cast<const int64_t*>(p.blob + p.L.groups);
    const uint32_t total = uint32_t(groups[k * kGroupFields + kGroupCount]);
    simt::fence();
    const uint32_t before = simt::atomic_add(ws.group_count + k, rows);
    const bool last = before + rows == total;
    if (last) {
      simt::stg(ws.group_count + k, 0u);  // ready for the next step; no other CTA touches it now
      simt::fence();
    }
    sm.flag[1] = last ? 1 : 0;
  }
  simt::sync();
  if (sm.flag[1]) combine_group(p, ws, k, sm);
}

// A row's ||g~||^2 = ||a g + b w||^2 from its sums <w,w>, <w,g>, <g,g> alone (split rows,
// column tiles: the elements are not held when the direction is formed); in double, clamped
// at 0; PSI rows: psi_tangent_sq. Loses relative accuracy only when g is nearly radial, where
// s_G = 1 anyway unless ||g~|| is large.
template <typename A>
MSGD_DEV A tangent_sq_from_sums(Kind kind, const Direction<A>& d, const RowSums<A>& rs) {
  if (kind == Kind::Psi) return psi_tangent_sq(rs);
  const double a = double(d.a), b = double(d.b);
  const double tsq = a * a * double(rs.gg) + 2.0 * a * b * double(rs.wg) + b * b * double(rs.ww);
  return A(tsq > 0.0 ? tsq : 0.0);
}

// ---- items processed by teams (Range, Groups, GroupSlice) ------------------------

// The row that team (or Stiefel thread) k of an item steps, by how the item lists its rows
// (`rows_as`: the kind of a team item, the tier of a Stiefel item, the same numbers):
// kItemRange, `count` consecutive rows from it.row; kItemGroups, the k-th TeamSlot (the row,
// its group's first team and number of teams in the CTA); kItemGroupSlice, position
// it.pos + k of the row index (`pos`, where the row's ||g~||^2 goes). Inactive: row 0, pos -1.
struct ItemRow {
  int64_t row = 0, pos = -1;
  int gfirst = 0, gcount = 0;
};

template <typename A>
MSGD_DEV ItemRow item_row(const Params<A>& p, const Item& it, int32_t rows_as, int k, bool active) {
  ItemRow r;
  if (!active) return r;
  if (rows_as == kItemRange) {
    r.row = it.row + k;
  } else if (rows_as == kItemGroups) {
    const TeamSlot ts = reinterpret_cast<const TeamSlot*>(p.blob + p.L.slots)[it.pos + k];
    r.row = ts.row;
    r.gfirst = ts.first;
    r.gcount = ts.count;
  } else {
    r.pos = it.pos + k;
    r.row = reinterpret_cast<const int64_t*>(p.blob + p.L.row_index)[r.pos];
  }
  return r;
}

// A row's ||g~||^2 and whether its direction is finite, for the group's pre-pass combine
// (combine_group): written to its row_index position, fenced before the group's counter.
template <typename A>
MSGD_DEV void publish_row(const Workspace<A>& ws, int64_t pos, A tsq, bool ok) {
  simt::stg(ws.row_tan + pos, ok ? tsq : A(0));
  simt::stg(ws.row_ok + pos, int32_t(ok ? 1 : 0));
  simt::fence();
}

// Groups items (whole groups in this CTA): s_G and ok_G of the caller's group. The team (or
// Stiefel thread) `slot` publishes its row's ||g~||^2 and ok in shared memory when `publish`;
// after the barrier, each adds its group's values in the group's order (ItemRow gfirst, gcount).
// All threads of the CTA call it together.
template <typename A>
MSGD_DEV void cta_group_scale(const Params<A>& p, Smem<A>& sm, bool publish, int slot, A tsq, bool ok,
                              const ItemRow& ir, A& scale, bool& group_ok) {
  if (publish) {
    sm.tan[slot] = ok ? tsq : A(0);
    sm.ok[slot] = ok ? 1 : 0;
  }
  simt::sync();
  A sum = 0;
  int all = 1;
  for (int j = 0; j < ir.gcount; ++j) {
    sum += sm.tan[ir.gfirst + j];
    all &= sm.ok[ir.gfirst + j];
  }
  group_ok = all != 0;
  scale = adaptive_scale(Adaptive(p.adaptive), sum, p.curvature, p.distance);
}

template <typename T, int L, int Phase>
MSGD_DEV void team_item(const Params<typename Traits<T>::A>& p, const Item& it,
                        Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  const Workspace<A> ws(p);
  const int t = simt::tid();
  const int team = t / L, lane = t % L;
  const auto [e, n, kind, fresh] = item_tensor(p.table, it);

  const bool active = team < it.count;
  const ItemRow ir = item_row(p, it, it.kind, team, active);
  const int64_t row = ir.row;
  const auto at = tensor_at<T>(e, row * n);
  const bool vec = at.aligned();

  Seg<T, L> seg;
  seg.load(at.w, at.g, (Phase == 2 && !fresh) ? at.m : nullptr, n, lane, active, vec);
  A s4[4];
  seg.sums(s4);
  team_sum<L, 4>(s4, sm);
  RowSums<A> rs;
  rs.ww = s4[0]; rs.wg = s4[1]; rs.gg = s4[2]; rs.bad = s4[3];
  Direction<A> d = row_direction(kind, rs, p.wd);

  A scale = A(1);
  bool group_ok = true;
  if (it.kind != kItemRange) {
    if (Phase == 1 || it.kind == kItemGroups) {
      A tan[1] = {kind == Kind::Psi ? A(0) : seg.tangent_sq(d.a, d.b)};
      if (kind != Kind::Psi) team_sum<L, 1>(tan, sm);
      const A tsq = kind == Kind::Psi ? psi_tangent_sq(rs) : tan[0];
      if (Phase == 1) {  // GroupSlice pre-pass: publish the row, then arrive at the group
        if (active && lane == 0) publish_row(ws, ir.pos, tsq, d.ok);
        arrive_group(p, ws, it.group, uint32_t(it.count), sm);
        return;
      }
      cta_group_scale(p, sm, active && lane == 0, team, tsq, d.ok, ir, scale, group_ok);
    } else {  // GroupSlice, main phase: s_G from the pre-pass
      scale = ws.group_scale[it.group];
      group_ok = ws.group_ok[it.group] != 0;
    }
  }
  if constexpr (Phase == 2) {
    const bool go = active && d.ok && group_ok;
    if (active && !go && lane == 0) report_skip(p.report, it.tensor, row);
    A s3[3];
    seg.move(d.a * scale, d.b * scale, at.m != nullptr, p.mu, fresh, p.nesterov != 0, p.lr, s3);
    const SR sr = rounding(e, row * n);
    if (kind == Kind::Euclidean) {  // no retraction: write in place
      if (go) seg.store(at.w, at.m, n, lane, vec, sr);
      return;
    }
    team_sum<L, 3>(s3, sm);
    const float* radius = reinterpret_cast<const float*>(e[kRadius]);
    const A rho = (radius && active) ? A(radius[row]) : A(1);
    const Finish<A> f = row_finish(kind, s3[0], s3[1], s3[2], rho, p.psi_max_norm);
    if (go && !f.ok && lane == 0) report_skip(p.report, it.tensor, row);
    if (go && f.ok) {
      seg.finish(f.f, f.p, f.q);
      seg.store(at.w, at.m, n, lane, vec, sr);
    }
  }
}

// ---- chunks of split rows ------------------------------------------------------

// Split rows: each chunk's CTA publishes N partial sums at `partials` + slot * Stride (SGD:
// Workspace::partial, 4 a chunk; Adam: its own region, kAdamPartial a chunk) and counts its
// arrival; true for the CTA that completes the row (its counter reset for the next step),
// which then adds the row's partials in chunk order (combine_split, in S: A or double).
template <int Stride, typename A, int N>
MSGD_DEV bool arrive_split(const Workspace<A>& ws, const Item& it, A* partials, const A (&v)[N], Smem<A>& sm) {
  static_assert(N <= Stride, "arrive_split: more sums than a chunk's partials hold");
  if (simt::tid() == 0) {
    for (int i = 0; i < N; ++i) simt::stg(partials + it.slot * Stride + i, v[i]);
    simt::fence();
    const uint32_t before = simt::atomic_add(ws.split_count + it.split, 1u);
    const bool last = before + 1 == uint32_t(it.count);
    if (last) {
      simt::fence();
      simt::stg(ws.split_count + it.split, 0u);
    }
    sm.flag[0] = last ? 1 : 0;
  }
  simt::sync();
  return sm.flag[0] != 0;
}

template <int Stride, typename A, typename S, int N>
MSGD_DEV void combine_split(const A* partials, const Item& it, S (&v)[N]) {
  const A* first = partials + (it.slot - it.chunk) * Stride;
  for (int i = 0; i < N; ++i) v[i] = S(0);
  for (int64_t c = 0; c < it.count; ++c)
    for (int i = 0; i < N; ++i) v[i] += S(simt::load_cg(first + c * Stride + i));
}

template <typename T, int Phase>
MSGD_DEV void split_item(const Params<typename Traits<T>::A>& p, const Item& it,
                         Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  constexpr int L = kBlock;
  constexpr int64_t kChunk = int64_t(kBlock) * SlotsOf<A>::K;
  const Workspace<A> ws(p);
  const int t = simt::tid();
  const auto [e, n, kind, fresh] = item_tensor(p.table, it);
  const int64_t base = it.chunk * kChunk;
  const int64_t len = n - base < kChunk ? n - base : kChunk;
  const auto at = tensor_at<T>(e, it.row * n + base);
  const bool vec = at.aligned();
  A* srow = ws.split_row + it.split * 8;  // {a, b, dir_ok, f, p, q, fin_ok, 0}
  Seg<T, L> seg;

  if constexpr (Phase == 1) {
    seg.load(at.w, at.g, nullptr, len, t, true, vec);
    A s4[4];
    seg.sums(s4);
    team_sum<L, 4>(s4, sm);
    if (!arrive_split<4>(ws, it, ws.partial, s4, sm)) return;
    if (t == 0) {
      simt::fence();
      A v[4];
      combine_split<4>(ws.partial, it, v);
      RowSums<A> rs;
      rs.ww = v[0]; rs.wg = v[1]; rs.gg = v[2]; rs.bad = v[3];
      const Direction<A> d = row_direction(kind, rs, p.wd);
      simt::stg(srow + 0, d.a);
      simt::stg(srow + 1, d.b);
      simt::stg(srow + 2, d.ok ? A(1) : A(0));
      if (it.group >= 0) {  // the chunks are gone by now: ||g~||^2 from the row sums
        publish_row(ws, it.pos, tangent_sq_from_sums(kind, d, rs), d.ok);
      }
    }
    if (it.group >= 0) arrive_group(p, ws, it.group, 1u, sm);
    return;
  } else {
    const bool dir_ok = srow[2] != A(0);
    A scale = A(1);
    bool group_ok = true;
    if (it.group >= 0) {
      scale = ws.group_scale[it.group];
      group_ok = ws.group_ok[it.group] != 0;
    }
    if (!(dir_ok && group_ok)) {
      if (Phase == 2 && it.chunk == 0 && t == 0) report_skip(p.report, it.tensor, it.row);
      return;
    }
    if (Phase == 3 && srow[6] == A(0)) return;  // finish not finite: row unchanged
    seg.load(at.w, at.g, fresh ? nullptr : at.m, len, t, true, vec);
    A s3[3];
    seg.move(srow[0] * scale, srow[1] * scale, at.m != nullptr, p.mu, fresh, p.nesterov != 0, p.lr, s3);
    const SR sr = rounding(e, it.row * n + base);
    if constexpr (Phase == 2) {
      if (kind == Kind::Euclidean) {
        seg.store(at.w, at.m, len, t, vec, sr);
        return;
      }
      team_sum<L, 3>(s3, sm);
      if (!arrive_split<4>(ws, it, ws.partial, s3, sm)) return;
      if (t == 0) {
        simt::fence();
        A v[3];
        combine_split<4>(ws.partial, it, v);
        const float* radius = reinterpret_cast<const float*>(e[kRadius]);
        const A rho = radius ? A(radius[it.row]) : A(1);
        const Finish<A> f = row_finish(kind, v[0], v[1], v[2], rho, p.psi_max_norm);
        simt::stg(srow + 3, f.f);
        simt::stg(srow + 4, f.p);
        simt::stg(srow + 5, f.q);
        simt::stg(srow + 6, f.ok ? A(1) : A(0));
        if (!f.ok) report_skip(p.report, it.tensor, it.row);
      }
    } else {
      seg.finish(srow[3], srow[4], srow[5]);
      seg.store(at.w, at.m, len, t, vec, sr);
    }
  }
}

// ---- tiles of adjacent columns (kColumns tensors) ---------------------------------

// One element of a column: math-type value to storage at `addr`, rounding index `e`
// (the index in W^T: column * d0 + j, sr.base 0).
MSGD_DEV void cstore(float* p, int64_t addr, int64_t, float v, const SR&) { simt::stg(p + addr, v); }
MSGD_DEV void cstore(double* p, int64_t addr, int64_t, double v, const SR&) { simt::stg(p + addr, v); }
MSGD_DEV void cstore(bf16* p, int64_t addr, int64_t e, float v, const SR& sr) {
  simt::stg(reinterpret_cast<uint16_t*>(p) + addr, bf16_out(v, sr, e));
}
MSGD_DEV void cstore(fp16* p, int64_t addr, int64_t, float v, const SR&) {
  simt::stg(reinterpret_cast<uint16_t*>(p) + addr, to_fp16(v).bits);
}

// Per-column sums of N values over the CTA: every warp's lane l holds its partial of column
// l; the partials are added in warp order by warp 0 (fixed order, every schedule the same
// bits). Returns the totals in warp 0's lanes (other warps: unspecified).
template <int N, typename A>
MSGD_DEV void column_sum(A (&v)[N], Smem<A>& sm) {
  const int t = simt::tid(), lane = t % 32, warp = t / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) sm.col[(warp * kColumnsPerItem + lane) * 4 + i] = v[i];
  simt::sync();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A acc = sm.col[lane * 4 + i];
      for (int k = 1; k < kWarps; ++k) acc += sm.col[(k * kColumnsPerItem + lane) * 4 + i];
      v[i] = acc;
    }
  }
  simt::sync();
}

// Up to 32 adjacent columns of a kColumns tensor (d1 columns of length d0, element j of
// column c at j * d1 + c): lane l of each warp takes column c0 + l, warp k the elements
// j = k, k + 16, ...; a warp's loads are 32 adjacent elements. Three passes over the
// columns: the sums of w and g, the moved sums of y and m, the write.
template <typename T, int Phase>
MSGD_DEV void column_item(const Params<typename Traits<T>::A>& p, const Item& it,
                          Smem<typename Traits<T>::A>& sm) {
  using A = typename Traits<T>::A;
  const Workspace<A> ws(p);
  const int t = simt::tid(), lane = t % 32, warp = t / 32;
  const auto [e, d0, kind, fresh] = item_tensor(p.table, it);
  const int64_t d1 = e[kRows];
  const bool active = lane < it.count;
  const int64_t c = it.row + (active ? lane : 0);
  const auto at = tensor_at<T>(e, c);
  const bool grouped = it.group >= 0;
  A* coef = sm.coef + lane * 8;

  A s4[4] = {A(0), A(0), A(0), A(0)};
  if (active)
    for (int64_t j = warp; j < d0; j += kWarps) {
      const A wi = A(sload<false>(at.w, j * d1)), gi = A(sload<true>(at.g, j * d1));
      s4[0] += wi * wi;
      s4[1] += wi * gi;
      s4[2] += gi * gi;
      s4[3] += gi - gi;
    }
  column_sum<4>(s4, sm);
  if (warp == 0) {  // the column's direction (and, adaptive, its ||g~||^2 as split rows form it)
    RowSums<A> rs;
    rs.ww = s4[0]; rs.wg = s4[1]; rs.gg = s4[2]; rs.bad = s4[3];
    const Direction<A> d = row_direction(kind, rs, p.wd);
    coef[0] = d.a;
    coef[1] = d.b;
    coef[2] = d.ok ? A(1) : A(0);
    if (grouped && Phase == 1 && active) {
      publish_row(ws, it.pos + c, tangent_sq_from_sums(kind, d, rs), d.ok);
    }
  }
  if constexpr (Phase == 1) {
    if (it.split)  // a group per column
      for (int i = 0; i < it.count; ++i) arrive_group(p, ws, it.group + it.row + i, 1u, sm);
    else
      arrive_group(p, ws, it.group, uint32_t(it.count), sm);
    return;
  } else {
    if (warp == 0) {
      A scale = A(1);
      bool group_ok = true;
      if (grouped) {
        const int64_t k = it.split ? it.group + c : it.group;
        scale = ws.group_scale[k];
        group_ok = ws.group_ok[k] != 0;
      }
      const bool go = active && coef[2] != A(0) && group_ok;
      if (active && !go) report_skip(p.report, it.tensor, c);
      coef[0] *= scale;
      coef[1] *= scale;
      coef[2] = go ? A(1) : A(0);
    }
    simt::sync();
    const A a = coef[0], b = coef[1];
    const bool go = coef[2] != A(0);
    const bool read_m = at.m != nullptr && !fresh;
    const bool nesterov = p.nesterov != 0;
    A s3[3] = {A(0), A(0), A(0)};
    if (go && kind != Kind::Euclidean)
      for (int64_t j = warp; j < d0; j += kWarps) {
        const A wi = A(sload<false>(at.w, j * d1)), gi = A(sload<true>(at.g, j * d1));
        A mi = read_m ? simt::ldg(at.m + j * d1) : A(0);
        const A di = a * gi + b * wi;
        const A u = at.m ? momentum_step(di, mi, p.mu, fresh, nesterov) : di;
        const A y = wi - p.lr * u;
        s3[0] += y * y;
        s3[1] += y * mi;
        s3[2] += mi * mi;
      }
    A fc = A(1), pc = A(1), qc = A(0);
    bool write = go;
    if (kind != Kind::Euclidean) {
      column_sum<3>(s3, sm);
      if (warp == 0) {
        const float* radius = reinterpret_cast<const float*>(e[kRadius]);
        const A rho = (radius && active) ? A(radius[c]) : A(1);
        const Finish<A> f = row_finish(kind, s3[0], s3[1], s3[2], rho, p.psi_max_norm);
        if (go && !f.ok) report_skip(p.report, it.tensor, c);
        coef[3] = f.f;
        coef[4] = f.p;
        coef[5] = f.q;
        coef[6] = f.ok ? A(1) : A(0);
      }
      simt::sync();
      fc = coef[3];
      pc = coef[4];
      qc = coef[5];
      write = go && coef[6] != A(0);
    }
    if (!write) return;
    const SR sr = rounding(e, 0);
    for (int64_t j = warp; j < d0; j += kWarps) {
      const A wi = A(sload<false>(at.w, j * d1)), gi = A(sload<true>(at.g, j * d1));
      A mi = read_m ? simt::ldg(at.m + j * d1) : A(0);
      const A di = a * gi + b * wi;
      const A u = at.m ? momentum_step(di, mi, p.mu, fresh, nesterov) : di;
      const A y = wi - p.lr * u;
      if (kind == Kind::Euclidean) {  // no retraction: y and m' as they are
        cstore(at.w, j * d1, c * d0 + j, y, sr);
        if (at.m) simt::stg(at.m + j * d1, mi);
      } else {
        cstore(at.w, j * d1, c * d0 + j, fc * y, sr);
        if (at.m) simt::stg(at.m + j * d1, pc * mi + qc * y);
      }
    }
  }
}

// ---- one CTA, one item ----------------------------------------------------------

}  // namespace cuda
}  // namespace msgd

#include "fused_stiefel_kernels.cuh"

namespace msgd {
namespace cuda {

template <typename T, int Phase>
MSGD_DEV void step_block(const Params<typename Traits<T>::A>& p, int64_t b,
                         Smem<typename Traits<T>::A>& sm) {
  const Item it = reinterpret_cast<const Item*>(p.blob + p.L.items[Phase - 1])[b];
  if (it.kind == kItemSplit) {
    split_item<T, Phase>(p, it, sm);
    return;
  }
  if constexpr (Phase != 3) {
    if (it.kind == kItemStiefel) {
      stiefel_item<T, Phase>(p, it, sm);
      return;
    }
  }
  if constexpr (Phase != 3) {
    if (it.kind == kItemColumns) {
      column_item<T, Phase>(p, it, sm);
      return;
    }
  }
  if constexpr (Phase != 3) {
    switch (it.tier) {
      case 0: team_item<T, tier_lanes(0), Phase>(p, it, sm); break;
      case 1: team_item<T, tier_lanes(1), Phase>(p, it, sm); break;
      case 2: team_item<T, tier_lanes(2), Phase>(p, it, sm); break;
      case 3: team_item<T, tier_lanes(3), Phase>(p, it, sm); break;
      default: team_item<T, tier_lanes(4), Phase>(p, it, sm); break;
    }
  }
}

}  // namespace cuda
}  // namespace msgd
