"""The steady-state step (steady.py): after a full step, a step with the same parameters,
options and state takes one native call per bucket. Everything the full path checks must
still be caught after the fast path engaged: each test engages it, changes one thing, and
asserts the error (nothing moved) or the reference path's result."""
from __future__ import annotations

import pytest
import torch

from manifold_sgd import PSISGD, UNSGD, ManifoldSGD, _native, checks, steady

pytestmark = [pytest.mark.skipif(not _native.available(), reason="needs the native extension"),
              pytest.mark.usefixtures("one_thread")]

SHAPES = [(6, 5), (4, 3, 2, 2), (7,), (3, 8)]


def _params():
    torch.manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def _pair(cls=UNSGD, **kw):
    """A native and a reference optimizer over equal copies of the same weights."""
    kw.setdefault("lr", 0.05)
    kw.setdefault("momentum", 0.9)
    a, b = _params(), _params()
    return cls(a, backend="native", **kw), a, cls(b, backend="reference", **kw), b


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _step_both(na, a, ref, b, seed, new_objects=True):
    """One step of both optimizers on the same gradients (new tensors, as after zero_grad)."""
    for p, q, g in zip(a, b, _grads(a, seed)):
        if new_objects or p.grad is None:
            p.grad, q.grad = g.clone(), g.clone()
        else:  # accumulated into the gradients the last step saw
            p.grad.copy_(g)
            q.grad.copy_(g)
    na.step()
    ref.step()


