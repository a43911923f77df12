"""The steady-state step: a step that repeats the previous one but for the gradients.

Once a step of the full path (checks.groups_to_step, then each group's plan and buckets)
has run, a ``SteadyGroup`` per param group remembers what it saw: the group dict and its
options, the parameters and their addresses, the state (SGD's momentum buffers; Adam's
``exp_avg`` and ``exp_avg_sq``, and the state dicts that hold its step counts), the plan,
and the native buckets' tables (all columns written, the flags of a step whose momentum is
no longer fresh). The next ``step()`` first asks every group whether it is unchanged
(``check``): the same group, options, parameters (objects, addresses, contiguous), state
tensors (objects and addresses), and gradients that the full path would accept as they are
(strided, the parameter's shape, dtype and device, contiguous); for Adam also step counts
that are Python ints >= 0, as the full path leaves them. Those checks are C-level passes
over the group (``map`` of attribute getters), not a Python loop per tensor. When every
group is unchanged the step is one native call per bucket: the gradient column is written
only where an address moved (``NativeBucket.run_steady``); an Adam step first adds one to
each parameter's ``state["step"]`` (a Python int, as the full path keeps it: checkpoints are
the same) and writes the new counts into the bucket's step-count column. The step's
scalars (``RETUNABLE``: lr, weight_decay, betas, eps, and momentum while it stays > 0, what
lr and momentum schedulers change every step) may change: they are checked as the full path
checks them and the buckets' options records made anew. Anything else (a
gradient of another dtype, shape or device, sparse or not contiguous, a gradient set to
None, another option changed, a state tensor replaced or given new storage, a step count that is
not an int >= 0, a parameter added or given new storage, a plan or the state replaced by
``load_state_dict``, ``rescale`` or ``add_param_group``) sends the whole step, every group,
through the full path, which checks everything before any weight moves and raises the
error naming the parameter; a new ``SteadyGroup`` is made after it.

What takes the full path every step: stochastic rounding (its keys change each step),
reference buckets (no tables), DTensor parameters, parameters or state tensors stepped on
contiguous copies (a layout whose rows are not blocks of its storage; for Adam any
parameter that is not contiguous), a parameter in the group without a gradient, options
held as tensors, and subclasses that override ``_step_group`` (only the steps marked with
``repeats`` are repeated). Gradients must be laid out as their parameters (``channels_last``
ones too).
"""
from __future__ import annotations

import operator
from collections import deque
from itertools import repeat
from typing import List, Optional, Sequence, Tuple

import torch

from . import _native

#: False: every step takes the full path (bench --overhead measures both paths with it)
ENABLED = True

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_EQ = operator.eq
_PTR = torch.Tensor.data_ptr
_SIZE = torch.Tensor.size
_STRIDE = torch.Tensor.stride  # raises for a sparse tensor
_DEVICE_INDEX = torch.Tensor.get_device  # -1 on the CPU
_STEP = operator.itemgetter("step")
#: per algorithm, the state tensors a step reads and writes in place, with their table columns
_STATE_TENSORS = {"sgd": (("momentum_buffer", _native.MOMENTUM),),
                  "adam": (("exp_avg", _native.MOMENTUM), ("exp_avg_sq", _native.SECOND_MOMENT))}


#: options a step may change without leaving the steady path (``SteadyGroup.retune``): numbers
#: that reach the kernels through the options record alone (what lr and momentum schedulers set)
RETUNABLE = frozenset({"lr", "weight_decay", "momentum", "betas", "eps"})


def repeats(algorithm: str):
    """Marks an optimizer's ``_step_group`` as one whose steps the steady path repeats
    (``"sgd"``: ManifoldSGD's, ``"adam"``: ManifoldAdam's). A subclass that overrides
    ``_step_group`` without the mark takes the full path every step."""
    def mark(fn):
        fn.steady_algorithm = algorithm
        return fn
    return mark


def algorithm_of(opt) -> Optional[str]:
    """The algorithm whose steps the steady path repeats for ``opt``, or None (see ``repeats``)."""
    return getattr(type(opt)._step_group, "steady_algorithm", None)


def options_key(group) -> tuple:
    """Every option of a param group (all but its parameters), as compared between steps."""
    return tuple((k, v) for k, v in group.items() if k != "params")


