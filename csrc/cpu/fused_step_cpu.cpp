// The fused CPU step. A thread owns whole groups; a group's rows are reduced,
// its scale computed from the per-row sums in row order, then each row is moved
// and finished while it is still in cache. The row is staged in a per-thread
// scratch (math type) so memory sees one read of w, g, m and one write of w, m.
#include "fused_step_cpu.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "../core/row_math.h"

namespace msgd {
namespace {

template <typename T>
struct Row {
  T* w;
  const T* g;
  typename Math<T>::type* m;  // null without momentum
  int64_t n;
};

template <typename T>
class Worker {
  using A = typename Math<T>::type;

 public:
  Worker(const int64_t* table, const int64_t* groups, const int64_t* row_index,
         const StepOptions& opt, int64_t* report)
      : table_(table), groups_(groups), row_index_(row_index), opt_(opt), report_(report) {}

  void run_groups(int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) run_group(groups_ + k * kGroupFields);
  }

 private:
  const int64_t* table_;
  const int64_t* groups_;
  const int64_t* row_index_;
  const StepOptions& opt_;
  int64_t* report_;  // this thread's own report rows, merged by the caller
  std::vector<A> y_, mnew_;
  std::vector<Direction<A>> dirs_;

  Row<T> row(const int64_t* e, int64_t r) const {
    int64_t n = e[kRowLen];
    auto* m = reinterpret_cast<A*>(e[kMomentum]);
    return {reinterpret_cast<T*>(e[kParam]) + r * n, reinterpret_cast<const T*>(e[kGrad]) + r * n,
            m ? m + r * n : nullptr, n};
  }

  void skip(int64_t t, int64_t r) {
    int64_t* rep = report_ + t * kReportFields;
    if (rep[kSkippedRows]++ == 0 || r < rep[kFirstSkippedRow]) rep[kFirstSkippedRow] = r;
  }

  static RowSums<A> sums(const Row<T>& x) {
    const T* __restrict wp = x.w;
    const T* __restrict gp = x.g;
    const int64_t n = x.n;
    A ww = 0, wg = 0, gg = 0, bad = 0;
#pragma omp simd reduction(+ : ww, wg, gg, bad)
    for (int64_t i = 0; i < n; ++i) {
      A w = load(wp, i), g = load(gp, i);
      ww += w * w;
      wg += w * g;
      gg += g * g;
      bad += g - g;
    }
    RowSums<A> s;
    s.ww = ww; s.wg = wg; s.gg = gg; s.bad = bad;
    return s;
  }

  // ||a g + b w||^2, summed explicitly (no cancellation in the sphere's projection).
  static A tangent_sq(const Row<T>& x, const Direction<A>& d) {
    const T* __restrict wp = x.w;
    const T* __restrict gp = x.g;
    const int64_t n = x.n;
    const A da = d.a, db = d.b;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      A v = da * load(gp, i) + db * load(wp, i);
      acc += v * v;
    }
    return acc;
  }

