"""Rows left unchanged by a non-finite gradient or step: what a step reports, and the ledger
that counts and warns.

A report is a (tensors, 2) int64 table, one (count, first row) per tensor, first -1 when none;
the native kernels write it in that layout (_native.SKIPPED_ROWS, FIRST_SKIPPED_ROW). Reports
of several steps merge by one rule, ``merge``: counts add, the smallest first row of the
reports that skipped something is kept. The native CPU path accumulates with it, the
reference steps on a GPU keep their device reports with it, and the ledger merges what it
collects with it (the CUDA kernel applies the same rule on the device).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

COUNT, FIRST = 0, 1  # columns of a report


def merge(acc: torch.Tensor, new: torch.Tensor) -> None:
    """Adds report ``new`` into ``acc`` in place (same shapes, (..., 2), on one device): counts
    added, the smallest first row kept among those with skipped rows. No host synchronisation."""
    had, has = acc[..., COUNT] > 0, new[..., COUNT] > 0
    acc[..., FIRST] = torch.where(has, torch.where(had, torch.minimum(acc[..., FIRST], new[..., FIRST]),
                                                   new[..., FIRST]), acc[..., FIRST])
    acc[..., COUNT] += new[..., COUNT]


def empty(n: Optional[int] = None, device=None) -> torch.Tensor:
    """A report with nothing skipped: (n, 2), or (2,) for one tensor when n is None."""
    rep = torch.tensor([0, -1], dtype=torch.int64, device=device)
    return rep if n is None else rep.repeat(n, 1)


def of_mask(mask: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """The (2,) report of one tensor's step from its mask of skipped rows (on its device)."""
    first = mask.to(torch.int32).argmax().to(torch.int64) + row_offset
    return torch.stack([mask.sum().to(torch.int64), first])


class SkipLedger:
    """Skipped rows of an optimizer's steps: the count so far, and the reports still on a GPU.

    A CPU step's skips are counted and warned at once (``add``). A GPU step leaves its report
    on the device (reading it would synchronise the host every step): a native bucket's report
    stays in the bucket (read at ``collect``), a retired bucket's is ``hold``-ed, a reference
    step's is merged into its parameter's device report (``defer``). ``collect`` reads them all
    (one synchronisation), merges them per parameter and warns once per parameter."""

    def __init__(self, count: int = 0):
        self.count = count
        self._held: List[Tuple[List[str], torch.Tensor]] = []
        self._device: Dict[int, Tuple[str, torch.Tensor]] = {}  # id(param) -> (name, (2,) report)

    def __len__(self) -> int:
        return len(self._held)

    def add(self, skipped: Iterable[Tuple[str, int, int]], stacklevel: int) -> None:
        """Counts and warns this step's skips: (name, rows, first row) of each tensor with some."""
        for name, n, first in skipped:
            self.count += n
            warnings.warn(f"manifold_sgd: {name}: non-finite gradient or step; {n} row(s) left "
                          f"unchanged this step (first: row {first})", RuntimeWarning, stacklevel=stacklevel + 1)

    def hold(self, names: Sequence[str], report: torch.Tensor) -> None:
        """Keeps a report still on a device (a bucket that is dropped), to be read with the others."""
        self._held.append((list(names), report))

    def defer(self, key: int, name: str, mask: torch.Tensor, row_offset: int = 0) -> None:
        """Merges a reference step's skipped rows on a GPU into the parameter's device report."""
        held = self._device.get(key)
        if held is None or held[1].device != mask.device:
            held = self._device[key] = (name, empty(device=mask.device))
        merge(held[1], of_mask(mask, row_offset))

    def collect(self, live: Iterable[Tuple[Sequence[str], torch.Tensor]], stacklevel: int) -> None:
        """Reads every report (``live``: those taken from the current buckets, as host tensors),
        counts the skipped rows and warns once per parameter that has some."""
        sources = self._held + [(list(n), r) for n, r in live]
        self._held = []
        for name, rep in self._device.values():
            sources.append(([name], rep.view(1, 2).to("cpu", copy=True)))
            rep.copy_(empty(device=rep.device))
        merged: Dict[str, torch.Tensor] = {}
        for names, rep in sources:
            rep = rep.to("cpu")
            for i in rep[:, COUNT].nonzero().flatten().tolist():
                merge(merged.setdefault(names[i], empty()), rep[i])
        for name, rep in merged.items():
            n, first = int(rep[COUNT]), int(rep[FIRST])
            self.count += n
            warnings.warn(f"manifold_sgd: {name}: non-finite gradient or step; {n} row(s) left "
                          f"unchanged in the GPU steps since the last report (first: row {first})",
                          RuntimeWarning, stacklevel=stacklevel + 1)
