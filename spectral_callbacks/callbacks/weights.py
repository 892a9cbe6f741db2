"""WeightSpectrumMonitor: heavy-tailed weight spectra of every layer, live during training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from .._checks import check_bool, check_integer, check_number
from ..reporting.figures import alpha_by_layer_figure, esd_figure
from ..reporting.media import Media
from ..weights import (
    AVERAGED_METRICS,
    DRIFT_METRICS,
    FIT_METRICS,
    LAYER_METRICS,
    ZERO_WEIGHT_METRICS,
    LayerFilter,
    LayerSpectrum,
    SingularBasis,
    check_layer_filter,
    model_averages,
    singular_basis,
    singular_subspace_drift,
    spectra_of,
    weight_layers,
)
from . import metrics as metric_table
from .base import SpectralMonitor
from .metrics import MetricSpec
from .schedule import DEFAULT_MAX_OVERHEAD

__all__ = ["AVERAGE", "WeightSpectrumMonitor"]

PREFIX = "spectral/weights/"
#: The pseudo-layer under which the averages over layers are logged.
AVERAGE = "all_layers"

_CHARTS = {
    "{layer}/alpha": "α per layer",
    "{layer}/alpha_weighted": "α̂ = α log₁₀ λ_max per layer",
    "{layer}/log_spectral_norm": "log₁₀ spectral norm per layer",
    "{layer}/stable_rank": "stable rank per layer",
    f"{AVERAGE}/alpha": "averages over layers: α and FARMS α",
    f"{AVERAGE}/farms_alpha": "averages over layers: α and FARMS α",
    "{layer}/left_subspace_angle": "largest principal angle of the left singular subspace",
    "{layer}/singular_value_change": "relative change of the singular values",
}


#: What each weight metric is (the docs' table is generated from the rows).
_DOCS = {
    "alpha": "exponent α of the ESD's tail `p(λ) ∝ λ^{−α}` for `λ ≥ xmin`; about 2 for "
    "well-trained layers, above 6 under-trained, below 2 over-fitted",
    "alpha_weighted": "α̂ = `α · log₁₀ λ_max`",
    "spectral_norm": "`λ_max`, the squared largest singular value",
    "log_spectral_norm": "`log₁₀ λ_max`",
    "norm": "`Σλ = ‖W‖_F²`",
    "log_norm": "`log₁₀ Σλ` (the Frobenius log norm)",
    "log_alpha_norm": "`log₁₀ Σ λ^α`",
    "stable_rank": "`Σλ / λ_max`",
    "mp_softrank": "the Marchenko–Pastur bulk edge `λ₊` over `λ_max`",
    "num_spikes": "eigenvalues above the Marchenko–Pastur bulk",
    "num_pl_spikes": "eigenvalues in the fitted tail",
    "xmin": "the tail's lower bound",
    "ks_distance": "the Kolmogorov–Smirnov distance of the power-law fit",
    "farms_alpha": "α of the ESD averaged over square submatrices (FARMS), without the bias a "
    "matrix's aspect ratio puts on α",
    "left_subspace_angle": "the largest principal angle (radians) between the top-`r` left "
    "(output) singular subspaces now and at the reference",
    "right_subspace_angle": "the same for the right (input) singular subspaces",
    "singular_value_change": "`‖σ − σ_ref‖ / ‖σ_ref‖` of the top-`r` singular values",
}


def _rows(layer: str, metrics: Sequence[str], part: str | None = None) -> list[MetricSpec]:
    """Rows of ``metrics`` under ``layer`` (``"{layer}"`` or the averages); ``farms_alpha``
    is turned on by ``farms``, the other rows by ``part``."""
    return [
        MetricSpec(
            f"{layer}/{metric}",
            chart=_CHARTS.get(f"{layer}/{metric}"),
            part="farms" if metric == "farms_alpha" else part,
            # A layer with fewer than 2 eigenvalues above the fit's floor has no tail; an
            # all-zero weight has no scale either.
            may_be_undefined=layer == "{layer}"
            and (metric in FIT_METRICS or metric in ZERO_WEIGHT_METRICS),
            doc=_DOCS[metric] if layer == "{layer}" else "mean over layers of " + metric,
        )
        for metric in metrics
    ]


class WeightSpectrumMonitor(SpectralMonitor):
    """Logs the heavy-tailed spectral metrics of each layer's weights while the model trains.

    Every ``every_n_steps`` optimizer steps the ESD of each selected layer (a module with a
    weight of 2 or more dimensions) is computed on the weights' device, batched over layers
    of one shape, and logged per layer as ``spectral/weights/{layer}/{metric}`` for each
    row of :attr:`METRICS` (docs/weights.md lists them): the power-law exponent α of the
    ESD's tail (continuous MLE, ``xmin`` by the Kolmogorov–Smirnov distance), norms, stable
    rank, the Marchenko–Pastur bulk and FARMS α. Conventions follow weightwatcher, so values
    compare: :mod:`spectral_callbacks.weights`. The means over layers go to
    ``spectral/weights/all_layers/{metric}`` (layers where a metric is NaN left out).

    With ``drift_rank`` set, each layer also logs how far its top-``r`` singular subspaces
    turned and its singular values changed since the reference: the first measurement, or
    ``reference`` (a state dict); it is kept as its top-``r`` singular vectors and singular
    values, also in checkpoints.

    TensorBoard also gets a custom-scalars chart (α, α̂, spectral norm and stable rank per
    layer, the averages), a histogram of α over layers (``spectral/weights/alpha``) and
    figures: the ESD of ``figure_layers`` on log-log axes with the fitted tail, and α by
    layer depth.

    Cost: one float64 SVD of every matrix (a kernel's ``k₁k₂`` slices each), the fits
    (``O(n²)`` in a layer's ``n`` eigenvalues), the FARMS windows' SVDs for non-square
    matrices, and with drift a full SVD per layer; no data and no gradients.
    ``bench/weightwatcher_crosscheck.py`` records the seconds.

    Training is not touched: the weights are only read. Under DDP the weights are the same
    on every process, so process 0 computes and broadcasts, and every process logs the
    same values. Weights sharded by FSDP are refused at setup.

    Args:
        every_n_steps: Optimizer steps between measurements, or ``None`` (default): measure as
            often as ``max_overhead`` of the training time pays for
            (:mod:`~spectral_callbacks.callbacks.schedule`).
        layers: Which layers: ``None`` (every module with a weight of 2 or more dimensions:
            linear, convolution, embedding, Hugging Face ``Conv1D``; as in weightwatcher,
            matrices under other names, such as ``nn.MultiheadAttention``'s packed
            ``in_proj_weight`` or ``nn.LSTM``'s ``weight_ih_l0``, are left out), a regular
            expression searched in module names, a predicate on the module name, or a
            sequence of module names or prefixes.
        farms: Whether to compute and log ``farms_alpha`` (per layer and averaged).
        aspect_ratio: The FARMS windows' aspect ratio (``≥ 1``; 1: square).
        drift_rank: Singular vectors per subspace for the drift metrics, or ``None`` (no
            drift metrics).
        reference: The drift's reference weights, a state dict (``"{layer}.weight"`` keys);
            default the weights at the first measurement. Needs ``drift_rank``.
        figure_layers: Layers whose ESD figure is drawn (default the first and the last).
        name: Tells two monitors apart: metric names become ``spectral/weights/{name}/...``.
        figure_every_n_steps: Optimizer steps between figures (default
            ``10 · every_n_steps``); scalars and the histogram are written at every
            measurement.
        max_overhead: With ``every_n_steps=None``, the most the measurements may take of the
            training time (default 0.05: 5 %; see "What it costs" on the monitor's page).
    """

    checkpoint_probe = False

    def __init__(
        self,
        every_n_steps: int | None = None,
        layers: LayerFilter = None,
        farms: bool = True,
        aspect_ratio: float = 1.0,
        drift_rank: int | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
        figure_layers: Sequence[str] | None = None,
        name: str | None = None,
        figure_every_n_steps: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        super().__init__(**self._base_arguments(locals()))
        check_layer_filter(layers)
        check_bool("farms", farms)
        check_number("aspect_ratio", aspect_ratio, minimum=1.0)
        if drift_rank is not None:
            check_integer("drift_rank", drift_rank, minimum=1)
        if reference is not None:
            if drift_rank is None:
                raise ValueError("reference=... is the drift's reference: set drift_rank=... too")
            if not isinstance(reference, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in reference.items()
            ):
                raise TypeError(
                    "reference must be a state dict (parameter name -> tensor), got "
                    f"{type(reference).__name__}"
                )
        if figure_layers is not None and (
            isinstance(figure_layers, str)
            or not isinstance(figure_layers, Sequence)
            or not all(isinstance(n, str) for n in figure_layers)
        ):
            raise TypeError(
                f"figure_layers must be a sequence of layer names, got {figure_layers!r}"
            )
        self.layers = layers
        self.farms = farms
        self.aspect_ratio = float(aspect_ratio)
        self.drift_rank = drift_rank
        self.reference = reference
        self.figure_layers = None if figure_layers is None else list(figure_layers)
        #: The selected layers' names, resolved against the model at setup.
        self.layer_names: list[str] = []
        #: The drift reference of each layer (top singular vectors and singular values).
        self.reference_bases: dict[str, SingularBasis] = {}
        self.reference_step: int | None = None
        #: The spectra of the last measurement (on process 0 only under DDP).
        self.last_spectra: dict[str, LayerSpectrum] = {}
        self._undefined: set[str] = set()
        # No probe data: the weights are the measurement's whole input.
        self._probe_complete = True

    # -- setup -----------------------------------------------------------------------------
    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # After begin_fit (a new Trainer clears the last run's reference bases, so that an
        # explicit reference's are taken afresh) and after the check for lazy parameters.
        self._resolve_layers(module)

    def _resolve_layers(self, module: pl.LightningModule) -> None:
        weights = weight_layers(module, self.layers)
        if AVERAGE in weights:
            raise ValueError(
                f"a layer is named {AVERAGE!r}, the name under which the averages are logged; "
                "leave it out with layers=..."
            )
        for layer, weight in weights.items():
            if type(weight).__name__ == "DTensor" or hasattr(weight, "_local_tensor"):
                raise ValueError(
                    f"WeightSpectrumMonitor needs whole weights, and {layer!r} is sharded "
                    "(FSDP); leave sharded layers out with layers=..."
                )
        self.layer_names = list(weights)
        for entry in self.figure_layers or []:
            if entry not in weights:
                raise ValueError(
                    f"figure_layers entry {entry!r} is not a measured layer; measured layers: "
                    f"{self.layer_names}"
                )
        if self.reference is not None and not self.reference_bases:
            self.reference_bases = self._bases_of_reference(weights)

    def _bases_of_reference(self, weights: dict[str, torch.Tensor]) -> dict[str, SingularBasis]:
        bases = {}
        missing = []
        for layer, weight in weights.items():
            tensor = self.reference.get(f"{layer}.weight", self.reference.get(layer))
            if tensor is None:
                missing.append(f"{layer}.weight")
                continue
            if tensor.shape != weight.shape:
                raise ValueError(
                    f"reference[{layer + '.weight'!r}] has shape {tuple(tensor.shape)}, the "
                    f"layer's weight {tuple(weight.shape)}"
                )
            bases[layer] = singular_basis(tensor, self.drift_rank)
        if missing:
            raise ValueError(f"reference has no weight for {missing}")
        return bases

    def state_key_fields(self) -> dict[str, Any]:
        layers = self.layers
        described = getattr(layers, "__qualname__", None) if callable(layers) else layers
        return {
            **super().state_key_fields(),
            "layers": tuple(described) if isinstance(described, list) else described,
            "drift_rank": self.drift_rank,
        }

    # -- measurement -----------------------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        metrics: dict[str, float] | None = None
        error: str | None = None
        if trainer.is_global_zero:
            try:
                metrics = self._measure_here(module, trainer.global_step)
            except FloatingPointError as failure:
                error = str(failure)
        if trainer.world_size > 1:
            metrics, error = trainer.strategy.broadcast((metrics, error), src=0)
        if error is not None:
            raise FloatingPointError(error)
        return metrics

    def _measure_here(self, module: pl.LightningModule, step: int) -> dict[str, float]:
        names = set(self.layer_names)
        weights = weight_layers(module, lambda layer: layer in names)
        spectra = spectra_of(weights, farms=self.farms, aspect_ratio=self.aspect_ratio)
        self.last_spectra = spectra
        prefix = self.prefix
        metrics: dict[str, float] = {}
        undefined: set[str] = set()
        specs = self.metric_specs()
        # Metrics of rows the settings turn off (farms_alpha without farms) are not logged.
        off = {spec.name.rsplit("/", 1)[1] for spec in self.METRICS if spec not in specs}
        for layer, spectrum in spectra.items():
            for metric in LAYER_METRICS:
                if metric not in off:
                    value = float(spectrum.metrics[metric])
                    metrics[self.metric("{layer}/" + metric, layer=layer)] = value
            if spectrum.fit is None:
                # No tail (fewer than 2 eigenvalues above the floor), and for an all-zero
                # weight no scale either: the rows that are NaN or -inf by definition.
                rows = metric_table.undefined_names(specs, prefix, [layer])
                undefined |= {row for row in rows if not math.isfinite(metrics[row])}
        for metric, value in model_averages(spectra).items():
            if metric not in off:
                metrics[self.metric(f"{AVERAGE}/{metric}")] = value
        if self.drift_rank is not None:
            metrics.update(self._drift(weights, step))
        self._undefined = undefined
        return metrics

    def _drift(self, weights: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        bases = {layer: singular_basis(w, self.drift_rank) for layer, w in weights.items()}
        if not self.reference_bases:
            self.reference_bases, self.reference_step = bases, step
        metrics: dict[str, float] = {}
        sums = dict.fromkeys(DRIFT_METRICS, 0.0)
        for layer, basis in bases.items():
            drift = singular_subspace_drift(basis, self.reference_bases[layer])
            for metric in DRIFT_METRICS:
                value = getattr(drift, metric)
                metrics[self.metric("{layer}/" + metric, layer=layer)] = value
                sums[metric] += value
        for metric, total in sums.items():
            metrics[self.metric(f"{AVERAGE}/{metric}")] = total / len(bases)
        return metrics

    def undefined_metrics(self) -> set[str]:
        return self._undefined

    def out_of_memory_advice(self) -> str:
        return (
            "A measurement holds a float64 copy of the matrices of one shape (at most "
            "256 MiB at a time) and their SVDs: measure fewer layers (layers=...)."
        )

    # -- names and dashboards --------------------------------------------------------------
    #: One row per metric: ``{layer}`` stands for each measured layer, ``all_layers`` is
    #: the mean over them; ``part`` names the setting that turns a row on.
    METRICS = (
        *_rows("{layer}", LAYER_METRICS),
        *_rows(AVERAGE, AVERAGED_METRICS),
        *_rows("{layer}", DRIFT_METRICS, part="drift"),
        *_rows(AVERAGE, DRIFT_METRICS, part="drift"),
        metric_table.overhead_row("overhead"),
    )

    METRIC_PREFIXES = (PREFIX,)
    OVERHEAD_ROW = "overhead"

    def metric_specs(self) -> list[MetricSpec]:
        """The rows of :attr:`METRICS` this monitor's settings turn on."""
        parts = {None: True, "farms": self.farms, "drift": self.drift_rank is not None}
        return [spec for spec in self.METRICS if parts[spec.part]]

    def metric_names(self) -> list[str]:
        return metric_table.expand_names(self.metric_specs(), self.prefix, layers=self.layer_names)

    def nan_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        self.last_spectra = {}
        return super().nan_metrics(trainer)

    def write_media(self, media: Media, step: int) -> None:
        spectra = self.last_spectra
        if not spectra:
            return
        alphas = {layer: s.metrics["alpha"] for layer, s in spectra.items()}
        media.histogram(self.prefix + "alpha", torch.tensor(list(alphas.values())), step)
        if not self.figures_due:
            return
        shown = self.figure_layers or list(
            dict.fromkeys([self.layer_names[0], self.layer_names[-1]])
        )
        for layer in shown:
            spectrum = spectra[layer]
            figure = esd_figure(spectrum.eigenvalues, spectrum.fit, layer, step)
            media.figure(f"{self.prefix}{layer}/esd", figure, step)
        farms = (
            {layer: s.metrics["farms_alpha"] for layer, s in spectra.items()}
            if self.farms
            else None
        )
        media.figure(
            self.prefix + "alpha_by_layer", alpha_by_layer_figure(alphas, farms, step), step
        )

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        # The averages are not a layer: the per-layer charts leave them out.
        charts = metric_table.chart_layout(self.metric_specs(), self.prefix, reserved=[AVERAGE])
        suffix = f" ({self.name})" if self.name else ""
        return {"spectral: weights" + suffix: charts}

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["reference_step"] = self.reference_step
        state["reference_bases"] = {
            layer: {"left": b.left, "right": b.right, "values": b.values}
            for layer, b in self.reference_bases.items()
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reference_step = state_dict.get("reference_step")
        saved = state_dict.get("reference_bases") or {}
        self.reference_bases = {
            layer: SingularBasis(b["left"], b["right"], b["values"]) for layer, b in saved.items()
        }
