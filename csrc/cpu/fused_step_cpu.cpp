// The fused CPU step. Each row is read twice while it stays in cache: once for the six
// dot products of w, g, m (float blocks summed in double), once to write w and m
// (row_math.h, "the two-pass form"), so memory sees one read of w, g, m and one write of
// w, m. Tensors whose groups do not matter (no adaptive step) are stepped in memory
// order, in row chunks shared among threads. A tensor with an adaptive step that fits in
// cache and has short rows is swept twice in memory order by one thread (all rows' dots,
// the group scales, all rows' writes; the next such tensor's first sweep runs beside this
// one's second); the others go group by group, each group's rows summing their ||g~||^2
// while the group before is written. Wherever rows follow one
// another, a row's write pass also reads the next row for its dots (RowStepper::Ahead), so
// memory sees one continuous stream of reads. Stiefel blocks are stepped several at a
// time, one per SIMD lane, by the Stiefel unit (stiefel_cpu.cpp).
//
// The parts: RowDotsPass (a row's dot products, row_dots.h), RowStepper (a row's combination
// and write pass), Worker (one thread's schedules: rows, sweep, groups), run() (the units of work,
// the threads, the reports).
//
// This file is compiled once per instruction set (MSGD_CPU_VARIANT names the entry and the
// namespace, tensor_view.h); fused_step_cpu() in dispatch_cpu.cpp picks the best one the
// processor runs.
#include "fused_step_cpu.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/row_math.h"
#include "parallel.h"
#include "row_dots.h"
#include "stiefel_cpu.h"
#include "tensor_view.h"

namespace msgd {
namespace MSGD_CPU_NS {
namespace {

using D = double;  // reductions and per-row coefficients

// A row's part of its group's R_G^2 from sweep 1 (Worker::sweep_sq); ok false: the row holds
// its group.
struct RowSq {
  D sq = 0;
  bool ok = false;
};

// A row's coefficients (row_math.h), kept out of line. Inlined, the AVX2 build would fuse
// some of the caller's products with the formulas' sums into FMAs, which moves the last
// bits of the coefficients (seen in float64 steps); out of line they are the bits the step
// has had. One copy serves every schedule and dtype.
#if defined(__GNUC__)
__attribute__((noinline))
#endif
Combination<D> combination(Kind kind, const DirDots<D>& q, D a, D b, D lr, D mu, bool has_m,
                           bool fresh, bool nesterov, D radius, D psi_max_norm) {
  return row_combination(kind, q, a, b, lr, mu, has_m, fresh, nesterov, radius, psi_max_norm);
}

// One row's step from its dots and its group's scale: the combination (row_math.h), then the
// write pass, which reads the row again from cache and writes w and m.
template <typename T>
class RowStepper {
  using A = typename Math<T>::type;
  using Dots = RowDotsPass<T>;

 public:
  explicit RowStepper(const StepOptions& opt) : opt_(opt) {}

  static RowDots<D> row_dots(const Row<T>& x, bool fresh, const Row<T>* next = nullptr) {
    return (x.m && !fresh) ? Dots::template dots<true>(x.w, x.g, x.m, x.n, next)
                           : Dots::template dots<false>(x.w, x.g, nullptr, x.n, next);
  }

  // A row's part of its group's R_G^2 (group_scale): ||g~||^2 from its dots; false when
  // the row has no direction (it holds the group).
  static bool group_sq(Kind kind, const RowDots<D>& dd, const Row<T>& x, D& sq) {
    if (!row_direction(kind, dd, D(0)).ok) return false;
    sq = riemannian_sq(kind, dd, x);
    return true;
  }

  // What a row's write pass does with the row processed next: prefetches it, or (dots set)
  // also sums its dots, block by block between the write's chunks (RowDotsPass's blocks in
  // order: the same bits as a pass of its own).
  struct Ahead {
    const Row<T>* row = nullptr;
    RowDots<D>* dots = nullptr;  // null: prefetch only
    bool read_m = false;         // the dots read m (dots<true>)
    bool m_only = false;         // only the m dots are summed, into the kept w, g dots (add_m_dots)
    const Row<T>* after = nullptr;  // with dots: the row after `row`, prefetched
  };

  // Row r of tensor v from its dots and its group's scale s: combination, then the write
  // pass, which prefetches `next`. False (the row unchanged) when it cannot be stepped.
  bool update_row(const TensorView<T>& v, int64_t r, const Row<T>& x, const RowDots<D>& dd, D s,
                  const Row<T>* next) const {
    Ahead a;
    a.row = next;
    return update_row(v, r, x, dd, s, a);
  }

