// Host emulation of the SIMT primitives of simt.h, for checking the kernel
// bodies without a GPU (csrc/cuda/emu/emu_check.cpp).
//
// One CTA runs as kBlock cooperative fibers on one host thread (started with
// ucontext, switched with _setjmp/_longjmp, which skip the signal-mask system
// call; build without _FORTIFY_SOURCE, whose longjmp check rejects the switch). A
// fiber runs until it reaches sync() or a shuffle; the scheduler then runs the
// others, in a seeded random order each round, and releases a barrier only when
// every thread it concerns has arrived: all threads of the CTA for sync(), the
// 32 lanes of the warp for a shuffle. A barrier that cannot complete (a thread
// returned early, a divergent shuffle) is reported as an error instead of
// hanging, so the emulator also checks the rules listed in simt.h. CTAs of a
// launch run one after another in a seeded random order.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define MSGD_DEV inline

namespace msgd {
namespace simt {
namespace emu {

enum State { kRunnable, kAtSync, kAtWarp, kDone };

struct JumpBuf {
  jmp_buf b;
};

struct Cta {
  int n = 0;
  std::vector<ucontext_t> ctx;  // start of each fiber
  std::vector<JumpBuf> jb;      // where each started fiber resumes
  std::vector<char> started;
  JumpBuf sched_jb;
  std::vector<std::vector<char>> stacks;
  std::vector<State> state;
  int cur = 0;
  std::vector<uint64_t> exch;  // 8 bytes per thread for shuffles
  std::function<void(int)> body;
  std::mt19937_64 rng{1};
  int64_t barriers = 0;
};

inline Cta*& current() {
  static Cta* c = nullptr;
  return c;
}

__attribute__((noinline)) inline void yield_as(State s) {
  Cta& c = *current();
  c.state[size_t(c.cur)] = s;
  if (_setjmp(c.jb[size_t(c.cur)].b) == 0) _longjmp(c.sched_jb.b, 1);
}

inline void trampoline(unsigned lo, unsigned hi) {
  (void)lo;
  (void)hi;
  Cta& c = *current();
  c.body(c.cur);
  c.state[size_t(c.cur)] = kDone;
  _longjmp(c.sched_jb.b, 1);
}

// Runs fiber i until it yields or finishes.
__attribute__((noinline)) inline void resume(Cta& c, int i) {
  c.cur = i;
  if (_setjmp(c.sched_jb.b) == 0) {
    if (!c.started[size_t(i)]) {
      c.started[size_t(i)] = 1;
      setcontext(&c.ctx[size_t(i)]);
    }
    _longjmp(c.jb[size_t(i)].b, 1);
  }
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt emulator: %s\n", what);
  std::abort();
}

// Runs one CTA of n threads; body(thread index).
inline void run_cta(Cta& c, int n, const std::function<void(int)>& body) {
  c.n = n;
  c.body = body;
  c.ctx.resize(size_t(n));
  c.jb.resize(size_t(n));
  c.started.assign(size_t(n), 0);
  c.state.assign(size_t(n), kRunnable);
  c.exch.assign(size_t(n), 0);
  if (c.stacks.size() != size_t(n)) {
    c.stacks.assign(size_t(n), std::vector<char>());
    for (auto& s : c.stacks) s.resize(size_t(256) << 10);
  }
  current() = &c;
  for (int i = 0; i < n; ++i) {
    getcontext(&c.ctx[size_t(i)]);
    c.ctx[size_t(i)].uc_stack.ss_sp = c.stacks[size_t(i)].data();
    c.ctx[size_t(i)].uc_stack.ss_size = c.stacks[size_t(i)].size();
    c.ctx[size_t(i)].uc_link = nullptr;
    makecontext(&c.ctx[size_t(i)], reinterpret_cast<void (*)()>(trampoline), 2, 0u, 0u);
  }
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[size_t(i)] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), c.rng);
    for (int i : order) {
      if (c.state[size_t(i)] == kRunnable) resume(c, i);
    }
    int done = 0, at_sync = 0;
    for (int i = 0; i < n; ++i) {
      done += c.state[size_t(i)] == kDone;
      at_sync += c.state[size_t(i)] == kAtSync;
    }
    if (done == n) break;
    bool released = false;
    if (at_sync == n) {
      for (int i = 0; i < n; ++i) c.state[size_t(i)] = kRunnable;
      released = true;
      ++c.barriers;
    } else if (at_sync > 0 && done > 0) {
      fail("sync() reached by some threads while others have returned");
    }
    for (int w = 0; w * 32 < n; ++w) {
      int at = 0;
      for (int l = 0; l < 32; ++l) at += c.state[size_t(w * 32 + l)] == kAtWarp;
      if (at == 32) {
        for (int l = 0; l < 32; ++l) c.state[size_t(w * 32 + l)] = kRunnable;
        released = true;
      }
    }
    if (!released) fail("deadlock: a shuffle without its whole warp, or sync() mixed with a shuffle");
  }
  current() = nullptr;
}

}  // namespace emu

inline int tid() { return emu::current()->cur; }
inline void sync() { emu::yield_as(emu::kAtSync); }
inline void fence() {}

template <typename A>
inline A shfl_xor(A v, int lane_mask) {
  static_assert(sizeof(A) <= 8, "shfl_xor: 8 bytes at most");
  emu::Cta& c = *emu::current();
  const int t = c.cur;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(A));
  c.exch[size_t(t)] = bits;
  emu::yield_as(emu::kAtWarp);
  const int src = (t & ~31) | ((t & 31) ^ lane_mask);
  A r;
  std::memcpy(&r, &c.exch[size_t(src)], sizeof(A));
  emu::yield_as(emu::kAtWarp);
  return r;
}

inline uint32_t atomic_add(uint32_t* p, uint32_t v) {
  const uint32_t old = *p;
  *p = old + v;
  return old;
}
inline void atomic_add(int64_t* p, int64_t v) { *p += v; }
inline void atomic_min_unsigned(int64_t* p, int64_t v) {
  if (uint64_t(v) < uint64_t(*p)) *p = v;
}

inline float load_cg(const float* p) { return *p; }
inline double load_cg(const double* p) { return *p; }
inline int32_t load_cg(const int32_t* p) { return *p; }

inline void check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15u) emu::fail("16-byte access at a misaligned address");
}
inline void ld16(const void* p, uint32_t (&r)[4]) { check_aligned(p); std::memcpy(r, p, 16); }
inline void ld16_ro(const void* p, uint32_t (&r)[4]) { check_aligned(p); std::memcpy(r, p, 16); }
inline void st16(void* p, const uint32_t (&r)[4]) { check_aligned(p); std::memcpy(p, r, 16); }
template <typename S> inline S ldg(const S* p) { return *p; }
template <typename S> inline S ldg_ro(const S* p) { return *p; }
template <typename S> inline void stg(S* p, S v) { *p = v; }

inline double bits_double(uint32_t lo, uint32_t hi) {
  const uint64_t u = (uint64_t(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}
inline void double_bits(double d, uint32_t& lo, uint32_t& hi) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  lo = uint32_t(u);
  hi = uint32_t(u >> 32);
}

}  // namespace simt
}  // namespace msgd
