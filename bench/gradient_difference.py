"""Products from gradient differences against exact products, on the CPU (about 3 minutes).

    python -m bench.gradient_difference            # all three parts
    python -m bench.gradient_difference --smoke    # tiny sizes (the test suite runs this)

1. Cost of one product in gradient-times, by path, on an MLP (784-128-128-10), a BatchNorm
   CNN and a 2-layer GPT on default attention kernels: the reused graph, a vmapped block of 8
   (per vector), and gradient differences, central and Richardson; and each product's
   relative error against the reused graph (float32). Tools interleaved per repeat.
2. λ_max to ``tol=1e-3`` from a cold start, three seeds: products and seconds per path,
   and the value's relative difference from the exact path's value at ``tol=1e-6``.
3. Peak memory (resident set, fresh process) of one λ_max measurement of a GPT with context
   T = 1024: gradient differences on default attention kernels against the reused graph
   on the math kernel (the only path with double backward through attention).

Writes ``bench/results/gradient-difference-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import pathlib
import statistics
import subprocess
import sys

import torch

from bench.harness import stopwatch
from bench.report import heading
from bench.study import finish, study_parser
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.functional import hessian_eigenvalues
from spectral_callbacks.workloads import classification_loss, make_workload

ROOT = pathlib.Path(__file__).resolve().parents[1]


CPU = torch.device("cpu")
#: Workloads of the registry (spectral_callbacks.workloads) by part, full and smoke sizes.
COST_WORKLOADS = {False: ("mlp-128", "cnn-16", "gpt-2L"), True: ("tiny", "cnn-4", "gpt-tiny")}
CONVERGENCE_WORKLOADS = {False: ("mlp-128", "gpt-2L"), True: ("tiny", "gpt-tiny")}
MEMORY_WORKLOAD = {False: "gpt-2L-1024", True: "gpt-tiny-32"}


def workload(name: str):
    """(model, batch) after 10 SGD steps, in eval mode."""
    model, batch, _ = make_workload(name, CPU, steps=10)
    return model, batch


def _seconds(fn) -> float:
    return stopwatch(fn, CPU)[0]


def product_costs(name: str, repeats: int) -> dict:
    model, batch = workload(name)
    params = [p for p in model.parameters() if p.requires_grad]
    operators = {
        "reuse_graph": HessianOperator(model, classification_loss, batch, hvp="reuse_graph"),
        "vmap_8": HessianOperator(model, classification_loss, batch, hvp="forward_over_reverse"),
        "gradient_difference": HessianOperator(
            model, classification_loss, batch, hvp="gradient_difference"
        ),
        "gradient_difference_richardson": HessianOperator(
            model, classification_loss, batch, hvp="gradient_difference", richardson=True
        ),
    }
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(1, operators["reuse_graph"].size, generator=g)
    block = torch.randn(8, vector.shape[1], generator=g)
    exact = operators["reuse_graph"].matmat(block)
    errors = {}
    for path, operator in operators.items():
        approx = operator.matmat(block)  # also a warm-up
        errors[path] = float(((approx - exact).norm(dim=1) / exact.norm(dim=1)).max())

    def gradient():
        torch.autograd.grad(classification_loss(model, batch), params)

    gradient()
    times: dict[str, list[float]] = {"gradient": [], **{path: [] for path in operators}}
    for _ in range(repeats):  # interleaved: drift hits every path alike
        times["gradient"].append(_seconds(gradient))
        for path, operator in operators.items():
            if path == "vmap_8":
                times[path].append(_seconds(lambda o=operator: o.matmat(block)) / 8)
            else:
                times[path].append(_seconds(lambda o=operator: o.matmat(vector)))
    for operator in operators.values():
        operator.close()
    medians = {path: statistics.median(values) for path, values in times.items()}
    return {
        "workload": name,
        "parameters": sum(p.numel() for p in params),
        "ms": {path: 1e3 * value for path, value in medians.items()},
        "gradient_times": {path: value / medians["gradient"] for path, value in medians.items()},
        "relative_error": {p: e for p, e in errors.items() if p != "reuse_graph"},
    }


def convergence(name: str, seeds: int = 3) -> dict:
    model, batch = workload(name)
    reference = hessian_eigenvalues(model, classification_loss, batch, k=1, tol=1e-6)
    truth = float(reference.eigenvalues[0])
    rows = {}
    for path in ("reuse_graph", "gradient_difference"):
        products, seconds, errors, converged = [], [], [], []
        for seed in range(seeds):
            elapsed, result = stopwatch(
                lambda seed=seed, path=path: hessian_eigenvalues(
                    model, classification_loss, batch, k=1, tol=1e-3, seed=seed, hvp=path
                ),
                CPU,
            )
            seconds.append(elapsed)
            products.append(result.num_hvps)
            errors.append(abs(float(result.eigenvalues[0]) / truth - 1))
            converged.append(bool(result.converged.all()))
        rows[path] = {
            "hvps": products,
            "median_seconds": statistics.median(seconds),
            "max_relative_error": max(errors),
            "all_converged": all(converged),
        }
    return {"workload": name, "lambda_max": truth, "paths": rows}


MEMORY_CHILD = """
import resource, torch
from bench import gradient_difference as study
from spectral_callbacks.workloads import classification_loss
from spectral_callbacks.functional import hessian_eigenvalues
torch.set_num_threads(2)
model, batch = study.workload({name!r})
torch.autograd.grad(classification_loss(model, batch), list(model.parameters()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = hessian_eigenvalues(model, classification_loss, batch, k=1, tol=1e-3, hvp={hvp!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024, float(result.eigenvalues[0]), result.num_hvps)
"""


def memory(name: str) -> dict:
    rows = {}
    for hvp in ("gradient_difference", "reuse_graph"):
        code = MEMORY_CHILD.format(name=name, hvp=hvp)
        out = subprocess.run(  # from the repository root, where bench is a package
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout.split()
        rows[hvp] = {
            "extra_peak_mb": float(out[0]),
            "lambda_max": float(out[1]),
            "hvps": int(out[2]),
        }
    return {"workload": name, "paths": rows}


def markdown(rows: list[dict], meta: dict) -> str:
    result = {part: [r for r in rows if r["part"] == part] for part in PARTS}
    repeats = ", ".join(sorted({str(r["repeats"]) for r in result["costs"]})) or "-"
    lines = [
        heading("Products from gradient differences", meta),
        "",
        f"Median of {repeats} interleaved repeats.",
        "",
        "**1. One product** (ms; × one gradient; relative error against the exact product)",
        "",
        "| workload | parameters | gradient | reused graph | vmap 8 (per vector) | "
        "gradient difference | with Richardson |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["costs"]:
        ms, times, errors = row["ms"], row["gradient_times"], row["relative_error"]
        cells = [f"{ms['gradient']:.2f}", f"{ms['reuse_graph']:.2f} ({times['reuse_graph']:.1f}×)"]
        for path in ("vmap_8", "gradient_difference", "gradient_difference_richardson"):
            cells.append(f"{ms[path]:.2f} ({times[path]:.1f}×; {errors[path]:.1e})")
        lines.append(f"| {row['workload']} | {row['parameters']:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**2. λ_max to tol=1e-3, cold** (three seeds; error against the exact path at 1e-6)",
        "",
        "| workload | path | HVPs | median s | max rel. error | converged |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["convergence"]:
        for path, values in row["paths"].items():
            lines.append(
                f"| {row['workload']} | {path} | {values['hvps']} | "
                f"{values['median_seconds']:.3f} | {values['max_relative_error']:.1e} | "
                f"{values['all_converged']} |"
            )
    lines += [
        "",
        "**3. Peak memory of one λ_max measurement** "
        "(resident-set peak above that of one gradient, fresh process)",
        "",
    ]
    for row in result["memory"]:
        paths = row["paths"]
        lines.append(
            f"{row['workload']}: gradient differences on default attention kernels "
            f"{paths['gradient_difference']['extra_peak_mb']:.0f} MB "
            f"({paths['gradient_difference']['hvps']} products), reused graph on the math "
            f"kernel {paths['reuse_graph']['extra_peak_mb']:.0f} MB "
            f"({paths['reuse_graph']['hvps']} products); λ_max "
            f"{paths['gradient_difference']['lambda_max']:.6g} vs "
            f"{paths['reuse_graph']['lambda_max']:.6g}."
        )
    return "\n".join(lines) + "\n"


PARTS = ("costs", "convergence", "memory")


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__, repeats=5).parse_args(argv)
    smoke = args.smoke
    repeats = 2 if smoke else args.repeats
    rows = [
        {"part": "costs", "repeats": repeats, **product_costs(name, repeats)}
        for name in COST_WORKLOADS[smoke]
    ]
    rows += [
        {"part": "convergence", **convergence(name, 1 if smoke else 3)}
        for name in CONVERGENCE_WORKLOADS[smoke]
    ]
    rows.append({"part": "memory", **memory(MEMORY_WORKLOAD[smoke])})
    return finish(
        "gradient-difference", rows, args, markdown, key=lambda r: (r["part"], r["workload"])
    )


if __name__ == "__main__":
    main()
