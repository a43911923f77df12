"""A few fused CUDA steps over one bucket of every kind of work item, for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck): tiny rows, every
team tier, in-CTA adaptive groups, pre-pass groups, split rows (3 launches),
every dtype, momentum/Nesterov, non-finite rows, stochastic rounding."""
from __future__ import annotations

import torch

from manifold_sgd import _native
from manifold_sgd.reference import StepOptions


def bucket(shapes, kind, dtype, group):
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
                                [None] * len(shapes), dtype)


def main() -> None:
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
    for dtype, kind, group, opt in cases:
        b = bucket(shapes, kind, dtype, group)
        w = [torch.nn.functional.normalize(torch.randn(s, device="cuda"), dim=1).to(dtype) for s in shapes]
        g = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        g[1][3, 4] = float("nan")
        m = [torch.zeros(s, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
             if opt.momentum > 0 else None for s in shapes]
        for step in range(2):
            b.run(w, g, m, [step == 0] * len(shapes), opt, reset_report=False,
                  stochastic_rounding=dtype == torch.bfloat16, seed=1, step=step)
        rep = b.take_report()
        assert all(torch.isfinite(x.float()).all() for x in w), (dtype, kind)
        print(f"{str(dtype):16s} {kind:9s} group={group!s:6s} launches={b.launches} skipped={rep[:, 0].tolist()}")
    torch.cuda.synchronize()
    print("cuda_step_small: done")


if __name__ == "__main__":
    main()
