"""Parameters coming from geoopt: ``geoopt.ManifoldParameter`` / ``ManifoldTensor``.

A geoopt tensor says which manifold it lives on, and the optimizer follows it:

- ``geoopt.Sphere()`` (and ``SphereExact``): sphere rows **along the last dim**, which is how
  geoopt defines its sphere (``Sphere.ndim == 1``: ``projx(x) = x / x.norm(dim=-1)``). For a
  2-D tensor that is the same as ``granularity="filter"``; for a conv-shaped tensor it is
  not (geoopt's rows are the last-dim fibres, ``numel / shape[-1]`` rows of ``shape[-1]``).
  ``SphereExact`` retracts by the exponential map in geoopt; here every sphere uses the
  projection retraction of SPEC §2 (same manifold, a different retraction).
- ``geoopt.Euclidean`` (geoopt's default manifold): Euclidean in a ``manifold="auto"`` group,
  as in geoopt; a group that names a manifold explicitly decides for itself.
- a sphere restricted to a subspace (``Sphere(intersection=...)``, ``Sphere(complement=...)``),
  ``Scaled(...)`` and every other geoopt manifold: a clear ValueError.
- ``geoopt.Stiefel`` (Canonical/Euclidean): a clear ValueError. ``manifold="stiefel"`` exists
  for plain tensors, but its blocks have orthonormal *rows* (SPEC §2: ``p x n``, ``W Wᵀ = I``),
  while a geoopt Stiefel point is ``(..., n, p)`` with orthonormal *columns* (``Xᵀ X = I``):
  stepping one as the other would be wrong, and the transposed view is not stepped in place.

The group's ``granularity`` does not apply to a geoopt sphere; ``grouping`` must be ``row``
or ``tensor`` (PO/PI/PIO are defined on filter/kernel rows). A group that sets
``manifold="psi"`` or ``"euclidean"`` explicitly for a geoopt sphere parameter is an error
(the parameter says it lives on a sphere); ``"auto"`` and ``"sphere"`` follow geoopt.

geoopt is never imported here: a geoopt tensor can only exist once the program imported it.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

#: rows along the last dim (see grouping.row_shape)
LAST_DIM = "last"


def manifold_of(p, group_manifold: str, name: str = "parameter") -> Optional[Tuple[str, str]]:
    """(kind, granularity) that a geoopt tensor dictates, or None to follow the param group."""
    geoopt = sys.modules.get("geoopt")
    if geoopt is None:
        return None
    manifold = getattr(p, "manifold", None)
    if manifold is None or not isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)):
        return None
    if isinstance(manifold, geoopt.Euclidean):
        # geoopt's default, i.e. "unconstrained": Euclidean under "auto", else the group decides
        return ("euclidean", "filter") if group_manifold == "auto" else None
    if isinstance(manifold, geoopt.Sphere):
        if getattr(manifold, "projector", None) is not None:
            raise ValueError(f"{name}: geoopt {type(manifold).__name__} restricted to a subspace "
                             f"is not supported (only the full sphere)")
        if group_manifold not in ("auto", "sphere"):
            raise ValueError(f"{name}: a geoopt {type(manifold).__name__} parameter in a group with "
                             f"manifold={group_manifold!r}; use 'auto' or 'sphere', or a plain tensor")
        return "sphere", LAST_DIM
    if isinstance(manifold, geoopt.Stiefel):
        return _stiefel_hook(p, manifold, group_manifold, name)
    raise ValueError(f"{name}: geoopt manifold {type(manifold).__name__} is not supported by "
                     f"manifold_sgd (supported: Sphere, SphereExact, Euclidean)")


def _stiefel_hook(p, manifold, group_manifold: str, name: str) -> Optional[Tuple[str, str]]:
    """A geoopt Stiefel point has orthonormal columns; ours have orthonormal rows (see the
    module doc). Refused, with what to do instead."""
    raise ValueError(f"{name}: geoopt {type(manifold).__name__} parameters are not supported: geoopt's "
                     f"Stiefel points (..., n, p) have orthonormal columns, manifold='stiefel' keeps the "
                     f"rows of p x n blocks orthonormal; use a plain tensor holding the transposed weight "
                     f"with manifold='stiefel'")
