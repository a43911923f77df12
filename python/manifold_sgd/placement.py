"""Placing weights on their manifold (SPEC §3, construction; §4, rescaling).

One function, ``place``, used by the optimizer's construction (``add_param_group``), by
``rescale`` and by ``reference.project_to_manifold``: sphere rows become rho * w / ||w||,
Stiefel blocks rho times an orthonormal factor. Every row is checked first (a ValueError
names the parameter and the row or block that cannot be placed), and a row or block that
is already on its manifold, to its dtype's rounding, is left exactly as it is: building an
optimizer on weights that a step (or a checkpoint) left on the manifold moves nothing, so a
resumed run is bitwise the uninterrupted one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import distributed, grouping, reference
from .checks import param_names
from .radius import row_radius
from .reference import math_dtype, orthonormalize_blocks

# |‖w‖ − ρ| ≤ tol·ρ: a sphere row on its sphere to its storage's rounding. A stored element is
# off by at most its rounding (16-bit: a full ulp with stochastic rounding), so is the row's
# norm; twice that bound for 16-bit rows, and the computed steps' own error for float32/64
# (measured at a few 1e-7 and 1e-15).
SPHERE_TOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -10}
# max |W Wᵀ/ρ² − I|: a Stiefel block's rows orthonormal to rounding (each entry of W Wᵀ is off by
# at most twice an element's rounding; measured steps: float32 ~1e-6, float64 ~3e-15)
STIEFEL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2.0 ** -5, torch.float16: 2.0 ** -9}


def place(kind: str, w: torch.Tensor, rho: Optional[torch.Tensor], name: str, *, dtype: torch.dtype,
          block_rows: int = 1, row_offset: int = 0,
          rho_before: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, bool]:
    """``w`` (components x length, in the math dtype of ``dtype``, the parameter's storage type)
    placed on its manifold: returns (rows, whether any changed); rows already there are the
    given ones. Other kinds are returned as they are.

    ``rho``: the radius per component (None: 1). ``block_rows``: p of a Stiefel block.
    ``row_offset``: added to the row in messages (a DTensor's local rows). ``rho_before``: the
    radius the Stiefel blocks were placed on (rescale): blocks orthonormal at that radius are
    scaled onto the new one rather than orthonormalised again."""
    if kind not in ("sphere", "stiefel") or w.numel() == 0:
        return w, False
    rows = w.shape[0]
    r = torch.ones(rows, dtype=w.dtype, device=w.device) if rho is None else rho.to(w.device, w.dtype)
    if kind == "sphere":
        return _place_sphere(w, r, name, SPHERE_TOL[dtype], row_offset)
    return _place_stiefel(w, r, name, STIEFEL_TOL[dtype], block_rows, rho_before)


def _place_sphere(w, r, name, tol, row_offset) -> Tuple[torch.Tensor, bool]:
    norms = w.norm(dim=1)
    bad = (~torch.isfinite(norms)) | (norms == 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: row {i + row_offset} has norm {float(norms[i])} and cannot be "
                         f"placed on a sphere (manifold='sphere' needs nonzero finite rows)")
    r64 = r.double()
    on = (w.double().norm(dim=1) - r64).abs() <= tol * r64
    if bool(on.all()):
        return w, False
    placed = r.view(-1, 1) * w / norms.view(-1, 1)
    return torch.where(on.view(-1, 1), w, placed), True


def _place_stiefel(w, r, name, tol, block_rows, rho_before) -> Tuple[torch.Tensor, bool]:
    rows, length = w.shape
    blocks = w.reshape(rows, block_rows, length // block_rows)
    finite = torch.isfinite(blocks).flatten(1).all(dim=1)
    # singular to rounding (checked in float64): ill-conditioned random blocks are fine,
    # their QR factor is still orthonormal
    b64 = torch.where(finite.view(-1, 1, 1), blocks, torch.zeros_like(blocks)).double()
    sv = torch.linalg.svdvals(b64)
    bad = (~finite) | (sv[:, -1] <= sv[:, 0] * 1e-12)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: Stiefel block {i} is rank-deficient or not finite and cannot "
                         f"be given orthonormal rows")
    gram = b64 @ b64.transpose(-1, -2)
    eye = torch.eye(block_rows, dtype=torch.float64, device=w.device)

    def orthonormal_at(radius):
        rr = radius.to(w.device, torch.float64).view(-1, 1, 1)
        return (gram / (rr * rr) - eye).abs().flatten(1).amax(dim=1) <= tol

    on = orthonormal_at(r)
    if bool(on.all()):
        return w, False
    rho = r.view(-1, 1, 1)
    placed, _ = orthonormalize_blocks(blocks, rho)
    if rho_before is not None:  # blocks on the old radius: scaled onto the new one
        old = rho_before.to(w.device, w.dtype).view(-1, 1, 1)
        placed = torch.where(orthonormal_at(rho_before).view(-1, 1, 1), blocks * (rho / old), placed)
    return torch.where(on.view(-1, 1, 1), blocks, placed).reshape(rows, length), True


def place_param(kind: str, p: torch.Tensor, shape: Tuple[int, int, int], name: str,
                rho: Optional[torch.Tensor] = None, *, row_offset: int = 0,
                rho_before: Optional[torch.Tensor] = None, granularity: str = "filter") -> Optional[torch.Tensor]:
    """``p``'s values (a local tensor) placed on its manifold, as a tensor of ``p``'s shape and
    dtype, or None when every row is already there (nothing to write). ``shape``: (components,
    length, block rows), grouping.component_shape's; ``granularity``: "column" rows are the
    columns (grouping.as_rows), every other view is a reshape."""
    rows, length, block_rows = shape
    gran = "column" if granularity == "column" else "filter"
    w = grouping.as_rows(p.detach(), gran, rows, length).to(math_dtype(p.dtype)).contiguous()
    out, changed = place(kind, w, rho, name, dtype=p.dtype, block_rows=block_rows, row_offset=row_offset,
                         rho_before=rho_before)
    return grouping.from_rows(out, gran, p.shape).to(p.dtype) if changed else None


def placed_params(group, params, names, kind_of, granularity_of) -> list:
    """(local tensor, its values on the manifold) of a param group's parameters with rows to
    move (construction); every row of every parameter is checked before the caller writes any.
    ``kind_of``/``granularity_of``: (group, p, name) -> the parameter's manifold kind/granularity."""
    placed = []
    with torch.no_grad():
        for p, name in zip(params, names):
            kind = kind_of(group, p, name)
            if kind not in ("sphere", "stiefel") or p.numel() == 0:
                continue
            gran = granularity_of(group, p, name)
            rows, length, block_rows = grouping.component_shape(p.shape, gran, kind)
            shard = distributed.row_layout(p, kind, rows, name, gran)  # Stiefel blocks: never sharded
            loc = distributed.local(p.detach())  # a DTensor: this rank's rows
            w = place_param(kind, loc, (rows if shard is None else shard.local_rows, length, block_rows), name,
                            row_offset=shard.row_offset if shard is not None else 0, granularity=gran)
            if w is not None:
                placed.append((loc, w))
    return placed

def rescale_params(opt, stats) -> None:
    """The rows of every group of ``opt`` with ``radius != "unit"`` onto rho = gamma / lambda
    (ManifoldSGD.rescale): every parameter's new rows computed first (nothing moves if one
    fails), then written, the first moment transported, the radius kept in the state."""
    updates = []  # computed for every parameter first: nothing moves if one fails
    for gi, group in enumerate(opt.param_groups):
        if group["radius"] == "unit":
            continue
        for p, name in zip(group["params"], param_names(group, group["params"], gi)):
            kind = opt._kind(group, p)
            if kind not in ("sphere", "stiefel"):
                continue
            rec = stats.layer(p)
            if rec is None:
                raise ValueError(f"{name}: radius={group['radius']!r} needs the weight of a "
                                 f"Conv/Linear module watched by the FeatureStats")
            gran = opt._granularity(group, p, name)
            rows, length, block_rows = grouping.component_shape(p.shape, gran, kind)
            rho, _ = row_radius(rec, rows, gran, group["radius"] == "geometric_std")
            old = opt.state[p].get("radius") if p in opt.state else None
            w = grouping.as_rows(p.detach(), gran, rows, length).to(math_dtype(p.dtype)).contiguous()
            w_new, _ = place(kind, w, rho.to(p.device), name, dtype=p.dtype, block_rows=block_rows,
                                       rho_before=torch.ones(rows) if old is None else old)
            updates.append((p, kind, gran, rows, length, block_rows, rho, w_new))
    for p, kind, gran, rows, length, block_rows, rho, w_new in updates:
        st = opt.state[p]
        p.copy_(grouping.from_rows(w_new, gran, p.shape).to(p.dtype))
        m = st.get(opt._math_state[0])
        if m is not None:  # transport: projection onto the tangent space at the new point
            mv, dt = grouping.as_rows(m, gran, rows, length), w_new.dtype
            if kind == "sphere":
                mv.copy_(reference.transport("sphere", w_new, mv.to(dt)).to(m.dtype))
            else:
                blocks = (rows, block_rows, length // block_rows)
                r = rho.to(device=p.device, dtype=dt).view(-1, 1, 1)
                mv.copy_(reference.stiefel_project(w_new.view(blocks), mv.to(dt).view(blocks),
                                                   r).reshape(rows, length).to(m.dtype))
            if gran == "column" and kind == "stiefel":  # mv was a copy (grouping.as_rows)
                m.copy_(grouping.from_rows(mv, gran, m.shape))
        st["radius"] = rho
