// Small-block Stiefel mathematics of SPEC §2, written once for every backend.
// A block is p x n, row-major, p <= n <= any, p <= kMaxStiefelRows. Blocks on a
// manifold of radius rho satisfy W W^T = rho^2 I; the formulas use W/rho.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dtypes.h"

namespace msgd {

constexpr int kMaxStiefelRows = 32;

enum class Retraction : int { Qr = 0, Polar = 1, kCount };
constexpr const char* kRetractionNames[] = {"qr", "polar"};
static_assert(sizeof(kRetractionNames) / sizeof(kRetractionNames[0]) == size_t(Retraction::kCount),
              "kRetractionNames");

// S = sym(Z Wb^T) for Wb = W / rho (p x p, row-major): S_ij = (<z_i, wb_j> + <z_j, wb_i>) / 2.
template <typename A>
MSGD_HD void stiefel_sym_zw(const A* z, const A* w, int p, int64_t n, A inv_rho, A* s) {
  for (int i = 0; i < p; ++i)
    for (int j = 0; j < p; ++j) {
      A acc = 0;
      for (int64_t k = 0; k < n; ++k) acc += z[i * n + k] * w[j * n + k];
      s[i * p + j] = acc * inv_rho;
    }
  for (int i = 0; i < p; ++i)
    for (int j = i + 1; j < p; ++j) {
      A v = A(0.5) * (s[i * p + j] + s[j * p + i]);
      s[i * p + j] = v;
      s[j * p + i] = v;
    }
}

// In place: z <- z - S Wb (the tangent projection, and the transport at the new point).
template <typename A>
MSGD_HD void stiefel_project(A* z, const A* w, int p, int64_t n, A inv_rho, A* s) {
  stiefel_sym_zw(z, w, p, n, inv_rho, s);
  for (int i = 0; i < p; ++i)
    for (int64_t k = 0; k < n; ++k) {
      A acc = 0;
      for (int j = 0; j < p; ++j) acc += s[i * p + j] * w[j * n + k];
      z[i * n + k] -= acc * inv_rho;
    }
}

// In place: y <- the orthonormal factor of y's rows with positive diagonal R
// (Gram–Schmidt, each row orthogonalised twice: "twice is enough"). False if rank-deficient.
template <typename A>
MSGD_HD bool stiefel_qr(A* y, int p, int64_t n) {
  for (int i = 0; i < p; ++i) {
    A* v = y + i * n;
    for (int pass = 0; pass < 2; ++pass)
      for (int j = 0; j < i; ++j) {
        const A* q = y + j * n;
        A c = 0;
        for (int64_t k = 0; k < n; ++k) c += v[k] * q[k];
        for (int64_t k = 0; k < n; ++k) v[k] -= c * q[k];
      }
    A nn = 0;
    for (int64_t k = 0; k < n; ++k) nn += v[k] * v[k];
    if (!(nn > A(0)) || !std::isfinite(nn)) return false;
    A inv = A(1) / sqrt(nn);
    for (int64_t k = 0; k < n; ++k) v[k] *= inv;
  }
  return true;
}

// Symmetric eigen-decomposition by cyclic Jacobi: c (p x p) becomes diagonal, v the eigenvectors (columns).
template <typename A>
MSGD_HD void jacobi_eigen(A* c, A* v, int p) {
  for (int i = 0; i < p; ++i)
    for (int j = 0; j < p; ++j) v[i * p + j] = i == j ? A(1) : A(0);
  const A eps = sizeof(A) == 8 ? A(1e-15) : A(1e-7);
  for (int sweep = 0; sweep < 50; ++sweep) {
    A off = 0, diag = 0;
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < p; ++j) (i == j ? diag : off) += c[i * p + j] * c[i * p + j];
    if (off <= eps * eps * diag) break;
    for (int a = 0; a < p - 1; ++a)
      for (int b = a + 1; b < p; ++b) {
        A cab = c[a * p + b];
        if (cab == A(0)) continue;
        A theta = (c[b * p + b] - c[a * p + a]) / (A(2) * cab);
        A t = (theta >= 0 ? A(1) : A(-1)) / (fabs(theta) + sqrt(theta * theta + A(1)));
        A cs = A(1) / sqrt(t * t + A(1)), sn = t * cs;
        for (int k = 0; k < p; ++k) {  // columns a, b
          A x = c[k * p + a], y = c[k * p + b];
          c[k * p + a] = cs * x - sn * y;
          c[k * p + b] = sn * x + cs * y;
        }
        for (int k = 0; k < p; ++k) {  // rows a, b
          A x = c[a * p + k], y = c[b * p + k];
          c[a * p + k] = cs * x - sn * y;
          c[b * p + k] = sn * x + cs * y;
        }
        for (int k = 0; k < p; ++k) {
          A x = v[k * p + a], y = v[k * p + b];
          v[k * p + a] = cs * x - sn * y;
          v[k * p + b] = sn * x + cs * y;
        }
      }
  }
}

// In place: y <- (y y^T)^(-1/2) y, the polar factor U V^T of y's thin SVD. Needs scratch
// of 3 p*p + p*n. False if rank-deficient.
template <typename A>
MSGD_HD bool stiefel_polar(A* y, int p, int64_t n, A* scratch) {
  A* c = scratch;
  A* v = c + p * p;
  A* r = v + p * p;  // (y y^T)^(-1/2)
  A* out = r + p * p;
  for (int i = 0; i < p; ++i)
    for (int j = 0; j < p; ++j) {
      A acc = 0;
      for (int64_t k = 0; k < n; ++k) acc += y[i * n + k] * y[j * n + k];
      c[i * p + j] = acc;
    }
  A scale = 0;
  for (int i = 0; i < p; ++i) scale = c[i * p + i] > scale ? c[i * p + i] : scale;
  jacobi_eigen(c, v, p);
  for (int i = 0; i < p; ++i) {
    A lam = c[i * p + i];
    if (!(lam > scale * (sizeof(A) == 8 ? A(1e-24) : A(1e-12))) || !std::isfinite(lam)) return false;
  }
  for (int i = 0; i < p; ++i)
    for (int j = 0; j < p; ++j) {
      A acc = 0;
      for (int k = 0; k < p; ++k) acc += v[i * p + k] * v[j * p + k] / sqrt(c[k * p + k]);
      r[i * p + j] = acc;
    }
  for (int i = 0; i < p; ++i)
    for (int64_t k = 0; k < n; ++k) {
      A acc = 0;
      for (int j = 0; j < p; ++j) acc += r[i * p + j] * y[j * n + k];
      out[i * n + k] = acc;
    }
  for (int64_t e = 0; e < p * n; ++e) y[e] = out[e];
  return true;
}

}  // namespace msgd
