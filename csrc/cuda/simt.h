// The few SIMT primitives the fused-step kernels use, in one place.
//
// Under nvcc they are the CUDA intrinsics. Under MSGD_SIMT_EMULATE (a plain C++
// build, see emu/simt_emu.h) they run one CTA as cooperative fibers on the host,
// so the kernel bodies in fused_step_kernels.cuh can be executed and checked
// against the CPU kernel on a machine without a GPU.
//
// Rules the kernels keep (the emulator enforces the first two):
//   - shfl_xor is called by all 32 lanes of a warp together (full mask);
//   - sync() is reached by every thread of the CTA; no thread returns early
//     past a sync() that others still reach;
//   - float atomics are never used; integer atomics only for counters/reports.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

#define MSGD_DEV __device__ __forceinline__

namespace msgd {
namespace simt {

MSGD_DEV int tid() { return int(threadIdx.x); }
MSGD_DEV void sync() { __syncthreads(); }
// Makes this thread's earlier global writes visible device-wide before its later ones.
MSGD_DEV void fence() { __threadfence(); }

template <typename A>
MSGD_DEV A shfl_xor(A v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

MSGD_DEV uint32_t atomic_add(uint32_t* p, uint32_t v) { return atomicAdd(p, v); }
MSGD_DEV void atomic_add(int64_t* p, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}
// Minimum of p and v read as unsigned, so that -1 (all bits set) means "none yet".
MSGD_DEV void atomic_min_unsigned(int64_t* p, int64_t v) {
  atomicMin(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// Loads that bypass L1 (data written by other CTAs of the same launch).
MSGD_DEV float load_cg(const float* p) { return __ldcg(p); }
MSGD_DEV double load_cg(const double* p) { return __ldcg(p); }
MSGD_DEV int32_t load_cg(const int32_t* p) { return __ldcg(p); }

// 16-byte accesses to global memory; the address must be 16-byte aligned. The
// explicit global forms (the pointers come from integers, so a plain dereference
// would be a generic access): ld.global.ca / st.global.wb are the default policies.
MSGD_DEV void ld16(const void* p, uint32_t (&r)[4]) {
  const uint4 v = __ldca(reinterpret_cast<const uint4*>(p));
  r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
// Read-only path: only for memory no thread writes during the launch.
MSGD_DEV void ld16_ro(const void* p, uint32_t (&r)[4]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
MSGD_DEV void st16(void* p, const uint32_t (&r)[4]) {
  __stwb(reinterpret_cast<uint4*>(p), make_uint4(r[0], r[1], r[2], r[3]));
}
// Scalar global accesses (explicit global forms, as above; ldg_ro: read-only path).
template <typename S> MSGD_DEV S ldg(const S* p) { return __ldca(p); }
template <typename S> MSGD_DEV S ldg_ro(const S* p) { return __ldg(p); }
template <typename S> MSGD_DEV void stg(S* p, S v) { __stwb(p, v); }

MSGD_DEV double bits_double(uint32_t lo, uint32_t hi) { return __hiloint2double(int(hi), int(lo)); }
MSGD_DEV void double_bits(double d, uint32_t& lo, uint32_t& hi) {
  lo = uint32_t(__double2loint(d));
  hi = uint32_t(__double2hiint(d));
}

}  // namespace simt
}  // namespace msgd

#elif defined(MSGD_SIMT_EMULATE)

#include "emu/simt_emu.h"

#else
#error "simt.h: compile with nvcc, or define MSGD_SIMT_EMULATE for the host emulator"
#endif
