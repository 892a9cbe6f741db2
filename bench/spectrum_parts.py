"""Where the products of one ``HessianSpectrumMonitor`` measurement go, and what cheaper
trace and density settings cost in accuracy (CPU: C1 about 3 minutes, G1 about 6).

    python -m bench.spectrum_parts --workloads C1 G1
    python -m bench.spectrum_parts --smoke           # the tiny workload (the test suite)

On a workload of ``bench/run.py`` (20 SGD steps), the parts of a measurement are run as the
monitor runs them (the same functions on one ``HessianOperator``), each timed and counted:

- the top-``k`` solve (``eigenpairs``, ``k = 10``, ``tol = 1e-3``) from a random start, and
  warm-started from those eigenvectors after 50 more SGD steps (the monitor's later
  measurements);
- Hutch++ (``hutchpp``) at 99 and 33 products, and Hutchinson deflated by the warm solve's
  top-``k`` Ritz pairs (``deflated_hutchinson``) at 33, three seeds each: the spread of the
  estimates over seeds, relative to the mean of the 99-product Hutch++ ones;
- stochastic Lanczos quadrature (``slq``) with 8 probes of 64 steps: the density's scalars
  (negative and near-zero mass, ``λ_min``, outliers, bulk edge) from all 8 probes, and their
  spread over disjoint groups of 1, 2 and 4 of those probes (the error of
  ``density_probes`` = 1, 2, 4);
- with ``--parts density_steps``: SLQ with 4 probes at 16, 32, 64 and 128 steps (the same
  probes), the density's scalars at each (C1 about 7 minutes);
- with ``--parts shared_probes``: the trace (33) and density (4 × 64) on separate probes,
  undeflated (the monitor until 2026-12-06), against ``deflated_spectrum`` (one set of
  probes, the density deflated by the top-10 Ritz pairs: the monitor since), alternately
  twice, with ``λ_min`` from a solve (C1 about 13 minutes).

Writes ``bench/results/spectrum-parts-<device>-<date>.{json,md}``; runs of some
``--parts`` or workloads on one day add to that file.
"""

from __future__ import annotations

import statistics

import torch

from bench.harness import gradient_ms, stopwatch
from bench.report import document, table
from bench.study import finish, study_parser, workload_names
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import (
    SpectralDensity,
    count_outliers,
    deflated_hutchinson,
    deflated_spectrum,
    eigenpairs,
    hutchpp,
    slq,
)
from spectral_callbacks.workloads import make_workload, sgd_steps


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


def probe_subset(density: SpectralDensity, probes) -> SpectralDensity:
    """The quadrature rules of some probes of ``density`` as a density of their own."""
    index = torch.as_tensor(list(probes))
    residuals = None if density.residuals is None else density.residuals[index]
    return SpectralDensity(
        density.nodes[index],
        density.weights[index],
        density.num_hvps // density.nodes.shape[0] * index.numel(),
        residuals,
        density.reorthogonalized,
    )


#: Parts of a measurement besides the top-k solve (``--parts`` picks; the default is the
#: first two): ``density_steps`` is SLQ's scalars at several numbers of steps;
#: ``shared_probes`` the trace and density on separate probes, undeflated (the monitor until
#: 2026-12-06), against ``deflated_spectrum`` (shared probes, deflated density: the monitor
#: since).
PARTS = ("trace", "density", "density_steps", "shared_probes")
#: Steps per probe of ``density_steps``; the longest is the reference.
DENSITY_STEPS = (16, 32, 64, 128)


