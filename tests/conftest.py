"""Shared fixtures: a seed per test, backends, dtypes and tolerances in one place."""
import pytest
import torch

import manifold_sgd

BACKENDS = ["native", "reference"] if manifold_sgd.native_available() else ["reference"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# SPEC §5: native vs reference; 16-bit params carry their storage rounding.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}
# |‖w‖ − ρ| after a step, relative to ρ
NORM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def dtype_id(dt):
    return str(dt).replace("torch.", "")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waits make them 10-50x slower; the native kernel's own threading is tested apart."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
