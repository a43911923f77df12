// Stiefel blocks on the CPU: see stiefel_cpu.h.
//
// Like the row kernel, this file is compiled once per instruction set (CMakeLists.txt puts
// it in the AVX2+FMA variant too), and each variant's row kernel calls its own build of it:
// the AVX2 build contracts this file's multiply-adds (y = w - lr u, the momentum, the
// small-block sums) into FMAs, so a single baseline build would change the AVX2 variant's
// Stiefel bits.
#include "stiefel_cpu.h"

#include <cmath>
#include <type_traits>

#include "../core/row_math.h"
#include "../core/stiefel.h"

namespace msgd {
namespace MSGD_CPU_NS {

template <typename T>
void StiefelStepper<T>::run_group(const TensorView<T>& v, const int64_t* rows, int64_t count,
                                  int64_t* report) {
  const int p = v.block_rows;
  auto rho_of = [&](int64_t r) { return v.radius ? A(v.radius[r]) : A(1); };
  A s = 1;
  if (opt_.adaptive != Adaptive::None) {  // the group's blocks share s_G; a bad block holds the group
    auto sq = [&](int64_t j, A& out) { return stage(v.row(rows[j]), p, rho_of(rows[j]), out); };
    if (!group_scale(opt_, count, sq, s)) {
      for (int64_t k = 0; k < count; ++k) merge_skip_report(report, 1, rows[k]);
      return;
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    A sq = 0;
    const Row<T> x = v.row(rows[j]);
    if (!stage(x, p, rho_of(rows[j]), sq) || !move(v, x, s, rho_of(rows[j]), rows[j]))
      merge_skip_report(report, 1, rows[j]);
  }
}

// Stages block x: wb_ = W, xi_ = its Riemannian gradient, sq = ||xi||^2; false when the
// gradient or sq is not finite.
template <typename T>
bool StiefelStepper<T>::stage(const Row<T>& x, int p, A rho, A& sq) {
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

// Writes block r's new weights: rounded stochastically where the tensor asks for it.
template <typename T>
void StiefelStepper<T>::store_block(const TensorView<T>& v, T* w, const A* y, int64_t len,
                                    int64_t r) const {
  if constexpr (std::is_same<T, bf16>::value) {
    if (v.round) {
      const RoundingRow sr{v.round_key, r * len};
      for (int64_t k = 0; k < len; ++k) store_rounded(w, k, y[k], sr);
      return;
    }
  }
  for (int64_t k = 0; k < len; ++k) store(w, k, y[k]);
}

// Momentum, move, retraction to rho * orthonormal rows, transport by projection. The
// result is written only when finite. Expects stage's wb_ and xi_ of block x (row r).
template <typename T>
bool StiefelStepper<T>::move(const TensorView<T>& v, const Row<T>& x, A s, A rho, int64_t r) {
  const int p = v.block_rows;
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
      u = momentum_step(d, mi, mu, v.fresh, opt_.nesterov);
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
  store_block(v, x.w, y, len, r);
  if (x.m)
    for (int64_t k = 0; k < len; ++k) x.m[k] = mn[k];
  return true;
}

template class StiefelStepper<float>;
template class StiefelStepper<double>;
template class StiefelStepper<bf16>;
template class StiefelStepper<fp16>;

}  // namespace MSGD_CPU_NS
}  // namespace msgd
