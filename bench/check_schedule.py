"""Lanczos convergence-check schedules compared: HVPs used and checks made (device-free).

    python bench/check_schedule.py                  # tiny, gpt-small, synthetic; ~2 min on 2 cores

``fixed`` is the schedule before 2026-11-23 (checks after k steps, then gaps 1, 1, 2, 2, …
up to ``check_every``); ``predicted`` is the current one (gaps from the extrapolated residual
rate). Each solve runs the real ``lanczos`` with the schedule swapped in, cold (seeds) and
warm (the top eigenvector of the model ten SGD steps earlier), for top-1 at ``tol = 1e-3``
and top-10 at ``1e-2``. Writes ``bench/results/check-schedule-<date>.json``.
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

from convergence import DiagonalOperator, synthetic_spectrum, workload  # noqa: E402
from run import sgd_steps  # noqa: E402

import spectral_callbacks.linalg.eigsh as eigsh  # noqa: E402
from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402

PREDICTED = eigsh._CheckSchedule


class FixedSchedule:
    """The earlier schedule: gaps 1, 1, 2, 2, 3, … capped at ``every``, blind to residuals."""

    def __init__(self, first: int, every: int, last: int) -> None:
        self.every, self.last = max(1, every), last
        self.next, self.count = min(max(1, first), last), 0

    def due(self, step: int) -> bool:
        return step >= self.next

    def checked(self, step: int, worst: float) -> None:
        self.count += 1
        self.next = min(step + min(self.every, 1 + self.count // 2), self.last)


def solve(op, schedule, k: int, tol: float, seed: int, start=None) -> tuple[int, int]:
    """(HVPs, checks) of one solve under ``schedule``."""
    checks = [0]

    class Counted(schedule):
        def checked(self, step: int, worst: float) -> None:
            checks[0] += 1
            super().checked(step, worst)

    eigsh._CheckSchedule = Counted
    try:
        result = lanczos(op, k=k, tol=tol, seed=seed, start=start)
    finally:
        eigsh._CheckSchedule = PREDICTED
    return result.num_hvps, checks[0]


def cases():
    for name in ("tiny", "gpt-small"):
        model, batch, loss_fn = workload(name, torch.device("cpu"))
        with HessianOperator(model, loss_fn, batch) as op:
            previous = lanczos(op, k=1, tol=1e-8, max_iter=150, return_eigenvectors=True)
            for seed in range(4):
                yield name, "cold", 1, 1e-3, op, seed, None
            for seed in range(2):
                yield name, "cold", 10, 1e-2, op, seed, None
        sgd_steps(model, batch, loss_fn, steps=10)
        with HessianOperator(model, loss_fn, batch) as op:
            yield name, "warm", 1, 1e-3, op, 0, previous.eigenvectors
    for name in ("pair-0.01", "pair-0.1", "triple", "power-1", "power-0.5"):
        op = DiagonalOperator(synthetic_spectrum(name))
        for seed in range(6):
            yield name, "cold", 1, 1e-3, op, seed, None
            yield name, "cold", 10, 1e-2, op, seed, None


def main() -> None:
    rows = []
    for name, start, k, tol, op, seed, vectors in cases():
        row = {"workload": name, "start": start, "k": k, "tol": tol, "seed": seed}
        for label, schedule in (("fixed", FixedSchedule), ("predicted", PREDICTED)):
            row[f"{label}_hvps"], row[f"{label}_checks"] = solve(
                op, schedule, k, tol, seed, vectors
            )
        rows.append(row)
    print("| workload | start | k | solves | HVPs fixed → predicted | checks fixed → predicted |")
    print("|---|---|---|---|---|---|")
    groups = sorted({(r["workload"], r["start"], r["k"]) for r in rows}, key=str)
    for group in groups:
        members = [r for r in rows if (r["workload"], r["start"], r["k"]) == group]
        total = {key: sum(r[key] for r in members) for key in members[0] if key.endswith("s")}
        print(
            f"| {group[0]} | {group[1]} | {group[2]} | {len(members)} | "
            f"{total['fixed_hvps']} → {total['predicted_hvps']} | "
            f"{total['fixed_checks']} → {total['predicted_checks']} |"
        )
    out = ROOT / "bench" / "results" / f"check-schedule-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({"rows": rows, "device": "cpu"}, indent=1))


if __name__ == "__main__":
    main()
