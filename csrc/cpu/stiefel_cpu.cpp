// Stiefel blocks on the CPU: see stiefel_cpu.h.
//
// Like the row kernel, this file is compiled once per instruction set (CMakeLists.txt puts
// it in the AVX2+FMA variant too), and each variant's row kernel calls its own build of it:
// the AVX2 build contracts this file's multiply-adds (y = w - lr u, the momentum, the
// small-block sums) into FMAs, so a single baseline build would change the AVX2 variant's
// Stiefel bits.
#include "stiefel_cpu.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../core/row_math.h"
#include "../core/stiefel.h"
#include "row_dots.h"

namespace msgd {
namespace MSGD_CPU_NS {
namespace {

// ---- Lanes: one block per lane of a SIMD vector -----------------------------------------
//
// GCC/Clang vector extensions, as wide as the build's registers (32 bytes with AVX, else
// 16: a vector is never wider than the instruction set, so no vector ABI question arises).
// Without vector extensions a "vector" is one scalar.
#if defined(__GNUC__)
#if defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
template <typename A>
struct Simd {
  static constexpr int kL = kVecBytes / int(sizeof(A));
  typedef A V __attribute__((vector_size(kVecBytes)));
};
#else
template <typename A>
struct Simd {
  static constexpr int kL = 1;
  using V = A;
};
#endif

template <typename A>
struct Lanes {
  static constexpr int kL = Simd<A>::kL;
  using V = typename Simd<A>::V;
  using M = decltype(V{} < V{});  // a lane mask (bool without vectors)

  static inline V splat(A x) { return V{} + x; }
  static inline bool any(const M& m) {
    if constexpr (kL == 1) {
      return bool(m);
    } else {
#if defined(__GNUC__) && defined(__AVX__)
      if constexpr (sizeof(M) == 32) {  // one test instead of a branch per lane
        const __m256i x = reinterpret_cast<const __m256i&>(m);
        return !_mm256_testz_si256(x, x);
      }
#endif
      for (int l = 0; l < kL; ++l)
        if (m[l]) return true;
      return false;
    }
  }
  static inline V sel(const M& m, const V& a, const V& b) { return m ? a : b; }
  static inline M mnot(const M& m) {
    if constexpr (kL == 1) return !m;
    else return m == M{};
  }
  static inline M finite(const V& x) { return (x - x) == splat(A(0)); }  // false for inf, NaN
  static inline V vabs(const V& x) { return sel(x < splat(A(0)), -x, x); }
  static inline V vsqrt(const V& x) {
#if defined(__GNUC__) && defined(__AVX__)
    if constexpr (sizeof(A) == 4) return V(_mm256_sqrt_ps(__m256(x)));
    else return V(_mm256_sqrt_pd(__m256d(x)));
#elif defined(__GNUC__) && defined(__SSE2__)
    if constexpr (sizeof(A) == 4) return V(_mm_sqrt_ps(__m128(x)));
    else return V(_mm_sqrt_pd(__m128d(x)));
#else
    if constexpr (kL == 1) {
      return std::sqrt(x);
    } else {
      V r = x;
      for (int l = 0; l < kL; ++l) r[l] = std::sqrt(x[l]);
      return r;
    }
#endif
  }
};

template <typename A>
using V_of = typename Lanes<A>::V;

// The structure-of-arrays scratch of one batch: element e of lane l's block at [e][l].
template <typename A>
struct Batch {
  using V = typename Lanes<A>::V;
  V *w, *z, *m, *y;       // p*n each: W, the gradient (then xi), the momentum (then m'), the new W
  V *s, *c, *ev, *r;      // p*p each: sym(Z W^T); the polar factor's Gram, eigenvectors, C^(-1/2)
  V *out;                 // p*n: the polar factor before it is copied to y
  V *rho, *inv_rho, *scale;  // one vector each: per-lane radius, 1/radius, step scale s_G
  V *sq, *ok;             // results: ||xi||^2 and 1 where the lane's block was stepped (else 0)
};

struct LaneArgs {
  double lr, mu;
  bool has_m, fresh, nesterov, polar, scale_pass;
};

// The formulas of core/stiefel.h, written over lanes. kP, kN: the block's size when fixed at
// compile time (then every loop unrolls), 0 for sizes known at run time.
template <typename A, int kP, int kN>
struct LaneMath {
  using L = Lanes<A>;
  using V = typename L::V;
  using M = typename L::M;

  // z <- z - sym(z Wb^T) Wb with Wb = w * inv_rho (stiefel_project)
  static inline void project(V* z, const V* w, const V& inv_rho, V* s, int p, int n) {
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < p; ++j) {
        V acc = z[i * n] * w[j * n];
        for (int k = 1; k < n; ++k) acc += z[i * n + k] * w[j * n + k];
        s[i * p + j] = acc * inv_rho;
      }
    for (int i = 0; i < p; ++i)
      for (int j = i + 1; j < p; ++j) {
        V v = A(0.5) * (s[i * p + j] + s[j * p + i]);
        s[i * p + j] = v;
        s[j * p + i] = v;
      }
    for (int i = 0; i < p; ++i)
      for (int k = 0; k < n; ++k) {
        V acc = s[i * p] * w[k];
        for (int j = 1; j < p; ++j) acc += s[i * p + j] * w[j * n + k];
        z[i * n + k] -= acc * inv_rho;
      }
  }

