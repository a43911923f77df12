"""Sharded parameters (DTensor, e.g. FSDP2's ``fully_shard``): local rows and the one seam
where a collective runs.

Supported layouts of a DTensor parameter, per mesh dim:

- ``Replicate()``: every rank holds and steps the whole tensor (the same result everywhere).
- ``Shard(0)`` (FSDP2's layout): each rank holds whole rows (``filter`` rows, and ``kernel``
  rows since they are ``(out, in)`` pairs) and steps them locally with no communication. An
  adaptive FG-SGD group whose rows sit on several ranks needs ``R_G² = Σ ‖g̃_i‖²`` over all of
  them: :func:`all_reduce_group_sums` sums one number per group over the ranks that shard the
  tensor. That is the only collective the optimizer issues.
- Euclidean tensors are elementwise, so any ``Shard(d)`` is fine for them.

Rejected with a ValueError naming the parameter: a manifold row split across ranks
(``Shard(d)`` with ``d > 0``, ``granularity="tensor"`` or a 1-D tensor on a sharded mesh dim,
``_StridedShard``), and ``Partial`` placements.

Nothing here imports ``torch.distributed.tensor`` unless the program already did (a DTensor
can only exist then), so plain single-process use pays nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


_DTENSOR: list = []  # the DTensor class, once the program has imported it


def _dtensor_cls():
    if not _DTENSOR:
        mod = sys.modules.get("torch.distributed.tensor")
        cls = getattr(mod, "DTensor", None) if mod is not None else None
        if cls is None:
            return None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    cls = _DTENSOR[0] if _DTENSOR else _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (a view: writes reach the parameter); other tensors as is."""
    if t is not None and is_dtensor(t):
        return t.to_local()
    return t


@dataclass
class Shard0Rows:
    """Where a rank's local rows sit among the tensor's global rows."""
    row_offset: int          # global index of the first local row
    local_rows: int
    reduce_groups: Tuple      # process groups over which group sums are all-reduced


def _placements(p) -> Sequence:
    return tuple(p.placements)


def row_layout(p: torch.Tensor, kind: str, rows: int, name: str, granularity: str = "filter") -> Optional[Shard0Rows]:
    """Where the local rows of a DTensor parameter sit, or None when the rank holds all of
    them (a plain tensor, a replicated one) or the rows do not matter (Euclidean: elementwise).
    Raises ValueError when a manifold row would be split across ranks.

    ``rows`` is the global row count of the kind's granularity.
    """
    if not is_dtensor(p) or p.numel() == 0:
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    sharded_dims: List[int] = []
    for mesh_dim, pl in enumerate(_placements(p)):
        if isinstance(pl, Replicate) or mesh.size(mesh_dim) == 1:
            continue
        if not isinstance(pl, Shard):
            raise ValueError(f"{name}: placement {pl!r} on mesh dim {mesh_dim} is not supported "
                             f"(supported: Shard(0) and Replicate; see manifold_sgd.distributed)")
        if kind == "euclidean" and type(pl) is Shard:
            continue  # elementwise: any split is fine
        if type(pl) is not Shard or pl.dim != 0:
            raise ValueError(f"{name}: placement {pl!r} on mesh dim {mesh_dim} splits its manifold rows "
                             f"across ranks; rows must be whole on one rank (supported: Shard(0) and "
                             f"Replicate; see manifold_sgd.distributed)")
        if granularity == "column":  # a column holds one element of every dim-0 index
            raise ValueError(f"{name}: granularity='column' rows (the columns, of length d0) would be split "
                             f"across ranks by Shard(0) on mesh dim {mesh_dim}; step it unsharded (e.g. leave "
                             f"it out of fully_shard) or use granularity='filter'")
        d0 = int(p.shape[0])
        if rows < d0 or rows % d0:  # rows are not dim-0 slices ("tensor" rows, a 1-D tensor)
            raise ValueError(f"{name}: its one manifold row (shape {tuple(p.shape)}, a single row under "
                             f"this granularity) is split across ranks by Shard(0) on mesh dim "
                             f"{mesh_dim}; use granularity='filter' or 'kernel', or do not shard it")
        sharded_dims.append(mesh_dim)
    if kind == "euclidean" or not sharded_dims:
        return None
    per_dim0 = rows // int(p.shape[0])  # rows per index of dim 0 (kernel granularity: d1)
    return Shard0Rows(_dim0_offset(p) * per_dim0, int(p.to_local().shape[0]) * per_dim0,
                      tuple(mesh.get_group(d) for d in sharded_dims))


