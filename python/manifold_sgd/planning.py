"""How a param group is stepped: its plan, and running the plan's buckets.

A plan holds one ``_Entry`` per parameter (its row view, manifold and groups) and the
``_Bucket``s that step them together: by device, dtype, whether the rows are a DTensor's
shard, and backend (native kernel or reference path). A plan is built once and reused while
the group's parameters, state buffers and layout options stay the same (``plan_key``); a
steady step then only runs its buckets. The optimizer (optimizer.py) owns the cache.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _native, distributed, grouping, layout, reference
from .reference import StepOptions


@dataclass
class _Entry:
    """How one parameter is stepped: its row view, manifold and groups."""
    param: torch.Tensor
    name: str
    kind: str
    rows: int  # components: rows, or Stiefel blocks
    row_len: int
    row_order: torch.Tensor
    group_sizes: torch.Tensor
    block_rows: int = 1  # p of a Stiefel block
    radius: Optional[torch.Tensor] = None  # float32 per component, None for 1
    group_ids: Optional[torch.Tensor] = None  # per row, for the reference path
    lead: int = 0  # leading dims that index rows (layout.py: which layouts are stepped in place)
    column: bool = False  # granularity "column": the rows are the columns of a row-major matrix
    # a DTensor's local rows (distributed.py); the groups then span ranks: global ids of the local rows
    shard: Optional[distributed.Shard0Rows] = None
    global_group_ids: Optional[torch.Tensor] = None
    global_n_groups: int = 0
    # stochastic rounding: the tensor id of the rounding key (the parameter's position in the
    # optimizer), and the global index of the first local element (a DTensor's shard)
    position: int = 0
    element_offset: int = 0


@dataclass
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    backend: str  # "native" | "reference"
    entries: List[_Entry] = field(default_factory=list)
    native: Optional[_native.NativeBucket] = None
    native_entries: List[int] = field(default_factory=list)  # entries in the native table (rows > 0)
    sharded: bool = False  # DTensor rows; adaptive groups reduce over ranks (distributed.py)
    dtensors: bool = False  # some entry is a DTensor (its local shard is what the kernels see)
    deferred: bool = False  # skip reports stay on the device until read (optimizer._defers_reports)


@dataclass
class _Plan:
    key: Tuple
    buckets: List[_Bucket]


def plan_key(group, params, states, backend: str) -> Tuple:
    """What a plan depends on: a step with the same key reuses the plan."""
    return (tuple((id(p), p.shape) for p in params),
            tuple(id(st.get("momentum_buffer")) for st in states),
            tuple(id(st.get("radius")) for st in states),
            group["manifold"], group["granularity"], group.get("grouping", "row"), group.get("group_size"),
            group.get("grouping_seed", 0), backend)


def build_plan(opt, key: Tuple, group, params, name_of, defers: Callable[[torch.device], bool]) -> _Plan:
    """The plan of one param group's step (``opt``: the optimizer, for its state, groups and
    backend; ``defers``: whether steps on a device leave their skip reports there)."""
    position = {id(q): i for i, q in enumerate(chain.from_iterable(g["params"] for g in opt.param_groups))}
    buckets: Dict[Tuple, _Bucket] = {}
    for p in params:
        entry = make_entry(opt, group, p, name_of[id(p)], position[id(p)])
        entry.element_offset = distributed.element_offset(p)
        device_ok = _native.supports(p.device)
        # Stiefel blocks with more rows than the fused kernels hold use batched linear algebra (the
        # reference path); the CPU kernel and the CUDA SGD kernel step blocks of p <= 32 rows
        # the Adam family's native step: the CPU and CUDA kernels' rows, the CPU kernel's Stiefel blocks
        adam = getattr(opt, "algorithm", "sgd") == "adam"
        use_native = (opt.backend != "reference" and device_ok
                      and (entry.kind != "stiefel" or _native.supports_stiefel(p.device, entry.block_rows, adam))
                      and (not entry.column or _native.supports_columns(p.device, entry.kind, adam)))
        if opt.backend == "native" and not device_ok:
            raise RuntimeError(f"{entry.name}: backend='native' has no kernel for device "
                               f"{p.device} in this build (native_info(): {_native.info()})")
        if (opt.backend == "native" and entry.column and entry.kind != "stiefel"
                and not _native.supports_columns(p.device, entry.kind, adam)):
            raise RuntimeError(f"{entry.name}: backend='native' has no kernel for granularity='column' "
                               f"{'ManifoldAdam' if adam else entry.kind} rows on {p.device.type} yet; use "
                               f"backend='auto' (it takes the reference path for them)")
        sharded = entry.shard is not None
        b = buckets.setdefault((p.device, p.dtype, sharded, use_native),
                               _Bucket(p.device, p.dtype, "native" if use_native else "reference",
                                       sharded=sharded, deferred=defers(p.device)))
        b.entries.append(entry)
        b.dtensors = b.dtensors or distributed.is_dtensor(p)
    for b in buckets.values():
        for e in b.entries:  # radii on the device once per plan, not copied from the host at each step
            if e.radius is not None:
                e.radius = e.radius.to(b.device)
        if b.backend == "native":
            b.native_entries = [i for i, e in enumerate(b.entries) if e.rows * e.row_len > 0]
            live = [b.entries[i] for i in b.native_entries]  # an empty local shard has no rows
            b.native = _native.NativeBucket(
                [e.rows for e in live], [e.row_len for e in live],
                [e.kind for e in live], [e.row_order for e in live],
                [e.group_sizes for e in live], [e.radius for e in live], b.dtype,
                [e.block_rows for e in live], names=[e.name for e in live], leads=[e.lead for e in live],
                columns=[e.column for e in live])
        else:
            for e in b.entries:
                e.group_ids = grouping.group_of_row(e.row_order, e.group_sizes).to(b.device)
    return _Plan(key, list(buckets.values()))


def make_entry(opt, group, p: torch.Tensor, name: str, position: int) -> _Entry:
    """One parameter's entry; draws its row grouping into its state on first use."""
    kind = opt._kind(group, p, name)
    if kind == "euclidean":  # no group coupling: rows of the natural view, one group each
        rows, row_len = grouping.row_shape(distributed.local(p).shape, "filter")
        return _Entry(p, name, kind, rows, row_len, torch.arange(rows),
                      torch.ones(rows, dtype=torch.int64), position=position)
    gran, grp = opt._granularity(group, p, name), group.get("grouping", "row")
    group_size, seed = group.get("group_size"), group.get("grouping_seed", 0)
    rows, row_len, block_rows = grouping.component_shape(p.shape, gran, kind)
    st = opt.state[p]
    signature = f"{kind}/{gran}/{grp}/{group_size}/{seed}"
    if (st.get("grouping") != signature or "row_order" not in st
            or st["row_order"].numel() != rows):  # also: the parameter was given another shape
        # drawn once (seeded) and kept in the state, so it survives checkpoints
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + position)
        order, sizes = grouping.assign_groups(p.shape, gran, grp, group_size, gen, kind)
        st["grouping"], st["row_order"], st["group_sizes"] = signature, order, sizes
    radius = st.get("radius") if kind in ("sphere", "stiefel") else None
    if radius is None and group["radius"] != "unit" and kind in ("sphere", "stiefel"):
        warnings.warn(f"manifold_sgd: {name}: radius={group['radius']!r} takes effect at the first "
                      f"opt.rescale(stats); until then the radius is 1", RuntimeWarning, stacklevel=5)
    if radius is not None and radius.numel() != rows:
        raise ValueError(f"{name}: radius has {radius.numel()} entries for {rows} rows; call "
                         f"rescale() again after changing granularity")
    entry = _Entry(p, name, kind, rows, row_len, st["row_order"], st["group_sizes"], block_rows=block_rows,
                   radius=radius, lead=layout.lead_dims(kind, gran, p.dim()), position=position,
                   column=gran == "column")
    shard = distributed.row_layout(p, kind, rows, name, gran)
    if shard is not None:  # this rank steps its own rows; kernels see them as one-row groups
        entry.shard, entry.rows = shard, shard.local_rows
        entry.row_order = torch.arange(shard.local_rows)
        entry.group_sizes = torch.ones(shard.local_rows, dtype=torch.int64)
        if radius is not None:
            entry.radius = radius[shard.row_offset:shard.row_offset + shard.local_rows]
        ids = grouping.group_of_row(st["row_order"], st["group_sizes"])
        entry.global_group_ids = ids[shard.row_offset:shard.row_offset + shard.local_rows].to(p.device)
        entry.global_n_groups = int(st["group_sizes"].numel())
    return entry