  // y <- the orthonormal factor with positive diagonal R (stiefel_qr); the lanes that are
  // not rank-deficient
  static inline M qr(V* y, int p, int n) {
    M ok = L::splat(A(0)) == L::splat(A(0));
    for (int i = 0; i < p; ++i) {
      V* v = y + i * n;
      for (int pass = 0; pass < 2; ++pass)
        for (int j = 0; j < i; ++j) {
          const V* q = y + j * n;
          V c = v[0] * q[0];
          for (int k = 1; k < n; ++k) c += v[k] * q[k];
          for (int k = 0; k < n; ++k) v[k] -= c * q[k];
        }
      V nn = v[0] * v[0];
      for (int k = 1; k < n; ++k) nn += v[k] * v[k];
      ok = ok & (nn > L::splat(A(0))) & L::finite(nn);
      const V inv = A(1) / L::vsqrt(nn);
      for (int k = 0; k < n; ++k) v[k] *= inv;
    }
    return ok;
  }

  // Cyclic Jacobi on c (jacobi_eigen), each lane stopping at its own convergence: a lane
  // that has converged turns by the identity, exactly.
  static inline void jacobi(V* c, V* v, int p) {
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < p; ++j) v[i * p + j] = L::splat(i == j ? A(1) : A(0));
    const A eps = sizeof(A) == 8 ? A(1e-15) : A(1e-7);
    const V one = L::splat(A(1)), zero = L::splat(A(0));
    M active = one == one;
    for (int sweep = 0; sweep < 50; ++sweep) {
      V off = zero, diag = zero;
      for (int i = 0; i < p; ++i)
        for (int j = 0; j < p; ++j) {
          const V x = c[i * p + j] * c[i * p + j];
          if (i == j) diag += x; else off += x;
        }
      active = active & (off > (eps * eps) * diag);
      if (!L::any(active)) break;
      for (int a = 0; a < p - 1; ++a)
        for (int b = a + 1; b < p; ++b) {
          const V cab = c[a * p + b];
          const M turn = active & (cab != zero);
          if (!L::any(turn)) continue;
          const V theta = (c[b * p + b] - c[a * p + a]) / (A(2) * cab);
          const V t = L::sel(theta >= zero, one, -one) / (L::vabs(theta) + L::vsqrt(theta * theta + one));
          V cs = one / L::vsqrt(t * t + one), sn = t * cs;
          cs = L::sel(turn, cs, one);
          sn = L::sel(turn, sn, zero);
          for (int k = 0; k < p; ++k) {  // columns a, b
            const V x = c[k * p + a], y = c[k * p + b];
            c[k * p + a] = cs * x - sn * y;
            c[k * p + b] = sn * x + cs * y;
          }
          for (int k = 0; k < p; ++k) {  // rows a, b
            const V x = c[a * p + k], y = c[b * p + k];
            c[a * p + k] = cs * x - sn * y;
            c[b * p + k] = sn * x + cs * y;
          }
          for (int k = 0; k < p; ++k) {
            const V x = v[k * p + a], y = v[k * p + b];
            v[k * p + a] = cs * x - sn * y;
            v[k * p + b] = sn * x + cs * y;
          }
        }
    }
  }

  // y <- (y y^T)^(-1/2) y (stiefel_polar); the lanes that are not rank-deficient
  static inline M polar(V* y, V* c, V* ev, V* r, V* out, int p, int n) {
    for (int i = 0; i < p; ++i)
      for (int j = i; j < p; ++j) {
        V acc = y[i * n] * y[j * n];
        for (int k = 1; k < n; ++k) acc += y[i * n + k] * y[j * n + k];
        c[i * p + j] = acc;
        c[j * p + i] = acc;
      }
    V scale = c[0];
    for (int i = 1; i < p; ++i) scale = L::sel(c[i * p + i] > scale, c[i * p + i], scale);
    jacobi(c, ev, p);
    M ok = scale == scale;
    const A tiny = sizeof(A) == 8 ? A(1e-24) : A(1e-12);
    for (int i = 0; i < p; ++i) {
      const V lam = c[i * p + i];
      ok = ok & (lam > tiny * scale) & L::finite(lam);
      c[i * p + i] = A(1) / L::vsqrt(lam);  // now lam^(-1/2)
    }
    for (int i = 0; i < p; ++i)
      for (int j = i; j < p; ++j) {
        V acc = ev[i * p] * ev[j * p] * c[0];
        for (int k = 1; k < p; ++k) acc += ev[i * p + k] * ev[j * p + k] * c[k * p + k];
        r[i * p + j] = acc;
        r[j * p + i] = acc;
      }
    for (int i = 0; i < p; ++i)
      for (int k = 0; k < n; ++k) {
        V acc = r[i * p] * y[k];
        for (int j = 1; j < p; ++j) acc += r[i * p + j] * y[j * n + k];
        out[i * n + k] = acc;
      }
    for (int e = 0; e < p * n; ++e) y[e] = out[e];
    return ok;
  }

