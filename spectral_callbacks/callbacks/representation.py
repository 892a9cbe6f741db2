"""RepresentationMonitor: how the dimensionality of named layers' outputs evolves in training."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from .._checks import check_callable, check_choice, check_fit_range, check_integer, check_seed
from ..curvature.data import batch_size, fresh_batch, map_tensors, move_to_device
from ..curvature.isolation import ModelStateSnapshot, measurement_context, preserved_random_streams
from ..reporting.figures import scree_figure
from ..reporting.media import Media
from ..representation import (
    alpha_req_fit,
    capture_features,
    effective_rank,
    participation_ratio,
    rankme,
    resolve_layers,
    stable_rank,
    von_neumann_entropy,
)
from ..representation.capture import LAYER_LAYOUTS, LayerLayout
from ..representation.spectra import POOLS, CovarianceAccumulator
from . import metrics as metric_table
from .base import (
    SpectralMonitor,
    _clone_batch,
    as_loop_batch,
    muted_lightning_logging,
    preserved_modes,
    reduce_scalar,
)
from .metrics import MetricSpec
from .schedule import DEFAULT_MAX_OVERHEAD

__all__ = ["RepresentationMonitor", "default_forward"]

PREFIX = "spectral/repr/"


def default_forward(module: nn.Module, batch: Any) -> Any:
    """Run the model on a batch's inputs: ``module(x)`` for a tensor ``x`` or ``(x, ...)``,
    ``module(**batch)`` for a dict."""
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, Mapping):
        _check_keywords(module, batch)
        return module(**batch)  # errors inside the forward are the model's: left as they are
    if isinstance(batch, (list, tuple)) and batch:
        return module(batch[0])
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}; pass "
        "forward_fn=lambda model, batch: model(...) to RepresentationMonitor"
    )


def _check_keywords(module: nn.Module, batch: Mapping) -> None:
    """A ``TypeError`` pointing to ``forward_fn`` when ``module.forward`` does not take the
    dict batch's keys as keyword arguments (where Python can read its signature)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a builtin or extension forward: nothing to check
        return
    try:
        signature.bind(**batch)
    except TypeError as error:
        raise TypeError(
            f"RepresentationMonitor's default forward calls model(**batch) for a dict batch "
            f"(keys {list(batch)}), which {type(module).__name__}.forward does not take: "
            f"{error}. Pass forward_fn=lambda model, batch: model(...) with the model's own "
            "inputs"
        ) from None


