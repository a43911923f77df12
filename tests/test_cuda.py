"""The CUDA kernel against the reference path on the GPU and the CPU kernel (SPEC §5).

Every test here needs a CUDA GPU and an extension built with its CUDA kernels
(``MANIFOLD_SGD_CUDA=ON``); without them the module is skipped.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from manifold_sgd import ManifoldAdam, ManifoldSGD, _native, reference
from manifold_sgd.reference import AdamOptions, StepOptions

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _native.cuda_compiled(), reason="extension built without its CUDA kernels"),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# relative tolerance on max |a - b| / max |b| per tensor (SPEC §5; 16-bit: a few storage steps)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}
MOMENTUM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}
ODD_LENGTHS = [1, 3, 9, 31, 4097, 66000]

FAMILIES = {
    "un": dict(manifold="sphere"),
    "un_momentum": dict(manifold="sphere", momentum=0.9),
    "nesterov": dict(manifold="sphere", momentum=0.9, nesterov=True),
    "psi": dict(manifold="psi", momentum=0.9, psi_max_norm=1.5),
    "euclid_wd": dict(manifold="euclidean", momentum=0.9, weight_decay=0.01),
    "auto_wd": dict(manifold="auto", momentum=0.5, weight_decay=0.01),
    "fg_sphere_tensor": dict(manifold="sphere", adaptive="sphere", grouping="tensor"),
    "fg_general_po": dict(manifold="sphere", adaptive="general", grouping="PO", group_size=2,
                          curvature=0.7, distance=1.3, momentum=0.5),
    "fg_psi_row": dict(manifold="psi", adaptive="sphere", grouping="row", momentum=0.9),
}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(b).all()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _shapes(lengths, rows=3):
    return [(rows if n < 4096 else 2, n) for n in lengths] + [(7,), (5, 2, 3, 3)]


def _run(shapes, dtype, device, backend, options, steps=3, seed=0, lr=0.05, grad_none=()):
    """Steps a fresh optimizer; returns params and momentum buffers on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    init = []
    for s in shapes:
        w = torch.randn(s, generator=gen, dtype=torch.float64)
        rows = s[0] if len(s) > 1 else 1
        w = w / w.reshape(rows, -1).norm(dim=1).reshape((rows,) + (1,) * (len(s) - 1)).clamp_min(1e-3)
        init.append(w)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 0.3 for s in shapes] for _ in range(steps)]
    params = [torch.nn.Parameter(w.to(dtype).to(device)) for w in init]
    opt = ManifoldSGD(params, lr=lr, backend=backend, **options)
    for k in range(steps):
        for i, (p, g) in enumerate(zip(params, grads[k])):
            p.grad = None if i in grad_none else g.to(dtype).to(device)
        opt.step()
    moms = [opt.state[p].get("momentum_buffer") for p in params]
    return ([p.detach().cpu() for p in params],
            [None if m is None else m.detach().cpu() for m in moms])


def _compare(got, want, dtype, what):
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert _max_rel(a, b) <= TOL[dtype], f"{what}: param {i} differs by {_max_rel(a, b)}"
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        if b is not None:
            assert _max_rel(a, b) <= MOMENTUM_TOL[dtype], f"{what}: momentum {i} differs by {_max_rel(a, b)}"