  // 3x3 blocks: y <- its polar factor by Newton's iteration X <- (g X + X^-T / g) / 2 with
  // Frobenius scaling g = sqrt(||X^-1|| / ||X||) (X^-T = cofactor(X) / det X), each lane
  // stopping where a step moves X by less than a rounding-level tolerance (quadratic
  // convergence: the result is then exact to rounding). A lane whose condition number
  // ||X|| ||X^-1|| (Frobenius; at most 3 times the 2-norm one) is not clearly below the rank
  // tolerance, or that does not converge, takes the Jacobi route (polar) instead: the rank
  // decision and the rare hard block stay those of the general formula. Returns the lanes
  // that are not rank-deficient.
  static inline M polar3(V* y, V* c, V* ev, V* r, V* out) {
    const V zero = L::splat(A(0)), one = L::splat(A(1)), half = L::splat(A(0.5));
    const A tol = sizeof(A) == 8 ? A(1e-22) : A(1e-10);  // squared step, ||X||^2 ~ 3
    const A kappa_max = A(1e6);  // the rank tolerance on sigma_max / sigma_min (reference)
    // y keeps the block as it came (the fallback's input); element by element, as the copies
    // of lane_step_body: a second array and a loop here became rep movs, two per batch
    V x[9];
#if defined(__GNUC__)
#pragma GCC unroll 9
#endif
    for (int e = 0; e < 9; ++e) x[e] = y[e];
    M active = one == one, easy = active;
    for (int it = 0; it < 16; ++it) {
      V cf[9];  // the cofactor matrix: X^-T = cf / det
      cf[0] = x[4] * x[8] - x[5] * x[7];
      cf[1] = x[5] * x[6] - x[3] * x[8];
      cf[2] = x[3] * x[7] - x[4] * x[6];
      cf[3] = x[2] * x[7] - x[1] * x[8];
      cf[4] = x[0] * x[8] - x[2] * x[6];
      cf[5] = x[1] * x[6] - x[0] * x[7];
      cf[6] = x[1] * x[5] - x[2] * x[4];
      cf[7] = x[2] * x[3] - x[0] * x[5];
      cf[8] = x[0] * x[4] - x[1] * x[3];
      const V det = x[0] * cf[0] + x[1] * cf[1] + x[2] * cf[2];
      V nx = x[0] * x[0], nc = cf[0] * cf[0];
      for (int e = 1; e < 9; ++e) {
        nx += x[e] * x[e];
        nc += cf[e] * cf[e];
      }
      const V inv_det = one / det;
      const V ni = nc * inv_det * inv_det;  // ||X^-1||^2
      if (it == 0) {  // kappa_F^2 = ||X||^2 ||X^-1||^2, NaN or inf for a singular block
        const V k2 = nx * ni;
        easy = L::finite(k2) & (k2 < L::splat(kappa_max * kappa_max));
        active = easy;
      }
      const V g = L::vsqrt(L::vsqrt(ni / nx));  // sqrt(||X^-1|| / ||X||)
      const V a = half * g, b = half * inv_det / g;
      V step = zero;
      for (int e = 0; e < 9; ++e) {
        const V xn = a * x[e] + b * cf[e];
        const V d = xn - x[e];
        step += d * d;
        x[e] = L::sel(active, xn, x[e]);
      }
      active = active & L::mnot(step <= L::splat(tol));
      if (!L::any(active)) break;
    }
    const M fallback = active | L::mnot(easy);  // not converged, or not clearly well conditioned
    M ok = one == one;
    if (L::any(fallback)) {
      ok = polar(y, c, ev, r, out, 3, 3);
      for (int e = 0; e < 9; ++e) x[e] = L::sel(fallback, y[e], x[e]);
      ok = ok | L::mnot(fallback);
    }
#if defined(__GNUC__)
#pragma GCC unroll 9
#endif
    for (int e = 0; e < 9; ++e) y[e] = x[e];
    return ok;
  }
};

// One batch of blocks, in b: the Riemannian gradient (z <- xi) and ||xi||^2; unless
// a.scale_pass, then the step: momentum, move, retraction, transport (m <- the new m, y <-
// the new W). b.ok: 1 in the lanes whose gradient and result are finite (and, stepping, whose
// block is not rank-deficient).
template <typename A, int kP, int kN>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void lane_core(V_of<A>* w, V_of<A>* z, V_of<A>* m, V_of<A>* y, V_of<A>* sm, V_of<A>* c,
                      V_of<A>* ev, V_of<A>* r, V_of<A>* out, const V_of<A>& rho, const V_of<A>& inv_rho,
                      const V_of<A>& scale, const LaneArgs& a, int p, int n, V_of<A>& sq_out,
                      V_of<A>& ok_out) {
  using LM = LaneMath<A, kP, kN>;
  using L = Lanes<A>;
  using V = typename L::V;
  using M = typename L::M;
  const int len = p * n;
  const V zero = L::splat(A(0)), one = L::splat(A(1));
  LM::project(z, w, inv_rho, sm, p, n);
  V sq = z[0] * z[0];
  for (int e = 1; e < len; ++e) sq += z[e] * z[e];
  // finite(sq) is also "the gradient is finite" (stage's test): an inf or NaN element stays
  // one in xi (its own element minus anything is inf or NaN), and so in the sum of squares
  M ok = L::finite(sq);
  sq_out = sq;
  if (!a.scale_pass) {
    const V s = scale, lrv = L::splat(A(a.lr)), mu = L::splat(A(a.mu));
    for (int e = 0; e < len; ++e) {
      const V d = s * z[e];
      V u = d;
      if (a.has_m) {
        const V mi = a.fresh ? d : mu * m[e] + d;
        u = a.nesterov ? d + mu * mi : mi;
        m[e] = mi;
      }
      y[e] = w[e] - lrv * u;
    }
    if constexpr (kP == 3 && kN == 3)
      ok = ok & (a.polar ? LM::polar3(y, c, ev, r, out) : LM::qr(y, p, n));
    else
      ok = ok & (a.polar ? LM::polar(y, c, ev, r, out, p, n) : LM::qr(y, p, n));
    V check = zero;
    for (int e = 0; e < len; ++e) {
      y[e] *= rho;
      check += y[e] - y[e];
    }
    if (a.has_m) {
      LM::project(m, y, inv_rho, sm, p, n);
      for (int e = 0; e < len; ++e) check += m[e] - m[e];
    }
    ok = ok & (check == zero);
  }
  ok_out = L::sel(ok, one, zero);
}

template <typename A, int kP, int kN>
inline void lane_step_body(const Batch<A>& b, const LaneArgs& a, int p_, int n_) {
  using V = typename Lanes<A>::V;
  const int p = kP ? kP : p_, n = kN ? kN : n_;
  if constexpr (kP != 0) {
    // Fixed sizes work on local copies (no aliasing: the compiler keeps them in registers
    // where they fit)
    constexpr int kE = kP * kN, kS = kP * kP;
    // (copies unrolled element by element: as loops they become memcpy/memset calls or
    // rep movs, which cost more than the arithmetic of a 3x3 batch)
    V lm[kE], lw[kE], lz[kE], ly[kE], ls[kS], lc[kS], lev[kS], lr[kS], lout[kE];
    const bool read_m = a.has_m && !a.fresh && !a.scale_pass;
#if defined(__GNUC__)
#pragma GCC unroll 64
#endif
    for (int e = 0; e < kE; ++e) {
      lw[e] = b.w[e];
      lz[e] = b.z[e];
      lm[e] = read_m ? b.m[e] : V{};  // (zero: a fresh buffer is not read)
    }
    lane_core<A, kP, kN>(lw, lz, lm, ly, ls, lc, lev, lr, lout, *b.rho, *b.inv_rho, *b.scale, a, p, n,
                         *b.sq, *b.ok);
    if (!a.scale_pass) {
#if defined(__GNUC__)
#pragma GCC unroll 64
#endif
      for (int e = 0; e < kE; ++e) {
        b.y[e] = ly[e];
        if (a.has_m) b.m[e] = lm[e];
      }
    }
  } else {  // run-time sizes: on the scratch itself
    lane_core<A, 0, 0>(b.w, b.z, b.m, b.y, b.s, b.c, b.ev, b.r, b.out, *b.rho, *b.inv_rho, *b.scale, a, p,
                       n, *b.sq, *b.ok);
  }
}

// The same out of line: one copy per math type and size, whatever the storage type (1x1
// blocks, a few operations, take the body inline).
template <typename A, int kP, int kN>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void lane_step(const Batch<A>& b, const LaneArgs& a, int p, int n) {
  lane_step_body<A, kP, kN>(b, a, p, n);
}

template <typename A>
using LaneStepFn = void (*)(const Batch<A>&, const LaneArgs&, int, int);

#if defined(__GNUC__) && defined(__AVX__)
// 3x3 float blocks, 8 consecutive ones = 72 contiguous floats: elements 0..7 of each block by
// one unaligned load, turned into element vectors by an 8x8 transpose in registers (its own
// inverse), element 8 by scalars. out[e][l] = element e of block l.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

template <typename V>
inline void gather9(const float* p, V* out) {
  __m256 r[8];
  for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(p + 9 * l);
  transpose8(r);
  for (int e = 0; e < 8; ++e) out[e] = V(r[e]);
  out[8] = V(_mm256_set_ps(p[71], p[62], p[53], p[44], p[35], p[26], p[17], p[8]));
}

template <typename V>
inline void scatter9(const V* in, float* p) {
  __m256 r[8];
  for (int e = 0; e < 8; ++e) r[e] = __m256(in[e]);
  transpose8(r);
  for (int l = 0; l < 8; ++l) _mm256_storeu_ps(p + 9 * l, r[l]);
  const V last = in[8];
  for (int l = 0; l < 8; ++l) p[9 * l + 8] = last[l];
}

#define MSGD_STIEFEL_RUN9 1
// How many batches of 8 3x3 blocks a run of consecutive blocks prefetches ahead (ResNet-50's
// 3x3 kernels, one thread: 4 to 16 do about as well; without, the step takes 6-8% longer)
constexpr int64_t kRun9Ahead = 8;

// Prefetches the batch kRun9Ahead batches after the one of blocks [i, i + 8) where it lies within
// the first `end` blocks (`all`: the tensor's w, g, m as one row of elements).
MSGD_INLINE void prefetch_run9_ahead(const Row<float>& all, int64_t i, int64_t end) {
  const int64_t ahead = (i + kRun9Ahead * 8) * 9;
  if (ahead + 72 <= end * 9) prefetch_chunk(all, ahead, ahead + 72);
}
#else
#define MSGD_STIEFEL_RUN9 0
#endif

// Batches of blocks [0, count): block j is row row_of(j) of tensor v, its step scale
// scale[j] (null: 1). scale_pass: each block's ||xi||^2 and whether it is finite, to sq and ok. Else
// each block is stepped and written where its result is finite; the others are reported.
// kP, kN: the block size when fixed at compile time (gather and scatter unroll too).
template <int kP, int kN, typename T, typename A, typename RowOf>
void lane_batches(const TensorView<T>& v, const StepOptions& opt, Vec<A>& scratch, int64_t count,
                  RowOf row_of, const A* scale, bool scale_pass, A* sq, char* ok, int64_t* report) {
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int kL = L::kL;
  if (count == 0) return;
  const int p = kP ? kP : v.block_rows;
  const int64_t len = kP ? int64_t(kP) * kN : v.row_len, n = len / p;
  // the scratch: 5 arrays of len vectors, 4 of p*p, 5 single vectors, aligned to a vector
  const int64_t vecs = 5 * len + 4 * int64_t(p) * p + 5;
  if (scratch.size() < size_t((vecs + 1) * kL)) scratch.resize(size_t((vecs + 1) * kL));
  A* base = scratch.data();
  while (reinterpret_cast<uintptr_t>(base) % sizeof(V) != 0) ++base;
  V* at = reinterpret_cast<V*>(base);
  auto take = [&](int64_t k) { V* q = at; at += k; return q; };
  Batch<A> b;
  b.w = take(len); b.z = take(len); b.m = take(len); b.y = take(len); b.out = take(len);
  b.s = take(p * p); b.c = take(p * p); b.ev = take(p * p); b.r = take(p * p);
  b.rho = take(1); b.inv_rho = take(1); b.scale = take(1); b.sq = take(1); b.ok = take(1);
  A* const w_ = reinterpret_cast<A*>(b.w);
  A* const z_ = reinterpret_cast<A*>(b.z);
  A* const m_ = reinterpret_cast<A*>(b.m);
  A* const rho_ = reinterpret_cast<A*>(b.rho);
  A* const inv_rho_ = reinterpret_cast<A*>(b.inv_rho);
  A* const scale_l = reinterpret_cast<A*>(b.scale);
  const A* const y_ = reinterpret_cast<const A*>(b.y);
  const A* const sq_l = reinterpret_cast<const A*>(b.sq);
  const A* const ok_l = reinterpret_cast<const A*>(b.ok);

  const bool read_m = !scale_pass && v.m && !v.fresh;
  const bool write_m = !scale_pass && v.m;
  const bool rounded = std::is_same<T, bf16>::value && v.round;
  const LaneArgs args{opt.lr, opt.momentum, v.m != nullptr, v.fresh, opt.nesterov,
                      opt.retraction == Retraction::Polar, scale_pass};
  const LaneStepFn<A> step = lane_step<A, kP, kN>;
  int64_t rows[kL];
  for (int l = 0; l < kL; ++l) {  // radius 1, scale 1 unless set per batch
    rho_[l] = inv_rho_[l] = A(1);
    scale_l[l] = A(1);
  }
  for (int64_t j0 = 0; j0 < count; j0 += kL) {
    const int lanes = int(count - j0 < kL ? count - j0 : kL);
    for (int l = 0; l < kL; ++l) {  // idle lanes repeat the batch's first block
      const int64_t j = j0 + (l < lanes ? l : 0);
      const int64_t r = row_of(j);
      rows[l] = r;
      if (v.radius) {
        const A rho = A(v.radius[r]);
        rho_[l] = rho;
        inv_rho_[l] = A(1) / rho;
      }
      if (scale) scale_l[l] = scale[j];
    }
    // blocks of consecutive rows (the common case): the lanes are contiguous in memory
    bool consecutive = lanes == kL;
    for (int l = 1; consecutive && l < kL; ++l) consecutive = rows[l] == rows[0] + l;
    // 1x1 blocks: one vector per array
    const bool run1 = kP == 1 && kN == 1 && std::is_same<T, A>::value && consecutive;
    // 3x3 float blocks: contiguous loads, transposed in registers
    bool run9 = false;
#if MSGD_STIEFEL_RUN9
    if constexpr (kP == 3 && kN == 3 && std::is_same<T, float>::value && std::is_same<A, float>::value &&
                  kL == 8) {
      run9 = consecutive;
      if (run9) {
        // a batch reads 288 bytes of each stream, too little a step for the hardware's
        // prefetcher to run far enough ahead: the batch kRun9Ahead on is prefetched here
        prefetch_run9_ahead(Row<float>{v.w, v.g, write_m ? v.m : nullptr, v.rows * 9}, rows[0], v.rows);
        gather9(v.w + rows[0] * 9, b.w);
        gather9(v.g + rows[0] * 9, b.z);
        if (read_m) gather9(v.m + rows[0] * 9, b.m);
      }
    }
#endif
    if (run1) {
      std::memcpy(w_, v.w + rows[0], sizeof(V));
      std::memcpy(z_, v.g + rows[0], sizeof(V));
      if (read_m) std::memcpy(m_, v.m + rows[0], sizeof(V));
    }
    for (int l = 0; !run1 && !run9 && l < kL; ++l) {  // gather: element e of lane l at [e * kL + l]
      const T* w = v.w + rows[l] * len;
      const T* g = v.g + rows[l] * len;
      for (int64_t e = 0; e < len; ++e) {
        w_[e * kL + l] = load(w, e);
        z_[e * kL + l] = load(g, e);
      }
    }
    if (read_m && !run1 && !run9)
      for (int l = 0; l < kL; ++l) {
        const A* m = v.m + rows[l] * len;
        for (int64_t e = 0; e < len; ++e) m_[e * kL + l] = m[e];
      }
    if (kP == 1 && kN == 1) lane_step_body<A, 1, 1>(b, args, 1, 1);
    else step(b, args, p, int(n));
    if (scale_pass) {
      for (int l = 0; l < lanes; ++l) {
        sq[j0 + l] = sq_l[l];
        ok[j0 + l] = ok_l[l] != A(0);
      }
      continue;
    }
    bool all_ok = true;
    for (int l = 0; l < lanes; ++l) {
      if (ok_l[l] != A(0)) continue;
      merge_skip_report(report, 1, rows[l]);
      rows[l] = -1;
      all_ok = false;
    }
    if (run1 && all_ok && !rounded) {
      std::memcpy(static_cast<void*>(v.w + rows[0]), y_, sizeof(V));
      if (write_m) std::memcpy(v.m + rows[0], m_, sizeof(V));
      continue;
    }
#if MSGD_STIEFEL_RUN9
    if constexpr (kP == 3 && kN == 3 && std::is_same<T, float>::value && std::is_same<A, float>::value &&
                  kL == 8) {
      if (run9 && all_ok) {
        scatter9(b.y, v.w + rows[0] * 9);
        if (write_m) scatter9(b.m, v.m + rows[0] * 9);
        continue;
      }
    }
#endif
    for (int l = 0; l < lanes; ++l) {  // scatter
      if (rows[l] < 0) continue;
      T* w = v.w + rows[l] * len;
      if (rounded) {
        if constexpr (std::is_same<T, bf16>::value) {
          const RoundingRow sr{v.round_key, rows[l] * len};
          for (int64_t e = 0; e < len; ++e) store_rounded(w, e, y_[e * kL + l], sr);
        }
      } else {
        for (int64_t e = 0; e < len; ++e) store(w, e, y_[e * kL + l]);
      }
    }
    if (write_m)
      for (int l = 0; l < lanes; ++l) {
        if (rows[l] < 0) continue;
        A* m = v.m + rows[l] * len;
        for (int64_t e = 0; e < len; ++e) m[e] = m_[e * kL + l];
      }
  }
}

// 1x1 blocks (pointwise convolutions, the most numerous blocks of a ResNet) of consecutive
// rows [r0, r1) of a float or double tensor with radius 1: the lanes are kL consecutive
// elements, loaded and stored whole. Stops before the first batch with a block that cannot
// be stepped (lane_batches takes over there and reports it); returns the first row not done.
template <typename A>
int64_t unit_blocks(const TensorView<A>& v, const StepOptions& opt, int64_t r0, int64_t r1) {
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int kL = L::kL;
  V w, z, m, y, s, c, ev, r, out, one = L::splat(A(1)), scale = one, rho = one, inv_rho = one, sq, ok;
  Batch<A> b{&w, &z, &m, &y, &s, &c, &ev, &r, &out, &rho, &inv_rho, &scale, &sq, &ok};
  const LaneArgs args{opt.lr, opt.momentum, v.m != nullptr, v.fresh, opt.nesterov,
                      opt.retraction == Retraction::Polar, false};
  const bool read_m = v.m && !v.fresh;
  m = L::splat(A(0));
  int64_t i = r0;
  for (; i + kL <= r1; i += kL) {
    std::memcpy(&w, v.w + i, sizeof(V));
    std::memcpy(&z, v.g + i, sizeof(V));
    if (read_m) std::memcpy(&m, v.m + i, sizeof(V));
    lane_step_body<A, 1, 1>(b, args, 1, 1);
    if (L::any(ok == L::splat(A(0)))) break;
    std::memcpy(v.w + i, &y, sizeof(V));
    if (v.m) std::memcpy(v.m + i, &m, sizeof(V));
  }
  return i;
}

#if defined(__GNUC__) && defined(__AVX2__) && defined(__FMA__)
// unit_blocks for float with AVX2+FMA: the same operations as lane_step_body<float, 1, 1> at
// radius 1 and scale 1 (where its products by 1 are exact and drop out), written with explicit
// FMAs where that build contracts and a register barrier where it does not, so the bits are
// those of the lane path. Two vectors per turn; sqrt(y^2) is |y| exactly (binary floating point,
// y^2 normal), so the square root is not taken: a vector with y^2 below the normal range (or
// any lane that cannot be stepped) ends the run and goes to the lane path.
inline __m256 unfused(__m256 x) {  // x is used as rounded: no FMA may absorb it
  asm("" : "+x"(x));
  return x;
}

inline __m256 finite8(__m256 x) {  // all-ones where x is finite
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
}

// One vector: w, z, m in; y (new w), m (new m) out; the lanes that are fine.
template <bool kHasM, bool kFresh, bool kNesterov>
inline __m256 unit8(__m256 w, __m256 z, __m256& m, __m256 lr, __m256 mu, __m256& y) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 s = _mm256_mul_ps(z, w);
  const __m256 xi = _mm256_sub_ps(z, unfused(_mm256_mul_ps(s, w)));  // the tangent projection
  __m256 ok = _mm256_and_ps(finite8(z), finite8(_mm256_mul_ps(xi, xi)));
  __m256 u = xi;
  if constexpr (kHasM) {
    const __m256 mi = kFresh ? xi : _mm256_fmadd_ps(m, mu, xi);
    u = kNesterov ? _mm256_fmadd_ps(mi, mu, xi) : mi;
    m = mi;
  }
  const __m256 yr = _mm256_fnmadd_ps(lr, u, w);
  const __m256 nn = _mm256_mul_ps(yr, yr);
  // y^2 normal and finite (also rules out y = 0, NaN, inf): then sqrt(y^2) = |y|
  ok = _mm256_and_ps(ok, _mm256_cmp_ps(nn, _mm256_set1_ps(1.17549435e-38f), _CMP_GE_OQ));
  ok = _mm256_and_ps(ok, finite8(nn));
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(yr, abs_mask));
  y = _mm256_mul_ps(inv, yr);
  ok = _mm256_and_ps(ok, finite8(y));
  if constexpr (kHasM) {  // transport: m - (m y) y
    const __m256 t = _mm256_mul_ps(_mm256_mul_ps(m, y), y);
    m = _mm256_sub_ps(m, unfused(t));
    ok = _mm256_and_ps(ok, finite8(m));
  }
  return ok;
}

