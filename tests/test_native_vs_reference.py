"""The native kernel computes what the reference path computes (SPEC §5 tolerances),
for every manifold, granularity, grouping, adaptive rule and dtype."""
import contextlib
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import DTYPES, TOL, dtype_id

pytestmark = pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")

# (id, optimizer class, options, shapes)
CONV = [(6, 4, 3, 3), (5, 3, 1, 3), (10,)]
CASES = [
    ("un", msgd.UNSGD, dict(), CONV + [(13, 9)]),
    ("un-momentum", msgd.UNSGD, dict(momentum=0.9), CONV + [(13, 9)]),
    ("un-nesterov", msgd.UNSGD, dict(momentum=0.8, nesterov=True), CONV),
    ("un-kernel", msgd.UNSGD, dict(momentum=0.9, granularity="kernel"), [(6, 4, 3, 3)]),
    ("un-tensor", msgd.UNSGD, dict(momentum=0.9, granularity="tensor"), CONV),
    ("fg-tensor", msgd.FGSGD, dict(momentum=0.9), CONV + [(13, 9)]),
    ("fg-row", msgd.FGSGD, dict(grouping="row"), CONV),
    ("fg-po-filter", msgd.FGSGD, dict(grouping="PO", group_size=4, momentum=0.5), CONV + [(13, 9)]),
    ("fg-po-kernel", msgd.FGSGD, dict(grouping="PO", granularity="kernel", group_size=2), [(6, 4, 3, 3)]),
    ("fg-pi", msgd.FGSGD, dict(grouping="PI", granularity="kernel", group_size=3, momentum=0.9),
     [(6, 4, 3, 3), (5, 3, 1, 3)]),
    ("fg-pio", msgd.FGSGD, dict(grouping="PIO", granularity="kernel", group_size=5, nesterov=True,
                                momentum=0.9), [(6, 4, 3, 3)]),
    ("fg-pio-all", msgd.FGSGD, dict(grouping="PIO", granularity="kernel"), [(6, 4, 3, 3)]),
    ("fg-general", msgd.FGSGD, dict(adaptive="general", curvature=0.3, distance=2.5, momentum=0.9),
     CONV + [(13, 9)]),
    ("psi", msgd.PSISGD, dict(), CONV + [(13, 9)]),
    ("psim", msgd.PSISGD, dict(momentum=0.9), CONV + [(13, 9)]),
    ("psi-guard", msgd.PSISGD, dict(momentum=0.9, psi_max_norm=1.5), CONV),
    ("psi-fg", msgd.PSISGD, dict(momentum=0.9, adaptive="sphere", grouping="PO", group_size=2), CONV),
    ("euclidean-wd", msgd.ManifoldSGD, dict(manifold="euclidean", momentum=0.9, weight_decay=0.1),
     CONV + [(13, 9)]),
    ("auto-wd", msgd.ManifoldSGD, dict(momentum=0.9, weight_decay=0.05, nesterov=True), CONV),
    ("odd-rows", msgd.UNSGD, dict(momentum=0.9), [(3, 1), (2, 3), (4, 9), (2, 31), (2, 4097)]),
    ("odd-rows-fg", msgd.FGSGD, dict(momentum=0.9, grouping="PO", group_size=2),
     [(3, 1), (2, 3), (4, 9), (3, 31), (2, 4097)]),
]


def _row_len(shape):
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _run(cls, opts, shapes, dtype, backend, grads, lr=0.05):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    opt = cls(params, lr=lr, backend=backend, **opts)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_native_equals_reference(case, dtype):
    _, cls, opts, shapes = case
    # rows get gradients of norm ~3 whatever their length (a step of ~0.15 rad at lr 0.05):
    # the transport of a far larger step cancels catastrophically in float32 on any backend
    grads = [[3 * torch.randn(s, dtype=torch.float64) / _row_len(s) ** 0.5 for s in shapes]
             for _ in range(3)]
    pn, on = _run(cls, opts, shapes, dtype, "native", grads)
    pr, orf = _run(cls, opts, shapes, dtype, "reference", grads)
    tol = TOL[dtype]
    for a, b in zip(pn, pr):
        # 16-bit params: compare in float32 (both round the same float32 result once)
        torch.testing.assert_close(a.detach().double(), b.detach().double(), **tol)
        if "momentum_buffer" in on.state[a]:
            ma, mb = on.state[a]["momentum_buffer"], orf.state[b]["momentum_buffer"]
            assert ma.dtype == mb.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            scale = max(float(mb.abs().max()), 1e-2)  # rows of length 1 have m = 0 up to rounding
            atol = max(tol["atol"], 1e-6 if dtype != torch.float64 else 1e-12)
            torch.testing.assert_close(ma.double() / scale, mb.double() / scale, rtol=tol["rtol"], atol=atol)


def test_bitwise_reproducible_and_thread_independent():
    shapes = [(64, 2048), (300, 512), (37, 3, 3, 3)]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(2)]
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            params, _ = _run(msgd.FGSGD, dict(grouping="PO", group_size=5, momentum=0.9),
                             shapes, torch.float32, "native", grads)
            runs.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kw", [dict(cls=msgd.FGSGD, grouping="PO", group_size=8, momentum=0.9),
                                dict(cls=msgd.FGSGD, grouping="PO", group_size=5, momentum=0.8,
                                     nesterov=True, adaptive="general", curvature=0.5),
                                dict(cls=msgd.PSISGD, grouping="PO", group_size=3, adaptive="sphere",
                                     momentum=0.9)], ids=["po8", "po5-general", "psi-po3"])
