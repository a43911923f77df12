"""Rescaled manifolds (SPEC §4): gamma by hand, lambda from the hooks, rescaling."""
import copy
import math

import pytest
import torch
from torch import nn

import manifold_sgd as msgd
from conftest import BACKENDS


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-30), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 10 * 10, 5, bias=False), nn.BatchNorm1d(5, eps=1e-30)).double()


def test_gamma_by_hand_for_conv_and_linear():
    net = _net()
    stats = msgd.FeatureStats(net)
    with torch.no_grad():
        net(torch.randn(4, 3, 10, 10, dtype=torch.float64))
    conv, lin = stats.layer(net[0].weight), stats.layer(net[4].weight)
    # conv: b = 3 input channels x 3x3 field = 27; b_hat = 10x10 map x 8 channels = 800
    assert conv.gamma() == pytest.approx(1 / math.sqrt(27 + 800), rel=1e-15)
    # linear: b = 800 inputs; b_hat = 5 outputs
    assert lin.gamma() == pytest.approx(1 / math.sqrt(800 + 5), rel=1e-15)
    assert conv.count == 0  # a no_grad probe gives geometry only (lambda^1 = 1)


def test_lambda_from_hooks_equals_direct_std():
    net = _net().train()
    stats = msgd.FeatureStats(net)
    xs = [torch.randn(6, 3, 10, 10, dtype=torch.float64) * (1 + i) + i for i in range(3)]
    for x in xs:
        net(x)
    allx = torch.cat(xs)
    conv = stats.layer(net[0].weight)
    per_ch = allx.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False)
    torch.testing.assert_close(conv.std_per_channel(), per_ch, rtol=1e-10, atol=0)
    assert conv.std_all() == pytest.approx(float(allx.std(unbiased=False)), rel=1e-10)
    lin = stats.layer(net[4].weight)
    assert lin.count == 18  # per input feature: 3 batches of 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("radius", ["geometric", "geometric_std"])
@pytest.mark.parametrize("manifold,granularity", [("sphere", "filter"), ("sphere", "kernel"), ("stiefel", "kernel")])
def test_rescale_moves_rows_to_new_radius_and_keeps_bn_loss(backend, radius, manifold, granularity):
    net = _net().train()
    stats = msgd.FeatureStats(net)
    opt = msgd.ManifoldSGD([{"params": [net[0].weight], "manifold": manifold, "granularity": granularity},
                            {"params": [net[4].weight], "manifold": "sphere"},
                            {"params": list(net[1].parameters()) + list(net[5].parameters()), "manifold": "euclidean"}],
                           lr=0.05, momentum=0.9, radius=radius, backend=backend)
    x, y = torch.randn(16, 3, 10, 10, dtype=torch.float64), torch.randint(0, 5, (16,))
    with torch.no_grad():
        net(x)  # geometry probe
    opt.rescale(stats)
    for _ in range(3):  # an "epoch": moments are gathered from these training passes
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    lam = stats.layer(net[0].weight)
    expected_conv = (lam.gamma() / (lam.std_per_channel().repeat(8) if granularity == "kernel"
                                    else torch.full((8 * (3 if granularity == "kernel" else 1),), lam.std_all(),
                                                    dtype=torch.float64))) if radius == "geometric_std" else None
    with torch.no_grad():
        before = nn.functional.cross_entropy(net(x), y).item()
    opt.rescale(stats)
    with torch.no_grad():
        after = nn.functional.cross_entropy(net(x), y).item()
    if granularity == "filter" or radius == "geometric":
        # one scale per output channel: batch norm makes the loss blind to it
        assert after == pytest.approx(before, rel=1e-9)
    else:
        # kernel rows of one filter get their input channel's lambda: the layer's function changes
        assert after != pytest.approx(before, rel=1e-9)
    rho = opt.state[net[0].weight]["radius"].double()
    if expected_conv is not None:
        torch.testing.assert_close(rho, expected_conv, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(rho, torch.full_like(rho, 1 / math.sqrt(27 + 800)), rtol=1e-6, atol=0)
    for _ in range(2):  # steps keep rows on the rescaled manifold
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    W = net[0].weight.detach()
    if manifold == "sphere":
        rows = W.reshape(rho.numel(), -1)
        torch.testing.assert_close(rows.norm(dim=1), rho, rtol=1e-6, atol=0)
        m = opt.state[net[0].weight]["momentum_buffer"].reshape(rows.shape)
        assert float(((rows * m).sum(1)).abs().max()) < 1e-10
    else:
        B = W.reshape(24, 3, 3)
        gram = B @ B.transpose(1, 2)
        torch.testing.assert_close(gram, (rho ** 2).view(-1, 1, 1) * torch.eye(3, dtype=torch.float64).expand(24, 3, 3),
                                   rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
def test_rescaled_native_equals_reference_and_radius_survives_checkpoint():
    out = []
    for backend in ("native", "reference"):
        net = _net().train()
        stats = msgd.FeatureStats(net)
        opt = msgd.FGSGD([{"params": [net[0].weight], "granularity": "kernel", "grouping": "PO", "group_size": 3},
                          {"params": [net[4].weight]}], lr=0.05, momentum=0.9, radius="geometric_std", backend=backend)
        x, y = torch.randn(16, 3, 10, 10, dtype=torch.float64), torch.randint(0, 5, (16,))
        for epoch in range(2):
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            opt.rescale(stats)
        sd = copy.deepcopy(opt.state_dict())
        out.append((net, sd))
    for a, b in zip(out[0][0].parameters(), out[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    net2 = _net()
    opt2 = msgd.FGSGD([{"params": [net2[0].weight], "granularity": "kernel", "grouping": "PO", "group_size": 3},
                       {"params": [net2[4].weight]}], lr=0.05, radius="geometric_std")
    opt2.load_state_dict(out[0][1])
    r = opt2.state[net2[0].weight]["radius"]
    assert r.dtype == torch.float32 and torch.equal(r, out[0][1]["state"][0]["radius"])


def test_rescale_names_an_unwatched_parameter():
    w = torch.randn(4, 6, requires_grad=True)
    opt = msgd.UNSGD([w], lr=0.1, radius="geometric")
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*FeatureStats"):
        opt.rescale(msgd.FeatureStats(nn.Linear(2, 2)))