class SteadyGroup:
    """What one param group's last step saw, to repeat it cheaply (see the module doc)."""

    __slots__ = ("group", "options", "params", "n", "param_ptrs", "dtypes", "strides", "sizes", "devices",
                 "states", "buffers", "buffer_ptrs", "counted", "gi", "plan", "state_dict", "backend", "buckets",
                 "idle", "keys", "values")

    def __init__(self, opt, gi: int, group, plan, idle: bool):
        self.gi, self.group, self.idle = gi, group, idle
        self.options = options_key(group)
        # the group's entries as they were (the same objects: no tuple of them built each step)
        self.keys, self.values = list(group), list(group.values())
        self.params = list(group["params"])
        self.n = len(self.params)
        self.plan, self.state_dict, self.backend = plan, opt.state, opt.backend
        self.param_ptrs: List[int] = []
        self.dtypes: list = []
        self.strides: list = []
        self.sizes: list = []
        self.devices: Optional[List[int]] = []
        self.states: list = []
        # per state tensor the step keeps (SGD's momentum; Adam's exp_avg, exp_avg_sq): its getter
        # from a state dict, the tensors and their addresses, all as the tables hold them
        self.buffers: List[Tuple[operator.methodcaller, list]] = []
        self.buffer_ptrs: List[List[int]] = []
        self.counted = False  # Adam: state["step"] counts the parameter's steps
        self.buckets: List[Tuple] = []

    @classmethod
    def build(cls, opt, gi: int, group, stepped: bool, algorithm: str = "sgd") -> Optional["SteadyGroup"]:
        """After a full step that stepped (``stepped``) or skipped group ``gi``: its steady
        record, or None when the next step must take the full path again. ``algorithm``:
        ``"sgd"`` (the ManifoldSGD family) or ``"adam"`` (ManifoldAdam)."""
        if any(isinstance(v, torch.Tensor) for _, v in options_key(group)):
            return None
        params = group["params"]
        if not stepped:  # no parameter of the group has a gradient: nothing to step while so
            if any(p.grad is not None for p in params):
                return None
            return cls(opt, gi, group, None, idle=True)
        plan = opt._plans.get(gi)
        if (plan is None or group.get("stochastic_rounding") or any(p.grad is None or p.numel() == 0 for p in params)
                or any(b.backend != "native" or b.sharded or b.dtensors
                       or len(b.native_entries) != len(b.entries) for b in plan.buckets)):
            return None
        s = cls(opt, gi, group, plan, idle=False)
        s.states = [opt.state.get(p) for p in params]
        if any(st is None for st in s.states) and (algorithm == "adam" or float(group["momentum"]) > 0):
            return None
        if algorithm == "adam":
            # the counts the full path left: Python ints (it writes int(step) + 1)
            if not all(type(st.get("step")) is int for st in s.states):
                return None
            s.counted = True
            kept = _STATE_TENSORS["adam"]
        else:
            kept = _STATE_TENSORS["sgd"] if float(group["momentum"]) > 0 else ()
        for key, _ in kept:
            tensors = [st.get(key) for st in s.states]
            if any(t is None for t in tensors):
                return None
            s.buffers.append((operator.methodcaller("get", key), tensors))
            s.buffer_ptrs.append([t.data_ptr() for t in tensors])
        s.param_ptrs = [p.data_ptr() for p in params]
        s.dtypes = [p.dtype for p in params]
        s.strides = [p.stride() for p in params]
        s.sizes = [p.size() for p in params]
        # the device: torch keeps a gradient on its parameter's device type (the .grad setter
        # checks it, and .data= cannot change it), so only a GPU index can differ
        s.devices = None if all(p.is_cpu for p in params) else [p.get_device() for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        for b in plan.buckets:
            nb = b.native
            idx = [index[id(e.param)] for e in b.entries]
            # the tables must hold the tensors themselves (stepped in place: contiguous, or rows
            # that are blocks of their storage), not contiguous copies made for one step
            view = nb._table_view()
            if view[_native.PARAM::_native.TENSOR_FIELDS] != [s.param_ptrs[i] for i in idx]:
                return None
            for (_, column), ptrs in zip(kept, s.buffer_ptrs):
                if view[column::_native.TENSOR_FIELDS] != [ptrs[i] for i in idx]:
                    return None
            # the next steps' momentum is not fresh; no stochastic rounding here; the tensors'
            # own flags (column rows) stay
            view[_native.FLAGS::_native.TENSOR_FIELDS] = list(nb.static_flags)
            view[_native.ROUNDING_KEY::_native.TENSOR_FIELDS] = [0] * nb.n
            s.buckets.append((nb, None if idx == list(range(s.n)) else idx, nb._options,
                              b.device, b.deferred))
        return s

    def check(self, opt, group) -> Optional[Tuple[Sequence[int], Optional[List[int]]]]:
        """When this group's step repeats the last one but for its gradients (all checked as
        the full path checks them): the gradients' addresses, and for Adam each parameter's
        step count of this step (else None). Else None. Moves and writes nothing."""
        if group is not self.group or opt.state is not self.state_dict or opt.backend != self.backend:
            return None
        ps = group["params"]
        if len(ps) != self.n or not all(map(operator.is_, ps, self.params)):
            return None
        # the same option objects under the same keys: unchanged; else compared by value, and
        # a change of the step's scalars alone (an lr scheduler's) is taken in (``retune``)
        if not (len(group) == len(self.keys) and all(map(operator.is_, group.values(), self.values))
                and all(map(operator.is_, group, self.keys))):
            try:
                now = options_key(group)
                if now != self.options and not self.retune(opt, group, now):
                    return None
            except Exception:  # an option that cannot be compared (e.g. a tensor): the full path
                return None
        grads = list(map(_GRAD, ps))
        if self.idle:
            return ((), None) if all(map(operator.is_, grads, repeat(None))) else None
        if opt._plans.get(self.gi) is not self.plan:
            return None
        # As the full path checks them (checks.check_grad, NativeBucket.run): dense (a sparse
        # tensor has no strides) with the parameter's shape, strides (so contiguous, as the
        # parameter is), dtype and device. Any difference: the full path, which raises naming
        # the parameter or steps it another way. Compared as they stream by (all(map(eq, ...))):
        # no list of n new tuples, which would also set off the cyclic garbage collector.
        try:
            if not (all(map(_EQ, map(_STRIDE, grads), self.strides)) and all(map(_EQ, map(_SIZE, grads), self.sizes))
                    and all(map(operator.is_, map(_DTYPE, grads), self.dtypes))
                    and (self.devices is None or list(map(_DEVICE_INDEX, grads)) == self.devices)):
                return None
        except (AttributeError, TypeError, RuntimeError):  # a gradient set to None; a sparse one
            return None
        # the parameters' storage: moved (p.data = ...) or laid out anew -> the full path
        if list(map(_PTR, ps)) != self.param_ptrs or not all(map(_EQ, map(_STRIDE, ps), self.strides)):
            return None
        # the state tensors: the same objects (not replaced in the state) on the same storage
        for (getter, tensors), ptrs in zip(self.buffers, self.buffer_ptrs):
            if not all(map(operator.is_, map(getter, self.states), tensors)) or list(map(_PTR, tensors)) != ptrs:
                return None
        counts = None
        if self.counted:
            # Adam's step counts as the full path leaves them (Python ints >= 0); anything else
            # (a float, a tensor, a negative count, a missing one) takes the full path, which
            # checks it and raises naming the parameter
            try:
                held = list(map(_STEP, self.states))
            except KeyError:
                return None
            if not all(map(operator.is_, map(type, held), repeat(int))) or min(held) < 0:
                return None
            counts = [t + 1 for t in held]
        return list(map(_PTR, grads)), counts

    def retune(self, opt, group, now: tuple) -> bool:
        """The group's options are ``now``: when only ``RETUNABLE`` ones changed (numbers, checked
        as the full path checks them), the buckets' options records are made anew and True is
        returned; else False (the full path). The record then holds the group's new options."""
        old = dict(self.options)
        new = dict(now)
        if old.keys() != new.keys():
            return False
        changed = [k for k in new if new[k] != old[k]]
        if not RETUNABLE.issuperset(changed) or any(isinstance(new[k], torch.Tensor) for k in changed):
            return False
        # momentum stays on (> 0): turning it on or off changes the state the step keeps
        if "momentum" in changed and not (float(old["momentum"]) > 0 and float(new["momentum"]) > 0):
            return False
        opt._check_options(group, f"param_groups[{self.gi}]")  # raises: the full path names it
        step_opts = opt._group_options(group)
        self.buckets = [(nb, idx, nb._native_options(step_opts), device, deferred)
                        for nb, idx, _, device, deferred in self.buckets]
        self.options = now
        self.keys, self.values = list(group), list(group.values())
        return True

    def run(self, grad_ptrs: Sequence[int], counts: Optional[List[int]], ledger) -> None:
        """The group's step: one native call per bucket; skipped rows go to the ledger. ``counts``:
        Adam's step counts of this step (from ``check``), written to the state and the tables."""
        if counts is not None:  # state["step"] = t for every parameter, in one C-level pass
            deque(map(operator.setitem, self.states, repeat("step"), counts), maxlen=0)
        for nb, idx, options, device, deferred in self.buckets:
            ptrs = grad_ptrs if idx is None else [grad_ptrs[i] for i in idx]
            steps = counts if idx is None or counts is None else [counts[i] for i in idx]
            report = nb.run_steady(ptrs, device, options, reset_report=not deferred, step_counts=steps)
            if not deferred:
                skipped = nb.skipped()
                if skipped:
                    ledger.add([(nb.names[i], int(report[i, _native.SKIPPED_ROWS]),
                                 int(report[i, _native.FIRST_SKIPPED_ROW])) for i in skipped], stacklevel=4)


def ready(opt) -> Optional[List[Tuple[SteadyGroup, Sequence[int], Optional[List[int]]]]]:
    """(record, gradient addresses, Adam's step counts or None) of every param group that
    steps when the whole step can take the steady path, else None."""
    steady = opt._steady
    groups = opt.param_groups
    if not ENABLED or len(steady) != len(groups):
        return None
    out = []
    for gi, group in enumerate(groups):
        s = steady.get(gi)
        seen = None if s is None else s.check(opt, group)
        if seen is None:
            return None
        if not s.idle:
            out.append((s, *seen))
    return out
