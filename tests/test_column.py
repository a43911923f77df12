"""granularity="column" (SPEC §1): the d1 columns of a matrix are its rows, i.e. the rows of
W^T, on every manifold, optimizer and backend. The oracle: the same optimizer with
granularity="filter" on W^T held as a separate tensor (and, across backends, the reference
path)."""
import pytest
import torch

import manifold_sgd as msgd

from conftest import BACKENDS, NORM_TOL, TOL, dtype_id

D0, D1 = 37, 11  # columns of length 37: longer than they are many (Stiefel needs d1 <= d0)

CASES = {
    "un": (msgd.UNSGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "un_nesterov": (msgd.UNSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "psi": (msgd.PSISGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "fg_tensor": (msgd.FGSGD, dict(lr=0.5, momentum=0.9, grouping="tensor", weight_decay=0.01)),
    "fg_row": (msgd.FGSGD, dict(lr=0.5, grouping="row", adaptive="general", curvature=0.5)),
    "stiefel": (msgd.ManifoldSGD, dict(lr=0.05, momentum=0.9, manifold="stiefel")),
    "adam_row": (msgd.ManifoldAdam, dict(lr=0.01, weight_decay=0.01, second_moment="row")),
    "adam_element": (msgd.ManifoldAdam, dict(lr=0.01, weight_decay=0.01, second_moment="element")),
    "adam_stiefel": (msgd.ManifoldAdam, dict(lr=0.01, manifold="stiefel")),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _pair(case, dtype, backend, w0, b0):
    """(optimizer on (W column, b), optimizer on (W^T filter, b)), with the tensors."""
    cls, kw = CASES[case]
    kw = dict(kw, backend=backend)
    if dtype == torch.bfloat16:
        kw.update(stochastic_rounding=True, rounding_seed=7)
    wc = torch.nn.Parameter(w0.clone().to(dtype))
    wt = torch.nn.Parameter(w0.t().contiguous().to(dtype))
    bc, bt = torch.nn.Parameter(b0.clone().to(dtype)), torch.nn.Parameter(b0.clone().to(dtype))
    manifold = kw.get("manifold")
    # weight decay reaches the Euclidean bias (manifold="auto"); an explicit manifold gets none
    params_c = [wc, bc] if manifold is None else [wc]
    params_t = [wt, bt] if manifold is None else [wt]
    oc = cls(params_c, granularity="column", **kw)
    ot = cls(params_t, granularity="filter", **kw)
    return oc, ot, (wc, bc), (wt, bt)


def _steps(case, dtype, backend, steps=4):
    torch.manual_seed(0)
    w0, b0 = torch.randn(D0, D1, dtype=torch.float64), torch.randn(D1, dtype=torch.float64)
    oc, ot, (wc, bc), (wt, bt) = _pair(case, dtype, backend, w0, b0)
    for _ in range(steps):
        g, gb = torch.randn(D0, D1).to(dtype), torch.randn(D1).to(dtype)
        wc.grad, wt.grad = g.clone(), g.t().contiguous()
        bc.grad, bt.grad = gb.clone(), gb.clone()
        oc.step()
        ot.step()
    return oc, ot, (wc, bc), (wt, bt)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_column_is_filter_on_transpose(case, dtype, backend):
    oc, ot, (wc, bc), (wt, bt) = _steps(case, dtype, backend)
    torch.testing.assert_close(wc.detach().t(), wt.detach(), **TOL[dtype])
    torch.testing.assert_close(bc.detach(), bt.detach(), **TOL[dtype])
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        mc, mt = oc.state[wc].get(key), ot.state[wt].get(key)
        if mc is None:
            continue
        if mc.shape == wc.shape:
            mc = mc.t()
        torch.testing.assert_close(mc, mt, **TOL[dtype])
    if CASES[case][1].get("manifold") != "stiefel" and case != "psi":
        norms = wc.detach().double().norm(dim=0)  # every column on its unit sphere
        assert (norms - 1).abs().max() <= NORM_TOL[dtype]
    if CASES[case][1].get("manifold") == "stiefel":
        q = wc.detach().double()
        eye = torch.eye(D1, dtype=torch.float64)
        assert (q.t() @ q - eye).abs().max() <= (1e-10 if dtype == torch.float64 else 5e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_column_native_equals_reference(case, dtype):
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    _, _, (wn, bn), _ = _steps(case, dtype, "auto")
    _, _, (wr, br), _ = _steps(case, dtype, "reference")
    torch.testing.assert_close(wn.detach(), wr.detach(), **TOL[dtype])
    torch.testing.assert_close(bn.detach(), br.detach(), **TOL[dtype])


def test_column_transposed_parameter():
    """A column-granularity parameter that is itself a transposed view (non-contiguous)."""
    torch.manual_seed(0)
    base = torch.randn(D1, D0, dtype=torch.float64)
    for backend in BACKENDS:
        w = torch.nn.Parameter(base.clone().t())  # (D0, D1), strides (1, D0)
        ref = torch.nn.Parameter(base.clone())  # its W^T, contiguous
        oc = msgd.UNSGD([w], lr=0.1, momentum=0.9, granularity="column", backend=backend)
        ot = msgd.UNSGD([ref], lr=0.1, momentum=0.9, granularity="filter", backend=backend)
        for _ in range(3):
            g = torch.randn(D0, D1, dtype=torch.float64)
            w.grad, ref.grad = g.clone(), g.t().contiguous()
            oc.step()
            ot.step()
        torch.testing.assert_close(w.detach().t(), ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["un", "fg_tensor", "adam_element", "adam_row"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_column_state_dict_round_trip(case, backend):
    """A run restored from a checkpoint continues bitwise (bf16 with stochastic rounding)."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    w0, b0 = torch.randn(D0, D1, dtype=torch.float64), torch.randn(D1, dtype=torch.float64)
    oc, _, (w, b), _ = _pair(case, dtype, backend, w0, b0)
    grads = [(torch.randn(D0, D1).to(dtype), torch.randn(D1).to(dtype)) for _ in range(4)]

    def step(opt, ps, i):
        ps[0].grad, ps[1].grad = grads[i][0].clone(), grads[i][1].clone()
        opt.step()

    for i in range(2):
        step(oc, (w, b), i)
    sd = oc.state_dict()
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    cls, kw = CASES[case]
    kw = dict(kw, backend=backend, stochastic_rounding=True, rounding_seed=7)
    o2 = cls([w2, b2], granularity="column", **kw)
    o2.load_state_dict(sd)
    for i in range(2, 4):
        step(oc, (w, b), i)
        step(o2, (w2, b2), i)
    assert torch.equal(w.detach(), w2.detach()) and torch.equal(b.detach(), b2.detach())


def test_column_places_columns_at_construction():
    w = torch.nn.Parameter(torch.randn(D0, D1) * 3)
    msgd.UNSGD([w], lr=0.1, granularity="column")
    torch.testing.assert_close(w.detach().norm(dim=0), torch.ones(D1))
    s = torch.nn.Parameter(torch.randn(D0, D1))
    msgd.ManifoldSGD([s], lr=0.1, manifold="stiefel", granularity="column")
    torch.testing.assert_close(s.detach().t() @ s.detach(), torch.eye(D1), atol=1e-5, rtol=0)
    z = torch.randn(D0, D1)
    z[:, 4] = 0
    with pytest.raises(ValueError, match=r"row 4 has norm 0"):
        msgd.UNSGD([torch.nn.Parameter(z)], lr=0.1, granularity="column")


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (7,), (2, 3, 4)])
@pytest.mark.parametrize("cls", [msgd.UNSGD, msgd.ManifoldAdam])
def test_column_needs_a_matrix(cls, shape):
    w = torch.nn.Parameter(torch.randn(*shape))
    kw = {"manifold": "sphere"} if len(shape) == 1 else {}
    with pytest.raises(ValueError, match=r"granularity='column' needs a matrix"):
        cls([w], lr=0.1, granularity="column", **kw)


@pytest.mark.parametrize("grouping", ["PO", "PI", "PIO"])
def test_column_refuses_po_pi_pio(grouping):
    w = torch.nn.Parameter(torch.randn(D0, D1))
    with pytest.raises(ValueError, match=rf"grouping='{grouping}' is not defined for granularity='column'"):
        msgd.FGSGD([w], lr=0.1, granularity="column", grouping=grouping)


def test_column_stiefel_needs_tall_matrix():
    w = torch.nn.Parameter(torch.randn(D1, D0))  # 37 columns of length 11
    with pytest.raises(ValueError, match=r"more rows than columns"):
        msgd.ManifoldSGD([w], lr=0.1, manifold="stiefel", granularity="column")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ["un", "psi", "fg_tensor", "fg_row", "adam_row", "adam_element"])
def test_column_kernel_bitwise_equals_rows_of_transpose(case, dtype):
    """The CPU kernel's column tiles (gather, the row code, scatter) are the rows of W^T, bit for
    bit, stochastic rounding included: shapes of one partial tile, several tiles and several
    threads' units, and a column whose gradient is not finite (skipped, reported)."""
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    cls, kw = CASES[case]
    kw = dict(kw, backend="native", weight_decay=0.0)
    if dtype == torch.bfloat16:
        kw.update(stochastic_rounding=True, rounding_seed=3)
    for d0, d1 in [(5, 3), (300, 517), (2000, 70)]:
        torch.manual_seed(d1)
        w0 = torch.nn.functional.normalize(torch.randn(d0, d1, dtype=torch.float64), dim=0).to(dtype)
        a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.t().contiguous())
        oa, ob = cls([a], granularity="column", **kw), cls([b], granularity="filter", **kw)
        for step in range(3):
            g = torch.randn(d0, d1).to(dtype)
            if step < 2:  # step 0: the momentum is fresh, a skipped column's stays as it was
                g[d0 // 2, d1 - 1 - step] = float("nan")
            a.grad, b.grad = g.clone(), g.t().contiguous()
            with pytest.warns(RuntimeWarning) if step < 2 else _nothing():
                oa.step()
            with pytest.warns(RuntimeWarning) if step < 2 else _nothing():
                ob.step()
        assert torch.equal(a.detach().t(), b.detach()), (d0, d1)
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            ma, mb = oa.state[a].get(key), ob.state[b].get(key)
            if ma is not None:
                assert torch.equal(ma.t() if ma.dim() == 2 else ma, mb), key


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
