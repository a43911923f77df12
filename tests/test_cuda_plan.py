"""The CUDA plan and the guard of fused_step_cuda: host-side, no GPU needed.

Runs wherever the extension was compiled with its CUDA kernels (cuda_compiled);
every error here is raised before anything touches a device.
"""
from __future__ import annotations

import pytest
import torch

from manifold_sgd import _native

_C = _native._C

pytestmark = pytest.mark.skipif(not _native.cuda_compiled(), reason="extension built without its CUDA kernels")

OPTS = dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, adaptive="none", curvature=1.0,
            distance=1.0, psi_max_norm=1e4)


def _bucket(shapes, kind="sphere", dtype=torch.float32, group_sizes=None):
    rows = [s[0] for s in shapes]
    orders = [torch.arange(r) for r in rows]
    sizes = group_sizes or [torch.ones(r, dtype=torch.int64) for r in rows]
    b = _native.NativeBucket(rows, [s[1] for s in shapes], [kind] * len(shapes), orders, sizes,
                             [None] * len(shapes), dtype)
    # plausible nonzero addresses: the plan never dereferences them
    b.table[:, _native.PARAM] = 4096
    b.table[:, _native.GRAD] = 8192
    return b


def _plan(b, **kw):
    return _C.CudaPlan(b._step_tables(), _C.StepOptions(**dict(OPTS, **kw)))


def test_short_rows_take_one_launch():
    p = _plan(_bucket([(1000, 9), (64, 100), (8, 3000), (3, 8192)]))
    assert p.launches == 1
    # float32 CTAs: 512 rows of 9, 16 rows of 100 (32-lane teams), 1 row of 3000 or 8192
    n1, n2, n3 = p.n_items
    assert n1 == 0 and n3 == 0 and n2 == 2 + 4 + 8 + 3


def test_long_rows_split_into_three_phases():
    p = _plan(_bucket([(2, 66000), (5, 9)]))
    assert p.launches == 3
    assert p.n_items == (2 * 9, 2 * 9 + 1, 2 * 9)  # 66000 = 9 chunks of 8192 (float32)
    p64 = _plan(_bucket([(2, 66000)], dtype=torch.float64))
    assert p64.n_items[0] == 2 * 17  # 4096-element chunks for double


def test_adaptive_groups_fit_or_take_the_pre_pass():
    small = _bucket([(40, 9)], group_sizes=[torch.tensor([40])])
    p = _plan(small, adaptive="sphere")
    assert p.grouped and p.launches == 1
    big = _bucket([(40, 3000)], group_sizes=[torch.tensor([40])])
    p = _plan(big, adaptive="sphere")
    assert p.launches == 2 and p.n_items[0] == p.n_items[1] == 40
    assert not _plan(big).grouped


def _stiefel_bucket(shapes, block_rows, group_sizes=None):
    rows = [s[0] for s in shapes]
    sizes = group_sizes or [torch.ones(r, dtype=torch.int64) for r in rows]
    b = _native.NativeBucket(rows, [s[1] for s in shapes], ["stiefel"] * len(shapes), [torch.arange(r) for r in rows],
                             sizes, [None] * len(shapes), torch.float32, block_rows=block_rows)
    b.table[:, _native.PARAM] = 4096
    b.table[:, _native.GRAD] = 8192
    return b


def test_plan_accepts_stiefel_blocks_up_to_32_rows():
    # one block per thread: 1000 3x3 blocks in 2 CTAs; a 32 x 40 block and 20 blocks of 1 x 5 in one each
    p = _plan(_stiefel_bucket([(1000, 9), (1, 32 * 40), (20, 5)], [3, 32, 1]))
    assert p.launches == 1 and p.n_items == (0, 2 + 1 + 1, 0)
    # sizes without a fixed-size kernel path work in the workspace: 5 p n + 4 p^2 float32 values a block
    assert p.workspace_bytes >= 4 * ((5 * 32 * 40 + 4 * 32 * 32) + 20 * (5 * 5 + 4))
    assert _plan(_stiefel_bucket([(1000, 9), (300, 1)], [3, 1])).workspace_bytes < 1000  # per-thread arrays
    assert _plan(_stiefel_bucket([(300, 49)], [7])).workspace_bytes >= 4 * 300 * (5 * 49 + 4 * 49)
    # adaptive: groups that fit a CTA share it (s_G summed on chip); a 600-block group takes the pre-pass
    b = _stiefel_bucket([(40, 9), (600, 1)], [3, 1], group_sizes=[torch.tensor([6] * 6 + [4]), torch.tensor([600])])
    p = _plan(b, adaptive="sphere")
    assert p.grouped and p.launches == 2 and p.n_items == (2, 1 + 2, 0)


