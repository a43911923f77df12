"""Memory layouts: which bytes form a row, and which parameters share memory.

A row of SPEC §1 is a set of elements (one output channel for ``filter``, one
(out, in) kernel slice for ``kernel``, all of them for ``tensor``). Everything the
step does to a row is invariant under a permutation of the row's elements, as
long as w, g and m are permuted alike. So a dense tensor whose leading "row" dims
are outermost in memory (a channels_last conv weight with ``filter`` rows, any
dense tensor with ``tensor`` rows or on a Euclidean row) is stepped in place on
its own storage, each row being one contiguous block. Any other layout (a
transposed or sliced parameter, ``kernel`` rows of a channels_last weight) is
stepped on a contiguous copy that is written back.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def lead_dims(kind: str, granularity: str, ndim: int) -> int:
    """How many leading dims index the rows (0: the row math is elementwise or whole-tensor)."""
    if kind == "stiefel":  # a block's element order is its p x n matrix: row-major only
        return ndim
    if kind == "euclidean" or granularity == "tensor" or ndim < 2:
        return 0
    if granularity == "kernel":
        return 2
    if granularity == "filter":
        return 1
    return ndim  # any other view ("last", "column", ...): only a row-major layout is safe


def _sig(t: torch.Tensor) -> Tuple[Tuple[int, int], ...]:
    """(size, stride) of every dim that matters (dims of size 1 have arbitrary strides)."""
    return tuple((s, st) for s, st in zip(t.shape, t.stride()) if s != 1)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly once."""
    expected = 1
    for size, stride in sorted(_sig(t), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def rows_in_place(t: torch.Tensor, lead: int) -> bool:
    """Whether ``t``'s own storage holds its rows as consecutive blocks (see module doc)."""
    if not is_dense(t):
        return False
    inner = 1
    for d in range(t.dim() - 1, -1, -1):
        if d < lead and t.shape[d] != 1 and t.stride(d) != inner:
            return False
        inner *= t.shape[d]
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and _sig(a) == _sig(b)


def like(p: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``src`` (same shape as ``p``) laid out in memory like ``p`` when ``p`` is dense."""
    out = torch.empty_like(p, dtype=src.dtype) if is_dense(p) else torch.empty(
        p.shape, dtype=src.dtype, device=p.device)
    return out.copy_(src)


def row_view(t: torch.Tensor, rows: int, row_len: int, column: bool = False) -> torch.Tensor:
    """The (rows, row_len) view of a work tensor in memory order; ``column``: the rows are the
    columns of the row-major (row_len, rows) matrix (a transposed view, no copy)."""
    if column:
        return t.as_strided((rows, row_len), (1, rows))
    return t.as_strided((rows, row_len), (row_len, 1))


class WorkSet:
    """The (w, g, m) of one tensor as the kernels need them: one common dense layout.

    ``w``/``m`` copies are written back by :meth:`finish`; the in-place case copies nothing.
    """

    __slots__ = ("p", "m", "w_work", "g_work", "m_work")

    def __init__(self, p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor], lead: int):
        self.p, self.m = p, m
        if p.is_contiguous() and g.is_contiguous() and (m is None or m.is_contiguous()):
            self.w_work, self.g_work, self.m_work = p, g, m  # the common case
            return
        if rows_in_place(p, lead):
            ref = p
            self.w_work = p
        else:
            ref = p.contiguous()
            self.w_work = ref
        self.g_work = g if same_layout(g, ref) else _copy_as(ref, g)
        if m is None:
            self.m_work = None
        else:
            self.m_work = m if same_layout(m, ref) else _copy_as(ref, m)

    def rows(self, t: torch.Tensor, rows: int, row_len: int, column: bool = False) -> torch.Tensor:
        return row_view(t, rows, row_len, column)

    def finish(self) -> None:
        if self.w_work is not self.p:
            self.p.copy_(self.w_work)
        if self.m is not None and self.m_work is not self.m:
            self.m.copy_(self.m_work)


def _copy_as(ref: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(ref.shape, ref.stride(), dtype=src.dtype, device=src.device).copy_(src)


# ---- parameters that share memory ---------------------------------------------------

def _extent(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last] element offsets of ``t`` in its storage (in elements)."""
    lo = t.storage_offset()
    hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return lo, hi


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors on one storage share an element (exact, used only when extents meet)."""
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    if ahi < blo or bhi < alo:
        return False
    if a.element_size() != b.element_size() or a.dtype != b.dtype:
        return True  # reinterpreted bytes: treat any meeting extents as shared
    lo, hi = min(alo, blo), max(ahi, bhi)
    mark = torch.zeros(hi - lo + 1, dtype=torch.bool)
    mark.as_strided(a.shape, a.stride(), alo - lo).fill_(True)
    return bool(mark.as_strided(b.shape, b.stride(), blo - lo).any())


def check_no_shared_memory(new: Sequence[Tuple[torch.Tensor, str]],
                           existing: Sequence[Tuple[torch.Tensor, str]],
                           memory: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
    """Raise ValueError when a new parameter is listed twice or shares memory with another.

    Tied weights must be one Parameter object (``nn.Module.parameters()`` then yields it
    once); two tensors viewing the same elements would be stepped twice per step.
    ``memory`` maps a parameter to the tensor holding its elements here (a DTensor's shard).
    """
    by_storage: Dict[Tuple[str, int], List[Tuple[torch.Tensor, str]]] = {}
    seen: Dict[int, str] = {}
    for t, name in existing:
        seen[id(t)] = name
        mem = memory(t)
        if mem.numel():
            by_storage.setdefault(_storage_key(mem), []).append((mem, name))
    for t, name in new:
        if id(t) in seen:
            raise ValueError(f"{name}: the same tensor is also {seen[id(t)]}; list each parameter "
                             f"once (tied weights: share one Parameter object)")
        seen[id(t)] = name
        mem = memory(t)
        if not mem.numel():
            continue
        peers = by_storage.setdefault(_storage_key(mem), [])
        for other, oname in peers:
            if _overlap(mem, other):
                raise ValueError(f"{name} shares memory with {oname}: each step would move the shared "
                                 f"elements twice; tie weights by sharing one Parameter object instead")
        peers.append((mem, name))


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())
