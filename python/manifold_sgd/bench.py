"""``python -m manifold_sgd bench``: time one optimizer step against baselines.

For each parameter set (real model shapes, built from code; nothing is
downloaded) random gradients are set once, then one ``opt.step()`` is timed
for the manifold optimizers on the native kernel and on the reference path,
for ``torch.optim.SGD`` (foreach and fused) and for geoopt's ``RiemannianSGD``
on the sphere, and for the Adam family's baselines: ``torch.optim.AdamW`` fused and
foreach, AdamW fused followed by a PyTorch renormalise pass (nGPT's recipe), a
per-tensor PyTorch loop of projected Adam, and geoopt's ``RiemannianAdam`` on the
sphere. Native and reference are checked against each other before
anything is timed. The step is memory-bound, so every time is also put next
to the copy bandwidth measured in the same run (the roofline).

Reading the numbers:

- ``median ms``: median wall time of one step after warm-up (CUDA events on a
  GPU, ``time.perf_counter`` on the CPU, whose ops are synchronous).
- ``x fused`` / ``x foreach``: that time divided by ``SGD(fused=True)`` /
  ``SGD(foreach=True)`` measured in the same run (lower is faster; 1.0 = same).
- ``min ms`` / ``x fused@min``: the fastest sample and its ratio to fused SGD's
  fastest. On a machine shared with other work, time lost to preemption only
  adds, and it hits multi-threaded steps unevenly (fused SGD waits at an
  OpenMP barrier per tensor), so the minimum is the steadier comparison.
- ``GB/s``: bytes a step must move divided by its time. Per parameter a step
  reads w, g, m and writes w, m; the bytes are counted from the tensors each
  optimizer really holds: fp32 params with fp32 momentum move 20 B/param;
  16-bit params move 2+2+2 B for w, g, w and the momentum twice in its own
  dtype (float32 for manifold_sgd: 14 B/param; bf16 for torch.optim.SGD:
  10 B/param).
- ``% copy``: that bandwidth over the copy bandwidth of a large
  ``dst.copy_(src)`` (counted as 2 x size bytes). 100 % is the floor.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import FGSGD, PSISGD, UNSGD, ManifoldAdam, ManifoldSGD, _native, native_info

Shape = Tuple[int, ...]
ShapeList = List[Tuple[str, Shape]]

# The columns of the printed table; every result row in the JSON carries them.
TABLE_FIELDS = ("set", "optimizer", "backend", "median_ms", "ratio_vs_fused", "ratio_vs_foreach",
                "gbps", "pct_copy_bw", "min_ms", "ratio_vs_fused_min")
LR, MOMENTUM = 1e-3, 0.9

# ---- shape sets --------------------------------------------------------------------


def resnet50_shapes() -> ShapeList:
    """torchvision's ResNet-50 (v1.5): stem, 3-4-6-3 bottlenecks, fc; 25,557,032 params."""
    shapes: ShapeList = []

    def conv_bn(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes.append((f"{name}.weight", (c_out, c_in, k, k)))
        bn = name.replace("conv", "bn") if "conv" in name else name[:-1] + "1"
        shapes.append((f"{bn}.weight", (c_out,)))
        shapes.append((f"{bn}.bias", (c_out,)))

    conv_bn("conv1", 64, 3, 7)
    c_in = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}"
            conv_bn(f"{pre}.conv1", width, c_in, 1)
            conv_bn(f"{pre}.conv2", width, width, 3)
            conv_bn(f"{pre}.conv3", width * 4, width, 1)
            if b == 0:  # projection shortcut
                conv_bn(f"{pre}.downsample.0", width * 4, c_in, 1)
            c_in = width * 4
    shapes.append(("fc.weight", (1000, 2048)))
    shapes.append(("fc.bias", (1000,)))
    return shapes