def test_plan_refuses_stiefel_blocks_it_cannot_hold():
    with pytest.raises(ValueError, match="p <= 32"):
        _plan(_stiefel_bucket([(1, 33 * 40)], [33]))
    with pytest.raises(ValueError, match="p <= 32"):
        _plan(_stiefel_bucket([(2, 64 * 64)], [64]))


def test_plan_validates_tables():
    b = _bucket([(4, 9)])
    b.table[0, _native.GRAD] = 0
    with pytest.raises(ValueError, match="null parameter or gradient"):
        _plan(b)
    b = _bucket([(4, 9)])
    b.row_index[1] = 0
    with pytest.raises(ValueError, match="in two groups"):
        _plan(b)
    with pytest.raises(ValueError, match="momentum"):
        _plan(_bucket([(4, 9)]), momentum=0.9)


def test_step_guard_rejects_before_touching_the_device():
    b = _bucket([(4, 9), (2, 66000)])
    p = _plan(b)

    def step(table=b.table, n=b.n, report=16, **kw):
        tables = _C.StepTables(table.data_ptr(), n, b.groups.data_ptr(), b.groups.shape[0], b.row_index.data_ptr(),
                               b.row_index.numel(), b.dtype_code)
        _C.fused_step_cuda(p, tables, 16, 16, 16, report, _C.StepOptions(**dict(OPTS, **kw)), 0, 0)

    with pytest.raises(ValueError, match="lr"):
        step(lr=float("nan"))
    with pytest.raises(ValueError, match="different number of tensors"):
        step(n=1)
    with pytest.raises(ValueError, match="adaptive mode"):
        step(adaptive="sphere")
    rounded = b.table.clone()  # a float32 bucket: nothing to round stochastically
    rounded[1, _native.FLAGS] = _native.STOCHASTIC_ROUND
    with pytest.raises(ValueError, match="tensor 1: stochastic rounding applies to bfloat16"):
        step(table=rounded)
    with pytest.raises(ValueError, match="null report"):
        step(report=0)
    changed = b.table.clone()
    changed[1, _native.ROW_LEN] = 65999
    with pytest.raises(ValueError, match="differ from the plan"):
        step(table=changed)
    changed = b.table.clone()
    changed[0, _native.FLAGS] = _native.COLUMNS  # rows read as columns: not the plan's rows
    with pytest.raises(ValueError, match="column rows differ from the plan"):
        step(table=changed)
    changed = b.table.clone()
    changed[0, _native.FLAGS] = 8
    with pytest.raises(ValueError, match="unknown flags"):
        step(table=changed)


def test_supports_cuda_devices(monkeypatch):
    monkeypatch.setattr(_native, "_CUDA_WARNED", True)  # the one warning: tests/test_cuda_safety.py
    assert _native.supports(torch.device("cuda", 0)) is _native.cuda_usable()
    assert _native.supports(torch.device("cpu"))
    assert not _native.supports(torch.device("meta"))


def _column_bucket(shapes, group_sizes=None, orders=None):
    rows = [s[0] for s in shapes]
    b = _native.NativeBucket(rows, [s[1] for s in shapes], ["sphere"] * len(shapes),
                             orders or [torch.arange(r) for r in rows],
                             group_sizes or [torch.ones(r, dtype=torch.int64) for r in rows],
                             [None] * len(shapes), torch.float32, columns=[True] * len(shapes))
    b.table[:, _native.PARAM] = 4096
    b.table[:, _native.GRAD] = 8192
    b.table[:, _native.FLAGS] = _native.COLUMNS
    return b


def test_column_rows_take_tiles_of_32_columns():
    # 70 columns of length 300: 3 items (32 + 32 + 6), one launch; adaptive: a pre-pass of the same
    p = _plan(_column_bucket([(70, 300)]))
    assert p.launches == 1 and p.n_items == (0, 3, 0)
    tensor = _plan(_column_bucket([(70, 300)], group_sizes=[torch.tensor([70])]), adaptive="sphere")
    assert tensor.launches == 2 and tensor.n_items == (3, 3, 0)
    per_column = _plan(_column_bucket([(70, 300)]), adaptive="sphere")
    assert per_column.n_items == (3, 3, 0)


def test_column_rows_refuse_other_groupings():
    # FG-SGD PO groups (shuffled rows) are not defined on columns: the plan says so
    b = _column_bucket([(8, 30)], group_sizes=[torch.tensor([4, 4])], orders=[torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])])
    with pytest.raises(ValueError, match="column rows with an adaptive step need grouping 'row' or 'tensor'"):
        _plan(b, adaptive="sphere")

# ---- the Adam family (csrc/cuda/fused_adam_plan.h) -------------------------------------