def _assert_one_bf16_step_apart(got, want):
    """bf16 weights after one step with stochastic rounding, CUDA kernel vs CPU kernel: both draw the
    same bits, so they differ by at most one bf16 step, and only where float32 results straddle a
    rounding threshold (at most 2 elements, or 1 in 200)."""
    total = differ = 0
    for i, (a, b) in enumerate(zip(got, want)):
        u = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
        assert int(u.max()) <= 1, f"param {i}: {int(u.max())} bf16 steps apart"
        total, differ = total + u.numel(), differ + int((u > 0).sum())
    assert differ <= max(2, total // 200), f"{differ} of {total} elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_reference_and_cpu_kernel(family, dtype):
    options = FAMILIES[family]
    shapes = _shapes(ODD_LENGTHS)
    if options.get("grouping") == "PO":
        shapes = [s for s in shapes if len(s) >= 2]
    cuda = _run(shapes, dtype, "cuda", "native", options)
    ref = _run(shapes, dtype, "cuda", "reference", options)
    cpu = _run(shapes, dtype, "cpu", "native", options)
    _compare(cuda, ref, dtype, f"{family}: CUDA kernel vs reference on the GPU")
    _compare(cuda, cpu, dtype, f"{family}: CUDA kernel vs CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_kernel_granularity_pi_groups(dtype):
    options = dict(manifold="sphere", granularity="kernel", grouping="PI", group_size=5, adaptive="sphere",
                   momentum=0.9)
    shapes = [(8, 16, 3, 3), (4, 3, 5, 5), (6, 600, 3, 3)]
    _compare(_run(shapes, dtype, "cuda", "native", options), _run(shapes, dtype, "cpu", "native", options),
             dtype, "kernel/PI")


def test_many_tensors():
    gen = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(1, 3000, (120,), generator=gen)]
    shapes = [(int(torch.randint(1, 9, (1,), generator=gen)), n) for n in lengths]
    options = dict(manifold="sphere", momentum=0.9)
    _compare(_run(shapes, torch.float32, "cuda", "native", options),
             _run(shapes, torch.float32, "cuda", "reference", options), torch.float32, "120 tensors")


def test_params_without_grad_are_left_alone():
    shapes = _shapes([9, 31, 4097])
    options = dict(manifold="sphere", momentum=0.9)
    got = _run(shapes, torch.float32, "cuda", "native", options, grad_none=(1, 3))
    want = _run(shapes, torch.float32, "cpu", "native", options, grad_none=(1, 3))
    _compare(got, want, torch.float32, "grad None")
    gen = torch.Generator().manual_seed(0)
    for i, s in enumerate(shapes):  # the same draws as _run: untouched tensors keep their start
        w = torch.randn(s, generator=gen, dtype=torch.float64)
        if i in (1, 3):
            rows = s[0] if len(s) > 1 else 1
            w = w / w.reshape(rows, -1).norm(dim=1).reshape((rows,) + (1,) * (len(s) - 1)).clamp_min(1e-3)
            placed = w / w.reshape(rows, -1).norm(dim=1).reshape((rows,) + (1,) * (len(s) - 1))
            torch.testing.assert_close(got[0][i].double(), placed.float().double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["un_momentum", "fg_general_po", "psi"])
def test_bitwise_deterministic(family):
    shapes = _shapes(ODD_LENGTHS)
    a = _run(shapes, torch.float32, "cuda", "native", FAMILIES[family])
    b = _run(shapes, torch.float32, "cuda", "native", FAMILIES[family])
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        if x is not None:
            assert torch.equal(x, y)


def _bucket(shapes, kind, dtype, device):
    rows = [s[0] for s in shapes]
    lens = [s[1] for s in shapes]
    orders = [torch.arange(r) for r in rows]
    sizes = [torch.ones(r, dtype=torch.int64) for r in rows]
    return _native.NativeBucket(rows, lens, [kind] * len(shapes), orders, sizes, [None] * len(shapes), dtype)


def test_nonfinite_gradient_rows_skipped_and_reported():
    shapes = [(6, 9), (3, 4097), (2, 66000)]
    gen = torch.Generator().manual_seed(5)
    ws = [torch.nn.functional.normalize(torch.randn(s, generator=gen), dim=1) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    gs[0][4, 2] = float("nan")
    gs[1][1, 100] = float("inf")
    gs[2][0, 65999] = float("nan")
    opt = StepOptions(lr=0.1, momentum=0.9)
    reports = {}
    outs = {}
    for dev in ("cpu", "cuda"):
        w = [x.clone().to(dev) for x in ws]
        g = [x.clone().to(dev) for x in gs]
        m = [torch.zeros_like(x) for x in w]
        b = _bucket(shapes, "sphere", torch.float32, dev)
        reports[dev] = b.run(w, g, m, [True] * 3, opt).cpu().clone()
        outs[dev] = [x.cpu() for x in w]
    assert torch.equal(reports["cpu"], reports["cuda"])
    assert reports["cuda"].tolist() == [[1, 4], [1, 1], [1, 0]]
    assert torch.equal(outs["cuda"][0][4], ws[0][4]) and torch.equal(outs["cuda"][2][0], ws[2][0])
    for a, b in zip(outs["cuda"], outs["cpu"]):
        assert _max_rel(a, b) <= 1e-5


def test_report_accumulates_until_taken():
    shapes = [(4, 33)]
    w = [torch.nn.functional.normalize(torch.randn(4, 33), dim=1).cuda()]
    g = [torch.randn(4, 33).cuda()]
    g[0][2, 0] = float("nan")
    b = _bucket(shapes, "sphere", torch.float32, "cuda")
    opt = StepOptions(lr=0.1)
    for _ in range(3):
        b.run(w, g, [None], [False], opt, reset_report=False)
    assert b.take_report().tolist() == [[3, 2]]
    assert b.report.cpu().tolist() == [[0, -1]]


# Stiefel blocks (csrc/cuda/fused_stiefel_kernels.cuh): conv kernels 1x1 ... 7x7 (the fixed-size
# paths), 1 x 5 conv1d kernels and a 32 x 40 matrix (the scratch path); a 40 x 48 matrix (p > 32)
# stays on the reference path in the same optimizer
STIEFEL_FAMILIES = {
    "qr": dict(retraction="qr"),
    "polar_momentum": dict(retraction="polar", momentum=0.9),
    "qr_nesterov": dict(retraction="qr", momentum=0.9, nesterov=True),
    "fg_general_po": dict(retraction="polar", adaptive="general", grouping="PO", group_size=2, curvature=0.7,
                          distance=1.3, momentum=0.5),
    "fg_sphere_tensor": dict(retraction="qr", adaptive="sphere", grouping="tensor", momentum=0.9),
}


def _run_stiefel(dtype, device, backend, options, steps=3, seed=0, lr=0.05):
    gen = torch.Generator().manual_seed(seed)
    kernels = [(8, 4, 1, 1), (6, 4, 3, 3), (4, 2, 5, 5), (3, 2, 7, 7), (8, 4, 5)]
    matrices = [(32, 40), (40, 48)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in kernels + matrices]
    grads = [[torch.randn(w.shape, generator=gen, dtype=torch.float64) * 0.3 for w in init] for _ in range(steps)]
    params = [torch.nn.Parameter(w.to(dtype).to(device)) for w in init]
    grouped = {k: v for k, v in options.items() if k in ("grouping", "group_size")}
    rest = {k: v for k, v in options.items() if k not in grouped}
    groups = [dict(params=params[:len(kernels)], manifold="stiefel", granularity="kernel", **grouped),
              dict(params=params[len(kernels):], manifold="stiefel", granularity="filter")]
    opt = ManifoldSGD(groups, lr=lr, backend=backend, **rest)
    for k in range(steps):
        for p, g in zip(params, grads[k]):
            p.grad = g.to(dtype).to(device)
        opt.step()
    moms = [opt.state[p].get("momentum_buffer") for p in params]
    return ([p.detach().cpu() for p in params],
            [None if m is None else m.detach().cpu() for m in moms])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family", list(STIEFEL_FAMILIES))
def test_stiefel_blocks_match_reference_and_cpu_kernel(family, dtype):
    options = STIEFEL_FAMILIES[family]
    cuda = _run_stiefel(dtype, "cuda", "auto", options)
    ref = _run_stiefel(dtype, "cuda", "reference", options)
    cpu = _run_stiefel(dtype, "cpu", "auto", options)
    _compare(cuda, cpu, dtype, f"stiefel {family}: CUDA kernel vs CPU kernel")  # the same formulas
    # vs the reference: as tests/test_stiefel_sizes.py's known case, the float32 polar factor through
    # the p x p Gram matrix (kernels) vs the reference's leaves momentum differences of a few 1e-6 on
    # the 32 x 40 block; the weights are held to SPEC §5
    for i, (a, b) in enumerate(zip(cuda[0], ref[0])):
        assert _max_rel(a, b) <= TOL[dtype], f"stiefel {family}: param {i} differs from the reference"
    mtol = MOMENTUM_TOL[dtype] * (10 if dtype == torch.float32 and options["retraction"] == "polar" else 1)
    for i, (a, b) in enumerate(zip(cuda[1], ref[1])):
        if b is not None:
            assert _max_rel(a, b) <= mtol, f"stiefel {family}: momentum {i} differs from the reference"
    for w, shape in zip(cuda[0][:4], [(1, 1), (3, 3), (5, 5), (7, 7)]):  # rows orthonormal (SPEC §2)
        blocks = w.double().reshape(-1, *shape)
        gram = blocks @ blocks.transpose(1, 2)
        tol = 1e-5 if dtype == torch.float32 else 1e-12 if dtype == torch.float64 else 3e-2
        assert float((gram - torch.eye(shape[0], dtype=torch.float64)).abs().max()) <= tol


def test_stiefel_blocks_take_the_cuda_kernel_in_one_launch():
    shapes = [(16, 8, 3, 3), (8, 4, 1, 1), (40, 48)]
    w = [torch.nn.Parameter(torch.randn(s).cuda()) for s in shapes]
    opt = ManifoldSGD([dict(params=w[:2], manifold="stiefel", granularity="kernel"),
                       dict(params=w[2:], manifold="stiefel", granularity="filter")], lr=0.05, momentum=0.9)
    for p in w:
        p.grad = torch.randn_like(p)
    opt.step()
    kernels, matrix = (opt._plans[gi].buckets for gi in (0, 1))
    assert [b.backend for b in kernels] == ["native"] and kernels[0].native.launches == 1
    assert [b.backend for b in matrix] == ["reference"]  # a 40 x 48 block: p > 32


def test_launches_per_bucket():
    small = _bucket([(100, 9), (30, 200), (4, 4097)], "sphere", torch.float32, "cuda")
    w = [torch.nn.functional.normalize(torch.randn(s), dim=1).cuda() for s in [(100, 9), (30, 200), (4, 4097)]]
    g = [torch.randn_like(x) for x in w]
    small.run(w, g, [None] * 3, [False] * 3, StepOptions(lr=0.1))
    assert small.launches == 1
    big = _bucket([(2, 66000), (3, 9)], "sphere", torch.float32, "cuda")
    w = [torch.nn.functional.normalize(torch.randn(s), dim=1).cuda() for s in [(2, 66000), (3, 9)]]
    g = [torch.randn_like(x) for x in w]
    big.run(w, g, [None] * 2, [False] * 2, StepOptions(lr=0.1))
    assert big.launches == 3


def test_stochastic_rounding_is_unbiased():
    # w = 1 in bf16 (step below 1 is 2^-8); an update of -1e-4 is lost by round-to-nearest,
    # while stochastic rounding moves w down one step with probability 1e-4 / 2^-8.
    n = 1 << 20
    b = _bucket([(1, n)], "euclidean", torch.bfloat16, "cuda")
    opt = StepOptions(lr=1e-4)
    g = [torch.ones(1, n, dtype=torch.bfloat16, device="cuda")]
    w_rn = [torch.ones(1, n, dtype=torch.bfloat16, device="cuda")]
    b.run(w_rn, g, [None], [False], opt)
    assert torch.equal(w_rn[0], torch.ones_like(w_rn[0]))
    means = []
    for step in range(4):
        w = [torch.ones(1, n, dtype=torch.bfloat16, device="cuda")]
        b.run(w, g, [None], [False], opt, rounding_keys=[reference.rounding_key(7, step, 0)])
        vals = w[0].float()
        assert set(torch.unique(vals).tolist()) <= {1.0, 1.0 - 2.0 ** -8}
        means.append(float(vals.double().mean()) - 1.0)
    p = 1e-4 / 2.0 ** -8
    sigma = 2.0 ** -8 * (p * (1 - p) / n) ** 0.5
    for mu in means:
        assert abs(mu + 1e-4) < 5 * sigma, (mu, sigma)
    # the draws depend on (seed, step): two steps differ, the same step repeats
    w1 = [torch.ones(1, n, dtype=torch.bfloat16, device="cuda")]
    w2 = [torch.ones(1, n, dtype=torch.bfloat16, device="cuda")]
    b.run(w1, g, [None], [False], opt, rounding_keys=[reference.rounding_key(7, 0, 0)])
    b.run(w2, g, [None], [False], opt, rounding_keys=[reference.rounding_key(7, 0, 0)])
    assert torch.equal(w1[0], w2[0])
    # the same bits as the CPU kernel and the reference path
    w_cpu = [torch.ones(1, n, dtype=torch.bfloat16)]
    _bucket([(1, n)], "euclidean", torch.bfloat16, "cpu").run(
        w_cpu, [g[0].cpu()], [None], [False], opt, rounding_keys=[reference.rounding_key(7, 0, 0)])
    assert torch.equal(w1[0].cpu(), w_cpu[0])
    w_ref = torch.ones(1, n, dtype=torch.bfloat16)
    reference.step_rows(w_ref, g[0].cpu(), None, kind="euclidean", fresh=False, group_ids=None, n_groups=0,
                        radius=None, opt=opt, rounding_key=reference.rounding_key(7, 0, 0))
    assert torch.equal(w1[0].cpu(), w_ref)


@pytest.mark.parametrize("family", ["un_momentum", "fg_general_po", "psi", "euclid_wd"])
def test_optimizer_stochastic_rounding_matches_cpu_kernel(family):
    """stochastic_rounding=True: the CUDA kernel draws the CPU kernel's bits (per parameter
    position and step), so one step agrees to one bf16 step where float32 results straddle a
    rounding threshold; later steps stay within bf16 tolerance."""
    options = dict(FAMILIES[family], stochastic_rounding=True, rounding_seed=9)
    shapes = [s for s in _shapes([9, 31, 4097, 66000]) if len(s) >= 2]
    one = {dev: _run(shapes, torch.bfloat16, dev, "native", options, steps=1) for dev in ("cuda", "cpu")}
    _assert_one_bf16_step_apart(one["cuda"][0], one["cpu"][0])
    _compare(_run(shapes, torch.bfloat16, "cuda", "native", options),
             _run(shapes, torch.bfloat16, "cpu", "native", options), torch.bfloat16, f"{family} with rounding")


def test_optimizer_steps_never_synchronise_and_skips_are_counted_later():
    """ManifoldSGD on a GPU: after the first step (plan upload), a step issues no
    synchronisation, also with non-finite gradients and stochastic rounding; the skipped rows
    are counted (and warned) when skipped_rows is read."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 9), (4, 4097), (2, 66000)]
    f32 = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    b16 = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16).cuda()) for s in shapes]
    opt = ManifoldSGD([{"params": f32}, {"params": b16, "stochastic_rounding": True}], lr=0.05, momentum=0.9,
                      manifold="sphere", backend="native")
    grads = []
    for k in range(4):
        gs = [torch.randn(p.shape, generator=gen).to(p.dtype).cuda() for p in f32 + b16]
        if k == 2:
            gs[0][5, 3] = float("nan")  # f32[0], row 5
            gs[4][1, 7] = float("inf")  # b16[1], row 1
        grads.append(gs)
    for p, g in zip(f32 + b16, grads[0]):
        p.grad = g
    opt.step()  # builds and uploads the plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads[1:]:
            for p, g in zip(f32 + b16, gs):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in f32 + b16)
    with pytest.warns(RuntimeWarning) as rec:
        assert opt.skipped_rows == 2
    msgs = sorted(str(r.message) for r in rec)
    assert len(msgs) == 2 and "first: row 5" in " ".join(msgs) and "first: row 1" in " ".join(msgs)
    assert opt.skipped_rows == 2
    assert all(opt.state[p]["rounding_step"] == 4 for p in b16)


def test_no_host_synchronisation_in_steady_state():
    """A steady-state step is capturable in a CUDA graph: it neither syncs nor allocates per step."""
    shapes = [(8, 9), (4, 4097), (2, 66000)]
    params = [torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(s), dim=1).cuda()) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    b = _native.NativeBucket([s[0] for s in shapes], [s[1] for s in shapes], ["sphere"] * 3,
                             [torch.arange(s[0]) for s in shapes],
                             [torch.ones(s[0], dtype=torch.int64) for s in shapes], [None] * 3, torch.float32)
    moms = [torch.zeros_like(p) for p in params]
    o = StepOptions(lr=0.01, momentum=0.9)
    b.run([p.detach() for p in params], [p.grad for p in params], moms, [False] * 3, o, reset_report=False)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        b.run([p.detach() for p in params], [p.grad for p in params], moms, [False] * 3, o, reset_report=False)
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_state_dict_round_trip_across_backends():
    shapes = _shapes([9, 4097])
    options = FAMILIES["un_momentum"]
    params = [torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(s).reshape(s[0], -1), dim=1)
                                 .reshape(s).cuda()) for s in shapes if len(s) >= 2]
    opt = ManifoldSGD(params, lr=0.05, backend="native", **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    cpu_params = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt_cpu = ManifoldSGD(cpu_params, lr=0.05, backend="native", **options)
    opt_cpu.load_state_dict(state)
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, cpu_params, grads):
        p.grad, q.grad = g, g.cpu()
    opt.step()
    opt_cpu.step()
    for p, q in zip(params, cpu_params):
        assert _max_rel(p.detach(), q.detach()) <= 1e-5


def test_steady_state_steps_do_not_synchronise():
    """After the first step (plan upload), steps never synchronise, also when addresses change."""
    shapes = [(16, 9), (4, 4097), (2, 66000)]
    b = _bucket(shapes, "sphere", torch.float32, "cuda")
    w = [torch.nn.functional.normalize(torch.randn(s, device="cuda"), dim=1) for s in shapes]
    m = [torch.zeros_like(x) for x in w]
    o = StepOptions(lr=0.01, momentum=0.9)
    b.run(w, [torch.randn_like(x) for x in w], m, [True] * 3, o, reset_report=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # new gradient tensors each step: the table is uploaded again
            b.run(w, [torch.randn_like(x) for x in w], m, [False] * 3, o, reset_report=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert b.take_report().tolist() == [[0, -1]] * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_misaligned_storage_takes_the_element_path(dtype):
    """Parameters that are views at an odd offset (flat parameter buffers): same result as the CPU."""
    shapes = [(5, 64), (3, 4096), (2, 20000)]
    outs = {}
    for dev in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(11)
        flat = torch.randn(sum(a * b for a, b in shapes) + 1, generator=gen).to(dtype).to(dev)
        views, k = [], 1
        for a, b in shapes:
            views.append(flat[k:k + a * b].view(a, b))
            k += a * b
        params = [torch.nn.Parameter(v) for v in views]  # shares the misaligned storage
        opt = ManifoldSGD(params, lr=0.05, momentum=0.9, manifold="sphere", backend="native")
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(dev)
            opt.step()
        outs[dev] = [p.detach().cpu() for p in params]
    for a, b in zip(outs["cuda"], outs["cpu"]):
        assert _max_rel(a, b) <= TOL[dtype]


# ---- the Adam family (csrc/cuda/fused_adam_kernels.cuh; SPEC §6) ------------------------------

def _run_adam(shapes, dtype, device, backend, options, steps=4, seed=0, lr=0.02, nan_at=None):
    """Steps a fresh ManifoldAdam (a few steps: the bias corrections and both moments move);
    returns params, exp_avg, exp_avg_sq on the CPU, the optimizer and its params."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 0.3 for s in shapes] for _ in range(steps)]
    if nan_at is not None:  # (step, tensor, index): a non-finite gradient element
        k, i, idx = nan_at
        grads[k][i][idx] = float("nan")
    params = [torch.nn.Parameter(w.to(dtype).to(device)) for w in init]
    opt = ManifoldAdam(params, lr=lr, backend=backend, **options)
    for k in range(steps):
        for p, g in zip(params, grads[k]):
            p.grad = g.to(dtype).to(device)
        opt.step()
    st = [opt.state[p] for p in params]
    return ([p.detach().cpu() for p in params], [s["exp_avg"].cpu() for s in st],
            [s["exp_avg_sq"].cpu() for s in st], opt, params)


ADAM_FAMILIES = {
    "row": dict(second_moment="row"),
    "element": dict(second_moment="element"),
    "auto_wd_row": dict(manifold="auto", weight_decay=0.05, betas=(0.8, 0.95), eps=1e-7),
    "euclid_adamw": dict(manifold="euclidean", weight_decay=0.1),
}


def _adam_tol(dtype, family):
    # float32 with v per element: an element whose g~ cancels near eps is set by its last bits (the
    # emulator check measures 2.6e-5 between the kernels); 16-bit: a few storage steps
    if dtype == torch.float32 and ADAM_FAMILIES[family].get("second_moment") == "element":
        return 1e-4
    return TOL[dtype]


def _compare_adam(got, want, dtype, family, what):
    tol = _adam_tol(dtype, family)
    mtol = max(tol, MOMENTUM_TOL[dtype])
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert _max_rel(a, b) <= tol, f"{what}: param {i} differs by {_max_rel(a, b)}"
    for key, gi, wi in (("exp_avg", got[1], want[1]), ("exp_avg_sq", got[2], want[2])):
        for i, (a, b) in enumerate(zip(gi, wi)):
            assert a.shape == b.shape, f"{what}: {key} {i} has shape {tuple(a.shape)}, not {tuple(b.shape)}"
            assert _max_rel(a, b) <= mtol, f"{what}: {key} {i} differs by {_max_rel(a, b)}"
    assert all(got[3].state[p]["step"] == want[3].state[q]["step"] for p, q in zip(got[4], want[4]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family", list(ADAM_FAMILIES))
def test_adam_matches_reference_and_cpu_kernel(family, dtype):
    options = ADAM_FAMILIES[family]
    shapes = _shapes(ODD_LENGTHS)
    cuda = _run_adam(shapes, dtype, "cuda", "native", options)
    assert all(b.backend == "native" for plan in cuda[3]._plans.values() for b in plan.buckets)
    ref = _run_adam(shapes, dtype, "cuda", "reference", options)
    cpu = _run_adam(shapes, dtype, "cpu", "native", options)
    _compare_adam(cuda, ref, dtype, family, f"Adam {family}: CUDA kernel vs reference on the GPU")
    _compare_adam(cuda, cpu, dtype, family, f"Adam {family}: CUDA kernel vs CPU kernel")
    if options.get("manifold", "auto") != "euclidean" and dtype in (torch.float32, torch.float64):
        for p in cuda[0]:  # sphere rows stay on their sphere (SPEC §5); 1-D tensors are Euclidean
            if p.dim() >= 2:
                norms = p.double().flatten(1).norm(dim=1)
                assert float((norms - 1).abs().max()) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_adam_nonfinite_gradient_rows_keep_w_m_v_and_are_counted():
    shapes = [(6, 9), (3, 4097), (2, 66000), (66000,)]
    options = dict(second_moment="element")
    for nan_at, skipped in (((2, 0, (4, 2)), 1), ((3, 2, (1, 65999)), 1), ((1, 3, (17,)), 1)):
        cuda = _run_adam(shapes, torch.float32, "cuda", "native", options, nan_at=nan_at)
        cpu = _run_adam(shapes, torch.float32, "cpu", "native", options, nan_at=nan_at)
        _compare_adam(cuda, cpu, torch.float32, "element", f"NaN at {nan_at}")
        with pytest.warns(RuntimeWarning, match="left unchanged"):
            assert cuda[3].skipped_rows == skipped
        assert all(torch.isfinite(x).all() for x in cuda[0] + cuda[1] + cuda[2])


def test_adam_launches_per_bucket():
    opt = AdamOptions(lr=0.01)
    for shapes, kind, launches in (([(100, 9), (30, 200), (4, 4097)], "sphere", 1),
                                   ([(2, 66000), (3, 9)], "sphere", 3), ([(2, 66000)], "euclidean", 2)):
        b = _bucket(shapes, kind, torch.float32, "cuda")
        w = [torch.nn.functional.normalize(torch.randn(s), dim=1).cuda() for s in shapes]
        g = [torch.randn_like(x) for x in w]
        m = [torch.zeros_like(x) for x in w]
        v = [torch.zeros(s[0] if kind == "sphere" else s[0] * s[1], device="cuda") for s in shapes]
        b.run(w, g, m, [True] * len(shapes), opt, second_moments=v, step_counts=[1] * len(shapes))
        assert b.launches == launches, (shapes, kind)


def test_adam_stochastic_rounding_matches_cpu_kernel():
    options = dict(second_moment="row", stochastic_rounding=True, rounding_seed=5)
    shapes = [s for s in _shapes([9, 31, 4097, 66000]) if len(s) >= 2] + [(300,)]
    one = {dev: _run_adam(shapes, torch.bfloat16, dev, "native", options, steps=1) for dev in ("cuda", "cpu")}
    _assert_one_bf16_step_apart(one["cuda"][0], one["cpu"][0])
    _compare_adam(_run_adam(shapes, torch.bfloat16, "cuda", "native", options),
                  _run_adam(shapes, torch.bfloat16, "cpu", "native", options), torch.bfloat16, "row", "rounded")


def test_adam_steps_never_synchronise_and_order_across_streams():
    """ManifoldAdam on a GPU: after the first step (plan upload) a step issues no synchronisation
    (its table, with the new step count, is uploaded without one), also with a NaN gradient and
    stochastic rounding; a step on another stream waits for the previous one."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 9), (4, 4097), (2, 66000), (33,)]
    f32 = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    b16 = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16).cuda()) for s in shapes]
    twin = [torch.nn.Parameter(p.detach().cpu().clone()) for p in f32]
    opt = ManifoldAdam([{"params": f32, "second_moment": "element"}, {"params": b16, "stochastic_rounding": True}],
                       lr=0.01, backend="native")
    ref = ManifoldAdam([{"params": twin, "second_moment": "element"}], lr=0.01, backend="native")
    grads = [[torch.randn(p.shape, generator=gen) for p in f32 + b16] for _ in range(4)]
    grads[2][0][5, 3] = float("nan")
    on_gpu = [[g.to(p.dtype).cuda() for p, g in zip(f32 + b16, gs)] for gs in grads]  # copies outside the check
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    for k, gs in enumerate(grads):
        for p, g in zip(f32 + b16, on_gpu[k]):
            p.grad = g
        for p, g in zip(twin, gs):
            p.grad = g.clone()
        if k == 0:
            opt.step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        else:
            try:
                if k == 3:  # on another stream: ordered after the previous step by an event
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        opt.step()
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    opt.step()
            finally:
                if k == len(grads) - 1:
                    torch.cuda.set_sync_debug_mode("default")
        with warnings.catch_warnings():  # the CPU twin warns its skipped row at once
            warnings.simplefilter("ignore", RuntimeWarning)
            ref.step()
    for p, q in zip(f32, twin):
        assert _max_rel(p.detach(), q.detach()) <= 1e-4
    with pytest.warns(RuntimeWarning, match="first: row 5"):
        assert opt.skipped_rows == 1
    assert all(opt.state[p]["step"] == 4 and opt.state[p]["rounding_step"] == 4 for p in b16)


def test_adam_step_cannot_be_captured_in_a_cuda_graph():
    """Every Adam step carries a new step count (the bias corrections) in its table, so it uploads
    the table and refuses a capture (the replay would reuse the captured count)."""
    p = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(8, 33), dim=1).cuda())
    opt = ManifoldAdam([p], lr=0.01, backend="native")
    p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    before = p.detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before)


def test_adam_state_dict_round_trip_across_devices():
    shapes = [(5, 9), (3, 4097), (33,)]
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    opt = ManifoldAdam(params, lr=0.02, second_moment="element", backend="native")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).cuda()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    cpu_params = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    opt_cpu = ManifoldAdam(cpu_params, lr=0.02, second_moment="element", backend="native")
    opt_cpu.load_state_dict(state)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p, q, g in zip(params, cpu_params, grads):
        p.grad, q.grad = g.cuda(), g
    opt.step()
    opt_cpu.step()
    for p, q in zip(params, cpu_params):
        assert _max_rel(p.detach(), q.detach()) <= 1e-4
        assert opt.state[p]["step"] == opt_cpu.state[q]["step"] == 3
