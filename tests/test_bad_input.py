"""Bad input: a clear error naming the parameter (and row), before any weight changes."""

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_sphere_row_with_bad_norm_is_rejected_before_anything_moves(bad):
    ok = torch.randn(3, 4)
    w = torch.randn(5, 4)
    w[3] = bad
    p_ok, p_bad = ok.clone().requires_grad_(), w.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*row 3"):
        msgd.UNSGD([p_ok, p_bad], lr=0.1)
    assert torch.equal(p_ok.detach(), ok)  # the good tensor was not normalised either
    assert torch.equal(p_bad.detach()[:3], w[:3])


@pytest.mark.parametrize("manifold", ["sphere", "psi"])
def test_weight_decay_with_explicit_manifold_is_an_error(manifold):
    with pytest.raises(ValueError, match="weight_decay"):
        msgd.ManifoldSGD([torch.randn(3, 4).requires_grad_()], lr=0.1, manifold=manifold, weight_decay=1e-4)


def test_weight_decay_with_auto_reaches_euclidean_tensors_only():
    w, b = torch.randn(3, 4).requires_grad_(), torch.ones(3).requires_grad_()
    opt = msgd.PSISGD([w, b], lr=0.1, weight_decay=0.5)
    w0 = w.detach().clone()
    w.grad, b.grad = torch.zeros(3, 4), torch.zeros(3)
    opt.step()
    assert torch.equal(w.detach(), w0)  # zero gradient on a PSI row: no decay
    torch.testing.assert_close(b.detach(), torch.full((3,), 1 - 0.1 * 0.5))


@pytest.mark.parametrize("kw,match", [
    (dict(manifold="hyperbolic"), "manifold"), (dict(granularity="channel"), "granularity"),
    (dict(grouping="random"), "grouping"), (dict(adaptive="yes"), "adaptive"),
    (dict(group_size=0), "group_size"), (dict(group_size=2.5), "group_size"),
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(nesterov=True), "nesterov"),
    (dict(curvature=-1.0), "curvature"), (dict(psi_max_norm=0.0), "psi_max_norm"),
    (dict(backend="gpu"), "backend"), (dict(granularity="kernel"), "kernel"),
    (dict(grouping="PI"), "PI"),
])
def test_unknown_or_invalid_options(kw, match):
    w = torch.randn(3, 4)
    p = w.clone().requires_grad_()
    with pytest.raises(ValueError, match=match):
        msgd.ManifoldSGD([p], **{"lr": 0.1, **kw})
    assert torch.equal(p.detach(), w)


def test_invalid_option_set_later_is_caught_at_step_before_anything_moves():
    a, b = torch.randn(3, 4).requires_grad_(), torch.randn(3, 4).requires_grad_()
    opt = msgd.ManifoldSGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.param_groups[1]["adaptive"] = "bogus"
    a.grad, b.grad = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*adaptive"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_rejected_before_anything_moves(backend):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    w = torch.randn(4, 4).requires_grad_()
    opt = msgd.ManifoldSGD([{"params": [w]}, {"params": emb.parameters(), "manifold": "euclidean"}],
                           lr=0.1, backend=backend)
    w0, e0 = w.detach().clone(), emb.weight.detach().clone()
    w.grad = torch.randn(4, 4)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*sparse"):
        opt.step()
    assert torch.equal(w.detach(), w0) and torch.equal(emb.weight.detach(), e0)


def test_complex_and_integer_params_rejected():
    with pytest.raises(ValueError, match="complex"):
        msgd.ManifoldSGD([torch.randn(3, 3, dtype=torch.complex64, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="dtype"):
        msgd.ManifoldSGD([torch.zeros(3, 3, dtype=torch.int32)], lr=0.1)


def test_native_backend_unavailable_raises(monkeypatch):
    from manifold_sgd import _native
    monkeypatch.setattr(_native, "_C", None)
    with pytest.raises(RuntimeError, match="native"):
        msgd.UNSGD([torch.randn(3, 3, requires_grad=True)], lr=0.1, backend="native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(msgd.UNSGD, dict(momentum=0.9)), (msgd.PSISGD, dict(momentum=0.9)),
                                    (msgd.FGSGD, dict(momentum=0.9, grouping="PO", group_size=2)),
                                    (msgd.ManifoldSGD, dict(manifold="euclidean", momentum=0.9))],
                         ids=["un", "psi", "fg-po", "euclidean"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_never_makes_weights_nonfinite(backend, cls, kw, bad):
    w = torch.randn(6, 5).requires_grad_()
    opt = cls([w], lr=0.1, backend=backend, **kw)
    w.grad = torch.randn(6, 5)
    opt.step()
    w1, m1 = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    g = torch.randn(6, 5)
    g[2, 3] = bad
    w.grad = g
    with pytest.warns(RuntimeWarning, match=r"row 2"):
        opt.step()
    assert torch.isfinite(w).all() and torch.isfinite(opt.state[w]["momentum_buffer"]).all()
    assert torch.equal(w.detach()[2], w1[2])  # the bad row (its group, when adaptive) is held
    assert torch.equal(opt.state[w]["momentum_buffer"][2], m1[2])
    held = 2 if kw.get("grouping") == "PO" else 1  # PO groups of 2: the partner row is held too
    assert opt.skipped_rows == held
    moved = [r for r in range(6) if not torch.equal(w.detach()[r], w1[r])]
    assert len(moved) == 6 - held


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_still_run_after_steady_steps(backend):
    # a step whose parameters and options are what the last step checked skips the layout
    # checks; anything that changes since must still be caught before a weight moves
    conv = torch.randn(4, 3, 3, 3).requires_grad_()
    w = torch.randn(5, 6).requires_grad_()
    opt = msgd.FGSGD([{"params": [conv], "granularity": "kernel", "grouping": "PI"}, {"params": [w]}],
                     lr=0.1, backend=backend)
    for _ in range(2):
        conv.grad, w.grad = torch.randn_like(conv), torch.randn_like(w)
        opt.step()

    def refused(match, **grads):
        before = conv.detach().clone(), w.detach().clone()
        conv.grad, w.grad = grads.get("conv", torch.randn_like(conv)), grads.get("w", torch.randn_like(w))
        with pytest.raises(ValueError, match=match):
            opt.step()
        assert torch.equal(conv.detach(), before[0]) and torch.equal(w.detach(), before[1])

    refused(r"param_groups\[1\]\['params'\]\[0\].*sparse", w=torch.randn(5, 6).to_sparse())
    opt.param_groups[1]["granularity"] = "kernel"  # a 2-D tensor has no kernels
    refused(r"param_groups\[1\]\['params'\]\[0\].*kernel")
    opt.param_groups[1]["granularity"] = "filter"
    opt.param_groups[0]["grouping"] = "PIO"
    opt.param_groups[0]["granularity"] = "filter"  # PIO needs kernel granularity
    refused(r"param_groups\[0\]\['params'\]\[0\].*PIO")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reshaped_parameter_is_stepped_with_its_new_rows(backend):
    # the same parameter object with another shape (p.data = ...): new rows, new plan
    w = torch.randn(4, 6).requires_grad_()
    opt = msgd.UNSGD([w], lr=0.1, momentum=0.0, backend=backend)
    w.grad = torch.randn(4, 6)
    opt.step()
    w.data = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    w.grad = torch.randn(6, 4)
    opt.step()
    norms = w.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(6), rtol=0, atol=1e-5)