  void run_group(const int64_t* gr) {
    const int64_t t = gr[kGroupTensor];
    const int64_t* e = table_ + t * kTensorFields;
    const Kind kind = Kind(e[kKind]);
    const int64_t* rows = row_index_ + gr[kGroupStart];
    const int64_t count = gr[kGroupCount];
    const bool fresh = e[kFlags] & kMomentumFresh;
    const float* radius = reinterpret_cast<const float*>(e[kRadius]);
    const A wd = A(opt_.weight_decay);
    if (kind == Kind::Stiefel) return run_stiefel_group(t, e, rows, count, fresh, radius);

    if (opt_.adaptive == Adaptive::None || !kind_is_adaptive(kind)) {
      // Rows are independent: reduce and move each while it is in cache.
      for (int64_t j = 0; j < count; ++j) {
        Row<T> x = row(e, rows[j]);
        Direction<A> d = row_direction(kind, sums(x), wd);
        if (!d.ok) { skip(t, rows[j]); continue; }
        move(t, rows[j], kind, x, d, fresh, radius);
      }
      return;
    }
    // Adaptive: the group's rows share s_G = 1/r(R_G); one bad row holds the group.
    dirs_.resize(size_t(count));
    A sum_sq = 0;
    bool ok = true;
    for (int64_t j = 0; j < count && ok; ++j) {
      Row<T> x = row(e, rows[j]);
      RowSums<A> s = sums(x);
      dirs_[size_t(j)] = row_direction(kind, s, wd);
      ok = dirs_[size_t(j)].ok;
      if (ok) sum_sq += kind == Kind::Psi ? psi_tangent_sq(s) : tangent_sq(x, dirs_[size_t(j)]);
    }
    if (!ok) {
      for (int64_t j = 0; j < count; ++j) skip(t, rows[j]);
      return;
    }
    const A s = adaptive_scale(opt_.adaptive, sum_sq, A(opt_.curvature), A(opt_.distance));
    for (int64_t j = 0; j < count; ++j) {
      Direction<A> d = dirs_[size_t(j)];
      d.a *= s;
      d.b *= s;
      move(t, rows[j], kind, row(e, rows[j]), d, fresh, radius);
    }
  }

  // Stiefel blocks (SPEC §2): the tangent direction needs the whole p x n block, so each
  // block is staged in scratch in the math type: wb = W, xi = its Riemannian gradient.
  std::vector<A> wb_, xi_, small_;

  bool stage_stiefel(const Row<T>& x, int p, A rho, A& sq) {
    const int64_t len = x.n, n = len / p;
    if (wb_.size() < size_t(len)) { wb_.resize(size_t(len)); xi_.resize(size_t(len)); }
    A bad = 0;
    for (int64_t k = 0; k < len; ++k) {
      wb_[size_t(k)] = load(x.w, k);
      A g = load(x.g, k);
      xi_[size_t(k)] = g;
      bad += g - g;
    }
    if (bad != A(0)) return false;
    small_.resize(size_t(3 * p * p + p * n));
    stiefel_project(xi_.data(), wb_.data(), p, n, A(1) / rho, small_.data());
    sq = 0;
    for (int64_t k = 0; k < len; ++k) sq += xi_[size_t(k)] * xi_[size_t(k)];
    return std::isfinite(sq);
  }

  void run_stiefel_group(int64_t t, const int64_t* e, const int64_t* rows, int64_t count, bool fresh,
                         const float* radius) {
    const int p = int(e[kBlockRows]);
    auto rho_of = [&](int64_t r) { return radius ? A(radius[r]) : A(1); };
    A s = 1;
    if (opt_.adaptive != Adaptive::None) {  // the group's blocks share s_G; a bad block holds the group
      A sum_sq = 0, sq = 0;
      for (int64_t j = 0; j < count; ++j) {
        if (!stage_stiefel(row(e, rows[j]), p, rho_of(rows[j]), sq)) {
          for (int64_t k = 0; k < count; ++k) skip(t, rows[k]);
          return;
        }
        sum_sq += sq;
      }
      s = adaptive_scale(opt_.adaptive, sum_sq, A(opt_.curvature), A(opt_.distance));
    }
    for (int64_t j = 0; j < count; ++j) {
      A sq = 0;
      Row<T> x = row(e, rows[j]);
      if (!stage_stiefel(x, p, rho_of(rows[j]), sq) || !move_stiefel(x, p, s, fresh, rho_of(rows[j])))
        skip(t, rows[j]);
    }
  }