  // As above; with ahead.dots set, ahead.row's dots are summed into it whether or not row r
  // could be stepped.
  bool update_row(const TensorView<T>& v, int64_t r, const Row<T>& x, const RowDots<D>& dd, D s,
                  const Ahead& ahead) const {
    Combination<D> c;
    if (!prepare_row(v, r, x, dd, s, c)) {
      const Row<T>* y = ahead.row;
      if (ahead.dots && ahead.m_only) Dots::add_m_dots(y->w, y->g, y->m, y->n, *ahead.dots);
      else if (ahead.dots)
        *ahead.dots = ahead.read_m ? Dots::template dots<true>(y->w, y->g, y->m, y->n, nullptr)
                                   : Dots::template dots<false>(y->w, y->g, nullptr, y->n, nullptr);
      return false;
    }
    if constexpr (std::is_same<T, bf16>::value) {
      if (v.round) {
        write_rounded(x, v.fresh, c, ahead, {v.round_key, r * x.n});
        return true;
      }
    }
    if (!x.m) write<false, false>(x.w, x.g, nullptr, x.n, c, ahead);
    else if (v.fresh) write<false, true>(x.w, x.g, x.m, x.n, c, ahead);
    else write<true, true>(x.w, x.g, x.m, x.n, c, ahead);
    return true;
  }

 private:
  const StepOptions& opt_;

  // ||g - c w||^2, summed explicitly where the closed form would cancel.
  static D tangent_sq(const T* __restrict w, const T* __restrict g, int64_t n, D c) {
    D acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      D v = D(load(g, i)) - c * D(load(w, i));
      acc += v * v;
    }
    return acc;
  }

  static D riemannian_sq(Kind kind, const RowDots<D>& r, const Row<T>& x) {
    if (kind == Kind::Psi) return psi_tangent_sq(r);
    D radial = r.wg * r.wg / r.ww;  // sphere: ||g~||^2 = gg - <w,g>^2/ww
    if (r.gg > D(16) * (r.gg - radial)) return tangent_sq(x.w, x.g, x.n, r.wg / r.ww);
    return r.gg - radial;
  }

  // A new weight, rounded to nearest or (kRound: bf16 tensors that ask for it) stochastically.
  template <bool kRound>
  static void store_w(T* w, int64_t i, A v, const RoundingRow& sr) {
    if constexpr (kRound) store_rounded(w, i, v, sr); else store(w, i, v);
  }

  // Elements [c0, c1) of a row's write, in the order of the formulas: d, m', u, y, then the
  // finished w and m.
  template <bool kReadM, bool kWriteM, bool kRound = false>
  void write_range(T* __restrict w, const T* __restrict g, A* __restrict m, int64_t c0,
                   int64_t c1, const Combination<D>& c, const RoundingRow& sr = {}) const {
    const A da = A(c.a), db = A(c.b), f = A(c.f), p = A(c.p), q = A(c.q);
    const A lr = A(opt_.lr), mu = A(opt_.momentum);
    if (kWriteM && opt_.nesterov) {
#pragma omp simd
      for (int64_t i = c0; i < c1; ++i) {
        A wi = load(w, i);
        A di = da * load(g, i) + db * wi;
        A mi = kReadM ? mu * m[i] + di : di;
        A yi = wi - lr * (di + mu * mi);
        store_w<kRound>(w, i, f * yi, sr);
        m[i] = p * mi + q * yi;
      }
      return;
    }
#pragma omp simd
    for (int64_t i = c0; i < c1; ++i) {
      A wi = load(w, i);
      A di = da * load(g, i) + db * wi;
      A mi = kReadM ? mu * m[i] + di : di;  // without momentum: u = d
      A yi = wi - lr * mi;
      store_w<kRound>(w, i, f * yi, sr);
      if (kWriteM) m[i] = p * mi + q * yi;
    }
  }

  // The write pass. Chunk by chunk it also prefetches the row processed next (or sums its
  // dots), so that row's first read streams from memory while this one is computed from cache.
  template <bool kReadM, bool kWriteM, bool kRound = false>
  void write(T* __restrict w, const T* __restrict g, A* __restrict m, int64_t n,
             const Combination<D>& c, const Ahead& ahead, const RoundingRow& sr = {}) const {
    constexpr int64_t kChunk = Dots::kBlock;
    const Row<T>* next = ahead.row;
    if (ahead.dots) {
      RowDots<D>& nd = *ahead.dots;
      if (!ahead.m_only) nd = RowDots<D>{};
      const int64_t nn = next->n;
      // The row after is prefetched along the next row's dots loop, a line at a time (a row
      // of another length: chunk by chunk): spread out, the prefetches wait less for a free
      // fill buffer than a chunk's worth at once (one-thread A/B, transformer36: FG-SGD PO8
      // 0.94-0.95x, UN 0.95x the time of chunk by chunk).
      const Row<T>* pf = ahead.after && ahead.after->n == nn ? ahead.after : nullptr;
      auto next_block = [&](int64_t b0) {
        const int64_t b1 = b0 + kChunk < nn ? b0 + kChunk : nn;
        if (ahead.m_only) Dots::template dots_block<true, false>(next->w, next->g, next->m, b0, b1, nd, pf);
        else if (ahead.read_m) Dots::template dots_block<true>(next->w, next->g, next->m, b0, b1, nd, pf);
        else Dots::template dots_block<false>(next->w, next->g, nullptr, b0, b1, nd, pf);
      };
      int64_t c0 = 0;
      for (; c0 < n; c0 += kChunk) {
        const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
        if (ahead.after && !pf) prefetch_share(*ahead.after, c0, c1, n);
        if (c0 < nn) next_block(c0);
        write_range<kReadM, kWriteM, kRound>(w, g, m, c0, c1, c, sr);
      }
      for (; c0 < nn; c0 += kChunk) next_block(c0);  // a next row longer than this one
      if (!ahead.m_only) Dots::finish_dots(nd);
      return;
    }
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
      if (next) prefetch_share(*next, c0, c1, n);
      write_range<kReadM, kWriteM, kRound>(w, g, m, c0, c1, c, sr);
    }
  }