ADAM = dict(algorithm="adam", lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)


def _adam_bucket(shapes, kind="sphere", dtype=torch.float32):
    b = _bucket(shapes, kind, dtype)
    b.table[:, _native.MOMENTUM] = 12288
    b.table[:, _native.SECOND_MOMENT] = 16384
    b.table[:, _native.STEP_COUNT] = 1
    return b


def _adam_plan(b, **kw):
    return _C.CudaPlan(b._step_tables(), _C.StepOptions(**dict(ADAM, **kw)))


def test_adam_plan_has_the_sgd_plans_items_and_launches():
    for shapes, launches in (([(1000, 9), (64, 100), (8, 3000), (3, 8192)], 1), ([(2, 66000), (5, 9)], 3)):
        sgd = _plan(_bucket(shapes))
        adam = _adam_plan(_adam_bucket(shapes))
        assert adam.algorithm == "adam" and sgd.algorithm == "sgd"
        assert adam.launches == sgd.launches == launches and adam.n_items == sgd.n_items
        assert not adam.grouped
    # a long Euclidean row (AdamW): the pre-pass (is every g finite?) and the main phase only
    p = _adam_plan(_adam_bucket([(2, 66000)], kind="euclidean"))
    assert p.launches == 2 and p.n_items == (18, 18, 0)
    # split rows: their own partial sums, 8 math values per chunk, beyond the SGD workspace
    sgd, adam = _plan(_bucket([(2, 66000)])), _adam_plan(_adam_bucket([(2, 66000)]))
    assert adam.workspace_bytes >= sgd.workspace_bytes + 18 * 8 * 4


def test_adam_plan_refuses_what_its_kernels_cannot_step():
    with pytest.raises(ValueError, match="Stiefel blocks have no CUDA kernel"):
        b = _native.NativeBucket([2], [9], ["stiefel"], [torch.arange(2)], [torch.ones(2, dtype=torch.int64)],
                                 [None], torch.float32, block_rows=[3])
        b.table[:, _native.PARAM], b.table[:, _native.GRAD] = 4096, 8192
        b.table[:, _native.MOMENTUM], b.table[:, _native.SECOND_MOMENT], b.table[:, _native.STEP_COUNT] = 1, 1, 1
        _adam_plan(b)
    with pytest.raises(ValueError, match="PSI rows have no Adam step"):
        _adam_plan(_adam_bucket([(4, 9)], kind="psi"))
    b = _adam_bucket([(4, 9)])
    b.table[0, _native.SECOND_MOMENT] = 0
    with pytest.raises(ValueError, match="first and second moment"):
        _adam_plan(b)
    with pytest.raises(ValueError, match="adaptive"):
        _adam_plan(_adam_bucket([(4, 9)]), adaptive="sphere")


def test_adam_step_guard_rejects_before_touching_the_device():
    b = _adam_bucket([(4, 9), (2, 66000)])
    adam, sgd = _adam_plan(b), _plan(_bucket([(4, 9), (2, 66000)]))

    def step(plan=adam, table=b.table, options=None):
        tables = _C.StepTables(table.data_ptr(), b.n, b.groups.data_ptr(), b.groups.shape[0], b.row_index.data_ptr(),
                               b.row_index.numel(), b.dtype_code)
        _C.fused_step_cuda(plan, tables, 16, 16, 16, 16, options or _C.StepOptions(**ADAM), 0, 0)

    with pytest.raises(ValueError, match="plan was built for the adam step, the options are sgd's"):
        step(options=_C.StepOptions(**OPTS))
    with pytest.raises(ValueError, match="plan was built for the sgd step, the options are adam's"):
        step(plan=sgd)
    with pytest.raises(ValueError, match="beta1"):
        step(options=_C.StepOptions(**dict(ADAM, beta1=1.0)))
    for col, value, match in ((_native.STEP_COUNT, 0, "step count must be >= 1"),
                              (_native.SECOND_MOMENT, 0, "first and second moment"),
                              (_native.MOMENTUM, 0, "first and second moment"),
                              (_native.ROW_LEN, 65999, "differ from the plan")):
        changed = b.table.clone()
        changed[1, col] = value
        with pytest.raises(ValueError, match=f"tensor 1: .*{match}"):
            step(table=changed)


def test_adam_plan_refuses_column_rows():
    # ManifoldAdam's column rows on a GPU take the reference path: the Adam plan says so
    b = _column_bucket([(70, 300)])
    b.table[:, _native.MOMENTUM] = 12288
    b.table[:, _native.SECOND_MOMENT] = 16384
    b.table[:, _native.STEP_COUNT] = 1
    with pytest.raises(ValueError, match="column rows .* have no Adam CUDA kernel"):
        _adam_plan(b)
