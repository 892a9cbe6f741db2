"""The scaffold every study of ``bench/`` stands on: its arguments, run metadata, the
result file of the day and the printed table.

A study module defines what it measures (rows of plain values, timed through
:mod:`bench.harness`, whose stopwatch synchronises the device) and ``markdown(rows, meta)``;
its ``main`` is then::

    args = study_parser(__doc__, workloads=["C1"], repeats=5).parse_args(argv)
    rows = [measure(name, args.repeats) for name in workload_names(args)]
    return finish("my-study", rows, args, markdown, key=lambda row: row["workload"])

``--smoke`` runs the tiny workload in seconds (the test suite runs every study so) and writes
nothing; otherwise rows go to ``bench/results/{study}-{device}-{date}.{json,md}``, where a
later run of the same day replaces the rows of its keys and keeps the others. The two
studies whose results are one document rather than rows (``bench.run``'s figures,
``bench.weightwatcher_crosscheck``) take the same arguments and metadata and write their
day file through :func:`bench.report.write_day_file` with a merge of their own.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from bench.harness import run_meta
from bench.report import RESULTS, keyed_merge, record_day
from spectral_callbacks.workloads import WORKLOADS

__all__ = ["finish", "study_parser", "workload_names"]

Rows = list[dict]


def study_parser(
    doc: str | None,
    workloads: Sequence[str] | None = None,
    repeats: int | None = None,
    smoke_workloads: Sequence[str] = ("tiny",),
    smoke: str | None = "the smallest workloads, seconds; writes nothing",
    device: bool = False,
) -> argparse.ArgumentParser:
    """The arguments every study takes: ``--out``; ``--smoke`` (described by ``smoke``, left
    out where ``None``); ``--workloads`` (from the registry of
    :mod:`spectral_callbacks.workloads`) and ``--repeats`` where given a default; with
    ``device``, ``--device`` (CUDA where there is one, else the CPU)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if smoke is not None:
        parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if workloads is not None:
        parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(workloads))
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.set_defaults(smoke_workloads=list(smoke_workloads))
    return parser


def workload_names(args: argparse.Namespace) -> list[str]:
    """The workloads a run measures: the smoke ones under ``--smoke``, else ``--workloads``."""
    return list(args.smoke_workloads) if args.smoke else list(args.workloads)


def finish(
    study: str,
    rows: Rows,
    args: argparse.Namespace,
    markdown: Callable[[Rows, dict], str],
    key: Callable[[dict], object] | None = None,
    merge: Callable[[Rows, Rows], Rows] | None = None,
    device: torch.device | None = None,
) -> Rows:
    """Record ``rows`` in the day's file of ``study`` (rows of the same ``key`` replace
    earlier ones, or ``merge`` decides), unless ``--smoke``; print the table; return the rows
    of the file."""
    meta = run_meta(device or torch.device("cpu"))
    if not args.smoke:
        merge = merge or keyed_merge(key or (lambda row: repr(sorted(row.items()))))
        rows = record_day(study, meta, rows, args.out, merge, markdown)
    print(markdown(rows, meta))
    return rows
