"""Stiefel components (SPEC §2): invariants, native = reference, a problem with a known answer."""
import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS, DTYPES, TOL, dtype_id
from manifold_sgd import reference

ORTH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _blocks(p, granularity):
    if granularity == "kernel":
        return p.detach().double().reshape(p.shape[0] * p.shape[1], p.shape[2], -1)
    return p.detach().double().reshape(1, p.shape[0], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("retraction", ["qr", "polar"])
@pytest.mark.parametrize("granularity,shape", [("kernel", (6, 4, 3, 3)), ("filter", (5, 12)),
                                               ("filter", (8, 3, 3, 3)), ("kernel", (4, 2, 2, 5))])
def test_rows_stay_orthonormal_and_momentum_tangent(backend, dtype, retraction, granularity, shape):
    p = torch.randn(shape).to(dtype).requires_grad_()
    opt = msgd.ManifoldSGD([p], lr=0.1, momentum=0.9, manifold="stiefel", granularity=granularity,
                           retraction=retraction, backend=backend)
    for _ in range(5):
        p.grad = torch.randn(shape).to(dtype)
        opt.step()
        W = _blocks(p, granularity)
        eye = torch.eye(W.shape[1], dtype=torch.float64)
        assert float((W @ W.transpose(-1, -2) - eye).abs().max()) <= ORTH_TOL[dtype]
        m = opt.state[p]["momentum_buffer"].double().reshape(W.shape)
        sym = m @ W.transpose(-1, -2)
        # tangent: sym(m W^T) = 0 (16-bit W carries its storage rounding)
        tol = 1e-10 if dtype == torch.float64 else 50 * ORTH_TOL[dtype]
        assert float((sym + sym.transpose(-1, -2)).abs().max()) <= tol * (1 + float(m.abs().max()))


def test_tangent_projection_idempotent_and_orthogonal_to_normal_space():
    w, _ = reference.orthonormalize_blocks(torch.randn(7, 3, 8, dtype=torch.float64),
                                           torch.ones(7, 1, 1, dtype=torch.float64))
    z = torch.randn(7, 3, 8, dtype=torch.float64)
    rho = torch.ones(7, 1, 1, dtype=torch.float64)
    xi = reference.stiefel_project(w, z, rho)
    torch.testing.assert_close(reference.stiefel_project(w, xi, rho), xi, rtol=1e-12, atol=1e-12)
    s = torch.randn(7, 3, 3, dtype=torch.float64)
    normal = (s + s.transpose(-1, -2)) @ w  # the normal space at W: {S W, S symmetric}
    assert float((xi * normal).sum(dim=(1, 2)).abs().max()) < 1e-12
    torch.testing.assert_close(reference.stiefel_project(w, normal, rho), torch.zeros_like(normal),
                               rtol=0, atol=1e-12)


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(retraction="qr", momentum=0.9),
                                  dict(retraction="polar", momentum=0.9, nesterov=True),
                                  dict(adaptive="sphere", grouping="PI", group_size=2, momentum=0.5),
                                  dict(adaptive="general", grouping="PIO", curvature=0.5, retraction="polar")],
                         ids=["qr", "polar-nesterov", "fg-pi", "fg-pio-general"])
