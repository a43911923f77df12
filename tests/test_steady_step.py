"""The steady-state step (steady.py): after a full step, a step with the same parameters,
options and state takes one native call per bucket. Everything the full path checks must
still be caught after the fast path engaged: each test engages it, changes one thing, and
asserts the error (nothing moved) or the reference path's result."""
from __future__ import annotations

import pytest
import torch

from manifold_sgd import PSISGD, UNSGD, ManifoldAdam, ManifoldSGD, _native, checks, steady

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


# ---- ManifoldAdam on the steady path ---------------------------------------------------
# A steady Adam step must equal the full path's bitwise: the same kernel reads the same
# tables, only the way they are written differs. Each test runs one optimizer on the steady
# path and a twin over equal copies with steady.ENABLED off (every step full), on the same
# gradients, and compares weights, both moments and the step counts exactly.

def _adam_groups(params, second_moment="row"):
    """Sphere rows (matrices, conv filters), AdamW tensors (1-D, 'auto') and 3 x 3 Stiefel blocks."""
    w0, w1, w2, b, conv = params
    return [{"params": [w0, w1, w2, b], "second_moment": second_moment, "weight_decay": 0.1},
            {"params": [conv], "manifold": "stiefel", "granularity": "kernel", "lr": 0.02},
            {"params": [], "lr": 0.5}]  # no parameters: a group that never steps


ADAM_SHAPES = [(6, 5), (4, 3, 2, 2), (3, 8), (7,), (5, 2, 3, 3)]


def _adam_params(dtype=torch.float32):
    torch.manual_seed(11)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in ADAM_SHAPES]


def _adam_twins(second_moment="row", dtype=torch.float32, **kw):
    """(steady optimizer, its params, full-path optimizer, its params): equal copies, native."""
    kw = {"lr": 0.05, "betas": (0.8, 0.95), **kw}
    a, b = _adam_params(dtype), _adam_params(dtype)
    return (ManifoldAdam(_adam_groups(a, second_moment), backend="native", **kw), a,
            ManifoldAdam(_adam_groups(b, second_moment), backend="native", **kw), b)


