"""The ``torch.optim``-facing optimizer: options, param groups, state and the step.

One ``step()``: check every group (nothing moves if anything is wrong), create momentum
buffers, build or reuse each group's plan (planning.py: row views, groups, buckets by
device and dtype), then run each bucket on the native kernel or the reference path.
Construction and ``rescale`` place rows on their manifold (placement.py); skipped rows are
counted in one ledger (skips.py). See docs/ARCHITECTURE.md for the trace.
"""
from __future__ import annotations

import functools
import types
from itertools import chain
from typing import Any, Dict, Optional, Tuple

import torch
from torch.optim import Optimizer

from . import _native, distributed, grouping, layout, placement, planning, reference, steady
from .checks import (BACKENDS, MANIFOLDS, RADII, SUPPORTED_DTYPES, Names, check_grad, check_options,  # noqa: F401
                     check_native_serves, check_param, check_rounding, granularity_of,
                     grad_matches, group_params, groups_to_step, kind_of, param_names)
from .planning import _Bucket, _Entry, _Plan  # noqa: F401  (importable from here as before)
from .radius import FeatureStats
from .reference import StepOptions, math_dtype
from .skips import SkipLedger

# what a step reads for a parameter that has no state (torch.optim.SGD keeps none for a
# parameter with nothing to keep: a Euclidean one without momentum); never written
_NO_STATE = types.MappingProxyType({})


def _eager_only(fn):
    """Run ``step`` eagerly under torch.compile (a graph break): the plan cache and the native
    call on raw addresses cannot be traced. torch's Optimizer uses the same lazy disable for
    zero_grad/add_param_group, so torch._dynamo is already imported by then."""
    disable = getattr(torch, "_disable_dynamo", None)
    return disable(fn) if disable is not None else fn


try:  # what torch's own wrapper of ``step`` reads (torch.optim.optimizer, private)
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    _RecordFunctionFast = torch._C._profiler._RecordFunctionFast
    _is_compiling = torch.compiler.is_compiling
except (ImportError, AttributeError):  # another torch: its own wrapper stays
    _RecordFunctionFast = None


