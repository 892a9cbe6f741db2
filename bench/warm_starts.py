"""Warm starts with and without a random part: products and errors (device-free, ~4 min).

    python bench/warm_starts.py                    # tiny and gpt-small
    python bench/warm_starts.py tiny               # one workload

A warm start from the previous top eigenvectors lacks directions that were not among them,
such as an eigenvalue that rose into the top ``k`` (or overtook the top one); the solvers
therefore add a random unit vector (``WARM_START_MIXING``, 1.0). For each workload the model
takes 10 and then 30 more SGD steps; at each point top-1 and top-10 at ``tol = 1e-3`` are
solved from a random start, from the previous measurement's eigenvectors alone
(``WARM_START_MIXING = 0``) and mixed (1.0), three seeds each, against a 300-step
reference. Prints a markdown table.
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import workload  # noqa: E402
from run import sgd_steps  # noqa: E402

import spectral_callbacks.linalg.eigsh as eigsh  # noqa: E402
from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402

STARTS = (("cold", None), ("warm, pure", 0.0), ("warm, mixed", 1.0))


def main() -> None:
    print("| workload | SGD steps since last | k | start | products (3 seeds) | max rel. error |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or ["tiny", "gpt-small"]:
        model, batch, loss_fn = workload(name, torch.device("cpu"))
        with HessianOperator(model, loss_fn, batch) as op:
            previous = lanczos(op, k=10, tol=1e-3, return_eigenvectors=True).eigenvectors
        for steps in (10, 30):
            sgd_steps(model, batch, loss_fn, steps=steps)
            with HessianOperator(model, loss_fn, batch) as op:
                reference = lanczos(op, k=10, tol=1e-12, max_iter=300).eigenvalues
                for k in (1, 10):
                    for label, mixing in STARTS:
                        products, errors = [], []
                        for seed in range(3):
                            if mixing is not None:
                                eigsh.WARM_START_MIXING = mixing
                            start = None if mixing is None else previous[:k]
                            result = lanczos(op, k=k, tol=1e-3, seed=seed, start=start)
                            eigsh.WARM_START_MIXING = 1.0
                            products.append(result.num_hvps)
                            error = (result.eigenvalues - reference[:k]).abs() / reference[:k]
                            errors.append(float(error.max()))
                        print(
                            f"| {name} | {steps} | {k} | {label} | {products} | "
                            f"{max(errors):.1e} |",
                            flush=True,
                        )
                previous = lanczos(op, k=10, tol=1e-3, return_eigenvectors=True).eigenvectors


def miss_sweep(seeds: int = 12) -> None:
    """Top-10 of the MLP 64-64-10 ten SGD steps on: solves off by more than tol, by start."""
    model, batch, loss_fn = workload("tiny", torch.device("cpu"))
    with HessianOperator(model, loss_fn, batch) as op:
        previous = lanczos(op, k=10, tol=1e-3, return_eigenvectors=True).eigenvectors
    sgd_steps(model, batch, loss_fn, steps=10)
    print(f"\nTop-10 of tiny 10 SGD steps on, tol = 1e-3, {seeds} seeds:\n")
    print("| start | products | solves off by more than 1e-3 | their errors |")
    print("|---|---|---|---|")
    with HessianOperator(model, loss_fn, batch) as op:
        reference = lanczos(op, k=10, tol=1e-12, max_iter=300).eigenvalues
        for label, mixing in STARTS:
            products, misses = [], []
            for seed in range(seeds):
                eigsh.WARM_START_MIXING = 1.0 if mixing is None else mixing
                start = None if mixing is None else previous
                result = lanczos(op, k=10, tol=1e-3, seed=seed, start=start)
                products.append(result.num_hvps)
                error = float(((result.eigenvalues - reference).abs() / reference).max())
                if error > 1e-3:
                    misses.append(f"{error:.1e}")
            eigsh.WARM_START_MIXING = 1.0
            print(
                f"| {label} | {min(products)}–{max(products)} | {len(misses)} "
                f"| {', '.join(misses)} |"
            )


if __name__ == "__main__":
    main()
    miss_sweep()
