// Stochastic rounding of float32 to bfloat16, counter-based so that every
// backend (and every run) draws the same bits for the same element:
//   key  = sr_key(seed, step, tensor)          once per tensor and step
//   bits = sr_bits16(key, element_index)       16 uniform bits per element
//   out  = to_bf16_stochastic(value, bits)     E[out] = value (unbiased)
// The hash is SplitMix64's output function (Steele, Lea, Flood 2014) over a
// Weyl sequence, which passes BigCrush; no state is kept between calls.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace msgd {

MSGD_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One key per (seed, step, tensor): the element streams of different steps and
// tensors start at unrelated points of the 2^64 Weyl sequence.
MSGD_HD uint64_t sr_key(uint64_t seed, uint64_t step, uint64_t tensor) {
  return mix64(mix64(seed ^ 0x6A09E667F3BCC909ull) ^ mix64(step * 0xD1B54A32D192ED03ull + tensor));
}

// 16 uniform random bits for element `index` (row * row_len + column) of the tensor.
MSGD_HD uint32_t sr_bits16(uint64_t key, uint64_t index) {
  return uint32_t(mix64(key + (index + 1) * 0x9E3779B97F4A7C15ull) >> 48);
}

// Round f to one of its two bf16 neighbours with probability proportional to
// nearness: adding 16 uniform bits below the kept mantissa and truncating
// carries into the kept part with probability (cut bits) / 2^16. Inf and NaN
// round as to_bf16 does; a finite value may round to inf only from above the
// largest bf16, as round-to-nearest would.
MSGD_HD bf16 to_bf16_stochastic(float f, uint32_t bits16) {
  uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return to_bf16(f);
  return bf16{uint16_t((u + (bits16 & 0xffffu)) >> 16)};
}

}  // namespace msgd
