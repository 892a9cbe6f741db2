"""WeightSpectrumMonitor: the logged values are the weight spectra of the model at each step,
training is untouched, the dashboard and figures are written, drift and its reference
survive a resume, bad arguments fail early, and SpectralEarlyStopping reads α."""

from __future__ import annotations

import copy
import math
import re
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import SpectralEarlyStopping, WeightSpectrumMonitor
from spectral_callbacks.weights import (
    AVERAGED_METRICS,
    LAYER_METRICS,
    singular_subspace_drift,
    weight_spectra,
)

from ..models import (
    TanhRegressor,
    cli_round_trip,
    full_batch_loader,
    regression_data,
    trainer_kwargs,
)
from ..runs import Snapshots, custom_charts, read_events, spectral_history

LAYERS = ["net.0", "net.2", "net.4"]


class SpectralNormRegressor(TanhRegressor):
    """:class:`TanhRegressor` with ``spectral_norm`` on its hidden layers, whose weights move
    the power iteration on when read in training mode."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)
        for index in (0, 2):
            torch.nn.utils.parametrizations.spectral_norm(self.net[index])


def fit(callbacks, steps=12, logger=False, model_class=TanhRegressor, **kwargs):
    x, y = regression_data(n=32)
    torch.manual_seed(0)
    model = model_class(lr=0.1)
    trainer = L.Trainer(
        max_epochs=1, callbacks=callbacks, **trainer_kwargs(logger=logger, **kwargs)
    )
    trainer.fit(model, full_batch_loader(x, y, steps))
    return model, trainer


def test_logged_values_are_the_spectra_of_the_weights_at_each_step():
    monitor = WeightSpectrumMonitor(every_n_steps=5, drift_rank=4)
    snapshots = Snapshots()
    model, trainer = fit([monitor, snapshots])
    assert monitor.layer_names == LAYERS
    assert [step for step, _ in monitor.history] == [0, 5, 10]
    assert set(monitor.history[0][1]) == set(monitor.metric_names())
    at_zero = copy.deepcopy(model)
    at_zero.load_state_dict(snapshots.states[0])
    for step, values in monitor.history:
        state = copy.deepcopy(model)
        state.load_state_dict(snapshots.states[step])
        spectra = weight_spectra(state)
        for layer in LAYERS:
            for metric in LAYER_METRICS:
                assert values[f"spectral/weights/{layer}/{metric}"] == pytest.approx(
                    spectra[layer].metrics[metric], rel=1e-12, nan_ok=True
                ), (step, layer, metric)
            drift = singular_subspace_drift(
                state.get_submodule(layer).weight, at_zero.get_submodule(layer).weight, rank=4
            )
            for metric in ("left_subspace_angle", "singular_value_change"):
                assert values[f"spectral/weights/{layer}/{metric}"] == pytest.approx(
                    getattr(drift, metric), rel=1e-9, abs=1e-7
                )
        for metric in AVERAGED_METRICS:
            finite = [
                spectra[layer].metrics[metric]
                for layer in LAYERS
                if math.isfinite(spectra[layer].metrics[metric])
            ]
            assert values[f"spectral/weights/all_layers/{metric}"] == pytest.approx(
                sum(finite) / len(finite)
            )
    first = monitor.history[0][1]
    assert first["spectral/weights/net.0/singular_value_change"] == 0.0
    assert monitor.history[-1][1]["spectral/weights/net.0/singular_value_change"] > 0
    # The 1 × 32 head has one eigenvalue: its α is NaN by definition, with no warning.
    assert math.isnan(first["spectral/weights/net.4/alpha"])
    assert trainer.callback_metrics["spectral/weights/net.2/stable_rank"] == pytest.approx(
        monitor.history[-1][1]["spectral/weights/net.2/stable_rank"]
    )


class ZeroHiddenRegressor(TanhRegressor):
    """:class:`TanhRegressor` whose hidden 32 × 32 weight starts at zero (as LoRA's ``B``)."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)
        with torch.no_grad():
            self.net[2].weight.zero_()


def test_an_all_zero_weight_is_undefined_not_a_failure():
    """An all-zero weight has no scale (its logarithms -inf, its ratios 0/0) and no tail: no
    "non-finite" warning, the rows undefined, and a stopper on its α waits (it stopped at
    step 0 on the NaN); its norms are 0, and once trained its values are finite."""
    monitor = WeightSpectrumMonitor(every_n_steps=2)
    stopper = SpectralEarlyStopping.alpha_band(layer="net.2", action="stop")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*non-finite.*")
        _, trainer = fit([monitor, stopper], steps=4, model_class=ZeroHiddenRegressor)
    first = monitor.history[0][1]
    zero = {name.rsplit("/", 1)[1]: value for name, value in first.items() if "/net.2/" in name}
    assert zero["spectral_norm"] == 0.0 and zero["norm"] == 0.0
    not_finite = {metric for metric, value in zero.items() if not math.isfinite(value)}
    assert not_finite == set(LAYER_METRICS) - {"spectral_norm", "norm"}
    later = {name: value for name, value in monitor.history[-1][1].items() if "/net.2/" in name}
    assert later["spectral/weights/net.2/norm"] > 0
    undefined = monitor.undefined_metrics()  # a few training steps: maybe too few for a tail
    assert all(math.isfinite(v) for name, v in later.items() if name not in undefined)
    assert stopper.stopped_step is None and trainer.global_step == 4


@pytest.mark.parametrize("model_class", [TanhRegressor, SpectralNormRegressor])
def test_training_is_bit_identical_and_warns_nothing(model_class):
    plain, _ = fit([], model_class=model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        monitor = WeightSpectrumMonitor(every_n_steps=2, drift_rank=3)
        monitored, _ = fit([monitor], model_class=model_class)
    for (name, a), b in zip(
        plain.state_dict().items(), monitored.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_tensorboard_dashboard_histogram_and_figures(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    monitor = WeightSpectrumMonitor(every_n_steps=4, figure_every_n_steps=8, drift_rank=2)
    fit([monitor], logger=logger)
    events = read_events(logger.log_dir)
    scalars = events.Tags()["scalars"]
    assert set(monitor.metric_names()) <= set(scalars)
    assert [e.step for e in events.Scalars("spectral/weights/net.0/alpha")] == [0, 4, 8, 12]
    alphas = events.Histograms("spectral/weights/alpha")
    assert [h.step for h in alphas] == [0, 4, 8, 12]
    # Two layers have a fitted α (the head's is NaN and left out of the histogram).
    assert alphas[0].histogram_value.num == 2
    images = events.Tags()["images"]
    assert {"spectral/weights/net.0/esd", "spectral/weights/net.4/esd"} <= set(images)
    assert [i.step for i in events.Images("spectral/weights/alpha_by_layer")] == [0, 8]
    charts = custom_charts(events)
    (alpha_chart,) = charts["α per layer"]
    assert sorted(t for t in scalars if re.search(alpha_chart, t)) == [
        f"spectral/weights/{layer}/alpha" for layer in LAYERS
    ]
    averages = charts["averages over layers: α and FARMS α"]
    assert sorted(t for t in scalars if any(re.search(p, t) for p in averages)) == [
        "spectral/weights/all_layers/alpha",
        "spectral/weights/all_layers/farms_alpha",
    ]


def test_reference_state_dict_and_resume_keep_the_drift_reference(tmp_path):
    x, y = regression_data(n=32)
    torch.manual_seed(5)
    reference = TanhRegressor().state_dict()

    def run(steps, ckpt_path=None, checkpoint_dir=None):
        monitor = WeightSpectrumMonitor(
            every_n_steps=3, layers=["net.0", "net.2"], drift_rank=3, reference=reference
        )
        callbacks = [monitor]
        if checkpoint_dir is not None:
            callbacks.append(
                L.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=6)
            )
        torch.manual_seed(0)
        trainer = L.Trainer(
            max_steps=steps,
            max_epochs=-1,
            callbacks=callbacks,
            **trainer_kwargs(enable_checkpointing=checkpoint_dir is not None),
        )
        trainer.fit(TanhRegressor(lr=0.1), full_batch_loader(x, y, 12), ckpt_path=ckpt_path)
        return monitor

    whole = run(12)
    model = TanhRegressor()
    torch.manual_seed(0)
    model = TanhRegressor(lr=0.1)
    drift = singular_subspace_drift(model.net[0].weight, reference["net.0.weight"], rank=3)
    assert whole.history[0][1]["spectral/weights/net.0/left_subspace_angle"] == pytest.approx(
        drift.left_subspace_angle, rel=1e-9
    )
    assert whole.history[0][1]["spectral/weights/net.0/left_subspace_angle"] > 0.1
    checkpoints = tmp_path / "checkpoints"
    run(6, checkpoint_dir=checkpoints)
    (checkpoint,) = checkpoints.glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)  # the saved bases load safely
    assert any("WeightSpectrumMonitor" in key for key in state["callbacks"])
    resumed = run(12, ckpt_path=str(checkpoint))
    assert [s for s, _ in resumed.history] == [0, 3, 6, 9, 12]
    assert spectral_history(resumed) == spectral_history(whole)


def test_first_measurement_is_the_default_reference():
    monitor = WeightSpectrumMonitor(every_n_steps=4, drift_rank=2)
    fit([monitor])
    assert monitor.reference_step == 0
    first = monitor.history[0][1]
    for layer in LAYERS:
        assert first[f"spectral/weights/{layer}/left_subspace_angle"] == pytest.approx(
            0.0, abs=1e-7
        )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"layers": 5}, TypeError, "layers must be None"),
        ({"layers": "("}, ValueError, "not a valid regular expression"),
        ({"aspect_ratio": 0.5}, ValueError, "aspect_ratio"),
        ({"drift_rank": 0}, ValueError, "drift_rank"),
        ({"reference": {}}, ValueError, "set drift_rank"),
        ({"drift_rank": 2, "reference": [1]}, TypeError, "reference must be a state dict"),
        ({"farms": "yes"}, TypeError, "farms"),
        ({"figure_layers": "net.0"}, TypeError, "figure_layers"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightSpectrumMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ["net.9"]}, r"'net.9' names no layer.*close matches"),
        ({"figure_layers": ["net.1"]}, r"figure_layers entry 'net.1' is not a measured layer"),
        (
            {"drift_rank": 2, "reference": {"net.0.weight": torch.zeros(3, 3)}},
            r"reference\['net.0.weight'\] has shape \(3, 3\)",
        ),
        ({"drift_rank": 2, "reference": {}}, r"reference has no weight for \['net.0.weight'"),
    ],
)
def test_bad_arguments_for_the_model_fail_at_setup(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit([WeightSpectrumMonitor(**kwargs)], steps=2)


def test_two_unnamed_monitors_are_refused_and_names_separate_them():
    with pytest.raises(ValueError, match="give each a different name"):
        fit([WeightSpectrumMonitor(), WeightSpectrumMonitor(every_n_steps=3)], steps=2)
    first, second = WeightSpectrumMonitor(), WeightSpectrumMonitor(layers="net.0", name="first")
    fit([first, second], steps=2)
    assert "spectral/weights/first/net.0/alpha" in second.last_metrics


def test_non_finite_weights_log_nan_and_training_goes_on():
    class Poisoned(TanhRegressor):
        def on_train_batch_start(self, batch, batch_idx):
            if self.trainer.global_step == 3:
                with torch.no_grad():
                    self.net[2].weight[0, 0] = float("nan")

    x, y = regression_data(n=32)
    monitor = WeightSpectrumMonitor(every_n_steps=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="weights of .net.0. are not finite"):
        trainer.fit(Poisoned(lr=0.1), full_batch_loader(x, y, 6))
    assert trainer.global_step == 6
    steps = {step: values for step, values in monitor.history}
    assert math.isfinite(steps[0]["spectral/weights/net.0/alpha"])
    assert math.isnan(steps[4]["spectral/weights/net.0/alpha"])


def test_alpha_band_preset():
    stopper = SpectralEarlyStopping.alpha_band(low=0.5, high=1.0, action="stop")
    assert stopper.monitor == "spectral/weights/all_layers/alpha" and stopper.band == (0.5, 1.0)
    _, trainer = fit([WeightSpectrumMonitor(every_n_steps=2), stopper])
    assert stopper.stopped_step == 0 and trainer.global_step == 1
    assert "outside [0.5, 1]" in stopper.stopped_reason
    warner = SpectralEarlyStopping.alpha_band(layer="net.0", low=0.0, high=1e9)
    fit([WeightSpectrumMonitor(every_n_steps=2), warner])
    assert warner.stopped_step is None
    with pytest.raises(ValueError, match="band must be two numbers"):
        SpectralEarlyStopping("spectral/weights/all_layers/alpha", rule="outside", band=(3, 2))
    with pytest.raises(ValueError, match="needs band"):
        SpectralEarlyStopping("spectral/weights/all_layers/alpha", rule="outside")
    lonely = SpectralEarlyStopping.alpha_band()
    with pytest.raises(ValueError, match="add WeightSpectrumMonitor"):
        fit([lonely], steps=2)


def test_a_lightning_cli_config_round_trips(tmp_path):
    init_args = {"every_n_steps": 3, "layers": ["net.0"], "drift_rank": 2}
    callback = cli_round_trip(TanhRegressor, WeightSpectrumMonitor, init_args, tmp_path)
    assert callback.layers == ["net.0"] and callback.drift_rank == 2
