"""SLQ with full reorthogonalisation against SLQ keeping two vectors per probe (~3 min, CPU).

    python bench/slq_reorthogonalisation.py

Full reorthogonalisation keeps every probe's Krylov basis, ``num_probes · (steps + 1) · n``
entries: at the defaults (8 probes, 64 steps) 2 KB per float32 parameter, 23 GB for
ResNet-18. The three-term recurrence keeps two vectors per probe. For the five small models
of ``bench/negative_mass.py`` (dense spectra known), W1 after 20 SGD steps and a 2-layer
GPT, this prints what each variant reports (same probes, 64 steps), the largest relative
difference of the quadrature moments 1-4, and the exact values where known; then the peak
resident memory that each variant adds on W1, measured in a fresh process per variant.
Writes ``bench/results/slq-reorthogonalisation-<date>.md``.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import resource
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import small_gpt  # noqa: E402
from negative_mass import cases  # noqa: E402
from run import make_workload  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import ZERO_TOLERANCE, slq  # noqa: E402


def accuracy_rows() -> list[str]:
    rows = [
        "| model | n | `negative_mass` full / two-vector (exact) | `near_zero_mass` full / "
        "two-vector (exact) | `lambda_min` full / two-vector (exact) | moments 1-4: max rel. "
        "difference |",
        "|---|---|---|---|---|---|",
    ]
    models = [(name, model, loss_fn, batch, True) for name, model, loss_fn, batch in cases()]
    model, batch, loss_fn = make_workload("W1", torch.device("cpu"))[:3]
    models.append(("W1, 20 SGD steps", model, loss_fn, batch, False))
    model, batch, loss_fn = small_gpt(torch.device("cpu"))
    models.append(("GPT, 2 layers, d 96", model, loss_fn, batch, False))
    for name, model, loss_fn, batch, dense in models:
        with HessianOperator(model, loss_fn, batch) as op:
            full = slq(op, steps=64, seed=0, reorthogonalize=True)
            local = slq(op, steps=64, seed=0, reorthogonalize=False)
            exact = ("", "", "")
            if dense:
                hessian = op.matmat(torch.eye(op.size)).double()
                eigenvalues = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))
                cut = ZERO_TOLERANCE * float(eigenvalues.abs().max())
                exact = (
                    f" ({float((eigenvalues < -cut).double().mean()):.3f})",
                    f" ({float((eigenvalues.abs() <= cut).double().mean()):.3f})",
                    f" ({float(eigenvalues[0]):.5g})",
                )
        moments = max(
            float(((full.moment(j) - local.moment(j)) / full.moment(j)).abs().max())
            for j in (1, 2, 3, 4)
        )
        rows.append(
            f"| {name} | {op.size} | {full.negative_mass:.3f} / {local.negative_mass:.3f}"
            f"{exact[0]} | {full.near_zero_mass:.3f} / {local.near_zero_mass:.3f}{exact[1]} "
            f"| {full.lambda_min:.5g} / {local.lambda_min:.5g}{exact[2]} | {moments:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def peak_memory_of(reorthogonalize: bool) -> float:
    """MB of resident memory that one W1 density adds to the process's peak."""
    torch.set_num_threads(1)
    model, batch, loss_fn = make_workload("W1", torch.device("cpu"))[:3]
    with HessianOperator(model, loss_fn, batch) as op:
        op.matmat(torch.randn(8, op.size))  # the first-order graph exists before we start
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        slq(op, steps=64, seed=0, reorthogonalize=reorthogonalize)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024  # ru_maxrss is in KB on Linux


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(peak_memory_of(sys.argv[2] == "full"))
        return
    # Memory first: a child inherits its parent's peak resident size (Linux keeps ru_maxrss
    # across fork and exec), so the children must start before this process grows.
    memory = ["| W1 (669,706 parameters), 8 probes × 64 steps | peak memory added |", "|---|---|"]
    for variant in ("full", "two-vector"):
        output = subprocess.run(
            [sys.executable, __file__, "--memory", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        memory.append(f"| {variant} | {float(output.stdout.split()[-1]):.0f} MB |")
        print(memory[-1], flush=True)
    rows = [*accuracy_rows(), "", *memory]
    out = ROOT / "bench" / "results" / f"slq-reorthogonalisation-{dt.date.today()}.md"
    out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
