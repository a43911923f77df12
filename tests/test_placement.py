"""Placing weights on their manifold (placement.py): rows already there stay as they are, so
an optimizer built on weights a step left on the manifold (a resumed run) moves nothing."""
import pytest
import torch
from torch import nn

import manifold_sgd as msgd
from conftest import BACKENDS, DTYPES, dtype_id
from manifold_sgd import placement, reference


def _rows(t):
    return t.detach().reshape(t.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 5), (16, 3, 3, 3), (4, 2), (3, 300)])
def test_placing_twice_changes_nothing(dtype, shape):
    w = nn.Parameter(torch.randn(shape).to(dtype) * 3)
    msgd.UNSGD([w], lr=0.1)
    first = w.detach().clone()
    norms = _rows(first).double().norm(dim=1)
    assert ((norms - 1).abs() <= placement.SPHERE_TOL[dtype]).all()
    msgd.UNSGD([w], lr=0.1)  # a second optimizer on placed rows
    assert torch.equal(w.detach(), first)
    assert torch.equal(reference.project_to_manifold("sphere", _rows(first), None), _rows(first))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_only_rows_off_the_sphere_are_placed(dtype):
    w = torch.nn.functional.normalize(torch.randn(6, 40, dtype=torch.float64), dim=1).to(dtype)
    off = 4 * placement.SPHERE_TOL[dtype]
    w[2] *= 1 + off  # off the sphere by more than rounding
    w[4] *= 2.0
    before = w.clone()
    p = nn.Parameter(w)
    msgd.UNSGD([p], lr=0.1)
    changed = (p.detach() != before).any(dim=1)
    assert changed[2] and changed[4]
    assert not changed[[0, 1, 3, 5]].any()  # on the sphere to rounding: left bitwise
    assert ((_rows(p).double().norm(dim=1) - 1).abs() <= placement.SPHERE_TOL[dtype]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_stiefel_blocks_on_the_manifold_are_left_as_they_are(dtype):
    w = nn.Parameter((torch.randn(5, 4, 3, 6) * 2).to(dtype))
    kw = dict(manifold="stiefel", granularity="kernel", lr=0.1)
    msgd.ManifoldSGD([w], **kw)
    placed = w.detach().clone()
    b = placed.double().reshape(-1, 3, 6)
    assert (b @ b.transpose(1, 2) - torch.eye(3, dtype=torch.float64)).abs().max() <= placement.STIEFEL_TOL[dtype]
    msgd.ManifoldSGD([w], **kw)
    assert torch.equal(w.detach(), placed)
    with torch.no_grad():
        w[1, 2] *= 1.5  # one block off the manifold
    msgd.ManifoldSGD([w], **kw)
    moved = (w.detach() != placed).reshape(20, -1).any(dim=1)
    assert moved.tolist() == [i == 6 for i in range(20)]


def test_a_row_that_cannot_be_placed_is_named_before_anything_moves():
    a = nn.Parameter(torch.randn(3, 4) * 2)
    b = nn.Parameter(torch.randn(5, 4))
    with torch.no_grad():
        b[3] = 0
    before = a.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 'b': row 3 has norm 0.0"):
        msgd.UNSGD([("a", a), ("b", b)], lr=0.1)
    assert torch.equal(a.detach(), before)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.bn2(self.fc(x.flatten(1)))))


def _build(model, name, backend):
    groups = msgd.manifold_param_groups(model)
    if name == "UN":
        return msgd.UNSGD(groups, lr=0.05, momentum=0.9, backend=backend)
    return msgd.FGSGD(groups, lr=0.05, momentum=0.9, grouping="PO", group_size=3, backend=backend)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["UN", "FG-SGD PO"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_a_resumed_run_is_bitwise_the_uninterrupted_one(backend, name, dtype, one_thread):
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 3, 6, 6, generator=gen).to(dtype), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(7)]
    torch.manual_seed(0)
    model = _Net().to(dtype)
    opt = _build(model, name, backend)
    _train(model, opt, batches[:3])
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": torch.utils._pytree.tree_map(
                lambda t: t.clone() if isinstance(t, torch.Tensor) else t, opt.state_dict())}
    _train(model, opt, batches[3:])  # the uninterrupted run

    torch.manual_seed(1)  # another initialisation, overwritten by the checkpoint
    fresh = _Net().to(dtype)
    fresh.load_state_dict(ckpt["model"])
    opt2 = _build(fresh, name, backend)  # built on weights already on their manifold
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k  # construction moved nothing
    opt2.load_state_dict(ckpt["opt"])
    _train(fresh, opt2, batches[3:])
    for (k, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), k
        ma, mb = opt.state[a].get("momentum_buffer"), opt2.state[b].get("momentum_buffer")
        assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma, mb)), k
