"""The optimizer as a torch.optim.Optimizer: groups, state, schedulers, closures."""
import copy
import io

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(msgd.UNSGD, dict(momentum=0.9)), (msgd.PSISGD, dict(momentum=0.9)),
                                    (msgd.FGSGD, dict(grouping="PO", group_size=3, momentum=0.9)),
                                    (msgd.FGSGD, dict(granularity="kernel", grouping="PIO", group_size=4))],
                         ids=["un", "psim", "fg-po", "fg-pio"])
def test_state_dict_round_trip_continues_identically(backend, cls, kw):
    model = _model()
    conv_only = [model[0].weight] if kw.get("granularity") == "kernel" else list(model.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in conv_only)]
    groups = [{"params": conv_only}] + ([{"params": rest, "manifold": "euclidean"}] if rest else [])
    opt = cls(groups, lr=0.05, backend=backend, **kw)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    _train(model, opt, 3, start=3)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    c2 = [model2[0].weight] if kw.get("granularity") == "kernel" else list(model2.parameters())
    r2 = [p for p in model2.parameters() if all(p is not q for q in c2)]
    g2 = [{"params": c2}] + ([{"params": r2, "manifold": "euclidean"}] if r2 else [])
    opt2 = cls(g2, lr=0.05, backend=backend, **{**kw, "grouping_seed": 99})  # a different draw...
    buf.seek(0)
    ck = torch.load(buf)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])  # ...replaced by the saved one
    _train(model2, opt2, 3, start=3)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b.detach())
    if kw.get("grouping") in ("PO", "PIO"):
        st = opt2.state[c2[0]]
        assert st["row_order"].dtype == torch.int64 and st["group_sizes"].dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16])
def test_16bit_params_keep_float32_momentum_through_checkpoints(backend, pdtype):
    p = torch.randn(6, 5).to(pdtype).requires_grad_()
    opt = msgd.UNSGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.randn(6, 5).to(pdtype)
    opt.step()
    m = opt.state[p]["momentum_buffer"]
    assert m.dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    q = p.detach().clone().requires_grad_()
    opt2 = msgd.UNSGD([q], lr=0.1, momentum=0.9, backend=backend)
    opt2.load_state_dict(sd)  # torch would cast the buffer to the 16-bit param dtype
    assert opt2.state[q]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["momentum_buffer"], m)


def test_state_dict_crosses_backends():
    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    model = _model()
    opt = msgd.FGSGD(model.parameters(), lr=0.05, momentum=0.9, grouping="PO", group_size=2, backend="native")
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    msd = copy.deepcopy(model.state_dict())
    _train(model, opt, 2, start=2)
    model2 = _model()
    model2.load_state_dict(msd)
    opt2 = msgd.FGSGD(model2.parameters(), lr=0.05, momentum=0.9, grouping="PO", group_size=2,
                      backend="reference")
    opt2.load_state_dict(sd)
    _train(model2, opt2, 2, start=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_is_read_every_step(backend):
    a = torch.randn(4, 6)
    p1, p2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    o1 = msgd.UNSGD([p1], lr=0.5, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.1)
    o2 = msgd.UNSGD([p2], lr=0.5, backend=backend)
    for lr in (0.5, 0.05, 0.005):
        g = torch.randn(4, 6)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        sched.step()
        o2.param_groups[0]["lr"] = lr
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [msgd.UNSGD, msgd.PSISGD, msgd.FGSGD])
def test_params_with_grads_move_and_without_grads_stay(backend, cls):
    # a published PSI-SGD implementation never updated its weights: check that we do
    w_grad, w_none = torch.randn(5, 7).requires_grad_(), torch.randn(5, 7).requires_grad_()
    bias = torch.randn(5).requires_grad_()
    opt = cls([w_grad, w_none, bias], lr=0.1, momentum=0.9, backend=backend)
    before = [t.detach().clone() for t in (w_grad, w_none, bias)]
    w_grad.grad = torch.randn(5, 7)
    bias.grad = torch.randn(5)
    opt.step()
    assert (w_grad.detach() - before[0]).abs().min() > 0
    assert torch.equal(w_none.detach(), before[1])
    assert "momentum_buffer" not in opt.state[w_none]
    torch.testing.assert_close(bias.detach(), before[2] - 0.1 * bias.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_have_their_own_options(backend):
    w, b, head = torch.randn(6, 4).requires_grad_(), torch.randn(6).requires_grad_(), torch.randn(3, 6).requires_grad_()
    opt = msgd.ManifoldSGD([{"params": [w, b], "manifold": "auto", "weight_decay": 0.1},
                            {"params": [head], "manifold": "euclidean", "lr": 0.01}],
                           lr=0.5, backend=backend)
    b0, h0 = b.detach().clone(), head.detach().clone()
    for t in (w, b, head):
        t.grad = torch.ones_like(t)
    opt.step()
    # w on the sphere (no weight decay there), b Euclidean with decay, head Euclidean at its own lr
    torch.testing.assert_close(w.detach().norm(dim=1), torch.ones(6))
    torch.testing.assert_close(b.detach(), b0 - 0.5 * (1 + 0.1 * b0))
    torch.testing.assert_close(head.detach(), h0 - 0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_and_closure(backend):
    w = torch.randn(4, 3).requires_grad_()
    opt = msgd.UNSGD([w], lr=0.1, backend=backend)
    v = torch.randn(5, 3).requires_grad_()
    opt.add_param_group({"params": [v], "lr": 0.2})
    torch.testing.assert_close(v.detach().norm(dim=1), torch.ones(5))  # placed on the sphere

    def closure():
        opt.zero_grad()
        loss = (w.sum() + 2 * v.sum())
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and w.grad is not None and v.grad is not None
    torch.testing.assert_close(v.detach().norm(dim=1), torch.ones(5))


def test_named_parameters_name_errors():
    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.weight[2] = 0
    with pytest.raises(ValueError, match=r"'weight'.*row 2"):
        msgd.UNSGD(model.named_parameters(), lr=0.1)


def test_presets():
    w = torch.randn(3, 4).requires_grad_()
    assert msgd.FGSGD([w], lr=1).param_groups[0]["adaptive"] == "sphere"
    assert msgd.FGSGD([w], lr=1).param_groups[0]["grouping"] == "tensor"
    assert msgd.UNSGD([w], lr=1).param_groups[0]["adaptive"] == "none"
    assert msgd.PSISGD([w], lr=1).auto_manifold == "psi"
    assert isinstance(msgd.PSISGD([w], lr=1), torch.optim.Optimizer)
