"""Guards against a skipped eigenvalue in single-vector top-k Lanczos (device-free).

    python bench/top_k_guards.py                       # ~3 min on 2 cores
    python bench/top_k_guards.py pair-0.01 triple      # synthetic spectra only, seconds

Single-vector Lanczos can stop with a wanted eigenvalue not yet in its Krylov space (its
component in the start vector is small): every Ritz value it has is converged, but the k-th
comes from further down. This replays candidate stopping rules on whole Lanczos trajectories
(one long recurrence per seed, Ritz values and residuals of every leading ``T_m``) and counts
the steps each needs and the solves that end outside the tolerance ("misses"):

* ``residual``: the solvers' rule, the top ``k`` residuals at most ``tol·|θ|``;
* ``guard-g``: the same for the top ``k + g`` Ritz values;
* ``interval``: also no unconverged Ritz value whose interval ``θ ± r`` reaches above ``θ_k``;
* ``stable-s``: also the top ``k`` values unchanged within ``tol`` over ``s`` more steps.

Trajectories have 110 steps on the models and 150 on synthetic spectra; "999" marks a rule
that did not stop within them. Prints one line per workload, ``k``, ``tol`` and rule.
"""

from __future__ import annotations

import math
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import DiagonalOperator, synthetic_spectrum, trajectory, workload  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402

RULES = (("residual", 0), ("guard", 1), ("guard", 2), ("interval", 0), ("stable", 4))
NOT_STOPPED = 999


def stops(row: dict, later: dict | None, k: int, tol: float, rule: str, arg: int) -> bool:
    values, residuals = torch.tensor(row["values"]), torch.tensor(row["residuals"])
    wanted = k + arg if rule == "guard" else k
    if values.numel() < wanted:
        return False
    if not bool((residuals[:wanted] <= tol * values[:wanted].abs()).all()):
        return False
    if rule == "interval":
        return bool((values[k:] + residuals[k:] <= values[k - 1]).all())
    if rule == "stable":
        if later is None:
            return False
        moved = (torch.tensor(later["values"][:k]) - values[:k]).abs()
        return bool((moved <= tol * values[:k].abs()).all())
    return True


def stop_step(rows: list[dict], k: int, tol: float, rule: str, arg: int) -> int:
    delay = arg if rule == "stable" else 0
    for m in range(k, len(rows) + 1):
        later = rows[m - 1 + delay] if m - 1 + delay < len(rows) else None
        if stops(rows[m - 1], later, k, tol, rule, arg):
            return m + delay
    return NOT_STOPPED


def trajectories(name: str) -> tuple[list[list[dict]], list[float]]:
    if name.startswith(("pair-", "power-")) or name == "triple":
        diagonal = synthetic_spectrum(name)
        op = DiagonalOperator(diagonal)
        reference = torch.sort(diagonal, descending=True).values[:12].tolist()
        starts = [
            torch.randn(
                op.size, generator=torch.Generator().manual_seed(s + 10), dtype=torch.float64
            )
            for s in range(20)
        ]
        return [trajectory(op, v, 150, s) for s, v in enumerate(starts)], reference
    model, batch, loss_fn = workload(name, torch.device("cpu"))
    with HessianOperator(model, loss_fn, batch) as op:
        reference = lanczos(op, k=12, tol=1e-14, max_iter=min(200, op.size)).eigenvalues.tolist()
        starts = [
            torch.randn(op.size, generator=torch.Generator().manual_seed(s)) for s in range(6)
        ]
        return [trajectory(op, v, 110, s) for s, v in enumerate(starts)], reference


def main() -> None:
    names = sys.argv[1:] or ["tiny", "gpt-small", "W1", "pair-0.01", "triple", "power-0.5"]
    for name in names:
        runs, reference = trajectories(name)
        for k, tol in ((1, 1e-3), (10, 1e-2), (10, 1e-3)):
            for rule, arg in RULES:
                steps = [stop_step(rows, k, tol, rule, arg) for rows in runs]
                errors = [
                    max(
                        abs(rows[m - 1]["values"][j] - reference[j]) / abs(reference[j])
                        for j in range(k)
                    )
                    for rows, m in zip(runs, steps, strict=True)
                    if m != NOT_STOPPED
                ]
                misses = sum(error > tol for error in errors)
                label = rule if rule in ("residual", "interval") else f"{rule}-{arg}"
                print(
                    f"{name:10s} k={k:2d} tol={tol:g} {label:9s} mean steps "
                    f"{sum(steps) / len(steps):6.1f}, max {max(steps):4d}, misses {misses} of "
                    f"{len(runs)}, max error {max(errors) if errors else math.nan:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