def gpt2_small_shapes() -> ShapeList:
    """Hugging Face GPT-2 small (Conv1D weights are (in, out)); lm_head is tied to wte.
    124,439,808 params."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes: ShapeList = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        pre = f"h.{i}"
        shapes += [(f"{pre}.ln_1.weight", (d,)), (f"{pre}.ln_1.bias", (d,)),
                   (f"{pre}.attn.c_attn.weight", (d, 3 * d)), (f"{pre}.attn.c_attn.bias", (3 * d,)),
                   (f"{pre}.attn.c_proj.weight", (d, d)), (f"{pre}.attn.c_proj.bias", (d,)),
                   (f"{pre}.ln_2.weight", (d,)), (f"{pre}.ln_2.bias", (d,)),
                   (f"{pre}.mlp.c_fc.weight", (d, 4 * d)), (f"{pre}.mlp.c_fc.bias", (4 * d,)),
                   (f"{pre}.mlp.c_proj.weight", (4 * d, d)), (f"{pre}.mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def transformer36_shapes() -> ShapeList:
    """Six transformer layers of width 512: attention q, k, v, o (512x512) and a 4x MLP
    (2048x512 up, 512x2048 down): 36 matrices, 18,874,368 params."""
    shapes: ShapeList = []
    for i in range(6):
        shapes += [(f"{i}.attn.{x}", (512, 512)) for x in "qkvo"]
        shapes += [(f"{i}.mlp.up", (2048, 512)), (f"{i}.mlp.down", (512, 2048))]
    return shapes


def mlp36_shapes() -> ShapeList:
    """36 matrices, 12 each of 512x512, 2048x512, 512x2048 (28,311,552 params): MLP-heavy,
    with larger tensors than transformer36 (the set the first stored CPU numbers used)."""
    shapes: ShapeList = []
    for i in range(12):
        shapes += [(f"{i}.attn", (512, 512)), (f"{i}.up", (2048, 512)), (f"{i}.down", (512, 2048))]
    return shapes


def llm1b_shapes() -> ShapeList:
    """24 layers of 2048-wide attention (q, k, v, o) and a 4x MLP: 1,207,959,552 params."""
    d, layers = 2048, 24
    shapes: ShapeList = []
    for i in range(layers):
        shapes += [(f"{i}.attn.{x}", (d, d)) for x in "qkvo"]
        shapes += [(f"{i}.mlp.up", (4 * d, d)), (f"{i}.mlp.down", (d, 4 * d))]
    return shapes


def many_small_shapes() -> ShapeList:
    """2000 small tensors: 1000 of 64x64 and 1000 conv kernels 64x8x3x3 (8,704,000 params);
    measures the per-tensor overhead of a step rather than bandwidth."""
    shapes: ShapeList = []
    for i in range(1000):
        shapes += [(f"{i}.linear", (64, 64)), (f"{i}.conv", (64, 8, 3, 3))]
    return shapes


def small_8x8_shapes() -> ShapeList:
    """2000 tensors of 8 x 8: a step that is almost all per-tensor overhead (UN with momentum
    against SGD(fused=True) on the same: issue #13's bar)."""
    return [(f"{i}.weight", (8, 8)) for i in range(2000)]


def tiny_shapes() -> ShapeList:
    """A few small tensors of every kind (conv, norm gains, linear, bias); for --quick."""
    return [("conv1.weight", (16, 3, 3, 3)), ("bn1.weight", (16,)), ("bn1.bias", (16,)),
            ("conv2.weight", (32, 16, 3, 3)), ("fc1.weight", (64, 128)), ("fc1.bias", (64,)),
            ("fc2.weight", (10, 64)), ("fc2.bias", (10,))]


SETS: Dict[str, Callable[[], ShapeList]] = {
    "transformer36": transformer36_shapes,
    "mlp36": mlp36_shapes,
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "llm1b": llm1b_shapes,
    "many-small": many_small_shapes,
    "small-8x8": small_8x8_shapes,
    "tiny": tiny_shapes,
}


def default_sets(device: torch.device, quick: bool) -> List[str]:
    """What runs without --sets. On this project's 2-core CPU, gpt2-small alone would
    take minutes (its reference steps), so it runs only when asked for."""
    if quick:
        return ["tiny"]
    if device.type == "cuda":
        return ["transformer36", "resnet50", "gpt2-small", "llm1b", "many-small"]
    return ["transformer36", "resnet50"]


def numel(shape: Shape) -> int:
    return math.prod(shape)


# ---- parameters --------------------------------------------------------------------


def make_base(shapes: ShapeList, dtype: torch.dtype, device: torch.device,
              seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(weight, gradient) pairs, drawn once; every optimizer starts from copies of the weights
    and reads the same gradients (no optimizer here writes its gradients)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = []
    for _, shape in shapes:
        fan_in = numel(shape[1:]) if len(shape) > 1 else 1
        w = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        if len(shape) == 1:
            w = w + 1.0  # norm gains / biases around one, like a fresh model
        g = torch.randn(shape, generator=gen) * 1e-2
        base.append((w.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)))
    return base


def fresh_params(base) -> List[torch.nn.Parameter]:
    params = []
    for w, g in base:
        p = torch.nn.Parameter(w.clone())
        p.grad = g
        params.append(p)
    return params


def geoopt_params(base) -> List[torch.nn.Parameter]:
    """Matrices and conv weights as (out, -1) points of geoopt's Sphere (which normalises the
    last dim, i.e. one sphere per output row, as UN); 1-D tensors stay Euclidean."""
    import geoopt

    params = []
    for w, g in base:
        if w.dim() >= 2:
            w2 = w.reshape(w.shape[0], -1)
            w2 = w2 / w2.float().norm(dim=1, keepdim=True).to(w2.dtype)
            p = geoopt.ManifoldParameter(w2.clone(), manifold=geoopt.Sphere())
            p.grad = g.reshape(w.shape[0], -1)
        else:
            p = torch.nn.Parameter(w.clone())
            p.grad = g
        params.append(p)
    return params


# ---- the optimizers ----------------------------------------------------------------


@dataclass
class Case:
    """One timed optimizer: ``method`` names the algorithm, ``backend`` where it runs."""
    method: str
    backend: str  # native | reference | torch | geoopt
    build: Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer]
    geoopt: bool = False  # its parameters are geoopt ManifoldParameters


METHODS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "UN": lambda p, backend: UNSGD(p, lr=LR, momentum=MOMENTUM, backend=backend),
    "PSI": lambda p, backend: PSISGD(p, lr=LR, momentum=MOMENTUM, backend=backend),
    "FG-SGD PO8": lambda p, backend: FGSGD(p, lr=LR, momentum=MOMENTUM, grouping="PO", group_size=8,
                                           backend=backend),
    "FG-SGD tensor": lambda p, backend: FGSGD(p, lr=LR, momentum=MOMENTUM, backend=backend),
    "Stiefel kernel": lambda p, backend: stiefel_kernels(p, backend),
    "Stiefel kernel polar": lambda p, backend: stiefel_kernels(p, backend, retraction="polar"),
    "Adam row": lambda p, backend: ManifoldAdam(p, lr=LR, second_moment="row", backend=backend),
    "Adam element": lambda p, backend: ManifoldAdam(p, lr=LR, second_moment="element", backend=backend),
    # nGPT's normalised columns (attention output, MLP down-projection): every matrix's columns
    # as its rows (granularity="column"), stepped in place of W^T's rows
    "UN column": lambda p, backend: UNSGD(column_groups(p), lr=LR, momentum=MOMENTUM, backend=backend),
    "Adam row column": lambda p, backend: ManifoldAdam(column_groups(p), lr=LR, second_moment="row",
                                                       backend=backend),
}


