// Storage types the kernels accept, and their conversion to the math type.
// 16-bit values are plain bit patterns so this header needs neither libtorch
// nor cuda_fp16.h; the conversions are exact IEEE round-to-nearest-even.
#pragma once

#include <cstdint>
#include <cstring>

// The shared formulas: inlined on the device; on the host each translation unit keeps its own
// copy (internal linkage), because the CPU kernel is compiled once per instruction set and an
// out-of-line copy built with AVX2+FMA must never stand in for the baseline build's at link time.
#if defined(__CUDACC__)
#define MSGD_HD __host__ __device__ __forceinline__
#else
#define MSGD_HD static inline
#endif

namespace msgd {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

MSGD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
MSGD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

MSGD_HD float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }

MSGD_HD bf16 to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}

MSGD_HD float to_float(fp16 x) {
  uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

MSGD_HD fp16 to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};   // nan
  if (a >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // result is subnormal or zero: round a * 2^24 to an integer
    float v = bits_float(a) * 16777216.0f;  // exact scaling by a power of two
    // round half to even on the integer part (v < 1024 here)
    uint32_t i = uint32_t(v);
    float frac = v - float(i);
    if (frac > 0.5f || (frac == 0.5f && (i & 1u))) ++i;
    return fp16{uint16_t(sign | i)};
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (ties to even)
  uint32_t r = a - 0x38000000u;  // exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return fp16{uint16_t(sign | (r >> 13))};
}

// Math type per storage type: float for 32- and 16-bit storage, double for double.
template <typename T> struct Math { using type = float; };
template <> struct Math<double> { using type = double; };

MSGD_HD float load(const float* p, int64_t i) { return p[i]; }
MSGD_HD double load(const double* p, int64_t i) { return p[i]; }
MSGD_HD float load(const bf16* p, int64_t i) { return to_float(p[i]); }
MSGD_HD float load(const fp16* p, int64_t i) { return to_float(p[i]); }

MSGD_HD void store(float* p, int64_t i, float v) { p[i] = v; }
MSGD_HD void store(double* p, int64_t i, double v) { p[i] = v; }
MSGD_HD void store(bf16* p, int64_t i, float v) { p[i] = to_bf16(v); }
MSGD_HD void store(fp16* p, int64_t i, float v) { p[i] = to_fp16(v); }

}  // namespace msgd