// Elements a unit stream prefetches ahead: with the hardware's prefetcher alone, its five
// streams (w, g, m read; w, m written) took 1.6x as long (ResNet-50's 1x1 kernels, one thread)
constexpr int64_t kUnitAhead = 512;

template <bool kHasM, bool kFresh, bool kNesterov>
int64_t unit_stream(const TensorView<float>& v, const StepOptions& opt, int64_t i, int64_t r1) {
  const __m256 lr = _mm256_set1_ps(float(opt.lr)), mu = _mm256_set1_ps(float(opt.momentum));
  const Row<float> all{v.w, v.g, v.m, r1};
  for (; i + 16 <= r1; i += 16) {
    if (i + kUnitAhead + 16 <= r1) prefetch_chunk(all, i + kUnitAhead, i + kUnitAhead + 16);
    const __m256 w0 = _mm256_loadu_ps(v.w + i), w1 = _mm256_loadu_ps(v.w + i + 8);
    const __m256 z0 = _mm256_loadu_ps(v.g + i), z1 = _mm256_loadu_ps(v.g + i + 8);
    __m256 m0 = _mm256_setzero_ps(), m1 = m0;
    if (kHasM && !kFresh) {
      m0 = _mm256_loadu_ps(v.m + i);
      m1 = _mm256_loadu_ps(v.m + i + 8);
    }
    __m256 y0, y1;
    const __m256 ok0 = unit8<kHasM, kFresh, kNesterov>(w0, z0, m0, lr, mu, y0);
    const __m256 ok1 = unit8<kHasM, kFresh, kNesterov>(w1, z1, m1, lr, mu, y1);
    if (_mm256_movemask_ps(_mm256_and_ps(ok0, ok1)) != 0xff) break;
    _mm256_storeu_ps(v.w + i, y0);
    _mm256_storeu_ps(v.w + i + 8, y1);
    if constexpr (kHasM) {
      _mm256_storeu_ps(v.m + i, m0);
      _mm256_storeu_ps(v.m + i + 8, m1);
    }
  }
  return i;
}

