"""Run the ``ngpt`` demo: same as ``python -m manifold_sgd demo ngpt [options]``.

The implementation lives in ``manifold_sgd.demos`` (installed with the package);
see docs/RESULTS.md §5. Options: --quick, --seed N, --out DIR, --runs N,
--recipes gpt-adamw ngpt-unfused ngpt-fused-row ngpt-fused-element (the fused
ones need manifold_sgd.ManifoldAdam).
"""
import sys

from manifold_sgd.demos import main

if __name__ == "__main__":
    sys.exit(main(["ngpt", *sys.argv[1:]]))