class RepresentationMonitor(SpectralMonitor):
    """Logs RankMe, α-ReQ and effective dimensions of named layers' outputs.

    At every measurement the probe samples go through the model (eval mode, ``no_grad``,
    RNG forked, BatchNorm statistics frozen); forward hooks on ``layers`` stream each
    output into a float64 ``D × D`` second-moment / covariance accumulator (``N × D`` is
    never held), and the spectra give, per layer, the rows of :attr:`METRICS` under
    ``spectral/repr/{layer}/``: RankMe, α-ReQ, effective rank, stable rank, participation
    ratio and von Neumann entropy (docs/representations.md lists them; definitions:
    :mod:`spectral_callbacks.representation`).

    TensorBoard also gets a custom-scalars chart of RankMe (and α-ReQ) per layer, a histogram
    of ``log10`` covariance eigenvalues per layer and a scree figure (eigenvalue against rank
    on log-log axes, with the α-ReQ fit).

    Probe data: the first validation batches if the trainer has a validation loader (the
    first loader of a list or a dict of them), else the first training batches, until
    ``num_samples`` samples; copied once and reused.

    Args:
        layers: Names of submodules (as in ``model.named_modules()``).
        every_n_steps: Optimizer steps between measurements, or ``None`` (default): measure as
            often as ``max_overhead`` of the training time pays for
            (:mod:`~spectral_callbacks.callbacks.schedule`).
        num_samples: Probe samples (batch items; token models give ``B·T`` rows).
        select: Picks the embedding tensor from a tuple/dict layer output: one callable, or a
            dict layer name -> callable.
        pool: ``"flatten"`` (every token / position a row), ``"mean"`` (average over them) or
            a callable ``(B, T, …, D) -> (B, D)`` (it receives the features last).
        layout: Where a layer's features are: ``"auto"`` (default; a convolution's channels,
            axis 1 of ``(N, C, H, W)`` or ``(N, C, L)``, else the last axis, as in tokens
            ``(B, T, D)``: :func:`~spectral_callbacks.representation.infer_layout`, with one
            warning where a 4-D output comes from a layer without a 2-d convolution),
            ``"channels_first"`` or ``"channels_last"`` for every layer.
        forward_fn: ``forward_fn(model, batch)`` runs the model (default :func:`default_forward`).
        probe_data: Explicit probe data (one batch or a list of batches).
        fit_range: Ranks ``(low, high)`` of the α-ReQ power-law fit.
        eval_mode: Measure in eval mode (default ``True``; modes are restored).
        seed: Seed of the RNG inside the probe's forward passes.
        name: Tells two monitors of the same layers apart: metric names become
            ``spectral/repr/{name}/{layer}/...``.
        figure_every_n_steps: Optimizer steps between scree figures (default
            ``10 · every_n_steps``); histograms are written at every measurement.
        max_overhead: With ``every_n_steps=None``, the most the measurements may take of the
            training time (default 0.05: 5 %; see "What it costs" on the monitor's page).
        mask_fn: ``mask_fn(batch)`` -> booleans (or 0/1) of the batch's positions, e.g.
            ``lambda batch: batch["attention_mask"]``: only the positions where it is true
            count (padding tokens are left out of the rows, and of ``pool="mean"``'s
            means); a layer of one row per sample keeps its rows, and an output whose
            positions have another shape raises. Default ``None``: every position counts.
    """

    # Representation probes can be thousands of samples: re-collect on resume instead.
    checkpoint_probe = False

    def __init__(
        self,
        layers: Sequence[str] = ("encoder",),
        every_n_steps: int | None = None,
        num_samples: int = 4096,
        select: Callable[[Any], torch.Tensor] | dict[str, Callable] | None = None,
        pool: str | Callable[[torch.Tensor], torch.Tensor] = "flatten",
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        probe_data: Any = None,
        fit_range: tuple[int, int] = (11, 100),
        eval_mode: bool = True,
        seed: int = 0,
        layout: LayerLayout = "auto",
        name: str | None = None,
        figure_every_n_steps: int | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
        mask_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(**self._base_arguments(locals()))  # one probe batch: the base's default
        if isinstance(layers, str):
            layers = (layers,)
        if (
            not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(name, str) for name in layers)
        ):
            raise ValueError(f"layers must be a non-empty sequence of module names, got {layers!r}")
        # A covariance needs two samples; one has no spread to measure.
        num_samples = check_integer("num_samples", num_samples, minimum=2)
        if not callable(pool):
            check_choice("pool", pool, POOLS)
        check_choice("layout", layout, LAYER_LAYOUTS)
        check_callable(
            "forward_fn", forward_fn, "forward_fn(model, batch) -> outputs", True, arguments=2
        )
        if isinstance(select, dict):
            for layer, chooser in select.items():
                check_callable(f"select[{layer!r}]", chooser, "select(output) -> tensor", False, 1)
        else:
            check_callable("select", select, "select(output) -> tensor", True, arguments=1)
        check_callable("mask_fn", mask_fn, "mask_fn(batch) -> bool tensor", True, arguments=1)
        if mask_fn is not None and callable(pool):
            raise ValueError(
                "mask_fn does not combine with a callable pool (the pool receives every "
                "position): leave the masked positions out inside the pool"
            )
        fit_range = check_fit_range("fit_range", fit_range)
        seed = check_seed("seed", seed)
        self.layers = list(layers)
        self.mask_fn = mask_fn
        self.num_samples = num_samples
        self.select = select
        self.pool = pool
        self.layout = layout
        self.forward_fn = forward_fn or default_forward
        self.fit_range = tuple(fit_range)
        self.seed = seed
        self.last_spectra: dict[str, torch.Tensor] = {}
        self._last_fits: dict[str, Any] = {}
        self._undefined: set[str] = set()

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "layers": tuple(self.layers)}

    def validate_setup(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        resolve_layers(module, self.layers)  # raises with close matches
        own_forward = type(module).forward not in (pl.LightningModule.forward, nn.Module.forward)
        if self.forward_fn is default_forward and not own_forward:
            # Found now, not at the first measurement steps into training.
            raise ValueError(
                f"RepresentationMonitor runs the probe batches through the LightningModule's "
                f"forward(), which {type(module).__name__} does not define: define forward(), "
                "or pass forward_fn=lambda module, batch: ... (for a wrapped Hugging Face "
                "model, e.g. module.model(**batch))"
            )

    def out_of_memory_advice(self) -> str:
        return (
            "A measurement holds one probe batch's forward pass and a D x D float64 "
            "accumulator per layer: use fewer or narrower layers (pool=...), or smaller "
            "probe batches."
        )

    def probe_is_complete(self, trainer: pl.Trainer, probe: list[Any]) -> bool:
        # Samples of the union of every process's shard: the probe, the steps measured and
        # the values are those of one process on that union, whatever the world size.
        samples = sum(batch_size(b) for b in probe)
        complete = reduce_scalar(trainer, samples, "sum") >= self.num_samples
        if complete and trainer.world_size == 1 and samples > self.num_samples:
            # Exactly num_samples: the last batch is cut (under DDP each process keeps its
            # whole shard, and the union holds at least num_samples).
            last = batch_size(probe[-1])
            keep = self.num_samples - (samples - last)
            probe[-1] = map_tensors(
                probe[-1], lambda t: t[:keep] if t.ndim and t.shape[0] == last else t
            )
        return complete

    def short_probe_message(self, trainer: pl.Trainer) -> str:
        samples = sum(batch_size(b) for b in self._probe)
        return (
            f"num_samples={self.num_samples}, but the probe's loader ended after {samples} "
            f"samples: measuring on those {samples}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._probe_complete or self.probe_data is not None:
            return
        loaders = trainer.val_dataloaders
        # Several validation loaders (a list, or a dict of named ones): the first.
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            return
        # Creating a DataLoader iterator draws its base seed from the global RNG (and a
        # dataset may augment with NumPy's): the training run's streams stay untouched.
        with preserved_random_streams():
            batches = iter(loaders)
            while True:
                batch = next(batches, None)
                if batch is not None:
                    self._probe.append(_clone_batch(as_loop_batch(trainer, pl_module, batch)))
                # Every process takes part in each count, also one whose loader ran out.
                all_exhausted = reduce_scalar(trainer, float(batch is None), "min") > 0
                if self.probe_is_complete(trainer, self._probe):
                    break
                if all_exhausted:
                    self.warn_once("probe", self.short_probe_message(trainer))
                    break
        self._probe_complete = reduce_scalar(trainer, len(self._probe), "sum") > 0

    def probe_forward(self, module: pl.LightningModule, batch: Any) -> Any:
        return self.forward_fn(module, batch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        collecting_first = not self._probe and not self._probe_complete
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if collecting_first and self._probe and not self._probe_complete:
            # The probe's first training batch, in a probe that takes more batches: run it
            # through forward_fn and the hooks now, so that a forward_fn, layer output or
            # select= that does not fit raises before the first step, not at the first
            # measurement (which would come after the steps that complete the probe).
            device = next(pl_module.parameters()).device
            with preserved_modes(pl_module, self.eval_mode), muted_lightning_logging(pl_module):
                self._capture(pl_module, [move_to_device(self._probe[0], device)])

    def _capture(
        self, module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, CovarianceAccumulator]:
        """Each layer's accumulated outputs over ``batches``: ``forward_fn`` under the layer
        hooks, isolated from training (random state, buffers) and without gradients."""
        written_state = ModelStateSnapshot(module)
        running: list[int | None] = [None]  # samples of the batch being run, for the hooks
        positions: list[torch.Tensor | None] = [None]  # the positions of it that count
        try:
            with (
                measurement_context(module, self.seed, second_order=False),
                capture_features(
                    module,
                    self.layers,
                    self.select,
                    self.pool,
                    self.layout,
                    on_ambiguous=lambda message: self.warn_once(message, message),
                    batch_size=lambda: running[0],
                    mask=lambda: positions[0],
                ) as accumulators,
            ):
                for batch in batches:
                    running[0] = batch_size(batch)
                    positions[0] = self._positions(batch)
                    self.forward_fn(module, fresh_batch(batch))
        finally:
            written_state.restore()
        return accumulators

    def _positions(self, batch: Any) -> torch.Tensor | None:
        """``mask_fn(batch)``: the positions of the batch that count, or ``None``."""
        if self.mask_fn is None:
            return None
        mask = self.mask_fn(batch)
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                "mask_fn(batch) must return a bool (or 0/1 integer) tensor of the positions, "
                f"such as batch['attention_mask'], got {type(mask).__name__}"
                + (f" of {mask.dtype}" if isinstance(mask, torch.Tensor) else "")
            )
        return mask

    def measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, probe: list[Any]
    ) -> dict[str, float]:
        accumulators = self._capture(module, probe)
        metrics: dict[str, float] = {}
        self._undefined = set()
        for layer, accumulator in accumulators.items():
            if trainer.world_size > 1:
                accumulator.all_reduce()  # the union of every process's probe shard
            # Non-finite outputs on any process make the reduced sums non-finite on every
            # process, so all of them raise FloatingPointError here together.
            covariance = accumulator.covariance_spectrum()
            second_moment = accumulator.second_moment_spectrum()
            self.last_spectra[layer] = covariance.cpu()
            values = {
                "rankme": rankme(second_moment),
                "alpha_req": self._alpha(layer, covariance),
                "effective_rank": effective_rank(covariance),
                "stable_rank": stable_rank(covariance),
                "participation_ratio": participation_ratio(covariance),
                "vne": von_neumann_entropy(covariance),
            }
            for row, value in values.items():
                metrics[self.metric("{layer}/" + row, layer=layer)] = value
        return metrics

    def _alpha(self, layer: str, covariance: torch.Tensor) -> float:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fit = alpha_req_fit(covariance, self.fit_range)
        except ValueError as error:
            # NaN by definition (too few eigenvalues in fit_range), not a numerical failure.
            self.warn_once("alpha_req", f"α-ReQ of {layer!r} is NaN: {error}")
            self._last_fits.pop(layer, None)
            self._undefined |= metric_table.undefined_names(self.METRICS, self.prefix, [layer])
            return math.nan
        self._last_fits[layer] = fit
        return fit.alpha

    #: One row per metric, ``{layer}`` standing for each of ``layers``.
    METRICS = (
        MetricSpec(
            "{layer}/rankme",
            chart="RankMe per layer",
            doc=(
                "RankMe (Garrido et al. 2023): singular values σ of the **raw** embeddings, `p = "
                "σ/Σσ + 1e-7`, `exp(−Σ p log p)`"
            ),
        ),
        MetricSpec(
            "{layer}/alpha_req",
            chart="α-ReQ per layer",
            may_be_undefined=True,
            doc=(
                "α-ReQ (Agrawal et al. 2022): centred covariance eigenvalues λ_i sorted "
                "descending, `log λ_i = c − α log i` fitted over ranks `fit_range` by least "
                "squares with weights `1/i`"
            ),
        ),
        MetricSpec(
            "{layer}/effective_rank",
            chart="effective rank per layer",
            doc=(
                "effective rank (Roy & Vetterli): `exp(H_1(p))`, `p = λ/Σλ` of the centred "
                "covariance"
            ),
        ),
        MetricSpec("{layer}/stable_rank", doc="`Σλ / λ_max` = `exp(H_∞(p))`"),
        MetricSpec("{layer}/participation_ratio", doc="`(Σλ)² / Σλ²` = `exp(H_2(p))`"),
        MetricSpec(
            "{layer}/vne",
            doc="von Neumann entropy of the trace-normalised covariance, `H_1(p)` in nats",
        ),
        metric_table.overhead_row("overhead"),
    )

    METRIC_PREFIXES = (PREFIX,)
    OVERHEAD_ROW = "overhead"

    def metric_names(self) -> list[str]:
        return metric_table.expand_names(self.METRICS, self.prefix, layers=self.layers)

    def undefined_metrics(self) -> set[str]:
        return self._undefined

    def nan_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        self.last_spectra = {}
        return super().nan_metrics(trainer)

    def write_media(self, media: Media, step: int) -> None:
        for layer, spectrum in self.last_spectra.items():
            positive = spectrum[spectrum > 0]
            tag = f"{self.prefix}{layer}/"
            media.histogram(tag + "log10_eigenvalues", positive.log10(), step)
            if self.figures_due and positive.numel() > 1:
                figure = scree_figure(spectrum, self._last_fits.get(layer), layer, step)
                media.figure(tag + "scree", figure, step)

    def chart_layout(self) -> dict[str, dict[str, list[str]]]:
        suffix = f" ({self.name})" if self.name else ""
        charts = metric_table.chart_layout(self.METRICS, self.prefix)
        return {"spectral: representations" + suffix: charts}
