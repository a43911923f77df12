"""The GPU machine's scripts, run on the CPU as far as they go, so that a stale call
(an argument NativeBucket.run no longer takes, a bench option that does not exist)
fails here instead of on a lent GPU."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs the source tree")


def test_cuda_step_small_dry_run_on_the_cpu_kernel():
    out = subprocess.run([sys.executable, "benchmarks/cuda_step_small.py", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "cuda_step_small: done (cpu)"
    assert sum("skipped=" in x for x in lines) == 40  # 4 dtypes x (4 SGD + 3 Adam + 3 Stiefel option families)
    for name in ("adam-row", "adam-element", "adam-w"):
        assert sum(f" {name} " in x for x in lines) == 4, name
    # Stiefel: the NaN's block twice (two steps), its 20-block group twice, its group of 3 twice
    stiefel = [x.split("skipped=")[1] for x in lines if " stiefel " in x]
    assert stiefel == ["[0, 2, 0, 0, 0]", "[0, 40, 0, 0, 0]", "[0, 6, 0, 0, 0]"] * 4
    # the NaN in tensor 1 holds its row (or its whole group) in every case
    assert all("skipped=[0, " in x and "skipped=[0, 0," not in x for x in lines if "skipped=" in x)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_syntax_and_dry_run(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(["bash", str(script), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "cuda_step_small: done (cpu)" in text
    for stage in ("build", "info", "test_cuda", "test_cuda_blocking", "memcheck", "racecheck", "synccheck",
                  "initcheck", "bench_float32", "bench_bfloat16"):
        assert f"DRY   {stage}\n" in text + "\n", stage
    assert "CMAKE_CUDA_ARCHITECTURES=" in text and "CMAKE_BUILD_PARALLEL_LEVEL=" in text
    assert "CUDA_LAUNCH_BLOCKING=1" in text
    assert f"--out {tmp_path}/bench" in text
    bad = subprocess.run(["bash", str(script), "--dry-run", "nonsense"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage nonsense" in bad.stdout


def test_bench_methods_filter_and_arguments():
    from manifold_sgd.bench import METHODS, parse_args

    args = parse_args(["--methods", "UN", "Stiefel kernel", "Adam row", "Adam element", "--sets", "llm1b",
                       "many-small"])
    assert args.methods == ["UN", "Stiefel kernel", "Adam row", "Adam element"] and set(args.methods) <= set(METHODS)
    with pytest.raises(SystemExit):
        parse_args(["--methods", "nope"])
