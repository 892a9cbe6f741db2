"""The edge of stochastic stability (Andreyev & Beneventano 2024) on a CPU-sized workload:
under mini-batch SGD batch sharpness rises to about ``2/η`` and hovers there, while the
full-batch λ_max stays below it (CPU: about 2 minutes).

    python -m bench.batch_sharpness                      # batch sizes 32 and 128
    python -m bench.batch_sharpness --smoke              # seconds (the test suite)

A tanh MLP ``d``-``width``-``width``-1 (:class:`~spectral_callbacks.workloads.TanhRegressor`)
memorises ``n`` random targets ``y ~ N(0, 1)`` of Gaussian inputs (MSE) with plain SGD at
learning rate ``η`` for ``steps`` steps at each batch size, from the same initialisation:
a task hard enough that the loss sharpens for thousands of steps (on an easy teacher
regression it fits before it sharpens, and neither quantity nears the edge). Beside
training, :class:`~spectral_callbacks.BatchSharpnessMonitor` measures ``q(B)`` on the
training batch every ``--every`` steps (its ``window`` averages the last 10 measured
batches) and :class:`~spectral_callbacks.SharpnessMonitor` the full-batch λ_max on the
whole training set every ``--full-every`` steps. Both are reported as ``· η / 2``: 1.0 is
the edge.

Writes ``bench/results/batch-sharpness-<device>-<date>.{json,md}`` (one row per batch size
and η; runs of other batch sizes on one day add to it) and, unless ``--smoke``, the figure
``docs/batch-sharpness.png`` of every row of that file.
"""

from __future__ import annotations

import pathlib
import statistics
import warnings

import torch

from bench.harness import bare_trainer, stopwatch
from bench.report import document
from bench.study import finish, study_parser
from spectral_callbacks import BatchSharpnessMonitor, SharpnessMonitor
from spectral_callbacks.workloads import TanhRegressor, teacher_regression

FIGURE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "batch-sharpness.png"
BATCH = "spectral/hessian/batch_sharpness"
LAMBDA = "spectral/hessian/lambda_max"


def train(batch_size: int, args) -> dict:
    """One SGD run at ``batch_size``; the histories of both monitors as ``· η / 2``."""
    x, _ = teacher_regression(n=args.n, d=args.d, seed=0)
    y = torch.randn(args.n, 1, generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
    )
    batch_monitor = BatchSharpnessMonitor(every_n_steps=args.every, window=10)
    batch_monitor.history_size = args.steps // args.every + 1  # every value, for the figure
    full_monitor = SharpnessMonitor(every_n_steps=args.full_every, probe_data=(x, y), tol=1e-4)
    torch.manual_seed(1)
    model = TanhRegressor(lr=args.lr, d=args.d, width=args.width)
    trainer = bare_trainer(torch.device("cpu"), [batch_monitor, full_monitor], max_steps=args.steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, _ = stopwatch(lambda: trainer.fit(model, loader), torch.device("cpu"))
    edge = args.lr / 2
    batch = [(step, values[BATCH] * edge) for step, values in batch_monitor.history]
    full = [(step, values[LAMBDA] * edge) for step, values in full_monitor.history]
    late = args.steps // 2
    late_batch = [v for step, v in batch if step >= late]
    late_full = [v for step, v in full if step >= late]
    overhead = batch_monitor.history[-1][1][BATCH + "_overhead"]
    return {
        "batch_size": batch_size,
        "lr": args.lr,
        "steps": args.steps,
        "seconds": seconds,
        "batch_sharpness_late_mean": statistics.fmean(late_batch),
        "batch_sharpness_late_range": [min(late_batch), max(late_batch)],
        "lambda_max_late_mean": statistics.fmean(late_full),
        "lambda_max_late_range": [min(late_full), max(late_full)],
        "batch_monitor_overhead": overhead,
        "batch_history": batch,
        "lambda_max_history": full,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    cells = [
        [
            str(row["batch_size"]),
            f"{row['lr']:g}",
            str(row["steps"]),
            f"{row['batch_sharpness_late_mean']:.2f} "
            f"({row['batch_sharpness_late_range'][0]:.2f}–{row['batch_sharpness_late_range'][1]:.2f})",
            f"{row['lambda_max_late_mean']:.2f} "
            f"({row['lambda_max_late_range'][0]:.2f}–{row['lambda_max_late_range'][1]:.2f})",
            f"{100 * row['batch_monitor_overhead']:.1f} %",
        ]
        for row in rows
    ]
    description = (
        "Plain SGD memorising random targets (tanh MLP, MSE) at each batch size from one "
        "initialisation. Over the second half of training: batch sharpness (mean of q(B) over "
        "the last 10 measured batches) and the full-batch λ_max on the whole training set, "
        "both times η/2 (1.0 = the edge 2/η): the mean and the range of the measured values. "
        "The last column is the share of training time BatchSharpnessMonitor spent."
    )
    header = ["batch", "η", "steps", "batch sharpness · η/2", "λ_max · η/2", "monitor share"]
    title = "Batch sharpness and full-batch λ_max under mini-batch SGD"
    return document(title, meta, description, header, cells)


def figure(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(rows), figsize=(4.2 * len(rows), 3.6), sharey=True, squeeze=False
    )
    for ax, row in zip(axes[0], rows, strict=True):
        ax.plot(*zip(*row["batch_history"], strict=True), label="batch sharpness · η/2")
        ax.plot(*zip(*row["lambda_max_history"], strict=True), label="full-batch λ_max · η/2")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="edge (2/η)")
        ax.set_title(f"SGD, batch {row['batch_size']}, η = {row['lr']:g}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("value × η/2 (1 = edge)")
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = study_parser(__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--every", type=int, default=20, help="steps between q(B)")
    parser.add_argument("--full-every", type=int, default=200, help="steps between λ_max")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.steps, args.every, args.full_every = [8], 40, 10, 10
        args.n, args.width = 64, 16
    rows = [train(size, args) for size in args.batch_sizes]
    rows = finish(
        "batch-sharpness", rows, args, markdown, key=lambda row: (row["batch_size"], row["lr"])
    )
    if not args.smoke:  # every row of the day's file, one panel per batch size
        figure(sorted(rows, key=lambda row: (row["lr"], row["batch_size"])), FIGURE)
    return rows


if __name__ == "__main__":
    main()
