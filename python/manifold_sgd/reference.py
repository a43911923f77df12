"""SPEC.md in plain PyTorch: the executable specification and the portable backend.

Every function works on one tensor viewed as rows, vectorised over its rows, on
any device. 16-bit parameters are computed in float32 and rounded once on write;
the momentum buffer is kept in that math type. Names follow SPEC.md: ``g_t`` is
the Riemannian gradient g~, ``R`` the group gradient norm, ``s`` the step scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Tuple

import torch

KINDS = ("euclidean", "sphere", "psi", "stiefel")
RETRACTIONS = ("qr", "polar")
ADAPTIVE = ("none", "sphere", "general")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class StepOptions:
    algorithm: ClassVar[str] = "sgd"
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0  # Euclidean rows only
    adaptive: str = "none"
    curvature: float = 1.0
    distance: float = 1.0
    psi_max_norm: float = 1e4
    retraction: str = "qr"  # Stiefel blocks


# ---- SPEC §2: per-row manifolds -------------------------------------------------

def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1, keepdim=True)


def riemannian_grad(kind: str, w: torch.Tensor, g: torch.Tensor, weight_decay: float = 0.0) -> torch.Tensor:
    """g~ for every row of ``w`` (rows x len)."""
    if kind == "sphere":  # g - (<w,g>/||w||^2) w
        return g - (_dot(w, g) / _dot(w, w)) * w
    if kind == "psi":  # ||w||^2 g  (PSI eq. 7)
        return _dot(w, w) * g
    return g + weight_decay * w if weight_decay else g


def retract(kind: str, w: torch.Tensor, xi: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """R_w(xi): sphere rho (w+xi)/||w+xi||; psi and Euclidean w + xi."""
    y = w + xi
    if kind == "sphere":
        return radius * y / y.norm(dim=1, keepdim=True)
    return y


def transport(kind: str, w_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """T(m) at the new point: projection onto its tangent space for the sphere."""
    if kind == "sphere":
        return m - (_dot(w_new, m) / _dot(w_new, w_new)) * w_new
    return m


# ---- SPEC §2: Stiefel blocks (p x n, rows orthonormal times the radius) ------------

def stiefel_project(w: torch.Tensor, z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """z - sym(z Wb^T) Wb with Wb = w / rho, for blocks (B, p, n); rho (B, 1, 1)."""
    wb = w / rho
    s = z @ wb.transpose(-1, -2)
    return z - 0.5 * (s + s.transpose(-1, -2)) @ wb


def stiefel_retract(y: torch.Tensor, rho: torch.Tensor, method: str):
    """rho times the orthonormal factor of y's rows: QR with positive diagonal, or the polar
    factor U V^T. Returns (blocks, ok) with ok False for rank-deficient blocks.

    On a GPU the step must not wait for the host, and torch.linalg.svd/qr there check their
    solver's status on the host: CUDA blocks take `stiefel_retract_no_sync` (same factors)."""
    if y.is_cuda:
        return stiefel_retract_no_sync(y, rho, method)
    # a block held for a non-finite gradient (or an overflowing move) is factored as zeros,
    # rank-deficient: LAPACK's SVD raises on a non-finite input instead of failing that block
    finite = torch.isfinite(y).flatten(1).all(dim=1)
    y = torch.where(finite.view(-1, 1, 1), y, torch.zeros((), dtype=y.dtype))
    if method == "polar":
        u, sv, vh = torch.linalg.svd(y, full_matrices=False)
        q = u @ vh
        ok = sv.min(dim=-1).values > sv.max(dim=-1).values * (1e-12 if y.dtype == torch.float64 else 1e-6)
    else:
        qt, r = torch.linalg.qr(y.transpose(-1, -2))  # y^T = Q R, Q n x p
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        ok = (d != 0).all(dim=-1)
        q = (qt * torch.where(d < 0, -1.0, 1.0).to(y.dtype).unsqueeze(-2)).transpose(-1, -2)
    return rho * q, ok & finite


