"""Stiefel retractions on a GPU without host synchronisation (reference.stiefel_retract_no_sync):
the same factors as the exact QR / SVD ones, checked here on the CPU with the same torch ops;
on a GPU a Stiefel step runs under ``set_sync_debug_mode("error")``."""
import pytest
import torch

import manifold_sgd as msgd
from manifold_sgd import reference

SHAPES = [(50, 3, 3), (30, 1, 7), (20, 4, 9), (10, 16, 40), (5, 32, 32)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def near_stiefel(shape, dtype, noise, seed=0):
    """y = W + noise * Z with W on the Stiefel manifold: what a retraction is handed."""
    gen = torch.Generator().manual_seed(seed)
    w, _ = reference.stiefel_retract(torch.randn(shape, generator=gen, dtype=torch.float64),
                                     torch.ones(shape[0], 1, 1, dtype=torch.float64), "qr")
    return (w + noise * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", ["qr", "polar"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_no_sync_retraction_equals_the_exact_one(shape, method, dtype):
    y = near_stiefel(shape, dtype, noise=0.05)
    rho = torch.full((shape[0], 1, 1), 1.5, dtype=dtype)
    exact, ok_exact = reference.stiefel_retract(y, rho, method)
    fast, ok_fast = reference.stiefel_retract_no_sync(y, rho, method)
    assert ok_exact.all() and ok_fast.all()
    assert float((fast - exact).abs().max()) <= TOL[dtype] * 1.5
    eye = torch.eye(shape[1], dtype=dtype)
    assert float((fast @ fast.transpose(-1, -2) / 2.25 - eye).abs().max()) <= 10 * TOL[dtype]


@pytest.mark.parametrize("method", ["qr", "polar"])
def test_no_sync_retraction_flags_rank_deficient_and_non_finite_blocks(method):
    y = near_stiefel((4, 3, 5), torch.float64, noise=0.1)
    y[1, 2] = 2 * y[1, 0]  # rank 2
    y[2, 0, 1] = float("nan")
    out, ok = reference.stiefel_retract_no_sync(y, torch.ones(4, 1, 1, dtype=torch.float64), method)
    assert ok.tolist() == [True, False, False, True]
    assert torch.isfinite(out[[0, 3]]).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("retraction", ["qr", "polar"])
def test_stiefel_steps_on_a_gpu_never_synchronise(retraction, backend):
    """Stiefel blocks on CUDA (the CUDA kernel with "auto", the sync-free reference path otherwise):
    after the first step, no host sync."""
    gen = torch.Generator().manual_seed(3)
    convs = [torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen).cuda()) for _ in range(2)]
    opt = msgd.ManifoldSGD(convs, lr=0.05, momentum=0.9, manifold="stiefel", granularity="kernel",
                           retraction=retraction, backend=backend)
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in convs]
    opt_cpu = msgd.ManifoldSGD(cpu, lr=0.05, momentum=0.9, manifold="stiefel", granularity="kernel",
                               retraction=retraction, backend="reference")
    for k in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in cpu]
        for p, q, g in zip(convs, cpu, grads):
            p.grad, q.grad = g.cuda(), g
        if k == 0:
            opt.step()
            torch.cuda.synchronize()
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        opt_cpu.step()
    for p, q in zip(convs, cpu):
        assert float((p.detach().cpu() - q.detach()).abs().max()) <= 1e-5
