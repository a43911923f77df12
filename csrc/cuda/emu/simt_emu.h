// Host emulation of the SIMT primitives of simt.h, for checking the kernel
// bodies without a GPU (csrc/cuda/emu/emu_check.cpp).
//
// A CTA runs as kBlock cooperative fibers on one host thread (started with
// ucontext, switched with _setjmp/_longjmp, which skip the signal-mask system
// call; build without _FORTIFY_SOURCE, whose longjmp check rejects the switch). A
// fiber runs until it reaches sync() or a shuffle; the scheduler then runs the
// others, in a seeded random order each round, and releases a barrier only when
// every thread it concerns has arrived: all threads of the CTA for sync(), the
// 32 lanes of the warp for a shuffle. A barrier that cannot complete (a thread
// returned early, a divergent shuffle) is reported as an error instead of
// hanging, so the emulator also checks the rules listed in simt.h.
//
// CTAs of a launch (run_launch) are resident up to kResident at a time and
// interleaved: each scheduling step runs one round (up to the next barrier) of a
// resident CTA picked at random (seeded); CTAs start in a seeded random order.
//
// Memory model of cross-CTA data: stores (stg, st16) into the held region
// (hold_stores_to: the workspace) are buffered per CTA, tagged with the storing
// thread, and reach memory only at that thread's fence() or the end of the CTA,
// in program order. A barrier makes the CTA's buffered stores cumulative (any
// thread's later fence() releases them, as __threadfence after __syncthreads
// does). Loads from the held region see the CTA's own buffered stores, else
// memory: another CTA reads the old value until the writer fences. So a missing
// release fence before an arrival counter makes the last CTA combine stale data.
// Atomics act on memory at once.
#pragma once

#include <setjmp.h>
#include <sys/mman.h>
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

constexpr int kResident = 4;  // CTAs interleaved at a time
constexpr size_t kStack = size_t(256) << 10;

struct JumpBuf {
  jmp_buf b;
};

struct Pending {  // a store held back until its thread's fence
  unsigned char* addr;
  int size;
  int tag;  // storing thread, or -1 after a barrier (released by any thread's fence)
  unsigned char bytes[16];
};

struct Stacks {  // fiber stacks, mapped lazily: untouched pages cost nothing
  unsigned char* base = nullptr;
  size_t n = 0;
  ~Stacks() {
    if (base) munmap(base, n * kStack);
  }
  unsigned char* get(size_t i) { return base + i * kStack; }
  void ensure(size_t count) {
    if (count <= n) return;
    if (base) munmap(base, n * kStack);
    void* p = mmap(nullptr, count * kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "simt emulator: cannot map fiber stacks\n");
      std::abort();
    }
    base = static_cast<unsigned char*>(p);
    n = count;
  }
};

struct Cta {
  int n = 0;
  std::vector<ucontext_t> ctx;  // start of each fiber
  std::vector<JumpBuf> jb;      // where each started fiber resumes
  std::vector<char> started;
  JumpBuf sched_jb;
  Stacks stacks;
  std::vector<State> state;
  int cur = 0;
  std::vector<uint64_t> exch;  // 8 bytes per thread for shuffles
  std::function<void(int)> body;
  std::mt19937_64 rng{1};
  int64_t barriers = 0;
  std::vector<int> order;
  std::vector<Pending> pending;  // held stores, program order
};

inline Cta*& current() {
  static Cta* c = nullptr;
  return c;
}

