"""SPEC §6 (the Adam family) on the reference path, held to outside oracles: geoopt's
RiemannianAdam on its Sphere and EuclideanStiefel, torch.optim.AdamW, and the formulas
written out by hand (with the two bugs of earlier oblique-Adam code as regressions: the
second bias correction is square-rooted, and the first moment persists across steps)."""
import math

import pytest
import torch

from manifold_sgd import reference
from manifold_sgd.reference import AdamOptions, adam_rows

geoopt = pytest.importorskip("geoopt")


def _state(w, kind, second_moment):
    rows, n = w.shape
    m = torch.zeros(rows, n, dtype=w.dtype)
    v = torch.zeros(reference.second_moment_shape(kind, rows, n, second_moment), dtype=w.dtype)
    return m, v


def test_row_second_moment_on_sphere_rows_equals_geoopt_riemannian_adam():
    torch.manual_seed(0)
    w0 = torch.nn.functional.normalize(torch.randn(7, 11, dtype=torch.float64), dim=1)
    ours = w0.clone()
    m, v = _state(ours, "sphere", "row")
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    opt = geoopt.optim.RiemannianAdam([theirs], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    o = AdamOptions(lr=0.05, betas=(0.8, 0.95), eps=1e-6, second_moment="row")
    for t in range(1, 21):
        g = torch.randn(7, 11, dtype=torch.float64)
        theirs.grad = g.clone()
        opt.step()
        skipped = adam_rows(ours, g, m, v, kind="sphere", step=t, radius=None, opt=o)
        assert not skipped.any()
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"][:, 0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)


def test_row_second_moment_on_stiefel_blocks_equals_geoopt_on_the_transposed_point():
    """geoopt's EuclideanStiefel points are (n, p) with orthonormal columns, retracted by the QR
    factor with positive diagonal: the transpose of a p x n block with orthonormal rows and
    retraction='qr'; its second moment is one number per point (here: per block)."""
    torch.manual_seed(1)
    p, n = 3, 8
    w0, _ = reference.stiefel_retract(torch.randn(1, p, n, dtype=torch.float64),
                                      torch.ones(1, 1, 1, dtype=torch.float64), "qr")
    ours = w0.reshape(1, p * n).clone()
    m, v = _state(ours, "stiefel", "row")
    theirs = geoopt.ManifoldParameter(w0[0].T.clone(), manifold=geoopt.EuclideanStiefel())
    opt = geoopt.optim.RiemannianAdam([theirs], lr=0.03)
    o = AdamOptions(lr=0.03, second_moment="row", retraction="qr")
    for t in range(1, 11):
        g = torch.randn(p, n, dtype=torch.float64)
        theirs.grad = g.T.clone()
        opt.step()
        adam_rows(ours, g.reshape(1, -1), m, v, kind="stiefel", step=t, radius=None, opt=o, block_rows=p)
        torch.testing.assert_close(ours.view(p, n), theirs.detach().T, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(v[0], opt.state[theirs]["exp_avg_sq"][0, 0], rtol=1e-10, atol=1e-14)
    b = ours.view(p, n)
    torch.testing.assert_close(b @ b.T, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("second_moment", ["row", "element"])
def test_euclidean_rows_are_adamw(second_moment):
    torch.manual_seed(2)
    w0 = torch.randn(5, 6, dtype=torch.float64)
    ours = w0.clone()
    m, v = _state(ours, "euclidean", second_moment)
    assert v.shape == (5, 6)  # AdamW's element-wise v whatever second_moment says
    theirs = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    o = AdamOptions(lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1, second_moment=second_moment)
    for t in range(1, 16):
        g = torch.randn(5, 6, dtype=torch.float64)
        theirs.grad = g.clone()
        opt.step()
        adam_rows(ours, g, m, v, kind="euclidean", step=t, radius=None, opt=o)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=1e-12, atol=1e-15)


def test_element_second_moment_on_a_sphere_row_by_hand():
    """SPEC §6 for one row, element by element in plain Python floats."""
    torch.manual_seed(3)
    n, lr, b1, b2, eps = 5, 0.1, 0.9, 0.999, 1e-8
    w = [float(x) for x in torch.nn.functional.normalize(torch.randn(n, dtype=torch.float64), dim=0)]
    m, v = [0.0] * n, [0.0] * n
    ours = torch.tensor([w], dtype=torch.float64)
    mt, vt = _state(ours, "sphere", "element")
    o = AdamOptions(lr=lr, betas=(b1, b2), eps=eps, second_moment="element")
    for t in range(1, 5):
        g = [float(x) for x in torch.randn(n, dtype=torch.float64)]
        adam_rows(ours, torch.tensor([g], dtype=torch.float64), mt, vt, kind="sphere", step=t, radius=None, opt=o)
        ww = sum(x * x for x in w)
        c = sum(a * b for a, b in zip(w, g)) / ww
        gt = [gi - c * wi for gi, wi in zip(g, w)]
        m = [b1 * mi + (1 - b1) * x for mi, x in zip(m, gt)]  # persists: the old m enters
        v = [b2 * vi + (1 - b2) * x * x for vi, x in zip(v, gt)]
        uh = [(mi / (1 - b1 ** t)) / (math.sqrt(vi / (1 - b2 ** t)) + eps) for mi, vi in zip(m, v)]
        cu = sum(a * b for a, b in zip(w, uh)) / ww
        u = [x - cu * wi for x, wi in zip(uh, w)]
        y = [wi - lr * ui for wi, ui in zip(w, u)]
        ny = math.sqrt(sum(x * x for x in y))
        w = [x / ny for x in y]
        cm = sum(a * b for a, b in zip(w, m))
        m = [mi - cm * wi for mi, wi in zip(m, w)]
        torch.testing.assert_close(ours[0], torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(mt[0], torch.tensor(m, dtype=torch.float64), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(vt[0], torch.tensor(v, dtype=torch.float64), rtol=1e-12, atol=1e-16)


def test_bias_correction_square_rooted_on_the_first_step():
    """With m = v = 0, step 1 gives u_hat = g~/(|g~| + eps) per element (row: g~/(||g~|| + eps)):
    the size of the first move does not depend on beta2, as it would if 1 - beta2 were not
    square-rooted."""
    g = torch.tensor([[0.0, 3.0, 4.0]], dtype=torch.float64)
    for b2 in (0.9, 0.999):
        w = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        m, v = _state(w, "euclidean", "element")
        adam_rows(w, g, m, v, kind="euclidean", step=1, radius=None,
                  opt=AdamOptions(lr=0.1, betas=(0.9, b2), eps=1e-300))  # 0 / (0 + eps) = 0
        torch.testing.assert_close(w, torch.tensor([[1.0, -0.1, -0.1]], dtype=torch.float64), rtol=1e-14, atol=1e-15)
        w = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        m, v = _state(w, "sphere", "row")
        adam_rows(w, g, m, v, kind="sphere", step=1, radius=None,
                  opt=AdamOptions(lr=0.1, betas=(0.9, b2), eps=0.0))
        y = torch.tensor([1.0, -0.1 * 3 / 5, -0.1 * 4 / 5], dtype=torch.float64)
        torch.testing.assert_close(w[0], y / y.norm(), rtol=1e-14, atol=1e-15)


def test_non_finite_gradient_leaves_the_row_and_its_moments():
    w = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    m, v = torch.randn(3, 4, dtype=torch.float64) * 0.01, torch.rand(3, dtype=torch.float64)
    before = (w.clone(), m.clone(), v.clone())
    g = torch.randn(3, 4, dtype=torch.float64)
    g[1, 2] = float("nan")
    skipped = adam_rows(w, g, m, v, kind="sphere", step=3, radius=None, opt=AdamOptions(lr=0.1))
    assert skipped.tolist() == [False, True, False]
    assert torch.equal(w[1], before[0][1]) and torch.equal(m[1], before[1][1]) and torch.equal(v[1], before[2][1])
    assert not torch.equal(w[0], before[0][0]) and not torch.equal(v[2], before[2][2])
    with pytest.raises(ValueError, match="no PSI step"):
        adam_rows(w, g, m, v, kind="psi", step=1, radius=None, opt=AdamOptions(lr=0.1))