def stiefel_retract_no_sync(y: torch.Tensor, rho: torch.Tensor, method: str, newton_steps: int = 12):
    """`stiefel_retract` from ops that never read a result on the host (the `_ex` solvers do not
    check their status): twice Cholesky QR gives y = L Q with L lower triangular, positive
    diagonal (y^T = Q^T L^T is the QR of y^T: the same Q); the polar factor of y is then U Q
    with U the orthogonal polar factor of the p x p matrix L, by Newton's iteration
    X <- (z X + (z X)^-T) / 2 with Frobenius scaling z, a fixed number of steps (quadratic
    convergence: 12 steps reach rounding for condition numbers far beyond a retraction's).
    ok: both Cholesky factorisations succeeded, L's diagonal spread within the rank tolerance
    of `stiefel_retract`, and the result is finite."""
    tol = 1e-12 if y.dtype == torch.float64 else 1e-6
    l1, info1 = torch.linalg.cholesky_ex(y @ y.transpose(-1, -2))
    q1 = torch.linalg.solve_triangular(l1, y, upper=False)
    l2, info2 = torch.linalg.cholesky_ex(q1 @ q1.transpose(-1, -2))
    q = torch.linalg.solve_triangular(l2, q1, upper=False)
    diag = torch.diagonal(l1, dim1=-2, dim2=-1)
    ok = (info1 == 0) & (info2 == 0) & (diag.amin(dim=-1) > diag.amax(dim=-1) * tol)
    if method == "polar":
        x = l2 @ l1  # y = x q, x lower triangular
        for _ in range(newton_steps):
            x_inv, _info = torch.linalg.inv_ex(x)
            z = torch.sqrt(torch.linalg.matrix_norm(x_inv) / torch.linalg.matrix_norm(x)).unsqueeze(-1).unsqueeze(-1)
            x = 0.5 * (z * x + x_inv.transpose(-1, -2) / z)
        q = x @ q
    ok = ok & torch.isfinite(q).flatten(1).all(dim=1)
    return rho * torch.where(ok.view(-1, 1, 1), q, y), ok


def orthonormalize_blocks(w: torch.Tensor, rho: torch.Tensor):
    """Construction-time placement on the Stiefel manifold; returns (blocks, ok)."""
    return stiefel_retract(w, rho, "qr")


# ---- SPEC §3 step 2: adaptive scale ----------------------------------------------

def adaptive_scale(mode: str, R: torch.Tensor, curvature: float, distance: float) -> torch.Tensor:
    """s_G = 1 / r_G from the group gradient norm R_G (FG-SGD eq. 5 and 7)."""
    if mode == "none":
        return torch.ones_like(R)
    if mode == "sphere":
        r = torch.clamp(R * (2 + R), min=1.0)
    else:
        inner = torch.maximum((2 * distance + R) ** 2, 1 + curvature * (distance + R))
        r = torch.sqrt(torch.clamp(R * R * inner, min=1.0))
    return 1.0 / r


def _rows_finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).all(dim=1)


