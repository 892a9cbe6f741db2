"""How many Lanczos steps each stopping rule takes, and the eigenvalue error it stops at.

    python bench/convergence.py                              # everything, ~30 min on 2 cores
    python bench/convergence.py --workloads tiny pair-0.01   # seconds

HVP counts do not depend on the device, so this study runs on a CPU. For each workload and
seed it runs one long Lanczos recurrence (cold: random start; warm: started from the top
eigenvector of the model ten SGD steps earlier), forms the Ritz values and residuals of every
leading ``T_m``, and replays each stopping rule on that trajectory: the step it stops at
and the true relative error there (against a 120-step float64 reference; for the synthetic
spectra, the exact eigenvalues). The rules: ``residual`` (the solvers' rule, ``r ≤ tol·|θ|``)
and three gap-based estimates ``r²/gap`` of the eigenvalue error, with the gap to the nearest
other Ritz value taken as is, shrunk by that value's residual, or trusted only when that
value is itself resolved. Writes
``bench/results/convergence-<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import GPT, classification_loss, make_workload, sgd_steps  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.linalg import lanczos  # noqa: E402
from spectral_callbacks.linalg._krylov import IndependentLanczos, tridiagonal_matrix  # noqa: E402


def small_gpt(device: torch.device):
    """A two-layer GPT with W3's structure, small enough for many CPU solves."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GPT(vocab=512, dim=96, heads=4, layers=2, context=64).to(device)
    tokens = torch.randint(0, 512, (8, 65), generator=g)
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    sgd_steps(model, batch, classification_loss, steps=20)
    return model, batch, classification_loss


def workload(name: str, device: torch.device):
    return small_gpt(device) if name == "gpt-small" else make_workload(name, device)


