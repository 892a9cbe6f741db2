"""Cost of one Lanczos step against one HVP on a workload (solver overhead per step).

    python bench/lanczos_step.py --device cpu --workload W1

A fixed 30-step solve (tol 1e-14, so it never stops early) timed three times; the
difference from the HVP alone is the solver's own work: two Gram-Schmidt passes against
the growing basis, the restart candidate, the tridiagonal bookkeeping and the checks.
Appends a record to ``bench/results/lanczos-step.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import make_workload  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, batch, loss_fn = make_workload(args.workload, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with HessianOperator(model, loss_fn, batch) as op:
        vector = torch.randn(1, op.size, device=device)
        op.matmat(vector)
        solves = []
        for _ in range(3):
            sync()
            began = time.perf_counter()
            result = lanczos(op, k=1, tol=1e-14, max_iter=args.steps)
            sync()
            solves.append(time.perf_counter() - began)
        sync()
        began = time.perf_counter()
        for _ in range(10):
            op.matmat(vector)
        sync()
        hvp = (time.perf_counter() - began) / 10
    step = statistics.median(solves) / args.steps
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    )
    record = {
        "date": dt.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "workload": args.workload,
        "steps": args.steps,
        "ms_per_step": step * 1e3,
        "hvp_ms": hvp * 1e3,
        "overhead_ms_per_step": (step - hvp) * 1e3,
        "lambda_max": float(result.eigenvalues[0]),
        "note": args.note,
    }
    with open(ROOT / "bench" / "results" / "lanczos-step.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
