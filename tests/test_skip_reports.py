"""Where rows left unchanged by non-finite gradients are reported.

On the CPU a step counts them and warns at once. On a GPU reading the kernel's report would
synchronise the host every step, so those steps leave the report on the device and the
optimizer reads it only when asked (``skipped_rows``, ``state_dict()``, pickling). That
deferred path is exercised here on the CPU by declaring the CPU a deferring device
(``optimizer._defers_reports``); tests/test_cuda.py checks it on a GPU without synchronising.
"""
import copy
import pickle
import warnings

import pytest
import torch

import manifold_sgd as msgd
from conftest import BACKENDS
from manifold_sgd import _native
from manifold_sgd import optimizer as optimizer_mod
from manifold_sgd.reference import StepOptions


@pytest.fixture
def deferring(monkeypatch):
    monkeypatch.setattr(optimizer_mod, "_defers_reports", lambda device: True)


def _grad(rows_bad=(), shape=(6, 5), seed=0):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for r in rows_bad:
        g[r, 1] = float("nan")
    return g


def _opt(backend, named=True, **kw):
    w = torch.randn(6, 5).requires_grad_()
    v = torch.randn(4, 5).requires_grad_()
    params = [("enc.w", w), ("dec.v", v)] if named else [w, v]
    return msgd.UNSGD(params, lr=0.1, momentum=0.9, backend=backend, **kw), w, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_steps_warn_and_count_at_the_step(backend):
    opt, w, v = _opt(backend)
    w.grad, v.grad = _grad([3]), _grad(shape=(4, 5))
    with pytest.warns(RuntimeWarning, match=r"enc.w.*1 row\(s\) left unchanged this step \(first: row 3\)"):
        opt.step()
    assert opt._skipped == 1  # counted by the step itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.skipped_rows == 1  # reading warns nothing more


@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_reports_are_counted_and_warned_when_read(backend, deferring):
    opt, w, v = _opt(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, and no reading of the report, during steps
        for bad in ([4], [], [1, 5]):
            w.grad, v.grad = _grad(bad), _grad(shape=(4, 5))
            opt.step()
    assert torch.isfinite(w).all()
    with pytest.warns(RuntimeWarning, match=r"enc.w.*3 row\(s\) left unchanged in the GPU steps since the "
                                            r"last report \(first: row 1\)") as rec:
        assert opt.skipped_rows == 3
    assert len(rec) == 1 and "dec.v" not in str(rec[0].message)
    assert rec[0].filename == __file__  # the warning points at the line that read the count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.skipped_rows == 3  # taken once
    v.grad, w.grad = _grad([0], shape=(4, 5)), _grad()
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"dec.v.*1 row\(s\).*first: row 0"):
        assert opt.skipped_rows == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_reports_survive_a_new_plan(backend, deferring):
    """A step whose parameter set differs builds a new plan: the old buckets' reports are kept."""
    opt, w, v = _opt(backend)
    w.grad, v.grad = _grad([2]), _grad(shape=(4, 5))
    opt.step()
    v.grad = None  # another plan
    w.grad = _grad([5])
    opt.step()
    opt.add_param_group({"params": [("extra", torch.randn(3, 3, requires_grad=True))]})  # plans dropped
    with pytest.warns(RuntimeWarning) as rec:
        assert opt.skipped_rows == 2
    # one warning per report read (the old plan's and the new one's, or one per-parameter report)
    msgs = [str(r.message) for r in rec]
    assert all("enc.w" in m for m in msgs)
    assert sum(int(m.split("; ")[1].split(" row(s)")[0]) for m in msgs) == 2
    assert any("first: row 2)" in m for m in msgs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_and_pickling_collect_deferred_reports(backend, deferring):
    opt, w, v = _opt(backend, named=False)
    w.grad, v.grad = _grad([1]), _grad(shape=(4, 5))
    opt.step()
    with pytest.warns(RuntimeWarning, match=r"param_groups\[0\]\['params'\]\[0\].*first: row 1"):
        opt.state_dict()
    assert opt._skipped == 1
    w.grad = _grad([3])
    opt.step()
    with pytest.warns(RuntimeWarning, match="first: row 3"):
        clone = pickle.loads(pickle.dumps(opt))
    assert clone.skipped_rows == 2 and opt.skipped_rows == 2
    with pytest.warns(RuntimeWarning, match="first: row 3"):
        w.grad = _grad([3])
        opt.step()
        twin = copy.deepcopy(opt)
    assert twin.skipped_rows == 3


def test_skipped_rows_can_be_reset(deferring):
    opt, w, v = _opt("reference")
    w.grad, v.grad = _grad([1]), _grad(shape=(4, 5))
    opt.step()
    with pytest.warns(RuntimeWarning):
        opt.skipped_rows = 0  # the pending rows are counted (and warned) before the reset
    assert opt.skipped_rows == 0


@pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")
def test_native_bucket_accumulates_on_the_cpu_too():
    shapes = [(6, 9), (3, 4)]
    b = _native.NativeBucket([6, 3], [9, 4], ["sphere"] * 2, [torch.arange(6), torch.arange(3)],
                             [torch.ones(6, dtype=torch.int64), torch.ones(3, dtype=torch.int64)], [None, None],
                             torch.float32)
    ws = [torch.nn.functional.normalize(torch.randn(s), dim=1) for s in shapes]
    opt = StepOptions(lr=0.1)
    for bad in ([4], [], [2, 5]):
        gs = [_grad(bad, shape=shapes[0]), torch.randn(3, 4)]
        b.run(ws, gs, [None, None], [False, False], opt, reset_report=False)
    assert b.report.tolist() == [[3, 2], [0, -1]]
    assert b.take_report().tolist() == [[3, 2], [0, -1]]
    assert b.report.tolist() == [[0, -1], [0, -1]]
    rep = b.run(ws, [_grad([1], shape=shapes[0]), torch.randn(3, 4)], [None, None], [False, False], opt)
    assert rep.tolist() == [[1, 1], [0, -1]]  # reset_report=True: this step's alone
    rep = b.run(ws, [torch.randn(6, 9), _grad([0], shape=(3, 4))], [None, None], [False, False], opt)
    assert rep.tolist() == [[0, -1], [1, 0]]
