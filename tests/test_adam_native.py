"""The fused CPU Adam step (csrc/cpu/adam_cpu.cpp) against the reference path (SPEC §6), at the
native boundary: every dtype, row kind and second-moment mode, odd row lengths, radii,
non-finite gradients (the row and its moments left as they were) and stochastic rounding."""
import pytest
import torch

import manifold_sgd as msgd
from manifold_sgd import _native, reference
from manifold_sgd.reference import AdamOptions

from conftest import DTYPES, TOL, dtype_id

pytestmark = pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")

SHAPES = [(5, 1), (7, 3), (4, 9), (3, 31), (2, 257), (1, 4097)]


def _bucket(kind, dtype, radii=None):
    rows = [s[0] for s in SHAPES]
    return _native.NativeBucket(rows, [s[1] for s in SHAPES], [kind] * len(SHAPES),
                                [torch.arange(r) for r in rows], [torch.ones(r, dtype=torch.int64) for r in rows],
                                radii or [None] * len(SHAPES), dtype)


def _start(kind, dtype, second_moment, radii):
    md = reference.math_dtype(dtype)
    w = []
    for (r, n), rho in zip(SHAPES, radii):
        x = torch.randn(r, n, dtype=torch.float64)
        if kind == "sphere":
            x = torch.nn.functional.normalize(x, dim=1) * (1.0 if rho is None else rho.double().view(-1, 1))
        w.append(x.to(dtype))
    m = [torch.zeros(s, dtype=md) for s in SHAPES]
    v = [torch.zeros(reference.second_moment_shape(kind, *s, second_moment), dtype=md) for s in SHAPES]
    return w, m, v


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind,second_moment", [("sphere", "row"), ("sphere", "element"), ("euclidean", "row"),
                                                ("euclidean", "element")])
def test_native_adam_equals_reference(kind, second_moment, dtype, one_thread):
    radii = [torch.rand(r) + 0.5 if kind == "sphere" and i % 2 else None for i, (r, _) in enumerate(SHAPES)]
    o = AdamOptions(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1 if kind == "euclidean" else 0.0,
                    second_moment=second_moment)
    w, m, v = _start(kind, dtype, second_moment, radii)
    wr, mr, vr = [x.clone() for x in w], [x.clone() for x in m], [x.clone() for x in v]
    b = _bucket(kind, dtype, radii)
    for t in range(1, 5):
        g = [torch.randn(s).to(dtype) for s in SHAPES]
        if t == 3:
            g[2][1, 4] = float("nan")  # that row (and its m, v) is left as it was
        rep = b.run(w, g, m, [t == 1] * len(SHAPES), o, second_moments=v, step_counts=[t] * len(SHAPES))
        assert rep[:, 0].tolist() == ([0, 0, 1, 0, 0, 0] if t == 3 else [0] * 6)
        for i in range(len(SHAPES)):
            skipped = reference.adam_rows(wr[i], g[i], mr[i], vr[i], kind=kind, step=t, radius=radii[i], opt=o)
            assert int(skipped.sum()) == int(rep[i, 0])
        for a, c in zip(w, wr):
            torch.testing.assert_close(a.double(), c.double(), **TOL[dtype])
        for a, c in zip(m, mr):
            torch.testing.assert_close(a.double(), c.double(), rtol=TOL[dtype]["rtol"],
                                       atol=max(TOL[dtype]["atol"], 1e-6 if dtype != torch.float64 else 1e-12))
        for a, c in zip(v, vr):  # relative to the tensor's largest v (an element's d can be ~0)
            scale = max(float(c.abs().max()), 1e-30)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(a.double() / scale, c.double() / scale, rtol=tol, atol=tol)
    if kind == "sphere":
        for x, rho in zip(w, radii):
            norms = x.double().norm(dim=1)
            want = torch.ones_like(norms) if rho is None else rho.double()
            assert (norms - want).abs().max() <= {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2) * 1.01