def _close(a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def _engaged(opt) -> bool:
    return steady.ready(opt) is not None


def _engage(seed_base=0, **kw):
    na, a, ref, b = _pair(**kw)
    for s in range(2):
        _step_both(na, a, ref, b, seed_base + s)
    assert _engaged(na), "the steady path did not engage after two full steps"
    return na, a, ref, b


@pytest.fixture
def no_full_path(monkeypatch):
    """Call it to make the full path fail loudly: a step that passes then took the steady path."""
    def refuse(opt):
        raise AssertionError("the full path ran")
    return lambda: monkeypatch.setattr("manifold_sgd.optimizer.groups_to_step", refuse)


@pytest.mark.parametrize("cls", [UNSGD, PSISGD])
@pytest.mark.parametrize("new_objects", [True, False])
def test_steady_steps_match_the_reference(cls, new_objects, monkeypatch):
    na, a, ref, b = _engage(cls=cls)
    calls = []
    real = checks.groups_to_step
    monkeypatch.setattr("manifold_sgd.optimizer.groups_to_step", lambda o: calls.append(o) or real(o))
    for s in range(2, 6):
        _step_both(na, a, ref, b, s, new_objects=new_objects)
    assert [o for o in calls if o is na] == []  # every native step took the steady path
    _close(a, b)
    for p, q in zip(a, b):
        torch.testing.assert_close(na.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_steady_path_takes_no_python_loop_per_tensor(no_full_path):
    na, a, ref, b = _engage()
    no_full_path()
    for p in a:
        p.grad = torch.randn_like(p)
    na.step()  # the full path would raise


@pytest.mark.parametrize("change, message", [
    (lambda p: setattr(p.grad, "data", p.grad.data.double()), "dtype"),
    (lambda p: setattr(p.grad, "data", torch.randn(p.numel() + 1)), "shape"),
    (lambda p: setattr(p, "grad", torch.zeros_like(p).to_sparse()), "sparse"),
])
def test_bad_gradients_are_caught_before_any_weight_moves(change, message):
    na, a, _, _ = _engage()
    for p in a:
        p.grad = torch.randn_like(p)
    change(a[0])
    before = [p.detach().clone() for p in a]
    with pytest.raises(ValueError, match=message):
        na.step()
    for p, w in zip(a, before):
        assert torch.equal(p.detach(), w)


def test_a_smaller_gradient_storage_is_not_read_past(no_full_path):
    """The same gradient object given a smaller storage (``.data = ...``): the steady path
    must not pass the old table to the kernel (the full path then raises)."""
    na, a, _, _ = _engage()
    no_full_path()
    a[0].grad.data = torch.randn(4, 5)  # the strides of the (6, 5) parameter, fewer rows
    with pytest.raises(AssertionError, match="full path ran"):
        na.step()


def test_non_contiguous_gradient_is_stepped_as_the_reference():
    na, a, ref, b = _engage()
    grads = _grads(a, 5)
    grads[3] = torch.randn(8, 3).t()  # (3, 8), not contiguous
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
    assert not a[3].grad.is_contiguous()
    na.step()
    ref.step()
    _close(a, b)


def test_set_to_none_skips_that_parameter_then_steady_again():
    na, a, ref, b = _engage()
    for p, q, g in zip(a, b, _grads(a, 10)):
        p.grad, q.grad = g.clone(), g.clone()
    a[0].grad = b[0].grad = None
    w0 = a[0].detach().clone()
    na.step()
    ref.step()
    assert torch.equal(a[0].detach(), w0)
    _close(a, b)
    for s in range(11, 14):
        _step_both(na, a, ref, b, s)
    assert _engaged(na)
    _close(a, b)


@pytest.mark.parametrize("option, value", [("lr", 0.01), ("momentum", 0.5), ("nesterov", True),
                                           ("weight_decay", 0.1), ("manifold", "psi")])
def test_an_option_changed_between_steps(option, value):
    na, a, ref, b = _engage()
    for o in (na, ref):
        o.param_groups[0][option] = value
    for s in range(5, 8):
        _step_both(na, a, ref, b, s)
    _close(a, b)


def test_a_bad_option_is_caught_after_the_steady_path_engaged():
    na, a, _, _ = _engage()
    na.param_groups[0]["lr"] = -1.0
    before = [p.detach().clone() for p in a]
    with pytest.raises(ValueError, match="lr"):
        na.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(a, before))


def test_params_added_are_stepped():
    na, a, ref, b = _engage()
    torch.manual_seed(3)
    extra = torch.randn(5, 4)
    pa, pb = torch.nn.Parameter(extra.clone()), torch.nn.Parameter(extra.clone())
    na.add_param_group({"params": [pa], "lr": 0.02})
    ref.add_param_group({"params": [pb], "lr": 0.02})
    for s in range(5, 8):
        g = torch.randn(5, 4)
        pa.grad, pb.grad = g.clone(), g.clone()
        _step_both(na, a, ref, b, s)
    _close(a + [pa], b + [pb])
    assert _engaged(na)


def test_a_parameter_appended_to_the_group_list():
    na, a, ref, b = _engage()
    pa, pb = torch.nn.Parameter(torch.randn(4, 4)), None
    pb = torch.nn.Parameter(pa.detach().clone())
    na.param_groups[0]["params"].append(pa)
    ref.param_groups[0]["params"].append(pb)
    g = torch.randn(4, 4)
    pa.grad, pb.grad = g.clone(), g.clone()
    _step_both(na, a, ref, b, 9)
    _close(a + [pa], b + [pb])


def test_load_state_dict_between_steps():
    na, a, ref, b = _engage()
    saved = ref.state_dict()  # the reference's state, loaded into both
    for s in range(4, 6):
        _step_both(na, a, ref, b, s)
    with torch.no_grad():
        for p, q in zip(a, b):
            p.copy_(q)
    for o in (na, ref):
        o.load_state_dict(saved)
    for s in range(6, 9):
        _step_both(na, a, ref, b, s)
    _close(a, b)


def test_momentum_buffer_replaced():
    na, a, ref, b = _engage()
    for o, ps in ((na, a), (ref, b)):
        o.state[ps[0]]["momentum_buffer"] = torch.ones_like(ps[0])
    for s in range(5, 8):
        _step_both(na, a, ref, b, s)
    _close(a, b)


def test_parameter_storage_replaced():
    na, a, ref, b = _engage()
    with torch.no_grad():
        for ps in (a, b):
            ps[3].data = ps[3].data.clone()  # new storage, same values
    for s in range(5, 8):
        _step_both(na, a, ref, b, s)
    _close(a, b)


def test_lr_held_as_a_tensor_changed_in_place():
    na, a, ref, b = _pair(lr=torch.tensor(0.05))
    for s in range(3):
        _step_both(na, a, ref, b, s)
    for o in (na, ref):
        o.param_groups[0]["lr"].fill_(0.01)
    for s in range(3, 5):
        _step_both(na, a, ref, b, s)
    _close(a, b)


def test_transposed_parameter_storage_view_takes_the_full_path():
    """``p.data`` replaced by a non-contiguous view of the same storage (same address)."""
    na, a, ref, b = _engage()
    with torch.no_grad():
        for ps in (a, b):
            ps[0].data = ps[0].data.reshape(5, 6).t()  # (6, 5) again, not contiguous
    _step_both(na, a, ref, b, 5)
    _close(a, b)


def test_skipped_rows_are_reported_on_the_steady_path(no_full_path):
    na, a, _, _ = _engage()
    no_full_path()
    for p in a:
        p.grad = torch.randn_like(p)
    a[0].grad[2, 1] = float("nan")
    w = a[0].detach().clone()
    with pytest.warns(RuntimeWarning, match="row"):
        na.step()
    assert na.skipped_rows == 1
    assert torch.equal(a[0].detach()[2], w[2])


def test_frozen_group_and_a_second_group_engage():
    torch.manual_seed(1)
    frozen = [torch.nn.Parameter(torch.randn(3, 3))]
    live = [torch.nn.Parameter(torch.randn(4, 6))]
    opt = ManifoldSGD([{"params": frozen}, {"params": live, "lr": 0.1}], lr=0.05, momentum=0.9,
                      backend="native")
    for _ in range(2):
        live[0].grad = torch.randn(4, 6)
        opt.step()
    assert _engaged(opt)
    frozen[0].grad = torch.randn(3, 3)  # the frozen group gets a gradient: the full path steps it
    assert not _engaged(opt)
    w = frozen[0].detach().clone()
    opt.step()
    assert not torch.equal(frozen[0].detach(), w)


def test_noop_kernel_moves_nothing():
    na, a, _, _ = _engage()
    before = [p.detach().clone() for p in a]
    with _native.noop_kernel():
        na.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(a, before))
    na.step()
    assert not all(torch.equal(p.detach(), w) for p, w in zip(a, before))


@pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_usable(),
                    reason="needs a CUDA GPU and the extension's CUDA kernels")
def test_steady_step_captured_in_a_cuda_graph():
    """After two eager steps a steady step is captured by torch.cuda.graph; each replay is one
    more step, equal to eager native steps on the same gradients."""
    torch.manual_seed(5)
    shapes = [(64, 32), (16, 3, 3, 3), (128,)]
    base = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    ps = [torch.nn.Parameter(w.clone()) for w in base]
    qs = [torch.nn.Parameter(w.clone()) for w in base]
    opt = UNSGD(ps, lr=0.05, momentum=0.9, backend="native")
    eager = UNSGD(qs, lr=0.05, momentum=0.9, backend="native")
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g, g.clone()
    for _ in range(2):
        opt.step()
        eager.step()
    assert _engaged(opt)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_channels_last_conv_weights_take_the_steady_path():
    """Rows that are blocks of their storage (channels_last filters) are stepped in place, so
    the steady path serves them; a contiguous gradient then differs in layout: the full path."""
    torch.manual_seed(2)
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    a, b = [torch.nn.Parameter(w.clone(memory_format=torch.preserve_format))], [torch.nn.Parameter(w.clone())]
    na = UNSGD(a, lr=0.05, momentum=0.9, backend="native")
    ref = UNSGD(b, lr=0.05, momentum=0.9, backend="reference")
    for s in range(4):
        g = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last if s != 3 else torch.contiguous_format)
        a[0].grad, b[0].grad = g.clone(memory_format=torch.preserve_format), g.clone()
        if s == 2:
            assert _engaged(na)
        if s == 3:
            assert not _engaged(na)
        na.step()
        ref.step()
    _close(a, b)


def test_a_parameter_stepped_on_a_copy_never_takes_the_steady_path():
    """A transposed (6, 5) parameter's rows are not blocks of its storage: the full path steps a
    contiguous copy and writes it back, so the tables never hold the parameter itself."""
    torch.manual_seed(4)
    w = torch.randn(5, 6)
    a, b = [torch.nn.Parameter(w.clone().t())], [torch.nn.Parameter(w.clone().t())]
    na = UNSGD(a, lr=0.05, momentum=0.9, backend="native")
    ref = UNSGD(b, lr=0.05, momentum=0.9, backend="reference")
    for _ in range(3):
        g = torch.randn(5, 6).t()
        a[0].grad, b[0].grad = g.clone(), g.clone()
        na.step()
        ref.step()
        assert not _engaged(na)
    _close(a, b)
