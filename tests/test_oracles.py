"""External oracles: geoopt's RiemannianSGD on the sphere, and the PSI paper's Theorem 1."""
import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS

geoopt = pytest.importorskip("geoopt")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_un_with_momentum_equals_geoopt_sphere(backend, nesterov):
    torch.manual_seed(0)
    w0 = torch.randn(9, 16, dtype=torch.float64)
    w0 = w0 / w0.norm(dim=1, keepdim=True)
    ours = w0.clone().requires_grad_()
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    o1 = msgd.UNSGD([ours], lr=0.07, momentum=0.8, nesterov=nesterov, backend=backend)
    o2 = geoopt.optim.RiemannianSGD([theirs], lr=0.07, momentum=0.8, nesterov=nesterov)
    # geoopt's first momentum step would add momentum x the raw gradient: start its buffer at zero
    o2.state[theirs]["momentum_buffer"] = torch.zeros_like(w0)
    o2.state[theirs]["step"] = 0
    for _ in range(6):
        g = torch.randn(9, 16, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o1.state[ours]["momentum_buffer"], o2.state[theirs]["momentum_buffer"],
                                   rtol=1e-10, atol=1e-12)


def _bn_net(seed, scale=None):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16, eps=1e-30), torch.nn.ReLU(),
                              torch.nn.Linear(16, 12, bias=False), torch.nn.BatchNorm1d(12, eps=1e-30), torch.nn.ReLU(),
                              torch.nn.Linear(12, 3)).double()
    if scale is not None:
        with torch.no_grad():
            net[0].weight.mul_(scale[0].view(-1, 1))
            net[3].weight.mul_(scale[1].view(-1, 1))
    return net


def _groups(net):
    # rows feeding batch norm are scale-invariant (exactly so with a negligible BN eps): PSI;
    # the head is Euclidean
    return [{"params": [net[0].weight, net[3].weight]},
            {"params": list(net[1].parameters()) + list(net[4].parameters()) + list(net[6].parameters()),
             "manifold": "euclidean"}]


def _step_both(runs, x, y):
    """One training step of each (model, optimizer) on the same batch."""
    for model, opt in runs:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_psi_equivariance_theorem_1(backend, momentum):
    """Starting from (W, U) and (T_a(W), T_a(U)), every iterate satisfies W^_t = T_a(W_t)."""
    g = torch.Generator().manual_seed(5)
    a = [torch.exp(2 * torch.randn(16, generator=g, dtype=torch.float64)),
         torch.exp(2 * torch.randn(12, generator=g, dtype=torch.float64))]
    net, net_a = _bn_net(1), _bn_net(1, scale=a)
    o = msgd.PSISGD(_groups(net), lr=0.05, momentum=momentum, backend=backend)
    oa = msgd.PSISGD(_groups(net_a), lr=0.05, momentum=momentum, backend=backend)
    x, y = torch.randn(64, 10, dtype=torch.float64, generator=g), torch.randint(0, 3, (64,), generator=g)
    for step in range(15):
        _step_both(((net, o), (net_a, oa)), x, y)
        torch.testing.assert_close(net_a[0].weight, a[0].view(-1, 1) * net[0].weight, rtol=1e-9, atol=0)
        torch.testing.assert_close(net_a[3].weight, a[1].view(-1, 1) * net[3].weight, rtol=1e-9, atol=0)
        torch.testing.assert_close(net_a[6].weight, net[6].weight, rtol=1e-9, atol=1e-12)
    # and training did something
    assert not torch.allclose(net[6].weight, _bn_net(1)[6].weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psi_guard_keeps_the_equivalence_class(backend):
    """With renormalisation triggering in one run only, rows stay equal up to a positive scale."""
    a = [torch.full((16,), 50.0, dtype=torch.float64), torch.full((12,), 50.0, dtype=torch.float64)]
    net, net_a = _bn_net(2), _bn_net(2, scale=a)
    o = msgd.PSISGD(_groups(net), lr=0.05, momentum=0.9, backend=backend, psi_max_norm=1e4)
    oa = msgd.PSISGD(_groups(net_a), lr=0.05, momentum=0.9, backend=backend, psi_max_norm=20.0)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(64, 10, dtype=torch.float64, generator=g), torch.randint(0, 3, (64,), generator=g)
    for _ in range(8):
        _step_both(((net, o), (net_a, oa)), x, y)
    assert float(net_a[0].weight.detach().norm(dim=1).max()) <= 20.0 * 1.01  # the guard ran in this run
    for i in (0, 3):
        u = net[i].weight / net[i].weight.norm(dim=1, keepdim=True)
        v = net_a[i].weight / net_a[i].weight.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(net_a[6].weight, net[6].weight, rtol=1e-9, atol=1e-12)
