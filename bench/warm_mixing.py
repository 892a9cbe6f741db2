"""Warm-started λ_max tracking during training: how much random mixing, which tolerance and
which stopping rule a measurement needs for an eigenvalue within 1e-3 (CPU: C1 about 6
minutes).

    python -m bench.warm_mixing --workloads C1
    python -m bench.warm_mixing --smoke           # the tiny workload (the test suite)

On a workload of ``bench/run.py`` (20 SGD steps), training goes on by full-batch SGD
(lr 0.05); every ``every`` steps the top eigenvalue is measured as ``SharpnessMonitor``
measures it: a Hessian operator on the batch and a single-vector Lanczos solve warm-started
from the eigenvector of the strategy's own previous measurement, the start mixed with a
random unit vector of weight ``w`` (:func:`~spectral_callbacks.linalg.lanczos`'s
``start_mixing``). Strategies:

- ``w = 1`` (the default of the solver, :data:`~spectral_callbacks.linalg.WARM_START_MIXING`);
- ``w = 0`` (pure warm start: the bound of any mixing rule);
- adaptive: ``w = clamp(sin θ, 0.05, 1)`` with ``θ`` the angle between the strategy's last
  two eigenvectors (how far the top eigenvector moved over the last interval; ``w = 1``
  until two are known);

each at ``tol = 1e-3`` and ``1e-2`` under both stopping rules of
:mod:`spectral_callbacks.linalg.eigsh`: ``"residual"`` (``‖H y − θ y‖ ≤ tol · θ``, the rule
before 2026-12-06) and ``"error"`` (the bound ``min(r, r²/δ)`` on the eigenvalue error, the
default since). The reference is a cold solve
at ``tol = 1e-5`` (``--reference-tol``). Per strategy: the median products and seconds of a
measurement (operator included, in gradients of the batch: "gradient-times"), and the
largest relative error of its eigenvalue against the reference.

With ``--train-mode`` the model stays in train mode: the Hessian is that of the train-mode
loss (BatchNorm on the batch's statistics), as the monitors measure by default, and
gradient-times are train-mode gradients; ``--strategies REGEX`` runs some strategies.

Writes ``bench/results/warm-mixing-<device>-<date>.{json,md}``; runs of other workloads or
modes on one day add to that file.
"""

from __future__ import annotations

import functools
import math
import re
import statistics

import torch

from bench.harness import gradient_ms, stopwatch
from bench.report import document
from bench.study import finish, study_parser, workload_names
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import WARM_START_MIXING, lanczos
from spectral_callbacks.workloads import make_workload

#: The adaptive rule's smallest mixing weight: a direction that overtakes the top one keeps
#: a component of at least this share of a random vector's in every start.
ADAPTIVE_FLOOR = 0.05

#: (label, tolerance, mixing rule, stopping rule). The adaptive and pure mixing rules were
#: measured on 2026-12-03 (no product saved: w = 1 stays) and run by --strategies only.
STRATEGIES = (
    ("w = 1, residual ≤ 1e-3", 1e-3, "one", "residual"),
    ("w = 1, error ≤ 1e-3", 1e-3, "one", "error"),
    ("w = 1, residual ≤ 1e-2", 1e-2, "one", "residual"),
    ("w = 1, error ≤ 1e-2", 1e-2, "one", "error"),
)
MORE_STRATEGIES = (
    ("adaptive, error ≤ 1e-3", 1e-3, "adaptive", "error"),
    ("w = 0, error ≤ 1e-3", 1e-3, "pure", "error"),
)


def mixing_weight(rule: str, previous: list[torch.Tensor]) -> float:
    """The weight of the random part for ``rule`` given the strategy's past eigenvectors."""
    if rule == "one":
        return WARM_START_MIXING
    if rule == "pure":
        return 0.0
    if len(previous) < 2:
        return WARM_START_MIXING
    cosine = float((previous[-1] @ previous[-2]).abs().clamp(max=1.0))
    return min(1.0, max(ADAPTIVE_FLOOR, math.sqrt(1.0 - cosine**2)))


def measure(
    model, loss_fn, batch, tol, start, mixing, seed, criterion="error"
) -> tuple[float, int, torch.Tensor]:
    """(λ_max, products, eigenvector) of one measurement: operator and solve."""
    with HessianOperator(model, loss_fn, batch) as op:
        result = lanczos(
            op,
            k=1,
            tol=tol,
            seed=seed,
            start=start,
            start_mixing=mixing,
            return_eigenvectors=True,
            criterion=criterion,
        )
        return float(result.eigenvalues[0]), int(op.num_hvps), result.eigenvectors[0]


