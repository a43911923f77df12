"""``ManifoldAdam``: the Adam family on the manifolds' rows (SPEC §6).

The same rows, manifolds, placement, plans and buckets as ``ManifoldSGD`` (it is one, with
other options and state); what differs is the step: Adam's first moment ``exp_avg``
(transported), its second moment ``exp_avg_sq`` (one per row with ``second_moment="row"``,
not transported; one per element with ``"element"`` and on Euclidean rows, which are AdamW)
and the parameter's step count ``step``. PSI and FG-SGD's adaptive scale are SGD's.

Under FSDP2 (DTensor ``Shard(0)`` parameters) every rank steps its own whole rows: Adam has no
group coupling, so a step needs no collective. The state is sharded like the parameter (what
distributed checkpointing expects): ``exp_avg`` and an element ``exp_avg_sq`` are DTensors
laid out like it; a row ``exp_avg_sq`` is a DTensor of shape ``(d0,)``, or ``(d0, d1)`` with
``granularity="kernel"`` (a value per (out, in) block), sharded on dim 0 with the parameter.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Dict, Optional, Tuple

import torch

from . import distributed, grouping, planning, steady
from .checks import check_adam_options
from .optimizer import ManifoldSGD
from .reference import AdamOptions, math_dtype


class ManifoldAdam(ManifoldSGD):
    """Adam with weight rows on manifolds (sphere / oblique, Stiefel), a drop-in for
    ``torch.optim.AdamW``: Euclidean tensors (biases, gains, and with ``manifold="auto"``
    every 1-D tensor) are stepped exactly as AdamW steps them. Every option except
    ``backend`` can be set per param group. See README.md and SPEC.md §6."""

    algorithm = "adam"
    _check_options = staticmethod(check_adam_options)
    _math_state = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, manifold: str = "auto", granularity: str = "filter",
                 radius: str = "unit", second_moment: str = "row", retraction: str = "qr",
                 stochastic_rounding: bool = False, rounding_seed: int = 0, backend: str = "auto"):
        self._setup(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, manifold=manifold,
                        granularity=granularity, radius=radius, second_moment=second_moment,
                        retraction=retraction, stochastic_rounding=stochastic_rounding,
                        rounding_seed=rounding_seed)
        torch.optim.Optimizer.__init__(self, params, defaults)
        self._register_hooks()

    def _check_state(self, work) -> None:
        """Each stepped parameter's step count, before any weight moves: a number of steps (an
        int >= 0; an integral float or one-element tensor is read as one, as a checkpoint may hold
        it) wherever m and v are kept, else a ValueError naming the parameter."""
        state = self.state
        counts = [st.get("step") for st in state.values()]
        if all(map(operator.is_, map(type, counts), repeat(int))) and min(counts, default=0) >= 0:
            return  # every count an int >= 0, as the steps leave them: no parameter looked up
        for _, _, params, name_of in work:
            for p in params:
                st = state.get(p)
                if not st or "exp_avg" not in st:  # a new parameter: its count starts at 0
                    continue
                t = st.get("step")
                if type(t) is int and t >= 0:
                    continue
                try:
                    ok = not isinstance(t, bool) and int(t) == t and int(t) >= 0
                except (TypeError, ValueError, RuntimeError, OverflowError):
                    ok = False
                if not ok:
                    raise ValueError(f"{name_of[id(p)]}: state['step'] (Adam's step count, the steps taken so "
                                     f"far) must be an int >= 0, got {t!r}")

    @staticmethod
    def _group_options(group) -> AdamOptions:
        """The step's options of a param group, as the kernels take them."""
        return AdamOptions(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                           weight_decay=group["weight_decay"], second_moment=group["second_moment"],
                           retraction=group["retraction"])

    @steady.repeats("adam")
    def _step_group(self, gi: int, group, params, name_of, rounding_seed: Optional[int]) -> None:
        """One param group's Adam step: its state (m, v and t), its plan, its buckets."""
        state = self.state
        opt = self._group_options(group)
        fresh: Dict[int, bool] = {}
        for p in params:
            st = state[p]
            fresh[id(p)] = "exp_avg" not in st
            if fresh[id(p)]:
                st["exp_avg"] = torch.zeros_like(p, dtype=math_dtype(p.dtype))
                st["exp_avg_sq"] = self._second_moment_zeros(group, p, name_of[id(p)])
                st["step"] = 0
            st["step"] = int(st["step"]) + 1  # t counts the parameter's steps (SPEC §6)
        states = [state[p] for p in params]
        state_of = {id(p): st for p, st in zip(params, states)}
        plan = self._plan(gi, group, params, name_of, states)
        for bucket in plan.buckets:
            planning.run_adam_bucket(bucket, opt, fresh, state_of, state, self._skips, rounding_seed)

    def _second_moment_zeros(self, group, p: torch.Tensor, name: str) -> torch.Tensor:
        """v of a new parameter: one per element (laid out like p), or one per row/block."""
        kind = self._kind(group, p, name)
        if kind == "euclidean" or group["second_moment"] == "element":
            return torch.zeros_like(p, dtype=math_dtype(p.dtype))
        gran = self._granularity(group, p, name)
        rows = grouping.component_shape(p.shape, gran, kind)[0]
        if distributed.is_dtensor(p):
            return distributed.row_state_zeros(p, kind, rows, name, gran, math_dtype(p.dtype))
        return torch.zeros(rows, dtype=math_dtype(p.dtype), device=p.device)