  // <w,d>, <d,d>, <d,m> summed element by element (the row is in cache): used where the
  // closed form from the (w, g, m) dots would cancel.
  static void explicit_direction_dots(const Row<T>& x, bool fresh, D a, D b, DirDots<D>& q) {
    const T* __restrict w = x.w;
    const T* __restrict g = x.g;
    const A* __restrict m = (x.m && !fresh) ? x.m : nullptr;
    D wd = 0, dd = 0, dm = 0;
    for (int64_t i = 0; i < x.n; ++i) {
      D wi = D(load(w, i)), di = a * D(load(g, i)) + b * wi;
      wd += wi * di;
      dd += di * di;
      if (m) dm += di * D(m[i]);
    }
    q.wd = wd; q.dd = dd; q.dm = dm;
  }

  // A row's combination from its dots and its group's scale s; false when it cannot be
  // stepped. Reads the row again only where the closed-form direction dots would cancel
  // (the row is in cache then).
  bool prepare_row(const TensorView<T>& v, int64_t r, const Row<T>& x, const RowDots<D>& dd, D s,
                   Combination<D>& c) const {
    Direction<D> d = row_direction(v.kind, dd, D(opt_.weight_decay));
    if (!d.ok) return false;
    const D a = s * d.a, b = s * d.b;
    bool cancels = false;
    DirDots<D> q = direction_dots(dd, a, b, cancels);
    if (cancels) explicit_direction_dots(x, v.fresh, a, b, q);
    c = combination(v.kind, q, a, b, D(opt_.lr), D(opt_.momentum), x.m != nullptr, v.fresh,
                    opt_.nesterov, v.radius ? D(v.radius[r]) : D(1), D(opt_.psi_max_norm));
    return c.ok;
  }

  void write_rounded(const Row<T>& x, bool fresh, const Combination<D>& c, const Ahead& ahead,
                     const RoundingRow& sr) const {
    if (!x.m) write<false, false, true>(x.w, x.g, nullptr, x.n, c, ahead, sr);
    else if (fresh) write<false, true, true>(x.w, x.g, x.m, x.n, c, ahead, sr);
    else write<true, true, true>(x.w, x.g, x.m, x.n, c, ahead, sr);
  }
};

// A piece of work for one thread: rows [a, b) of tensor t (kRows), groups [a, b) of the
// group table (kGroups), or all of tensor t, whose groups are [a, b), in two sweeps (kSweep).
// Column tensors (kColumns): columns [a, b) of tensor t (kColumnRange), or all of tensor t,
// whose groups are [a, b), in two sweeps of tiles (kColumnSweep).
struct Unit {
  enum Type { kRows, kGroups, kSweep, kColumnRange, kColumnSweep } type;
  int64_t t, a, b, cost;
};

// One thread's work: the schedules that order rows (memory order, a two-sweep tensor, group
// by group) and this thread's report rows (merged by run()).
template <typename T>
class Worker {
 public:
  Worker(const int64_t* table, const int64_t* groups, const int64_t* row_index,
         const StepOptions& opt, int64_t* report)
      : table_(table), groups_(groups), row_index_(row_index), opt_(opt), report_(report),
        rows_(opt), stiefel_(opt) {}

  // Rows [r0, r1) of tensor t in memory order (no adaptive step couples them): each row's
  // write pass (from cache) sums the next row's dots and prefetches the row after. With the
  // dots in a pass of their own, memory idled while a row was written (one-thread A/B on
  // transformer36 and mlp36, UN: 0.95-0.97x the time).
  void run_rows(int64_t t, int64_t r0, int64_t r1) {
    const TensorView<T> v(tensor(t));
    if (v.kind == Kind::Stiefel) return stiefel_.run_rows(v, r0, r1, report(t));
    if (r0 >= r1) return;
    Row<T> next = r0 + 1 < r1 ? v.row(r0 + 1) : Row<T>{}, after{};
    RowDots<D> dd = Stepper::row_dots(v.row(r0), v.fresh, r0 + 1 < r1 ? &next : nullptr), nd;
    for (int64_t r = r0; r < r1; ++r) {
      const Row<T> x = v.row(r);
      typename Stepper::Ahead ahead;
      if (r + 1 < r1) {
        next = v.row(r + 1);
        ahead.row = &next;
        ahead.dots = &nd;
        ahead.read_m = next.m && !v.fresh;
        if (r + 2 < r1) { after = v.row(r + 2); ahead.after = &after; }
      }
      if (!rows_.update_row(v, r, x, dd, D(1), ahead)) skip(t, r);
      dd = nd;
    }
  }

