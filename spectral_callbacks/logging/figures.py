"""Matplotlib figures of spectra (built as ``Figure`` objects, never through pyplot)."""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import SpectralDensity

__all__ = ["density_figure", "layer_trace_figure", "scree_figure"]


def density_figure(
    density: SpectralDensity,
    top_eigenvalues: torch.Tensor | None = None,
    step: int | None = None,
    sigma_fraction: float = 0.01,
    points: int = 1000,
) -> Any:
    """Hessian eigenvalue density on a log scale, as in Ghorbani et al. (2019).

    The density is the SLQ estimate smoothed with Gaussians of width ``sigma_fraction`` times
    the spectral range; the top eigenvalues, when given, are marked as vertical lines.
    """
    from matplotlib.figure import Figure

    low, high = density.support
    if top_eigenvalues is not None and top_eigenvalues.numel():
        finite = top_eigenvalues[torch.isfinite(top_eigenvalues)]
        if finite.numel():
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    span = max(high - low, 1e-12)
    sigma = sigma_fraction * span
    grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, points, dtype=torch.float64)
    values = density.evaluate(grid, sigma).clamp_min(1e-12)
    figure = Figure(figsize=(5, 3.2), dpi=100)
    axes = figure.add_subplot()
    axes.semilogy(grid.numpy(), values.numpy(), color="tab:blue")
    peak = float(values.max())
    axes.set_ylim(peak * 1e-7, peak * 2)
    if top_eigenvalues is not None:
        for value in top_eigenvalues.tolist():
            axes.axvline(value, color="tab:red", linewidth=0.6, alpha=0.6)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log)")
    title = "Hessian eigenvalue density (SLQ)"
    axes.set_title(title if step is None else f"{title}, step {step}", fontsize=9)
    figure.tight_layout()
    return figure


def scree_figure(
    spectrum: torch.Tensor, fit: Any = None, layer: str = "", step: int | None = None
) -> Any:
    """Covariance eigenvalue against rank on log-log axes, with the α-ReQ power-law fit."""
    from matplotlib.figure import Figure

    values = spectrum.detach().double().cpu()
    ranks = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    positive = values > 0
    figure = Figure(figsize=(5, 3.2), dpi=100)
    axes = figure.add_subplot()
    axes.loglog(
        ranks[positive].numpy(), values[positive].numpy(), ".", markersize=3, color="tab:blue"
    )
    if fit is not None:
        axes.loglog(
            fit.ranks.numpy(),
            fit.predict(fit.ranks).numpy(),
            color="tab:red",
            label=f"α = {fit.alpha:.3f}",
        )
        axes.legend(fontsize=8)
    axes.set_xlabel("rank")
    axes.set_ylabel("covariance eigenvalue")
    title = f"scree: {layer}" if layer else "scree"
    axes.set_title(title if step is None else f"{title}, step {step}", fontsize=9)
    figure.tight_layout()
    return figure


def layer_trace_figure(per_parameter: dict[str, float], step: int | None = None) -> Any:
    """The trace of each layer's diagonal Hessian block per parameter of the layer, by layer
    in model order (log scale when every value is positive): where the curvature sits."""
    from matplotlib.figure import Figure

    names, values = list(per_parameter), list(per_parameter.values())
    figure = Figure(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.2), dpi=100)
    axes = figure.add_subplot()
    axes.bar(range(len(names)), values, color="tab:orange")
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    if all(value > 0 for value in values):
        axes.set_yscale("log")
    axes.set_ylabel("tr(H_ll) / parameters")
    axes.set_title("Hessian trace per parameter by layer" + (f", step {step}" if step else ""))
    figure.tight_layout()
    return figure