# ---- running a bucket ------------------------------------------------------------------

def _same(t):
    return t


class _InPlace:
    """A layout.WorkSet of tensors the kernels step where they lie (all contiguous)."""

    __slots__ = ("w_work", "g_work", "m_work")

    def __init__(self, w, g, m):
        self.w_work, self.g_work, self.m_work = w, g, m

    def finish(self) -> None:
        pass


def rounding_key(state, e: _Entry, seed: Optional[int]) -> Optional[int]:
    """The stochastic-rounding key of this parameter's step, or None (round to nearest):
    (seed, the parameter's own count of rounded steps, its position in the optimizer),
    so the bits depend neither on the buckets nor on the backend."""
    if seed is None or e.param.dtype != torch.bfloat16:
        return None
    step = int(state[e.param].get("rounding_step", 0))
    return reference.rounding_key(seed, step, e.position, e.element_offset)


def run_bucket(b: _Bucket, opt: StepOptions, fresh: Dict[int, bool], state_of: Dict[int, Dict],
               state, ledger, rounding_seed: Optional[int] = None) -> None:
    """One step of a bucket's tensors; skipped rows go to the ledger (skips.SkipLedger)."""
    # w, g, m of each tensor in one dense layout: its own when its rows are blocks of its
    # storage (contiguous, channels_last filter rows), else contiguous copies written back
    local = distributed.local if b.dtensors else _same
    use_m = opt.momentum > 0
    ps = [local(e.param) for e in b.entries]
    gs = [local(e.param.grad) for e in b.entries]
    ms = ([local(state_of[id(e.param)].get("momentum_buffer")) for e in b.entries] if use_m
          else [None] * len(ps))
    if b.backend == "native" and not b.sharded and all(
            x is None or x.is_contiguous() for x in chain(ps, gs, ms)):
        sets = [_InPlace(p, g, m) for p, g, m in zip(ps, gs, ms)]  # the common case: no copies
    else:
        sets = [layout.WorkSet(p, g, m, e.lead) for p, g, m, e in zip(ps, gs, ms, b.entries)]
    flags = [fresh[id(e.param)] for e in b.entries]
    keys = ([rounding_key(state, e, rounding_seed) for e in b.entries] if rounding_seed is not None
            else [None] * len(b.entries))
    skipped: List[Tuple[str, int, int]] = []  # (name, rows, first row), warned now
    masks: List[Tuple[_Entry, torch.Tensor]] = []  # reference steps' skipped rows
    if b.sharded and opt.adaptive != "none":
        masks = _run_sharded_adaptive(b, sets, flags, opt, keys)
    elif b.backend == "native":
        live = b.native_entries
        live_keys = [keys[i] for i in live]
        report = b.native.run([sets[i].w_work for i in live], [sets[i].g_work for i in live],
                              [sets[i].m_work for i in live], [flags[i] for i in live], opt,
                              rounding_keys=live_keys if any(k is not None for k in live_keys) else None,
                              reset_report=not b.deferred)
        skipped = _native_skips(b, report)
    else:
        masks = [(e, _reference_rows(e, ws, f, opt, e.group_ids, int(e.group_sizes.numel()), None, k))
                 for e, ws, f, k in zip(b.entries, sets, flags, keys)]
    _finish(b, sets, masks, skipped, ledger)


