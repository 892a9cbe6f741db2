"""Where the products of one ``HessianSpectrumMonitor`` measurement go, and what cheaper
trace and density settings cost in accuracy (CPU: C1 about 3 minutes, G1 about 6).

    python -m bench.spectrum_parts --workloads C1 G1
    python -m bench.spectrum_parts --smoke           # the tiny workload (the test suite)

On a workload of ``bench/run.py`` (20 SGD steps), the parts of a measurement are run as the
monitor runs them (the same functions on one ``HessianOperator``), each timed and counted:

- the top-``k`` solve (``eigenpairs``, ``k = 10``, ``tol = 1e-3``) from a random start, and
  warm-started from those eigenvectors after 50 more SGD steps (the monitor's later
  measurements);
- Hutch++ (``hutchpp``) at 99 and 33 products, three seeds each: the spread of the
  estimates over seeds, relative to the mean of the 99-product ones;
- stochastic Lanczos quadrature (``slq``) with 8 probes of 64 steps: the density's scalars
  (negative and near-zero mass, ``λ_min``, outliers, bulk edge) from all 8 probes, and their
  spread over the 8 single-probe rules (the error of ``density_probes = 1``).

Writes ``bench/results/spectrum-parts-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import platform
import statistics
import time

import torch

from bench.run import gradient_ms, make_workload, sgd_steps
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import SpectralDensity, count_outliers, eigenpairs, hutchpp, slq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def density_scalars(density: SpectralDensity, top: torch.Tensor, size: int) -> dict[str, float]:
    """The density's scalars as the monitor logs them."""
    report = count_outliers(top, density, size)
    return {
        "negative_mass": density.negative_mass,
        "near_zero_mass": density.near_zero_mass,
        "lambda_min": density.lambda_min,
        "outliers": float(report.count),
        "bulk_edge": report.bulk_edge,
    }


def single_probe(density: SpectralDensity, probe: int) -> SpectralDensity:
    """The quadrature rule of one probe of ``density`` as a density of its own."""
    residuals = None if density.residuals is None else density.residuals[probe : probe + 1]
    return SpectralDensity(
        density.nodes[probe : probe + 1],
        density.weights[probe : probe + 1],
        density.num_hvps // density.nodes.shape[0],
        residuals,
        density.reorthogonalized,
    )


def parts(
    name: str,
    k: int = 10,
    trace_settings: tuple[int, ...] = (99, 33),
    seeds: int = 3,
    probes: int = 8,
    steps: int = 64,
) -> dict:
    device = torch.device("cpu")
    model, batch, loss_fn = make_workload(name, device)
    grad_ms = gradient_ms(model, batch, loss_fn, device, repeats=3)
    row: dict = {"workload": name, "parameters": sum(p.numel() for p in model.parameters())}
    row["gradient_ms"] = grad_ms

    def cost(seconds: float, products: int) -> dict:
        return {
            "products": products,
            "seconds": seconds,
            "gradient_times": seconds * 1e3 / grad_ms,
        }

    with HessianOperator(model, loss_fn, batch) as op:
        cold, seconds = _timed(lambda: eigenpairs(op, k=k, tol=1e-3, return_eigenvectors=True))
        row["top_k_cold"] = cost(seconds, cold.num_hvps)
    sgd_steps(model, batch, loss_fn, steps=50)
    with HessianOperator(model, loss_fn, batch) as op:
        before = op.num_hvps
        warm, seconds = _timed(
            lambda: eigenpairs(op, k=k, tol=1e-3, start=cold.eigenvectors, seed=1)
        )
        row["top_k_warm"] = cost(seconds, warm.num_hvps)
        row["top_k_warm"]["all_converged"] = bool(warm.all_converged)
        row["trace"] = {}
        for num_hvps in trace_settings:
            estimates, times = [], []
            for seed in range(seeds):
                estimate, seconds = _timed(lambda s=seed, m=num_hvps: hutchpp(op, m, seed=s))
                estimates.append(estimate.estimate)
                times.append(seconds)
            row["trace"][num_hvps] = {
                **cost(statistics.median(times), num_hvps),
                "estimates": estimates,
            }
        reference = statistics.mean(row["trace"][max(trace_settings)]["estimates"])
        for entry in row["trace"].values():
            spread = statistics.stdev(entry["estimates"]) if seeds > 1 else 0.0
            entry["relative_spread"] = spread / abs(reference)
        density, seconds = _timed(lambda: slq(op, num_probes=probes, steps=steps))
        row["density"] = cost(seconds, density.num_hvps)
        row["density"]["probes"], row["density"]["steps"] = probes, steps
        row["density"]["all_probes"] = density_scalars(density, warm.eigenvalues, op.size)
        singles = [
            density_scalars(single_probe(density, p), warm.eigenvalues, op.size)
            for p in range(probes)
        ]
        row["density"]["single_probe_spread"] = {
            key: statistics.stdev(s[key] for s in singles) if probes > 1 else 0.0
            for key in singles[0]
        }
        row["density"]["single_probe_mean"] = {
            key: statistics.mean(s[key] for s in singles) for key in singles[0]
        }
        assert op.num_hvps - before >= warm.num_hvps  # every part went through this operator
    row["top_k_eigenvalues"] = warm.eigenvalues.tolist()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Parts of one HessianSpectrumMonitor measurement ({meta['date']}, {meta['device']}, "
        f"torch {meta['torch']})",
        "",
        "Products, seconds and gradient-times (seconds over one gradient of the probe) of each "
        "part, as the monitor runs them after 20 (cold) and 70 (warm) SGD steps.",
        "",
        "| workload | part | products | seconds | gradient-times |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        name = row["workload"]
        entries = [("top-10, cold", row["top_k_cold"]), ("top-10, warm", row["top_k_warm"])]
        entries += [(f"Hutch++ {m}", e) for m, e in row["trace"].items()]
        density = row["density"]
        entries.append((f"SLQ {density['probes']}×{density['steps']}", density))
        for label, entry in entries:
            lines.append(
                f"| {name} | {label} | {entry['products']} | {entry['seconds']:.2f} | "
                f"{entry['gradient_times']:.0f} |"
            )
    lines += [
        "",
        "Accuracy of the cheaper settings: Hutch++'s spread over seeds relative to the mean "
        "of the 99-product estimates; the density's scalars from all 8 probes and the "
        "standard deviation of the 8 single-probe values (the error of one probe).",
        "",
        "| workload | Hutch++ spread (99; 33) | scalar | 8 probes | one probe: std |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        spreads = "; ".join(f"{e['relative_spread']:.1e}" for e in row["trace"].values())
        density = row["density"]
        for i, (key, value) in enumerate(density["all_probes"].items()):
            lines.append(
                f"| {row['workload'] if i == 0 else ''} | {spreads if i == 0 else ''} | {key} | "
                f"{value:.4g} | {density['single_probe_spread'][key]:.2g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["C1", "G1"])
    parser.add_argument("--smoke", action="store_true", help="the tiny workload, seconds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    workloads = ["tiny"] if args.smoke else args.workloads
    rows = [parts(name) for name in workloads]
    meta = {
        "device": f"cpu-{platform.machine()}-{torch.get_num_threads()}threads",
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
    }
    text = markdown(rows, meta)
    print(text)
    if not args.smoke:
        stem = pathlib.Path(args.out) / f"spectrum-parts-{meta['device']}-{meta['date']}"
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
