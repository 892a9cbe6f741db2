"""Single-vector against block Lanczos for the top 10 at the monitors' defaults (device-free).

    python bench/top_k_methods.py            # gpt-small and W1, two seeds each; ~3 min on 2 cores

HVP counts, convergence flags and errors (against a 300-step fully reorthogonalised Lanczos
reference) of ``lanczos`` and ``block_lanczos`` (default block of 12) for ``k = 10``,
``tol = 1e-3``, with the default budget. Writes ``bench/results/top-k-methods-<date>.json``.
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
            for method, solver in (("lanczos", lanczos), ("block_lanczos", block_lanczos)):
                for seed in range(2):
                    result = solver(op, k=10, tol=1e-3, seed=seed)
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
    out.write_text(json.dumps({"rows": rows, "device": "cpu", "k": 10, "tol": 1e-3}, indent=1))


if __name__ == "__main__":
    main()
