"""SLQ's negative spectral mass and λ_min against exact values (device-free, ~3 min on 2 cores).

    python bench/negative_mass.py

For five small models (tanh and ReLU MLPs, MSE and cross-entropy, trained and at
initialisation) it forms the dense float64 Hessian, and compares the fraction of eigenvalues
below zero and below ``-1 %`` of the spectral radius with the SLQ estimates of the same
(8 probes, 48 steps): the plain quadrature ``mass_below(0)`` and the resolved
``negative_mass``. Prints a markdown table, then a second one: the exact smallest eigenvalue
against ``lambda_min`` (the smallest Ritz value of the same quadrature) with its Ritz
residual, at 48 steps and at the monitors' default of 64; and a third for W1 (20 SGD steps
more than the harness's 20) and a 2-layer GPT, too large for dense spectra, against a
separate Lanczos solve for the smallest eigenvalue (``which="SA"``, ``tol=1e-8``); W1's
density at 64 steps exceeds ``FULL_REORTHOGONALISATION_BYTES`` and keeps two vectors.
"""

from __future__ import annotations

import pathlib
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convergence import small_gpt  # noqa: E402
from run import make_workload, sgd_steps  # noqa: E402

from spectral_callbacks.curvature import HessianOperator  # noqa: E402
from spectral_callbacks.demo import TanhRegressor, teacher_regression  # noqa: E402
from spectral_callbacks.functional import hessian_density  # noqa: E402
from spectral_callbacks.linalg import ZERO_TOLERANCE, lanczos, slq  # noqa: E402


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def classifier(activation: type[nn.Module] | None) -> nn.Module:
    """32 -> 48 -> 10 with ``activation``, or linear 32 -> 10 without."""
    if activation is None:
        return nn.Sequential(nn.Linear(32, 10))
    return nn.Sequential(nn.Linear(32, 48), activation(), nn.Linear(48, 10))


def cases():
    """(name, model trained as stated, loss, batch) for each model of the table."""
    g = torch.Generator().manual_seed(0)
    batches = {
        mse: teacher_regression(),
        cross_entropy: (
            torch.randn(256, 32, generator=g),
            torch.randint(0, 10, (256,), generator=g),
        ),
    }
    demo = partial(TanhRegressor, 0.3)
    specs = (  # name, seed of the weights, model, loss, SGD steps, learning rate
        ("tanh MLP, MSE, 2,000 GD steps (demo)", 1, demo, mse, 2000, 0.3),
        ("tanh MLP, MSE, initialisation", 1, demo, mse, 0, 0.3),
        ("ReLU MLP, CE, 200 steps", 0, partial(classifier, nn.ReLU), cross_entropy, 200, 0.1),
        ("linear, CE, 50 steps", 0, partial(classifier, None), cross_entropy, 50, 0.1),
        ("tanh MLP, CE, initialisation", 0, partial(classifier, nn.Tanh), cross_entropy, 0, 0.1),
    )
    for name, seed, build, loss_fn, steps, lr in specs:
        torch.manual_seed(seed)
        batch = batches[loss_fn]
        yield name, sgd_steps(build(), batch, loss_fn, steps, lr), loss_fn, batch


def main() -> None:
    rows = []
    print(
        "| model | n | exact < 0 | SLQ nodes < 0 | exact < −1 % radius | `negative_mass` "
        "| exact within ±1 % | `near_zero_mass` |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, loss_fn, batch in cases():
        with HessianOperator(model, loss_fn, batch) as op:
            hessian = op.matmat(torch.eye(op.size)).double()
        eigenvalues = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))
        density = hessian_density(model, loss_fn, batch, num_probes=8, steps=48)
        cut = ZERO_TOLERANCE * float(eigenvalues.abs().max())
        fraction = lambda mask: float(mask.double().mean())  # noqa: E731
        rows.append((name, eigenvalues, density, hessian_density(model, loss_fn, batch, steps=64)))
        print(
            f"| {name} | {eigenvalues.numel()} | {fraction(eigenvalues < 0):.3f} "
            f"| {density.mass_below(0.0):.3f} | {fraction(eigenvalues < -cut):.3f} "
            f"| {density.negative_mass:.3f} | {fraction(eigenvalues.abs() <= cut):.3f} "
            f"| {density.near_zero_mass:.3f} |"
        )
    print()
    print(
        "| model | exact λ_min | λ_max | `lambda_min`, 48 steps | residual | error / λ_max "
        "| `lambda_min`, 64 steps | residual | error / λ_max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, eigenvalues, *densities in rows:
        low, high = float(eigenvalues[0]), float(eigenvalues[-1])
        cells = "".join(
            f"| {d.lambda_min:.4g} | {d.lambda_min_residual:.1e} "
            f"| {abs(d.lambda_min - low) / high:.1e} "
            for d in densities
        )
        print(f"| {name} | {low:.4g} | {high:.4g} {cells}|")


def larger_models() -> None:
    """``lambda_min`` of W1 and a 2-layer GPT against a converged smallest-eigenvalue solve."""
    cpu = torch.device("cpu")
    model, batch, loss_fn = make_workload("W1", cpu)[:3]
    cases = [("W1, 40 SGD steps", sgd_steps(model, batch, loss_fn, steps=20), loss_fn, batch)]
    model, batch, loss_fn = small_gpt(cpu)
    cases.append(("GPT, 2 layers, d 96", model, loss_fn, batch))
    print()
    print(
        "| model | λ_min (SA solve) | λ_max | steps | full reorthogonalisation | `lambda_min` "
        "| residual | error / λ_max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, loss_fn, batch in cases:
        with HessianOperator(model, loss_fn, batch) as op:
            low = float(lanczos(op, k=1, which="SA", tol=1e-8, max_iter=300).eigenvalues[0])
            high = float(lanczos(op, k=1, tol=1e-8, max_iter=300).eigenvalues[0])
            for steps in (16, 32, 64):
                density = slq(op, num_probes=8, steps=steps, seed=0)
                error = abs(density.lambda_min - low) / high
                print(
                    f"| {name} | {low:.5g} | {high:.4g} | {steps} "
                    f"| {'yes' if density.reorthogonalized else 'no (two vectors)'} "
                    f"| {density.lambda_min:.5g} "
                    f"| {density.lambda_min_residual:.1e} | {error:.1e} |"
                )


if __name__ == "__main__":
    main()
    larger_models()
