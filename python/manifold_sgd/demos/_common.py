"""Shared plumbing of the demos: arguments, seeding, data, progress, output files.

Every demo is a module with ``NAME``, a docstring whose first line describes it,
``run(args) -> dict`` (a JSON-serialisable result; ``finish`` writes
``<out>/<name>.json`` and has the demo's ``plot`` write ``<out>/<name>.png``) and
``format_table(result) -> str``; ``manifold_sgd.demos`` parses the arguments,
runs it and prints the table. Nothing here downloads anything: the only real data set is
scikit-learn's bundled ``load_digits`` (1797 8x8 images), the rest is synthetic.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch


class Unavailable(RuntimeError):
    """What a demo asked for is not in this build (e.g. an optimizer not yet implemented);
    ``python -m manifold_sgd demo`` prints the message and exits with status 1."""


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m manifold_sgd demo {name}", description=description)
    p.add_argument("--quick", action="store_true",
                   help="a few-second smoke run (tiny budgets; numbers are not meaningful)")
    p.add_argument("--seed", type=int, default=0, help="base seed; run r uses seed + r")
    p.add_argument("--out", default="demo-results", help="folder for <name>.json and <name>.png")
    p.add_argument("--runs", type=int, default=None, help="number of independent runs (seeds)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these models are tiny, and more threads "
                        "only add contention on a small machine)")
    return p


_load_at_start = None
_cpu_at_start = 0.0


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return None


def start(args) -> float:
    """Apply the common settings (threads); note the machine's load; return the start time."""
    global _load_at_start, _cpu_at_start
    torch.set_num_threads(max(1, int(args.threads)))
    _load_at_start = _loadavg()
    _cpu_at_start = time.process_time()
    return time.perf_counter()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, torch (and numpy if present); return a torch generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass
    return torch.Generator().manual_seed(seed)


def progress(total: int, desc: str, disable: bool):
    """A tqdm bar (stderr); a no-op object when tqdm is missing or the bar is disabled."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        disable = True
    if disable:
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ---- data -------------------------------------------------------------------------

def _digits_file() -> Optional[str]:
    """Path of scikit-learn's bundled digits.csv.gz, found without importing sklearn (slow)."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            return path
    return None


def load_digits_tensors(dtype=torch.float32):
    """scikit-learn's bundled 8x8 digits: X (1797, 64) scaled to [0, 1], y (1797,) int64.

    Reads the csv that ships inside scikit-learn (what ``sklearn.datasets.load_digits``
    reads) directly, which avoids importing scikit-learn; falls back to that function.
    """
    path = _digits_file()
    if path is not None:
        import gzip
        with gzip.open(path, "rt") as f:
            rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
        data = torch.tensor(rows, dtype=torch.float64)
        x, y = data[:, :64], data[:, 64].to(torch.int64)
    else:  # pragma: no cover - a scikit-learn that stores the data elsewhere
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float64), torch.tensor(d.target, dtype=torch.int64)
    if x.shape != (1797, 64):
        raise RuntimeError(f"unexpected digits data shape {tuple(x.shape)}")
    return (x / 16.0).to(dtype), y


def split_indices(n: int, sizes: Sequence[int], gen: torch.Generator) -> List[torch.Tensor]:
    """Random disjoint index sets of the given sizes (the rest is dropped)."""
    perm = torch.randperm(n, generator=gen)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    return out


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int):
    """Fixed stratified train/test split: ``test_fraction`` of every class goes to test."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = torch.cat(train), torch.cat(test)
    return train[torch.randperm(len(train), generator=gen)], test[torch.randperm(len(test), generator=gen)]


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterable[torch.Tensor]:
    """One epoch of mini-batches: a fresh permutation, each sample used once."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


# ---- statistics and output -------------------------------------------------------

def mean_std(xs: Sequence[float]) -> Dict[str, float]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def machine() -> Dict[str, object]:
    from .. import __version__, native_available
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "manifold_sgd": __version__, "native": native_available(),
            "load_average_1_5_15min": {"start": _load_at_start, "end": _loadavg()}}


def finish(name: str, args, result: Dict, t0: float, plot=None) -> Dict:
    """Add the common fields and write ``<out>/<name>.json``; then ``plot(result, args)``
    (which writes ``<out>/<name>.png``) when given; return the result."""
    result = dict(result)
    result.update({"demo": name, "quick": bool(args.quick), "seed": int(args.seed),
                   "wall_seconds": round(time.perf_counter() - t0, 2),
                   # CPU time of this process: on a shared machine it tracks the work done
                   # better than wall time does
                   "cpu_seconds": round(time.process_time() - _cpu_at_start, 2),
                   "machine": machine()})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1, sort_keys=False, allow_nan=True)
        f.write("\n")
    if plot is not None:
        plot(result, args)
    return result


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, args, name: str) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    pyplot().close(fig)
    return path


def fmt_ms(xs: Sequence[float]) -> str:
    s = mean_std(xs)
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def tensor_rows_norm(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).norm(dim=1)