inline int64_t unit_blocks_avx2(const TensorView<float>& v, const StepOptions& opt, int64_t r0, int64_t r1) {
  if (!v.m) return unit_stream<false, false, false>(v, opt, r0, r1);
  if (v.fresh)
    return opt.nesterov ? unit_stream<true, true, true>(v, opt, r0, r1)
                        : unit_stream<true, true, false>(v, opt, r0, r1);
  return opt.nesterov ? unit_stream<true, false, true>(v, opt, r0, r1)
                      : unit_stream<true, false, false>(v, opt, r0, r1);
}
#define MSGD_STIEFEL_UNIT_AVX2 1
#else
#define MSGD_STIEFEL_UNIT_AVX2 0
#endif


#if MSGD_STIEFEL_RUN9
// Consecutive 3x3 float blocks [i, r1) of radius 1, no adaptive step (run_rows), 8 at a time:
// lane_batches' run9 case without its per-lane bookkeeping. The step is the same function
// (lane_step), so the bits are those of lane_batches by construction (with lane_core inlined
// here the compiler contracted its multiply-adds differently: other bits). Stops before the first
// batch with a block that cannot be stepped (lane_batches takes over there and reports it);
// returns the first block not done.
inline int64_t run9_stream(const TensorView<float>& v, const StepOptions& opt, int64_t i, int64_t r1) {
  using L = Lanes<float>;
  using V = L::V;
  const LaneArgs args{opt.lr, opt.momentum, v.m != nullptr, v.fresh, opt.nesterov,
                      opt.retraction == Retraction::Polar, false};
  const bool read_m = v.m && !v.fresh;
  const V zero = L::splat(0.0f);
  V w[9], z[9], m[9], y[9], sm[9], c[9], ev[9], r[9], out[9];
  V rho = L::splat(1.0f), inv_rho = rho, scale = rho, sq, ok;
  const Batch<float> b{w, z, m, y, sm, c, ev, r, out, &rho, &inv_rho, &scale, &sq, &ok};
  const Row<float> all{v.w, v.g, v.m, r1 * 9};
  for (; i + 8 <= r1; i += 8) {
    prefetch_run9_ahead(all, i, r1);  // as lane_batches
    gather9(v.w + i * 9, w);
    gather9(v.g + i * 9, z);
    if (read_m) gather9(v.m + i * 9, m);
    lane_step<float, 3, 3>(b, args, 3, 3);
    if (L::any(ok == zero)) break;
    scatter9(y, v.w + i * 9);
    if (v.m) scatter9(m, v.m + i * 9);
  }
  return i;
}
#endif

