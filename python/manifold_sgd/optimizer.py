"""The optimizer: options, param groups, state, buckets; the backends do the math.

One ``step()``: validate every group (nothing moves if anything is wrong), create
momentum buffers, build or reuse each group's plan (row views, groups, buckets
by device and dtype), then run each bucket on the native kernel or the reference
path. See docs/ARCHITECTURE.md for the trace.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from . import _native, distributed, geoopt_compat, grouping, layout, reference
from .radius import FeatureStats, row_radius
from .reference import ADAPTIVE, RETRACTIONS, StepOptions, math_dtype

MANIFOLDS = ("auto", "sphere", "psi", "euclidean", "stiefel")
RADII = ("unit", "geometric", "geometric_std")
BACKENDS = ("auto", "native", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _eager_only(fn):
    """Run ``step`` eagerly under torch.compile (a graph break): the plan cache and the native
    call on raw addresses cannot be traced. torch's Optimizer uses the same lazy disable for
    zero_grad/add_param_group, so torch._dynamo is already imported by then."""
    disable = getattr(torch, "_disable_dynamo", None)
    return disable(fn) if disable is not None else fn


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
    deferred: bool = False  # skip reports stay on the device until read (_defers_reports)


@dataclass
class _Plan:
    key: Tuple
    buckets: List[_Bucket]


class ManifoldSGD(Optimizer):
    """SGD with weight rows constrained to manifolds (sphere / oblique, PSI quotient).

    A drop-in replacement for ``torch.optim.SGD``. Every option except ``backend``
    can be set per param group. See README.md for the options table and SPEC.md
    for the mathematics.
    """

    #: the manifold that ``manifold="auto"`` gives tensors with ndim >= 2
    auto_manifold = "sphere"

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, manifold: str = "auto", granularity: str = "filter",
                 grouping: str = "row", group_size: Optional[int] = None, grouping_seed: int = 0,
                 adaptive: str = "none", curvature: float = 1.0, distance: float = 1.0,
                 psi_max_norm: float = 1e4, retraction: str = "qr", radius: str = "unit",
                 stochastic_rounding: bool = False, rounding_seed: int = 0, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "native" and not _native.available():
            raise RuntimeError(f"backend='native' but the native extension is not available: "
                               f"{_native.info().get('error')}")
        self.backend = backend
        self._skipped = 0  # rows left unchanged by non-finite gradients, counted so far
        # skip reports still on a GPU (CUDA steps never read them): reports of buckets whose
        # plan was replaced, and per-parameter reports of reference steps on a GPU
        self._pending_reports: List[Tuple[List[str], torch.Tensor]] = []
        self._device_skips: Dict[int, Tuple[str, torch.Tensor]] = {}
        self._plans: Dict[int, _Plan] = {}
        # per param group: (what the last step's checks saw, whether it holds DTensors)
        self._checked: Dict[int, Tuple[Tuple, bool]] = {}
        self._incoming_state = None
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        manifold=manifold, granularity=granularity, grouping=grouping,
                        group_size=group_size, grouping_seed=grouping_seed, adaptive=adaptive,
                        curvature=curvature, distance=distance, psi_max_norm=psi_max_norm,
                        retraction=retraction, radius=radius, stochastic_rounding=stochastic_rounding,
                        rounding_seed=rounding_seed)
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(_ManifoldState.pre_load)
        self.register_load_state_dict_post_hook(_ManifoldState.post_load)

    def __getstate__(self) -> Dict[str, Any]:
        # torch keeps defaults, state and param_groups; plans hold raw addresses and are rebuilt
        state = super().__getstate__()
        state.update(backend=self.backend, skipped_rows=self.skipped_rows)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # unpickling / deepcopy (a bare object), and also load_state_dict (state and groups only)
        super().__setstate__(state)
        count = self.__dict__.pop("skipped_rows", None)  # a pickle's count (the name is a property)
        for k, v in (("backend", "auto"), ("_skipped", 0), ("_plans", {}), ("_checked", {}),
                     ("_incoming_state", None),
                     ("_pending_reports", []), ("_device_skips", {})):
            self.__dict__.setdefault(k, v)
        if count is not None:
            self._skipped = int(count)
        for g in self.param_groups:  # groups saved before these options existed
            g.setdefault("stochastic_rounding", False)
            g.setdefault("rounding_seed", 0)
        if _ManifoldState.pre_load not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(_ManifoldState.pre_load)
            self.register_load_state_dict_post_hook(_ManifoldState.post_load)

    # ---- rows left unchanged (non-finite gradients) ------------------------------------

    @property
    def skipped_rows(self) -> int:
        """Rows left unchanged by a non-finite gradient or step, over all steps so far.

        A CPU step counts and warns at once. A step on a GPU leaves its skip report on the
        device (reading it would synchronise the host every step): reading this attribute,
        ``state_dict()`` and pickling collect those reports, warn once per parameter with
        skipped rows since the last collection, and add them here (one synchronisation)."""
        self._collect_reports()
        return self._skipped

    @skipped_rows.setter
    def skipped_rows(self, value: int) -> None:
        self._collect_reports()
        self._skipped = int(value)

    def state_dict(self) -> Dict[str, Any]:
        self._collect_reports()  # at the latest when checkpointing, GPU skips are counted and warned
        return super().state_dict()

    def _collect_reports(self, stacklevel: int = 3) -> None:
        sources = self._pending_reports
        self._pending_reports = []
        for plan in self._plans.values():
            for b in plan.buckets:
                if b.native is not None and b.deferred:
                    sources.append((b.native.names, b.native.take_report()))
        for name, rep in self._device_skips.values():
            sources.append(([name], rep.view(1, 2).to("cpu", copy=True)))
            rep[0], rep[1] = 0, -1
        for names, rep in sources:
            rep = rep.to("cpu")
            for i in rep[:, _native.SKIPPED_ROWS].nonzero().flatten().tolist():
                n, first = int(rep[i, _native.SKIPPED_ROWS]), int(rep[i, _native.FIRST_SKIPPED_ROW])
                self._skipped += n
                warnings.warn(f"manifold_sgd: {names[i]}: non-finite gradient or step; {n} row(s) left "
                              f"unchanged in the GPU steps since the last report (first: row {first})",
                              RuntimeWarning, stacklevel=stacklevel)

    def _retire_plan(self, plan: _Plan) -> None:
        """Keeps the GPU skip reports of a plan that is dropped, to be read with the others."""
        for b in plan.buckets:
            if b.native is not None and b.deferred:
                self._pending_reports.append((b.native.names, b.native.report))
        if len(self._pending_reports) > 64:  # plans that change every step: read them now
            self._collect_reports(stacklevel=5)

    def _clear_plans(self) -> None:
        for plan in self._plans.values():
            self._retire_plan(plan)
        self._plans.clear()

    def _defer_skips(self, e: _Entry, mask: torch.Tensor) -> None:
        """Adds a reference step's skipped rows on a GPU to the parameter's device report
        (count, smallest row), as the CUDA kernel does, without synchronising."""
        held = self._device_skips.get(id(e.param))
        if held is None or held[1].device != mask.device:
            rep = torch.zeros(2, dtype=torch.int64, device=mask.device)
            rep[1] = -1
            held = self._device_skips[id(e.param)] = (e.name, rep)
        rep = held[1]
        n = mask.sum()
        first = mask.to(torch.int32).argmax() + (e.shard.row_offset if e.shard is not None else 0)
        had = rep[0] > 0
        new_first = torch.where(n > 0, torch.where(had, torch.minimum(rep[1], first), first), rep[1])
        rep.copy_(torch.stack([rep[0] + n, new_first]))

    # ---- construction ------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        gi = len(self.param_groups)
        # validate a copy first: nothing is added and no weight moves if anything is wrong
        group = dict(self.defaults)
        group.update({k: v for k, v in param_group.items()})
        items = param_group["params"]
        items = [items] if isinstance(items, torch.Tensor) else list(items)  # a generator is read once
        param_group = {**param_group, "params": items}
        params = items
        if items and all(isinstance(p, tuple) for p in items):  # named parameters
            group["param_names"] = [n for n, _ in items]
            params = [p for _, p in items]
        names = _param_names(group, params, gi)
        _check_options(group, f"param_groups[{gi}]")
        for p, name in zip(params, names):
            _check_param(p, name, self.backend)
            _check_rounding(group, p, name, f"param_groups[{gi}]")
            kind = self._kind(group, p, name)
            if kind != "euclidean":
                gran = self._granularity(group, p, name)
                grouping.check_layout(p.shape, gran, group["grouping"], name, kind)
                distributed.row_layout(p, kind, grouping.component_shape(p.shape, gran, kind)[0], name)
        existing = [(q, n) for i, g in enumerate(self.param_groups)
                    for q, n in zip(g["params"], _param_names(g, g["params"], i))]
        layout.check_no_shared_memory(list(zip(params, names)), existing, distributed.local)
        # the placement on each sphere: checked for every row before any is written
        placed = []
        with torch.no_grad():
            for p, name in zip(params, names):
                kind = self._kind(group, p, name)
                if kind == "stiefel" and p.numel() > 0:  # whole blocks; not sharded (row_layout checked)
                    placed.append((p.detach(), _placed_on_manifold(kind, p, self._granularity(group, p, name),
                                                                   name, None)))
                    continue
                if kind != "sphere" or p.numel() == 0:
                    continue
                rows, row_len = grouping.row_shape(p.shape, self._granularity(group, p, name))
                shard = distributed.row_layout(p, kind, rows, name)
                loc = distributed.local(p.detach())  # a DTensor: this rank's rows
                w = loc.reshape(rows if shard is None else shard.local_rows, row_len).to(math_dtype(p.dtype))
                norms = w.norm(dim=1)
                bad = (~torch.isfinite(norms)) | (norms == 0)
                if bool(bad.any()):
                    r = int(bad.nonzero()[0])
                    raise ValueError(f"{name}: row {r + (shard.row_offset if shard else 0)} has norm "
                                     f"{float(norms[r])} and cannot be placed on a sphere "
                                     f"(manifold='sphere' needs nonzero finite rows)")
                placed.append((loc, reference.project_to_manifold("sphere", w, None)))
        super().add_param_group(param_group)
        with torch.no_grad():
            for loc, w in placed:
                loc.copy_(w.view(loc.shape).to(loc.dtype))
        self._clear_plans()

    def _kind(self, group: Dict[str, Any], p: torch.Tensor, name: str = "parameter") -> str:
        forced = geoopt_compat.manifold_of(p, group["manifold"], name)  # a geoopt.ManifoldParameter
        if forced is not None:
            return forced[0]
        m = group["manifold"]
        if m == "auto":
            return self.auto_manifold if p.dim() >= 2 else "euclidean"
        return m

    # ---- rescaled manifolds (SPEC §4) ----------------------------------------------

    @torch.no_grad()
    def rescale(self, stats: FeatureStats) -> None:
        """Move the rows of every group with ``radius != "unit"`` onto rho = gamma / lambda.

        Call it once after a first forward pass (gamma needs the output size) and then at
        each epoch boundary; lambda comes from the training passes since the last call
        (1 when there were none). Sphere rows are re-retracted onto the new radius, Stiefel
        blocks rescaled, momentum transported; ``stats`` is reset for the next epoch.
        """
        updates = []  # computed for every parameter first: nothing moves if one fails
        for gi, group in enumerate(self.param_groups):
            if group["radius"] == "unit":
                continue
            names = _param_names(group, group["params"], gi)
            for p, name in zip(group["params"], names):
                kind = self._kind(group, p)
                if kind not in ("sphere", "stiefel"):
                    continue
                rec = stats.layer(p)
                if rec is None:
                    raise ValueError(f"{name}: radius={group['radius']!r} needs the weight of a "
                                     f"Conv/Linear module watched by the FeatureStats")
                rows, length, block_rows = grouping.component_shape(p.shape, group["granularity"], kind)
                rho, _ = row_radius(rec, rows, group["granularity"], group["radius"] == "geometric_std")
                updates.append((p, kind, rows, length, block_rows, rho))
        for p, kind, rows, length, block_rows, rho in updates:
            st = self.state[p]
            dt = math_dtype(p.dtype)
            w = p.detach().reshape(rows, length).to(dt)
            r = rho.to(device=p.device, dtype=dt).view(-1, 1)
            if kind == "sphere":
                w_new = r * w / w.norm(dim=1, keepdim=True)
            else:
                old = st.get("radius")
                old = torch.ones_like(r) if old is None else old.to(device=p.device, dtype=dt).view(-1, 1)
                w_new = w * (r / old)
            p.copy_(w_new.reshape(p.shape).to(p.dtype))
            m = st.get("momentum_buffer")
            if m is not None:  # transport: projection onto the tangent space at the new point
                mv = m.view(rows, length)
                if kind == "sphere":
                    mv.copy_(reference.transport("sphere", w_new, mv.to(dt)).to(m.dtype))
                else:
                    blocks = (rows, block_rows, length // block_rows)
                    mv.copy_(reference.stiefel_project(w_new.view(blocks), mv.to(dt).view(blocks),
                                                       r.view(-1, 1, 1)).reshape(rows, length).to(m.dtype))
            st["radius"] = rho
        stats.reset()
        self._clear_plans()

    def _granularity(self, group: Dict[str, Any], p: torch.Tensor, name: str = "parameter") -> str:
        forced = geoopt_compat.manifold_of(p, group["manifold"], name)
        return forced[1] if forced is not None else group["granularity"]

    # ---- the step ----------------------------------------------------------------

    @_eager_only
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: check everything; nothing has moved yet.
        work, checked = [], {}
        for gi, group in enumerate(self.param_groups):
            _check_options(group, f"param_groups[{gi}]")
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            name_of = _Names(group, gi)
            # The layout checks depend on the parameters' shapes and dtypes and the group's
            # options only: a step with what the last step checked skips them.
            layout_key = (tuple((id(p), p.shape, p.dtype) for p in params), group["manifold"],
                          group["granularity"], group["grouping"], group["stochastic_rounding"])
            seen, has_dtensors = self._checked.get(gi, (None, False))
            if seen == layout_key:
                for p in params:
                    if not _grad_matches(p):
                        _check_grad(p, name_of[id(p)])
                    if has_dtensors:
                        distributed.check_grad(p, name_of[id(p)])
                work.append((gi, group, params, name_of))
                continue
            has_dtensors = False
            for p in params:
                name = name_of[id(p)]
                _check_grad(p, name)
                _check_rounding(group, p, name, f"param_groups[{gi}]")
                distributed.check_grad(p, name)
                has_dtensors = has_dtensors or distributed.is_dtensor(p)
                kind = self._kind(group, p, name)
                if kind != "euclidean":  # options may have changed since construction
                    gran = self._granularity(group, p, name)
                    grouping.check_layout(p.shape, gran, group["grouping"], name, kind)
                    if distributed.is_dtensor(p):
                        distributed.row_layout(p, kind, grouping.component_shape(p.shape, gran, kind)[0], name)
            checked[gi] = (layout_key, has_dtensors)
            work.append((gi, group, params, name_of))
        self._checked.update(checked)  # every group passed: remember them
        # Phase 2: state, plans, kernels.
        for gi, group, params, name_of in work:
            opt = StepOptions(lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                              weight_decay=group["weight_decay"], adaptive=group["adaptive"],
                              curvature=group["curvature"], distance=group["distance"],
                              psi_max_norm=group["psi_max_norm"], retraction=group["retraction"])
            # keyed by id(p): hashing a tensor runs Python code, and a step would do it often
            fresh: Dict[int, bool] = {}
            states = [self.state[p] for p in params]
            state_of = {id(p): st for p, st in zip(params, states)}
            for p, st in zip(params, states):
                if opt.momentum > 0:
                    buf = st.get("momentum_buffer")
                    fresh[id(p)] = buf is None
                    if buf is None:  # laid out like p (channels_last stays so; a DTensor's is one)
                        st["momentum_buffer"] = torch.zeros_like(p, dtype=math_dtype(p.dtype))
                else:
                    fresh[id(p)] = False
            plan = self._plan(gi, group, params, name_of, states)
            rounding_seed = int(group["rounding_seed"]) if group["stochastic_rounding"] else None
            for bucket in plan.buckets:
                self._run_bucket(bucket, opt, fresh, state_of, rounding_seed)
            if rounding_seed is not None:  # the next step draws new bits; saved with the state
                for p, st in zip(params, states):
                    if p.dtype == torch.bfloat16:
                        st["rounding_step"] = int(st.get("rounding_step", 0)) + 1
        return loss

    def _plan(self, gi: int, group, params, name_of, states) -> _Plan:
        key = (tuple((id(p), p.shape) for p in params),
               tuple(id(st.get("momentum_buffer")) for st in states),
               tuple(id(st.get("radius")) for st in states),
               group["manifold"], group["granularity"], group["grouping"], group["group_size"],
               group["grouping_seed"], self.backend)
        plan = self._plans.get(gi)
        if plan is not None and plan.key == key:
            return plan
        if plan is not None:
            self._retire_plan(plan)
        position = {id(q): i for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        buckets: Dict[Tuple, _Bucket] = {}
        for p in params:
            entry = self._entry(group, p, name_of[id(p)])
            entry.position = position[id(p)]
            entry.element_offset = distributed.element_offset(p)
            device_ok = _native.supports(p.device)
            # Stiefel blocks with more rows than the fused kernel holds use batched linear algebra
            # (the CUDA kernels serve row manifolds; Stiefel blocks on a GPU take that path too)
            use_native = (self.backend != "reference" and device_ok
                          and (entry.kind != "stiefel" or (p.device.type == "cpu"
                                                           and entry.block_rows <= _native.MAX_STIEFEL_ROWS)))
            if self.backend == "native" and not device_ok:
                raise RuntimeError(f"{entry.name}: backend='native' has no kernel for device "
                                   f"{p.device} in this build (native_info(): {_native.info()})")
            sharded = entry.shard is not None
            b = buckets.setdefault((p.device, p.dtype, sharded, use_native),
                                   _Bucket(p.device, p.dtype, "native" if use_native else "reference",
                                           sharded=sharded, deferred=_defers_reports(p.device)))
            b.entries.append(entry)
            b.dtensors = b.dtensors or distributed.is_dtensor(p)
        for b in buckets.values():
            if b.backend == "native":
                b.native_entries = [i for i, e in enumerate(b.entries) if e.rows * e.row_len > 0]
                live = [b.entries[i] for i in b.native_entries]  # an empty local shard has no rows
                b.native = _native.NativeBucket(
                    [e.rows for e in live], [e.row_len for e in live],
                    [e.kind for e in live], [e.row_order for e in live],
                    [e.group_sizes for e in live], [e.radius for e in live], b.dtype,
                    [e.block_rows for e in live], names=[e.name for e in live],
                    leads=[e.lead for e in live])
            else:
                for e in b.entries:
                    e.group_ids = grouping.group_of_row(e.row_order, e.group_sizes).to(b.device)
        plan = _Plan(key, list(buckets.values()))
        self._plans[gi] = plan
        return plan

    def _entry(self, group, p: torch.Tensor, name: str) -> _Entry:
        kind = self._kind(group, p, name)
        if kind == "euclidean":  # no group coupling: rows of the natural view, one group each
            rows, row_len = grouping.row_shape(distributed.local(p).shape, "filter")
            return _Entry(p, name, kind, rows, row_len, torch.arange(rows),
                          torch.ones(rows, dtype=torch.int64))
        gran, grp = self._granularity(group, p, name), group["grouping"]
        rows, row_len, block_rows = grouping.component_shape(p.shape, gran, kind)
        st = self.state[p]
        signature = f"{kind}/{gran}/{grp}/{group['group_size']}/{group['grouping_seed']}"
        if (st.get("grouping") != signature or "row_order" not in st
                or st["row_order"].numel() != rows):  # also: the parameter was given another shape
            # drawn once (seeded) and kept in the state, so it survives checkpoints
            gen = torch.Generator().manual_seed(int(group["grouping_seed"]) * 1_000_003
                                                + _position(self.param_groups, p))
            order, sizes = grouping.assign_groups(p.shape, gran, grp, group["group_size"], gen, kind)
            st["grouping"], st["row_order"], st["group_sizes"] = signature, order, sizes
        radius = st.get("radius") if kind in ("sphere", "stiefel") else None
        if radius is None and group["radius"] != "unit" and kind in ("sphere", "stiefel"):
            warnings.warn(f"manifold_sgd: {name}: radius={group['radius']!r} takes effect at the first "
                          f"opt.rescale(stats); until then the radius is 1", RuntimeWarning, stacklevel=4)
        if radius is not None and radius.numel() != rows:
            raise ValueError(f"{name}: radius has {radius.numel()} entries for {rows} rows; call "
                             f"rescale() again after changing granularity")
        entry = _Entry(p, name, kind, rows, row_len, st["row_order"], st["group_sizes"],
                       block_rows=block_rows, radius=radius, lead=layout.lead_dims(kind, gran, p.dim()))
        shard = distributed.row_layout(p, kind, rows, name)
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

    def _rounding_key(self, e: _Entry, seed: Optional[int]) -> Optional[int]:
        """The stochastic-rounding key of this parameter's step, or None (round to nearest):
        (seed, the parameter's own count of rounded steps, its position in the optimizer),
        so the bits depend neither on the buckets nor on the backend."""
        if seed is None or e.param.dtype != torch.bfloat16:
            return None
        step = int(self.state[e.param].get("rounding_step", 0))
        return reference.rounding_key(seed, step, e.position, e.element_offset)

    def _run_bucket(self, b: _Bucket, opt: StepOptions, fresh: Dict[int, bool], state_of: Dict[int, Dict],
                    rounding_seed: Optional[int] = None) -> None:
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
        keys = ([self._rounding_key(e, rounding_seed) for e in b.entries] if rounding_seed is not None
                else [None] * len(b.entries))
        skipped: List[Tuple[str, int, int]] = []  # (name, rows, first row), warned now
        masks: List[Tuple[_Entry, torch.Tensor]] = []  # reference steps' skipped rows
        if b.sharded and opt.adaptive != "none":
            masks = self._run_sharded_adaptive(b, sets, flags, opt, keys)
        elif b.backend == "native":
            live = b.native_entries
            live_keys = [keys[i] for i in live]
            report = b.native.run([sets[i].w_work for i in live], [sets[i].g_work for i in live],
                                  [sets[i].m_work for i in live], [flags[i] for i in live], opt,
                                  rounding_keys=live_keys if any(k is not None for k in live_keys) else None,
                                  reset_report=not b.deferred)
            if not b.deferred:
                skipped = [(b.entries[live[i]].name, int(report[i, _native.SKIPPED_ROWS]),
                            int(report[i, _native.FIRST_SKIPPED_ROW])) for i in b.native.skipped()]
        else:
            masks = [(e, self._reference_rows(e, ws, f, opt, e.group_ids, int(e.group_sizes.numel()), None, k))
                     for e, ws, f, k in zip(b.entries, sets, flags, keys)]
        for ws in sets:
            ws.finish()
        for e, mask in masks:
            if b.deferred:
                self._defer_skips(e, mask)
            elif bool(mask.any()):
                first = int(mask.nonzero()[0]) + (e.shard.row_offset if e.shard is not None else 0)
                skipped.append((e.name, int(mask.sum()), first))
        for name, n, first in skipped:
            self._skipped += n
            warnings.warn(f"manifold_sgd: {name}: non-finite gradient or step; {n} row(s) left "
                          f"unchanged this step (first: row {first})", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _reference_rows(e: _Entry, ws: layout.WorkSet, fresh: bool, opt: StepOptions, group_ids,
                        n_groups: int, reduce_group_sums, rounding_key: Optional[int]) -> torch.Tensor:
        """The reference step of one tensor; returns the mask of its rows left unchanged."""
        m = ws.m_work
        return reference.step_rows(
            ws.rows(ws.w_work, e.rows, e.row_len), ws.rows(ws.g_work, e.rows, e.row_len),
            None if m is None else ws.rows(m, e.rows, e.row_len), kind=e.kind, fresh=fresh,
            group_ids=group_ids, n_groups=n_groups,
            radius=None if e.radius is None else e.radius.to(ws.w_work.device), opt=opt,
            block_rows=e.block_rows, reduce_group_sums=reduce_group_sums, rounding_key=rounding_key)

    def _run_sharded_adaptive(self, b: _Bucket, sets, flags, opt: StepOptions, keys) -> list:
        """FG-SGD groups whose rows sit on several ranks: every tensor's per-group sums of its
        local rows, one all-reduce per set of ranks (distributed.all_reduce_group_sums), then
        the reference step with the global sums. Every rank runs this in the same order."""
        sums: Dict[int, torch.Tensor] = {}
        by_ranks: Dict[Tuple, List[int]] = {}
        for i, (e, ws) in enumerate(zip(b.entries, sets)):
            sums[i] = reference.group_sq_sums(e.kind, ws.rows(ws.w_work, e.rows, e.row_len),
                                              ws.rows(ws.g_work, e.rows, e.row_len),
                                              e.global_group_ids, e.global_n_groups)
            by_ranks.setdefault(e.shard.reduce_groups, []).append(i)
        for pgs, idx in by_ranks.items():
            flat = distributed.all_reduce_group_sums(torch.cat([sums[i] for i in idx]), pgs)
            for i, part in zip(idx, flat.split([sums[i].numel() for i in idx])):
                sums[i] = part
        return [(e, self._reference_rows(e, ws, flags[i], opt, e.global_group_ids, e.global_n_groups,
                                         lambda _local, total=sums[i]: total, keys[i]))
                for i, (e, ws) in enumerate(zip(b.entries, sets))]


class _ManifoldState:
    """load_state_dict hooks: torch casts every floating state tensor to the param
    dtype and integer ones to float for float params; the momentum of a 16-bit
    param is float32 here and the grouping is int64, so both are restored as saved."""

    @staticmethod
    def pre_load(opt: ManifoldSGD, state_dict):
        params = list(chain.from_iterable(g["params"] for g in opt.param_groups))
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        if len(saved_ids) != len(params):
            raise ValueError(f"loaded state_dict has {len(saved_ids)} parameters, the optimizer has "
                             f"{len(params)}")
        names = [n for gi, g in enumerate(opt.param_groups) for n in _param_names(g, g["params"], gi)]
        incoming = {}
        for idx, p, name in zip(saved_ids, params, names):
            st = state_dict["state"].get(idx)
            if not st:
                continue
            buf = st.get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(p.shape)):
                got = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
                raise ValueError(f"{name}: the loaded momentum_buffer (saved state {idx}) has shape "
                                 f"{got}, the parameter has {tuple(p.shape)}")
            _ManifoldState.check_grouping(st, p, name, idx)
            count = st.get("rounding_step", 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{name}: the loaded rounding_step (saved state {idx}) must be an int >= 0 "
                                 f"(the parameter's count of stochastically rounded steps), got {count!r}")
            incoming[id(p)] = {k: v for k, v in st.items()
                               if k in ("momentum_buffer", "row_order", "group_sizes", "radius")}
        opt._incoming_state = incoming
        return None

    @staticmethod
    def check_grouping(st, p, name: str, idx) -> None:
        """A saved row grouping must partition this parameter's rows (the shapes must match)."""
        if "row_order" not in st and "group_sizes" not in st:
            return
        sig = st.get("grouping")  # "kind/granularity/grouping/group_size/seed"
        parts = sig.split("/") if isinstance(sig, str) else []
        kind, gran = (parts[0], parts[1]) if len(parts) >= 2 else (None, None)
        if gran not in grouping.GRANULARITIES or kind not in reference.KINDS:
            raise ValueError(f"{name}: the loaded grouping (saved state {idx}) has no valid "
                             f"signature {sig!r}")
        rows, _, _ = grouping.component_shape(p.shape, gran, kind)
        order, sizes = st.get("row_order"), st.get("group_sizes")
        ok = (isinstance(order, torch.Tensor) and isinstance(sizes, torch.Tensor) and order.dim() == 1
              and sizes.dim() == 1 and order.numel() == rows)
        if ok:
            o, z = order.detach().to("cpu", torch.int64), sizes.detach().to("cpu", torch.int64)
            ok = (bool(torch.equal(torch.sort(o).values, torch.arange(rows)))
                  and (z.numel() == 0 or int(z.min()) >= 1) and int(z.sum()) == rows)
        if not ok:
            raise ValueError(f"{name}: the loaded row grouping (saved state {idx}, {sig!r}) does not "
                             f"partition the {rows} rows of a parameter of shape {tuple(p.shape)}")

    @staticmethod
    def post_load(opt: ManifoldSGD) -> None:
        incoming, opt._incoming_state = opt._incoming_state or {}, None
        for p in chain.from_iterable(g["params"] for g in opt.param_groups):
            saved = incoming.get(id(p))
            if not saved:
                continue
            st = opt.state[p]
            for k in ("row_order", "group_sizes"):
                if k in saved:
                    st[k] = saved[k].detach().to("cpu", torch.int64).clone()
            if "radius" in saved:
                st["radius"] = saved["radius"].detach().to("cpu", torch.float32).clone()
            if saved.get("momentum_buffer") is not None:
                buf = saved["momentum_buffer"].detach().to(device=p.device, dtype=math_dtype(p.dtype))
                st["momentum_buffer"] = (buf.clone().contiguous() if distributed.is_dtensor(p)
                                         else layout.like(p, buf))
        opt._clear_plans()


class UNSGD(ManifoldSGD):
    """The UN update (unit-norm rows on the oblique manifold): sphere rows, no adaptive step."""

    def __init__(self, params, lr: float = 1e-2, **kw):
        kw.setdefault("adaptive", "none")
        super().__init__(params, lr, **kw)


class FGSGD(ManifoldSGD):
    """FG-SGD (Algorithm 1): sphere rows, adaptive step from each group's gradient norm (eq. 7)."""

    def __init__(self, params, lr: float = 1e-2, **kw):
        kw.setdefault("adaptive", "sphere")
        kw.setdefault("grouping", "tensor")
        super().__init__(params, lr, **kw)


class PSISGD(ManifoldSGD):
    """PSI-SGD (momentum = 0) and PSI-SGDM (momentum > 0) on the scale-invariant quotient."""

    auto_manifold = "psi"

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, **kw):
        super().__init__(params, lr, momentum=momentum, **kw)