  // All rows of tensor t, whose groups are [g0, g1) of the group table, in two sweeps in
  // memory order: every row's <w,w>, <w,g>, <g,g> and ||g~||^2 (sweep_sq), then each group's
  // scale (its rows' ||g~||^2 summed in the group's order by group_scale, as run_group sums
  // them: the same bits) and every row's dots and write as in run_rows (sweep_write). For a
  // tensor that stays in cache between the sweeps this reads memory once and in order, where
  // group by group its random rows would be fetched one by one (costly in TLB misses too);
  // one that does not is read 8 + 12 bytes per element.
  //
  // A thread's consecutive sweep tensors (units[0, count), kSweep) are pipelined: sweep 1 of
  // the next tensor runs beside sweep 2 of this one, a few rows after each row written, so its
  // reads stream from memory while sweep 2's write passes run from cache.
  void sweep_tensors(const Unit* units, size_t count) {
    const TensorView<T> v0(tensor(units[0].t));
    sweep_dots_.resize(size_t(v0.rows));
    sweep_sq_.resize(size_t(v0.rows));
    sweep_sq(v0, 0, v0.rows, sweep_dots_.data(), sweep_sq_.data());
    for (size_t i = 0; i < count; ++i) {
      const Unit& x = units[i];
      const bool has_next = i + 1 < count;
      const TensorView<T> nv(tensor(units[has_next ? i + 1 : i].t));
      SideSweep side{&nv, nullptr, nullptr, 0};
      if (has_next) {
        side_dots_.resize(size_t(nv.rows));
        side_sq_.resize(size_t(nv.rows));
        side.dots = side_dots_.data();
        side.sq = side_sq_.data();
      }
      sweep_write(x.t, x.a, x.b, 0, tensor(x.t)[kRows], sweep_dots_.data(), sweep_sq_.data(),
                  has_next ? &side : nullptr);
      std::swap(sweep_dots_, side_dots_);
      std::swap(sweep_sq_, side_sq_);
    }
  }

  // Sweep 1 of a tensor run beside another's sweep 2 (sweep_tensors): rows [0, done) are done.
  struct SideSweep {
    const TensorView<T>* v;
    RowDots<D>* dots;
    RowSq* sq;
    int64_t done;
  };

  // The side sweep's rows up to `end`, each prefetching the row after (up to the tensor's end).
  void side_sweep_to(SideSweep& s, int64_t end) const {
    if (end <= s.done) return;
    sweep_sq(*s.v, s.done, end, s.dots, s.sq, s.v->rows);
    s.done = end;
  }

  // Sweep 1 over rows [r0, r1) of a sweep tensor: each row's <w,w>, <w,g>, <g,g> (only w and g
  // are read: m waits for the write sweep) and its part of R_G^2, while the row is in cache.
  // Each row's pass prefetches the next row's w and g (not its m, which would only crowd out
  // of cache the rows sweep 2 reads again): the hardware prefetcher stops at page boundaries,
  // and this sweep streams from memory (one-thread A/B against fused SGD's CPU time:
  // transformer36 1.68x -> 1.64x, mlp36 1.73x -> 1.73x).
  // (ahead_end: rows up to it may be prefetched; r1 unless set.)
  void sweep_sq(const TensorView<T>& v, int64_t r0, int64_t r1, RowDots<D>* dots, RowSq* sq,
                int64_t ahead_end = -1) const {
    if (ahead_end < 0) ahead_end = r1;
    Row<T> next{};
    for (int64_t r = r0; r < r1; ++r) {
      const Row<T> x = v.row(r);
      const Row<T>* ahead = nullptr;
      if (r + 1 < ahead_end) { next = v.row(r + 1); next.m = nullptr; ahead = &next; }
      dots[r] = RowDotsPass<T>::template dots<false>(x.w, x.g, nullptr, x.n, ahead);
      sq[r].ok = Stepper::group_sq(v.kind, dots[r], x, sq[r].sq);
    }
  }

