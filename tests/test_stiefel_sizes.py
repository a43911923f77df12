"""The CPU kernel's Stiefel block sizes (compile-time 1x1, 3x3, 5x5, 7x7; run-time 1 x k, 4x6,
p > 8): native = reference (SPEC §5) with QR and polar retractions, with and without momentum
and with an adaptive group, in float32, float64 and bfloat16; blocks stay orthonormal; a
non-finite gradient leaves its block (its group) unchanged and is reported."""
import pytest
import torch

import manifold_sgd as msgd
from conftest import TOL, dtype_id

pytestmark = pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")

# (out, in, kh, kw): kernel-granular blocks are kh x kw; 3-D conv weights give 1 x k blocks
SHAPES = [(5, 4, 1, 1), (3, 4, 3, 3), (3, 2, 5, 5), (2, 2, 7, 7), (4, 3, 9), (3, 3, 4, 6), (2, 1, 10, 12)]
OPTS = {"qr": dict(retraction="qr"),
        "polar-momentum": dict(retraction="polar", momentum=0.9),
        "qr-momentum-nesterov": dict(retraction="qr", momentum=0.9, nesterov=True),
        "polar-adaptive-PI": dict(retraction="polar", momentum=0.5, adaptive="sphere", grouping="PI", group_size=2)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _run(backend, shape, dtype, opts, grads):
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    opt = msgd.ManifoldSGD([p], lr=0.1, manifold="stiefel", granularity="kernel", backend=backend, **opts)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p, opt


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", list(OPTS.values()), ids=list(OPTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_equals_reference_and_stays_orthonormal(shape, opts, dtype):
    rows = shape[2] if len(shape) == 4 else 1
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    (pn, on), (pr, orf) = (_run(b, shape, dtype, opts, grads) for b in ("native", "reference"))
    torch.testing.assert_close(pn.detach().double(), pr.detach().double(), **TOL[dtype])
    if "momentum_buffer" in on.state[pn]:
        m_ref = orf.state[pr]["momentum_buffer"].double()
        atol = max(TOL[dtype]["atol"], 1e-6 if dtype != torch.float64 else 1e-12)
        if dtype == torch.float32:
            # The transported buffer goes through the polar/QR factor, which the kernel (via the
            # p x p Gram matrix) and the reference (LAPACK's SVD/QR, whose rounding depends on the
            # CPU's code path) form differently: allow 4p float32 ulps of the buffer's scale
            # (measured over 20 seeds: at most ~1.7p, p = 5 and 10 the largest).
            atol = max(atol, 4 * rows * torch.finfo(torch.float32).eps * float(m_ref.abs().max()))
        torch.testing.assert_close(on.state[pn]["momentum_buffer"].double(), m_ref,
                                   rtol=TOL[dtype]["rtol"], atol=atol)
    kh, kw = (1, shape[2]) if len(shape) == 3 else shape[2:]
    W = pn.detach().double().reshape(-1, kh, kw)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert float((W @ W.transpose(1, 2) - torch.eye(kh, dtype=torch.float64)).abs().max()) <= tol


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("opts", [OPTS["qr"], OPTS["polar-adaptive-PI"]], ids=["qr", "polar-adaptive-PI"])
@pytest.mark.parametrize("shape", [(5, 4, 1, 1), (3, 4, 3, 3), (3, 3, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_non_finite_gradient_holds_its_block(shape, opts, bad_value):
    p = torch.randn(shape, dtype=torch.float32).requires_grad_()
    opt = msgd.ManifoldSGD([p], lr=0.2, manifold="stiefel", granularity="kernel", backend="native", **opts)
    before = p.detach().clone()
    g = torch.randn(shape)
    g.view(-1, *shape[2:])[7].view(-1)[0] = bad_value  # block 7
    p.grad = g
    with pytest.warns(RuntimeWarning):
        opt.step()
    blocks, old = p.detach().view(-1, *shape[2:]), before.view(-1, *shape[2:])
    assert torch.equal(blocks[7], old[7])
    held = {7}
    if opts.get("adaptive"):  # the group of block 7 is held whole
        groups = [set(gr) for gr in _groups(opt, p)]
        held = next(gr for gr in groups if 7 in gr)
    for i in range(blocks.shape[0]):
        if i in held:
            assert torch.equal(blocks[i], old[i]), i
        elif shape[2:] != (1, 1):  # a 1x1 block is +-1 and stays there
            assert not torch.equal(blocks[i], old[i]), i


def _groups(opt, p):
    st = opt.state[p]
    order, sizes = st["row_order"].tolist(), st["group_sizes"].tolist()
    out, at = [], 0
    for s in sizes:
        out.append(order[at:at + s])
        at += s
    return out


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("retraction", ["qr", "polar"])
@pytest.mark.parametrize("shape", [(64, 16, 1, 1), (16, 16, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_a_block_steps_to_the_same_bits_whatever_its_neighbours(shape, retraction, nesterov):
    # float32 1x1 blocks stream through whole vectors and 3x3 blocks go 8 to a vector; a block that
    # cannot be stepped sends its neighbours to the lane path: they must come out bitwise the same
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    out = []
    for bad in (None, 37):
        p = w0.clone().requires_grad_()
        opt = msgd.ManifoldSGD([p], lr=0.05, momentum=0.9, nesterov=nesterov, manifold="stiefel",
                               granularity="kernel", retraction=retraction, backend="native")
        for k, g in enumerate(grads):
            g = g.clone()
            if bad is not None and k == 1:
                g.view(-1, *shape[2:])[bad].view(-1)[0] = float("nan")
            p.grad = g
            if bad is not None and k == 1:
                with pytest.warns(RuntimeWarning):
                    opt.step()
            else:
                opt.step()
        out.append((p.detach().view(-1, *shape[2:]).clone(),
                    opt.state[p]["momentum_buffer"].view(-1, *shape[2:]).clone()))
    (w_clean, m_clean), (w_bad, m_bad) = out
    keep = torch.ones(w_clean.shape[0], dtype=torch.bool)
    keep[37] = False
    assert torch.equal(w_clean[keep], w_bad[keep]) and torch.equal(m_clean[keep], m_bad[keep])
    assert not torch.equal(w_clean[37], w_bad[37]) or shape[2:] == (1, 1)


@pytest.mark.parametrize("opts", [OPTS["qr"], OPTS["polar-momentum"]], ids=["qr", "polar-momentum"])
def test_bad_blocks_inside_a_run_of_3x3_blocks(opts):
    """Consecutive 3x3 float blocks go 8 at a time; a batch holding a bad block is redone block
    by block and the run resumes after it. With bad blocks in the first and third batches, those
    two are held (their momentum too) and every other block, before, between and after them,
    is stepped as the reference steps it."""
    shape, bad = (4, 10, 3, 3), (7, 21)  # 40 blocks: five batches of eight
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    for g in grads:
        for b in bad:
            g.view(-1, 3, 3)[b, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning):
        (pn, on), (pr, orf) = (_run(b, shape, torch.float32, opts, grads) for b in ("native", "reference"))
    for b in bad:  # held on both paths: still the weights the constructor placed
        assert torch.equal(pn.detach().view(-1, 3, 3)[b], pr.detach().view(-1, 3, 3)[b]), b
        if "momentum_buffer" in on.state[pn]:
            assert not on.state[pn]["momentum_buffer"].view(-1, 3, 3)[b].any(), b
    torch.testing.assert_close(pn.detach().double(), pr.detach().double(), **TOL[torch.float32])
    if "momentum_buffer" in on.state[pn]:
        torch.testing.assert_close(on.state[pn]["momentum_buffer"].double(),
                                   orf.state[pr]["momentum_buffer"].double(), rtol=1e-5, atol=1e-6)