def test_native_adam_rounds_bf16_stochastically_like_the_reference(one_thread):
    o = AdamOptions(lr=1e-3, second_moment="row")
    w, m, v = _start("sphere", torch.bfloat16, "row", [None] * len(SHAPES))
    wr, mr, vr = [x.clone() for x in w], [x.clone() for x in m], [x.clone() for x in v]
    g = [torch.randn(s).bfloat16() for s in SHAPES]
    keys = [reference.rounding_key(5, 0, i) for i in range(len(SHAPES))]
    _bucket("sphere", torch.bfloat16).run(w, g, m, [True] * len(SHAPES), o, rounding_keys=keys, second_moments=v,
                                          step_counts=[1] * len(SHAPES))
    differ = 0
    for i in range(len(SHAPES)):
        reference.adam_rows(wr[i], g[i], mr[i], vr[i], kind="sphere", step=1, radius=None, opt=o,
                            rounding_key=keys[i])
        a, c = w[i].view(torch.int16).int(), wr[i].view(torch.int16).int()
        assert (a - c).abs().max() <= 1  # the same bits but where the float32 results straddle a threshold
        differ += int((a != c).sum())
    assert differ * 100 <= sum(x.numel() for x in w)


def test_native_adam_refuses_what_it_cannot_step():
    o = AdamOptions(lr=0.1)
    p, g = [torch.randn(3, 4)], [torch.randn(3, 4)]
    m = [torch.zeros(3, 4)]
    for kind, v, steps, match in (
            ("psi", torch.zeros(3), [1], "PSI rows have no Adam step"),
            ("sphere", torch.zeros(4), [1], "second moment must be a contiguous torch.float32 tensor of 3 values"),
            ("sphere", torch.zeros(3), [0], "step count must be an int >= 1"),
            ("stiefel", torch.zeros(3), [1], "second moment must be a contiguous torch.float32 tensor of 1 values")):
        rows = 1 if kind == "stiefel" else 3
        b = _native.NativeBucket([rows], [12 // rows], [kind], [torch.arange(rows)],
                                 [torch.ones(rows, dtype=torch.int64)], [None], torch.float32,
                                 block_rows=[3] if kind == "stiefel" else None, names=["model.w"])
        before = p[0].clone()
        with pytest.raises(ValueError, match=match):
            b.run(p, g, m, [True], o, second_moments=[v], step_counts=steps)
        assert torch.equal(before, p[0])
    bad_beta = _native.step_options(AdamOptions(lr=0.1, betas=(1.0, 0.9)))
    with pytest.raises(ValueError, match="beta1 must be in"):
        _native._C.fused_step_cpu(_bucket("sphere", torch.float32)._step_tables(), bad_beta, 1, 1)
    assert "eps must be" in _native.step_options(AdamOptions(lr=0.1, eps=0.0)).validate()
    with_momentum = _native.step_options(AdamOptions(lr=0.1))
    with_momentum.momentum = 0.9
    assert "momentum and nesterov are SGD's" in with_momentum.validate()


@pytest.mark.parametrize("second_moment", ["row", "element"])
def test_native_adam_skips_the_rows_the_reference_skips(second_moment, one_thread):
    # element v: the first pass sums no <g,g>; a non-finite g must still show in <w,g> (also
    # where w is 0), and a finite g whose square overflows in v' must still skip its row
    o = AdamOptions(lr=0.01, second_moment=second_moment)
    shape = (6, 37)
    w = [torch.nn.functional.normalize(torch.randn(shape, dtype=torch.float64), dim=1).float()]
    w[0][3, 5] = 0.0
    m, v = [torch.zeros(shape)], [torch.zeros(reference.second_moment_shape("sphere", *shape, second_moment))]
    b = _native.NativeBucket([shape[0]], [shape[1]], ["sphere"], [torch.arange(shape[0])],
                             [torch.ones(shape[0], dtype=torch.int64)], [None], torch.float32)
    wr, mr, vr = w[0].clone(), m[0].clone(), v[0].clone()
    for t in (1, 2):
        g = torch.randn(shape)
        g[1, 2] = float("inf")
        g[2, 36] = float("-inf")
        g[3, 5] = float("inf")  # where w is 0: <w,g> gets 0 * inf
        g[4, 7] = 1e30  # finite, (1 - beta2) g g is not
        rep = b.run(w, [g], m, [t == 1], o, second_moments=v, step_counts=[t])
        skipped = reference.adam_rows(wr, g, mr, vr, kind="sphere", step=t, radius=None, opt=o)
        assert skipped.tolist() == [False, True, True, True, True, False]
        assert int(rep[0, 0]) == int(skipped.sum())
        torch.testing.assert_close(w[0], wr, **TOL[torch.float32])
        torch.testing.assert_close(m[0], mr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v[0], vr, rtol=1e-5, atol=1e-12)