def row_state_zeros(p, kind: str, rows: int, name: str, granularity: str, dtype: torch.dtype):
    """Zeros, one per manifold row of the DTensor ``p``, as a DTensor sharded like ``p``'s rows:
    shape ``(d0,)`` or ``(d0, rows // d0)`` (several rows per dim-0 index, e.g. kernel rows),
    so that ``Shard(0)`` puts each rank's values beside its rows; replicated (shape ``(rows,)``)
    where ``p``'s rows are not split. Its local shard, flattened, is this rank's rows in order."""
    from torch.distributed.tensor import DTensor, Replicate

    shard = row_layout(p, kind, rows, name, granularity)
    local_device = p.to_local().device
    if shard is None:  # every rank holds every row
        placements = [Replicate()] * p.device_mesh.ndim
        local = torch.zeros(rows, dtype=dtype, device=local_device)
        return DTensor.from_local(local, p.device_mesh, placements, shape=(rows,), stride=(1,))
    per_dim0 = rows // int(p.shape[0])
    shape = (int(p.shape[0]),) + ((per_dim0,) if per_dim0 > 1 else ())
    local_shape = (int(p.to_local().shape[0]),) + shape[1:]
    stride = (per_dim0, 1) if per_dim0 > 1 else (1,)
    return DTensor.from_local(torch.zeros(local_shape, dtype=dtype, device=local_device), p.device_mesh,
                              list(_placements(p)), shape=shape, stride=stride)


def element_offset(p: torch.Tensor) -> int:
    """The global row-major index of the first element of this rank's shard: 0 for a plain or
    replicated tensor and for shardings whose local elements are not one contiguous range of
    the global tensor (then stochastic rounding draws per local element: still unbiased, but
    not the unsharded run's bits); for ``Shard(0)`` (FSDP2) the offset of its first row."""
    if not is_dtensor(p) or p.numel() == 0:
        return 0
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    for mesh_dim, pl in enumerate(_placements(p)):
        if isinstance(pl, Replicate) or mesh.size(mesh_dim) == 1:
            continue
        if type(pl) is not Shard or pl.dim != 0:
            return 0
    return _dim0_offset(p) * (p.numel() // int(p.shape[0]))


def _dim0_offset(p) -> int:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) if len(offset) else 0
    except ImportError:  # pragma: no cover - torch moved the helper; 1-D mesh torch.chunk rule
        import torch.distributed as dist
        n = int(p.shape[0])
        world = dist.get_world_size(p.device_mesh.get_group(0))
        rank = dist.get_rank(p.device_mesh.get_group(0))
        chunk = -(-n // world)
        return min(n, rank * chunk)


def check_grad(p: torch.Tensor, name: str) -> None:
    """A DTensor parameter's gradient must be a DTensor with the same placements."""
    if not is_dtensor(p):
        return
    g = p.grad
    if not is_dtensor(g) or tuple(g.placements) != tuple(p.placements):
        got = tuple(g.placements) if is_dtensor(g) else type(g).__name__
        raise ValueError(f"{name}: gradient placements {got} differ from the parameter's "
                         f"{tuple(p.placements)}")


# ---- the seam --------------------------------------------------------------------

def all_reduce_group_sums(sums: torch.Tensor, reduce_groups: Sequence) -> torch.Tensor:
    """Sum per-group partial sums ``Σ_{local i∈G} ‖g̃_i‖²`` over the ranks holding the group's rows.

    ``sums`` is one float per group of the tensor (a group with a non-finite row carries NaN,
    so the whole group is held on every rank). In place; returns ``sums``.
    """
    if reduce_groups:
        import torch.distributed as dist

        for pg in reduce_groups:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=pg)
    return sums