  // Sweep 2 over rows [r0, r1) of tensor t, whose groups are [g0, g1), once every row's sweep 1
  // is done (dots, sq: indexed by row): the scales of the groups (of the rows in [r0, r1)),
  // then each row's m dots and write. Chunks of rows are taken last to first (rows in order
  // within a chunk, for the hardware prefetcher): the rows sweep 1 read last, still in cache,
  // are written first. A row's <w,w>, <w,g>, <g,g> are kept from sweep 1; only its m dots are
  // summed again (the same blocks and lanes: the same bits as one pass), by the write pass
  // of the row before, which also prefetches the row after (as run_rows).
  // `side` (or null): a sweep 1 to run beside this one, finished when it returns.
  void sweep_write(int64_t t, int64_t g0, int64_t g1, int64_t r0, int64_t r1, const RowDots<D>* dots,
                   const RowSq* sq, SideSweep* side = nullptr) {
    const TensorView<T> v(tensor(t));
    sweep_scale_.resize(size_t(v.rows));
    sweep_held_.assign(size_t(v.rows), 0);
    for (int64_t k = g0; k < g1; ++k) {
      const int64_t* gr = groups_ + k * kGroupFields;
      const int64_t* rs = row_index_ + gr[kGroupStart];
      const int64_t count = gr[kGroupCount];
      auto row_sq = [&](int64_t j, D& out) {
        out = sq[rs[j]].sq;
        return sq[rs[j]].ok;
      };
      D s = 0;
      const bool held = !group_scale(opt_, count, row_sq, s);  // one bad row holds the group
      for (int64_t j = 0; j < count; ++j) {
        if (rs[j] < r0 || rs[j] >= r1) continue;
        sweep_scale_[size_t(rs[j])] = s;
        sweep_held_[size_t(rs[j])] = held;
      }
    }
    constexpr int64_t kChunkElems = 1 << 16;
    const int64_t chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, v.row_len));
    sweep_order_.clear();
    for (int64_t end = r1; end > r0; end -= chunk)
      for (int64_t r = std::max(r0, end - chunk); r < end; ++r) {
        if (sweep_held_[size_t(r)]) skip(t, r);
        else sweep_order_.push_back(r);
      }
    const size_t n = sweep_order_.size();
    if (n == 0) {
      if (side) side_sweep_to(*side, side->v->rows);
      return;
    }
    const bool read_m = v.m && !v.fresh;
    RowDots<D> dd = dots[sweep_order_[0]], nd;
    const Row<T> first = v.row(sweep_order_[0]);
    if (read_m) RowDotsPass<T>::add_m_dots(first.w, first.g, first.m, first.n, dd);
    Row<T> next{}, after{};
    for (size_t i = 0; i < n; ++i) {
      const int64_t r = sweep_order_[i];
      const Row<T> x = v.row(r);
      typename Stepper::Ahead ahead;
      if (i + 1 < n) {
        next = v.row(sweep_order_[i + 1]);
        ahead.row = &next;
        nd = dots[sweep_order_[i + 1]];
        if (read_m) {
          ahead.dots = &nd;
          ahead.m_only = true;
          if (i + 2 < n) { after = v.row(sweep_order_[i + 2]); ahead.after = &after; }
        }
      }
      if (!rows_.update_row(v, r, x, dd, sweep_scale_[size_t(r)], ahead)) skip(t, r);
      dd = nd;
      if (side) side_sweep_to(*side, int64_t((i + 1) * size_t(side->v->rows) / n));
    }
  }

  // Columns [c0, c1) of column tensor t (kColumns; no adaptive step couples them), tile by
  // tile: gathered into the scratch as rows, stepped as run_rows steps rows, scattered back.
  void run_columns(int64_t t, int64_t c0, int64_t c1) {
    const TensorView<T> v(tensor(t));
    const int64_t tile = column_tile<T>(v.row_len);
    for (int64_t c = c0; c < c1; c += tile) {
      const int64_t n = std::min(tile, c1 - c);
      const TensorView<T> x = gather_tile(v, c, n, true, columns_);
      Row<T> next{};
      for (int64_t r = 0; r < n; ++r) {  // as run_rows: each row prefetches the next (from L2/L3)
        const Row<T> row = x.row(r);
        const Row<T>* ahead = nullptr;
        if (r + 1 < n) { next = x.row(r + 1); ahead = &next; }
        if (!rows_.update_row(x, r, row, Stepper::row_dots(row, x.fresh, ahead), D(1), ahead)) skip(t, c + r);
      }
      scatter_tile(v, x, c);
    }
  }

  // All columns of column tensor t, whose groups are [g0, g1), as sweep_tensors steps rows:
  // every column's ||g~||^2 (tiles of w and g), each group's scale summed in its row order,
  // then every column's step (tiles of w, g, m). The same bits as the rows of W^T.
  void sweep_columns(int64_t t, int64_t g0, int64_t g1) {
    const TensorView<T> v(tensor(t));
    const int64_t tile = column_tile<T>(v.row_len);
    const size_t rows = size_t(v.rows);
    column_sq_.resize(rows);
    sweep_scale_.resize(rows);
    sweep_held_.assign(rows, 2);  // 2: a column of none of these groups (left to their unit)
    for (int64_t c = 0; c < v.rows; c += tile) {
      const int64_t n = std::min(tile, v.rows - c);
      const TensorView<T> x = gather_tile(v, c, n, false, columns_);
      for (int64_t r = 0; r < n; ++r) {
        const Row<T> row = x.row(r);
        const RowDots<D> dd = RowDotsPass<T>::template dots<false>(row.w, row.g, nullptr, row.n, nullptr);
        D sq = 0;
        const bool ok = Stepper::group_sq(v.kind, dd, row, sq);
        column_sq_[size_t(c + r)] = ok ? sq : D(-1);  // -1: the column holds its group
      }
    }
    for (int64_t k = g0; k < g1; ++k) {
      const int64_t* gr = groups_ + k * kGroupFields;
      const int64_t* rs = row_index_ + gr[kGroupStart];
      const int64_t count = gr[kGroupCount];
      auto sq = [&](int64_t j, D& out) {
        out = column_sq_[size_t(rs[j])];
        return out >= D(0);
      };
      D s = 0;
      const bool held = !group_scale(opt_, count, sq, s);
      for (int64_t j = 0; j < count; ++j) {
        sweep_scale_[size_t(rs[j])] = s;
        sweep_held_[size_t(rs[j])] = held;
      }
    }
    for (int64_t c = 0; c < v.rows; c += tile) {
      const int64_t n = std::min(tile, v.rows - c);
      const TensorView<T> x = gather_tile(v, c, n, true, columns_);
      for (int64_t r = 0; r < n; ++r) {
        const Row<T> row = x.row(r);
        if (sweep_held_[size_t(c + r)] == 2) continue;
        if (sweep_held_[size_t(c + r)] ||
            !rows_.update_row(x, r, row, Stepper::row_dots(row, x.fresh), sweep_scale_[size_t(c + r)], nullptr))
          skip(t, c + r);
      }
      scatter_tile(v, x, c);
    }
  }

  // Groups [begin, end) of the group table, one after another.
  // Groups [begin, end) of the group table, one after another; a run of one Stiefel tensor's
  // groups goes to the Stiefel unit whole (it steps blocks several at a time).
  void run_groups(int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end;) {
      const int64_t t = groups_[k * kGroupFields + kGroupTensor];
      if (Kind(tensor(t)[kKind]) == Kind::Stiefel) {
        int64_t e = k + 1;
        while (e < end && groups_[e * kGroupFields + kGroupTensor] == t) ++e;
        stiefel_.run_groups(TensorView<T>(tensor(t)), groups_, row_index_, k, e, report(t));
        k = e;
        continue;
      }
      int64_t e = k + 1;
      while (e < end && Kind(tensor(groups_[e * kGroupFields + kGroupTensor])[kKind]) != Kind::Stiefel) ++e;
      run_row_groups(k, e);
      k = e;
    }
  }

  // Row groups [k0, k1) of the group table (no Stiefel tensor among them), pipelined: while
  // group k's rows are written (its scale known), group k + 1's rows are read for their dots,
  // row j of one beside row j of the other, so that memory sees one continuous stream of
  // reads (the next group's rows, from memory) while the writes run from cache.
  void run_row_groups(int64_t k0, int64_t k1) {
    struct GroupRows {
      TensorView<T> v;
      const int64_t* rows;
      int64_t count;
    };
    auto group_at = [&](int64_t k) {
      const int64_t* gr = groups_ + k * kGroupFields;
      return GroupRows{TensorView<T>(tensor(gr[kGroupTensor])), row_index_ + gr[kGroupStart], gr[kGroupCount]};
    };
    auto row_sq = [&](const GroupRows& G, int64_t j, RowDots<D>& dd, RowSq& sq) {
      sq.ok = Stepper::group_sq(G.v.kind, dd, G.v.row(G.rows[j]), sq.sq);
    };
    // the first group: its rows' dots alone, each prefetching the next
    {
      const GroupRows G = group_at(k0);
      group_dots_.resize(size_t(G.count));
      group_sq_.resize(size_t(G.count));
      Row<T> slot{};
      for (int64_t j = 0; j < G.count; ++j) {
        const Row<T>* ahead = nullptr;
        if (j + 1 < G.count) { slot = G.v.row(G.rows[j + 1]); ahead = &slot; }
        group_dots_[size_t(j)] = Stepper::row_dots(G.v.row(G.rows[j]), G.v.fresh, ahead);
        row_sq(G, j, group_dots_[size_t(j)], group_sq_[size_t(j)]);
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      const GroupRows G = group_at(k);
      const int64_t t = groups_[k * kGroupFields + kGroupTensor];
      auto sq = [&](int64_t j, D& out) {
        out = group_sq_[size_t(j)].sq;
        return group_sq_[size_t(j)].ok;
      };
      D s = 0;
      const bool held = !group_scale(opt_, G.count, sq, s);  // one bad row holds the group
      const bool has_next = k + 1 < k1;
      const GroupRows N = has_next ? group_at(k + 1) : GroupRows{G.v, nullptr, 0};
      next_dots_.resize(size_t(N.count));
      next_sq_.resize(size_t(N.count));
      const bool read_m = N.v.m && !N.v.fresh;
      Row<T> next{}, after{};
      for (int64_t j = 0; j < std::max(G.count, N.count); ++j) {
        typename Stepper::Ahead ahead;
        if (j < N.count) {
          next = N.v.row(N.rows[j]);
          ahead.row = &next;
          ahead.dots = &next_dots_[size_t(j)];
          ahead.read_m = read_m;
          if (j + 1 < N.count) { after = N.v.row(N.rows[j + 1]); ahead.after = &after; }
        }
        if (j < G.count && held) skip(t, G.rows[j]);
        if (j < G.count && !held) {
          if (!rows_.update_row(G.v, G.rows[j], G.v.row(G.rows[j]), group_dots_[size_t(j)], s, ahead))
            skip(t, G.rows[j]);
        } else if (j < N.count) {
          next_dots_[size_t(j)] = Stepper::row_dots(next, N.v.fresh, ahead.after);
        }
        if (j < N.count) row_sq(N, j, next_dots_[size_t(j)], next_sq_[size_t(j)]);
      }
      std::swap(group_dots_, next_dots_);
      std::swap(group_sq_, next_sq_);
    }
  }

 private:
  using Stepper = RowStepper<T>;

  const int64_t* table_;
  const int64_t* groups_;
  const int64_t* row_index_;
  const StepOptions& opt_;
  int64_t* report_;  // this thread's own report rows, merged by the caller
  Stepper rows_;
  StiefelStepper<T> stiefel_;
  Vec<RowDots<D>> group_dots_, next_dots_;
  Vec<RowSq> group_sq_, next_sq_;
  Vec<RowDots<D>> sweep_dots_;
  Vec<RowSq> sweep_sq_;
  Vec<RowDots<D>> side_dots_;  // sweep 1 of the next sweep tensor (sweep_tensors)
  Vec<RowSq> side_sq_;
  Vec<D> sweep_scale_;
  Vec<char> sweep_held_;
  Vec<int64_t> sweep_order_;
  ColumnScratch<T> columns_;  // a tile of column rows (run_columns, sweep_columns)
  Vec<D> column_sq_;

  const int64_t* tensor(int64_t t) const { return table_ + t * kTensorFields; }
  int64_t* report(int64_t t) { return report_ + t * kReportFields; }
  void skip(int64_t t, int64_t r) { merge_skip_report(report(t), 1, r); }
};

