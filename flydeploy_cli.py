"""flydeploy_cli: the developer-side command line of flydeploy.

    python -m flydeploy_cli hot        build, push and hot-upgrade every machine
    python -m flydeploy_cli status     what every machine runs
    python -m flydeploy_cli rollback   back to an earlier hot upgrade

Standard library only; the work itself is done by ``flydeploy``.
"""

from __future__ import annotations

import argparse
import sys

import flydeploy

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flydeploy_cli",
        description="Hot code upgrades for Python applications on Fly.io.",
    )
    parser.add_argument("--version", action="version", version=f"flydeploy {flydeploy.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