def test_cache_sweep_has_the_group_paths_bits(kw, dtype):
    """An adaptive tensor small beside its bucket is swept twice in memory order (all dots, the
    group scales, all writes); alone in a bucket it is stepped group by group. Same bits, and
    the same rows held back by a bad gradient (the whole group of a NaN row)."""
    kw = dict(kw)
    cls = kw.pop("cls")
    shape = (96, 40)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    grads[1][7, 5] = float("nan")
    results = []
    old = torch.get_num_threads()
    try:
        # one thread: alone, the tensor is the whole bucket (group by group); with 15 others
        # it is 1/16 of the bucket, under the kernel's quarter-of-a-thread's-share limit (swept)
        torch.set_num_threads(1)
        for others in (0, 15):
            params = [w0.clone().requires_grad_()] + [torch.randn(shape, generator=gen).to(dtype).requires_grad_()
                                                      for _ in range(others)]
            opt = cls(params, lr=0.2, backend="native", **kw)
            for g in grads:
                for p in params:
                    p.grad = g
                with pytest.warns(RuntimeWarning) if g.isnan().any() else _no_warning():
                    opt.step()
            results.append((params[0].detach().clone(), opt.state[params[0]]["momentum_buffer"].clone(),
                            opt.skipped_rows))
    finally:
        torch.set_num_threads(old)
    (wa, ma, skipped_alone), (wb, mb, skipped_swept) = results
    assert torch.equal(wa, wb) and torch.equal(ma, mb)
    assert not torch.equal(wa, w0)
    group = kw["group_size"]
    assert skipped_alone == group and skipped_swept == 16 * group  # the NaN row's group, per tensor


def test_a_wholly_held_swept_tensor_leaves_the_next_ones_stepped():
    """A thread's swept tensors are pipelined (sweep 1 of the next beside sweep 2 of this one):
    a tensor whose every group is held (NaN gradient everywhere) still completes the next
    tensor's sweep 1, and every other tensor steps bitwise as in a run where it is finite."""
    shape, n, bad = (96, 40), 16, 3
    gen = torch.Generator().manual_seed(4)
    w0 = [torch.randn(shape, generator=gen) for _ in range(n)]
    grads = [torch.randn(shape, generator=gen) for _ in range(n)]
    results = []
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one thread sweeps all 16 (each 1/16 of the bucket)
        for nan in (False, True):
            params = [w.clone().requires_grad_() for w in w0]
            opt = msgd.FGSGD(params, lr=0.2, momentum=0.9, grouping="PO", group_size=8, backend="native")
            placed = [p.detach().clone() for p in params]  # rows on the sphere
            for _ in range(2):
                for i, p in enumerate(params):
                    p.grad = torch.full(shape, float("nan")) if nan and i == bad else grads[i]
                with pytest.warns(RuntimeWarning) if nan else _no_warning():
                    opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(old)
    finite, held = results
    assert torch.equal(held[bad], placed[bad])
    for i in range(n):
        if i != bad:
            assert torch.equal(finite[i], held[i]), i
            assert not torch.equal(held[i], placed[i]), i


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_many_tensors_one_call():
    """Hundreds of tensors of mixed kinds in one bucket (one native call) match the reference."""
    shapes = [(int(torch.randint(1, 9, ())), int(torch.randint(1, 40, ()))) for _ in range(300)]
    shapes += [(int(torch.randint(1, 50, ())),) for _ in range(50)]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(2)]
    pn, _ = _run(msgd.FGSGD, dict(momentum=0.9, grouping="PO", group_size=3), shapes, torch.float64, "native", grads)
    pr, _ = _run(msgd.FGSGD, dict(momentum=0.9, grouping="PO", group_size=3), shapes, torch.float64, "reference", grads)
    for a, b in zip(pn, pr):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float64])


_THREADS_SCRIPT = """
import sys, torch, manifold_sgd as msgd
torch.set_num_threads(2)
torch.manual_seed(0)
torch.ones(1000, 1000).sum()  # a PyTorch parallel op first, as in training
ws = [torch.randn(s).requires_grad_() for s in [(64, 2048), (300, 512), (37, 3, 3, 3)]]
for kw in (dict(cls=msgd.UNSGD, momentum=0.9), dict(cls=msgd.FGSGD, grouping="PO", group_size=5, momentum=0.9)):
    cls = kw.pop("cls")
    params = [w.detach().clone().requires_grad_() for w in ws]
    opt = cls(params, lr=0.1, backend="native", **kw)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    torch.save([p.detach() for p in params], sys.argv[1] + cls.__name__)
print(msgd.native_info()["cpu_parallel"])
"""


def test_same_bits_with_openmp_team_or_own_threads(tmp_path):
    # the kernel's threads come from a loaded OpenMP runtime when there is one, else
    # std::thread (MANIFOLD_SGD_CPU_PARALLEL=threads): the results do not depend on it
    import os
    import subprocess
    import sys

    backends = {}
    for choice in ("auto", "threads"):
        env = dict(os.environ, MANIFOLD_SGD_CPU_PARALLEL=choice)
        out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(tmp_path / choice)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        backends[choice] = out.stdout.strip().splitlines()[-1]
    assert backends["threads"] == "std::thread"
    assert backends["auto"] == "std::thread" or backends["auto"].startswith("openmp:")
    for name in ("UNSGD", "FGSGD"):
        a, b = torch.load(tmp_path / f"auto{name}"), torch.load(tmp_path / f"threads{name}")
        for x, y in zip(a, b):
            assert torch.equal(x, y)