class DiagonalOperator:
    """``diag(d)``: Lanczos from a random start sees only the spectrum, so this stands for
    any symmetric matrix with these eigenvalues."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self.size, self.dtype, self.device = diagonal.numel(), diagonal.dtype, diagonal.device

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        return block * self.diagonal


def synthetic_spectrum(name: str, n: int = 3000) -> torch.Tensor:
    """Spectra that stress a stopping rule: a top pair ``1, 1-δ`` above ten outliers and a
    bulk in [0, 0.4] (``pair-δ``), a top triple (``triple``), and power laws (``power-a``)."""
    bulk = torch.rand(n - 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outliers = [0.8 - 0.03 * i for i in range(10)]
    if name.startswith("pair-"):
        top = [1.0, 1.0 - float(name.split("-", 1)[1]), *outliers]
    elif name == "triple":
        top = [1.0, 0.99, 0.98, *outliers[:9]]
    elif name.startswith("power-"):
        return torch.arange(1, n + 1, dtype=torch.float64) ** -float(name.split("-", 1)[1])
    else:
        raise ValueError(f"unknown synthetic spectrum {name!r}")
    return torch.cat([torch.tensor(top, dtype=torch.float64), 0.4 * bulk])


SYNTHETIC = ("pair-0.001", "pair-0.003", "pair-0.01", "pair-0.03", "pair-0.1", "triple")
SYNTHETIC += ("power-1", "power-0.5")


def synthetic_study(name: str, seeds: int, steps: int) -> dict:
    diagonal = synthetic_spectrum(name)
    op = DiagonalOperator(diagonal)
    cold = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed + 10)
        start = torch.randn(op.size, generator=generator, dtype=torch.float64)
        cold.append(trajectory(op, start, steps, seed))
    reference = torch.sort(diagonal, descending=True).values[:10].tolist()
    return {"reference": reference, "warm_reference": reference, "cold": cold, "warm": []}


def trajectory(op, start: torch.Tensor, steps: int, seed: int) -> list[dict]:
    """Ritz values (descending) and residuals of ``T_m`` for m = 1..steps."""
    generator = torch.Generator(device=op.device).manual_seed(seed)
    recurrence = IndependentLanczos(op, start.reshape(1, -1), steps, generator)
    for _ in range(steps):
        recurrence.step()
    alpha, beta = recurrence.tridiagonal()
    rows = []
    for m in range(1, steps + 1):
        values, vectors = torch.linalg.eigh(tridiagonal_matrix(alpha[0, :m], beta[0, :m]))
        order = torch.argsort(values, descending=True)
        residuals = (beta[0, m - 1] * vectors[m - 1, order]).abs()
        rows.append({"values": values[order].tolist(), "residuals": residuals.tolist()})
    return rows


def error_bound(values: torch.Tensor, residuals: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """Estimated eigenvalue error of the top-k Ritz values under each candidate rule."""
    r = residuals[:k]
    if rule == "residual":
        return r
    distance = (values[:k, None] - values[None, :]).abs()
    distance[torch.arange(k), torch.arange(k)] = math.inf
    if rule == "gap":
        gap = distance.min(dim=1).values
    elif rule == "gap_conservative":
        gap = (distance - residuals[None, :]).min(dim=1).values
    elif rule == "gap_guarded":
        # The neighbour that sets the gap must itself be resolved: its residual at most
        # a quarter of the gap, else the gap is not trusted (fall back to the residual).
        shrunk = distance - residuals[None, :]
        gap, neighbour = shrunk.min(dim=1)
        trusted = residuals[neighbour] <= 0.25 * distance.gather(1, neighbour[:, None])[:, 0]
        gap = torch.where(trusted, gap, torch.zeros_like(gap))
    else:
        raise ValueError(rule)
    usable = (gap > 0) & torch.isfinite(gap)  # one Ritz value alone has no gap to trust
    estimate = torch.where(usable, r**2 / gap.clamp_min(1e-300), r)
    return torch.minimum(r, estimate)


RULES = ("residual", "gap", "gap_conservative", "gap_guarded")


def stop_step(rows: list[dict], k: int, tol: float, rule: str) -> int | None:
    for m, row in enumerate(rows, start=1):
        if m < k:
            continue
        values = torch.tensor(row["values"], dtype=torch.float64)
        residuals = torch.tensor(row["residuals"], dtype=torch.float64)
        bound = error_bound(values, residuals, k, rule)
        if bool((bound <= tol * values[:k].abs()).all()):
            return m
    return None


def study(name: str, seeds: int, steps: int, k_values: list[int], device: torch.device) -> dict:
    model, batch, loss_fn = workload(name, device)
    with HessianOperator(model, loss_fn, batch) as op:
        reference = lanczos(op, k=max(k_values), tol=1e-14, max_iter=min(120, op.size))
        top = lanczos(op, k=1, tol=1e-10, max_iter=min(120, op.size), return_eigenvectors=True)
    cold = []
    with HessianOperator(model, loss_fn, batch) as op:
        for seed in range(seeds):
            generator = torch.Generator(device=device).manual_seed(seed)
            start = torch.randn(op.size, generator=generator, device=device)
            cold.append(trajectory(op, start, steps, seed))
    # Warm: the reference eigenvector of the model ten SGD steps *before* this one.
    previous = top.eigenvectors[0]
    sgd_steps(model, batch, loss_fn, steps=10)
    with HessianOperator(model, loss_fn, batch) as op:
        warm_reference = lanczos(op, k=1, tol=1e-14, max_iter=min(120, op.size))
        warm = [trajectory(op, previous, min(steps, 30), 0)]
    return {
        "reference": reference.eigenvalues.tolist(),
        "warm_reference": warm_reference.eigenvalues.tolist(),
        "cold": cold,
        "warm": warm,
    }


def summarise(name: str, data: dict, k_values: list[int], tols: dict[int, float]) -> list[dict]:
    rows = []
    for start in ("cold", "warm") if data["warm"] else ("cold",):
        reference = data["reference" if start == "cold" else "warm_reference"]
        for k in k_values if start == "cold" else [1]:
            tol = tols[k]
            for rule in RULES:
                for seed, trace in enumerate(data[start]):
                    m = stop_step(trace, k, tol, rule)
                    oracle = next(
                        (
                            i
                            for i, row in enumerate(trace, start=1)
                            if i >= k
                            and max(
                                abs(row["values"][j] - reference[j]) / abs(reference[j])
                                for j in range(k)
                            )
                            <= tol
                        ),
                        None,
                    )
                    error = (
                        math.nan
                        if m is None
                        else max(
                            abs(trace[m - 1]["values"][j] - reference[j]) / abs(reference[j])
                            for j in range(k)
                        )
                    )
                    rows.append(
                        {
                            "workload": name,
                            "start": start,
                            "k": k,
                            "tol": tol,
                            "rule": rule,
                            "seed": seed,
                            "steps": m,
                            "oracle_steps": oracle,
                            "error": error,
                        }
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["tiny", "W1", "gpt-small", *SYNTHETIC],
        help="models (tiny, W1, W2, W3, gpt-small) and synthetic spectra "
        "(pair-<δ>, triple, power-<a>)",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    k_values, tols = [1, 10], {1: 1e-3, 10: 1e-2}
    results, rows = {}, []
    for name in args.workloads:
        if name.startswith(("pair-", "power-")) or name == "triple":
            results[name] = synthetic_study(name, args.seeds, max(args.steps, 100))
        else:
            results[name] = study(name, args.seeds, args.steps, k_values, device)
        rows += summarise(name, results[name], k_values, tols)
        print(f"{name} done", file=sys.stderr, flush=True)
    print("| workload | start | k | tol | rule | steps by seed | oracle steps | max error |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["workload"], r["start"], r["k"], r["rule"]) for r in rows}, key=str)
    for key in keys:
        group = [r for r in rows if (r["workload"], r["start"], r["k"], r["rule"]) == key]
        errors = [r["error"] for r in group if not math.isnan(r["error"])]
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {group[0]['tol']:g} | {key[3]} | "
            f"{[r['steps'] for r in group]} | {[r['oracle_steps'] for r in group]} | "
            f"{max(errors) if errors else math.nan:.1e} |"
        )
    # One file per day; a run replaces the rows of the workloads it ran and keeps the others.
    out = ROOT / "bench" / "results" / f"convergence-{dt.date.today().isoformat()}.json"
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    kept = [r for r in kept if r["workload"] not in args.workloads]
    out.write_text(json.dumps({"rows": kept + rows, "device": str(device)}, indent=1))


if __name__ == "__main__":
    main()