// A tensor's rows are stepped in memory order when no adaptive step couples them (its
// groups, if any, are then irrelevant: a UN step with PO groups reads like one without),
// else group by group (FG-SGD groups; Stiefel blocks of an adaptive step).
bool groups_matter(Kind kind, const StepOptions& opt) {
  return opt.adaptive != Adaptive::None && kind_is_adaptive(kind);
}

// The groups of table row k's tensor that follow one another from k on: their end, and
// whether they hold every row of the tensor (the Python side lays groups out so).
inline int64_t tensor_group_run(const int64_t* groups, int64_t n_groups, int64_t k, int64_t rows,
                                bool& all_rows) {
  const int64_t t = groups[k * kGroupFields + kGroupTensor];
  int64_t end = k, covered = 0;
  for (; end < n_groups && groups[end * kGroupFields + kGroupTensor] == t; ++end)
    covered += groups[end * kGroupFields + kGroupCount];
  all_rows = covered == rows;
  return end;
}

// A unit's cost in the thread split (parallel_units): its elements, weighted by what an
// element costs. A Stiefel block larger than 1x1 is a small matrix problem per block (two
// tangent projections and a QR or polar factor): measured on ResNet-50's 3x3 kernels, about
// three times a row element (a 1x1 block, a scalar, streams like a row). Unweighted, the
// thread that gets a network's last stages (its 3x3 kernels are mostly there) works alone
// at the end of the step.
inline int64_t element_weight(Kind kind, int64_t row_len) {
  return kind == Kind::Stiefel && row_len > 1 ? 3 : 1;
}

