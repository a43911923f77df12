"""The CUDA path's guards around the kernels: usability from the driver version, one device
per bucket, the plan refusing Stiefel blocks, CUDA graph capture, streams and the completion
counters. The CPU tests run everywhere; the CUDA ones skip without a GPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from manifold_sgd import _native, native_info
from manifold_sgd.reference import StepOptions

# ---- usability (item 2) ----------------------------------------------------------------

@pytest.mark.parametrize("driver,runtime,compiled,usable,reason", [
    (13000, 13000, True, True, ""),
    (13020, 13000, True, True, ""),
    (12080, 13000, True, False, r"supports CUDA 12\.8, older than the CUDA 13\.0 runtime.*toolkit <= 12\.8"),
    (0, 13000, True, False, "no CUDA driver"),
    (13000, 13000, False, False, "built without its CUDA kernels"),
    (13000, 0, True, False, "runtime reports no version"),
])
def test_cuda_usability_from_versions(driver, runtime, compiled, usable, reason):
    got, why = _native.cuda_usability(driver, runtime, compiled)
    assert got is usable
    if usable:
        assert why == ""
    else:
        assert why and __import__("re").search(reason, why), why


def test_cuda_usability_when_the_driver_cannot_be_queried():
    got, why = _native.cuda_usability(0, 13000, True, "cudaDriverGetVersion: boom")
    assert not got and "could not be queried" in why and "boom" in why


def test_native_info_reports_cuda_usability():
    i = native_info()
    for k in ("cuda_usable", "cuda_driver_version", "cuda_runtime_version", "cuda_reason"):
        assert k in i, k
    assert i["cuda_usable"] is _native.cuda_usable()
    if not i["cuda_compiled"]:
        assert not i["cuda_usable"] and "without its CUDA kernels" in i["cuda_reason"]
    elif not torch.cuda.is_available() and i["cuda_driver_version"] == 0:  # this project's CPU machines
        assert not i["cuda_usable"] and "no CUDA driver" in i["cuda_reason"]
        assert i["cuda_runtime_version"] >= 11000
    if i["cuda_usable"]:
        assert i["cuda_driver_version"] >= i["cuda_runtime_version"] > 0 and i["cuda_reason"] == ""


def test_supports_cuda_only_when_usable_and_warns_once(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_native, "_CUDA_WARNED", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = _native.supports(cuda)
        second = _native.supports(cuda)
    assert first is second is _native.cuda_usable()
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    if _native.cuda_compiled() and not _native.cuda_usable():
        assert len(msgs) == 1 and "cannot run here" in msgs[0] and "reference path" in msgs[0]
        assert native_info()["cuda_reason"] in msgs[0]
    else:
        assert msgs == []
    assert _native.supports(torch.device("cpu")) and not _native.supports(torch.device("meta"))


def test_unusable_cuda_refuses_setup_with_the_reason(monkeypatch):
    monkeypatch.setattr(_native, "_CUDA_STATUS", {"cuda_usable": False, "cuda_driver_version": 12000,
                                                  "cuda_runtime_version": 13000, "cuda_reason": "old driver X"})
    b = _bucket([(2, 3)])
    with pytest.raises(RuntimeError, match="cannot run here: old driver X"):
        _native._cuda_setup(b, torch.device("cuda", 0))
    assert b.device is None


# ---- one device per bucket (item 3) ------------------------------------------------------

def _bucket(shapes, kind="sphere", dtype=torch.float32, names=None):
    rows = [s[0] for s in shapes]
    return _native.NativeBucket(rows, [s[1] for s in shapes], [kind] * len(shapes), [torch.arange(r) for r in rows],
                                [torch.ones(r, dtype=torch.int64) for r in rows], [None] * len(shapes), dtype,
                                names=names)


@pytest.mark.parametrize("which", ["p", "g", "m"])
def test_one_device_per_bucket(which):
    shapes = [(4, 6), (3, 5), (2, 7)]
    b = _bucket(shapes, names=["a", "b", "c"])
    p = [torch.nn.functional.normalize(torch.randn(s), dim=1) for s in shapes]
    g = [torch.randn(s) for s in shapes]
    m = [torch.zeros(s) for s in shapes]
    before = [t.clone() for t in p]
    table = b.table.clone()
    dict(p=p, g=g, m=m)[which][2] = torch.empty(2, 7, device="meta")
    what = dict(p="parameter", g="gradient", m="momentum buffer")[which]
    with pytest.raises(ValueError, match=rf"^c: {what} is on meta, but this bucket's tensors are on cpu "
                                         r"\(one device per bucket\)"):
        b.run(p, g, m, [True] * 3, StepOptions(lr=0.1, momentum=0.9))
    assert all(torch.equal(x, y) for x, y in zip(before[:2], p[:2]))  # nothing written
    assert torch.equal(b.table, table)  # not even the table
    # and the bucket still steps once the tensors are back on one device
    dict(p=p, g=g, m=m)[which][2] = dict(p=before[2].clone(), g=torch.randn(2, 7), m=torch.zeros(2, 7))[which]
    b.run(p, g, m, [True] * 3, StepOptions(lr=0.1, momentum=0.9))
    assert not torch.equal(before[0], p[0])


def test_a_bucket_set_up_for_a_device_keeps_it():
    b = _bucket([(2, 3)])
    b.device = torch.device("meta")  # as after a CUDA setup: the radii and report live there
    with pytest.raises(ValueError, match="parameter is on cpu, but this bucket's tensors are on meta"):
        b.run([torch.randn(2, 3)], [torch.randn(2, 3)], [None], [True], StepOptions(lr=0.1))


# ---- the plan (item 6) -------------------------------------------------------------------

def test_stiefel_blocks_route_by_device_size_and_algorithm():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _native.supports_stiefel(cpu, 32, adam=False) and _native.supports_stiefel(cpu, 32, adam=True)
    assert _native.supports_stiefel(cuda, 32, adam=False) and _native.supports_stiefel(cuda, 1, adam=False)
    assert not _native.supports_stiefel(cuda, 33, adam=False) and not _native.supports_stiefel(cpu, 33, adam=False)
    assert not _native.supports_stiefel(cuda, 3, adam=True)  # ManifoldAdam's blocks on a GPU: the reference path


@pytest.mark.skipif(not _native.cuda_compiled(), reason="extension built without its CUDA kernels")
def test_cuda_plan_takes_small_stiefel_blocks():
    b = _bucket([(4, 9), (2, 6)], kind="stiefel")
    b.table[:, _native.PARAM] = 4096
    b.table[:, _native.GRAD] = 8192
    b.table[:, _native.BLOCK_ROWS] = torch.tensor([3, 2])
    assert _native._C.CudaPlan(b._step_tables(), _native.step_options(StepOptions(lr=0.1))).launches == 1
    b.table[0, _native.BLOCK_ROWS] = 4  # 4 does not divide 9
    with pytest.raises(ValueError, match="tensor 0: a Stiefel block needs"):
        _native._C.CudaPlan(b._step_tables(), _native.step_options(StepOptions(lr=0.1)))


# ---- on a GPU (items 3, 4, 5) ---------------------------------------------------------------

def _cuda_set(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = [torch.nn.functional.normalize(torch.randn(s, generator=gen), dim=1).to(dtype).cuda() for s in shapes]
    g = [torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
    return w, g


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_usable(), reason="needs a usable CUDA GPU")
@pytest.mark.parametrize("which", ["p", "g"])
def test_cuda_bucket_refuses_a_cpu_tensor(which):
    shapes = [(4, 9), (3, 33)]
    b = _bucket(shapes)
    w, g = _cuda_set(shapes)
    dict(p=w, g=g)[which][1] = dict(p=w, g=g)[which][1].cpu()
    with pytest.raises(ValueError, match=r"tensor 1: .* is on cpu, but this bucket's tensors are on cuda"):
        b.run(w, g, [None, None], [True, True], StepOptions(lr=0.1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_usable(), reason="needs a usable CUDA GPU")
def test_capture_refuses_table_uploads_and_replays_a_fixed_step():
    shapes = [(8, 9), (2, 66000)]
    w, g = _cuda_set(shapes)
    b = _bucket(shapes)
    o = StepOptions(lr=0.01)
    b.run(w, g, [None] * 2, [False] * 2, o, reset_report=False)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    new_g = [torch.randn_like(x) for x in g]
    with pytest.raises(RuntimeError, match="uploads its tensor table.*cannot be captured"):
        with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
            b.run(w, new_g, [None] * 2, [False] * 2, o, reset_report=False)
    torch.cuda.synchronize()
    # the same tensors as the previous step: captured, and a replay steps again
    b.run(w, g, [None] * 2, [False] * 2, o, reset_report=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        b.run(w, g, [None] * 2, [False] * 2, o, reset_report=False)
    before = [x.clone() for x in w]
    graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(a, x) for a, x in zip(before, w))
    # stochastic rounding: the key advances every step, so capture is refused
    bb = _bucket([(4, 64)], dtype=torch.bfloat16)
    wb, gb = _cuda_set([(4, 64)], torch.bfloat16)
    bb.run(wb, gb, [None], [False], o, rounding_keys=[1])
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="stochastic rounding"):
        with torch.cuda.stream(s), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=s):
            bb.run(wb, gb, [None], [False], o, rounding_keys=[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_usable(), reason="needs a usable CUDA GPU")
def test_steps_on_two_streams_are_ordered_and_stale_counters_are_cleared():
    shapes = [(40, 3000), (3, 66000)]  # pre-pass groups and split rows: completion counters
    o = StepOptions(lr=0.05, momentum=0.9, adaptive="sphere")

    def steps(poison, streams):
        w, g = _cuda_set(shapes, seed=1)
        m = [torch.zeros_like(x) for x in w]
        rows = [s[0] for s in shapes]
        b = _native.NativeBucket(rows, [s[1] for s in shapes], ["sphere"] * 2, [torch.arange(r) for r in rows],
                                 [torch.tensor([r]) for r in rows], [None] * 2, torch.float32)
        torch.cuda.synchronize()  # the tensors were made on the current stream
        for k in range(4):
            if poison and k == 2:  # a counter left nonzero, as by a failed step
                b._workspace.fill_(0x01)
            with torch.cuda.stream(streams[k % len(streams)]):
                b.run(w, g, m, [k == 0] * 2, o, reset_report=False)
        torch.cuda.synchronize()
        return [x.cpu() for x in w + m]

    clean = steps(False, [torch.cuda.current_stream()])
    two = steps(False, [torch.cuda.Stream(), torch.cuda.Stream()])
    poisoned = steps(True, [torch.cuda.current_stream()])
    assert all(torch.equal(a, b) for a, b in zip(clean, two))
    assert all(torch.equal(a, b) for a, b in zip(clean, poisoned))