# a run without --methods: the column methods (rows of the transposed layout, ~4x the row
# path on the CPU) are asked for by name
DEFAULT_METHODS = [m for m in METHODS if "column" not in m]


def column_groups(params) -> List[dict]:
    """Matrices with granularity="column", the other tensors as the optimizer places them."""
    mats = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return ([{"params": mats, "granularity": "column"}] if mats else []) + ([{"params": rest}] if rest else [])


def stiefel_kernels(params, backend: str, retraction: str = "qr") -> Optional[torch.optim.Optimizer]:
    """Conv kernels as orthonormal kh x kw blocks (QR or polar retraction), the rest as in UN;
    None for a set without conv weights (this case is then not run)."""
    convs = [p for p in params if p.dim() == 4 and p.shape[2] <= p.shape[3]]
    if not convs:
        return None
    rest = [p for p in params if all(p is not q for q in convs)]
    groups = [{"params": convs, "manifold": "stiefel", "granularity": "kernel"}]
    groups += [{"params": rest}] if rest else []
    return ManifoldSGD(groups, lr=LR, momentum=MOMENTUM, retraction=retraction, backend=backend)


def geoopt_available() -> bool:
    try:
        import geoopt  # noqa: F401
    except ImportError:
        return False
    return True


class RenormalisedAdamW(torch.optim.Optimizer):
    """The unfused normalized-transformer recipe: ``torch.optim.AdamW(fused=True)``, then every
    matrix's rows renormalised to unit norm in PyTorch (nGPT's step; weight decay 0)."""

    def __init__(self, params, lr: float):
        params = list(params)
        self.inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        self.rows = [p for p in params if p.dim() >= 2]
        super().__init__(params, dict(lr=lr))
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        for p in self.rows:
            flat = p.view(p.shape[0], -1)
            flat.div_(flat.norm(dim=1, keepdim=True))


class ProjectedAdamLoop(torch.optim.Optimizer):
    """The projected-Adam recipe as a per-tensor PyTorch loop (what oblique-Adam optimizers do
    unfused): on matrices, the gradient projected onto each row's tangent space, Adam's moments
    (one v per element), the direction projected again, the move, the rows renormalised, the
    first moment projected at the new point; 1-D tensors plain Adam."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @staticmethod
    def _tangent(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - (w * x).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
                rows = p.dim() >= 2
                w = p.view(p.shape[0], -1) if rows else p
                g = p.grad.view_as(w)
                m2, v2 = m.view_as(w), v.view_as(w)
                if rows:
                    g = self._tangent(w, g)
                m2.mul_(b1).add_(g, alpha=1 - b1)
                v2.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m2 / (1 - b1 ** t)) / ((v2 / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                if rows:
                    u = self._tangent(w, u)
                w.add_(u, alpha=-group["lr"])
                if rows:
                    w.div_(w.norm(dim=1, keepdim=True))
                    m2.copy_(self._tangent(w, m2))


def baseline_cases(with_geoopt: bool) -> List[Case]:
    cases = [
        Case("SGD fused", "torch", lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, fused=True)),
        Case("SGD foreach", "torch",
             lambda p: torch.optim.SGD(p, lr=LR, momentum=MOMENTUM, foreach=True)),
        # the Adam family's baselines (normalized transformers): weight decay 0, as nGPT trains
        Case("AdamW fused", "torch", lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0, fused=True)),
        Case("AdamW foreach", "torch", lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0, foreach=True)),
        Case("AdamW fused + renorm", "torch", lambda p: RenormalisedAdamW(p, lr=LR)),
        Case("projected Adam loop", "torch", lambda p: ProjectedAdamLoop(p, lr=LR)),
    ]
    if with_geoopt:
        import geoopt

        cases.append(Case("geoopt RSGD sphere", "geoopt",
                          lambda p: geoopt.optim.RiemannianSGD(p, lr=LR, momentum=MOMENTUM),
                          geoopt=True))
        cases.append(Case("geoopt RAdam sphere", "geoopt", lambda p: geoopt.optim.RiemannianAdam(p, lr=LR),
                          geoopt=True))
    return cases


# ---- correctness -------------------------------------------------------------------

# max |native - reference| after one step, by parameter dtype (16-bit rows carry their rounding)
CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()),
               default=0.0)


def check_native(method: str, opt_native, params_native, opt_ref, params_ref,
                 dtype: torch.dtype, device: torch.device, clock=time.perf_counter) -> dict:
    """One step of each from the same start; native and reference must agree.
    These steps are also the optimizers' first (state-allocating) warm-up step."""
    native_ms = timed_step(opt_native, device, clock)
    reference_ms = timed_step(opt_ref, device, clock)
    dw = max_abs_diff([p.detach() for p in params_native], [p.detach() for p in params_ref])
    first_moment = "exp_avg" if isinstance(opt_native, ManifoldAdam) else "momentum_buffer"
    dm = max_abs_diff([opt_native.state[p][first_moment] for p in params_native],
                      [opt_ref.state[p][first_moment] for p in params_ref])
    tol = CHECK_TOL[dtype]
    return {"method": method, "max_abs_diff_weight": dw, "max_abs_diff_momentum": dm,
            "tolerance": tol, "ok": bool(dw <= tol and dm <= tol),
            "first_step_ms": {"native": native_ms, "reference": reference_ms}}