def _native_skips(b: _Bucket, report: torch.Tensor) -> List[Tuple[str, int, int]]:
    """(name, rows, first row) of each tensor with skipped rows in a native step's host report
    (none read when the reports stay on the device: ``b.deferred``)."""
    if b.deferred:
        return []
    live = b.native_entries
    return [(b.entries[live[i]].name, int(report[i, _native.SKIPPED_ROWS]),
             int(report[i, _native.FIRST_SKIPPED_ROW])) for i in b.native.skipped()]


def _finish(b: _Bucket, sets, masks: List[Tuple[_Entry, torch.Tensor]], skipped: List[Tuple[str, int, int]],
            ledger) -> None:
    """What a bucket's step (SGD or Adam) ends with: each work set's contiguous copies written
    back (``finish``), the reference steps' masks of skipped rows counted by global row (a
    DTensor's shard adds its first row; held on the device when the reports are deferred), and
    one warning for every tensor with skipped rows (``skipped`` holds the native ones)."""
    for ws in sets:
        ws.finish()
    for e, mask in masks:
        offset = e.shard.row_offset if e.shard is not None else 0
        if b.deferred:
            ledger.defer(id(e.param), e.name, mask, offset)
        elif bool(mask.any()):
            skipped.append((e.name, int(mask.sum()), int(mask.nonzero()[0]) + offset))
    if skipped:
        ledger.add(skipped, stacklevel=5)  # the user's call of step()