// lane_batches at the block's size: compile-time sizes for the kernels of conv layers.
template <typename T, typename A, typename RowOf>
void run_lane_batches(const TensorView<T>& v, const StepOptions& opt, Vec<A>& scratch, int64_t count,
                      RowOf row_of, const A* scale, bool scale_pass, A* sq, char* ok, int64_t* report) {
  const int p = v.block_rows;
  const int64_t n = v.row_len / p;
  if (p == n) {
    switch (p) {
      case 1: return lane_batches<1, 1>(v, opt, scratch, count, row_of, scale, scale_pass, sq, ok, report);
      case 3: return lane_batches<3, 3>(v, opt, scratch, count, row_of, scale, scale_pass, sq, ok, report);
      case 5: return lane_batches<5, 5>(v, opt, scratch, count, row_of, scale, scale_pass, sq, ok, report);
      case 7: return lane_batches<7, 7>(v, opt, scratch, count, row_of, scale, scale_pass, sq, ok, report);
      default: break;
    }
  }
  lane_batches<0, 0>(v, opt, scratch, count, row_of, scale, scale_pass, sq, ok, report);
}

}  // namespace

// Blocks with at most this many elements take the lane path.
constexpr int64_t kLaneElems = 256;

template <typename T>
void StiefelStepper<T>::run_rows(const TensorView<T>& v, int64_t r0, int64_t r1, int64_t* report) {
  if (v.row_len > kLaneElems) {
    for (int64_t r = r0; r < r1; ++r) run_group(v, &r, 1, report);
    return;
  }
  if constexpr (std::is_same<T, A>::value) {
    if (v.row_len == 1 && !v.radius) {
#if MSGD_STIEFEL_UNIT_AVX2
      if constexpr (std::is_same<T, float>::value) {
        // runs of vectors; the 16 blocks where a run stops go to the lane path, then the
        // stream resumes
        while (r0 < r1) {
          r0 = unit_blocks_avx2(v, opt_, r0, r1);
          if (r1 - r0 < 16) break;
          const int64_t e = r0 + 16;
          run_lane_batches(v, opt_, lanes_, e - r0, [r0](int64_t j) { return r0 + j; },
                           static_cast<const A*>(nullptr), false, static_cast<A*>(nullptr), nullptr, report);
          r0 = e;
        }
      } else {
        r0 = unit_blocks(v, opt_, r0, r1);
      }
#else
      r0 = unit_blocks(v, opt_, r0, r1);
#endif
    }
  }
#if MSGD_STIEFEL_RUN9
  if constexpr (std::is_same<T, float>::value) {
    if (v.row_len == 9 && v.block_rows == 3 && !v.radius) {
      // runs of batches; the batch where a run stops goes to lane_batches, then the run resumes
      while (r0 < r1) {
        r0 = run9_stream(v, opt_, r0, r1);
        if (r1 - r0 < 8) break;
        lane_batches<3, 3>(v, opt_, lanes_, 8, [r0](int64_t j) { return r0 + j; },
                           static_cast<const A*>(nullptr), false, static_cast<A*>(nullptr), nullptr, report);
        r0 += 8;
      }
    }
  }
#endif
  run_lane_batches(v, opt_, lanes_, r1 - r0, [r0](int64_t j) { return r0 + j; },
                   static_cast<const A*>(nullptr), false, static_cast<A*>(nullptr), nullptr, report);
}

