"""Weight spectra of a whole model: which layers, their ESDs in batches, their metrics.

A *layer* here is a module with a ``weight`` tensor of at least 2 dimensions: linear layers,
convolutions, embeddings, Hugging Face's ``Conv1D``; normalisation layers (1-d weights) are
not. A weight shared by several modules (tied embeddings) is measured once, under the first
module's name. A parametrized weight (``torch.nn.utils.parametrizations``) is the one the
module computes with, read as in eval mode and without touching the parametrization's
state: ``spectral_norm`` read in training mode would advance its power iteration.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import check_name_filter
from .._names import is_name_or_prefix, uncompiled_name
from ..curvature.isolation import ModelStateSnapshot
from .esd import layer_esds
from .metrics import layer_metrics
from .powerlaw import PowerLawFit, fit_power_law

__all__ = [
    "AVERAGED_METRICS",
    "LayerFilter",
    "LayerSpectrum",
    "check_layer_filter",
    "model_averages",
    "spectra_of",
    "weight_layers",
    "weight_spectra",
]

#: A layer filter: ``None`` (every layer), a regular expression searched in module names, a
#: predicate on the module name, or a sequence of module names or prefixes (``"encoder"``
#: selects ``"encoder.0"``, ``"encoder.2"``, ...).
LayerFilter = str | Sequence[str] | Callable[[str], bool] | None

#: The metrics averaged over layers (weightwatcher's summary, plus FARMS α).
AVERAGED_METRICS = (
    "alpha",
    "alpha_weighted",
    "log_spectral_norm",
    "log_norm",
    "log_alpha_norm",
    "stable_rank",
    "mp_softrank",
    "farms_alpha",
)


@dataclass
class LayerSpectrum:
    """One layer's weight spectrum.

    Attributes:
        name: The module name.
        shape: The weight's shape.
        eigenvalues: The ESD, ascending, float64 on the CPU.
        fit: Its power-law fit (``None`` with fewer than 2 eigenvalues above the floor).
        metrics: metric -> value, every name of
            :data:`~spectral_callbacks.weights.metrics.LAYER_METRICS`.
    """

    name: str
    shape: tuple[int, ...]
    eigenvalues: torch.Tensor
    fit: PowerLawFit | None
    metrics: dict[str, float] = field(default_factory=dict)


def check_layer_filter(layers: object) -> LayerFilter:
    """``layers`` must be a :data:`LayerFilter` (``TypeError`` / ``ValueError`` naming it)."""
    return check_name_filter("layers", layers, "every layer with a weight matrix", "module names")


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    """``module.weight``; a parametrized one computed in eval mode, without gradients, with
    the parametrization's buffers and modes as they were (module docstring)."""
    if not parametrize.is_parametrized(module, "weight"):
        return getattr(module, "weight", None)
    parametrization = module.parametrizations["weight"]
    modes = [(part, part.training) for part in parametrization.modules()]
    state = ModelStateSnapshot(parametrization)
    try:
        parametrization.eval()
        with torch.no_grad():
            return module.weight
    finally:
        state.restore()
        for part, training in modes:
            part.training = training


def weight_layers(model: nn.Module, layers: LayerFilter = None) -> dict[str, torch.Tensor]:
    """The weights of the layers ``layers`` selects: module name -> weight, in model order.

    Names are given as in the user's code: without the ``_orig_mod`` segments of
    ``torch.compile``'d submodules.

    Raises:
        ValueError: If the model has no layer with a weight matrix, or the filter selects
            none (the message names the layers, or the closest ones to an unknown name).
    """
    check_layer_filter(layers)
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = _weight_of(module)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or weight.numel() == 0:
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        found[uncompiled_name(name)] = weight
    if not found:
        others = [n for n, p in model.named_parameters() if p.ndim >= 2]
        hint = ""
        if others:
            # Recurrent layers' weight_ih_l0 and attention's packed in_proj_weight: left
            # out, as weightwatcher leaves them out.
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            hint = f" (its matrices {listed} are not a module's .weight: not measured)"
        raise ValueError(
            f"{type(model).__name__} has no layer with a weight of 2 or more dimensions{hint}"
        )
    names = list(found)
    if layers is None:
        return found
    if isinstance(layers, str):
        pattern = re.compile(layers)

        def selects(name: str) -> bool:
            return pattern.search(name) is not None

    elif callable(layers):
        selects = layers
    else:
        wanted = list(layers)
        for entry in wanted:
            if not any(is_name_or_prefix(entry, n) for n in names):
                close = difflib.get_close_matches(entry, names, n=5, cutoff=0.4)
                hint = f"; close matches: {close}" if close else f"; layers: {names}"
                raise ValueError(
                    f"layers entry {entry!r} names no layer with a weight matrix{hint}"
                )

        def selects(name: str) -> bool:
            return any(is_name_or_prefix(entry, name) for entry in wanted)

    chosen = {n: w for n, w in found.items() if selects(n)}
    if not chosen:
        raise ValueError(
            f"layers={layers!r} selects no layer; layers with a weight matrix: {names}"
        )
    return chosen


def weight_spectra(
    model: nn.Module,
    layers: LayerFilter = None,
    farms: bool = True,
    aspect_ratio: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerSpectrum]:
    """The ESD, power-law fit and every metric of each selected layer.

    ESDs are computed on the weights' device, batched over layers whose matrices share a
    shape (:func:`~spectral_callbacks.weights.layer_esds`); fits and metrics follow
    :mod:`spectral_callbacks.weights.metrics`.

    Args:
        model: Any module.
        layers: Which layers (:data:`LayerFilter`).
        farms: Whether to compute ``farms_alpha`` (the windows' SVDs roughly double the cost).
        aspect_ratio: The FARMS windows' aspect ratio.
        dtype: Precision of the SVDs.

    Returns:
        module name -> :class:`LayerSpectrum`, in model order.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        ... )
        >>> spectra = weight_spectra(model)
        >>> list(spectra), spectra["0"].eigenvalues.numel()
        (['0', '2'], 64)
    """
    return spectra_of(weight_layers(model, layers), farms, aspect_ratio, dtype)


def spectra_of(
    weights: dict[str, torch.Tensor],
    farms: bool = True,
    aspect_ratio: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerSpectrum]:
    """:func:`weight_spectra` of weights already selected (name -> weight).

    Raises:
        FloatingPointError: If a weight holds a NaN or an infinity (named in the message).
    """
    for name, weight in weights.items():
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError(f"the weights of {name!r} are not finite")
    esds = layer_esds(weights, dtype)
    spectra: dict[str, LayerSpectrum] = {}
    for name, weight in weights.items():
        eigenvalues = esds[name].cpu()
        try:
            fit = fit_power_law(esds[name])
        except ValueError:
            fit = None
        metrics = layer_metrics(weight, eigenvalues, fit, farms=farms, aspect_ratio=aspect_ratio)
        spectra[name] = LayerSpectrum(name, tuple(weight.shape), eigenvalues, fit, metrics)
    return spectra


def model_averages(spectra: dict[str, LayerSpectrum]) -> dict[str, float]:
    """The mean of each of :data:`AVERAGED_METRICS` over the layers where it is finite (NaN
    where it is finite for none)."""
    averages = {}
    for metric in AVERAGED_METRICS:
        values = [s.metrics[metric] for s in spectra.values() if math.isfinite(s.metrics[metric])]
        averages[metric] = sum(values) / len(values) if values else math.nan
    return averages
