"""Param groups from a model: which weights go on the manifold, and why.

The methods are safe where the loss does not change when a row of the weight is scaled
(SPEC, PSI paper Thm 1): a weight whose output goes straight into a normalisation layer.

=============================================  ==========================================
the weight feeds ...                           choice
=============================================  ==========================================
BatchNorm / SyncBatchNorm / InstanceNorm       manifold, ``filter`` rows: each output
(per-channel statistics; a bias before it      channel is scale-invariant on its own
is cancelled by the mean)                      (conv weights are ``(out, -1)`` rows)
GroupNorm / LayerNorm, producer without bias   manifold, ``tensor`` rows: only scaling the
                                               whole weight is invariant
a per-channel norm, from a ConvTranspose       manifold, ``tensor`` rows (its dim 0 is the
                                               *input* channel, so ``filter`` rows would not
                                               be invariant)
anything else: heads, embeddings, biases,      Euclidean (weight decay on weights with
norm gains, unnormalised layers                ndim >= 2 only, none on biases and norms)
=============================================  ==========================================

"Feeds" is read from a ``torch.fx`` trace of the model: every use of the layer's output
must be the input of such a norm (a residual that also uses the raw output breaks the
invariance). When the model cannot be traced, the layer registered right after it is
taken as its consumer, and the summary says so.

    groups = manifold_param_groups(model)
    print(groups.table())
    opt = UNSGD(groups, lr=0.1, momentum=0.9)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_WHOLE = (nn.GroupNorm, nn.LayerNorm)
_NORMS = _PER_CHANNEL + _WHOLE + tuple(
    getattr(nn, n) for n in ("RMSNorm",) if hasattr(nn, n))
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class Choice:
    name: str
    shape: Tuple[int, ...]
    group: str  # "manifold (filter)", "manifold (tensor)", "euclidean", "euclidean (no decay)", "frozen"
    reason: str


class ParamGroups(list):
    """A list of param groups (pass it to any of the optimizers) that also says why."""

    def __init__(self, groups, choices: List[Choice], method: str):
        super().__init__(groups)
        self.choices = choices
        self.method = method

    def table(self) -> str:
        rows = [("parameter", "shape", "group", "why")] + [
            (c.name, "x".join(map(str, c.shape)) or "scalar", c.group, c.reason) for c in self.choices]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines + [f"(feeding read from {self.method})"])


def manifold_param_groups(model: nn.Module, manifold: str = "sphere", weight_decay: float = 0.0,
                          trace: bool = True) -> ParamGroups:
    """Build param groups: normalised layer weights on ``manifold`` ("sphere" or "psi"), the rest
    Euclidean. ``weight_decay`` reaches the Euclidean weights with ndim >= 2 only. Frozen
    parameters (``requires_grad=False``) are left out. See the module doc for the rules."""
    if manifold not in ("sphere", "psi"):
        raise ValueError(f"manifold={manifold!r}: expected 'sphere' or 'psi'")
    feeds, method = _feeding(model, trace)
    owner: Dict[int, Tuple[str, nn.Module, str]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, mod, pname))

    buckets: Dict[str, List[Tuple[str, torch.Tensor]]] = {
        k: [] for k in ("filter", "tensor", "decay", "no_decay")}
    choices: List[Choice] = []
    for name, p in model.named_parameters():
        mname, mod, pname = owner.get(id(p), ("", None, name))
        if not p.requires_grad:
            choices.append(Choice(name, tuple(p.shape), "frozen", "requires_grad=False: left out"))
            continue
        where, why = _decide(mod, mname, pname, p, feeds)
        buckets[where].append((name, p))
        label = {"filter": f"{manifold} (filter rows)", "tensor": f"{manifold} (tensor)",
                 "decay": "euclidean", "no_decay": "euclidean (no decay)"}[where]
        choices.append(Choice(name, tuple(p.shape), label, why))

    groups = []
    if buckets["filter"]:
        groups.append(dict(params=buckets["filter"], manifold=manifold, granularity="filter",
                           weight_decay=0.0))
    if buckets["tensor"]:
        groups.append(dict(params=buckets["tensor"], manifold=manifold, granularity="tensor",
                           weight_decay=0.0))
    if buckets["decay"]:
        groups.append(dict(params=buckets["decay"], manifold="euclidean", weight_decay=weight_decay))
    if buckets["no_decay"]:
        groups.append(dict(params=buckets["no_decay"], manifold="euclidean", weight_decay=0.0))
    return ParamGroups(groups, choices, method)


def _decide(mod: Optional[nn.Module], mname: str, pname: str, p, feeds) -> Tuple[str, str]:
    if mod is None:
        return ("decay" if p.dim() >= 2 else "no_decay"), "not a parameter of a module"
    if isinstance(mod, _NORMS):
        return "no_decay", f"{type(mod).__name__} {pname}: a norm gain/shift"
    if isinstance(mod, nn.Embedding) or isinstance(mod, nn.EmbeddingBag):
        return "decay", "embedding"
    if p.dim() < 2:
        return "no_decay", "bias" if pname == "bias" else "1-D"
    if not isinstance(mod, _LAYERS) or pname != "weight":
        return "decay", f"{type(mod).__name__}.{pname}: not a conv/linear weight"
    consumers = feeds.get(mname)
    if not consumers:
        return "decay", ("output not normalised (e.g. a classifier head)" if consumers is not None
                         else "output not normalised")
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    has_bias = getattr(mod, "bias", None) is not None
    if all(isinstance(c, _PER_CHANNEL) for c in consumers):
        names = "/".join(sorted({type(c).__name__ for c in consumers}))
        if transposed:
            return "tensor", f"feeds {names}; ConvTranspose: dim 0 is the input channel"
        return "filter", f"feeds {names}: each output channel is scale-invariant"
    if all(isinstance(c, _NORMS) for c in consumers):
        names = "/".join(sorted({type(c).__name__ for c in consumers}))
        if has_bias:
            return "decay", f"feeds {names}, but its bias breaks the scale invariance"
        return "tensor", f"feeds {names}: only the whole weight is scale-invariant"
    return "decay", "output not (only) normalised"


def _feeding(model: nn.Module, trace: bool):
    """{module name: [modules consuming its output]} for conv/linear layers (empty list: its
    output reaches something else)."""
    if trace:
        try:
            return _feeding_fx(model), "a torch.fx trace"
        except Exception as exc:  # control flow, unsupported ops: fall back, and say so
            reason = f"{type(exc).__name__}"
    else:
        reason = "trace=False"
    return _feeding_order(model), f"registration order ({reason})"


def _feeding_fx(model: nn.Module) -> Dict[str, List[nn.Module]]:
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    out: Dict[str, List[nn.Module]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _LAYERS):
            continue
        consumers = []
        for user in node.users:
            m = mods.get(user.target) if user.op == "call_module" else None
            if m is None or not isinstance(m, _NORMS) or user.args[0] is not node:
                consumers = []
                break
            consumers.append(m)
        prev = out.get(node.target)
        # a layer called several times: every call must feed a norm
        out[node.target] = consumers if prev is None else (prev + consumers if prev and consumers else [])
    return out


def _feeding_order(model: nn.Module) -> Dict[str, List[nn.Module]]:
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    out: Dict[str, List[nn.Module]] = {}
    for (name, mod), (_, nxt) in zip(leaves, leaves[1:] + [("", None)]):
        if not isinstance(mod, _LAYERS):
            continue
        channels = mod.out_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.out_features
        feats = getattr(nxt, "num_features", getattr(nxt, "num_channels", None))
        if isinstance(nxt, nn.LayerNorm):
            feats = nxt.normalized_shape[-1] if nxt.normalized_shape else None
        out[name] = [nxt] if isinstance(nxt, _NORMS) and feats == channels else []
    return out