template <typename T>
void StiefelStepper<T>::run_groups(const TensorView<T>& v, const int64_t* groups,
                                   const int64_t* row_index, int64_t k0, int64_t k1,
                                   int64_t* report) {
  if (v.row_len > kLaneElems) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t* gr = groups + k * kGroupFields;
      run_group(v, row_index + gr[kGroupStart], gr[kGroupCount], report);
    }
    return;
  }
  blocks_.clear();
  scale_.clear();
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t* gr = groups + k * kGroupFields;
    const int64_t* rows = row_index + gr[kGroupStart];
    blocks_.insert(blocks_.end(), rows, rows + gr[kGroupCount]);
  }
  const int64_t* blocks = blocks_.data();
  auto row_of = [blocks](int64_t j) { return blocks[j]; };
  if (opt_.adaptive == Adaptive::None) {
    run_lane_batches(v, opt_, lanes_, int64_t(blocks_.size()), row_of, static_cast<const A*>(nullptr),
                     false, static_cast<A*>(nullptr), nullptr, report);
    return;
  }
  // adaptive: every block's ||xi||^2, then each group's s_G (its blocks summed in the group's
  // order), then the blocks of the groups that are not held
  const int64_t total = int64_t(blocks_.size());
  sq_.resize(size_t(total));
  ok_.resize(size_t(total));
  run_lane_batches(v, opt_, lanes_, total, row_of, static_cast<const A*>(nullptr), true, sq_.data(),
                   ok_.data(), nullptr);
  int64_t at = 0, kept = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t count = groups[k * kGroupFields + kGroupCount];
    auto sq = [&](int64_t j, A& out) {
      out = sq_[size_t(at + j)];
      return ok_[size_t(at + j)] != 0;
    };
    A s = 1;
    if (!group_scale(opt_, count, sq, s)) {
      for (int64_t j = 0; j < count; ++j) merge_skip_report(report, 1, blocks_[size_t(at + j)]);
    } else {
      for (int64_t j = 0; j < count; ++j) {  // compacted in place: kept <= at + j
        blocks_[size_t(kept)] = blocks_[size_t(at + j)];
        scale_.push_back(s);
        ++kept;
      }
    }
    at += count;
  }
  const A* scale = scale_.data();
  run_lane_batches(v, opt_, lanes_, kept, row_of, scale, false,
                   static_cast<A*>(nullptr), nullptr, report);
}

// Blocks rows[0 .. count) of tensor v, one group, one block at a time (blocks above
// kLaneElems): with an adaptive step they share s_G and a bad block holds the group.
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
