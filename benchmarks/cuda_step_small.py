"""A few fused CUDA steps over one bucket of every kind of work item, for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck): tiny rows, every
team tier, in-CTA adaptive groups, pre-pass groups, split rows (3 launches),
every dtype, momentum/Nesterov, non-finite rows, stochastic rounding; the Adam family's
kernels: AdamW rows, sphere rows with v per row and per element (split rows: 3 launches); and
Stiefel blocks (1x1, 3x3, 7x7 in registers, 32 x 40 and 2 x 5 in the workspace; QR and polar;
groups in one CTA and a 600-block group through the pre-pass).

``--device cpu`` makes the same ``NativeBucket.run`` calls on the CPU kernel (a dry
run: tests/test_gpu_scripts.py runs it, so a stale call fails on the CPU machine
before it can reach a GPU)."""
from __future__ import annotations

import argparse

import torch

from manifold_sgd import _native
from manifold_sgd.reference import AdamOptions, StepOptions, rounding_key


def bucket(shapes, kind, dtype, group, block_rows=None):
    rows = [s[0] for s in shapes]
    orders = [torch.randperm(r) for r in rows]
    sizes = []
    for r in rows:
        if group == "row":
            sizes.append(torch.ones(r, dtype=torch.int64))
        elif group == "tensor":
            sizes.append(torch.tensor([r]))
        else:
            sizes.append(torch.tensor([min(group, r - k) for k in range(0, r, group)]))
    return _native.NativeBucket(rows, [s[1] for s in shapes], [kind] * len(shapes), orders, sizes,
                                [None] * len(shapes), dtype, block_rows=block_rows)


def stiefel_cases(device) -> None:
    shapes, ps = [(40, 1), (20, 9), (5, 49), (2, 32 * 40), (600, 10)], [1, 3, 7, 32, 2]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for group, opt in [("row", StepOptions(lr=0.05, momentum=0.9, nesterov=True)),
                           ("tensor", StepOptions(lr=0.05, momentum=0.5, adaptive="sphere", retraction="polar")),
                           (3, StepOptions(lr=0.05, adaptive="general", retraction="qr"))]:
            b = bucket(shapes, "stiefel", dtype, group, block_rows=ps)
            w = [torch.linalg.qr(torch.randn(r, s // p, p, dtype=torch.float64)).Q.transpose(1, 2)
                 .reshape(r, s).to(dtype).to(device) for (r, s), p in zip(shapes, ps)]
            g = [torch.randn(s, device=device).to(dtype) for s in shapes]
            g[1][3, 4] = float("nan")
            math = torch.float64 if dtype == torch.float64 else torch.float32
            m = [torch.zeros(s, device=device, dtype=math) if opt.momentum > 0 else None for s in shapes]
            for step in range(2):
                keys = ([rounding_key(1, step, i) for i in range(len(shapes))] if dtype == torch.bfloat16
                        else None)
                b.run(w, g, m, [step == 0] * len(shapes), opt, rounding_keys=keys, reset_report=False)
            rep = b.take_report()
            assert all(torch.isfinite(x.float()).all() for x in w), (dtype, "stiefel")
            print(f"{str(dtype):16s} {'stiefel':12s} group={group!s:6s} launches={b.launches} "
                  f"skipped={rep[:, 0].tolist()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run on the CPU kernel)")
    device = torch.device(ap.parse_args(argv).device)
    torch.manual_seed(0)
    shapes = [(40, 9), (20, 31), (9, 130), (5, 900), (3, 3000), (2, 9000), (2, 20000)]
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for kind, group, opt in [
            ("sphere", "row", StepOptions(lr=0.05, momentum=0.9, nesterov=True)),
            ("sphere", "tensor", StepOptions(lr=0.05, adaptive="sphere")),
            ("psi", 3, StepOptions(lr=0.05, momentum=0.5, adaptive="general", psi_max_norm=1.2)),
            ("euclidean", "row", StepOptions(lr=0.05, momentum=0.9, weight_decay=0.01)),
        ]:
            cases.append((dtype, kind, group, opt))
        for kind, opt in [("sphere", AdamOptions(lr=0.01, second_moment="row")),
                          ("sphere", AdamOptions(lr=0.01, second_moment="element")),
                          ("euclidean", AdamOptions(lr=0.01, weight_decay=0.1))]:
            cases.append((dtype, kind, "row", opt))
    for dtype, kind, group, opt in cases:
        b = bucket(shapes, kind, dtype, group)
        w = [torch.nn.functional.normalize(torch.randn(s, device=device), dim=1).to(dtype) for s in shapes]
        g = [torch.randn(s, device=device).to(dtype) for s in shapes]
        g[1][3, 4] = float("nan")
        math = torch.float64 if dtype == torch.float64 else torch.float32
        adam = isinstance(opt, AdamOptions)
        m = [torch.zeros(s, device=device, dtype=math) if adam or opt.momentum > 0 else None for s in shapes]
        adam_state = {}
        if adam:  # v per row on sphere rows with second_moment="row", else per element
            adam_state["second_moments"] = [
                torch.zeros(s[0] if kind == "sphere" and opt.second_moment == "row" else s, device=device, dtype=math)
                for s in shapes]
        for step in range(2):
            keys = ([rounding_key(1, step, i) for i in range(len(shapes))] if dtype == torch.bfloat16
                    else None)
            if adam:
                adam_state["step_counts"] = [step + 1] * len(shapes)
            b.run(w, g, m, [step == 0] * len(shapes), opt, rounding_keys=keys, reset_report=False, **adam_state)
        rep = b.take_report()
        assert all(torch.isfinite(x.float()).all() for x in w), (dtype, kind)
        name = f"adam-{opt.second_moment if kind == 'sphere' else 'w'}" if adam else kind
        print(f"{str(dtype):16s} {name:12s} group={group!s:6s} launches={b.launches} skipped={rep[:, 0].tolist()}")
    stiefel_cases(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_step_small: done ({device})")


if __name__ == "__main__":
    main()