struct Held {
  unsigned char* lo = nullptr;
  unsigned char* hi = nullptr;
};
inline Held& held() {
  static Held h;
  return h;
}
// Stores into [p, p + n) are held back until a fence (the workspace of a launch).
inline void hold_stores_to(void* p, size_t n) {
  held().lo = static_cast<unsigned char*>(p);
  held().hi = held().lo + n;
}
inline bool is_held(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= held().lo && q < held().hi;
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

// Writes the held stores of thread `tag` (and the barrier-released ones) to memory, in
// program order; every held store when tag < -1.
inline void flush(Cta& c, int tag) {
  size_t keep = 0;
  for (size_t i = 0; i < c.pending.size(); ++i) {
    Pending& e = c.pending[i];
    if (tag < -1 || e.tag == tag || e.tag == -1) {
      std::memcpy(e.addr, e.bytes, size_t(e.size));
    } else {
      c.pending[keep++] = e;
    }
  }
  c.pending.resize(keep);
}

// Prepares CTA c to run n threads of body(thread index).
inline void start_cta(Cta& c, int n, std::function<void(int)> body) {
  c.n = n;
  c.body = std::move(body);
  c.ctx.resize(size_t(n));
  c.jb.resize(size_t(n));
  c.started.assign(size_t(n), 0);
  c.state.assign(size_t(n), kRunnable);
  c.exch.assign(size_t(n), 0);
  c.pending.clear();
  c.stacks.ensure(size_t(n));
  for (int i = 0; i < n; ++i) {
    getcontext(&c.ctx[size_t(i)]);
    c.ctx[size_t(i)].uc_stack.ss_sp = c.stacks.get(size_t(i));
    c.ctx[size_t(i)].uc_stack.ss_size = kStack;
    c.ctx[size_t(i)].uc_link = nullptr;
    makecontext(&c.ctx[size_t(i)], reinterpret_cast<void (*)()>(trampoline), 2, 0u, 0u);
  }
  c.order.resize(size_t(n));
  for (int i = 0; i < n; ++i) c.order[size_t(i)] = i;
}

// One round of CTA c: every runnable fiber runs (random order) until it yields, then
// the barriers that completed are released. Returns true when every thread is done
// (its held stores are then written).
inline bool run_round(Cta& c) {
  const int n = c.n;
  current() = &c;
  std::shuffle(c.order.begin(), c.order.end(), c.rng);
  for (int i : c.order) {
    if (c.state[size_t(i)] == kRunnable) resume(c, i);
  }
  current() = nullptr;
  int done = 0, at_sync = 0;
  for (int i = 0; i < n; ++i) {
    done += c.state[size_t(i)] == kDone;
    at_sync += c.state[size_t(i)] == kAtSync;
  }
  if (done == n) {
    flush(c, -2);  // the end of the CTA writes whatever is still held
    return true;
  }
  bool released = false;
  if (at_sync == n) {
    for (int i = 0; i < n; ++i) c.state[size_t(i)] = kRunnable;
    for (Pending& e : c.pending) e.tag = -1;  // cumulative from here on
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
  return false;
}

// Runs one CTA of n threads to completion; body(thread index).
inline void run_cta(Cta& c, int n, const std::function<void(int)>& body) {
  start_cta(c, n, body);
  while (!run_round(c)) {
  }
}

// Runs a launch of the CTAs in `blocks` (the order they start in), n threads each,
// up to kResident interleaved; body(slot, block, thread), slot < kResident being the
// resident CTA's index (for its shared memory).
inline void run_launch(const std::vector<int64_t>& blocks, int n, std::mt19937_64& rng,
                       const std::function<void(int, int64_t, int)>& body,
                       const std::function<void(int)>& on_start) {
  static Cta ctas[kResident];
  bool busy[kResident] = {};
  size_t next = 0;
  int resident = 0;
  for (;;) {
    for (int s = 0; s < kResident && next < blocks.size(); ++s) {
      if (busy[s]) continue;
      const int64_t b = blocks[next++];
      on_start(s);
      ctas[s].rng.seed(rng());
      start_cta(ctas[s], n, [&body, s, b](int t) { body(s, b, t); });
      busy[s] = true;
      ++resident;
    }
    if (resident == 0) break;
    int pick = int(rng() % uint64_t(resident));
    int s = 0;
    for (;; ++s)
      if (busy[s] && pick-- == 0) break;
    if (run_round(ctas[s])) {
      busy[s] = false;
      --resident;
    }
  }
}

}  // namespace emu

inline int tid() { return emu::current()->cur; }
inline void sync() { emu::yield_as(emu::kAtSync); }
inline void fence() {
  emu::Cta& c = *emu::current();
  emu::flush(c, c.cur);
}

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

namespace emu {
inline void hold(void* p, const void* v, int size) {
  Cta& c = *current();
  Pending e;
  e.addr = static_cast<unsigned char*>(p);
  e.size = size;
  e.tag = c.cur;
  std::memcpy(e.bytes, v, size_t(size));
  c.pending.push_back(e);
}
// A load from the held region: the newest of this CTA's held stores to it, else memory.
inline void load(const void* p, void* out, int size) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (is_held(p) && current()) {
    const std::vector<Pending>& v = current()->pending;
    for (size_t i = v.size(); i-- > 0;) {
      if (v[i].addr == q && v[i].size == size) {
        std::memcpy(out, v[i].bytes, size_t(size));
        return;
      }
      if (v[i].addr < q + size && q < v[i].addr + v[i].size) fail("a load overlaps a held store partly");
    }
  }
  std::memcpy(out, p, size_t(size));
}
inline void check_atomic(const void* p) {
  if (!is_held(p) || !current()) return;
  for (const Pending& e : current()->pending)
    if (e.addr == static_cast<const unsigned char*>(p)) fail("an atomic on an address with a held store");
}
}  // namespace emu

inline uint32_t atomic_add(uint32_t* p, uint32_t v) {
  emu::check_atomic(p);
  const uint32_t old = *p;
  *p = old + v;
  return old;
}
inline void atomic_add(int64_t* p, int64_t v) {
  emu::check_atomic(p);
  *p += v;
}
inline void atomic_min_unsigned(int64_t* p, int64_t v) {
  emu::check_atomic(p);
  if (uint64_t(v) < uint64_t(*p)) *p = v;
}

template <typename S> inline S load_held(const S* p) {
  S v;
  emu::load(p, &v, int(sizeof(S)));
  return v;
}
inline float load_cg(const float* p) { return load_held(p); }
inline double load_cg(const double* p) { return load_held(p); }
inline int32_t load_cg(const int32_t* p) { return load_held(p); }

inline void check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15u) emu::fail("16-byte access at a misaligned address");
}
inline void ld16(const void* p, uint32_t (&r)[4]) { check_aligned(p); emu::load(p, r, 16); }
inline void ld16_ro(const void* p, uint32_t (&r)[4]) {
  check_aligned(p);
  if (emu::is_held(p)) emu::fail("read-only load from the workspace");
  std::memcpy(r, p, 16);
}
inline void st16(void* p, const uint32_t (&r)[4]) {
  check_aligned(p);
  if (emu::is_held(p) && emu::current()) emu::hold(p, r, 16); else std::memcpy(p, r, 16);
}
template <typename S> inline S ldg(const S* p) { return load_held(p); }
template <typename S> inline S ldg_ro(const S* p) {
  if (emu::is_held(p)) emu::fail("read-only load from the workspace");
  return *p;
}
template <typename S> inline void stg(S* p, S v) {
  if (emu::is_held(p) && emu::current()) emu::hold(p, &v, int(sizeof(S))); else *p = v;
}

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
