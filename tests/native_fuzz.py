"""Fuzz the native boundary: random, mostly inconsistent inputs to ``_native.NativeBucket``
and inconsistent tables straight into ``_C.fused_step_cpu`` (on real memory). Every input
must either step or raise ValueError/TypeError; a crash kills this process, which is why
tests/test_native_errors.py runs it in a subprocess (and tools/sanitize.sh under ASan).

    python tests/native_fuzz.py SEED CASES      prints "ok <stepped> <raised>"
"""
import random
import sys
from types import SimpleNamespace

import torch

from manifold_sgd import _native
from manifold_sgd._native import _C

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["euclidean", "sphere", "psi"]


def _opt(rng, momentum):
    return SimpleNamespace(lr=rng.choice([0.1, 0.0, 1e3]), momentum=momentum,
                           nesterov=momentum > 0 and rng.random() < 0.3, weight_decay=0.0,
                           adaptive=rng.choice(["none", "sphere", "general"]), curvature=1.0,
                           distance=1.0, psi_max_norm=1e4)


def _valid(rng):
    """A consistent bucket: per tensor (rows, row_len, kind, order, sizes, p, g, m)."""
    dtype = rng.choice(DTYPES)
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    momentum = rng.choice([0.0, 0.9])
    items = []
    for _ in range(rng.randint(1, 4)):
        rows, row_len = rng.randint(1, 6), rng.randint(1, 9)
        order = torch.randperm(rows)
        cut = sorted(rng.sample(range(1, rows), rng.randint(0, rows - 1))) if rows > 1 else []
        sizes = torch.tensor([b - a for a, b in zip([0] + cut, cut + [rows])], dtype=torch.int64)
        p = torch.randn(rows, row_len, dtype=torch.float64).to(dtype)
        g = torch.randn(rows, row_len, dtype=torch.float64).to(dtype)
        m = torch.zeros(rows, row_len, dtype=mdt) if momentum > 0 else None
        items.append(dict(rows=rows, row_len=row_len, kind=rng.choice(KINDS), order=order, sizes=sizes,
                          p=p, g=g, m=m, radius=None))
    return dtype, momentum, items


def _corrupt(rng, dtype, momentum, items):
    """Apply one inconsistency; returns a label."""
    it = rng.choice(items)
    what = rng.choice(["rows", "row_len", "rows_zero", "rows_float", "kind", "order_len", "order_dup",
                       "order_range", "sizes_sum", "sizes_zero", "grad_dtype", "grad_size", "param_slice",
                       "grad_layout", "m_missing", "m_extra", "m_dtype", "m_size", "grad_not_tensor",
                       "meta", "radius_len", "order_float", "names_len", "adaptive"])
    if what == "rows":
        it["rows"] += rng.choice([-1, 1, 7])
    elif what == "row_len":
        it["row_len"] += rng.choice([1, 5, 1000])
    elif what == "rows_zero":
        it["rows"] = rng.choice([0, -3])
    elif what == "rows_float":
        it["rows"] = float(it["rows"])
    elif what == "kind":
        it["kind"] = rng.choice(["hyperbolic", "", 3])
    elif what == "order_len":
        it["order"] = torch.arange(it["rows"] + 1)
    elif what == "order_dup":
        it["order"] = torch.zeros(it["rows"], dtype=torch.int64) if it["rows"] > 1 else torch.tensor([5])
    elif what == "order_range":
        it["order"] = it["order"].clone()
        it["order"][0] = rng.choice([-1, it["rows"], 1 << 40])
    elif what == "sizes_sum":
        it["sizes"] = torch.cat([it["sizes"], torch.tensor([1])])
    elif what == "sizes_zero":
        it["sizes"] = torch.cat([it["sizes"], torch.tensor([0])])
    elif what == "grad_dtype":
        it["g"] = it["g"].to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif what == "grad_size":
        it["g"] = torch.randn(it["rows"] * it["row_len"] + 3).to(dtype)
    elif what == "param_slice":
        it["p"] = torch.randn(it["rows"], it["row_len"] + 2).to(dtype)[:, 1:-1]
    elif what == "grad_layout":
        if it["rows"] > 1 and it["row_len"] > 1:
            it["g"] = it["g"].t().contiguous().t()
        else:
            it["g"] = it["g"].reshape(-1)[:0]
    elif what == "m_missing":
        if it["m"] is None:
            it["m"] = torch.zeros(it["rows"], it["row_len"])
        else:
            it["m"] = None
    elif what == "m_extra":
        it["m"] = torch.zeros(it["rows"], it["row_len"]) if it["m"] is None else None
    elif what == "m_dtype":
        wrong = dtype if dtype != torch.float32 else torch.float64
        it["m"] = torch.zeros(it["rows"], it["row_len"], dtype=wrong)  # without momentum: extra, an error
    elif what == "m_size":
        mdt = torch.float64 if dtype == torch.float64 else torch.float32
        it["m"] = torch.zeros(it["rows"] + 1, it["row_len"], dtype=mdt)
    elif what == "grad_not_tensor":
        it["g"] = [0.0] * (it["rows"] * it["row_len"])
    elif what == "meta":
        it["p"] = torch.empty(it["rows"], it["row_len"], dtype=dtype, device="meta")
    elif what == "radius_len":
        it["radius"] = torch.ones(it["rows"] + 2)
    elif what == "order_float":
        it["order"] = it["order"].double()
    elif what == "names_len":
        return "names_len"
    elif what == "adaptive":
        return "adaptive"
    return what


