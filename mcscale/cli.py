"""The `mcscale` command line: one subcommand per stage."""

from __future__ import annotations

import argparse
import sys

from mcscale import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcscale",
        description="Long-tailed deep clustering: MiniClustering, MaxiClustering, P2OT, BYOL pre-training.",
    )
    parser.add_argument("--version", action="version", version=f"mcscale {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
