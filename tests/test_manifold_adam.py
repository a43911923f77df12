"""ManifoldAdam (SPEC §6) as an optimizer: native = reference, held to geoopt's RiemannianAdam
and torch.optim.AdamW, rows on their sphere, checkpoints, schedulers and bad options."""
import copy

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, TOL, dtype_id

geoopt = pytest.importorskip("geoopt")


def _model(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 9), (8, 4, 3, 3), (16,), (5, 33)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _train(params, opt, steps, first_seed=100):
    for s in range(steps):
        for p, g in zip(params, _grads(params, first_seed + s)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("second_moment", ["row", "element"])
def test_native_equals_reference(second_moment, dtype, one_thread):
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    out = {}
    for backend in ("native", "reference"):
        params = _model(dtype)
        opt = msgd.ManifoldAdam(params, lr=0.02, weight_decay=0.05, second_moment=second_moment, backend=backend)
        _train(params, opt, 5)
        out[backend] = (params, opt)
    # with v per element, u_hat = m/(sqrt(v) + eps) divides two rounded numbers per element: float32
    # results agree to a few units of 1e-6 after several steps, not to the row-level 1e-6
    w_tol = dict(TOL[dtype], atol=1e-5) if (dtype == torch.float32 and second_moment == "element") else TOL[dtype]
    for a, b in zip(out["native"][0], out["reference"][0]):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), **w_tol)
        sa, sb = out["native"][1].state[a], out["reference"][1].state[b]
        assert sa["step"] == sb["step"] == 5
        for key in ("exp_avg", "exp_avg_sq"):
            scale = max(float(sb[key].abs().max()), 1e-30)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(sa[key].double() / scale, sb[key].double() / scale, rtol=tol, atol=tol)
    for p in out["native"][0][:2] + out["native"][0][3:]:  # ndim >= 2: unit rows (filter granularity)
        norms = p.detach().double().flatten(1).norm(dim=1)
        assert (norms - 1).abs().max() <= {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_second_moment_equals_geoopt_riemannian_adam(backend):
    torch.manual_seed(0)
    w0 = torch.nn.functional.normalize(torch.randn(12, 7, dtype=torch.float64), dim=1)
    ours = torch.nn.Parameter(w0.clone())
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    o1 = msgd.ManifoldAdam([ours], lr=0.05, betas=(0.8, 0.95), eps=1e-7, backend=backend)
    o2 = geoopt.optim.RiemannianAdam([theirs], lr=0.05, betas=(0.8, 0.95), eps=1e-7)
    for _ in range(20):
        g = torch.randn(12, 7, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(o1.state[ours]["exp_avg"], o2.state[theirs]["exp_avg"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_tensors_are_adamw(backend):
    torch.manual_seed(1)
    ws = [torch.randn(6, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    ours = [torch.nn.Parameter(w.clone()) for w in ws]
    theirs = [torch.nn.Parameter(w.clone()) for w in ws]
    o1 = msgd.ManifoldAdam(ours, lr=0.01, weight_decay=0.1, manifold="euclidean", backend=backend)
    o2 = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_state_dict_round_trip_continues_bitwise(dtype, backend, one_thread):
    params = _model(dtype)
    opt = msgd.ManifoldAdam(params, lr=0.02, stochastic_rounding=dtype == torch.bfloat16, backend=backend)
    _train(params, opt, 3)
    saved_w = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _train(params, opt, 3, first_seed=200)
    twin = [torch.nn.Parameter(w.clone()) for w in saved_w]
    opt2 = msgd.ManifoldAdam(twin, lr=0.02, stochastic_rounding=dtype == torch.bfloat16, backend=backend)
    opt2.load_state_dict(saved)
    assert opt2.state[twin[0]]["exp_avg"].dtype == torch.float32  # kept in the math dtype
    _train(twin, opt2, 3, first_seed=200)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])


def test_lr_schedulers_are_read_at_every_step():
    a, b = _model(), _model()
    o1 = msgd.ManifoldAdam(a, lr=0.1)
    o2 = msgd.ManifoldAdam(b, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    for s, lr in enumerate((0.1, 0.05, 0.025)):
        o2.param_groups[0]["lr"] = lr
        for p, q, g in zip(a, b, _grads(a, s)):
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        sched.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_stiefel_blocks_stay_orthonormal():
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    opt = msgd.ManifoldAdam([w], lr=0.05, manifold="stiefel", granularity="kernel")
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    blocks = w.detach().reshape(12, 3, 3)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(12, 3, 3),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("second_moment", ["row", "element"])
@pytest.mark.parametrize("retraction", ["qr", "polar"])
def test_stiefel_native_equals_reference(retraction, second_moment, dtype, one_thread, monkeypatch):
    """Stiefel blocks step natively on the CPU (no call to the reference step) and agree with the
    reference: 3 x 3 kernel blocks of a conv weight, and a 2-D weight as one 5 x 11 block."""
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    calls = []
    real = msgd.reference.adam_rows
    monkeypatch.setattr(msgd.reference, "adam_rows", lambda *a, **k: calls.append(k["kind"]) or real(*a, **k))
    out = {}
    for backend in ("native", "reference"):
        g = torch.Generator().manual_seed(3)
        conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64).to(dtype))
        mat = torch.nn.Parameter(torch.randn(5, 11, generator=g, dtype=torch.float64).to(dtype))
        params = [conv, mat]
        opt = msgd.ManifoldAdam([{"params": [conv], "granularity": "kernel"}, {"params": [mat]}], lr=0.05,
                                manifold="stiefel", second_moment=second_moment, retraction=retraction,
                                backend=backend)
        calls.clear()
        _train(params, opt, 4)
        assert calls == ([] if backend == "native" else ["stiefel"] * 8)
        out[backend] = (params, opt)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for a, b, (blocks, p) in zip(out["native"][0], out["reference"][0], ((8, 3), (1, 5))):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=tol, atol=tol)
        sa, sb = out["native"][1].state[a], out["reference"][1].state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            scale = max(float(sb[key].abs().max()), 1e-30)
            torch.testing.assert_close(sa[key].double() / scale, sb[key].double() / scale, rtol=tol, atol=tol)
        assert sa["exp_avg_sq"].numel() == (blocks if second_moment == "row" else a.numel())
        q = a.detach().double().reshape(blocks, p, -1)
        torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(p, dtype=torch.float64).expand(blocks, p, p),
                                   rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_native_backend_refuses_stiefel_blocks_on_a_gpu_before_anything_moves():
    """The Adam family's CUDA kernels step sphere and Euclidean rows; Stiefel blocks on a GPU take
    the reference path, which backend='native' does not allow: a clear error, at construction and
    (a group switched to Stiefel later) at the step, before any weight or state changes."""
    if "native" not in BACKENDS:
        pytest.skip("native extension not built")
    match = r"parameter 'model.conv': backend='native', but ManifoldAdam has no native kernel for Stiefel blocks"
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match=match):
        msgd.ManifoldAdam([{"params": [w], "param_names": ["model.conv"]}], lr=0.05, manifold="stiefel",
                          granularity="kernel", backend="native")
    opt = msgd.ManifoldAdam([{"params": [w], "param_names": ["model.conv"]}], lr=0.05, manifold="sphere",
                            backend="native")
    opt.param_groups[0].update(manifold="stiefel", granularity="kernel")
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(w.detach(), before) and len(opt.state[w]) == 0
    auto = msgd.ManifoldAdam([w], lr=0.05, manifold="stiefel", granularity="kernel")  # 'auto': reference path
    auto.step()
    assert auto.state[w]["step"] == 1


@pytest.mark.parametrize("kw,match", [
    (dict(manifold="psi"), "no Adam step"),
    (dict(betas=(1.0, 0.9)), r"betas=\(1.0, 0.9\) must be two numbers in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=0.0), "eps=0.0 must be a finite number > 0"),
    (dict(second_moment="column"), "second_moment"),
    (dict(manifold="sphere", weight_decay=0.1), "weight_decay=0.1 is not allowed with manifold='sphere'"),
])
def test_bad_options_are_clear_errors(kw, match):
    p = _model()
    before = [x.detach().clone() for x in p]
    with pytest.raises(ValueError, match=match):
        msgd.ManifoldAdam(p, lr=0.1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, p))


def test_sgd_options_in_an_adam_group_are_refused():
    with pytest.raises(ValueError, match="'momentum' is an option of the SGD family"):
        msgd.ManifoldAdam([{"params": _model(), "momentum": 0.9}], lr=0.1)
    with pytest.raises(ValueError, match="'adaptive' is an option of the SGD family"):
        msgd.ManifoldAdam([{"params": _model(), "adaptive": "sphere"}], lr=0.1)
    with pytest.raises(TypeError):
        msgd.ManifoldAdam(_model(), lr=0.1, momentum=0.9)  # not an argument of ManifoldAdam