// The units of one step, in tensor order: memory-order tensors in row chunks; adaptive
// tensors that stay in cache between two sweeps (and are small beside a thread's share, as
// one thread sweeps one tensor) whole; the others group by group.
template <typename T>
Vec<Unit> plan_units(const int64_t* table, int64_t n_tensors, const int64_t* groups,
                             int64_t n_groups, const StepOptions& opt, int num_threads) {
  constexpr int64_t kUnitElems = 1 << 16;
  constexpr int64_t kSweepBytes = int64_t(16) << 20;  // w, g and m of the tensor
  // Rows of a page or more go group by group even when the tensor would fit: each row is
  // then a long sequential read, so the groups' random row order costs little, and every
  // element is read once where two sweeps read w and g twice (one-thread A/B, twelve
  // 512x2048 float tensors, FG-SGD PO8: 0.86-0.89x the two sweeps' time; 512x512 and
  // 2048x512 tensors stay faster in two sweeps, whose second finds part of w and g in L2).
  // Only where a group's w, g, m stay in cache from its dots to its write (PO groups of a few
  // rows): a larger group (a whole tensor: FG-SGD "tensor") would be read from memory twice,
  // 12 + 20 bytes per element against the two sweeps' 8 + 20.
  constexpr int64_t kLongRowBytes = 4096;
  constexpr int64_t kGroupInCacheBytes = int64_t(1) << 20;
  const int64_t elem_bytes = 2 * int64_t(sizeof(T)) + int64_t(sizeof(typename Math<T>::type));
  auto long_rows_small_groups = [&](const int64_t* e, int64_t k0, int64_t k1) {
    if (e[kRowLen] * int64_t(sizeof(T)) < kLongRowBytes) return false;
    int64_t most = 0;
    for (int64_t k = k0; k < k1; ++k) most = std::max(most, groups[k * kGroupFields + kGroupCount]);
    return most * e[kRowLen] * elem_bytes <= kGroupInCacheBytes;
  };
  int64_t total_elems = 0;
  for (int64_t t = 0; t < n_tensors; ++t)
    total_elems += table[t * kTensorFields + kRows] * table[t * kTensorFields + kRowLen];
  const int64_t sweep_elems = std::min(kSweepBytes / elem_bytes, total_elems / (4 * std::max(1, num_threads)));
  Vec<Unit> units;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* e = table + t * kTensorFields;
    if (groups_matter(Kind(e[kKind]), opt)) continue;
    const int64_t rows = e[kRows], len = e[kRowLen];
    if (e[kFlags] & kColumns) {  // column chunks of whole tiles
      const int64_t tile = column_tile<T>(len);
      const int64_t chunk = std::max<int64_t>(1, kUnitElems / (len * tile)) * tile;
      for (int64_t c = 0; c < rows; c += chunk)
        units.push_back(
            Unit{Unit::kColumnRange, t, c, std::min(rows, c + chunk), (std::min(rows, c + chunk) - c) * len});
      continue;
    }
    const int64_t step = std::max<int64_t>(1, kUnitElems / len);
    const int64_t weight = element_weight(Kind(e[kKind]), len);
    for (int64_t r = 0; r < rows; r += step)
      units.push_back(
          Unit{Unit::kRows, t, r, std::min(rows, r + step), (std::min(rows, r + step) - r) * len * weight});
  }
  bool any_grouped = false;  // else the group table need not be read (kernel-granular
  for (int64_t t = 0; t < n_tensors; ++t)  // tensors have one group per row: millions)
    any_grouped = any_grouped || groups_matter(Kind(table[t * kTensorFields + kKind]), opt);
  for (int64_t k = 0; any_grouped && k < n_groups; ++k) {
    const int64_t* gr = groups + k * kGroupFields;
    const int64_t* e = table + gr[kGroupTensor] * kTensorFields;
    const Kind kind = Kind(e[kKind]);
    if (!groups_matter(kind, opt)) continue;
    const int64_t elems = e[kRows] * e[kRowLen];
    if (e[kFlags] & kColumns) {  // one thread sweeps a column tensor's tiles twice
      bool all_rows = false;
      const int64_t end = tensor_group_run(groups, n_groups, k, e[kRows], all_rows);
      units.push_back(Unit{Unit::kColumnSweep, gr[kGroupTensor], k, end, elems});
      k = end - 1;
      continue;
    }
    if (kind != Kind::Stiefel && elems <= sweep_elems &&
        (k == 0 || groups[(k - 1) * kGroupFields + kGroupTensor] != gr[kGroupTensor])) {
      bool all_rows = false;
      const int64_t end = tensor_group_run(groups, n_groups, k, e[kRows], all_rows);
      if (all_rows && !long_rows_small_groups(e, k, end)) {
        units.push_back(Unit{Unit::kSweep, gr[kGroupTensor], k, end, elems});
        k = end - 1;
        continue;
      }
    }
    const int64_t cost = gr[kGroupCount] * e[kRowLen] * element_weight(kind, e[kRowLen]);
    if (!units.empty() && units.back().type == Unit::kGroups && units.back().b == k &&
        units.back().cost < kUnitElems) {
      units.back().b = k + 1;  // consecutive groups share a unit (and prefetch across it)
      units.back().cost += cost;
    } else {
      units.push_back(Unit{Unit::kGroups, gr[kGroupTensor], k, k + 1, cost});
    }
  }
  return units;
}

