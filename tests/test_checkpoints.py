"""Checkpoints: a state_dict from one backend continues identically on the other, for every
kind of option; a state_dict that does not fit is a clear error that changes nothing."""
import copy
import io

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, TOL

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")]

SHAPES = [(6, 3, 3, 3), (5, 4), (6,)]
CASES = [
    ("un-nesterov", msgd.UNSGD, dict(momentum=0.9, nesterov=True)),
    ("psi-guard", msgd.PSISGD, dict(momentum=0.9, psi_max_norm=1.5)),
    ("psi-fg-po", msgd.PSISGD, dict(momentum=0.9, adaptive="sphere", grouping="PO", group_size=2)),
    ("fg-general", msgd.FGSGD, dict(momentum=0.8, adaptive="general", curvature=0.4, distance=2.0)),
    ("fg-kernel-pi", msgd.FGSGD, dict(momentum=0.9, granularity="kernel", grouping="PI", group_size=2)),
    ("fg-tensor-rows", msgd.FGSGD, dict(momentum=0.9, granularity="tensor")),
    ("euclidean-wd", msgd.ManifoldSGD, dict(manifold="euclidean", momentum=0.9, weight_decay=0.05)),
    ("auto-wd", msgd.ManifoldSGD, dict(momentum=0.9, weight_decay=0.05)),
]


def _params(dtype, shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _grads(dtype, n, shapes):
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(n)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("direction", [("native", "reference"), ("reference", "native")], ids=["n2r", "r2n"])
@pytest.mark.parametrize("name,cls,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_state_dict_crosses_backends_and_continues(direction, name, cls, kw, dtype):
    src, dst = direction
    shapes = [s for s in SHAPES if len(s) >= 3] if kw.get("granularity") == "kernel" else SHAPES
    grads = _grads(dtype, 6, shapes)
    params = _params(dtype, shapes)
    opt = cls(params, lr=0.1, backend=src, **kw)
    for g in grads[:3]:
        _step(opt, params, g)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    for g in grads[3:]:
        _step(opt, params, g)  # the uninterrupted run, on the source backend

    buf.seek(0)
    ck = torch.load(buf)
    resumed = [t.clone().requires_grad_() for t in ck["params"]]
    opt2 = cls(resumed, lr=0.1, backend=dst, **{**kw, "grouping_seed": 7})  # another draw, replaced
    with torch.no_grad():  # construction re-placed sphere rows: restore the saved values
        for p, t in zip(resumed, ck["params"]):
            p.copy_(t)
    opt2.load_state_dict(ck["opt"])
    for g in grads[3:]:
        _step(opt2, resumed, g)
    for a, b in zip(params, resumed):
        torch.testing.assert_close(b.detach(), a.detach(), **TOL[dtype])
    for a, b in zip(params, resumed):
        if "momentum_buffer" in opt.state[a]:
            assert opt2.state[b]["momentum_buffer"].dtype == opt.state[a]["momentum_buffer"].dtype
            torch.testing.assert_close(opt2.state[b]["momentum_buffer"], opt.state[a]["momentum_buffer"],
                                       **TOL[dtype])
        for k in ("row_order", "group_sizes"):
            if k in opt.state[a]:
                assert torch.equal(opt2.state[b][k], opt.state[a][k])


def _trained():
    params = _params(torch.float32, [(6, 4), (4, 2, 3, 3)])
    opt = msgd.FGSGD(params, lr=0.1, momentum=0.9, grouping="PO", group_size=2)
    for g in _grads(torch.float32, 2, [(6, 4), (4, 2, 3, 3)]):
        _step(opt, params, g)
    return params, opt


def _bad_state(kind):
    _, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][1]
    if kind == "momentum_shape":
        st["momentum_buffer"] = torch.zeros(4, 2, 3)
    elif kind == "row_order_len":
        st["row_order"] = torch.arange(5)
    elif kind == "row_order_perm":
        st["row_order"] = torch.tensor([0, 0, 1, 2])
    elif kind == "group_sizes_sum":
        st["group_sizes"] = torch.tensor([2, 3])
    elif kind == "signature":
        st["grouping"] = "rows/PO/2/0"
    elif kind == "param_count":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]
    return sd


@pytest.mark.parametrize("kind,match", [
    ("momentum_shape", r"\[1\] \(shape \(4, 2, 3, 3\)\): the loaded momentum_buffer .* shape \(4, 2, 3\)"),
    ("row_order_len", r"\[1\].*row grouping .* does not partition the 4 rows"),
    ("row_order_perm", r"\[1\].*does not partition"),
    ("group_sizes_sum", r"\[1\].*does not partition"),
    ("signature", r"\[1\].*no valid signature 'rows/PO/2/0'"),
    ("param_count", r"loaded state_dict has 1 parameters, the optimizer has 2"),
])
def test_a_state_dict_that_does_not_fit_is_an_error_that_changes_nothing(kind, match):
    params, opt = _trained()
    twin_params, twin = _trained()  # never sees the bad load
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_bad_state(kind))
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, v in st.items():
            assert (torch.equal(v, after["state"][k][key]) if isinstance(v, torch.Tensor)
                    else v == after["state"][k][key])
    for g in _grads(torch.float32, 2, [(6, 4), (4, 2, 3, 3)]):
        _step(opt, params, g)
        _step(twin, twin_params, g)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_momentum_keeps_the_param_layout_through_a_load(backend):
    p = torch.randn(6, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    opt = msgd.UNSGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.randn(6, 3, 3, 3).to(memory_format=torch.channels_last)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"].contiguous()  # saved contiguous
    opt.load_state_dict(sd)
    m = opt.state[p]["momentum_buffer"]
    assert m.stride() == p.stride()
    torch.testing.assert_close(m, sd["state"][0]["momentum_buffer"], rtol=0, atol=0)
