"""λ_max of a bfloat16 model: what a solve costs and how accurate it is when ``tol`` is
below the products' own error, with the solvers' stop at that floor against the whole
budget (the rule before 2026-12-06) (CPU: C1 about 4 minutes).

    python -m bench.half_precision --workloads C1
    python -m bench.half_precision --smoke           # the tiny workload (the test suite)

On a workload of ``bench/run.py`` (20 SGD steps, eval mode) cast to bfloat16, λ_max at
``tol = 1e-3`` (the monitors' default; bfloat16 products carry about 3.9 % of the scale)
from a cold start, by the exact path (``hvp="auto"``) and by gradient differences, for
seeds 0 and 1, each solved twice: as the solvers stop now (once every unconverged pair is
held at the products' floor and its value holds still) and with that stop switched off
(``budget``). Per solve: products, seconds, the value's relative error against the same
bfloat16 weights in float32 (exact path, ``tol = 1e-6``), its stated relative bound and
whether it converged.

Writes ``bench/results/half-precision-<device>-<date>.{json,md}``; runs of other workloads
on one day add to that file.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from unittest import mock

import torch

from bench.harness import stopwatch
from bench.report import document
from bench.study import finish, study_parser, workload_names
from spectral_callbacks.functional import hessian_eigenvalues
from spectral_callbacks.linalg import eigsh
from spectral_callbacks.workloads import make_workload

PATHS = ("auto", "gradient_difference")
RULES = ("stop at floor", "budget")
TOL = 1e-3


def _rule(rule: str) -> contextlib.AbstractContextManager:
    """The solvers as they are, or with the stop at the products' floor switched off."""
    if rule == "budget":
        return mock.patch.object(eigsh._RitzPairs, "stalled_since", lambda self, previous: False)
    return contextlib.nullcontext()


def solves(name: str, seeds: tuple[int, ...]) -> dict:
    device = torch.device("cpu")
    model, batch, loss_fn = make_workload(name, device)
    low = copy.deepcopy(model).to(torch.bfloat16)
    low_batch = (batch[0].to(torch.bfloat16), batch[1])
    # The reference: the bfloat16 weights themselves, in float32 arithmetic.
    reference = copy.deepcopy(low).float()
    exact = float(hessian_eigenvalues(reference, loss_fn, batch, k=1, tol=1e-6).eigenvalues[0])
    row: dict = {"workload": name, "reference": exact, "solves": []}
    for path in PATHS:
        for seed in seeds:
            for rule in RULES:  # interleaved: drift hits both rules alike
                with _rule(rule), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    seconds, result = stopwatch(
                        lambda path=path, seed=seed: hessian_eigenvalues(
                            low, loss_fn, low_batch, k=1, tol=TOL, hvp=path, seed=seed
                        ),
                        device,
                    )
                value = float(result.eigenvalues[0])
                row["solves"].append(
                    {
                        "path": path,
                        "seed": seed,
                        "rule": rule,
                        "products": int(result.num_hvps),
                        "seconds": seconds,
                        "relative_error": abs(value - exact) / abs(exact),
                        "relative_bound": float(result.errors[0]) / abs(value),
                        "converged": bool(result.converged[0]),
                    }
                )
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    cells = [
        [
            row["workload"],
            solve["path"],
            str(solve["seed"]),
            solve["rule"],
            str(solve["products"]),
            f"{solve['seconds']:.2f}",
            f"{solve['relative_error']:.2g}",
            f"{solve['relative_bound']:.2g}",
            str(solve["converged"]),
        ]
        for row in rows
        for solve in row["solves"]
    ]
    description = (
        f"λ_max of the bfloat16 model at tol={TOL:g} from a cold start; error against the same "
        "bfloat16 weights in float32 (exact path, tol 1e-6); bound as stated by the solver "
        "(relative). `budget`: the stop at the products' floor switched off (the rule before "
        "2026-12-06)."
    )
    header = ["workload", "path", "seed", "rule", "products", "seconds", "error", "bound"]
    return document("λ_max of bfloat16 models", meta, description, [*header, "converged"], cells)


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__, workloads=["C1"]).parse_args(argv)
    seeds = (0,) if args.smoke else (0, 1)
    rows = [solves(name, seeds) for name in workload_names(args)]
    return finish("half-precision", rows, args, markdown, key=lambda row: row["workload"])


if __name__ == "__main__":
    main()