def _step_hooks(fn):
    """What torch's Optimizer wraps every subclass's ``step`` in (``profile_hook_step``): the
    profiler label ``Optimizer.step#<class>.step``, the step pre-hooks (global, then this
    optimizer's; one may return new ``(args, kwargs)``), the step, ``_optimizer_step_code``,
    the post-hooks. torch's label (``record_function``) goes through the op dispatcher in
    Python, about 17 us a step, as much as the checks of 10-20 tensors on the steady path
    (steady.py); the C++ label here costs under 1 us. Marked ``hooked``: torch does not wrap
    it again. With a torch that lacks these names, torch's wrapper is used as before."""
    if _RecordFunctionFast is None:
        return fn

    @functools.wraps(fn)
    def step(*args, **kwargs):
        self = args[0]
        label = f"Optimizer.step#{type(self).__name__}.step"
        # traced by torch.compile: torch's label, which dynamo knows (the C++ one it warns of)
        with (torch.autograd.profiler.record_function(label) if _is_compiling() else _RecordFunctionFast(label)):
            for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{fn} must return None or a tuple of (new_args, new_kwargs), "
                                           f"but got {result}.")
            out = fn(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    step.hooked = True
    return step


def _defers_reports(device: torch.device) -> bool:
    """Whether steps on this device leave their skip reports on it until they are read
    (``skipped_rows``, ``state_dict``): on a GPU, reading them would synchronise the host
    at every step, which the CUDA path never does."""
    return device.type == "cuda"


class ManifoldSGD(Optimizer):
    """SGD with weight rows constrained to manifolds (sphere / oblique, PSI quotient).

    A drop-in replacement for ``torch.optim.SGD``. Every option except ``backend``
    can be set per param group. See README.md for the options table and SPEC.md
    for the mathematics.
    """

    #: the manifold that ``manifold="auto"`` gives tensors with ndim >= 2
    auto_manifold = "sphere"
    #: the group options' check (checks.py), and the state the step keeps in the math dtype
    #: (restored so by load_state_dict; the first is transported by rescale)
    _check_options = staticmethod(check_options)
    _math_state = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, manifold: str = "auto", granularity: str = "filter",
                 grouping: str = "row", group_size: Optional[int] = None, grouping_seed: int = 0,
                 adaptive: str = "none", curvature: float = 1.0, distance: float = 1.0,
                 psi_max_norm: float = 1e4, retraction: str = "qr", radius: str = "unit",
                 stochastic_rounding: bool = False, rounding_seed: int = 0, backend: str = "auto"):
        self._setup(backend)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        manifold=manifold, granularity=granularity, grouping=grouping,
                        group_size=group_size, grouping_seed=grouping_seed, adaptive=adaptive,
                        curvature=curvature, distance=distance, psi_max_norm=psi_max_norm,
                        retraction=retraction, radius=radius, stochastic_rounding=stochastic_rounding,
                        rounding_seed=rounding_seed)
        super().__init__(params, defaults)
        self._register_hooks()

    def _setup(self, backend: str) -> None:
        """What an instance holds besides torch.optim's defaults, groups and state."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "native" and not _native.available():
            raise RuntimeError(f"backend='native' but the native extension is not available: "
                               f"{_native.info().get('error')}")
        self.backend = backend
        self._skips = SkipLedger()  # rows left unchanged by non-finite gradients
        self._plans: Dict[int, planning._Plan] = {}
        self._steady: Dict[int, steady.SteadyGroup] = {}  # what the last step saw, per group
        # per param group: (what the last step's checks saw, whether it holds DTensors)
        self._checked: Dict[int, Tuple[Tuple, bool]] = {}
        self._incoming_state = None

    def _register_hooks(self) -> None:
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
        old = self.__dict__.pop("_skipped", None)  # a pickle of a version before the ledger
        for k in ("_pending_reports", "_device_skips"):
            self.__dict__.pop(k, None)
        for k, v in (("backend", "auto"), ("_plans", {}), ("_steady", {}), ("_checked", {}), ("_incoming_state", None)):
            self.__dict__.setdefault(k, v)
        if "_skips" not in self.__dict__:
            self._skips = SkipLedger(int(old or 0))
        if count is not None:
            self._skips.count = int(count)
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
        return self._skips.count

    @skipped_rows.setter
    def skipped_rows(self, value: int) -> None:
        self._collect_reports()
        self._skips.count = int(value)

    @property
    def _skipped(self) -> int:
        """The count so far, without collecting the reports still on a device."""
        return self._skips.count

    def state_dict(self) -> Dict[str, Any]:
        self._collect_reports()  # at the latest when checkpointing, GPU skips are counted and warned
        return super().state_dict()

    def _collect_reports(self, stacklevel: int = 3) -> None:
        live = [(b.native.names, b.native.take_report()) for plan in self._plans.values()
                for b in plan.buckets if b.native is not None and b.deferred]
        self._skips.collect(live, stacklevel=stacklevel)

    def _retire_plan(self, plan: planning._Plan) -> None:
        """Keeps the GPU skip reports of a plan that is dropped, to be read with the others."""
        for b in plan.buckets:
            if b.native is not None and b.deferred:
                self._skips.hold(b.native.names, b.native.report)
        if len(self._skips) > 64:  # plans that change every step: read them now
            self._collect_reports(stacklevel=5)

    def _clear_plans(self) -> None:
        self._steady = {}
        for plan in self._plans.values():
            self._retire_plan(plan)
        self._plans.clear()

    # ---- construction ------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        gi = len(self.param_groups)
        # validate a copy first: nothing is added and no weight moves if anything is wrong
        items, params, given_names = group_params(param_group, gi, ("param_names" in self.param_groups[0]
                                                                    if self.param_groups else None))
        param_group = {**param_group, "params": items}  # a generator is read once
        group = {**self.defaults, **param_group}
        if given_names is not None:
            group["param_names"] = given_names
        names = param_names(group, params, gi)
        self._check_options(group, f"param_groups[{gi}]")
        for p, name in zip(params, names):
            check_param(p, name)
            check_rounding(group, p, name, f"param_groups[{gi}]")
            kind = self._kind(group, p, name)
            check_native_serves(self, kind, p, name)
            if kind != "euclidean":
                gran = self._granularity(group, p, name)
                grouping.check_layout(p.shape, gran, group.get("grouping", "row"), name, kind)
                distributed.row_layout(p, kind, grouping.component_shape(p.shape, gran, kind)[0], name, gran)
        existing = [(q, n) for i, g in enumerate(self.param_groups)
                    for q, n in zip(g["params"], param_names(g, g["params"], i))]
        layout.check_no_shared_memory(list(zip(params, names)), existing, distributed.local)
        placed = placement.placed_params(group, params, names, self._kind, self._granularity)  # all checked first
        super().add_param_group(param_group)
        with torch.no_grad():
            for loc, w in placed:
                loc.copy_(w)
        self._clear_plans()

    def _kind(self, group: Dict[str, Any], p: torch.Tensor, name: str = "parameter") -> str:
        return kind_of(group, p, self.auto_manifold, name)

    def _granularity(self, group: Dict[str, Any], p: torch.Tensor, name: str = "parameter") -> str:
        return granularity_of(group, p, name)

    # ---- rescaled manifolds (SPEC §4) ----------------------------------------------

    @torch.no_grad()
    def rescale(self, stats: FeatureStats) -> None:
        """Move the rows of every group with ``radius != "unit"`` onto rho = gamma / lambda.

        Call it once after a first forward pass (gamma needs the output size) and then at
        each epoch boundary; lambda comes from the training passes since the last call
        (1 when there were none). Sphere rows are re-retracted onto the new radius, Stiefel
        blocks rescaled, momentum transported; ``stats`` is reset for the next epoch.
        """
        placement.rescale_params(self, stats)
        stats.reset()
        self._clear_plans()

    # ---- the step ----------------------------------------------------------------

    @_step_hooks  # outside, as torch's: under torch.compile(fullgraph=True) the step is a clear error
    @_eager_only
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fast = steady.ready(self)  # the previous step again but for the gradients (steady.py)
        if fast is not None:
            for record, grad_ptrs, counts in fast:
                record.run(grad_ptrs, counts, self._skips)
            return loss
        work = groups_to_step(self)  # Phase 1: check everything; nothing has moved yet.
        self._check_state(work)
        for gi, group, params, name_of in work:  # Phase 2: state, plans, kernels.
            rounding_seed = int(group["rounding_seed"]) if group["stochastic_rounding"] else None
            self._step_group(gi, group, params, name_of, rounding_seed)
            if rounding_seed is not None:  # the next step draws new bits; saved with the state
                for p in params:
                    if p.dtype == torch.bfloat16:
                        st = self.state[p]
                        st["rounding_step"] = int(st.get("rounding_step", 0)) + 1
        self._steady = {}
        # a step this class's _step_group takes that the steady path can repeat (steady.repeats);
        # steady.ENABLED off: the full path alone
        algorithm = steady.algorithm_of(self)
        if steady.ENABLED and algorithm is not None:
            stepped = {gi for gi, *_ in work}
            for gi, group in enumerate(self.param_groups):
                record = steady.SteadyGroup.build(self, gi, group, gi in stepped, algorithm)
                if record is None:
                    self._steady = {}
                    break
                self._steady[gi] = record
        return loss

    def _check_state(self, work) -> None:
        """Phase 1's check of the state the step reads (``work``: groups_to_step's); raises
        naming the parameter before any weight moves. The SGD family's state needs none here:
        its buffers are checked by the kernels' boundary (_native) and load_state_dict."""

    @staticmethod
    def _group_options(group) -> StepOptions:
        """The step's options of a param group, as the kernels take them."""
        return StepOptions(lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                           weight_decay=group["weight_decay"], adaptive=group["adaptive"],
                           curvature=group["curvature"], distance=group["distance"],
                           psi_max_norm=group["psi_max_norm"], retraction=group["retraction"])

    @steady.repeats("sgd")
    def _step_group(self, gi: int, group, params, name_of, rounding_seed: Optional[int]) -> None:
        """One param group's step: its state, its plan, its buckets (the SGD family)."""
        state = self.state
        opt = self._group_options(group)
        # keyed by id(p): hashing a tensor runs Python code, and a step would do it often
        fresh: Dict[int, bool] = {}
        states = [state.get(p, _NO_STATE) for p in params]  # no entry made for nothing to keep
        if opt.momentum > 0:
            for i, (p, st) in enumerate(zip(params, states)):
                buf = st.get("momentum_buffer")
                fresh[id(p)] = buf is None
                if buf is None:  # laid out like p (channels_last stays so; a DTensor's is one)
                    st = states[i] = state[p]
                    st["momentum_buffer"] = torch.zeros_like(p, dtype=math_dtype(p.dtype))
        else:
            fresh = dict.fromkeys(map(id, params), False)
        state_of = {id(p): st for p, st in zip(params, states)}
        plan = self._plan(gi, group, params, name_of, states)
        for bucket in plan.buckets:
            planning.run_bucket(bucket, opt, fresh, state_of, state, self._skips, rounding_seed)

    def _plan(self, gi: int, group, params, name_of, states) -> planning._Plan:
        key = planning.plan_key(group, params, states, self.backend)
        plan = self._plans.get(gi)
        if plan is not None and plan.key == key:
            return plan
        if plan is not None:
            self._retire_plan(plan)
        plan = self._plans[gi] = planning.build_plan(self, key, group, params, name_of, _defers_reports)
        return plan


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
        names = [n for gi, g in enumerate(opt.param_groups) for n in param_names(g, g["params"], gi)]
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
                               if k in ("row_order", "group_sizes", "radius", *opt._math_state)}
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
            for key in opt._math_state:  # torch cast them to the parameter's dtype: back to the math dtype
                if saved.get(key) is None:
                    continue
                buf = saved[key].detach().to(device=p.device, dtype=math_dtype(p.dtype))
                st[key] = (buf.clone().contiguous() if distributed.is_dtensor(p) or buf.shape != p.shape
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