template <typename T>
void run(const int64_t* table, int64_t n_tensors, const int64_t* groups, int64_t n_groups,
         const int64_t* row_index, const StepOptions& opt, int64_t* report, int num_threads) {
  const Vec<Unit> units = plan_units<T>(table, n_tensors, groups, n_groups, opt, num_threads);

  ThreadReports reports(num_threads, n_tensors);
  parallel_units(units, num_threads, [&](int i, size_t u0, size_t u1) {
    Worker<T> w(table, groups, row_index, opt, reports.of(i));
    for (size_t u = u0; u < u1; ++u) {
      const Unit& x = units[u];
      switch (x.type) {
        case Unit::kRows: {  // a run of one tensor's row units: one pipeline
          int64_t b = x.b;
          while (u + 1 < u1 && units[u + 1].type == Unit::kRows && units[u + 1].t == x.t && units[u + 1].a == b)
            b = units[++u].b;
          w.run_rows(x.t, x.a, b);
          break;
        }
        case Unit::kGroups: {  // a run of group units in table order: one pipeline
          int64_t b = x.b;
          while (u + 1 < u1 && units[u + 1].type == Unit::kGroups && units[u + 1].a == b) b = units[++u].b;
          w.run_groups(x.a, b);
          break;
        }
        case Unit::kSweep: {  // a run of sweep tensors: one pipeline
          size_t e = u + 1;
          while (e < u1 && units[e].type == Unit::kSweep) ++e;
          w.sweep_tensors(&units[u], e - u);
          u = e - 1;
          break;
        }
        case Unit::kColumnRange: w.run_columns(x.t, x.a, x.b); break;
        case Unit::kColumnSweep: w.sweep_columns(x.t, x.a, x.b); break;
      }
    }
  });

  reports.merge_into(report);
}

}  // namespace
}  // namespace MSGD_CPU_NS

void MSGD_CAT(fused_step_cpu_, MSGD_CPU_VARIANT)(const int64_t* table, int64_t n_tensors,
                                                 const int64_t* groups, int64_t n_groups,
                                                 const int64_t* row_index, DType dtype,
                                                 const StepOptions& opt, int64_t* report,
                                                 int num_threads) {
  using MSGD_CPU_NS::run;
  switch (dtype) {
    case DType::Float32: return run<float>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::Float64: return run<double>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::BFloat16: return run<bf16>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::Float16: return run<fp16>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
  }
}

}  // namespace msgd