class _FullPathSpy:
    """Counts the full-path steps of each optimizer (calls of groups_to_step)."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = checks.groups_to_step
        monkeypatch.setattr("manifold_sgd.optimizer.groups_to_step", lambda o: self.seen.append(o) or real(o))

    def full_steps(self, opt) -> int:
        return sum(o is opt for o in self.seen)


def _adam_step(na, a, full, b, seed, monkeypatch, grads=None):
    """One step of both (``full`` with the steady path off) on the same new gradients."""
    for p, q, g in zip(a, b, grads or _grads(a, seed)):
        p.grad, q.grad = (None, None) if g is None else (g.to(p.dtype), g.to(q.dtype))
    na.step()
    with monkeypatch.context() as m:
        m.setattr(steady, "ENABLED", False)
        full.step()


def _assert_same(na, a, full, b):
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach())
        sp, sq = na.state.get(p, {}), full.state.get(q, {})
        assert sp.keys() == sq.keys()
        for k in ("exp_avg", "exp_avg_sq"):
            if k in sp:
                assert torch.equal(sp[k], sq[k]), k
        assert sp.get("step") == sq.get("step") and type(sp.get("step")) is type(sq.get("step"))


@pytest.mark.parametrize("second_moment, dtype", [("row", torch.float32), ("element", torch.float32),
                                                  ("row", torch.bfloat16), ("element", torch.float64)])
def test_adam_steady_steps_equal_full_path_steps_bitwise(second_moment, dtype, monkeypatch):
    na, a, full, b = _adam_twins(second_moment, dtype)
    spy = _FullPathSpy(monkeypatch)
    for s in range(6):
        assert _engaged(na) == (s > 0), s  # the first step is full; the next ones steady
        _adam_step(na, a, full, b, s, monkeypatch)
        _assert_same(na, a, full, b)
        assert [na.state[p]["step"] for p in a] == [s + 1] * len(a)
    assert spy.full_steps(na) == 1 and spy.full_steps(full) == 6
    assert not torch.equal(a[0].detach(), _adam_params(dtype)[0])  # the weights moved
    w = a[4].detach().double().reshape(10, 3, 3)  # the Stiefel blocks are still orthonormal
    torch.testing.assert_close(w.transpose(1, 2) @ w, torch.eye(3, dtype=torch.float64).expand(10, 3, 3),
                               rtol=0, atol=1e-5 if dtype != torch.bfloat16 else 3e-2)


def _set_grads(params, seed):
    for p, g in zip(params, _grads(params, seed)):
        p.grad = g


def test_adam_steady_path_reads_no_python_loop_per_tensor(no_full_path):
    na, a, _, _ = _adam_twins()
    _set_grads(a, 0)
    na.step()
    no_full_path()
    for s in range(1, 3):
        _set_grads(a, s)
        na.step()  # the full path would raise
    assert [na.state[p]["step"] for p in a] == [3] * len(a)


def test_adam_step_counts_written_by_hand_are_read_by_the_steady_path(monkeypatch):
    """A count set to another int between steps: the steady path steps from it (bias correction
    with t = 41), as the full path does."""
    na, a, full, b = _adam_twins()
    for s in range(2):
        _adam_step(na, a, full, b, s, monkeypatch)
    for o, ps in ((na, a), (full, b)):
        o.state[ps[0]]["step"] = 40
    assert _engaged(na)
    _adam_step(na, a, full, b, 2, monkeypatch)
    _assert_same(na, a, full, b)
    assert na.state[a[0]]["step"] == 41 and na.state[a[1]]["step"] == 3


@pytest.mark.parametrize("count", [3.0, torch.tensor(3), torch.tensor(3.0)])
def test_adam_step_count_of_another_type_takes_the_full_path(count, monkeypatch):
    """Integral counts that are not Python ints (a checkpoint's float or tensor): the full path
    reads them and leaves an int; then the steady path again."""
    na, a, full, b = _adam_twins()
    for s in range(2):
        _adam_step(na, a, full, b, s, monkeypatch)
    na.state[a[3]]["step"] = count
    full.state[b[3]]["step"] = 3
    assert not _engaged(na)
    _adam_step(na, a, full, b, 2, monkeypatch)
    _assert_same(na, a, full, b)
    assert type(na.state[a[3]]["step"]) is int and na.state[a[3]]["step"] == 4
    assert _engaged(na)


@pytest.mark.parametrize("count", [-1, 2.5, "3", None, True, float("nan"), torch.tensor([1, 2])])
def test_adam_invalid_step_count_is_a_clear_error_before_any_weight_moves(count, monkeypatch):
    na, a, full, b = _adam_twins()
    for s in range(2):
        _adam_step(na, a, full, b, s, monkeypatch)
    na.state[a[2]]["step"] = count
    assert not _engaged(na)
    for p, g in zip(a, _grads(a, 2)):
        p.grad = g
    before = [p.detach().clone() for p in a]
    steps = [na.state[p]["step"] for p in a]
    with pytest.raises(ValueError, match=r"param_groups\[0\].*step count.*int >= 0"):
        na.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(a, before))
    assert [na.state[p]["step"] for p in a][:2] == steps[:2]  # no count advanced


def test_adam_missing_step_count_is_a_clear_error(monkeypatch):
    na, a, full, b = _adam_twins()
    for s in range(2):
        _adam_step(na, a, full, b, s, monkeypatch)
    del na.state[a[1]]["step"]
    assert not _engaged(na)
    with pytest.raises(ValueError, match="step count"):
        na.step()


def test_adam_state_dict_round_trip_mid_run_continues_bitwise(monkeypatch):
    import copy
    na, a, full, b = _adam_twins()
    for s in range(3):
        _adam_step(na, a, full, b, s, monkeypatch)
    saved = copy.deepcopy(na.state_dict())
    assert [saved["state"][i]["step"] for i in range(len(a))] == [3] * len(a)
    assert all(type(saved["state"][i]["step"]) is int for i in range(len(a)))
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = ManifoldAdam(_adam_groups(c), backend="native", lr=0.05, betas=(0.8, 0.95))
    resumed.load_state_dict(saved)
    for s in range(3, 7):
        grads = _grads(a, s)
        for p, q, g in zip(c, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        resumed.step()
        _adam_step(na, a, full, b, s, monkeypatch, grads=grads)
        _assert_same(resumed, c, full, b)
        _assert_same(na, a, full, b)
    assert _engaged(resumed) and _engaged(na)


def _lr_of_scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))


@pytest.mark.parametrize("change", ["exp_avg replaced", "exp_avg_sq storage", "load_state_dict", "grad None",
                                    "second_moment"])
def test_adam_changes_between_steps_take_the_full_path(change, monkeypatch):
    na, a, full, b = _adam_twins()
    spy = _FullPathSpy(monkeypatch)
    for s in range(2):
        _adam_step(na, a, full, b, s, monkeypatch)
    assert spy.full_steps(na) == 1
    saved = full.state_dict()
    grads = _grads(a, 2)
    for o, ps in ((na, a), (full, b)):
        st = o.state[ps[0]]
        if change == "second_moment":
            o.param_groups[0]["second_moment"] = "element"
            for p in ps[:4]:  # v of another shape: the new option's, from zero
                o.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        elif change == "exp_avg replaced":
            st["exp_avg"] = torch.full_like(st["exp_avg"], 0.5)
        elif change == "exp_avg_sq storage":  # the same object, given new storage
            st["exp_avg_sq"].data = torch.full_like(st["exp_avg_sq"], 2.0)
        elif change == "load_state_dict":
            o.load_state_dict(saved)
        elif change == "grad None":
            grads = grads[:1] + [None] + grads[2:]
    if change != "grad None":  # (the gradients are set by the step below)
        assert not _engaged(na)
    _adam_step(na, a, full, b, 2, monkeypatch, grads=grads)
    _assert_same(na, a, full, b)
    if change == "grad None":
        assert na.state[a[1]]["step"] == 2 and na.state[a[0]]["step"] == 3
    for s in range(3, 6):
        _adam_step(na, a, full, b, s, monkeypatch)
        _assert_same(na, a, full, b)
    assert _engaged(na)
    # the changed step is full (a step with a gradient left None, and the one after it, too:
    # a group with a parameter without a gradient keeps no record); the later ones steady
    assert spy.full_steps(na) == (3 if change == "grad None" else 2)


def test_momentum_buffer_given_new_storage_takes_the_full_path():
    """The same momentum object with another storage (``.data = ...``): the tables' address is
    stale; the full path steps the new one."""
    na, a, ref, b = _engage()
    for o, ps in ((na, a), (ref, b)):
        o.state[ps[0]]["momentum_buffer"].data = torch.ones_like(ps[0])
    assert not _engaged(na)
    for s in range(5, 8):
        _step_both(na, a, ref, b, s)
    _close(a, b)
    assert _engaged(na)


def test_adam_subclass_that_overrides_its_step_takes_the_full_path():
    class Custom(ManifoldAdam):
        def _step_group(self, *args):
            super()._step_group(*args)

    a = _adam_params()
    opt = Custom(_adam_groups(a), lr=0.05, backend="native")
    for s in range(3):
        for p, g in zip(a, _grads(a, s)):
            p.grad = g
        opt.step()
        assert not _engaged(opt)
    assert [opt.state[p]["step"] for p in a] == [3] * len(a)


def test_adam_non_contiguous_parameter_never_takes_the_steady_path(monkeypatch):
    """Adam steps a parameter that is not contiguous on a contiguous copy: no steady record."""
    torch.manual_seed(4)
    w = torch.randn(5, 6)
    a, b = [torch.nn.Parameter(w.clone().t())], [torch.nn.Parameter(w.clone().t())]
    na, full = ManifoldAdam(a, lr=0.05, backend="native"), ManifoldAdam(b, lr=0.05, backend="native")
    for s in range(3):
        _adam_step(na, a, full, b, s, monkeypatch)
        assert not _engaged(na)
    _assert_same(na, a, full, b)


def test_adam_skipped_rows_are_reported_on_the_steady_path(no_full_path):
    na, a, _, _ = _adam_twins()
    _set_grads(a, 0)
    na.step()
    no_full_path()
    _set_grads(a, 1)
    a[0].grad[2, 1] = float("inf")
    w = a[0].detach().clone()
    with pytest.warns(RuntimeWarning, match="row"):
        na.step()
    assert na.skipped_rows == 1
    assert torch.equal(a[0].detach()[2], w[2]) and not torch.equal(a[0].detach()[1], w[1])


def test_adam_buckets_of_mixed_dtypes_get_each_parameters_own_count(monkeypatch):
    """One group, two buckets (float32, float64) whose tensors interleave in the group: each
    bucket's step-count column holds its own parameters' counts (set apart by hand here)."""
    def params():
        torch.manual_seed(5)
        return [torch.nn.Parameter(torch.randn(s, dtype=dt)) for s, dt in
                (((6, 5), torch.float64), ((3, 8), torch.float32), ((7,), torch.float64), ((4, 4), torch.float32))]

    a, b = params(), params()
    na, full = ManifoldAdam(a, lr=0.05, backend="native"), ManifoldAdam(b, lr=0.05, backend="native")
    _adam_step(na, a, full, b, 0, monkeypatch)
    assert len(na._plans[0].buckets) == 2
    for o, ps in ((na, a), (full, b)):
        for i, p in enumerate(ps):
            o.state[p]["step"] = [7, 1, 30, 3][i]
    for s in range(1, 4):
        assert _engaged(na)
        _adam_step(na, a, full, b, s, monkeypatch)
        _assert_same(na, a, full, b)
    assert [na.state[p]["step"] for p in a] == [10, 4, 33, 6]


@pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_usable(),
                    reason="needs a CUDA GPU and the extension's CUDA kernels")
@pytest.mark.parametrize("second_moment", ["row", "element"])
def test_adam_steady_steps_on_a_gpu_equal_full_path_steps(second_moment, monkeypatch):
    """On CUDA the steady step rewrites the step-count column, so the table is uploaded again
    each step (as the full path's is): the results are the full path's."""
    torch.manual_seed(6)
    base = [torch.randn(s, device="cuda") for s in ((64, 32), (16, 3, 3, 3), (128,))]
    a = [torch.nn.Parameter(w.clone()) for w in base]
    b = [torch.nn.Parameter(w.clone()) for w in base]
    kw = dict(lr=0.05, second_moment=second_moment, backend="native")
    na, full = ManifoldAdam(a, **kw), ManifoldAdam(b, **kw)
    for s in range(5):
        assert _engaged(na) == (s > 0)
        _adam_step(na, a, full, b, s, monkeypatch, grads=[torch.randn(w.shape, device="cuda") for w in base])
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert na.state[p]["step"] == full.state[q]["step"] == 5


@pytest.mark.parametrize("change", ["scheduler", "betas", "eps", "weight_decay"])
@pytest.mark.parametrize("second_moment", ["row", "element"])
def test_adam_scalar_options_changed_between_steps_stay_on_the_steady_path(change, second_moment, monkeypatch):
    """What schedulers change every step (lr; betas under OneCycleLR) takes a new options record
    on the steady path; the steps equal full-path steps bitwise."""
    na, a, full, b = _adam_twins(second_moment)
    scheds = [_lr_of_scheduler(o) for o in (na, full)] if change == "scheduler" else []
    spy = _FullPathSpy(monkeypatch)
    for s in range(6):
        _adam_step(na, a, full, b, s, monkeypatch)
        for sc in scheds:
            sc.step()
        if change != "scheduler" and s >= 1:
            for o in (na, full):
                g = o.param_groups[0]
                if change == "betas":
                    g["betas"] = (0.9 - 0.1 * s, 0.999 - 0.01 * s)
                elif change == "eps":
                    g["eps"] = 10.0 ** -s
                else:
                    g["weight_decay"] = 0.01 * s
        _assert_same(na, a, full, b)
    assert na.param_groups[0]["lr"] != full.defaults["lr"] or not scheds
    assert spy.full_steps(na) == 1 and spy.full_steps(full) == 6


@pytest.mark.parametrize("sched", ["lambda", "onecycle"])
def test_sgd_lr_and_momentum_schedules_stay_on_the_steady_path(sched, monkeypatch):
    """LR schedulers (and OneCycleLR's momentum cycle) on the steady path: the same steps as the
    reference optimizer under the same schedule."""
    na, a, ref, b = _pair(nesterov=True)
    if sched == "lambda":
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)) for o in (na, ref)]
    else:
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, base_momentum=0.5,
                                                      max_momentum=0.95) for o in (na, ref)]
    spy = _FullPathSpy(monkeypatch)
    momenta = set()
    for s in range(10):
        _step_both(na, a, ref, b, s)
        momenta.add(na.param_groups[0]["momentum"])
        for sc in scheds:
            sc.step()
    _close(a, b)
    assert spy.full_steps(na) == 1
    assert len(momenta) > 1 or sched == "lambda"


@pytest.mark.parametrize("option, value, message", [("lr", -1.0, "lr"), ("momentum", 1.5, "momentum"),
                                                    ("momentum", 0.0, None)])
def test_a_scalar_option_the_steady_path_cannot_take(option, value, message):
    """A bad value is the full path's clear error, nothing moved; momentum turned off is a change
    of the state the step keeps: the full path steps it, as the reference does."""
    na, a, ref, b = _engage()
    before = [p.detach().clone() for p in a]
    for o in (na, ref):
        o.param_groups[0][option] = value
    assert not _engaged(na)
    if message:
        for p, g in zip(a, _grads(a, 9)):
            p.grad = g
        with pytest.raises(ValueError, match=message):
            na.step()
        assert all(torch.equal(p.detach(), w) for p, w in zip(a, before))
        return
    for s in range(5, 8):
        _step_both(na, a, ref, b, s)
    _close(a, b)