def _reference_rows(e: _Entry, ws: layout.WorkSet, fresh: bool, opt: StepOptions, group_ids,
                    n_groups: int, reduce_group_sums, rounding_key: Optional[int]) -> torch.Tensor:
    """The reference step of one tensor; returns the mask of its rows left unchanged."""
    m = ws.m_work
    views = _row_views(e, ws.w_work, ws.g_work, m)
    mask = reference.step_rows(
        views[0], views[1], views[2], kind=e.kind, fresh=fresh,
        group_ids=group_ids, n_groups=n_groups,
        radius=e.radius, opt=opt,
        block_rows=e.block_rows, reduce_group_sums=reduce_group_sums, rounding_key=rounding_key)
    _write_back(e, ws.w_work, m, views)
    return mask


def _row_views(e: _Entry, w, g, m, v=None):
    """(w, g, m[, v]) of a tensor stored row-major as (rows, row_len) views (``column``: the rows
    of the transposed matrix, strided views). A Stiefel block on ``column`` rows is ``W^T``
    whole, which the batched linear algebra needs as one (1, d1 * d0) row: a copy, written
    back by _write_back."""
    if e.column and e.kind == "stiefel":
        d0, d1 = e.row_len // e.block_rows, e.block_rows
        return tuple(None if t is None else t.view(d0, d1).t().reshape(1, -1) for t in (w, g, m, v))
    return tuple(None if t is None else layout.row_view(t, e.rows, e.row_len, e.column)
                 for t in (w, g, m, v))


def _write_back(e: _Entry, w, m, views, v=None) -> None:
    if e.column and e.kind == "stiefel":
        d0, d1 = e.row_len // e.block_rows, e.block_rows
        for dst, src in ((w, views[0]), (m, views[2]), (v, views[3])):
            if dst is not None:
                dst.view(d0, d1).copy_(src.view(d1, d0).t())


