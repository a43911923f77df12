"""Every error of the native layer is a Python exception naming the tensor; no input crashes
the process (fuzzed in a subprocess, so a crash fails the test instead of killing pytest)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import manifold_sgd as msgd
from manifold_sgd import _native

pytestmark = pytest.mark.skipif(not msgd.native_available(), reason="native extension not built")

OPT = SimpleNamespace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, adaptive="sphere",
                      curvature=1.0, distance=1.0, psi_max_norm=1e4)


def _bucket(order=None, sizes=None, names=("model.conv.weight", "model.fc.weight")):
    return _native.NativeBucket([4, 3], [6, 5], ["sphere", "psi"],
                                [torch.arange(4), torch.arange(3) if order is None else order],
                                [torch.tensor([2, 2]), torch.tensor([3]) if sizes is None else sizes],
                                [None, None], torch.float32, names=list(names))


def _tensors():
    p = [torch.randn(4, 6), torch.randn(3, 5)]
    return p, [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p]


@pytest.mark.parametrize("which,i,new,match", [
    ("g", 1, lambda t: torch.randn(3, 4), r"model\.fc\.weight: gradient has 12 elements"),
    ("g", 0, lambda t: t.double(), r"model\.conv\.weight: gradient has dtype torch\.float64"),
    ("m", 1, lambda t: None, r"model\.fc\.weight: a momentum buffer is needed"),
    ("m", 0, lambda t: t.bfloat16(), r"model\.conv\.weight: momentum buffer has dtype"),
    ("p", 1, lambda t: torch.randn(3, 7)[:, 1:6], r"model\.fc\.weight: parameter is not dense"),
    ("g", 0, lambda t: t.t().contiguous().t(), r"model\.conv\.weight: gradient is laid out"),
    ("p", 0, lambda t: torch.empty(4, 6, device="meta"), r"model\.conv\.weight: parameter is on meta"),
    ("g", 1, lambda t: "grad", r"model\.fc\.weight: gradient is a str"),
])
def test_tensor_errors_name_the_tensor_and_change_nothing(which, i, new, match):
    p, g, m = _tensors()
    originals, before = list(p), [t.clone() for t in p]
    lst = dict(p=p, g=g, m=m)[which]
    lst[i] = new(lst[i])
    with pytest.raises((ValueError, TypeError), match=match):
        _bucket().run(p, g, m, [True, True], OPT)
    assert all(torch.equal(a, b) for a, b in zip(before, originals))  # checked before any write


@pytest.mark.parametrize("order,sizes,match", [
    (torch.tensor([0, 1, 1]), None, r"model\.fc\.weight: row 1 is in two groups"),
    (torch.tensor([0, 1, 3]), None, r"model\.fc\.weight: row 3 out of range"),
    (torch.arange(4), None, r"model\.fc\.weight: row order has 4 entries for 3 rows"),
    (None, torch.tensor([2, 2]), r"model\.fc\.weight: group sizes must be >= 1 and sum"),
    (torch.arange(3).double(), None, r"model\.fc\.weight: row order must be a 1-D integer tensor"),
])
def test_table_errors_from_cpp_and_python_name_the_tensor(order, sizes, match):
    p, g, m = _tensors()
    before = [t.clone() for t in p]
    with pytest.raises(ValueError, match=match):
        _bucket(order, sizes).run(p, g, m, [True, True], OPT)
    assert all(torch.equal(a, b) for a, b in zip(before, p))


def test_unnamed_buckets_say_tensor_i_and_options_are_checked():
    with pytest.raises(ValueError, match=r"^tensor 1: rows must be an int >= 1"):
        _native.NativeBucket([2, 0], [3, 3], ["sphere"] * 2, [torch.arange(2)] * 2,
                             [torch.ones(2, dtype=torch.int64)] * 2, [None] * 2, torch.float32)
    p, g, m = _tensors()
    with pytest.raises(ValueError, match="adaptive"):
        _bucket().run(p, g, m, [True, True], SimpleNamespace(**{**vars(OPT), "adaptive": "yes"}))
    with pytest.raises(ValueError, match="lr must be finite"):
        _bucket().run(p, g, m, [True, True], SimpleNamespace(**{**vars(OPT), "lr": float("nan")}))


def test_fuzzed_inputs_raise_and_never_crash():
    script = Path(__file__).with_name("native_fuzz.py")
    proc = subprocess.run([sys.executable, str(script), "1234", "400"], capture_output=True, text=True,
                          timeout=600)
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else "an error"
    assert proc.returncode == 0, f"fuzzer exited with {how}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    ok, stepped, raised, raised_tables = proc.stdout.split()
    assert ok == "ok" and int(raised) > 250 and int(stepped) > 20 and int(raised_tables) == 200


def test_boundary_takes_only_layouts_whose_rows_are_blocks_of_storage():
    """The kernels step storage in memory order as rows x row_len: a transposed parameter (dense,
    but its memory-order blocks are columns) is refused unless stepped as a contiguous copy; a
    channels_last conv weight with filter rows (lead 1) is stepped in place and matches."""
    p, g, m = _tensors()
    pt = torch.randn(6, 4).t()
    p[0], g[0], m[0] = pt, torch.randn(6, 4).t(), torch.zeros(6, 4).t()
    with pytest.raises(ValueError, match=r"model\.conv\.weight: the parameter is not contiguous and its rows"):
        _bucket().run(p, g, m, [True, True], OPT)
    with pytest.raises(ValueError, match=r"not contiguous and its rows"):  # lead 1 does not make it so
        b = _native.NativeBucket([4], [6], ["sphere"], [torch.arange(4)], [torch.tensor([2, 2])], [None],
                                 torch.float32, names=["model.conv.weight"], leads=[1])
        b.run([pt], [g[0]], [m[0]], [True], OPT)

    w = torch.nn.functional.normalize(torch.randn(4, 3, 2, 2).flatten(1), dim=1).view(4, 3, 2, 2)
    grad = torch.randn(4, 3, 2, 2)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        pw, gw = w.clone(memory_format=fmt), grad.clone(memory_format=fmt)
        mw = torch.zeros_like(pw)
        b = _native.NativeBucket([4], [12], ["sphere"], [torch.arange(4)], [torch.tensor([2, 2])], [None],
                                 torch.float32, leads=[1])
        b.run([pw], [gw], [mw], [True], OPT)
        results.append(pw.contiguous())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_options_record_is_checked_natively_and_names_the_option():
    _C = _native._C
    with pytest.raises(ValueError, match=r"unknown adaptive mode 'Sphere' \(expected one of 'none', 'sphere'"):
        _C.StepOptions(adaptive="Sphere")
    with pytest.raises(ValueError, match="unknown retraction 'svd'"):
        _C.StepOptions(retraction="svd")
    with pytest.raises(ValueError, match="unknown algorithm"):
        _C.StepOptions(algorithm="lbfgs")
    o = _C.StepOptions(lr=0.1, momentum=0.5, adaptive="general", retraction="polar")
    assert (o.algorithm, o.adaptive, o.retraction, o.momentum) == ("sgd", "general", "polar", 0.5)
    assert o.validate() == ""
    for field, value, message in (("lr", float("inf"), "lr must be finite"), ("momentum", 1.0, "momentum must be"),
                                  ("weight_decay", -1.0, "weight_decay must be"),
                                  ("curvature", float("nan"), "curvature must be"),
                                  ("psi_max_norm", 0.0, "psi_max_norm must be")):
        bad = _C.StepOptions(lr=0.1, momentum=0.5)
        setattr(bad, field, value)
        assert message in bad.validate()
        p, g, m = _tensors()
        before = [t.clone() for t in p]
        with pytest.raises(ValueError, match=message):
            _C.fused_step_cpu(_bucket()._step_tables(), bad, 1, 1)  # checked before the report is read
        assert all(torch.equal(a, b) for a, b in zip(before, p))
