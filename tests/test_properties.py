"""Property tests (hypothesis): random shapes, dtypes, options and gradient scales (huge,
tiny, zero, non-finite); every step keeps the SPEC §5 invariants, and the native path
equals the reference path. Bounded: 50 examples, no deadline."""
import math
import os
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import NORM_TOL, TOL

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# "ci" keeps the suite fast; MSGD_HYPOTHESIS_PROFILE=explore runs many more examples
settings.register_profile("ci", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("MSGD_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# gradient scales: ordinary, huge (squares still fit float32; fp16 overflows to inf), tiny, zero
SCALES = [1.0, 1e12, 1e-30, 0.0, 1e-3]
# |<w_i, m_i>| / (|w_i| |m_i|) after transport; 16-bit rows are rounded after it
ORTH_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 6]), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["sphere", "psi", "euclidean", "auto"]))
    grans = ["filter", "tensor"] + (["last"] if ndim >= 2 else []) + (["kernel"] if ndim >= 3 else [])
    gran = draw(st.sampled_from(grans))
    groupings = ["row", "tensor"] + (["PO"] if gran in ("filter", "kernel") and ndim >= 2 else []) + (
        ["PI", "PIO"] if gran == "kernel" else [])
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    opts = dict(
        manifold=kind, granularity=gran, grouping=draw(st.sampled_from(groupings)),
        group_size=draw(st.sampled_from([None, 1, 2, 3])), grouping_seed=draw(st.integers(0, 3)),
        adaptive=draw(st.sampled_from(["none", "sphere", "general"])),
        curvature=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        distance=draw(st.sampled_from([0.0, 1.0, 3.0])),
        momentum=momentum, nesterov=momentum > 0 and draw(st.booleans()),
        lr=draw(st.sampled_from([1e-3, 0.05, 0.3, 1.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])) if kind in ("euclidean", "auto") else 0.0,
        psi_max_norm=draw(st.sampled_from([1e4, 2.0])),
    )
    # one scale per run: a huge step followed by a normal one amplifies the cancellation noise
    # of the transported momentum (both backends alike, but differently), see _check_invariants
    scale = draw(st.sampled_from(SCALES))
    steps = [dict(scale=scale, nonfinite=draw(st.sampled_from([None, None, "nan", "inf"])))
             for _ in range(draw(st.integers(1, 3)))]
    return shape, dtype, opts, steps, draw(st.integers(0, 2 ** 16))


def _kind(opts, shape):
    if opts["manifold"] == "auto":
        return "sphere" if len(shape) >= 2 else "euclidean"
    return opts["manifold"]


def _rows(t, opts, shape):
    from manifold_sgd.grouping import row_shape
    gran = opts["granularity"] if _kind(opts, shape) != "euclidean" else "filter"
    return t.detach().reshape(row_shape(shape, gran)).to(torch.float64)