# ---- timing ------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(opt, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds of one ``opt.step()``: CUDA events on a GPU; on the CPU, whose ops
    are synchronous, ``clock`` around the call (wall time, or with ``--clock thread`` the
    CPU time of this thread, which on a single thread leaves out time spent descheduled)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        opt.step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = clock()
    opt.step()
    return (clock() - t0) * 1e3


def time_interleaved(opts: Dict[str, torch.optim.Optimizer], device: torch.device, warmup: int,
                     repeat: int, clock=time.perf_counter) -> Dict[str, List[float]]:
    """Step every optimizer once per round, starting each round one further along, so that
    load from other processes falls on all of them alike. Returns ms samples per optimizer."""
    names = list(opts)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(warmup + repeat):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            ms = timed_step(opts[k], device, clock)
            if r >= warmup:
                samples[k].append(ms)
    return samples


def time_alone(opt, device: torch.device, warmup: int, repeat: int, budget_s: float,
               warmed_ms: Optional[float] = None, clock=time.perf_counter) -> Tuple[List[float], int]:
    """For slow optimizers: steps in a row; returns (ms samples, warm-up steps taken).

    ``warmed_ms``: one step was already taken (the correctness check) and took this long.
    Warm-up ends early after a step slower than ``budget_s / 4`` (the first step allocates
    the state; a step that slow is past any warm-up effect), and timing after three
    samples once ``budget_s`` seconds are used.
    """
    done, last = (0, 0.0) if warmed_ms is None else (1, warmed_ms)
    while done < warmup and not (done >= 1 and last > budget_s * 1e3 / 4):
        last = timed_step(opt, device, clock)
        done += 1
    samples: List[float] = []
    while len(samples) < repeat and (len(samples) < 3 or sum(samples) / 1e3 < budget_s):
        samples.append(timed_step(opt, device, clock))
    return samples, done


# ---- roofline ----------------------------------------------------------------------