def parts(
    name: str,
    which: tuple[str, ...] = PARTS,
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
        seconds, cold = stopwatch(
            lambda: eigenpairs(op, k=k, tol=1e-3, return_eigenvectors=True), op.device
        )
        row["top_k_cold"] = cost(seconds, cold.num_hvps)
    sgd_steps(model, batch, loss_fn, steps=50)
    with HessianOperator(model, loss_fn, batch) as op:
        before = op.num_hvps
        seconds, warm = stopwatch(
            lambda: eigenpairs(
                op, k=k, tol=1e-3, start=cold.eigenvectors, seed=1, return_eigenvectors=True
            ),
            op.device,
        )
        row["top_k_warm"] = cost(seconds, warm.num_hvps)
        row["top_k_warm"]["all_converged"] = bool(warm.all_converged)
        if "trace" in which:
            row["trace"] = trace_part(op, warm, trace_settings, seeds, cost)
        if "density" in which:
            row["density"] = density_part(op, warm, probes, steps, cost)
        if "density_steps" in which:
            row["density_steps"] = density_steps_part(op, warm, cost)
        if "shared_probes" in which:
            row["shared_probes"] = shared_probes_part(op, warm, cost)
        assert op.num_hvps - before >= warm.num_hvps  # every part went through this operator
    row["top_k_eigenvalues"] = warm.eigenvalues.tolist()
    return row


def trace_part(op, warm, trace_settings: tuple[int, ...], seeds: int, cost) -> dict:
    """Hutch++ at each setting and the deflated estimator at the smallest, over seeds."""
    estimators = {
        f"Hutch++ {m}": (m, lambda s, m=m: hutchpp(op, m, seed=s)) for m in trace_settings
    }
    deflated = min(trace_settings)
    estimators[f"deflated Hutchinson {deflated}"] = (
        deflated,
        lambda s: deflated_hutchinson(op, warm.eigenvectors, warm.eigenvalues, deflated, seed=s),
    )
    entries = {}
    for label, (num_hvps, estimator) in estimators.items():
        estimates, times = [], []
        for seed in range(seeds):
            seconds, estimate = stopwatch(lambda s=seed, e=estimator: e(s), op.device)
            estimates.append(estimate.estimate)
            times.append(seconds)
        entries[label] = {**cost(statistics.median(times), num_hvps), "estimates": estimates}
    reference = statistics.mean(entries[f"Hutch++ {max(trace_settings)}"]["estimates"])
    for entry in entries.values():
        spread = statistics.stdev(entry["estimates"]) if seeds > 1 else 0.0
        entry["relative_spread"] = spread / abs(reference)
    return entries


def density_part(op, warm, probes: int, steps: int, cost) -> dict:
    """SLQ with ``probes`` probes, and the spread of its scalars over disjoint groups of
    1, 2 and 4 of those probes (the error of a density with that many)."""
    seconds, density = stopwatch(lambda: slq(op, num_probes=probes, steps=steps), op.device)
    entry = cost(seconds, density.num_hvps)
    entry["probes"], entry["steps"] = probes, steps
    entry["all_probes"] = density_scalars(density, warm.eigenvalues, op.size)
    entry["spread_by_probes"] = {}
    for size in (1, 2, 4):
        if probes // size < 2:
            continue
        groups = [
            density_scalars(probe_subset(density, range(g, g + size)), warm.eigenvalues, op.size)
            for g in range(0, probes - size + 1, size)
        ]
        entry["spread_by_probes"][size] = {
            key: statistics.stdev(group[key] for group in groups) for key in groups[0]
        }
    return entry


def density_steps_part(op, warm, cost, probes: int = 4) -> list[dict]:
    """SLQ with ``probes`` probes (the monitor's default count on large models) at each of
    :data:`DENSITY_STEPS`; the same probes every time (one seed), so a run of ``m`` steps is
    the first ``m`` steps of the longest."""
    entries = []
    for steps in DENSITY_STEPS:
        seconds, density = stopwatch(lambda s=steps: slq(op, num_probes=probes, steps=s), op.device)
        entry = cost(seconds, density.num_hvps)
        entry["probes"], entry["steps"] = probes, steps
        entry["scalars"] = density_scalars(density, warm.eigenvalues, op.size)
        entries.append(entry)
    return entries


def shared_probes_part(op, warm, cost, probes: int = 4, steps: int = 64, repeats: int = 2) -> dict:
    """The trace (33 probes) and density (``probes × steps``) on separate probes with an
    undeflated density, against :func:`deflated_spectrum` (shared, deflated probes),
    interleaved ``repeats`` times; ``λ_min`` against a solve for the smallest eigenvalue."""

    def separate():
        trace = deflated_hutchinson(op, warm.eigenvectors, warm.eigenvalues, 33)
        return trace, slq(op, num_probes=probes, steps=steps), 33 + probes * steps

    def shared():
        both = deflated_spectrum(
            op, warm.eigenvectors, warm.eigenvalues, 33, probes, steps, residuals=warm.residuals
        )
        return both.trace, both.density, both.num_hvps

    runs: dict[str, dict] = {"separate": {"seconds": []}, "shared": {"seconds": []}}
    for _ in range(repeats):
        for label, run in (("separate", separate), ("shared", shared)):
            before = op.num_hvps
            seconds, (trace, density, products) = stopwatch(run, op.device)
            assert op.num_hvps - before == products
            entry = runs[label]
            entry["seconds"].append(seconds)
            entry["products"] = products
            entry["trace"], entry["trace_stderr"] = trace.estimate, trace.stderr
            entry["scalars"] = density_scalars(density, warm.eigenvalues, op.size)
    for entry in runs.values():
        seconds = statistics.median(entry.pop("seconds"))
        entry.update(cost(seconds, entry["products"]))
    smallest = eigenpairs(op, k=1, which="SA", tol=1e-6, max_iter=400)
    return {"probes": probes, "steps": steps, "lambda_min": float(smallest.eigenvalues[0]), **runs}


def markdown(rows: list[dict], meta: dict) -> str:
    cells = []
    for row in rows:
        entries = [("top-10, cold", row["top_k_cold"]), ("top-10, warm", row["top_k_warm"])]
        entries += list(row.get("trace", {}).items())
        if "density" in row:
            density = row["density"]
            entries.append((f"SLQ {density['probes']}×{density['steps']}", density))
        cells += [
            [
                row["workload"],
                label,
                e["products"],
                f"{e['seconds']:.2f}",
                f"{e['gradient_times']:.0f}",
            ]
            for label, e in entries
        ]
    description = (
        "Products, seconds and gradient-times (seconds over one gradient of the probe) of each "
        "part, as the monitor runs them after 20 (cold) and 70 (warm) SGD steps."
    )
    header = ["workload", "part", "products", "seconds", "gradient-times"]
    title = "Parts of one HessianSpectrumMonitor measurement"
    lines = [document(title, meta, description, header, cells).rstrip("\n")]
    traced = [row for row in rows if "trace" in row]
    if traced:
        lines += [
            "",
            "The trace estimates' spread over three seeds, relative to the mean of the "
            "99-product Hutch++ estimates:",
            "",
            "| workload | " + " | ".join(traced[0]["trace"]) + " |",
            "|---|" + "---|" * len(traced[0]["trace"]),
        ]
    for row in traced:
        spreads = [f"{e['relative_spread']:.1e}" for e in row["trace"].values()]
        lines.append(f"| {row['workload']} | " + " | ".join(spreads) + " |")
    densities = [row for row in rows if "density" in row]
    if densities:
        lines += [
            "",
            "The density's scalars from all 8 probes, and their standard deviation over "
            "disjoint groups of 1, 2 and 4 of those probes (the error of a density with that "
            "many probes; 8, 4 and 2 groups):",
            "",
            "| workload | scalar | 8 probes | std, 1 probe | std, 2 probes | std, 4 probes |",
            "|---|---|---|---|---|---|",
        ]
    for row in densities:
        density = row["density"]
        spread = {str(size): v for size, v in density.get("spread_by_probes", {}).items()}
        for key, value in density["all_probes"].items():
            cells = [f"{spread[s][key]:.2g}" if s in spread else "" for s in ("1", "2", "4")]
            lines.append(f"| {row['workload']} | {key} | {value:.4g} | " + " | ".join(cells) + " |")
    stepped = [row for row in rows if "density_steps" in row]
    if stepped:
        keys = list(stepped[0]["density_steps"][0]["scalars"])
        lines += [
            "",
            "SLQ with 4 probes at several numbers of steps per probe (the same probes): each "
            "scalar, and the products and gradient-times of the density:",
            "",
        ]
        cells = [
            [row["workload"], entry["steps"], entry["products"], f"{entry['gradient_times']:.0f}"]
            + [f"{entry['scalars'][key]:.4g}" for key in keys]
            for row in stepped
            for entry in row["density_steps"]
        ]
        lines += table(["workload", "steps", "products", "gradient-times", *keys], cells)
    shared = [row for row in rows if "shared_probes" in row]
    if shared:
        keys = list(shared[0]["shared_probes"]["shared"]["scalars"])
        lines += [
            "",
            "The trace (33 probes, deflated by the warm top-10) and the density (4 × 64) on "
            "separate probes with an undeflated density (the monitor until 2026-12-06), against "
            "one set of shared probes with the density deflated (the monitor since) "
            "(`deflated_spectrum`), run alternately twice (median seconds); the last column "
            "is λ_min from a solve for the smallest eigenvalue (tol 1e-6):",
            "",
        ]
        cells = [
            [row["workload"], label, e["products"], f"{e['gradient_times']:.0f}"]
            + [f"{e['trace']:.5g} ± {e['trace_stderr']:.2g}"]
            + [f"{e['scalars'][key]:.5g}" for key in keys]
            + [f"{row['shared_probes']['lambda_min']:.5g}"]
            for row in shared
            for label, e in row["shared_probes"].items()
            if isinstance(e, dict)
        ]
        header = ["workload", "probes", "products", "gradient-times", "trace", *keys, "λ_min"]
        lines += table(header, cells)
    return "\n".join(lines) + "\n"


def merge_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``new`` over ``earlier``, workload by workload and part by part."""
    rows = {row["workload"]: dict(row) for row in earlier}
    for row in new:
        rows.setdefault(row["workload"], {}).update(row)
    return list(rows.values())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = study_parser(__doc__, workloads=["C1", "G1"])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS[:2]))
    args = parser.parse_args(argv)
    rows = [parts(name, tuple(args.parts)) for name in workload_names(args)]
    # Runs of some parts or workloads on one day add to one file.
    return finish("spectrum-parts", rows, args, markdown, merge=merge_rows)


if __name__ == "__main__":
    main()
