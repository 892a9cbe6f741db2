"""What a bounded Lanczos basis (``max_basis``, thick restart) costs in products (~6 min, CPU).

    python bench/thick_restart.py

Single-vector Lanczos keeps its whole Krylov basis; ``max_basis`` bounds it and restarts
from the best Ritz vectors when it is full. For W1 (MLP 784-512-512-10, 20 SGD steps) and a
2-layer GPT (``bench/convergence.py``), this runs top-1 and top-10 at ``tol = 1e-3`` from
cold starts (three seeds) and top-1 from warm starts (the converged vector of the same
model, mixed with a random vector as the monitors do, three seeds), for several bounds.
It prints, per bound, the products (median and range), the largest relative error against
a 120-step full-basis reference (``tol = 1e-14``), whether every solve converged, and the
vectors the basis allocates at most (``max_basis``, or with no bound the doubling growth's
capacity, whose old and new buffers coexist while it grows). HVP counts do not depend on the
device. Writes ``bench/results/thick-restart-<date>.md``.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import workload  # noqa: E402
from run import reference_eigenvalues  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402
from spectral_callbacks.linalg.eigsh import default_max_iter  # noqa: E402

SEEDS = (0, 1, 2)
TOL = 1e-3
BOUNDS = {
    "top-1 cold": (1, (None, 24, 16, 12, 8, 6)),
    "top-1 warm": (1, (None, 12, 8, 6, 4)),
    "top-10 cold": (10, (None, 64, 48, 32, 24)),
}


def peak_growth_capacity(steps: int, limit: int) -> int:
    """Most vectors an unbounded basis holds at once over ``steps`` steps: it starts at 32 and
    doubles (capped at ``limit``), the old and the new buffer coexisting while it grows."""
    capacity = peak = min(limit, 32)
    while capacity < steps + 1:
        grown = min(limit, 2 * capacity)
        peak, capacity = capacity + grown, grown
    return peak


def rows_for(name: str) -> list[str]:
    model, batch, loss_fn = workload(name, torch.device("cpu"))[:3]
    reference = reference_eigenvalues(model, batch, loss_fn, k=10)
    rows = []
    with HessianOperator(model, loss_fn, batch) as op:
        warm = lanczos(op, k=1, tol=1e-8, max_iter=200, return_eigenvectors=True).eigenvectors
        for case, (k, bounds) in BOUNDS.items():
            for bound in bounds:
                hvps, errors, converged, allocated = [], [], True, 0
                for seed in SEEDS:
                    start = warm if case.endswith("warm") else None
                    result = lanczos(op, k=k, tol=TOL, seed=seed, start=start, max_basis=bound)
                    hvps.append(result.num_hvps)
                    error = (result.eigenvalues - reference[:k]).abs() / reference[:k].abs()
                    errors.append(float(error.max()))
                    converged &= result.all_converged
                    limit = default_max_iter(k) + 1
                    allocated = max(
                        allocated, bound or peak_growth_capacity(result.num_hvps, limit)
                    )
                rows.append(
                    f"| {name} | {case} | {bound or 'none'} | {statistics.median(hvps):.0f} "
                    f"({min(hvps)}-{max(hvps)}) | {max(errors):.1e} | {converged} | "
                    f"{allocated} |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.manual_seed(0)
    header = [
        f"# Bounded Lanczos basis (thick restart), {dt.date.today()}",
        "",
        f"`python bench/thick_restart.py`, CPU. `tol = {TOL}`, seeds {SEEDS}. Products: "
        "median (range). Error: largest relative error of the k values against a 120-step "
        "full-basis reference. Vectors: most basis vectors allocated at once (with no bound, "
        "the doubling growth's old and new buffers together).",
        "",
        "| model | solve | `max_basis` | products | error | all converged | vectors |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = header + rows_for("W1") + rows_for("gpt-small")
    out = ROOT / "bench" / "results" / f"thick-restart-{dt.date.today()}.md"
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
