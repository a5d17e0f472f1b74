"""``python -m autellix.sim ...``: the ``sim`` sub-command without the main CLI."""

from __future__ import annotations

import argparse
import sys

from autellix.sim.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autellix")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
