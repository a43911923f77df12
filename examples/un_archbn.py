"""Run the ``un-archbn`` demo: same as ``python -m manifold_sgd demo un-archbn [options]``.

The implementation lives in ``manifold_sgd.demos`` (installed with the package);
see docs/RESULTS.md for what it reproduces. Options: --quick, --seed N, --out DIR, --runs N.
"""
import sys

from manifold_sgd.demos import main

if __name__ == "__main__":
    sys.exit(main(["un-archbn", *sys.argv[1:]]))
