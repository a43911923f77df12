"""The steady-state step: a step that repeats the previous one but for the gradients.

Once a step of the full path (checks.groups_to_step, then each group's plan and buckets)
has run, a ``SteadyGroup`` per param group remembers what it saw: the group dict and its
options, the parameters and their addresses, the momentum buffers, the plan, and the
native buckets' tables (all columns written, the flags of a step whose momentum is no
longer fresh). The next ``step()`` first asks every group whether it is unchanged
(``check``): the same group, options, parameters (objects, addresses, contiguous) and
momentum buffers, and gradients that the full path would accept as they are (strided,
the parameter's shape, dtype and device, contiguous). Those checks are C-level passes
over the group (``map`` of attribute getters), not a Python loop per tensor. When every
group is unchanged the step is one native call per bucket: the gradient column is written
only where an address moved (``NativeBucket.run_steady``). Anything else (a gradient of
another dtype, shape or device, sparse or not contiguous, a gradient set to None, an option
changed, a parameter added or given new storage, a plan or the state replaced by
``load_state_dict``, ``rescale`` or ``add_param_group``) sends the whole step, every group,
through the full path, which checks everything before any weight moves and raises the
error naming the parameter; a new ``SteadyGroup`` is made after it.

What takes the full path every step: the Adam family (its step counts change each step),
stochastic rounding (its keys do), reference buckets (no tables), DTensor parameters,
parameters or momentum buffers stepped on contiguous copies (a layout whose rows are not
blocks of its storage), a parameter in the group without a gradient, and options held as
tensors. Gradients must be laid out as their parameters (``channels_last`` ones too).
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import List, Optional, Sequence, Tuple

import torch

from . import _native

#: False: every step takes the full path (bench --overhead measures both paths with it)
ENABLED = True

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_MOMENTUM = operator.methodcaller("get", "momentum_buffer")
_EQ = operator.eq
_PTR = torch.Tensor.data_ptr
_SIZE = torch.Tensor.size
_STRIDE = torch.Tensor.stride  # raises for a sparse tensor
_DEVICE_INDEX = torch.Tensor.get_device  # -1 on the CPU


def options_key(group) -> tuple:
    """Every option of a param group (all but its parameters), as compared between steps."""
    return tuple((k, v) for k, v in group.items() if k != "params")


class SteadyGroup:
    """What one param group's last step saw, to repeat it cheaply (see the module doc)."""

    __slots__ = ("group", "options", "params", "n", "param_ptrs", "dtypes", "strides", "sizes", "devices",
                 "states", "momenta", "gi", "plan", "state_dict", "backend", "buckets", "idle", "keys", "values")

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
        self.momenta: Optional[list] = None
        self.buckets: List[Tuple] = []

    @classmethod
    def build(cls, opt, gi: int, group, stepped: bool) -> Optional["SteadyGroup"]:
        """After a full step that stepped (``stepped``) or skipped group ``gi``: its steady
        record, or None when the next step must take the full path again."""
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
        use_m = float(group["momentum"]) > 0
        s.states = [opt.state.get(p) for p in params]
        if use_m:
            if any(st is None or st.get("momentum_buffer") is None for st in s.states):
                return None
            s.momenta = [st["momentum_buffer"] for st in s.states]
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
            if (view[_native.PARAM::_native.TENSOR_FIELDS] != [s.param_ptrs[i] for i in idx]
                    or (use_m and view[_native.MOMENTUM::_native.TENSOR_FIELDS]
                        != [s.momenta[i].data_ptr() for i in idx])):
                return None
            # the next steps' momentum is not fresh; no stochastic rounding here; the tensors'
            # own flags (column rows) stay
            view[_native.FLAGS::_native.TENSOR_FIELDS] = list(nb.static_flags)
            view[_native.ROUNDING_KEY::_native.TENSOR_FIELDS] = [0] * nb.n
            s.buckets.append((nb, None if idx == list(range(s.n)) else idx, nb._options,
                              b.device, b.deferred))
        return s

    def check(self, opt, group) -> Optional[Sequence[int]]:
        """The gradients' addresses when this group's step repeats the last one but for its
        gradients (all checked as the full path checks them), else None. Moves nothing."""
        if group is not self.group or opt.state is not self.state_dict or opt.backend != self.backend:
            return None
        ps = group["params"]
        if len(ps) != self.n or not all(map(operator.is_, ps, self.params)):
            return None
        # the same option objects under the same keys: unchanged; else compared by value
        if not (len(group) == len(self.keys) and all(map(operator.is_, group.values(), self.values))
                and all(map(operator.is_, group, self.keys))):
            try:
                if options_key(group) != self.options:
                    return None
            except Exception:  # an option that cannot be compared (e.g. a tensor): the full path
                return None
        grads = list(map(_GRAD, ps))
        if self.idle:
            return () if all(map(operator.is_, grads, repeat(None))) else None
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
        if self.momenta is not None and not all(map(operator.is_, map(_MOMENTUM, self.states), self.momenta)):
            return None
        return list(map(_PTR, grads))

    def run(self, grad_ptrs: Sequence[int], ledger) -> None:
        """The group's step: one native call per bucket; skipped rows go to the ledger."""
        for nb, idx, options, device, deferred in self.buckets:
            ptrs = grad_ptrs if idx is None else [grad_ptrs[i] for i in idx]
            report = nb.run_steady(ptrs, device, options, reset_report=not deferred)
            if not deferred:
                skipped = nb.skipped()
                if skipped:
                    ledger.add([(nb.names[i], int(report[i, _native.SKIPPED_ROWS]),
                                 int(report[i, _native.FIRST_SKIPPED_ROW])) for i in skipped], stacklevel=4)


def ready(opt) -> Optional[List[Tuple[SteadyGroup, Sequence[int]]]]:
    """(record, gradient addresses) of every param group when the whole step can take the
    steady path, else None."""
    steady = opt._steady
    groups = opt.param_groups
    if not ENABLED or len(steady) != len(groups):
        return None
    out = []
    for gi, group in enumerate(groups):
        s = steady.get(gi)
        ptrs = None if s is None else s.check(opt, group)
        if ptrs is None:
            return None
        if not s.idle:
            out.append((s, ptrs))
    return out