  // Momentum, move, retraction to rho * orthonormal rows, transport by projection. The
  // result is written only when finite. Expects stage_stiefel's wb_ and xi_.
  bool move_stiefel(const Row<T>& x, int p, A s, bool fresh, A rho) {
    const int64_t len = x.n, n = len / p;
    const A lr = A(opt_.lr), mu = A(opt_.momentum);
    if (y_.size() < size_t(len)) { y_.resize(size_t(len)); mnew_.resize(size_t(len)); }
    A* y = y_.data();
    A* mn = mnew_.data();
    for (int64_t k = 0; k < len; ++k) {
      A d = s * xi_[size_t(k)];
      A u = d;
      if (x.m) {
        A mi = x.m[k];
        u = momentum_step(d, mi, mu, fresh, opt_.nesterov);
        mn[k] = mi;
      }
      y[k] = wb_[size_t(k)] - lr * u;
    }
    bool ok = opt_.retraction == Retraction::Polar ? stiefel_polar(y, p, n, small_.data())
                                                   : stiefel_qr(y, p, n);
    if (!ok) return false;
    A check = 0;
    for (int64_t k = 0; k < len; ++k) { y[k] *= rho; check += y[k] - y[k]; }
    if (x.m) {
      stiefel_project(mn, y, p, n, A(1) / rho, small_.data());
      for (int64_t k = 0; k < len; ++k) check += mn[k] - mn[k];
    }
    if (check != A(0)) return false;
    for (int64_t k = 0; k < len; ++k) store(x.w, k, y[k]);
    if (x.m)
      for (int64_t k = 0; k < len; ++k) x.m[k] = mn[k];
    return true;
  }

  // SPEC §3 steps 3–6 for one row with direction d = a g + b w. The loops run over
  // local restrict pointers so the compiler can vectorise them.
  void move(int64_t t, int64_t r, Kind kind, const Row<T>& x, const Direction<A>& d, bool fresh,
            const float* radius) {
    const A lr = A(opt_.lr), mu = A(opt_.momentum), da = d.a, db = d.b;
    const int64_t n = x.n;
    T* __restrict w = x.w;
    const T* __restrict g = x.g;
    A* __restrict m = x.m;

    if (kind == Kind::Euclidean) {  // no finish: write in place
      if (m) {
        if (fresh) move_euclidean<true>(w, g, m, n, lr, mu, da, db);
        else move_euclidean<false>(w, g, m, n, lr, mu, da, db);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          A wi = load(w, i);
          store(w, i, wi - lr * (da * load(g, i) + db * wi));
        }
      }
      return;
    }

    if (y_.size() < size_t(n)) { y_.resize(size_t(n)); mnew_.resize(size_t(n)); }
    A* __restrict y = y_.data();
    A* __restrict mn = mnew_.data();
    A yy = 0, ym = 0, mm = 0;
    if (m) {
      if (fresh) move_to_scratch<true>(w, g, m, y, mn, n, lr, mu, da, db, yy, ym, mm);
      else move_to_scratch<false>(w, g, m, y, mn, n, lr, mu, da, db, yy, ym, mm);
    } else {
#pragma omp simd reduction(+ : yy)
      for (int64_t i = 0; i < n; ++i) {
        A wi = load(w, i);
        A v = wi - lr * (da * load(g, i) + db * wi);
        y[i] = v;
        yy += v * v;
      }
    }
    const A rho = radius ? A(radius[r]) : A(1);
    Finish<A> f = row_finish(kind, yy, ym, mm, rho, A(opt_.psi_max_norm));
    if (!f.ok) { skip(t, r); return; }
    const A ff = f.f, fp = f.p, fq = f.q;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(w, i, ff * y[i]);
    if (m) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) m[i] = fp * mn[i] + fq * y[i];
    }
  }

  // Momentum variants are template parameters so the loop body has no branches.
  template <bool kFresh>
  void move_euclidean(T* __restrict w, const T* __restrict g, A* __restrict m, int64_t n, A lr, A mu,
                      A da, A db) const {
    const bool nesterov = opt_.nesterov;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      A wi = load(w, i);
      A mi = m[i];
      A u = momentum_step(da * load(g, i) + db * wi, mi, mu, kFresh, nesterov);
      m[i] = mi;
      store(w, i, wi - lr * u);
    }
  }

  template <bool kFresh>
  void move_to_scratch(const T* __restrict w, const T* __restrict g, const A* __restrict m,
                       A* __restrict y, A* __restrict mn, int64_t n, A lr, A mu, A da, A db, A& yy_out,
                       A& ym_out, A& mm_out) const {
    const bool nesterov = opt_.nesterov;
    A yy = 0, ym = 0, mm = 0;
#pragma omp simd reduction(+ : yy, ym, mm)
    for (int64_t i = 0; i < n; ++i) {
      A wi = load(w, i);
      A mi = m[i];
      A u = momentum_step(da * load(g, i) + db * wi, mi, mu, kFresh, nesterov);
      A v = wi - lr * u;
      y[i] = v;
      mn[i] = mi;
      yy += v * v;
      ym += v * mi;
      mm += mi * mi;
    }
    yy_out = yy; ym_out = ym; mm_out = mm;
  }
};