def tracking(
    name: str,
    steps: int,
    every: int,
    reference_tol: float = 1e-5,
    train_mode: bool = False,
    strategies: tuple = STRATEGIES,
) -> dict:
    """Train ``name`` by SGD and measure every ``every`` steps by each of ``strategies``;
    with ``train_mode`` the Hessian is that of the train-mode loss (BatchNorm on batch
    statistics), as the monitors measure by default, and gradient-times are train-mode
    gradients."""
    device = torch.device("cpu")
    model, batch, loss_fn = make_workload(name, device)
    model.train(train_mode)
    grad_ms = gradient_ms(model, batch, loss_fn, device, repeats=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history: dict[str, list[torch.Tensor]] = {label: [] for label, *_ in strategies}
    records: dict[str, list[dict]] = {label: [] for label, *_ in strategies}
    references = []
    for step in range(steps + 1):
        if step % every == 0:
            model.train(train_mode)
            measurement = step // every
            reference, _, _ = measure(
                model, loss_fn, batch, reference_tol, None, 0.0, seed=1000 + step
            )
            references.append(reference)
            for label, tol, rule, criterion in strategies:  # interleaved: drift hits all
                previous = history[label]
                mixing = mixing_weight(rule, previous)
                start = previous[-1] if previous else None
                call = functools.partial(
                    measure, model, loss_fn, batch, tol, start, mixing, step, criterion
                )
                seconds, (value, products, vector) = stopwatch(call, device)
                previous.append(vector)
                if measurement > 0:  # the first one is cold for every strategy
                    records[label].append(
                        {
                            "step": step,
                            "mixing": mixing,
                            "products": products,
                            "seconds": seconds,
                            "error": abs(value - reference) / abs(reference),
                        }
                    )
            model.train()
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    rows = []
    for label, tol, rule, criterion in strategies:
        measured = records[label]
        seconds = statistics.median(r["seconds"] for r in measured)
        rows.append(
            {
                "strategy": label,
                "tol": tol,
                "rule": rule,
                "criterion": criterion,
                "measurements": len(measured),
                "median_products": statistics.median(r["products"] for r in measured),
                "median_seconds": seconds,
                "median_gradient_times": seconds * 1e3 / grad_ms,
                "max_error": max(r["error"] for r in measured),
                "over_1e-3": sum(r["error"] > 1e-3 for r in measured),
                "mixing": [r["mixing"] for r in measured],
            }
        )
    return {
        "workload": name,
        "steps": steps,
        "every": every,
        "reference_tol": reference_tol,
        "mode": "train" if train_mode else "eval",
        "gradient_ms": grad_ms,
        "references": references,
        "strategies": rows,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    header = ["workload, mode (reference tol)", "SGD steps (every)", "strategy", "products"]
    header += ["seconds", "gradient-times", "max error", "over 1e-3", "mixing weights"]
    cells = [
        [
            f"{row['workload']}, {row.get('mode', 'eval')} mode "
            f"({row.get('reference_tol', 1e-5):.0e})",
            f"{row['steps']} ({row['every']})",
            s["strategy"],
            f"{s['median_products']:.1f}",
            f"{s['median_seconds']:.2f}",
            f"{s['median_gradient_times']:.1f}",
            f"{s['max_error']:.1e}",
            f"{s['over_1e-3']} of {s['measurements']}",
            ", ".join(f"{w:.2g}" for w in s["mixing"]),
        ]
        for row in rows
        for s in row["strategies"]
    ]
    description = (
        "Per measurement (after the first, cold one): median products and seconds (operator "
        "included; gradient-times in gradients of the batch) and the largest relative error "
        "of λ_max against a cold solve (its tol in the first column), with how many "
        "measurements missed 1e-3."
    )
    title = "Warm-start mixing, tolerance and stopping rule in λ_max tracking"
    return document(title, meta, description, header, cells)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = study_parser(__doc__, workloads=["C1"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--reference-tol", type=float, default=1e-5)
    parser.add_argument("--train-mode", action="store_true", help="BatchNorm on batch statistics")
    parser.add_argument("--strategies", default=None, help="regular expression: only these")
    args = parser.parse_args(argv)
    everything = STRATEGIES + MORE_STRATEGIES
    chosen = (
        STRATEGIES
        if args.strategies is None
        else tuple(s for s in everything if re.search(args.strategies, s[0]))
    )
    if not chosen:
        parser.error(
            f"--strategies {args.strategies!r} matches none of {[s[0] for s in everything]}"
        )
    steps, every = (4, 2) if args.smoke else (args.steps, args.every)
    rows = [
        tracking(name, steps, every, args.reference_tol, args.train_mode, chosen)
        for name in workload_names(args)
    ]

    def key(row: dict) -> tuple:
        return (row["workload"], row["steps"], row["every"], row.get("mode", "eval"))

    return finish("warm-mixing", rows, args, markdown, key=key)


if __name__ == "__main__":
    main()
