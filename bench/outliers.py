"""Outliers of the Hessian of small MLPs on a 10-class Gaussian mixture (CPU, about 1 minute).

    python -m bench.outliers            # 3 seeds, 2 training lengths
    python -m bench.outliers --smoke    # 1 seed, tiny (the test suite runs this)

Papyan (2019) ties the Hessian's outliers to the classes (C or C(C-1) of them); small MLPs
showed fewer. For each model this counts the outliers by the rule of
:func:`spectral_callbacks.linalg.count_outliers` twice: from the exact spectrum (dense
float64 Hessian, one node per eigenvalue) and as ``HessianSpectrumMonitor`` does, from
top-20 Lanczos values and an SLQ density (8 probes, 64 steps). Writes
``bench/results/outliers-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.report import document
from bench.study import finish, study_parser
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import (
    SpectralDensity,
    count_outliers,
    lanczos,
    slq,
)
from spectral_callbacks.workloads import gaussian_mixture


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(operator: HessianOperator) -> torch.Tensor:
    eye = torch.eye(operator.size, dtype=operator.dtype)
    rows = [operator.matmat(eye[i : i + 64]) for i in range(0, operator.size, 64)]
    dense = torch.cat(rows).double()
    return 0.5 * (dense + dense.T)


def study(seed: int, steps: int, smoke: bool) -> dict:
    d, width = (16, 16) if smoke else (32, 32)
    x, y = gaussian_mixture(512 if smoke else 2048, d=d, seed=seed + 1, means_seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    ).double()
    x = x.double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, (x, y)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with HessianOperator(model, loss_fn, (x, y)) as operator:
        dense = dense_hessian(operator)
        spectrum = torch.linalg.eigvalsh(dense).flip(0)
        n = operator.size
        exact = count_outliers(spectrum[:20], SpectralDensity.of_spectrum(spectrum), n)
        top = lanczos(operator, k=20, tol=1e-6, seed=seed).eigenvalues
        density = slq(operator, num_probes=8, steps=64, seed=seed)
        estimated = count_outliers(top, density, n)
    return {
        "seed": seed,
        "steps": steps,
        "parameters": n,
        "accuracy": float((model(x).argmax(1) == y).double().mean()),
        "top": spectrum[:12].tolist(),
        "dense_count": exact.count,
        "slq_count": estimated.count,
        "dense_edge": exact.bulk_edge,
        "slq_edge": estimated.bulk_edge,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    header = ["seed", "SGD steps", "parameters", "train accuracy", "dense count", "SLQ count"]
    header += ["bulk edge (dense / SLQ)", "top eigenvalues"]
    cells = [
        [
            row["seed"],
            row["steps"],
            f"{row['parameters']:,}",
            f"{row['accuracy']:.2f}",
            row["dense_count"],
            row["slq_count"],
            f"{row['dense_edge']:.3g} / {row['slq_edge']:.3g}",
            ", ".join(f"{v:.3g}" for v in row["top"][:8]),
        ]
        for row in rows
    ]
    description = (
        "`python -m bench.outliers`: full-batch SGD (lr 0.1), float64; the rule of "
        "`count_outliers` on the exact spectrum and on top-20 Lanczos + SLQ (8 × 64)."
    )
    title = "Outliers of MLP Hessians on a 10-class Gaussian mixture"
    return document(title, meta, description, header, cells)


def main(argv: list[str] | None = None) -> list[dict]:
    args = study_parser(__doc__).parse_args(argv)
    seeds, lengths = ([0], [20]) if args.smoke else ([0, 1, 2], [100, 1000])
    rows = [study(seed, steps, args.smoke) for steps in lengths for seed in seeds]
    return finish("outliers", rows, args, markdown, key=lambda row: (row["seed"], row["steps"]))


if __name__ == "__main__":
    main()
