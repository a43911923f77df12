"""geoopt parameters: a ManifoldParameter on geoopt.Sphere is optimised on that sphere, with
rows along the last dim as geoopt defines them; other geoopt manifolds are clear errors."""
import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS

geoopt = pytest.importorskip("geoopt")


def _geoopt_run(w0, grads, lr, momentum, nesterov=False, manifold=None):
    theirs = geoopt.ManifoldParameter(w0.clone(), manifold=manifold or geoopt.Sphere())
    opt = geoopt.optim.RiemannianSGD([theirs], lr=lr, momentum=momentum, nesterov=nesterov)
    if momentum:
        # geoopt's first step would use (1 + momentum) x the raw gradient: start its buffer at 0
        opt.state[theirs]["momentum_buffer"] = torch.zeros_like(w0)
        opt.state[theirs]["step"] = 0
    for g in grads:
        theirs.grad = g.clone()
        opt.step()
    return theirs.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (4, 2, 3, 3), (6,)], ids=str)
@pytest.mark.parametrize("cls", [msgd.UNSGD, msgd.ManifoldSGD, msgd.PSISGD])
def test_geoopt_sphere_params_step_like_geoopt_with_last_dim_rows(backend, shape, cls):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    w0 = w0 / w0.norm(dim=-1, keepdim=True)  # on geoopt's sphere: unit last-dim rows
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.Sphere())
    # the parameter's own manifold wins over the class default (PSISGD's "auto" is psi)
    opt = cls([ours], lr=0.1, momentum=0.9, backend=backend)
    for grad in grads:
        ours.grad = grad.clone()
        opt.step()
    expected = _geoopt_run(w0, grads, 0.1, 0.9)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.detach().norm(dim=-1), torch.ones(shape[:-1], dtype=torch.float64))
    if len(shape) >= 3:  # not the filter rows of the same tensor
        assert not torch.allclose(ours.detach().reshape(shape[0], -1).norm(dim=1),
                                  torch.ones(shape[0], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_geoopt_sphere_with_fgsgd_tensor_groups_and_plain_params_together(backend):
    g = torch.Generator().manual_seed(1)
    sph = geoopt.ManifoldParameter(torch.randn(3, 4, 5, generator=g), manifold=geoopt.Sphere())
    plain = torch.randn(6, 5, generator=g).requires_grad_()
    free = geoopt.ManifoldParameter(torch.randn(4, 4, generator=g))  # geoopt's default: Euclidean
    free0 = free.detach().clone()
    opt = msgd.FGSGD([sph, plain, free], lr=0.1, momentum=0.9, backend=backend)
    assert torch.equal(free.detach(), free0)  # not placed on a sphere
    for p in (sph, plain, free):
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    torch.testing.assert_close(sph.detach().norm(dim=-1), torch.ones(3, 4))  # last-dim rows
    torch.testing.assert_close(plain.detach().norm(dim=1), torch.ones(6))  # filter rows
    torch.testing.assert_close(free.detach(), free0 - 0.1 * free.grad)  # Euclidean step


def test_conflicting_or_unsupported_geoopt_manifolds_are_clear_errors():
    sph = geoopt.ManifoldParameter(torch.randn(4, 5), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match=r"geoopt Sphere parameter in a group with manifold='psi'"):
        msgd.ManifoldSGD([sph], lr=0.1, manifold="psi")
    with pytest.raises(ValueError, match="grouping='PO' needs granularity"):
        msgd.FGSGD([sph], lr=0.1, grouping="PO")
    stiefel = geoopt.ManifoldParameter(torch.linalg.qr(torch.randn(6, 3))[0], manifold=geoopt.Stiefel())
    with pytest.raises(ValueError, match="Stiefel parameters are not supported: geoopt.s Stiefel points "
                                         ".* have orthonormal columns"):
        msgd.UNSGD([stiefel], lr=0.1)
    ball = geoopt.ManifoldParameter(torch.zeros(3, 2), manifold=geoopt.PoincareBall())
    with pytest.raises(ValueError, match="PoincareBall is not supported"):
        msgd.UNSGD([ball], lr=0.1)
    sub = geoopt.ManifoldParameter(torch.randn(5), manifold=geoopt.Sphere(intersection=torch.eye(5)[:, :2]))
    with pytest.raises(ValueError, match="subspace"):
        msgd.UNSGD([sub], lr=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sphere_exact_params_use_the_projection_retraction(backend):
    w0 = torch.randn(4, 6, dtype=torch.float64)
    w0 = w0 / w0.norm(dim=-1, keepdim=True)
    g = torch.randn(4, 6, dtype=torch.float64)
    exact = geoopt.ManifoldParameter(w0.clone(), manifold=geoopt.SphereExact())
    opt = msgd.UNSGD([exact], lr=0.3, backend=backend)
    exact.grad = g.clone()
    opt.step()
    proj = _geoopt_run(w0, [g], 0.3, 0.0)  # geoopt Sphere: projection retraction
    expmap = _geoopt_run(w0, [g], 0.3, 0.0, manifold=geoopt.SphereExact())
    torch.testing.assert_close(exact.detach(), proj, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(proj, expmap, rtol=1e-6, atol=1e-6)  # geoopt's own would differ
