"""SPEC §5 invariants on every backend, plus hand-derived steps."""
import math

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, DTYPES, NORM_TOL, dtype_id
from manifold_sgd import reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(momentum=0.9),
                                  dict(momentum=0.9, adaptive="sphere", grouping="PO", group_size=3),
                                  dict(granularity="kernel", momentum=0.5, nesterov=True)],
                         ids=["un", "fg-po", "kernel-nesterov"])
def test_sphere_rows_stay_on_sphere_and_momentum_tangent(backend, dtype, opts):
    params = [torch.randn(8, 3, 3, 3).to(dtype).requires_grad_()]
    if opts.get("granularity") != "kernel":  # kernel rows exist only for conv weights
        params.append(torch.randn(17, 33).to(dtype).requires_grad_())
    opt = msgd.ManifoldSGD(params, lr=0.1, manifold="sphere", backend=backend, **opts)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            row_len = 9 if opts.get("granularity") == "kernel" and p.dim() == 4 else p[0].numel()
            rows = p.detach().double().reshape(-1, row_len)
            norms = rows.norm(dim=1)
            assert (norms - 1).abs().max() <= NORM_TOL[dtype] * 1.01 + 1e-7
            m = opt.state[p]["momentum_buffer"].double().reshape(rows.shape)
            # <w, m> ~ 0 after transport (w as stored: 16-bit storage carries its rounding)
            cos = (rows * m).sum(1) / (m.norm(dim=1) + 1e-30)
            assert cos.abs().max() <= (1e-10 if dtype == torch.float64 else 20 * NORM_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_projection_is_orthogonal_and_idempotent(backend):
    w = torch.randn(10, 7, dtype=torch.float64)
    g = torch.randn(10, 7, dtype=torch.float64)
    gt = reference.riemannian_grad("sphere", w, g)
    assert ((w * gt).sum(1)).abs().max() < 1e-12
    torch.testing.assert_close(reference.riemannian_grad("sphere", w, gt), gt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_un_step_by_hand(backend):
    # w = e1, g = (1, 2, 0): g~ = (0, 2, 0); y = e1 - lr*(0,2,0); w' = y/|y|
    w = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    opt = msgd.UNSGD([w], lr=0.25, backend=backend)
    w.grad = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    opt.step()
    y = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(w.detach()[0], y / y.norm(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", ["sphere", "general"])
def test_fgsgd_step_by_hand(backend, adaptive):
    # One group of two unit rows. Row 0: w=e1, g=(3,4,0) -> g~=(0,4,0); row 1: w=e2, g=(0,5,12) -> g~=(0,0,12).
    # R = sqrt(16+144) = sqrt(160).  eq.7: r = R(2+R);  eq.5 with c=0.5, delta=2:
    # r = sqrt(R^2 * max((4+R)^2, 1+0.5(2+R))).
    w = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64, requires_grad=True)
    kw = dict(curvature=0.5, distance=2.0) if adaptive == "general" else {}
    opt = msgd.FGSGD([w], lr=0.1, adaptive=adaptive, backend=backend, **kw)
    w.grad = torch.tensor([[3.0, 4, 0], [0, 5, 12]], dtype=torch.float64)
    opt.step()
    R = math.sqrt(160.0)
    r = R * (2 + R) if adaptive == "sphere" else math.sqrt(R * R * max((4 + R) ** 2, 1 + 0.5 * (2 + R)))
    s = 1 / r
    y0 = torch.tensor([1.0, -0.1 * s * 4, 0], dtype=torch.float64)
    y1 = torch.tensor([0.0, 1.0, -0.1 * s * 12], dtype=torch.float64)
    torch.testing.assert_close(w.detach()[0], y0 / y0.norm(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(w.detach()[1], y1 / y1.norm(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fgsgd_small_gradient_is_plain_step(backend):
    # R(2+R) < 1 -> r = 1, s = 1: FG-SGD equals the UN update
    a = torch.randn(4, 6, dtype=torch.float64)
    g = 0.01 * torch.randn(4, 6, dtype=torch.float64)
    p1, p2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    o1 = msgd.FGSGD([p1], lr=0.3, backend=backend)
    o2 = msgd.UNSGD([p2], lr=0.3, backend=backend)
    p1.grad, p2.grad = g.clone(), g.clone()
    o1.step()
    o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psi_step_by_hand(backend):
    # PSI: w <- w - lr ||w||^2 g ; momentum m = mu m + d
    w0 = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    w = w0.clone().requires_grad_()
    opt = msgd.PSISGD([w], lr=0.01, momentum=0.5, backend=backend)
    g1, g2 = torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    w.grad = g1.clone()
    opt.step()
    m = 25 * g1
    exp = w0 - 0.01 * m
    torch.testing.assert_close(w.detach(), exp, rtol=1e-14, atol=1e-14)
    w.grad = g2.clone()
    opt.step()
    m = 0.5 * m + float((exp * exp).sum()) * g2
    torch.testing.assert_close(w.detach(), exp - 0.01 * m, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_psi_guard_renormalises_row_and_momentum(backend):
    w = torch.tensor([[30.0, 40.0], [0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    opt = msgd.PSISGD([w], lr=1e-4, momentum=0.9, psi_max_norm=10.0, backend=backend)
    w.grad = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    opt.step()
    y0 = torch.tensor([30.0 - 1e-4 * 2500, 40.0], dtype=torch.float64)
    n = y0.norm()
    torch.testing.assert_close(w.detach()[0], y0 / n, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"][0],
                               torch.tensor([2500.0, 0.0], dtype=torch.float64) / n, rtol=1e-14, atol=1e-14)
    # the small row is below the bound and untouched by the guard
    torch.testing.assert_close(w.detach()[1], torch.tensor([0.3 - 1e-4 * 0.25, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_matches_torch_sgd(backend):
    a = torch.randn(5, 4)
    p1, p2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    o1 = msgd.ManifoldSGD([p1], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                          manifold="euclidean", backend=backend)
    o2 = torch.optim.SGD([p2], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        g = torch.randn(5, 4)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retraction_is_second_order(backend):
    """error of R_w(t v) against the geodesic exp_w(t v) shrinks like t^2 or faster
    (log-log slope >= 2), as pymanopt checks its retractions."""
    torch.manual_seed(3)
    w = torch.randn(1, 20, dtype=torch.float64)
    w = w / w.norm()
    v = reference.riemannian_grad("sphere", w, torch.randn(1, 20, dtype=torch.float64))
    v = v / v.norm()
    ts = [10 ** (-k / 2) for k in range(2, 9)]
    errs = []
    for t in ts:
        p = w.clone().requires_grad_()
        opt = msgd.UNSGD([p], lr=t, backend=backend)
        p.grad = -v.clone()  # step direction +v
        opt.step()
        geo = math.cos(t) * w + math.sin(t) * v
        errs.append(float((p.detach() - geo).norm()))
    slopes = [(math.log(errs[i + 1]) - math.log(errs[i])) / (math.log(ts[i + 1]) - math.log(ts[i]))
              for i in range(len(ts) - 1)]
    # rounding dominates once the error nears 1e-15; use the well-resolved part
    good = [s for s, e in zip(slopes, errs[1:]) if e > 1e-13]
    assert len(good) >= 3
    assert min(good) >= 2.0 - 0.05, slopes
