"""Rows and groups of a parameter tensor (SPEC §1).

A tensor is viewed as a matrix of rows by its granularity; the rows are then
partitioned into groups that share one adaptive step. The partition of a tensor
is described by ``row_order`` (a permutation of its rows) and ``group_sizes``
(consecutive runs of ``row_order``), which is also how the kernels receive it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

# "last": rows along the last dim (geoopt's sphere); "column": the d1 columns of a matrix (the rows of W^T)
GRANULARITIES = ("filter", "kernel", "tensor", "last", "column")
GROUPINGS = ("row", "tensor", "PO", "PI", "PIO")


def row_shape(shape: Sequence[int], granularity: str) -> Tuple[int, int]:
    """(rows, row_length) of a tensor of this shape under a granularity.

    ``filter`` on a tensor with fewer than two dims is the whole tensor as one row.
    """
    dims = [int(d) for d in shape]

    def prod(xs):
        n = 1
        for d in xs:
            n *= d
        return n

    if granularity == "column":
        if len(dims) != 2:
            raise ValueError(f"granularity='column' needs a matrix (ndim 2), got shape {tuple(dims)}")
        return dims[1], dims[0]
    if granularity == "tensor" or len(dims) < 2:
        return 1, prod(dims)
    if granularity == "filter":
        return dims[0], prod(dims[1:])
    if granularity == "kernel":
        return dims[0] * dims[1], prod(dims[2:])
    if granularity == "last":
        return prod(dims[:-1]), dims[-1]
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def component_shape(shape: Sequence[int], granularity: str, kind: str) -> Tuple[int, int, int]:
    """(components, component_length, block_rows) of a tensor on a manifold kind.

    Row manifolds: the rows of ``row_shape`` (block_rows 1). Stiefel: each component is a
    p x n block with orthonormal rows: ``kernel`` gives one kh x (kw...) block per
    (out, in) pair (a conv1d kernel is 1 x k); ``filter``/``tensor`` give the whole
    (out, -1) matrix as one block; ``column`` the whole ``W^T`` (W with orthonormal columns,
    geoopt's convention), one d1 x d0 block.
    """
    if kind != "stiefel":
        rows, row_len = row_shape(shape, granularity)
        return rows, row_len, 1
    numel = 1
    for d in shape:
        numel *= int(d)
    if granularity == "kernel":
        comps = int(shape[0]) * int(shape[1])
        return comps, numel // comps, int(shape[2]) if len(shape) >= 4 else 1
    if granularity == "column":
        row_shape(shape, granularity)  # a matrix only
        return 1, numel, int(shape[1])
    return 1, numel, int(shape[0])


def as_rows(t: torch.Tensor, granularity: str, rows: int, row_len: int) -> torch.Tensor:
    """The (rows, row_len) view of ``t`` (its logical element order): ``column`` rows are the
    rows of ``t.T`` (a strided view; a Stiefel block, ``W^T`` as one row, is a copy); the others
    a reshape. Element ``j`` of row ``i`` has the index ``i * row_len + j`` here: the index
    stochastic rounding draws its bits from, on every backend."""
    if granularity == "column":
        return t.t().reshape(rows, row_len)
    return t.reshape(rows, row_len)


def from_rows(x: torch.Tensor, granularity: str, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`as_rows`: rows back to a tensor of ``shape``."""
    if granularity == "column":
        return x.reshape(int(shape[1]), int(shape[0])).t()
    return x.reshape(tuple(shape))


def check_layout(shape: Sequence[int], granularity: str, grouping: str, where: str,
                 kind: str = "sphere") -> None:
    """Raise ValueError for combinations SPEC §1 rules out, naming the parameter."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"{where}: unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if grouping not in GROUPINGS:
        raise ValueError(f"{where}: unknown grouping {grouping!r}; expected one of {GROUPINGS}")
    if granularity == "column" and len(shape) != 2:
        raise ValueError(
            f"{where}: granularity='column' needs a matrix (ndim 2: its d1 columns of length d0 are the "
            f"rows), got shape {tuple(shape)}"
        )
    if granularity == "column" and grouping in ("PO", "PI", "PIO"):
        raise ValueError(f"{where}: grouping={grouping!r} is not defined for granularity='column' "
                         f"(use grouping 'row' or 'tensor')")
    if granularity == "kernel" and len(shape) < 3:
        raise ValueError(
            f"{where}: granularity='kernel' needs a conv weight (ndim >= 3), got shape {tuple(shape)}"
        )
    if grouping in ("PI", "PIO") and granularity != "kernel":
        raise ValueError(f"{where}: grouping={grouping!r} needs granularity='kernel'")
    if grouping == "PO" and granularity in ("tensor", "last"):
        raise ValueError(f"{where}: grouping='PO' needs granularity 'filter' or 'kernel'")
    if kind == "stiefel":
        if len(shape) < 2:
            raise ValueError(f"{where}: manifold='stiefel' needs a matrix or conv weight, got shape {tuple(shape)}")
        _, length, p = component_shape(shape, granularity, kind)
        if p > length // p:
            raise ValueError(f"{where}: a Stiefel block of shape ({p}, {length // p}) has more rows than "
                             f"columns (p <= n is needed for orthonormal rows)")


def _chunks(candidates: torch.Tensor, group_size: Optional[int], gen: torch.Generator):
    """Draw groups of ``group_size`` from the candidates without replacement. Each group's
    rows are kept in ascending order, so a kernel reads them in memory order."""
    shuffled = candidates[torch.randperm(candidates.numel(), generator=gen)]
    size = candidates.numel() if group_size is None else group_size
    return [torch.sort(g).values for g in torch.split(shuffled, size)]


def assign_groups(
    shape: Sequence[int],
    granularity: str,
    grouping: str,
    group_size: Optional[int],
    gen: torch.Generator,
    kind: str = "sphere",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partition the components (rows, or Stiefel blocks) of one tensor into groups;
    returns (row_order, group_sizes), int64 CPU."""
    rows, _, _ = component_shape(shape, granularity, kind)
    if grouping == "row":
        return torch.arange(rows), torch.ones(rows, dtype=torch.int64)
    if grouping == "tensor":
        return torch.arange(rows), torch.tensor([rows], dtype=torch.int64)
    if rows == 1:
        return torch.arange(1), torch.ones(1, dtype=torch.int64)
    if granularity == "kernel":
        d_out, d_in = int(shape[0]), int(shape[1])
        grid = torch.arange(rows).view(d_out, d_in)  # row index of (out, in)
        if grouping == "PO":  # same input channel, across output channels
            candidate_sets = [grid[:, i] for i in range(d_in)]
        elif grouping == "PI":  # same output filter, across input channels
            candidate_sets = [grid[o, :] for o in range(d_out)]
        else:  # PIO: across both
            candidate_sets = [grid.reshape(-1)]
    else:  # PO on filter rows: sets of whole filters
        candidate_sets = [torch.arange(rows)]
    groups = [g for c in candidate_sets for g in _chunks(c, group_size, gen)]
    order = torch.cat(groups)
    sizes = torch.tensor([g.numel() for g in groups], dtype=torch.int64)
    return order, sizes


def group_of_row(row_order: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """For each row, the index of its group."""
    ids = torch.repeat_interleave(torch.arange(group_sizes.numel()), group_sizes)
    out = torch.empty_like(ids)
    out[row_order] = ids
    return out
