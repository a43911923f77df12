"""Paper-reproduction demos: ``python -m manifold_sgd demo <name> [--quick] [--seed N] [--out DIR] [--runs N]``.

=================  ==============================================================
``un-archbn``      UN paper Table 2: ArchBN (2 and 4 layers), B-SGD vs UN
``psi-toy``        PSI paper §6.1 Fig. 4: gradient norm on a toy regression
``psi-unbalanced`` PSI paper Fig. 1: SGD vs PSI-SGD under unbalanced init
``fg-cnn``         FG-SGD: BN CNN on 8x8 digits, SGD / UN / FG-SGD PI, PO, PIO,
                   PO on 3x3 Stiefel kernels, PO on gamma/lambda-rescaled kernels
``ngpt``           nGPT (normalized transformer) vs pre-LN GPT on Python's own
                   stdlib source, byte-level: AdamW + renormalise vs
                   ManifoldAdam (``--recipes`` picks; the fused ones need it)
=================  ==============================================================

Each writes ``<out>/<name>.json`` and ``<out>/<name>.png`` and prints a table.
They need the ``demo`` extras (scikit-learn, tqdm, matplotlib); the data is
scikit-learn's bundled digits, synthetic, or (ngpt) the ``.py`` files of the
standard library of the Python that runs it; nothing is downloaded. A demo
module may define ``add_arguments(parser)`` for options of its own.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

DEMOS = {
    "un-archbn": "un_archbn",
    "psi-toy": "psi_toy",
    "psi-unbalanced": "psi_unbalanced",
    "fg-cnn": "fg_cnn",
    "ngpt": "ngpt",
}

__all__ = ["DEMOS", "main", "run"]


def _module(name: str):
    return importlib.import_module(f".{DEMOS[name]}", __name__)


def run(name: str, argv: Optional[List[str]] = None) -> dict:
    """Run one demo with command-line style arguments; return its result dict."""
    from . import _common
    mod = _module(name)
    p = _common.parser(name, mod.__doc__.splitlines()[0])
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
    args = p.parse_args(list(argv or []))
    return mod.run(args)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in DEMOS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown demo {argv[0]!r}; choose one of {', '.join(DEMOS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        mod = _module(argv[0])
    except ImportError as e:  # a missing optional dependency
        print(f"demo {argv[0]!r} needs the demo extras (pip install 'manifold_sgd[demo]'): {e}",
              file=sys.stderr)
        return 1
    from ._common import Unavailable
    try:
        result = run(argv[0], argv[1:])
    except Unavailable as e:
        print(f"demo {argv[0]!r}: {e}", file=sys.stderr)
        return 1
    print(mod.format_table(result))
    return 0
