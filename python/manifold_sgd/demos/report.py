"""Markdown tables of stored demo results: ``python -m manifold_sgd.demos.report DIR``.

docs/RESULTS.md's tables are this output for docs/results/; the tests run it on
quick results, so every field the page reads is checked to exist. Without names
it prints every demo that has a JSON in DIR.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

from . import DEMOS, _module


def load(out_dir: str, name: str) -> dict:
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        return json.load(f)


def table(out_dir: str, name: str) -> str:
    res = load(out_dir, name)
    head = (f"<!-- {name}: seed {res['seed']}, quick={res['quick']}, {res['wall_seconds']} s wall, "
            f"{res.get('cpu_seconds')} s CPU, "
            f"torch {res['machine']['torch']}, {res['machine']['cpu_count']} CPUs -->")
    return head + "\n" + _module(name).format_table(res)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = argv[0] if argv else "docs/results"
    names = argv[1:] or [n for n in DEMOS if os.path.exists(os.path.join(out_dir, f"{n}.json"))]
    for name in names:
        print(table(out_dir, name))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
