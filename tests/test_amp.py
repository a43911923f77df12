"""Mixed precision: torch.amp.GradScaler("cpu"), 16-bit parameters with float32 math and
state, and CPU bf16 autocast training."""
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, TOL

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 3)).to(dtype)


def _centers():
    return 0.4 * torch.randn(3, 16, generator=torch.Generator().manual_seed(42))


def _blobs(n, seed):
    """Three overlapping Gaussian classes in 16-D (no sklearn): the best possible accuracy
    (nearest center) is about 0.8, so the test can tell a good fit from a bad one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = _centers()[y] + torch.randn(n, 16, generator=g)
    return x, y


OPTS = [(msgd.FGSGD, dict(lr=0.1, momentum=0.9)), (msgd.PSISGD, dict(lr=0.1, momentum=0.9)),
        (msgd.UNSGD, dict(lr=0.1, momentum=0.9, nesterov=True))]
OPT_IDS = ["fg", "psim", "un-nesterov"]


# ---- GradScaler -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_scaler_unscales_exactly_and_skips_inf_steps(backend, cls, kw, dtype):
    """Scaling by a power of two is exact, so a scaled run equals the unscaled one bit for bit;
    a step whose gradients hold an inf is skipped by the scaler (the optimizer never sees it,
    so its own non-finite guard does not warn) and the scale backs off."""
    x, y = _blobs(64, 1)
    x = x.to(dtype)
    plain, scaled = _net(dtype), _net(dtype)
    o_plain = cls(plain.parameters(), backend=backend, **kw)
    o_scaled = cls(scaled.parameters(), backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    inf_step = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(5):
            o_scaled.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(scaled(x), y)).backward()
            if step == inf_step:
                scaled[0].weight.grad[3, 2] = float("inf")
                before = [p.detach().clone() for p in scaled.parameters()]
                bufs = [o_scaled.state[p]["momentum_buffer"].clone() for p in scaled.parameters()]
                scale_before = scaler.get_scale()
            scaler.step(o_scaled)
            scaler.update()
            if step == inf_step:
                assert all(torch.equal(a, p.detach()) for a, p in zip(before, scaled.parameters()))
                assert all(torch.equal(m, o_scaled.state[p]["momentum_buffer"])
                           for m, p in zip(bufs, scaled.parameters()))
                assert scaler.get_scale() == scale_before / 2
                continue  # the plain run skips this step too
            o_plain.zero_grad()
            torch.nn.functional.cross_entropy(plain(x), y).backward()
            o_plain.step()
    assert o_scaled.skipped_rows == 0
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert o_scaled.state[b]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(o_plain.state[a]["momentum_buffer"], o_scaled.state[b]["momentum_buffer"])


def test_grad_scaler_rejects_fp16_params_as_torch_does():
    # torch's GradScaler refuses to unscale fp16 gradients (use float32 master params with
    # autocast, or bf16); the optimizer itself steps fp16 params without a scaler
    net = _net(torch.float16)
    opt = msgd.UNSGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(sum(p.sum() for p in net.parameters())).backward()
    with pytest.raises(ValueError, match="FP16"):
        scaler.step(opt)


# ---- 16-bit parameters: float32 math and state ----------------------------------------

FG_PO = (msgd.FGSGD, dict(lr=0.1, momentum=0.9, grouping="PO", group_size=2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", OPTS + [FG_PO], ids=OPT_IDS + ["fg-po"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_params_step_in_float32_and_round_once(backend, cls, kw, dtype):
    """A 16-bit run equals a float32 run from the same (16-bit) values, rounded once per step:
    exactly on the reference path; to one 16-bit rounding on the native one."""
    g = torch.Generator().manual_seed(0)
    w16 = torch.randn(6, 2, 3, 3, generator=g).to(dtype).requires_grad_()
    b16 = torch.randn(6, generator=g).to(dtype).requires_grad_()
    opt = cls([w16, b16], backend=backend, **kw)
    for _ in range(3):
        gw, gb = torch.randn(6, 2, 3, 3, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
        # the same step in float32 from the current 16-bit values and float32 state
        w32, b32 = w16.detach().float().requires_grad_(), b16.detach().float().requires_grad_()
        o32 = cls([w32, b32], backend="reference", **kw)
        with torch.no_grad():  # construction re-placed the rows on the sphere in float32: undo
            w32.copy_(w16.float())
        if opt.state:
            o32.load_state_dict(opt.state_dict())
        w32.grad, b32.grad = gw.float(), gb.float()
        w16.grad, b16.grad = gw, gb
        o32.step()
        opt.step()
        assert opt.state[w16]["momentum_buffer"].dtype == torch.float32
        tol = dict(rtol=0, atol=0) if backend == "reference" else TOL[dtype]
        torch.testing.assert_close(w16.detach(), w32.detach().to(dtype), **tol)
        torch.testing.assert_close(b16.detach(), b32.detach().to(dtype), **tol)
        torch.testing.assert_close(opt.state[w16]["momentum_buffer"], o32.state[w32]["momentum_buffer"],
                                   **(dict(rtol=0, atol=0) if backend == "reference" else TOL[torch.float32]))


# ---- autocast -----------------------------------------------------------------------

def _train(cls, kw, autocast, steps=40, n=2048, bs=128):
    net = _net()
    opt = cls(net.parameters(), **kw)
    x, y = _blobs(n, 1)
    for i in range(steps):
        xb, yb = x[(i * bs) % n:][:bs], y[(i * bs) % n:][:bs]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = _blobs(1000, 2)
    with torch.no_grad():
        return float((net(xt).argmax(1) == yt).float().mean()), net


@pytest.mark.parametrize("cls,kw", OPTS[:2], ids=OPT_IDS[:2])
def test_bf16_autocast_training_reaches_float32_accuracy(cls, kw):
    xt, yt = _blobs(1000, 2)
    bayes = float((torch.cdist(xt, _centers()).argmin(1) == yt).float().mean())  # the optimum
    acc32, _ = _train(cls, kw, autocast=False)
    acc16, net = _train(cls, kw, autocast=True)
    assert net[0].weight.dtype == torch.float32  # autocast keeps float32 params and grads
    assert acc32 >= bayes - 0.03, (acc32, bayes)
    assert abs(acc16 - acc32) <= 0.02, (acc16, acc32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("second_moment", ["row", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_scaler_with_manifold_adam(backend, second_moment, dtype):
    """ManifoldAdam under GradScaler: the unscaled gradients are exact (powers of two), so the scaled
    run equals the plain one bit for bit; the inf step is skipped (weights, moments and the step
    count unchanged) and the scale backs off."""
    x, y = _blobs(64, 1)
    x = x.to(dtype)
    plain, scaled = _net(dtype), _net(dtype)
    kw = dict(lr=0.01, weight_decay=0.01, second_moment=second_moment, backend=backend)
    o_plain, o_scaled = msgd.ManifoldAdam(plain.parameters(), **kw), msgd.ManifoldAdam(scaled.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    for step in range(5):
        o_scaled.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(scaled(x), y)).backward()
        if step == 2:
            scaled[0].weight.grad[3, 2] = float("inf")
            before = [p.detach().clone() for p in scaled.parameters()]
            moments = [(o_scaled.state[p]["exp_avg"].clone(), o_scaled.state[p]["exp_avg_sq"].clone())
                       for p in scaled.parameters()]
            scale_before = scaler.get_scale()
        scaler.step(o_scaled)
        scaler.update()
        if step == 2:
            assert all(torch.equal(a, p.detach()) for a, p in zip(before, scaled.parameters()))
            for (m, v), p in zip(moments, scaled.parameters()):
                st = o_scaled.state[p]
                assert torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"]) and st["step"] == 2
            assert scaler.get_scale() == scale_before / 2
            continue
        o_plain.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        o_plain.step()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a.detach(), b.detach())
        sa, sb = o_plain.state[a], o_scaled.state[b]
        assert sa["step"] == sb["step"] == 4
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