def _run_sharded_adaptive(b: _Bucket, sets, flags, opt: StepOptions, keys) -> list:
    """FG-SGD groups whose rows sit on several ranks: every tensor's per-group sums of its
    local rows, one all-reduce per set of ranks (distributed.all_reduce_group_sums), then
    the reference step with the global sums. Every rank runs this in the same order."""
    sums: Dict[int, torch.Tensor] = {}
    by_ranks: Dict[Tuple, List[int]] = {}
    for i, (e, ws) in enumerate(zip(b.entries, sets)):
        sums[i] = reference.group_sq_sums(e.kind, ws.rows(ws.w_work, e.rows, e.row_len, e.column),
                                          ws.rows(ws.g_work, e.rows, e.row_len, e.column),
                                          e.global_group_ids, e.global_n_groups)
        by_ranks.setdefault(e.shard.reduce_groups, []).append(i)
    for pgs, idx in by_ranks.items():
        flat = distributed.all_reduce_group_sums(torch.cat([sums[i] for i in idx]), pgs)
        for i, part in zip(idx, flat.split([sums[i].numel() for i in idx])):
            sums[i] = part
    return [(e, _reference_rows(e, ws, flags[i], opt, e.global_group_ids, e.global_n_groups,
                                lambda _local, total=sums[i]: total, keys[i]))
            for i, (e, ws) in enumerate(zip(b.entries, sets))]


class _AdamWorkSet:
    """The (w, g, m, v) of one tensor as the Adam kernels need them: contiguous (copies of those
    that are not, written back by ``finish``)."""

    __slots__ = ("held", "work")

    def __init__(self, held: Tuple[torch.Tensor, ...]):
        self.held = held
        self.work = tuple(t.contiguous() for t in held)

    def finish(self) -> None:
        for i in (0, 2, 3):  # w, m, v: the gradient is only read
            if self.work[i] is not self.held[i]:
                self.held[i].copy_(self.work[i])


def run_adam_bucket(b: _Bucket, opt: reference.AdamOptions, fresh: Dict[int, bool], state_of: Dict[int, Dict],
                    state, ledger, rounding_seed: Optional[int] = None) -> None:
    """One ManifoldAdam step of a bucket's tensors (SPEC §6); skipped rows go to the ledger.
    Each tensor's w, g, m, v are stepped contiguous (a tensor that is not is stepped on a
    contiguous copy, written back): m and v are laid out like the parameter. A DTensor's local
    shard is what is stepped (its rows are whole: Adam needs no collective)."""
    local = distributed.local if b.dtensors else _same
    sts = [state_of[id(e.param)] for e in b.entries]
    sets = [_AdamWorkSet(tuple(local(t) for t in (e.param, e.param.grad, st["exp_avg"], st["exp_avg_sq"])))
            for e, st in zip(b.entries, sts)]
    work = [ws.work for ws in sets]
    keys = ([rounding_key(state, e, rounding_seed) for e in b.entries] if rounding_seed is not None
            else [None] * len(b.entries))
    skipped: List[Tuple[str, int, int]] = []
    masks: List[Tuple[_Entry, torch.Tensor]] = []  # reference steps' skipped rows
    if b.backend == "native":
        live = b.native_entries
        live_keys = [keys[i] for i in live]
        # on a GPU the skip report stays on the device until read (as run_bucket's)
        report = b.native.run([work[i][0] for i in live], [work[i][1] for i in live], [work[i][2] for i in live],
                              [fresh[id(b.entries[i].param)] for i in live], opt,
                              rounding_keys=live_keys if any(k is not None for k in live_keys) else None,
                              second_moments=[work[i][3] for i in live],
                              step_counts=[int(sts[i]["step"]) for i in live], reset_report=not b.deferred)
        skipped = _native_skips(b, report)
    else:
        for e, st, (w, g, m, v), k in zip(b.entries, sts, work, keys):
            if not e.rows * e.row_len:
                continue
            row_v = e.kind != "euclidean" and opt.second_moment == "row"  # one v per row
            views = _row_views(e, w, g, m, None if row_v else v)
            masks.append((e, reference.adam_rows(views[0], views[1], views[2], v.view(-1) if row_v else views[3],
                                                 kind=e.kind, step=int(st["step"]), radius=e.radius, opt=opt,
                                                 block_rows=e.block_rows, rounding_key=k)))
            _write_back(e, w, m, views, None if row_v else v)
    _finish(b, sets, masks, skipped, ledger)
