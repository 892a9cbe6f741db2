"""What one Hessian-vector product costs with BatchNorm in train mode, as the monitors
measure by default, against eval mode (CPU: C1 about 2 minutes).

    python -m bench.train_mode_products --workloads C1
    python -m bench.train_mode_products --smoke      # the tiny workload (the test suite)

On a workload of ``bench/run.py`` (20 SGD steps), in eval mode (BatchNorm on its running
statistics) and in train mode (BatchNorm on the batch's own statistics: a different loss,
whose Hessian is the one ``SharpnessMonitor`` measures by default): the milliseconds of one
gradient and of one product by each path of
:class:`~spectral_callbacks.curvature.HessianOperator` (the first product, which also forms
the graph, left out), medians of ``repeats`` rounds that call each path once, and each
path's relative error against the reused graph's product.

Writes ``bench/results/train-mode-products-<device>-<date>.{json,md}``; runs of other
workloads on one day add to that file.
"""

from __future__ import annotations

import contextlib
import functools
import statistics

import torch

from bench.harness import gradient_ms, stopwatch
from bench.report import document
from bench.study import finish, study_parser, workload_names
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.workloads import make_workload

PATHS = ("reuse_graph", "forward_over_reverse", "gradient_difference")


def product_costs(name: str, repeats: int) -> dict:
    device = torch.device("cpu")
    model, batch, loss_fn = make_workload(name, device)
    row: dict = {"workload": name, "modes": {}}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        entry: dict = {"gradient_ms": gradient_ms(model, batch, loss_fn, device, repeats)}
        products, times = {}, {path: [] for path in PATHS}
        with contextlib.ExitStack() as stack:
            operators = {
                path: stack.enter_context(HessianOperator(model, loss_fn, batch, hvp=path))
                for path in PATHS
            }
            generator = torch.Generator().manual_seed(0)
            vector = torch.randn(operators["reuse_graph"].size, generator=generator)
            for path, op in operators.items():
                products[path] = op.matvec(vector)  # forms the graph: not timed
            for _ in range(repeats):  # interleaved: drift hits every path alike
                for path, op in operators.items():
                    seconds, _ = stopwatch(functools.partial(op.matvec, vector), device)
                    times[path].append(seconds)
        exact = products["reuse_graph"]
        for path in PATHS:
            ms = statistics.median(times[path]) * 1e3
            entry[path] = {
                "ms": ms,
                "gradients": ms / entry["gradient_ms"],
                "relative_error": float((products[path] - exact).norm() / exact.norm()),
            }
        row["modes"][mode] = entry
    model.eval()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    cells = [
        [row["workload"], mode, f"{entry['gradient_ms']:.0f}"]
        + [
            f"{entry[p]['ms']:.0f} ({entry[p]['gradients']:.1f}×; {entry[p]['relative_error']:.1e})"
            for p in PATHS
        ]
        for row in rows
        for mode, entry in row["modes"].items()
    ]
    description = (
        "Milliseconds of one gradient and of one product by each path (median of interleaved "
        "rounds; the graph-forming first product left out), in gradients, and the relative "
        "error against the reused graph's product. Train mode: BatchNorm on the batch's "
        "statistics, as the monitors measure by default."
    )
    title = "One Hessian-vector product in eval and train mode"
    return document(title, meta, description, ["workload", "mode", "gradient", *PATHS], cells)


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__, workloads=["C1"], repeats=5).parse_args(argv)
    repeats = 2 if args.smoke else args.repeats
    rows = [product_costs(name, repeats) for name in workload_names(args)]
    return finish("train-mode-products", rows, args, markdown, key=lambda row: row["workload"])


if __name__ == "__main__":
    main()