class BandwidthProbe:
    """A large memory-bound op with a ``step()``, timed among the optimizers (same rounds,
    same load from other processes) to measure the memory bandwidth of this device.

    ``copy``: ``dst.copy_(src)``, counted as 2 x size bytes (the roofline of the table).
    ``add``: ``a.add_(b)``, 3 x size bytes; every line it writes was read first, like an
    optimizer step, so on a CPU it pays no read-for-ownership of the destination that
    ``copy_`` pays without counting it, and a step can reach more than 100 % of copy.
    """

    def __init__(self, kind: str, nbytes: int, device: torch.device):
        self.kind = kind
        self.a = torch.rand(nbytes // 4, device=device)
        self.b = torch.rand(nbytes // 4, device=device)
        self.bytes = (2 if kind == "copy" else 3) * self.a.numel() * self.a.element_size()

    def step(self) -> None:
        if self.kind == "copy":
            self.b.copy_(self.a)
        else:
            self.a.add_(self.b)


def bytes_per_step(opt: torch.optim.Optimizer) -> int:
    """Bytes a step must move: read w and g, write w, and read + write every state tensor
    of the parameter's size (the momentum buffer), each in the dtype it is really held in."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            n = p.numel()
            total += 2 * n * p.element_size() + n * p.grad.element_size()
            for v in opt.state[p].values():
                if torch.is_tensor(v) and v.is_floating_point() and v.numel() == n:
                    total += 2 * n * v.element_size()
    return total


def floor_ms(row: dict, gbps: float) -> float:
    """A result row's bytes at `gbps`: the fastest its step could run at that bandwidth."""
    return row["bytes_per_step"] / (gbps * 1e9) * 1e3


def add_roofline(row: dict, copy_gbps: float) -> None:
    """Achieved GB/s of a result row, its share of the copy bandwidth, and its floor time."""
    row["gbps"] = row["bytes_per_step"] / (row["median_ms"] / 1e3) / 1e9
    row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
    row["floor_ms"] = floor_ms(row, copy_gbps)


# ---- one set -----------------------------------------------------------------------


def result_row(set_name: str, method: str, backend: str, timing: str, samples: List[float],
               opt) -> dict:
    return {"set": set_name, "optimizer": method, "backend": backend,
            "median_ms": statistics.median(samples), "min_ms": min(samples), "timing": timing,
            "samples_ms": samples, "bytes_per_step": bytes_per_step(opt)}


def run_set(set_name: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    """Check, then time every optimizer on one parameter set.

    The optimizers the acceptance ratios compare (native steps and the two SGD baselines)
    are timed interleaved, round by round; the slow ones (reference path, geoopt) one
    after the other, each stopping early after ``args.budget`` seconds.
    """
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    shapes = SETS[set_name]()
    n_params = sum(numel(s) for _, s in shapes)
    print(f"\n== {set_name}: {len(shapes)} tensors, {n_params:,} params, {dtype} on {device}",
          flush=True)
    base = make_base(shapes, dtype, device)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rows, checks, errors = [], [], []
    fast: Dict[Tuple[str, str], torch.optim.Optimizer] = {}

    def attempt(label: str, fn):
        try:
            return fn()
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            errors.append({"case": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {label}: skipped ({type(exc).__name__}: {exc})", flush=True)
            return None

    def alone(method: str, backend: str, opt, warmed_ms: Optional[float] = None) -> None:
        samples, warm = time_alone(opt, device, args.warmup, args.repeat, args.budget, warmed_ms,
                                   clock)
        rows.append(result_row(set_name, method, backend, "alone", samples, opt))
        rows[-1]["warmup_steps"] = warm
        print(f"  {method:<20} {backend:<9} {statistics.median(samples):10.2f} ms"
              f"  (n={len(samples)})", flush=True)

    for method, build in METHODS.items():
        if method not in (getattr(args, "methods", None) or DEFAULT_METHODS):
            continue
        ref_params = fresh_params(base)
        ref_opt = build(ref_params, "reference")
        if ref_opt is None:  # the method does not apply to this set
            continue
        warmed_ms = None
        if _native.supports(device):
            nat_params = fresh_params(base)
            nat_opt = build(nat_params, "native")
            check = check_native(method, nat_opt, nat_params, ref_opt, ref_params, dtype, device,
                                 clock)
            checks.append(check)
            print(f"  check {method}: native vs reference max|dw| {check['max_abs_diff_weight']:.2e}"
                  f" max|dm| {check['max_abs_diff_momentum']:.2e} "
                  f"{'ok' if check['ok'] else 'FAILED'} (tol {check['tolerance']:.0e})", flush=True)
            fast[(method, "native")] = nat_opt
            warmed_ms = check["first_step_ms"]["reference"]
        alone(method, "reference", ref_opt, warmed_ms)
        del ref_opt, ref_params
        gc.collect()

    for case in baseline_cases(geoopt_available()):
        def build_and_probe(case=case):
            opt = case.build(geoopt_params(base) if case.geoopt else fresh_params(base))
            first_ms = timed_step(opt, device, clock)  # fails here, not in the timing loop
            return opt, first_ms
        built = attempt(f"{case.method} ({case.backend})", build_and_probe)
        if built is None:
            continue
        opt, first_ms = built
        if case.backend == "torch":
            fast[(case.method, case.backend)] = opt
        else:
            alone(case.method, case.backend, opt, first_ms)
            del opt
            gc.collect()

    probes = {kind: BandwidthProbe(kind, (16 if args.quick else 512) << 20, device)
              for kind in ("copy", "add")}
    timed = {f"{m}|{b}": o for (m, b), o in fast.items()}
    samples = time_interleaved({**timed, **probes}, device, args.warmup, args.repeat, clock)
    gbps = {k: p.bytes / (statistics.median(samples[k]) / 1e3) / 1e9 for k, p in probes.items()}
    copy_gbps = gbps["copy"]
    print(f"  bandwidth: copy {gbps['copy']:.1f} GB/s, add_ {gbps['add']:.1f} GB/s (interleaved)",
          flush=True)
    for (method, backend), opt in fast.items():
        got = samples[f"{method}|{backend}"]
        rows.append(result_row(set_name, method, backend, "interleaved", got, opt))
        print(f"  {method:<20} {backend:<9} {statistics.median(got):10.2f} ms  (n={len(got)}, "
              f"interleaved)", flush=True)
    del probes, timed
    fast.clear()
    gc.collect()
    for row in rows:
        add_roofline(row, copy_gbps)

    order = {"torch": 0, "native": 1, "reference": 2, "geoopt": 3}
    methods = ["SGD fused", "SGD foreach", "AdamW fused", "AdamW foreach", "AdamW fused + renorm",
               "projected Adam loop", *METHODS, "geoopt RSGD sphere", "geoopt RAdam sphere"]
    rows.sort(key=lambda r: (order[r["backend"]], methods.index(r["optimizer"])))
    add_ratios(rows)
    return {"set": set_name, "n_tensors": len(shapes), "n_params": n_params,
            "loadavg_start": load_start, "clock": args.clock, "threads": torch.get_num_threads(),
            "copy_bandwidth_gbps": copy_gbps, "add_bandwidth_gbps": gbps["add"],
            "copy_samples_ms": samples["copy"], "add_samples_ms": samples["add"],
            "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "floor_ms_fp32": 20 * n_params / (copy_gbps * 1e9) * 1e3,
            "checks": checks, "errors": errors, "results": rows,
            "bars": ((acceptance_bars(rows, gbps["add"]) if set_name == "transformer36" else [])
                     + step_speed_bars(set_name, rows)) or None}


# Issue #13's bars, ratios to fused SGD of the same run: FG-SGD PO8 per set, Stiefel 3x3 blocks
# (QR and polar) on ResNet-50, and over 2000 tensors of 8 x 8 a UN step with momentum no slower
# than fused SGD's (per-tensor overhead decides it).
STEP_SPEED_BARS = {"transformer36": [("FG-SGD PO8", 1.3)],
                   "mlp36": [("FG-SGD PO8", 1.4)],
                   "resnet50": [("FG-SGD PO8", 1.4), ("Stiefel kernel", 2.0), ("Stiefel kernel polar", 2.0)],
                   "small-8x8": [("UN", 1.0)]}


def ratio_bars(rows: List[dict], limits, suffix: str = "") -> List[dict]:
    """A bar per (method, limit): the native step's ratio to fused SGD (median, and at the
    minimums) at most `limit`."""
    ms = {(r["optimizer"], r["backend"]): r for r in rows}
    bars = []
    for method, limit in limits:
        r = ms.get((method, "native"))
        if r and r["ratio_vs_fused"] is not None:
            bars.append({"bar": f"{method} native <= {limit}x SGD fused{suffix}",
                         "value": r["ratio_vs_fused"], "met": r["ratio_vs_fused"] <= limit,
                         "value_min": r["ratio_vs_fused_min"],
                         "met_min": r["ratio_vs_fused_min"] <= limit})
    return bars


def step_speed_bars(set_name: str, rows: List[dict]) -> List[dict]:
    return ratio_bars(rows, STEP_SPEED_BARS.get(set_name, []), f" ({set_name})")


OVERHEAD_SETS = ["resnet50", "transformer36", "small-8x8"]
OVERHEAD_BAR_US = 2.0  # issue #13: steady per-tensor Python overhead on resnet50 (the SGD family)
OVERHEAD_BAR_METHODS = ("UN", "PSI")
OVERHEAD_METHODS = ["UN", "PSI", "Adam row"]  # what --overhead times without --methods
OVERHEAD_BLOCK = 20  # timed steps per turn of a path in run_overhead
OVERHEAD_BLOCK_WARM = 3  # untimed steps first: the other paths' steps left the caches cold


def run_overhead(set_name: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    """The Python side of a step: native steps with the kernel replaced by a no-op
    (``_native.noop_kernel``), per step and per tensor, on the steady path (steady.py) and on
    the full path (``steady.ENABLED = False``), for the SGD family (UN, PSI) and ManifoldAdam
    (``Adam row``) unless ``--methods`` names others. Each optimizer's steps are timed in blocks of a few in a row
    (warm caches: the overhead itself, not the misses a forward/backward pass leaves), the
    optimizers taking turns block by block."""
    from . import steady

    shapes = SETS[set_name]()
    n = len(shapes)
    print(f"\n== overhead {set_name}: {n} tensors, kernel replaced by a no-op", flush=True)
    base = make_base(shapes, dtype, device)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    opts: Dict[str, torch.optim.Optimizer] = {}
    for method in (args.methods or OVERHEAD_METHODS):
        for path in ("steady", "full"):
            opts[f"{method}|{path}"] = METHODS[method](fresh_params(base), "native")

    class Path:  # a step on one path
        def __init__(self, opt, enabled: bool):
            self.opt, self.enabled = opt, enabled

        def step(self) -> None:
            steady.ENABLED = self.enabled
            try:
                self.opt.step()
            finally:
                steady.ENABLED = True

    paths = {k: Path(o, k.endswith("|steady")) for k, o in opts.items()}
    with _native.noop_kernel():
        for p in paths.values():  # the first (full) step, then the next one finds its record
            p.step()
        for p in paths.values():
            for _ in range(args.warmup):
                p.step()
        gc.collect()  # the garbage of the runs before is not these runs' to collect
        samples: Dict[str, List[float]] = {k: [] for k in paths}
        names = list(paths)
        # blocks of OVERHEAD_BLOCK steps in a row after a few untimed ones (warm: the overhead itself), the paths taking
        # turns block by block, each round starting one further along, so that load from other
        # processes (and whatever the first-timed path would pay) falls on all of them alike
        for r in range(args.repeat):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                block = [timed_step(paths[k], device, clock) for _ in range(OVERHEAD_BLOCK_WARM + OVERHEAD_BLOCK)]
                samples[k].extend(block[OVERHEAD_BLOCK_WARM:])  # after the switch from another path's steps
    rows = []
    for key, got in samples.items():
        method, path = key.split("|")
        engaged = path == "steady" and steady.ready(opts[key]) is not None
        med, low = statistics.median(got), min(got)
        rows.append({"set": set_name, "optimizer": method, "path": path, "median_ms": med, "min_ms": low,
                     "us_per_tensor": med * 1e3 / n, "us_per_tensor_min": low * 1e3 / n,
                     "steady_engaged": engaged, "samples_ms": got})
        print(f"  {method:<8} {path:<7} {med * 1e3:9.1f} us/step  {med * 1e3 / n:6.2f} us/tensor "
              f"(min {low * 1e3 / n:.2f})" + ("" if path == "full" or engaged else "  NOT ENGAGED"),
              flush=True)
    bars = []
    if set_name == "resnet50":
        for r in rows:
            if r["path"] == "steady" and r["optimizer"] in OVERHEAD_BAR_METHODS:
                bars.append({"bar": f"{r['optimizer']} steady overhead <= {OVERHEAD_BAR_US} us/tensor (resnet50)",
                             "value": r["us_per_tensor"], "met": r["us_per_tensor"] <= OVERHEAD_BAR_US,
                             "value_min": r["us_per_tensor_min"],
                             "met_min": r["us_per_tensor_min"] <= OVERHEAD_BAR_US})
    for b in bars:
        print(f"  bar {b['bar']}: median {b['value']:.2f} {'met' if b['met'] else 'NOT MET'}; "
              f"min {b['value_min']:.2f} {'met' if b['met_min'] else 'NOT MET'}", flush=True)
    return {"set": set_name, "n_tensors": n, "threads": torch.get_num_threads(), "clock": args.clock,
            "results": rows, "bars": bars}


def add_ratios(rows: List[dict]) -> None:
    base = {r["optimizer"]: r for r in rows if r["backend"] == "torch"}
    for r in rows:
        for key, name, stat in (("ratio_vs_fused", "SGD fused", "median_ms"),
                                ("ratio_vs_foreach", "SGD foreach", "median_ms"),
                                ("ratio_vs_fused_min", "SGD fused", "min_ms")):
            r[key] = r[stat] / base[name][stat] if name in base else None


def acceptance_bars(rows: List[dict], add_gbps: float) -> List[dict]:
    """The project's bars on transformer36: native UN, PSI <= 1.25x fused SGD, every native
    step >= 4x faster than its reference; the Adam family's bars against AdamW fused, AdamW +
    renormalise and geoopt. (FG-SGD PO8's bar is among step_speed_bars.)"""
    ms = {(r["optimizer"], r["backend"]): r for r in rows}
    bars = ratio_bars(rows, (("UN", 1.25), ("PSI", 1.25)))
    adamw, renorm = ms.get(("AdamW fused", "torch")), ms.get(("AdamW fused + renorm", "torch"))
    radam = ms.get(("geoopt RAdam sphere", "geoopt"))
    for method, limit in (("Adam row", 0.85), ("Adam element", 1.15)):  # the Adam family's bars
        r = ms.get((method, "native"))
        if not (r and adamw):
            continue
        value, value_min = r["median_ms"] / adamw["median_ms"], r["min_ms"] / adamw["min_ms"]
        bars.append({"bar": f"{method} native <= {limit}x AdamW fused", "value": value, "met": value <= limit,
                     "value_min": value_min, "met_min": value_min <= limit})
        if renorm:
            value = r["median_ms"] / renorm["median_ms"]
            bars.append({"bar": f"{method} native faster than AdamW fused + renorm", "value": value,
                         "met": value < 1, "value_min": r["min_ms"] / renorm["min_ms"],
                         "met_min": r["min_ms"] < renorm["min_ms"]})
        if radam:
            value = radam["median_ms"] / r["median_ms"]
            bars.append({"bar": f"{method} native >= 10x faster than geoopt RAdam", "value": value,
                         "met": value >= 10, "value_min": radam["min_ms"] / r["min_ms"],
                         "met_min": radam["min_ms"] / r["min_ms"] >= 10,
                         # The most this bar can show on this machine: our step at the add_
                         # bandwidth (every byte it must move, no arithmetic), against geoopt.
                         "ceiling": radam["median_ms"] / floor_ms(r, add_gbps)})
    for method in METHODS:
        nat, ref = ms.get((method, "native")), ms.get((method, "reference"))
        if nat and ref:
            speedup = ref["median_ms"] / nat["median_ms"]
            speedup_min = ref["min_ms"] / nat["min_ms"]
            bars.append({"bar": f"{method} native >= 4x faster than reference", "value": speedup,
                         "met": speedup >= 4, "value_min": speedup_min,
                         "met_min": speedup_min >= 4})
    return bars


# ---- output ------------------------------------------------------------------------


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_load(load) -> str:
    return "-" if load is None else f"{load[0]:.1f}"


def format_table(sets: List[dict]) -> str:
    head = (f"{'set':<14} {'optimizer':<20} {'backend':<9} {'median ms':>10} {'x fused':>8} "
            f"{'x foreach':>9} {'GB/s':>7} {'% copy':>7} {'min ms':>9} {'x fused@min':>11}")
    lines = [head, "-" * len(head)]
    for s in sets:
        lines.append(f"{s['set']}: {s['n_tensors']} tensors, {s['n_params']:,} params, "
                     f"copy {s['copy_bandwidth_gbps']:.1f} GB/s (add_ {s['add_bandwidth_gbps']:.1f}),"
                     f" fp32 floor {s['floor_ms_fp32']:.2f} ms (20 B/param at copy bandwidth);"
                     f" {s['threads']} thread(s), {s['clock']} clock, load avg "
                     f"{_fmt_load(s['loadavg_start'])} -> {_fmt_load(s['loadavg_end'])}")
        for r in s["results"]:
            lines.append(f"{r['set']:<14} {r['optimizer']:<20} {r['backend']:<9} "
                         f"{r['median_ms']:>10.2f} {_fmt(r['ratio_vs_fused'], '8.2f'):>8} "
                         f"{_fmt(r['ratio_vs_foreach'], '9.2f'):>9} {r['gbps']:>7.2f} "
                         f"{r['pct_copy_bw']:>6.1f}% {r['min_ms']:>9.2f} "
                         f"{_fmt(r['ratio_vs_fused_min'], '11.2f'):>11}")
        for c in s["checks"]:
            lines.append(f"  check {c['method']}: max|dw| {c['max_abs_diff_weight']:.1e} "
                         f"max|dm| {c['max_abs_diff_momentum']:.1e} "
                         f"{'ok' if c['ok'] else 'FAILED'}")
        for b in s["bars"] or []:
            lines.append(f"  bar {b['bar']}: median {b['value']:.2f} "
                         f"{'met' if b['met'] else 'NOT MET'}; min {b['value_min']:.2f} "
                         f"{'met' if b['met_min'] else 'NOT MET'}"
                         + (f"; at most {b['ceiling']:.2f} at the add_ bandwidth" if "ceiling" in b
                            else ""))
    return "\n".join(lines)


def machine_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
             "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "native": native_info()}
    if hasattr(os, "sched_getaffinity"):
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    try:
        import geoopt

        facts["geoopt"] = geoopt.__version__
    except ImportError:
        facts["geoopt"] = None
    return facts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(facts: dict) -> str:
    where = facts.get("gpu") or facts["cpu_model"]
    n = facts["native"]
    return (f"machine: {where}; {facts['torch_threads']} torch threads of {facts['cpu_count']} CPUs; "
            f"torch {facts['torch']}; geoopt {facts['geoopt']}; native "
            f"{'v' + str(n.get('version')) if n.get('available') else 'unavailable'} "
            f"(cuda_compiled={n.get('cuda_compiled')}, hardware_threads={n.get('hardware_threads')})")


def plot(set_result: dict, facts: dict, title: str, path: Path) -> bool:
    """Horizontal bars of the median step time (log scale), fused SGD and the floor marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = set_result["results"]
    colors = {"native": "tab:green", "reference": "tab:gray", "torch": "tab:blue",
              "geoopt": "tab:orange"}
    labels = [f"{r['optimizer']} ({r['backend']})" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.6))
    ax.barh(labels, [r["median_ms"] for r in rows], color=[colors[r["backend"]] for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["median_ms"], i, f" {r['median_ms']:.1f}", va="center", fontsize=8)
    fused = [r["median_ms"] for r in rows if r["optimizer"] == "SGD fused"]
    if fused:
        ax.axvline(fused[0], color="tab:blue", ls="--", lw=1, label="SGD fused")
    ax.axvline(set_result["floor_ms_fp32"], color="k", ls=":", lw=1,
               label="fp32 floor (20 B/param at copy BW)")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("median ms per step (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.text(0.01, 0.005, f"{machine_line(facts)}\n{set_result['threads']} thread(s), "
             f"{set_result['clock']} clock, load avg {_fmt_load(set_result['loadavg_start'])} -> "
             f"{_fmt_load(set_result['loadavg_end'])}", fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line ------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m manifold_sgd bench",
                                 description="Time one optimizer step against SGD and geoopt.")
    ap.add_argument("--sets", nargs="+", choices=list(SETS), help="parameter sets (default: "
                    "transformer36 resnet50 on CPU; also gpt2-small llm1b many-small on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per optimizer (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which a slow optimizer stops early (>= 3 samples; default 4)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (the native kernel uses as many); default: torch's")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="CPU timing: wall time (default) or the CPU time of the one thread "
                         "(needs --threads 1; not disturbed by other processes taking the CPU)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS),
                    help="manifold methods to time (default: all but the column ones)")
    ap.add_argument("--quick", action="store_true", help="tiny set, few repeats: seconds")
    ap.add_argument("--overhead", action="store_true",
                    help="CPU: the Python side of native steps only (kernel replaced by a no-op), per tensor, "
                         "steady path vs full path (default sets: " + " ".join(OVERHEAD_SETS) + "; default methods: "
                         + ", ".join(OVERHEAD_METHODS) + ")")
    ap.add_argument("--out", default="bench_results", help="folder for JSON and PNG")
    args = ap.parse_args(list(argv))
    quick_defaults = {"repeat": 3, "warmup": 5, "budget": 0.5}
    full_defaults = {"repeat": 20, "warmup": 5, "budget": 4.0}
    for k, v in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures one thread: use it with --threads 1")
    if args.repeat < 1 or args.warmup < 1:
        ap.error("--repeat and --warmup must be >= 1 (the first step allocates state)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.clock == "thread" and device.type != "cpu":
        print("bench: --clock thread is for the CPU; CUDA steps are timed with events",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    facts = machine_facts(device)
    print(machine_line(facts), flush=True)
    if args.overhead:
        return overhead_main(args, argv, device, dtype, facts, t_start)
    sets = args.sets or default_sets(device, args.quick)

    results = [run_set(name, device, dtype, args) for name in sets]

    print()
    print(format_table(results))
    print(machine_line(facts))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python -m manifold_sgd bench" + (" " + shlex.join(argv) if argv else "")
    elapsed = time.perf_counter() - t_start
    for s in results:
        stem = f"{device.type}_{s['set']}_{args.dtype}"
        if args.threads:
            stem += f"_{args.threads}thread" + ("_cputime" if args.clock == "thread" else "")
        doc = {"timestamp": stamp, "command": command, "machine": facts,
               "config": {"device": str(device), "dtype": args.dtype, "repeat": args.repeat,
                          "warmup": args.warmup, "budget_s": args.budget, "lr": LR,
                          "threads": torch.get_num_threads(), "clock": args.clock,
                          "momentum": MOMENTUM, "sets_in_run": sets},
               "run_seconds": elapsed,
               "table_fields": list(TABLE_FIELDS), **s}
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        title = f"{s['set']} ({s['n_params']:,} params, {args.dtype}) one step on {device}"
        wrote_png = plot(s, facts, title, out / f"{stem}.png")
        print(f"wrote {out / (stem + '.json')}" + (f" and {stem}.png" if wrote_png else ""))
    print(f"bench took {elapsed:.0f} s")
    failed = [c["method"] for s in results for c in s["checks"] if not c["ok"]]
    if failed:
        print(f"bench: native and reference disagree for {failed}", file=sys.stderr)
        return 1
    return 0


def overhead_main(args, argv, device: torch.device, dtype: torch.dtype, facts: dict, t_start: float) -> int:
    """``bench --overhead``: run_overhead on each set, one JSON for them all."""
    if device.type != "cpu":
        print("bench: --overhead replaces the CPU kernel; use --device cpu", file=sys.stderr)
        return 2
    sets = args.sets or OVERHEAD_SETS
    results = [run_overhead(name, device, dtype, args) for name in sets]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.type}_overhead_{args.dtype}"
    if args.threads:
        stem += f"_{args.threads}thread" + ("_cputime" if args.clock == "thread" else "")
    doc = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m manifold_sgd bench" + (" " + shlex.join(argv) if argv else ""),
           "machine": facts, "config": {"repeat": args.repeat, "warmup": args.warmup, "clock": args.clock,
                                        "threads": torch.get_num_threads(), "sets_in_run": sets},
           "run_seconds": time.perf_counter() - t_start, "sets": results}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out / (stem + '.json')}")
    missed = [r["set"] + " " + r["optimizer"] for s in results for r in s["results"]
              if r["path"] == "steady" and not r["steady_engaged"]]
    if missed:
        print(f"bench: the steady path did not engage for {missed}", file=sys.stderr)
        return 1
    return 0
