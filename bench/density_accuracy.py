"""The density's scalars against dense float64 spectra: SLQ as the monitor runs it, with
fewer steps, and deflated by the top-10 Ritz pairs (CPU, about 3 minutes).

    python -m bench.density_accuracy            # four models, 8 seeds per setting
    python -m bench.density_accuracy --smoke    # one small model, 2 seeds (the test suite)

For small models whose Hessian fits densely (float64, one product per unit vector), the
exact spectrum gives each scalar ``HessianSpectrumMonitor`` logs from its density
(``negative_mass``, ``near_zero_mass``, ``lambda_min``, ``outliers`` and ``bulk_edge`` by the
rule of :func:`~spectral_callbacks.linalg.count_outliers` on the exact spectrum). Each
setting is then run with ``seeds`` probe seeds on the same top-10 Ritz pairs (``eigenpairs``
at the monitor's ``tol=1e-3``), and the table gives the mean absolute error over seeds
(``lambda_min`` and ``bulk_edge`` relative to the spectral radius) with the density's
products. Settings: ``slq P×m`` (:func:`~spectral_callbacks.linalg.slq`, the monitor at
``m = 64``) and ``deflated P×m`` (:func:`~spectral_callbacks.linalg.deflated_spectrum`).
Writes ``bench/results/density-accuracy-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bench.outliers import dense_hessian
from bench.report import document
from bench.spectrum_parts import density_scalars
from bench.study import finish, study_parser
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import SpectralDensity, deflated_spectrum, eigenpairs, slq
from spectral_callbacks.workloads import (
    TanhRegressor,
    gaussian_mixture,
    make_workload,
    teacher_regression,
)

#: (label, deflated, probes, steps) of each setting; the first is the monitor's.
SETTINGS = (
    ("slq 4×64", False, 4, 64),
    ("slq 4×32", False, 4, 32),
    ("deflated 4×64", True, 4, 64),
    ("deflated 4×32", True, 4, 32),
    ("deflated 4×24", True, 4, 24),
    ("deflated 2×64", True, 2, 64),
)
SCALARS = ("negative_mass", "near_zero_mass", "lambda_min", "outliers", "bulk_edge")
TITLE = "Density scalars against dense spectra"
DESCRIPTION = (
    "`python -m bench.density_accuracy`: the exact scalar (row `exact`; the outliers and "
    "bulk edge by `count_outliers` on the exact spectrum) and, for each setting, the mean "
    "absolute error over 8 probe seeds (`lambda_min` and `bulk_edge` relative to the "
    "spectral radius), with the density's products; the top-10 from `eigenpairs` at "
    "`tol=1e-3`, shared by all settings."
)


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def mean_squared(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def trained(model: nn.Module, loss_fn, batch, steps: int, lr: float) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def classifier(steps: int, width: int = 32):
    """Tanh MLP on a 10-class Gaussian mixture (``bench.outliers``): outliers over a bulk."""
    x, y = gaussian_mixture(2048, d=32, seed=1, means_seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    ).double()
    batch = (x.double(), y)
    return trained(model, cross_entropy, batch, steps, lr=0.1), cross_entropy, batch


def demo_regressor(steps: int):
    """The demo's tanh MLP by gradient descent: a bulk straddling zero."""
    torch.manual_seed(1)
    x, y = teacher_regression()
    model = TanhRegressor(lr=0.3).double()
    batch = (x.double(), y.double())
    return trained(model, mean_squared, batch, steps, lr=0.3), mean_squared, batch


def tiny_workload():
    model, batch, loss_fn = make_workload("tiny", torch.device("cpu"))
    return model.double(), loss_fn, (batch[0].double(), batch[1])


MODELS = {
    "tanh MLP, CE, 100 steps": lambda: classifier(100),
    "tanh MLP, CE, 1,000 steps": lambda: classifier(1000),
    "demo tanh MLP, MSE, 2,000 GD steps": lambda: demo_regressor(2000),
    "tiny (64-64-10), 20 SGD steps": tiny_workload,
}
SMOKE_MODELS = {"tanh MLP, CE, 100 steps (narrow)": lambda: classifier(100, width=8)}


def study(label: str, build, seeds: int) -> dict:
    model, loss_fn, batch = build()
    with HessianOperator(model, loss_fn, batch) as operator:
        n = operator.size
        spectrum = torch.linalg.eigvalsh(dense_hessian(operator))
        exact = SpectralDensity.of_spectrum(spectrum)
        truth = density_scalars(exact, spectrum.flip(0)[:10], n)
        radius = float(spectrum.abs().max())
        top = eigenpairs(operator, k=10, tol=1e-3, return_eigenvectors=True)
        errors: dict[str, dict] = {}
        for name, deflated, probes, steps in SETTINGS:
            found = []
            for seed in range(seeds):
                if deflated:
                    density = deflated_spectrum(
                        operator, top.eigenvectors, top.eigenvalues, None, probes, steps, seed
                    ).density
                else:
                    density = slq(operator, num_probes=probes, steps=steps, seed=seed)
                found.append(density_scalars(density, top.eigenvalues, n))
            scale = {"lambda_min": radius, "bulk_edge": radius}
            errors[name] = {
                key: statistics.mean(abs(f[key] - truth[key]) for f in found) / scale.get(key, 1.0)
                for key in SCALARS
            }
            errors[name]["products"] = probes * min(steps, n)
    return {"model": label, "parameters": n, "truth": truth, "errors": errors}


def markdown(rows: list[dict], meta: dict) -> str:
    header = ["model (n)", "setting", "products", *SCALARS]
    cells = []
    for row in rows:
        truth = row["truth"]
        cells.append(
            [
                f"{row['model']} ({row['parameters']:,})",
                "exact",
                "",
                *(f"{truth[k]:.4g}" for k in SCALARS),
            ]
        )
        for name, entry in row["errors"].items():
            cells.append(["", name, entry["products"], *(f"{entry[k]:.2g}" for k in SCALARS)])
    return document(TITLE, meta, DESCRIPTION, header, cells)


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__).parse_args(argv)
    models, seeds = (SMOKE_MODELS, 2) if args.smoke else (MODELS, 8)
    rows = [study(label, build, seeds) for label, build in models.items()]
    return finish("density-accuracy", rows, args, markdown, key=lambda row: row["model"])


if __name__ == "__main__":
    main()
