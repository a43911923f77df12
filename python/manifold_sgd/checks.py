"""What the optimizer accepts: the options of a param group, its parameters and their
gradients, and the names that messages give them. Every check raises the error torch.optim
would raise (its type, and its message where it has one) or a ValueError naming the
parameter; none of them moves a weight.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import distributed, geoopt_compat, grouping
from .reference import ADAPTIVE, RETRACTIONS

MANIFOLDS = ("auto", "sphere", "psi", "euclidean", "stiefel")
RADII = ("unit", "geometric", "geometric_std")
BACKENDS = ("auto", "native", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- a param group as given: its parameters and their names -----------------------------

def group_params(param_group, gi: int, named_groups: Optional[bool]) -> Tuple[List, List, Optional[List[str]]]:
    """(the group's 'params' as a list, its tensors, their names or None when given without
    names) of a param group given to ``add_param_group``, checked as torch.optim checks them,
    before anything reads them.

    ``named_groups``: whether the optimizer's groups so far carry names (None: no group yet);
    torch.optim wants all groups with or all without names."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    if "params" not in param_group:
        raise KeyError(f"param_groups[{gi}] has no 'params' (a dict with the tensors to optimize "
                       f"under 'params' and the group's options)")
    items = param_group["params"]
    if isinstance(items, torch.Tensor):
        items = [items]
    elif isinstance(items, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                        "ordering of tensors in sets will change between runs. Please use a list instead.")
    else:
        items = list(items)  # a generator is read once
    named = [isinstance(x, tuple) for x in items]
    if any(named) and not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    names: Optional[List[str]] = None
    params = items
    if items and all(named):
        for i, x in enumerate(items):
            if len(x) != 2:
                raise ValueError(f"param_groups[{gi}]['params'][{i}]: a named parameter is a (name, tensor) "
                                 f"pair, got a tuple of {len(x)}")
        names = [n for n, _ in items]
        params = [p for _, p in items]
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            where = f"parameter {names[i]!r}" if names else f"param_groups[{gi}]['params'][{i}]"
            raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                            f"{torch.typename(p)} ({where})")
    if named_groups is not None and named_groups != (names is not None or "param_names" in param_group):
        if named_groups:
            raise ValueError(
                "all optimizer param groups should be with/without names: this optimizer's groups carry "
                "parameter names ('param_names', e.g. from manifold_param_groups(model)), so give the new "
                "group's parameters as (name, tensor) pairs, e.g. "
                "opt.add_param_group({'params': list(module.named_parameters())})")
        raise ValueError("all optimizer param groups should be with/without names: this optimizer's groups "
                         "have no parameter names, so give the new group's tensors without names, e.g. "
                         "opt.add_param_group({'params': list(module.parameters())})")
    return items, params, names


def param_names(group, params, gi: int) -> List[str]:
    given = group.get("param_names")
    if given and len(given) == len(params):
        return [f"parameter '{n}'" for n in given]
    return [f"param_groups[{gi}]['params'][{i}] (shape {tuple(getattr(p, 'shape', ()))})"
            for i, p in enumerate(params)]


class Names:
    """Parameter names for messages, made on first use (a steady step needs none)."""

    def __init__(self, group, gi: int):
        self._group, self._gi, self._map = group, gi, None

    def __getitem__(self, pid: int) -> str:
        if self._map is None:
            ps = self._group["params"]
            self._map = {id(p): n for p, n in zip(ps, param_names(self._group, ps, self._gi))}
        return self._map[pid]


# ---- which manifold a parameter is on ----------------------------------------------------

def kind_of(group: Dict[str, Any], p: torch.Tensor, auto_manifold: str, name: str = "parameter") -> str:
    forced = geoopt_compat.manifold_of(p, group["manifold"], name)  # a geoopt.ManifoldParameter
    if forced is not None:
        return forced[0]
    m = group["manifold"]
    if m == "auto":
        return auto_manifold if p.dim() >= 2 else "euclidean"
    return m


def granularity_of(group: Dict[str, Any], p: torch.Tensor, name: str = "parameter") -> str:
    forced = geoopt_compat.manifold_of(p, group["manifold"], name)
    return forced[1] if forced is not None else group["granularity"]


# ---- a step's groups ------------------------------------------------------------------

def groups_to_step(opt) -> list:
    """(index, group, params with gradients, names) of each group of the optimizer ``opt`` to
    step, every one checked; nothing has moved if this raises. What a group's layout checks saw
    is kept in ``opt._checked``: a step with the same parameters and options skips them."""
    work, checked = [], {}
    for gi, group in enumerate(opt.param_groups):
        opt._check_options(group, f"param_groups[{gi}]")
        params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
        if not params:
            continue
        name_of = Names(group, gi)
        # The layout checks depend on the parameters' shapes and dtypes and the group's
        # options only: a step with what the last step checked skips them.
        layout_key = (tuple((id(p), p.shape, p.dtype) for p in params), group["manifold"],
                      group["granularity"], group.get("grouping", "row"), group["stochastic_rounding"])
        seen, has_dtensors = opt._checked.get(gi, (None, False))
        if seen == layout_key:
            for p in params:
                if not grad_matches(p):
                    check_grad(p, name_of[id(p)])
                if has_dtensors:
                    distributed.check_grad(p, name_of[id(p)])
            work.append((gi, group, params, name_of))
            continue
        has_dtensors = False
        for p in params:
            name = name_of[id(p)]
            check_grad(p, name)
            check_rounding(group, p, name, f"param_groups[{gi}]")
            distributed.check_grad(p, name)
            has_dtensors = has_dtensors or distributed.is_dtensor(p)
            kind = opt._kind(group, p, name)
            check_native_serves(opt, kind, p, name)
            if kind != "euclidean":  # options may have changed since construction
                gran = opt._granularity(group, p, name)
                grouping.check_layout(p.shape, gran, group.get("grouping", "row"), name, kind)
                if distributed.is_dtensor(p):
                    distributed.row_layout(p, kind, grouping.component_shape(p.shape, gran, kind)[0], name, gran)
        checked[gi] = (layout_key, has_dtensors)
        work.append((gi, group, params, name_of))
    opt._checked.update(checked)  # every group passed: remember them
    return work