@PROFILE
@given(case=cases())
def test_random_steps_keep_the_invariants_and_native_equals_reference(case):
    shape, dtype, opts, steps, seed = case
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    backends = ["reference"] + (["native"] if msgd.native_available() else [])
    params = {b: w0.clone().requires_grad_() for b in backends}
    opt = {b: msgd.ManifoldSGD([params[b]], backend=b, **opts) for b in backends}
    kind = _kind(opts, shape)
    # each weight's largest magnitude so far: both backends round at that scale, so where huge
    # steps cancel (w0 - lr g1 - lr g2 ~ 1e6 from terms ~ 1e9) their results differ by a few
    # ulps of it, not of the small result
    peak = params["reference"].detach().double().abs()
    for s in steps:
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * s["scale"]
        if s["nonfinite"] is not None:
            mask = torch.rand(shape, generator=gen) < 0.2
            g[mask] = float(s["nonfinite"]) * (1 if torch.rand((), generator=gen) < 0.5 else -1)
        g = g.to(dtype)
        before = {b: (_rows(p, opts, shape), _momentum(opt[b], p, opts, shape)) for b, p in params.items()}
        for b, p in params.items():
            p.grad = g.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite guard reports
                opt[b].step()
        for b, p in params.items():
            _check_invariants(p, opt[b], opts, shape, dtype, kind, g, before[b])
        if "native" in params:
            ref = params["reference"].detach().double()
            peak = torch.maximum(peak, ref.abs())
            err = (params["native"].detach().double() - ref).abs()
            bound = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * peak
            worst = int((err - bound).argmax())
            assert (err <= bound).all(), (f"native - reference {float(err.flatten()[worst])} at flat index "
                                          f"{worst}, bound {float(bound.flatten()[worst])}")
            if opts["momentum"] > 0:
                m_prev = before["reference"][1]
                size = float(g.double().nan_to_num(0, 0, 0).abs().max()) + (
                    0.0 if m_prev is None else float(m_prev.abs().max()))
                tol = _momentum_tol(dtype)
                torch.testing.assert_close(opt["native"].state[params["native"]]["momentum_buffer"],
                                           opt["reference"].state[params["reference"]]["momentum_buffer"],
                                           rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * size)
            assert opt["native"].skipped_rows == opt["reference"].skipped_rows


def _momentum(opt, p, opts, shape):
    m = opt.state[p].get("momentum_buffer")
    return None if m is None else _rows(m, opts, shape)


def _momentum_tol(dtype):
    # a 16-bit param's momentum is float32, but it is transported at the unrounded point
    return TOL[torch.float64] if dtype == torch.float64 else (
        TOL[torch.float32] if dtype == torch.float32 else TOL[dtype])


def _check_invariants(p, opt, opts, shape, dtype, kind, g, before):
    w = _rows(p, opts, shape)
    m = _momentum(opt, p, opts, shape)
    # a non-finite gradient never makes a weight (or a momentum) non-finite
    assert torch.isfinite(w).all()
    assert m is None or torch.isfinite(m).all()
    # rows whose gradient is not finite are left unchanged, weight and momentum
    bad_rows = ~torch.isfinite(_rows(g, opts, shape)).all(dim=1)
    w_prev, m_prev = before
    if bad_rows.any():
        assert torch.equal(w[bad_rows], w_prev[bad_rows])
        if m is not None and m_prev is not None:
            assert torch.equal(m[bad_rows], m_prev[bad_rows])
    if kind == "sphere":
        norms = w.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=NORM_TOL[dtype] * 1.01), norms
        if m is not None:
            # relative to the momentum before transport (|m_prev| + |g| bounds it): a step far
            # larger than the radius leaves a transported m that is all cancellation noise
            dots = (w * m).sum(dim=1).abs()
            g_rows = _rows(g, opts, shape)
            scale = m.norm(dim=1) + g_rows.norm(dim=1) + (0 if m_prev is None else m_prev.norm(dim=1))
            ok = bad_rows | (dots <= ORTH_TOL[dtype] * scale)
            assert ok.all(), (dots / scale).max()
    if kind == "psi":  # the guard: a row that moved is at most psi_max_norm long
        moved = (w != w_prev).any(dim=1)
        assert (w.norm(dim=1)[moved] <= opts["psi_max_norm"] * (1 + 1e-2)).all()


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
@pytest.mark.xfail(strict=True, reason="known: float32 native sphere rows with momentum are skipped when "
                   "<m, m> overflows (|g| > ~1e19) though the step is finite; the reference steps them")
def test_known_difference_momentum_norm_overflow_in_float32():
    w0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 1e19
    out = {}
    for b in ("native", "reference"):
        p = w0.clone().requires_grad_()
        opt = msgd.UNSGD([p], lr=0.5, momentum=0.9, backend=b)
        p.grad = g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        out[b] = (p.detach(), opt.skipped_rows)
    assert out["native"][1] == out["reference"][1]
    torch.testing.assert_close(out["native"][0], out["reference"][0], **TOL[torch.float32])
    assert math.isfinite(float(out["native"][0].sum()))