def _group_sums(g_t: torch.Tensor, ok: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """R_G² = Σ_{i∈G} ‖g̃_i‖² per group; NaN for a group with a non-finite row."""
    nan = torch.full((), float("nan"), dtype=g_t.dtype, device=g_t.device)
    sq = torch.where(ok, (g_t * g_t).sum(dim=1), nan)
    return torch.zeros(n_groups, dtype=g_t.dtype, device=g_t.device).index_add_(0, group_ids, sq)


def group_sq_sums(kind: str, w: torch.Tensor, g: torch.Tensor, group_ids: torch.Tensor,
                  n_groups: int) -> torch.Tensor:
    """The per-group sums of step 2 for these rows alone, as ``step_rows`` forms them (math
    dtype; NaN for a group with a non-finite row): what a distributed run all-reduces."""
    dt = math_dtype(w.dtype)
    w0, g0 = w.to(dt), g.to(dt)
    g_t = riemannian_grad(kind, w0, g0)
    return _group_sums(g_t, _rows_finite(g0) & _rows_finite(g_t), group_ids, n_groups)


# ---- SPEC §3: the step on one tensor --------------------------------------------

def step_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    m: Optional[torch.Tensor],
    *,
    kind: str,
    fresh: bool,
    group_ids: Optional[torch.Tensor],
    n_groups: int,
    radius: Optional[torch.Tensor],
    opt: StepOptions,
    block_rows: int = 1,
    reduce_group_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    rounding_key: Optional[int] = None,
) -> torch.Tensor:
    """One step on a tensor viewed as rows, in place. Returns a bool mask of rows left unchanged.

    ``w``, ``g``: (rows, len) in the parameter dtype; ``m``: (rows, len) in the math dtype
    or None without momentum; ``group_ids``: group index of each row (needed when the
    step is adaptive); ``radius``: per-row radius (rows,) or None for 1; ``block_rows``: p of
    each p x n Stiefel block (a Stiefel "row" is one block, flattened).
    A row is left unchanged when its gradient (or the step it would take) is not finite;
    with an adaptive step its whole group is, since the rows share one scale.
    ``reduce_group_sums``: applied to the per-group ``Σ ‖g̃_i‖²`` of these rows before the
    scale is taken (NaN marks a group with a non-finite row); a distributed run sums them
    over ranks there.
    ``rounding_key``: bfloat16 ``w`` only: the new weights are rounded stochastically with the
    bits of this key (:func:`rounding_key`) and each element's index ``row * len + column``
    in these rows, as the kernels do; None rounds to nearest.
    """
    if rounding_key is not None and w.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bfloat16 weights, not {w.dtype}")
    dt = math_dtype(w.dtype)
    w0 = w.to(dt)
    g0 = g.to(dt)
    rows = w0.shape[0]
    rho = torch.ones(rows, 1, dtype=dt, device=w.device) if radius is None else radius.to(dt).view(-1, 1)

    blocks = (rows, block_rows, w0.shape[1] // block_rows)

    # 1. Riemannian gradient
    if kind == "stiefel":
        g_t = stiefel_project(w0.view(blocks), g0.view(blocks), rho.view(-1, 1, 1)).reshape(w0.shape)
    else:
        g_t = riemannian_grad(kind, w0, g0, opt.weight_decay if kind == "euclidean" else 0.0)
    ok = _rows_finite(g0) & _rows_finite(g_t)

    # 2. adaptive scale per group (manifold rows only)
    if opt.adaptive != "none" and kind != "euclidean":
        S = _group_sums(g_t, ok, group_ids, n_groups)
        if reduce_group_sums is not None:  # rows of a group on several ranks (distributed.py)
            S = reduce_group_sums(S)
        ok = ~torch.isnan(S)[group_ids]  # one bad row holds its whole group
        s = adaptive_scale(opt.adaptive, S.sqrt(), opt.curvature, opt.distance)[group_ids].view(-1, 1)
        d = s * g_t
    else:
        d = g_t

    # 3. momentum
    if m is not None:
        m_new = d.clone() if fresh else opt.momentum * m + d
        u = d + opt.momentum * m_new if opt.nesterov else m_new
    else:
        m_new, u = None, d

    # 4. move and retract, 5. transport
    if kind == "stiefel":
        w_new, ok_r = stiefel_retract((w0 - opt.lr * u).view(blocks), rho.view(-1, 1, 1), opt.retraction)
        ok = ok & ok_r
        if m_new is not None:
            m_new = stiefel_project(w_new, m_new.view(blocks), rho.view(-1, 1, 1)).reshape(w0.shape)
        w_new = w_new.reshape(w0.shape)
    else:
        w_new = retract(kind, w0, -opt.lr * u, rho)
        if m_new is not None:
            m_new = transport(kind, w_new, m_new)
    # 6. PSI guard
    if kind == "psi":
        norm = w_new.norm(dim=1, keepdim=True)
        f = torch.where(norm > opt.psi_max_norm, 1.0 / norm, torch.ones_like(norm))
        w_new = w_new * f
        if m_new is not None:
            m_new = m_new * f

    ok = ok & _rows_finite(w_new)
    if m_new is not None:
        ok = ok & _rows_finite(m_new)
    keep = ok.view(-1, 1)
    w_out = torch.where(keep, w_new, w0)  # a kept row is bf16-exact: stochastic rounding keeps it
    w.copy_(w_out.to(w.dtype) if rounding_key is None else round_bf16_stochastic(w_out, rounding_key))
    if m is not None:
        m.copy_(torch.where(keep, m_new, m))
    return ~ok


# ---- SPEC §6: the Adam family on the same rows ----------------------------------------

SECOND_MOMENTS = ("row", "element")


@dataclass
class AdamOptions:
    algorithm: ClassVar[str] = "adam"
    lr: float
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # Euclidean rows only, decoupled (AdamW)
    second_moment: str = "row"  # manifold rows: one v per row (per Stiefel block), or per element
    retraction: str = "qr"  # Stiefel blocks


def second_moment_shape(kind: str, rows: int, row_len: int, second_moment: str) -> Tuple[int, ...]:
    """The shape of a tensor's ``v`` viewed as rows: Euclidean rows are AdamW (one ``v`` per
    element whatever ``second_moment`` says); manifold rows keep one per row with ``"row"``."""
    if kind == "euclidean" or second_moment == "element":
        return (rows, row_len)
    return (rows,)


def adam_rows(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    kind: str,
    step: int,
    radius: Optional[torch.Tensor],
    opt: AdamOptions,
    block_rows: int = 1,
    rounding_key: Optional[int] = None,
) -> torch.Tensor:
    """One ``ManifoldAdam`` step (SPEC §6) on a tensor viewed as rows, in place. Returns the
    bool mask of rows left unchanged (a non-finite gradient or result: w, m and v of the row
    are kept).

    ``w``, ``g``: (rows, len) in the parameter dtype; ``m``: (rows, len) and ``v``:
    :func:`second_moment_shape` in the math dtype, both zero before the first step; ``step``:
    this step's count t (from 1); ``radius``: per-row radius or None for 1; ``block_rows``: p
    of each p x n Stiefel block. PSI rows have no Adam step (SPEC §6)."""
    if kind == "psi":
        raise ValueError("the Adam family has no PSI step (SPEC §6)")
    if rounding_key is not None and w.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bfloat16 weights, not {w.dtype}")
    dt = math_dtype(w.dtype)
    w0, g0 = w.to(dt), g.to(dt)
    rows = w0.shape[0]
    rho = torch.ones(rows, 1, dtype=dt, device=w.device) if radius is None else radius.to(dt).view(-1, 1)
    blocks = (rows, block_rows, w0.shape[1] // block_rows)
    beta1, beta2 = opt.betas

    # 1. Riemannian gradient
    if kind == "stiefel":
        g_t = stiefel_project(w0.view(blocks), g0.view(blocks), rho.view(-1, 1, 1)).reshape(w0.shape)
    elif kind == "sphere":
        g_t = riemannian_grad(kind, w0, g0)
    else:
        g_t = g0
    ok = _rows_finite(g0) & _rows_finite(g_t)

    # 2. first moment, 3. second moment, 4. bias-corrected direction
    m_new = beta1 * m + (1 - beta1) * g_t
    if v.dim() == 2:
        v_new = beta2 * v + (1 - beta2) * g_t * g_t
        v_hat = v_new
    else:
        v_new = beta2 * v + (1 - beta2) * (g_t * g_t).sum(dim=1)
        v_hat = v_new.view(-1, 1)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    u = (m_new / bc1) / ((v_hat / bc2).sqrt() + opt.eps)

    # 5. direction in the tangent space, 6. move, retract, transport
    if kind == "euclidean":  # 7. AdamW: decoupled decay, then the move
        w_dec = w0 * (1 - opt.lr * opt.weight_decay) if opt.weight_decay else w0
        w_new = w_dec - opt.lr * u
    elif kind == "stiefel":
        if v.dim() == 2:
            u = stiefel_project(w0.view(blocks), u.view(blocks), rho.view(-1, 1, 1)).reshape(w0.shape)
        w_new, ok_r = stiefel_retract((w0 - opt.lr * u).view(blocks), rho.view(-1, 1, 1), opt.retraction)
        ok = ok & ok_r
        m_new = stiefel_project(w_new, m_new.view(blocks), rho.view(-1, 1, 1)).reshape(w0.shape)
        w_new = w_new.reshape(w0.shape)
    else:  # sphere
        if v.dim() == 2:
            u = riemannian_grad("sphere", w0, u)
        w_new = retract(kind, w0, -opt.lr * u, rho)
        m_new = transport(kind, w_new, m_new)

    v_ok = torch.isfinite(v_new) if v.dim() == 1 else _rows_finite(v_new)
    ok = ok & _rows_finite(w_new) & _rows_finite(m_new) & v_ok
    keep = ok.view(-1, 1)
    w_out = torch.where(keep, w_new, w0)
    w.copy_(w_out.to(w.dtype) if rounding_key is None else round_bf16_stochastic(w_out, rounding_key))
    m.copy_(torch.where(keep, m_new, m))
    v.copy_(torch.where(keep if v.dim() == 2 else ok, v_new, v))
    return ~ok


# ---- stochastic rounding of bfloat16 weights (csrc/core/stochastic_round.h) --------------
#
# The same counter-based bits as the kernels: a key per (seed, step, tensor), 16 bits per
# element from the element's index. Python ints for the key; for the elements, torch int64
# arithmetic, whose additions and multiplications wrap modulo 2^64 as uint64_t does, with
# logical right shifts made from arithmetic ones by masking the sign bits away.

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # the Weyl increment of sr_bits16


def _mix64_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def rounding_key(seed: int, step: int, tensor: int, first_element: int = 0) -> int:
    """The 64-bit key of stochastic_round.h's ``sr_key(seed, step, tensor)`` (seed, step and
    tensor taken modulo 2^64 like uint64_t), as an int in [0, 2^64).

    ``first_element`` shifts the element stream: the key of elements ``0, 1, ...`` of a slice
    that starts at element ``first_element`` of the tensor draws the tensor's bits for
    ``first_element, first_element + 1, ...`` (a shard of a distributed tensor)."""
    seed, step, tensor = seed & _M64, step & _M64, tensor & _M64
    key = _mix64_int(_mix64_int(seed ^ 0x6A09E667F3BCC909)
                     ^ _mix64_int((step * 0xD1B54A32D192ED03 + tensor) & _M64))
    return (key + (first_element & _M64) * _GOLDEN) & _M64


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _srl(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _i64(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def rounding_bits16(key: int, index: torch.Tensor) -> torch.Tensor:
    """``sr_bits16(key, index)``: 16 uniform bits (int64 in [0, 2^16)) per element index."""
    return _srl(_mix64(_i64(key) + (index.to(torch.int64) + 1) * _i64(_GOLDEN)), 48)


def round_bf16_stochastic(x: torch.Tensor, key: int, chunk: int = 1 << 20) -> torch.Tensor:
    """float32 values to bfloat16, each rounded up or down with probability proportional to
    nearness (``to_bf16_stochastic``), with the bits of ``key`` and the element's flat index
    in ``x``; infinities and NaN round to nearest, as in the kernels."""
    flat = x.to(torch.float32).contiguous().view(-1)
    out = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
    for i0 in range(0, flat.numel(), chunk):
        v = flat[i0:i0 + chunk]
        u = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        idx = torch.arange(i0, i0 + v.numel(), dtype=torch.int64, device=v.device)
        r = ((u + rounding_bits16(key, idx)) >> 16) & 0xFFFF
        r16 = torch.where(r >= 1 << 15, r - (1 << 16), r).to(torch.int16).view(torch.bfloat16)
        special = (u & 0x7F800000) == 0x7F800000
        out[i0:i0 + v.numel()] = torch.where(special, v.to(torch.bfloat16), r16)
    return out.view(x.shape)


def project_to_manifold(kind: str, w: torch.Tensor, radius: Optional[torch.Tensor],
                        block_rows: int = 1) -> torch.Tensor:
    """The construction-time placement of SPEC §3 (placement.place): sphere rows become
    rho w/||w||, Stiefel blocks of ``block_rows`` rows rho times an orthonormal factor; rows
    already on their manifold to rounding are left as they are."""
    from .placement import place  # placement builds on this module's retractions

    out, _ = place(kind, w.to(math_dtype(w.dtype)), radius, "rows", dtype=w.dtype, block_rows=block_rows)
    return out.to(w.dtype)