# ---- options --------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or (
        isinstance(x, torch.Tensor) and x.numel() == 1)


def _bad(g: Dict[str, Any], where: str):
    def bad(opt, why):
        raise ValueError(f"{where}: {opt}={g[opt]!r} {why}")
    return bad


def _check_shared_options(g: Dict[str, Any], where: str) -> None:
    """The options both families have: step size, decay, rows and their manifold, rounding."""
    bad = _bad(g, where)
    if not _is_number(g["lr"]) or not (float(g["lr"]) >= 0 and math.isfinite(float(g["lr"]))):
        bad("lr", "must be a finite number >= 0")
    if not _is_number(g["weight_decay"]) or not (0 <= float(g["weight_decay"]) < math.inf):
        bad("weight_decay", "must be a finite number >= 0")
    if g["manifold"] not in MANIFOLDS:
        bad("manifold", f"is not one of {MANIFOLDS}")
    if g["granularity"] not in grouping.GRANULARITIES:
        bad("granularity", f"is not one of {grouping.GRANULARITIES}")
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


def check_options(g: Dict[str, Any], where: str) -> None:
    """ManifoldSGD's options (SPEC §2-4)."""
    bad = _bad(g, where)
    if not _is_number(g["momentum"]) or not (0 <= float(g["momentum"]) < 1):
        bad("momentum", "must be in [0, 1)")
    if g["nesterov"] and float(g["momentum"]) <= 0:
        bad("nesterov", "needs momentum > 0")
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
    _check_shared_options(g, where)


SECOND_MOMENTS = ("row", "element")


def check_native_serves(opt, kind: str, p: torch.Tensor, name: str) -> None:
    """``backend="native"`` promises the fused kernels: a parameter that none of them can step is a
    ValueError naming it, raised before anything moves. The Adam family's Stiefel blocks step on the
    CPU kernel; on a GPU they take the reference path (the CUDA kernels have row manifolds only)."""
    if (kind == "stiefel" and getattr(opt, "backend", "auto") == "native"
            and getattr(opt, "algorithm", "sgd") == "adam" and p.device.type != "cpu"):
        raise ValueError(f"{name}: backend='native', but ManifoldAdam has no native kernel for Stiefel blocks "
                         f"on {p.device.type} (they take the reference path): use backend='auto' or "
                         f"backend='reference'")


def check_adam_options(g: Dict[str, Any], where: str) -> None:
    """ManifoldAdam's options (SPEC §6): the Adam family has no PSI step and no FG-SGD scale."""
    bad = _bad(g, where)
    for key in ("momentum", "nesterov", "adaptive", "grouping", "group_size", "psi_max_norm"):
        if key in g:
            raise ValueError(f"{where}: {key!r} is an option of the SGD family (ManifoldSGD), not of "
                             f"ManifoldAdam (SPEC §6: Adam's first moment uses betas[0]; no adaptive step)")
    if g["manifold"] == "psi":
        bad("manifold", "has no Adam step (SPEC §6: PSI is SGD-only; use PSISGD)")
    b = g["betas"]
    if (not isinstance(b, (tuple, list)) or len(b) != 2 or not all(_is_number(x) for x in b)
            or not all(0 <= float(x) < 1 for x in b)):
        bad("betas", "must be two numbers in [0, 1)")
    if not _is_number(g["eps"]) or not (0 < float(g["eps"]) < math.inf):
        bad("eps", "must be a finite number > 0")
    if g["second_moment"] not in SECOND_MOMENTS:
        bad("second_moment", f"is not one of {SECOND_MOMENTS}")
    _check_shared_options(g, where)


# ---- parameters and gradients ----------------------------------------------------------

def check_param(p, name: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(f"{name}: complex parameters are not supported (dtype {p.dtype})")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {p.dtype} is not supported; expected one of "
                         f"{[str(d) for d in SUPPORTED_DTYPES]}")


def check_rounding(group: Dict[str, Any], p: torch.Tensor, name: str, where: str) -> None:
    """stochastic_rounding rounds bfloat16 weights; float32/float64 weights are stored in their
    math type (nothing to round), but float16 ones would silently round to nearest."""
    if group["stochastic_rounding"] and p.dtype == torch.float16:
        raise ValueError(f"{name}: {where} has stochastic_rounding=True, which is implemented for "
                         f"bfloat16 parameters; this one is float16 (use bfloat16, or put it in a "
                         f"param group with stochastic_rounding=False)")


def grad_matches(p) -> bool:
    """check_grad's conditions, true in the common case, without building a message."""
    g = p.grad
    return (g.layout is torch.strided and g.shape == p.shape and g.dtype is p.dtype
            and g.device == p.device)


def check_grad(p, name: str) -> None:
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise ValueError(f"{name}: sparse gradients are not supported")
    if g.shape != p.shape:
        raise ValueError(f"{name}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise ValueError(f"{name}: gradient dtype {g.dtype} != parameter dtype {p.dtype}")
    if g.device != p.device:
        raise ValueError(f"{name}: gradient on {g.device}, parameter on {p.device}")
