"""Matplotlib figures of spectra (built as ``Figure`` objects, never through pyplot)."""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import SpectralDensity

__all__ = [
    "alpha_by_layer_figure",
    "density_figure",
    "esd_figure",
    "layer_trace_figure",
    "scree_figure",
]


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
    return _labelled(figure, axes, "rank", "covariance eigenvalue", "scree", layer, step)


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


def esd_figure(
    eigenvalues: torch.Tensor, fit: Any = None, layer: str = "", step: int | None = None
) -> Any:
    """A layer's ESD on log-log axes (a histogram in logarithmic bins, as a density) with the
    fitted power-law tail ``p(λ) = (n_tail / n) (α − 1) / xmin · (λ / xmin)^{−α}``."""
    import numpy as np
    from matplotlib.figure import Figure

    values = eigenvalues.detach().double().cpu().numpy()
    positive = values[values > 0]
    figure = Figure(figsize=(5, 3.2), dpi=100)
    axes = figure.add_subplot()
    if positive.size > 1 and positive.max() > positive.min():
        edges = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 40)
        density, edges = np.histogram(positive, bins=edges, density=True)
        centres = np.sqrt(edges[:-1] * edges[1:])
        shown = density > 0
        axes.loglog(centres[shown], density[shown], ".", color="tab:blue", label="ESD")
        if fit is not None and fit.xmax > fit.xmin:
            grid = np.logspace(np.log10(fit.xmin), np.log10(fit.xmax), 50)
            share = fit.num_tail / positive.size
            tail = share * (fit.alpha - 1) / fit.xmin * (grid / fit.xmin) ** (-fit.alpha)
            axes.loglog(grid, tail, color="tab:red", label=f"α = {fit.alpha:.2f} (λ ≥ xmin)")
            axes.axvline(fit.xmin, color="tab:red", linewidth=0.6, linestyle=":")
        axes.legend(fontsize=8)
    return _labelled(figure, axes, "eigenvalue of WᵀW", "density", "ESD", layer, step)


def alpha_by_layer_figure(
    alphas: dict[str, float], farms_alphas: dict[str, float] | None = None, step: int | None = None
) -> Any:
    """α of each layer against its depth (model order), with the 2 and 6 guides of
    heavy-tailed self-regularisation and, when given, the FARMS α."""
    from matplotlib.figure import Figure

    names = list(alphas)
    depth = list(range(len(names)))
    figure = Figure(figsize=(max(4.5, 0.3 * len(names) + 2.0), 3.2), dpi=100)
    axes = figure.add_subplot()
    axes.plot(depth, [alphas[n] for n in names], "o-", markersize=3, label="α")
    if farms_alphas is not None:
        axes.plot(
            depth,
            [farms_alphas.get(n, float("nan")) for n in names],
            "s--",
            markersize=3,
            label="FARMS α",
        )
    for guide in (2.0, 6.0):
        axes.axhline(guide, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xticks(depth, names, rotation=70, ha="right", fontsize=6)
    axes.set_ylabel("α")
    axes.legend(fontsize=8)
    axes.set_title("α by layer depth" + (f", step {step}" if step is not None else ""), fontsize=9)
    figure.tight_layout()
    return figure


def _labelled(figure, axes, xlabel: str, ylabel: str, kind: str, layer, step):
    """Axis labels and the title ``"{kind}: {layer}, step {step}"``; the laid-out figure."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    title = f"{kind}: {layer}" if layer else kind
    axes.set_title(title if step is None else f"{title}, step {step}", fontsize=9)
    figure.tight_layout()
    return figure