# ---- checks ----------------------------------------------------------------------

def _defers_reports(device: torch.device) -> bool:
    """Whether steps on this device leave their skip reports on it until they are read
    (``skipped_rows``, ``state_dict``): on a GPU, reading them would synchronise the host
    at every step, which the CUDA path never does."""
    return device.type == "cuda"


def _param_names(group, params, gi: int) -> List[str]:
    given = group.get("param_names")
    if given and len(given) == len(params):
        return [f"parameter '{n}'" for n in given]
    return [f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})" for i, p in enumerate(params)]


def _position(param_groups, p) -> int:
    for i, q in enumerate(chain.from_iterable(g["params"] for g in param_groups)):
        if q is p:
            return i
    return 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or (
        isinstance(x, torch.Tensor) and x.numel() == 1)


def _check_options(g: Dict[str, Any], where: str) -> None:
    def bad(opt, why):
        raise ValueError(f"{where}: {opt}={g[opt]!r} {why}")

    if not _is_number(g["lr"]) or not (float(g["lr"]) >= 0 and math.isfinite(float(g["lr"]))):
        bad("lr", "must be a finite number >= 0")
    if not _is_number(g["momentum"]) or not (0 <= float(g["momentum"]) < 1):
        bad("momentum", "must be in [0, 1)")
    if g["nesterov"] and float(g["momentum"]) <= 0:
        bad("nesterov", "needs momentum > 0")
    if not _is_number(g["weight_decay"]) or not (0 <= float(g["weight_decay"]) < math.inf):
        bad("weight_decay", "must be a finite number >= 0")
    if g["manifold"] not in MANIFOLDS:
        bad("manifold", f"is not one of {MANIFOLDS}")
    if g["granularity"] not in grouping.GRANULARITIES:
        bad("granularity", f"is not one of {grouping.GRANULARITIES}")
    if g["grouping"] not in grouping.GROUPINGS:
        bad("grouping", f"is not one of {grouping.GROUPINGS}")
    gs = g["group_size"]
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
        bad("group_size", "must be None or an int >= 1")
    if isinstance(g["grouping_seed"], bool) or not isinstance(g["grouping_seed"], int):
        bad("grouping_seed", "must be an int")
    if g["adaptive"] not in ADAPTIVE:
        bad("adaptive", f"is not one of {ADAPTIVE}")
    for opt in ("curvature", "distance"):
        if not _is_number(g[opt]) or not (0 <= float(g[opt]) < math.inf):
            bad(opt, "must be a finite number >= 0")
    if not _is_number(g["psi_max_norm"]) or not float(g["psi_max_norm"]) > 0:
        bad("psi_max_norm", "must be > 0")
    if g["retraction"] not in RETRACTIONS:
        bad("retraction", f"is not one of {RETRACTIONS}")
    if g["radius"] not in RADII:
        bad("radius", f"is not one of {RADII}")
    if not isinstance(g["stochastic_rounding"], bool):
        bad("stochastic_rounding", "must be True or False")
    if isinstance(g["rounding_seed"], bool) or not isinstance(g["rounding_seed"], int):
        bad("rounding_seed", "must be an int")
    if g["manifold"] in ("sphere", "psi", "stiefel") and float(g["weight_decay"]) > 0:
        bad("weight_decay", f"is not allowed with manifold={g['manifold']!r}: on a sphere it is a "
            "no-op and on the PSI quotient it breaks scale invariance; use manifold='auto' (weight "
            "decay then reaches the group's Euclidean tensors only) or a separate param group")