def _run(dtype, momentum, items, opt, names=None):
    b = _native.NativeBucket([i["rows"] for i in items], [i["row_len"] for i in items],
                             [i["kind"] for i in items], [i["order"] for i in items],
                             [i["sizes"] for i in items], [i["radius"] for i in items], dtype, names=names)
    return b.run([i["p"] for i in items], [i["g"] for i in items], [i["m"] for i in items],
                 [True] * len(items), opt)


def fuzz_native(rng, cases):
    stepped = raised = 0
    for _ in range(cases):
        dtype, momentum, items = _valid(rng)
        opt = _opt(rng, momentum)
        label = _corrupt(rng, dtype, momentum, items) if rng.random() < 0.85 else None
        names = [f"param_{k}" for k in range(len(items))]
        if label == "names_len":
            names = names[:-1] if len(names) > 1 else []
        if label == "adaptive":
            opt.adaptive = "bogus"
        try:
            _run(dtype, momentum, items, opt, names)
            stepped += 1
        except (ValueError, TypeError) as exc:
            raised += 1
            msg = str(exc)
            assert msg, label
            assert label is not None, f"a consistent bucket raised: {msg}"
            if label not in ("names_len", "adaptive"):
                assert "param_" in msg or "NativeBucket" in msg, (label, msg)
        else:
            # an inconsistency never steps, except two that can leave the bucket consistent:
            # a float64 momentum for a float64 bucket, and a "slice" of a single row (dense)
            assert label in (None, "m_dtype", "param_slice"), f"inconsistent input stepped: {label}"
    return stepped, raised


def fuzz_tables(rng, cases):
    """Inconsistent tables straight into _C (all addresses point at real buffers)."""
    raised = 0
    F = _native
    for _ in range(cases):
        n = rng.randint(1, 3)
        rows, row_len = 4, 3
        bufs = [torch.randn(rows * row_len) for _ in range(3 * n)]
        table = torch.zeros(n, F.TENSOR_FIELDS, dtype=torch.int64)
        for t in range(n):
            table[t, F.PARAM] = bufs[3 * t].data_ptr()
            table[t, F.GRAD] = bufs[3 * t + 1].data_ptr()
            table[t, F.MOMENTUM] = bufs[3 * t + 2].data_ptr()
            table[t, F.ROWS], table[t, F.ROW_LEN], table[t, F.KIND] = rows, row_len, 1
            table[t, F.BLOCK_ROWS] = 1
        row_index = torch.arange(rows).repeat(n)
        groups = torch.tensor([[t, t * rows, rows] for t in range(n)], dtype=torch.int64)
        report = torch.zeros(n, F.REPORT_FIELDS, dtype=torch.int64)
        args = dict(dtype=0, momentum=0.9, lr=0.1, num_threads=1, adaptive="sphere", report=report.data_ptr())
        what = rng.choice(["rows", "row_len", "kind", "flags", "momentum_null", "group_tensor",
                           "group_range", "group_count", "row_dup", "row_oor", "row_missing", "dtype",
                           "threads", "report_null", "lr", "momentum", "adaptive", "n_row_index"])
        t = rng.randrange(n)
        n_groups, n_row_index = n, n * rows
        if what == "rows":
            table[t, F.ROWS] = rng.choice([0, -1, rows + 1])
        elif what == "row_len":
            table[t, F.ROW_LEN] = rng.choice([0, -5])
        elif what == "kind":
            table[t, F.KIND] = rng.choice([-1, 4, 99])
        elif what == "flags":
            table[t, F.FLAGS] = 6
        elif what == "momentum_null":
            table[t, F.MOMENTUM] = 0
        elif what == "group_tensor":
            groups[t, 0] = rng.choice([-1, n])
        elif what == "group_range":
            groups[t, 1] = rng.choice([-1, n * rows])
        elif what == "group_count":
            groups[t, 2] = rng.choice([0, rows + 1])
        elif what == "row_dup":
            row_index[t * rows + 1] = row_index[t * rows]
        elif what == "row_oor":
            row_index[t * rows] = rng.choice([-1, rows])
        elif what == "row_missing":
            groups[t, 2] = rows - 1
        elif what == "dtype":
            args["dtype"] = rng.choice([-1, 4])
        elif what == "threads":
            args["num_threads"] = 0
        elif what == "report_null":
            args["report"] = 0
        elif what == "lr":
            args["lr"] = rng.choice([float("nan"), -1.0, float("inf")])
        elif what == "momentum":
            args["momentum"] = rng.choice([1.0, -0.5])
        elif what == "adaptive":
            args["adaptive"] = rng.choice(["bogus", "Sphere", ""])
        elif what == "n_row_index":
            n_row_index -= 1
        try:
            tables = _C.StepTables(table.data_ptr(), n, groups.data_ptr(), n_groups, row_index.data_ptr(),
                                   n_row_index, args["dtype"])
            options = _C.StepOptions(lr=args["lr"], momentum=args["momentum"], adaptive=args["adaptive"])
            _C.fused_step_cpu(tables, options, args["report"], args["num_threads"])
        except ValueError as exc:
            raised += 1
            assert str(exc), what
        else:
            raise AssertionError(f"inconsistent table accepted: {what}")
    return raised


def main(seed, cases):
    rng = random.Random(seed)
    stepped, raised = fuzz_native(rng, cases)
    raised_tables = fuzz_tables(rng, cases // 2)
    print(f"ok {stepped} {raised} {raised_tables}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]))
