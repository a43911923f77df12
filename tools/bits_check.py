"""The native steps' result bits on the benchmark sets, hashed, to show that a change which
should not touch the mathematics leaves every bit where it was.

    python tools/bits_check.py --write tools/bits_baseline.json   # record (at a known commit)
    python tools/bits_check.py --check tools/bits_baseline.json   # compare; exit 1 on a difference

Each case builds the benchmark's parameters (``manifold_sgd.bench.make_base``, seeded), takes
``STEPS`` native steps with per-step gradients, and hashes every weight and momentum buffer.
The hashes are keyed by the CPU kernel variant (``native_info()["cpu_variant"]``): the AVX2+FMA
build contracts multiply-adds that the baseline build does not, so the two differ in the last
bits by design. The thread count does not change the bits (tests/test_native_vs_reference.py).
The Stiefel cases' weights are first given orthonormal blocks by a QR in LAPACK, whose last bits
depend on the code path the CPU gets (an AMD and an Intel x86 differ), so those hashes are keyed
by the CPU model as well: ``"<variant> on <cpu model>"``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

from manifold_sgd import FGSGD, PSISGD, UNSGD, ManifoldSGD, native_info
from manifold_sgd.bench import SETS, cpu_model, make_base

STEPS = 3
MOMENTUM = 0.9


def _stiefel(params, retraction):
    convs = [p for p in params if p.dim() == 4 and p.shape[2] <= p.shape[3]]
    rest = [p for p in params if all(p is not q for q in convs)]
    return ManifoldSGD([{"params": convs, "manifold": "stiefel", "granularity": "kernel",
                         "retraction": retraction}, {"params": rest}],
                       lr=1e-3, momentum=MOMENTUM, backend="native")


CASES = {
    # name: (set, dtype, build)
    "UN transformer36": ("transformer36", torch.float32,
                         lambda p: UNSGD(p, lr=1e-3, momentum=MOMENTUM, backend="native")),
    "UN nesterov resnet50": ("resnet50", torch.float32,
                             lambda p: UNSGD(p, lr=1e-3, momentum=MOMENTUM, nesterov=True, backend="native")),
    "PSI transformer36": ("transformer36", torch.float32,
                          lambda p: PSISGD(p, lr=1e-3, momentum=MOMENTUM, backend="native")),
    "PSI resnet50": ("resnet50", torch.float32,
                     lambda p: PSISGD(p, lr=1e-3, momentum=MOMENTUM, backend="native")),
    "FG-SGD PO8 transformer36": ("transformer36", torch.float32,
                                 lambda p: FGSGD(p, lr=1e-3, momentum=MOMENTUM, grouping="PO", group_size=8,
                                                 backend="native")),
    "FG-SGD PO8 mlp36": ("mlp36", torch.float32,
                         lambda p: FGSGD(p, lr=1e-3, momentum=MOMENTUM, grouping="PO", group_size=8,
                                         backend="native")),
    "FG-SGD PO8 resnet50": ("resnet50", torch.float32,
                            lambda p: FGSGD(p, lr=1e-3, momentum=MOMENTUM, grouping="PO", group_size=8,
                                            backend="native")),
    "FG-SGD general tensor resnet50": ("resnet50", torch.float32,
                                       lambda p: FGSGD(p, lr=1e-3, adaptive="general", curvature=0.5,
                                                       distance=2.0, backend="native")),
    "Stiefel qr resnet50": ("resnet50", torch.float32, lambda p: _stiefel(p, "qr")),
    "Stiefel polar resnet50": ("resnet50", torch.float32, lambda p: _stiefel(p, "polar")),
    "UN bf16 stochastic rounding transformer36": (
        "transformer36", torch.bfloat16,
        lambda p: UNSGD(p, lr=1e-3, momentum=MOMENTUM, stochastic_rounding=True, rounding_seed=7,
                        backend="native")),
    "UN float64 resnet50": ("resnet50", torch.float64,
                            lambda p: UNSGD(p, lr=1e-3, momentum=MOMENTUM, backend="native")),
}


# cases whose starting point goes through LAPACK (the blocks' orthonormal placement)
LAPACK_CASES = ("Stiefel qr resnet50", "Stiefel polar resnet50")


def baseline_key(name: str, variant: str) -> str:
    return f"{variant} on {cpu_model()}" if name in LAPACK_CASES else variant


def run_case(set_name: str, dtype: torch.dtype, build, placed: bool = True) -> str:
    base = make_base(SETS[set_name](), dtype, torch.device("cpu"), seed=0)
    # make_base draws rows of norm close to 1 (std 1/sqrt(fan_in)); construction leaves rows that
    # are on their sphere to rounding as they are, so a few of them would not be normalised. Twice
    # the weights (exact) are off the sphere: every row is placed, and placing 2w gives the bits
    # of placing w (norms and QR scale exactly), so the stored hashes still hold. PSI weights are
    # not placed: they are stepped as drawn.
    scale = 2.0 if placed else 1.0
    params = [torch.nn.Parameter(w.clone() * scale if w.dim() >= 2 else w.clone()) for w, _ in base]
    opt = build(params)
    gen = torch.Generator().manual_seed(11)
    for _ in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
        opt.step()
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        m = opt.state[p].get("momentum_buffer")
        if m is not None:
            h.update(m.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="JSON")
    mode.add_argument("--check", metavar="JSON")
    ap.add_argument("--cases", nargs="*", help="a subset of the case names")
    args = ap.parse_args(argv)
    variant = native_info()["cpu_variant"]
    names = args.cases or list(CASES)
    hashes = {}
    for name in names:
        set_name, dtype, build = CASES[name]
        hashes[name] = run_case(set_name, dtype, build, placed=not name.startswith("PSI"))
        print(f"{name:<45} {hashes[name][:16]}", flush=True)
    if args.write:
        try:
            with open(args.write) as f:
                doc = json.load(f)
        except FileNotFoundError:
            doc = {}
        for n, h in hashes.items():
            doc.setdefault(baseline_key(n, variant), {})[n] = h
        with open(args.write, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"wrote {len(hashes)} hashes for cpu_variant {variant} to {args.write}")
        return 0
    with open(args.check) as f:
        doc = json.load(f)
    want = {n: doc.get(baseline_key(n, variant), {}).get(n) for n in names}
    bad = [n for n in names if want[n] != hashes[n]]
    missing = [n for n in names if want[n] is None]
    for n in bad:
        print(f"DIFFERENT: {n}" + (" (no stored hash)" if n in missing else ""))
    print(f"bits_check: {len(names) - len(bad)} of {len(names)} cases bitwise as stored ({variant})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
