"""Single-vector against block Lanczos for the top 10 at the monitors' defaults (device-free).

    python bench/top_k_methods.py gpt-small W1     # two seeds each; minutes on 2 cores

HVP counts, convergence flags and errors (against a 300-step fully reorthogonalised Lanczos
reference) for ``k = 10``, ``tol = 1e-3``: ``lanczos`` at its default budget, and
``block_lanczos`` with blocks of 4 and 12 given a budget of 800 products. Writes
``bench/results/top-k-methods-<date>.json``, replacing the rows of the same workload and
variant (rows labelled ``block_lanczos`` alone are the first run, with the then default
block of 12 and budget of 204).
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import workload  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import block_lanczos, lanczos  # noqa: E402


def main() -> None:
    rows = []
    for name in sys.argv[1:] or ["gpt-small", "W1"]:
        model, batch, loss_fn = workload(name, torch.device("cpu"))
        with HessianOperator(model, loss_fn, batch) as op:
            reference = lanczos(op, k=12, tol=1e-14, max_iter=300).eigenvalues[:10]
            variants = (
                ("lanczos", lanczos, {}),
                ("block_lanczos p=4", block_lanczos, {"block_size": 4, "max_iter": 800}),
                ("block_lanczos p=12", block_lanczos, {"block_size": 12, "max_iter": 800}),
            )
            for method, solver, options in variants:
                for seed in range(2):
                    result = solver(op, k=10, tol=1e-3, seed=seed, **options)
                    error = ((result.eigenvalues - reference).abs() / reference.abs()).max()
                    rows.append(
                        {
                            "workload": name,
                            "method": method,
                            "seed": seed,
                            "num_hvps": result.num_hvps,
                            "converged": result.all_converged,
                            "max_rel_error": float(error),
                        }
                    )
                    print(rows[-1], flush=True)
    out = ROOT / "bench" / "results" / f"top-k-methods-{dt.date.today().isoformat()}.json"
    fresh = {(row["workload"], row["method"]) for row in rows}
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    kept = [row for row in kept if (row["workload"], row["method"]) not in fresh]
    out.write_text(
        json.dumps({"rows": kept + rows, "device": "cpu", "k": 10, "tol": 1e-3}, indent=1)
    )


if __name__ == "__main__":
    main()
