"""``python -m manifold_sgd bench|demo|info``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m manifold_sgd",
                                     description="manifold_sgd command line")
    parser.add_argument("command", choices=["bench", "demo", "info"],
                        help="bench: time one optimizer step against baselines; "
                             "demo: run a paper's experiment; info: build facts")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if args.command == "demo":
        from .demos import main as demo_main
        return demo_main(argv[1:])
    from . import native_info
    print(json.dumps(native_info(), indent=2))
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
