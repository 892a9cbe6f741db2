"""What a smaller probe saves and what it costs in accuracy: the top Hessian eigenvalue on
part of a workload's batch against the whole batch (CPU: C1 and G1 about 4 minutes each).

    python -m bench.probe_size --workloads C1 G1
    python -m bench.probe_size --smoke           # the tiny workload (the test suite)

The monitors' default probe is one training batch. On a workload of ``bench/run.py``
(20 SGD steps, eval mode), ``λ_max`` is computed to ``tol = 1e-4`` on the whole batch and on
the disjoint sub-batches that split it into 2 and 4 parts (C1: 64 and 32 images of 128; G1:
4 and 2 sequences of 8). For each split: the products and seconds of one top-1 solve
(``tol = 1e-3``, as ``SharpnessMonitor`` runs it, median over the parts) and the relative
error of each part's ``λ_max`` against the whole batch's (the largest over the parts, and
their mean signed error: a smaller batch's loss is sharper, so the error has a sign).

Writes ``bench/results/probe-size-<device>-<date>.{json,md}``; runs of other workloads on
one day add to that file.
"""

from __future__ import annotations

import statistics

import torch

from bench.harness import gradient_ms, stopwatch
from bench.report import document
from bench.study import finish, study_parser, workload_names
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import eigenpairs
from spectral_callbacks.workloads import make_workload


def split_batch(batch: tuple, parts: int) -> list[tuple]:
    """``parts`` disjoint sub-batches of equal size (the batch's first dimension)."""
    size = batch[0].shape[0] // parts
    return [tuple(t[i * size : (i + 1) * size] for t in batch) for i in range(parts)]


def top_eigenvalue(model, loss_fn, batch, tol: float) -> tuple[float, int, float]:
    """(λ_max, products, seconds) of one cold top-1 solve on ``batch``."""
    with HessianOperator(model, loss_fn, batch) as op:
        seconds, result = stopwatch(lambda: eigenpairs(op, k=1, tol=tol), op.device)
        return float(result.eigenvalues[0]), int(result.num_hvps), seconds


def probe_sizes(name: str, splits: tuple[int, ...] = (1, 2, 4)) -> dict:
    device = torch.device("cpu")
    model, batch, loss_fn = make_workload(name, device)
    grad_ms = gradient_ms(model, batch, loss_fn, device, repeats=3)
    reference, _, _ = top_eigenvalue(model, loss_fn, batch, tol=1e-4)
    row: dict = {
        "workload": name,
        "batch": int(batch[0].shape[0]),
        "gradient_ms": grad_ms,
        "reference": reference,
        "splits": [],
    }
    for parts in splits:
        values, products, seconds = [], [], []
        for part in split_batch(batch, parts):
            value, _, _ = top_eigenvalue(model, loss_fn, part, tol=1e-4)
            _, count, elapsed = top_eigenvalue(model, loss_fn, part, tol=1e-3)
            values.append(value)
            products.append(count)
            seconds.append(elapsed)
        errors = [(v - reference) / abs(reference) for v in values]
        row["splits"].append(
            {
                "parts": parts,
                "samples": int(batch[0].shape[0]) // parts,
                "values": values,
                "max_abs_error": max(abs(e) for e in errors),
                "mean_error": statistics.mean(errors),
                "products": statistics.median(products),
                "seconds": statistics.median(seconds),
                "gradient_times": statistics.median(seconds) * 1e3 / grad_ms,
            }
        )
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    header = ["workload", "probe (of batch)", "λ_max of the parts", "largest error"]
    header += ["mean error", "products", "seconds", "gradient-times"]
    cells = [
        [
            row["workload"],
            f"{split['samples']} of {row['batch']}",
            ", ".join(f"{v:.4g}" for v in split["values"]),
            f"{split['max_abs_error']:.1e}",
            f"{split['mean_error']:+.1e}",
            f"{split['products']:.0f}",
            f"{split['seconds']:.2f}",
            f"{split['gradient_times']:.1f}",
        ]
        for row in rows
        for split in row["splits"]
    ]
    description = (
        "λ_max (tol 1e-4) on disjoint parts of the workload's batch against the whole "
        "batch; cost of one top-1 solve at tol 1e-3 (median over the parts; gradient-times "
        "in gradients of the whole batch)."
    )
    return document("Probe size and the top eigenvalue", meta, description, header, cells)


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__, workloads=["C1", "G1"]).parse_args(argv)
    rows = [probe_sizes(name) for name in workload_names(args)]
    return finish("probe-size", rows, args, markdown, key=lambda row: row["workload"])


if __name__ == "__main__":
    main()
