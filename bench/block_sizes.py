"""How many Hessian-vector products block Lanczos needs, by block size (device-free).

    python bench/block_sizes.py                        # tiny, gpt-small, W1, synthetic; ~10 min
    python bench/block_sizes.py --workloads tiny       # seconds

On a GPU a block of ``p`` products costs less per vector than one product (vmapped, and far
less when compiled: docs/benchmarks.md), but block Lanczos needs more products for the same
eigenvalues. This study measures the second factor, which does not depend on the device, so
that a GPU run only has to time the products. For each workload and block size ``p`` (1 is
single-vector ``lanczos``) it counts the products and reports the error against a
fully reorthogonalised reference, for:

* ``cold top-1``: ``k = 1, tol = 1e-3`` from random starts (seeds);
* ``warm top-1``: ``k = 1, tol = 1e-3`` on the model ten SGD steps later, started from the
  previous top eigenvector (the rest of the block random: ``warm-1``) or from the previous
  top ``p`` eigenvectors (``warm-p``);
* ``top-10``: ``k = 10`` at ``tol = 1e-2`` and ``1e-3`` from random starts.

Writes ``bench/results/block-sizes-<date>.json`` (rows of the workloads run replace earlier
rows of the same day) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import DiagonalOperator, synthetic_spectrum, workload  # noqa: E402
from run import sgd_steps  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import block_lanczos, lanczos  # noqa: E402

BLOCK_SIZES = (1, 2, 4, 8, 16)
BUDGET = 1000  # products: enough that no solve here stops on its budget


def solve(op, p: int, k: int, tol: float, seed: int = 0, start=None):
    if p == 1:
        return lanczos(op, k=k, tol=tol, seed=seed, start=start, max_iter=BUDGET)
    return block_lanczos(op, k=k, tol=tol, seed=seed, start=start, block_size=p, max_iter=BUDGET)


def row(name, task, p, seed, result, reference) -> dict:
    k = result.eigenvalues.numel()
    exact = torch.as_tensor(reference[:k], dtype=torch.float64)
    error = float(((result.eigenvalues - exact).abs() / exact.abs()).max())
    return {
        "workload": name,
        "task": task,
        "block_size": p,
        "seed": seed,
        "num_hvps": result.num_hvps,
        "block_steps": result.num_iterations,
        "converged": result.all_converged,
        "max_rel_error": error,
    }


def reference_pairs(op, count: int):
    """Top ``count`` eigenpairs to 1e-10 (values for errors, vectors for warm starts)."""
    return lanczos(op, k=count, tol=1e-10, max_iter=min(op.size, 400), return_eigenvectors=True)


def cold_rows(name, op, reference, seeds: int) -> list[dict]:
    rows = []
    for p in BLOCK_SIZES:
        for seed in range(seeds):
            rows.append(row(name, "cold top-1", p, seed, solve(op, p, 1, 1e-3, seed), reference))
        for tol in (1e-2, 1e-3):
            for seed in range(min(seeds, 3)):
                result = solve(op, p, 10, tol, seed)
                rows.append(row(name, f"top-10 tol {tol:g}", p, seed, result, reference))
        print(f"{name} p={p} cold done", file=sys.stderr, flush=True)
    return rows


def warm_rows(name, op, reference, previous: torch.Tensor) -> list[dict]:
    rows = []
    for p in BLOCK_SIZES:
        rows.append(
            row(name, "warm-1 top-1", p, 0, solve(op, p, 1, 1e-3, start=previous[:1]), reference)
        )
        if p > 1:
            result = solve(op, p, 1, 1e-3, start=previous[:p])
            rows.append(row(name, "warm-p top-1", p, 0, result, reference))
    return rows


def model_study(name: str, seeds: int) -> list[dict]:
    model, batch, loss_fn = workload(name, torch.device("cpu"))
    with HessianOperator(model, loss_fn, batch) as op:
        reference = reference_pairs(op, 12).eigenvalues.tolist()
        rows = cold_rows(name, op, reference, seeds)
        previous = reference_pairs(op, max(BLOCK_SIZES)).eigenvectors
    sgd_steps(model, batch, loss_fn, steps=10)
    with HessianOperator(model, loss_fn, batch) as op:
        later = reference_pairs(op, 1).eigenvalues.tolist()
        rows += warm_rows(name, op, later, previous)
    return rows


def synthetic_study(name: str, seeds: int) -> list[dict]:
    diagonal = synthetic_spectrum(name)
    op = DiagonalOperator(diagonal)
    reference = torch.sort(diagonal, descending=True).values.tolist()
    return cold_rows(name, op, reference, seeds)


def span(values) -> str:
    values = sorted(values)
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def markdown(rows: list[dict]) -> str:
    """Block steps (products), and the largest relative error, over seeds."""
    lines = [
        "| workload | task | " + " | ".join(f"p={p}" for p in BLOCK_SIZES) + " |",
        "|---|---|" + "---|" * len(BLOCK_SIZES),
    ]
    for name in dict.fromkeys(r["workload"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows if r["workload"] == name):
            cells = []
            for p in BLOCK_SIZES:
                group = [
                    r
                    for r in rows
                    if (r["workload"], r["task"], r["block_size"]) == (name, task, p)
                ]
                if not group:
                    cells.append("")
                    continue
                error = max(r["max_rel_error"] for r in group)
                flag = "" if all(r["converged"] for r in group) else ", unconverged"
                steps = span(r["block_steps"] for r in group)
                products = "" if p == 1 else f" ({span(r['num_hvps'] for r in group)})"
                cells.append(f"{steps}{products}, {error:.0e}{flag}")
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["tiny", "gpt-small", "W1", "power-0.5", "pair-0.01"]
    )
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in args.workloads:
        synthetic = name.startswith(("pair-", "power-")) or name == "triple"
        rows += (synthetic_study if synthetic else model_study)(name, args.seeds)
    print("Block steps (products), and the largest relative error, over seeds:\n")
    print(markdown(rows))
    out = ROOT / "bench" / "results" / f"block-sizes-{dt.date.today().isoformat()}.json"
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    kept = [r for r in kept if r["workload"] not in args.workloads]
    out.write_text(json.dumps({"rows": kept + rows, "device": "cpu"}, indent=1))


if __name__ == "__main__":
    main()