template <typename T>
void run(const int64_t* table, int64_t n_tensors, const int64_t* groups, int64_t n_groups,
         const int64_t* row_index, const StepOptions& opt, int64_t* report, int num_threads) {
  // Split the groups into contiguous ranges of about equal bytes.
  std::vector<int64_t> cost(size_t(n_groups) + 1, 0);
  for (int64_t k = 0; k < n_groups; ++k) {
    const int64_t* gr = groups + k * kGroupFields;
    cost[size_t(k) + 1] = cost[size_t(k)] + gr[kGroupCount] * table[gr[kGroupTensor] * kTensorFields + kRowLen];
  }
  const int64_t total = cost.back();
  constexpr int64_t kMinPerThread = 1 << 15;  // elements; below this a thread costs more than it saves
  int nt = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kMinPerThread)));
  nt = int(std::min<int64_t>(nt, std::max<int64_t>(n_groups, 1)));

  std::vector<int64_t> bounds(size_t(nt) + 1, n_groups);
  bounds[0] = 0;
  for (int i = 1; i < nt; ++i)
    bounds[size_t(i)] = std::lower_bound(cost.begin(), cost.end(), total * i / nt) - cost.begin();

  std::vector<std::vector<int64_t>> reports(static_cast<size_t>(nt));
  auto work = [&](int i) {
    auto& rep = reports[size_t(i)];
    rep.assign(size_t(n_tensors) * kReportFields, 0);
    for (int64_t t = 0; t < n_tensors; ++t) rep[size_t(t * kReportFields + kFirstSkippedRow)] = -1;
    Worker<T>(table, groups, row_index, opt, rep.data()).run_groups(bounds[size_t(i)], bounds[size_t(i) + 1]);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < nt; ++i) pool.emplace_back(work, i);
  work(0);
  for (auto& th : pool) th.join();

  for (int64_t t = 0; t < n_tensors; ++t) {
    int64_t* out = report + t * kReportFields;
    out[kSkippedRows] = 0;
    out[kFirstSkippedRow] = -1;
    for (auto& rep : reports) {
      const int64_t* in = rep.data() + t * kReportFields;
      if (in[kSkippedRows] == 0) continue;
      if (out[kSkippedRows] == 0 || in[kFirstSkippedRow] < out[kFirstSkippedRow])
        out[kFirstSkippedRow] = in[kFirstSkippedRow];
      out[kSkippedRows] += in[kSkippedRows];
    }
  }
}

}  // namespace

void fused_step_cpu(const int64_t* table, int64_t n_tensors, const int64_t* groups,
                    int64_t n_groups, const int64_t* row_index, DType dtype,
                    const StepOptions& opt, int64_t* report, int num_threads) {
  switch (dtype) {
    case DType::Float32: return run<float>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::Float64: return run<double>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::BFloat16: return run<bf16>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
    case DType::Float16: return run<fp16>(table, n_tensors, groups, n_groups, row_index, opt, report, num_threads);
  }
}

}  // namespace msgd
