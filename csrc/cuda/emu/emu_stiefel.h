// emu_check's Stiefel cases (included by emu_check.cpp): the kItemStiefel kernels
// (fused_stiefel_kernels.cuh) against the CPU kernel's Stiefel blocks (stiefel_cpu.cpp), within
// the tolerances of SPEC §5 (the two compute the same formulas in other orders): 1x1, 3x3 blocks
// (the fixed-size paths), 5x5, 7x7, 32 x 32, 32 x 33 and 2 x 5 blocks (the scratch path); QR and
// polar; momentum off, on, Nesterov; radii; non-finite gradients; adaptive steps with groups
// packed in one CTA and a group of 600 blocks (the phase-1 slices); schedule and alignment
// invariance; bf16 with stochastic rounding.
#pragma once

template <typename T>
void stiefel_cases(uint64_t& seed, bool quick) {
  StepOptions base;
  base.lr = 0.05;
  const Kind S = Kind::Stiefel;
  for (int polar = 0; polar < 2; ++polar) {
    for (int variant = 0; variant < 3; ++variant) {
      StepOptions o = base;
      o.retraction = polar ? Retraction::Polar : Retraction::Qr;
      if (variant >= 1) o.momentum = 0.9;
      if (variant == 2) o.nesterov = true;
      std::vector<Spec> specs = {{37, 1, S, 0, 1, variant == 1, 1}, {20, 9, S, 0, 1, variant == 1, 3},
                                 {6, 25, S, 0, 1, false, 5},         {5, 49, S, 0, 1, variant == 2, 7},
                                 {2, 32 * 32, S, 0, 1, false, 32},   {3, 10, S, 0, 1, true, 2}};
      run_case<T>(specs, o, quick ? 2 : 3, variant == 2 ? 3 : 0, seed++, variant == 1);
    }
  }
  // adaptive steps: groups packed in one CTA, a 600-block group (phase 1 slices), p = 32
  for (int mode = 1; mode <= 2; ++mode) {
    StepOptions o = adaptive_options(base, mode);
    o.retraction = mode == 2 ? Retraction::Polar : Retraction::Qr;
    std::vector<std::vector<Spec>> sets = {
        {{40, 9, S, 2, 6, true, 3}, {600, 1, S, 1, 1, false, 1}, {12, 25, S, 0, 1, false, 5}},
        {{4, 32 * 33, S, 1, 1, false, 32}, {9, 49, S, 2, 4, false, 7}},
    };
    for (auto& specs : sets) {
      run_case<T>(specs, o, 2, 0, seed++, true);
      if (!quick) run_case<T>(specs, o, 2, 2, seed++, false);  // non-finite gradients hold whole groups
    }
  }
  if constexpr (std::is_same<T, bf16>::value) {  // stochastic rounding of the new weights
    StepOptions o = base;
    o.momentum = 0.9;
    for (int polar = 0; polar < 2; ++polar) {
      o.retraction = polar ? Retraction::Polar : Retraction::Qr;
      run_case<T>({{20, 9, S, 0, 1, false, 3}, {3, 10, S, 0, 1, false, 2}}, o, 2, 0, seed++, true, false, true);
    }
  }
}
