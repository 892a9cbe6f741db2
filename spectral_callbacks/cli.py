"""Command line: ``spectral-callbacks demo`` (also ``python -m spectral_callbacks demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import __version__  # the package's __init__ imports no torch

    parser = argparse.ArgumentParser(
        prog="spectral-callbacks",
        description="Spectral callbacks for PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train two small models on generated data and log their spectra to TensorBoard",
    )
    demo.add_argument("--out", default="runs/demo", help="log directory (default: runs/demo)")
    demo.add_argument("--fast", action="store_true", help="a smoke run of a few seconds")
    bars = demo.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars (default: only when the output is a terminal)",
    )
    bars.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        progress = args.progress or (not args.no_progress and sys.stdout.isatty())
        run_demo(args.out, fast=args.fast, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