def _placed_on_manifold(kind: str, p: torch.Tensor, granularity: str, name: str,
                        radius: Optional[torch.Tensor]) -> torch.Tensor:
    """p's values placed on its sphere rows / Stiefel blocks (SPEC §3, construction), or a
    ValueError naming the parameter and the row or block that cannot be placed."""
    rows, length, p_rows = grouping.component_shape(p.shape, granularity, kind)
    w = p.detach().reshape(rows, length).to(math_dtype(p.dtype))
    rho = torch.ones(rows, dtype=w.dtype) if radius is None else radius.to(w.dtype)
    if kind == "sphere":
        norms = w.norm(dim=1)
        bad = (~torch.isfinite(norms)) | (norms == 0)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(f"{name}: row {r} has norm {float(norms[r])} and cannot be "
                             f"placed on a sphere (manifold='sphere' needs nonzero finite rows)")
        out = rho.view(-1, 1) * w / norms.view(-1, 1)
    else:
        blocks = w.view(rows, p_rows, length // p_rows)
        finite = torch.isfinite(blocks).flatten(1).all(dim=1)
        # singular to rounding (checked in float64): ill-conditioned random blocks are fine,
        # their QR factor is still orthonormal
        sv = torch.linalg.svdvals(torch.where(finite.view(-1, 1, 1), blocks, torch.zeros_like(blocks)).double())
        bad = (~finite) | (sv[:, -1] <= sv[:, 0] * 1e-12)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(f"{name}: Stiefel block {r} is rank-deficient or not finite and cannot "
                             f"be given orthonormal rows")
        out, _ = reference.orthonormalize_blocks(blocks, rho.view(-1, 1, 1))
    return out.reshape(p.shape).to(p.dtype)


def _check_param(p, name: str, backend: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(f"{name}: complex parameters are not supported (dtype {p.dtype})")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {p.dtype} is not supported; expected one of "
                         f"{[str(d) for d in SUPPORTED_DTYPES]}")


def _check_rounding(group: Dict[str, Any], p: torch.Tensor, name: str, where: str) -> None:
    """stochastic_rounding rounds bfloat16 weights; float32/float64 weights are stored in their
    math type (nothing to round), but float16 ones would silently round to nearest."""
    if group["stochastic_rounding"] and p.dtype == torch.float16:
        raise ValueError(f"{name}: {where} has stochastic_rounding=True, which is implemented for "
                         f"bfloat16 parameters; this one is float16 (use bfloat16, or put it in a "
                         f"param group with stochastic_rounding=False)")


def _same(t):
    return t


class _InPlace:
    """A layout.WorkSet of tensors the kernels step where they lie (all contiguous)."""

    __slots__ = ("w_work", "g_work", "m_work")

    def __init__(self, w, g, m):
        self.w_work, self.g_work, self.m_work = w, g, m

    def finish(self) -> None:
        pass


class _Names:
    """Parameter names for messages, made on first use (a steady step needs none)."""

    def __init__(self, group, gi: int):
        self._group, self._gi, self._map = group, gi, None

    def __getitem__(self, pid: int) -> str:
        if self._map is None:
            ps = self._group["params"]
            self._map = {id(p): n for p, n in zip(ps, _param_names(self._group, ps, self._gi))}
        return self._map[pid]


def _grad_matches(p) -> bool:
    """_check_grad's conditions, true in the common case, without building a message."""
    g = p.grad
    return (g.layout is torch.strided and g.shape == p.shape and g.dtype is p.dtype
            and g.device == p.device)


def _check_grad(p, name: str) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise ValueError(f"{name}: sparse gradients are not supported")
    if g.shape != p.shape:
        raise ValueError(f"{name}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise ValueError(f"{name}: gradient dtype {g.dtype} != parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"{name}: gradient on {g.device}, parameter on {p.device}")
