"""The CUDA kernel bodies, run on the host by the SIMT emulator, against the CPU kernel.

No GPU needed: csrc/cuda/emu/emu_check.cpp compiles csrc/cuda/fused_step_kernels.cuh
as plain C++ (each CTA as 512 cooperative fibers, barriers and warp shuffles
emulated, random schedules) and checks every option family, dtype, row-length
tier, grouping and skip rule against fused_step_cpu, plus schedule and alignment
invariance (bitwise) and stochastic rounding; and the Adam family's kernels
(csrc/cuda/fused_adam_kernels.cuh) against fused_adam_cpu: AdamW rows, sphere rows with
v per row and per element, every dtype, split rows, skipped rows, bias corrections over
several steps, bf16 stochastic rounding; and the Stiefel blocks' kernel
(csrc/cuda/fused_stiefel_kernels.cuh) against the CPU kernel's Stiefel blocks within SPEC §5
tolerances (1x1 ... 7x7, 2x5, 32x32, 32x33; QR and polar; momentum; adaptive groups). It checks the kernels' logic, not
the GPU's memory model or speed: tests/test_cuda.py does that on a GPU.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ["csrc/cuda/emu/emu_check.cpp", "csrc/cpu/fused_step_cpu.cpp", "csrc/cpu/stiefel_cpu.cpp",
           "csrc/cpu/adam_cpu.cpp", "csrc/cpu/dispatch_cpu.cpp", "csrc/cpu/parallel.cpp", "csrc/core/validate.cpp"]
CXX = os.environ.get("CXX", "g++")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all((ROOT / s).exists() for s in SOURCES), reason="needs the source tree"),
    pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++20 compiler ({CXX})"),
]


@pytest.fixture(scope="module")
def emu_check(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emu") / "emu_check"
    cmd = [CXX, "-std=c++20", "-O2", "-U_FORTIFY_SOURCE", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
           "-Werror", "-I", str(ROOT / "csrc"), "-DMSGD_SIMT_EMULATE",
           *[str(ROOT / s) for s in SOURCES], "-pthread", "-ldl", "-o", str(exe)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return exe


def test_emulated_cuda_kernels_match_cpu_kernel(emu_check):
    out = subprocess.run([str(emu_check), "--quick"], capture_output=True, text=True, timeout=3000)
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, tail
    assert "0 failed" in out.stdout, tail


def test_emulated_stiefel_kernel_matches_cpu_kernel(emu_check):
    """The Stiefel cases in full (--quick runs fewer steps and no non-finite gradients in groups)."""
    out = subprocess.run([str(emu_check), "--stiefel-only", "--seed", "5"], capture_output=True, text=True,
                         timeout=1200)
    tail = "\n".join(out.stdout.splitlines()[-30:])
    assert out.returncode == 0, tail
    checks = int(out.stdout.split("emu_check: ")[1].split(" checks")[0])
    assert "0 failed" in out.stdout and checks > 1000, tail
