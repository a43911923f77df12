"""Odd layouts and odd parameter lists: channels_last and non-contiguous tensors, shared
memory, empty tensors, groups without gradients, mixed dtypes, add_param_group after
steps, deepcopy and pickling."""
import copy
import pickle
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, TOL

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(msgd.UNSGD, dict(momentum=0.9)), (msgd.FGSGD, dict(momentum=0.9, grouping="PO", group_size=3)),
         (msgd.PSISGD, dict(momentum=0.9, nesterov=True)),
         (msgd.UNSGD, dict(momentum=0.9, granularity="kernel")),
         (msgd.UNSGD, dict(momentum=0.9, granularity="tensor"))]
CASE_IDS = ["un", "fg-po", "psi-nesterov", "un-kernel", "un-tensor"]


def _grads(shape, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _steps(p, opt, grads, like=None):
    for g in grads:
        p.grad = g.clone() if like is None else g.clone().to(memory_format=like)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", CASES, ids=CASE_IDS)
def test_channels_last_conv_weight_steps_like_the_contiguous_one(backend, cls, kw):
    w0 = torch.randn(8, 3, 3, 3)
    a = w0.clone().requires_grad_()
    b = w0.clone().to(memory_format=torch.channels_last).requires_grad_()
    assert not b.is_contiguous()
    oa, ob = cls([a], lr=0.1, backend=backend, **kw), cls([b], lr=0.1, backend=backend, **kw)
    grads = _grads(w0.shape, 4)
    _steps(a, oa, grads)
    _steps(b, ob, grads, like=torch.channels_last)
    torch.testing.assert_close(b.detach(), a.detach(), **TOL[torch.float32])
    torch.testing.assert_close(ob.state[b]["momentum_buffer"], oa.state[a]["momentum_buffer"],
                               **TOL[torch.float32])
    assert b.is_contiguous(memory_format=torch.channels_last)  # stepped in its own layout
    if kw.get("granularity") != "kernel":  # filter/tensor rows are blocks of channels_last memory
        assert ob.state[b]["momentum_buffer"].stride() == b.stride()
    rows = 8 * 3 if kw.get("granularity") == "kernel" else (1 if kw.get("granularity") == "tensor" else 8)
    if cls is not msgd.PSISGD:  # the row view is the logical one: each output channel is a unit row
        norms = b.detach().reshape(rows, -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(rows))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_model_trains_like_the_contiguous_model(backend):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                   torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    m1, m2 = make(), make().to(memory_format=torch.channels_last)
    o1 = msgd.FGSGD(m1.parameters(), lr=0.1, momentum=0.9, backend=backend)
    o2 = msgd.FGSGD(m2.parameters(), lr=0.1, momentum=0.9, backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3, 9, 9, generator=g), torch.randint(0, 3, (8,), generator=g)
        for m, o, xx in ((m1, o1, x), (m2, o2, x.to(memory_format=torch.channels_last))):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(xx), y).backward()
            o.step()
    assert m2[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", CASES[:3], ids=CASE_IDS[:3])
def test_non_contiguous_params_and_grads_step_like_contiguous_ones(backend, cls, kw):
    base = torch.randn(9, 6)
    a = base.clone().requires_grad_()
    t = base.t().contiguous().t().requires_grad_()  # (9, 6), transposed in memory
    big = torch.zeros(9, 10)
    big[:, 2:8] = base
    s = big[:, 2:8].requires_grad_()  # a slice: not dense
    assert not t.is_contiguous() and not s.is_contiguous()
    grads = _grads(base.shape, 3)
    outs = []
    for p in (a, t, s):
        opt = cls([p], lr=0.2, backend=backend, **kw)
        for i, g in enumerate(grads):
            p.grad = g.clone() if i % 2 == 0 else g.t().contiguous().t()  # non-contiguous grads too
            opt.step()
        outs.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    for w, m in outs[1:]:
        torch.testing.assert_close(w, outs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(m, outs[0][1], rtol=0, atol=0)
    assert torch.equal(big[:, :2], torch.zeros(9, 2)) and torch.equal(big[:, 8:], torch.zeros(9, 2))


# ---- shared memory -------------------------------------------------------------

def test_overlapping_views_are_rejected():
    base = torch.randn(10, 4)
    a, b = base[:6].requires_grad_(), base[4:].requires_grad_()
    with pytest.raises(ValueError, match=r"\[1\].*shares memory with.*\[0\]"):
        msgd.UNSGD([a, b], lr=0.1)
    assert torch.equal(base, base.clone())


def test_same_tensor_twice_is_rejected_in_a_group_and_across_groups():
    w = torch.randn(4, 3).requires_grad_()
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match="same tensor"):
        msgd.UNSGD([w, w], lr=0.1)
    opt = msgd.UNSGD([torch.randn(2, 2).requires_grad_()], lr=0.1)
    opt.add_param_group({"params": [w]})
    w1 = w.detach().clone()
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 2 and torch.equal(w.detach(), w1)
    assert not torch.equal(w1, w0)  # the first add placed it on the sphere; the failed one did nothing


def test_aliasing_param_added_later_is_rejected_and_nothing_changes():
    base = torch.randn(6, 4)
    a = base[:3].requires_grad_()
    opt = msgd.UNSGD([a], lr=0.1)
    before = base.clone()
    b = base.view(-1)[4:20].view(4, 4).requires_grad_()  # overlaps a's rows 1-4
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1 and torch.equal(base, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_and_interleaved_columns_are_fine(backend):
    flat = torch.randn(40)
    a, b = flat[:12].view(3, 4).requires_grad_(), flat[12:].view(4, 7).requires_grad_()
    cols = torch.randn(5, 6)
    even, odd = cols[:, 0::2].requires_grad_(), cols[:, 1::2].requires_grad_()
    opt = msgd.UNSGD([a, b, even, odd], lr=0.1, momentum=0.9, backend=backend)
    for p in (a, b, even, odd):
        p.grad = torch.randn(p.shape)
    opt.step()
    for p in (a, b, even, odd):
        torch.testing.assert_close(p.detach().norm(dim=1), torch.ones(p.shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weights_as_one_parameter_step_once(backend):
    emb = torch.nn.Embedding(10, 6)
    head = torch.nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # the usual tie: one Parameter object
    model = torch.nn.ModuleDict(dict(emb=emb, head=head))
    params = list(model.parameters())
    assert len(params) == 1
    opt = msgd.UNSGD(params, lr=0.1, backend=backend)
    ref = emb.weight.detach().clone().requires_grad_()
    ref_opt = msgd.UNSGD([ref], lr=0.1, backend="reference")
    x = torch.tensor([1, 2, 3])
    head(emb(x)).sum().backward()
    ref.grad = emb.weight.grad.clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(emb.weight.detach(), ref.detach(), **TOL[torch.float32])


# ---- empty tensors, missing grads, mixed dtypes ----------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(msgd.UNSGD, dict(momentum=0.9)), (msgd.PSISGD, dict()),
                                    (msgd.FGSGD, dict(granularity="kernel", grouping="PI")),
                                    (msgd.ManifoldSGD, dict(manifold="euclidean", weight_decay=0.1))],
                         ids=["un", "psi", "fg-kernel-pi", "euclidean"])
def test_empty_tensors_are_skipped(backend, cls, kw):
    shapes = ([(0, 3, 3, 3), (4, 0, 3, 3), (4, 2, 0, 3)] if kw.get("granularity") == "kernel"
              else [(0,), (0, 5), (5, 0), (0, 3, 3, 3)])
    empties = [torch.empty(s).requires_grad_() for s in shapes]
    w = torch.randn(4, 2, 3, 3).requires_grad_()
    opt = cls(empties + [w], lr=0.1, backend=backend, **kw)
    w_before = None
    for _ in range(2):
        for p in empties + [w]:
            p.grad = torch.randn(p.shape)
        w_before = w.detach().clone()
        opt.step()
    assert not torch.equal(w.detach(), w_before)
    assert all(p.shape == s for p, s in zip(empties, shapes))
    assert all(not opt.state[p] for p in empties)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_group_without_grads_is_left_alone(backend):
    a, b = torch.randn(4, 3).requires_grad_(), torch.randn(5, 3).requires_grad_()
    opt = msgd.FGSGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.9, backend=backend)
    b0 = b.detach().clone()
    a.grad = torch.randn(4, 3)
    opt.step()
    assert torch.equal(b.detach(), b0) and not opt.state[b]
    assert "momentum_buffer" in opt.state[a]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouping", ["row", "tensor"])
def test_several_dtypes_in_one_group_step_like_each_alone(backend, grouping):
    shapes = {torch.float32: (6, 5), torch.float64: (4, 7), torch.bfloat16: (5, 3), torch.float16: (3, 8)}
    start = {dt: torch.randn(s, dtype=torch.float64).to(dt) for dt, s in shapes.items()}
    mixed = {dt: w.clone().requires_grad_() for dt, w in start.items()}
    alone = {dt: w.clone().requires_grad_() for dt, w in start.items()}
    kw = dict(lr=0.1, momentum=0.9, grouping=grouping, backend=backend)
    o_mixed = msgd.FGSGD(list(mixed.values()), **kw)
    o_alone = [msgd.FGSGD([p], **kw) for p in alone.values()]
    for _ in range(3):
        for dt in shapes:
            g = torch.randn(shapes[dt]).to(dt)
            mixed[dt].grad, alone[dt].grad = g, g.clone()
        o_mixed.step()
        for o in o_alone:
            o.step()
    for dt in shapes:
        assert mixed[dt].dtype == dt
        assert o_mixed.state[mixed[dt]]["momentum_buffer"].dtype == (
            torch.float64 if dt == torch.float64 else torch.float32)
        assert torch.equal(mixed[dt].detach(), alone[dt].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_steps_leaves_the_old_groups_unchanged(backend):
    w0 = torch.randn(6, 4)
    a1, a2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    kw = dict(lr=0.1, momentum=0.9, grouping="PO", group_size=2, backend=backend)
    o1, o2 = msgd.FGSGD([a1], **kw), msgd.FGSGD([a2], **kw)
    grads = _grads((6, 4), 6)
    for g in grads[:3]:
        a1.grad, a2.grad = g.clone(), g.clone()
        o1.step(), o2.step()
    v0 = torch.randn(5, 3)
    v, v_alone = v0.clone().requires_grad_(), v0.clone().requires_grad_()
    o1.add_param_group({"params": [v], "lr": 0.3})
    o_v = msgd.FGSGD([v_alone], **{**kw, "lr": 0.3})
    for g in grads[3:]:
        gv = torch.randn(5, 3)
        a1.grad, a2.grad, v.grad, v_alone.grad = g.clone(), g.clone(), gv.clone(), gv.clone()
        o1.step(), o2.step(), o_v.step()
    assert torch.equal(a1.detach(), a2.detach())
    assert torch.equal(o1.state[a1]["momentum_buffer"], o2.state[a2]["momentum_buffer"])
    torch.testing.assert_close(v.detach().norm(dim=1), torch.ones(5))
    assert o1.state[v]["momentum_buffer"].shape == (5, 3)


# ---- deepcopy and pickling ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_give_an_optimizer_that_continues_identically(backend, clone):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16)  # a 16-bit param: float32 state
    model[0].bias.data = model[0].bias.data.to(torch.bfloat16)
    opt = msgd.FGSGD(model.parameters(), lr=0.1, momentum=0.9, grouping="PO", group_size=2, backend=backend)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    twin = copy.deepcopy(opt) if clone == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.backend == backend and isinstance(twin, msgd.FGSGD)
    tparams = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, tparams))
    for _ in range(2):
        for p, q in zip(params, tparams):
            p.grad = torch.randn(p.shape).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, tparams):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])
    # the copy keeps the load hooks: a 16-bit param's momentum stays float32 through a load
    twin.load_state_dict(opt.state_dict())
    assert twin.state[tparams[0]]["momentum_buffer"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin.step()