def test_native_equals_reference(dtype, opts):
    shapes = [(6, 4, 3, 3), (3, 2, 2, 4)]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(3)]
    out = {}
    for backend in ("native", "reference"):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
        opt = msgd.ManifoldSGD(params, lr=0.1, manifold="stiefel", granularity="kernel", backend=backend, **opts)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(dtype)
            opt.step()
        out[backend] = (params, opt)
    for a, b in zip(out["native"][0], out["reference"][0]):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), **TOL[dtype])
        if "momentum_buffer" in out["native"][1].state[a]:
            atol = max(TOL[dtype]["atol"], 1e-6 if dtype != torch.float64 else 1e-12)
            torch.testing.assert_close(out["native"][1].state[a]["momentum_buffer"].double(),
                                       out["reference"][1].state[b]["momentum_buffer"].double(),
                                       rtol=TOL[dtype]["rtol"], atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("retraction", ["qr", "polar"])
def test_top_eigenspace_of_symmetric_matrix(backend, retraction):
    """max tr(W A W^T) over 3 x 10 orthonormal W is reached on the top-3 eigenspace of A."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    evals = torch.tensor([5.0, 4.0, 3.5, 1.0, 0.5, 0.2, 0.1, 0.0, -0.5, -1.0], dtype=torch.float64)
    A = q @ torch.diag(evals) @ q.T
    W = torch.randn(3, 10, generator=g, dtype=torch.float64).requires_grad_()
    opt = msgd.ManifoldSGD([W], lr=0.05, momentum=0.5, manifold="stiefel", retraction=retraction, backend=backend)
    for _ in range(400):
        opt.zero_grad()
        (-torch.trace(W @ A @ W.T)).backward()
        opt.step()
    _, V = torch.linalg.eigh(A)
    top = V[:, -3:]
    torch.testing.assert_close(W.detach().T @ W.detach(), top @ top.T, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_blocks_take_the_batched_path_and_agree(backend):
    # 40 x 64 block: more rows than the fused kernel holds; served by batched linear algebra
    a = torch.randn(40, 64, dtype=torch.float64)
    p1, p2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    o1 = msgd.ManifoldSGD([p1], lr=0.1, momentum=0.9, manifold="stiefel", backend=backend)
    o2 = msgd.ManifoldSGD([p2], lr=0.1, momentum=0.9, manifold="stiefel", backend="reference")
    for _ in range(2):
        g = torch.randn(40, 64, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1.detach() @ p1.detach().T, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)


def test_polar_of_3x3_blocks_on_huge_steps_as_the_reference():
    # 3x3 kernels take the native lane path's Newton polar; W - lr xi = W (I - lr S), S skew, has
    # condition number sqrt(1 + lr^2 s^2): at lr 3e5 some blocks are clearly well conditioned
    # (Newton), some near the float32 rank tolerance (the Jacobi route); float64, whose rank
    # tolerance is far beyond, steps them all, as the reference (SVD)
    lr, shape = 3e5, (4, 4, 3, 3)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("native", "reference"):
        p = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        opt = msgd.ManifoldSGD([p], lr=lr, manifold="stiefel", granularity="kernel", retraction="polar",
                               backend=backend)
        w0 = p.detach().reshape(16, 3, 3).clone()
        p.grad = g.clone()
        opt.step()
        out[backend] = p.detach().reshape(16, 3, 3).clone()
    y = w0 - lr * reference.stiefel_project(w0, g.reshape(16, 3, 3), torch.ones(16, 1, 1, dtype=torch.float64))
    sv = torch.linalg.svdvals(y)
    cond = sv[:, 0] / sv[:, -1]
    newton = cond < 7e5
    assert newton.any() and (cond > 7.5e5).any()
    assert not (out["native"] == w0).flatten(1).all(dim=1).any()
    # Newton works on the block itself: exact to rounding; the Jacobi route goes through the
    # Gram matrix and loses about eps * cond^2 (1e-4 here)
    torch.testing.assert_close(out["native"][newton], out["reference"][newton], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["native"], out["reference"], rtol=0, atol=1e-3)


def test_more_rows_than_columns_is_an_error():
    with pytest.raises(ValueError, match=r"\(5, 3\).*more rows than columns"):
        msgd.ManifoldSGD([torch.randn(5, 3, requires_grad=True)], lr=0.1, manifold="stiefel")


def test_rank_deficient_block_is_an_error_before_anything_moves():
    w = torch.randn(4, 3, 3, 3)
    w[2, 1] = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]))  # rank 1
    ok = torch.randn(3, 2, 3, 3)
    p_ok, p = ok.clone().requires_grad_(), w.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*block 7 is rank-deficient"):
        msgd.ManifoldSGD([p_ok, p], lr=0.1, manifold="stiefel", granularity="kernel")
    assert torch.equal(p_ok.detach(), ok) and torch.equal(p.detach(), w)


def test_stiefel_needs_a_matrix_and_no_weight_decay():
    with pytest.raises(ValueError, match="stiefel"):
        msgd.ManifoldSGD([torch.randn(5, requires_grad=True)], lr=0.1, manifold="stiefel")
    with pytest.raises(ValueError, match="weight_decay"):
        msgd.ManifoldSGD([torch.randn(2, 5, requires_grad=True)], lr=0.1, manifold="stiefel", weight_decay=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_mix_sphere_and_stiefel_components(backend):
    """FG-SGD groups spanning manifolds: each component's ||g~||^2 enters its own tensor's group norm."""
    conv = torch.randn(4, 2, 3, 3).requires_grad_()
    lin = torch.randn(6, 10).requires_grad_()
    opt = msgd.FGSGD([{"params": [conv], "manifold": "stiefel", "granularity": "kernel", "grouping": "PI"},
                      {"params": [lin], "manifold": "sphere", "grouping": "PO", "group_size": 3}],
                     lr=0.1, momentum=0.9, backend=backend)
    for _ in range(3):
        conv.grad, lin.grad = torch.randn(4, 2, 3, 3), torch.randn(6, 10)
        opt.step()
    W = conv.detach().reshape(8, 3, 3)
    torch.testing.assert_close(W @ W.transpose(1, 2), torch.eye(3).expand(8, 3, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(lin.detach().norm(dim=1), torch.ones(6), rtol=0, atol=1e-5)
