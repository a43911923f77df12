"""Paper-reproduction demos: ``python -m manifold_sgd demo <name> [--quick] [--seed N] [--out DIR] [--runs N]``.

=================  ==============================================================
``un-archbn``      UN paper Table 2: ArchBN (2 and 4 layers), B-SGD vs UN
``psi-toy``        PSI paper §6.1 Fig. 4: gradient norm on a toy regression
``psi-unbalanced`` PSI paper Fig. 1: SGD vs PSI-SGD under unbalanced init
``fg-cnn``         FG-SGD: BN CNN on 8x8 digits, SGD / UN / FG-SGD PI, PO, PIO,
                   PO on 3x3 Stiefel kernels, PO on gamma/lambda-rescaled kernels
=================  ==============================================================

Each writes ``<out>/<name>.json`` and ``<out>/<name>.png`` and prints a table.
They need the ``demo`` extras (scikit-learn, tqdm, matplotlib); the data is
scikit-learn's bundled digits or synthetic, nothing is downloaded.
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
}

__all__ = ["DEMOS", "main", "run"]


def _module(name: str):
    return importlib.import_module(f".{DEMOS[name]}", __name__)


def run(name: str, argv: Optional[List[str]] = None) -> dict:
    """Run one demo with command-line style arguments; return its result dict."""
    from . import _common
    mod = _module(name)
    args = _common.parser(name, mod.__doc__.splitlines()[0]).parse_args(list(argv or []))
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
    print(mod.format_table(run(argv[0], argv[1:])))
    return 0
