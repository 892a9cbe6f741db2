"""The monitors' metric tables: names, dashboard and NaN-by-definition rows agree with what
a measurement publishes."""

from __future__ import annotations

import math
import re
import warnings

import lightning as L
import pytest
import torch

from spectral_callbacks import (
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
    SpectralEarlyStopping,
    WeightSpectrumMonitor,
)
from spectral_callbacks.callbacks.metrics import MetricSpec, chart_layout, expand_names, matches
from spectral_callbacks.curvature.preconditioner import RATIO_METRICS

from ..models import TanhRegressor, regression_data, trainer_kwargs


def test_templated_rows_expand_to_every_eigenvalue_and_layer():
    specs = [MetricSpec("eig_{i}", chart="top"), MetricSpec("layer/{layer}/trace"), MetricSpec("x")]
    names = expand_names(specs, "p/", k=3, layers=["a", "b.0"])
    assert names == ["p/eig_1", "p/eig_2", "p/eig_3", "p/layer/a/trace", "p/layer/b.0/trace", "p/x"]
    assert chart_layout(specs, "p/") == {"top": [r"p/eig_\d+"]}
    assert matches(specs, "p/", "p/eig_12") and matches(specs, "p/", "p/named/x")
    assert not matches(specs, "p/", "p/eig_x") and not matches(specs, "p/", "q/x")


def test_the_metrics_that_may_be_nan_by_definition_are_the_ratio_metrics():
    undefined = {spec.name for spec in SharpnessMonitor.METRICS if spec.may_be_undefined}
    # ... and the share of time measuring, undefined before any training step.
    assert undefined == {*RATIO_METRICS, SharpnessMonitor.OVERHEAD_ROW}


@pytest.mark.parametrize(
    "make",
    [
        lambda: SharpnessMonitor(every_n_steps=2),
        lambda: HessianSpectrumMonitor(every_n_steps=2, k=2, density_steps=8, layer_traces=4),
        lambda: HessianSpectrumMonitor(every_n_steps=2, k=2, trace=False, density=False),
        lambda: RepresentationMonitor(layers=["net.1", "net.3"], every_n_steps=2, num_samples=16),
        lambda: WeightSpectrumMonitor(every_n_steps=2, drift_rank=2),
        lambda: WeightSpectrumMonitor(every_n_steps=2, farms=False),
    ],
)
def test_a_measurement_publishes_exactly_the_names_of_the_table(make):
    monitor = make()
    x, y = regression_data()
    trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer.fit(TanhRegressor(), loader)
    published = set(monitor.history[-1][1])
    names = set(monitor.metric_names())
    # eigenspace_overlap / _angle appear from the second converged measurement on.
    later = {monitor.prefix + "eigenspace_overlap", monitor.prefix + "eigenspace_angle"}
    assert names - published <= later
    assert published <= names
    charts = monitor.chart_layout().values()
    charted = [tag for chart in charts for tags in chart.values() for tag in tags]
    assert charted and all(any(re.fullmatch(tag, n) for n in names) for tag in charted)


def _fit(monitor):
    x, y = regression_data()
    trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer.fit(TanhRegressor(), loader)


def test_alpha_req_without_enough_ranks_is_nan_by_definition_not_a_failure():
    # A 32-wide layer has no ranks 40..100 to fit.
    monitor = RepresentationMonitor(
        layers=["net.1"], every_n_steps=2, num_samples=64, fit_range=(40, 100)
    )
    with pytest.warns(RuntimeWarning, match="α-ReQ of 'net.1' is NaN") as caught:
        _fit(monitor)
    values = monitor.history[-1][1]
    assert math.isnan(values["spectral/repr/net.1/alpha_req"])
    assert math.isfinite(values["spectral/repr/net.1/rankme"])
    assert monitor.undefined_metrics() == {"spectral/repr/net.1/alpha_req"}
    assert not [w for w in caught if "non-finite" in str(w.message)]


def test_weights_without_farms_publish_no_farms_alpha_and_no_nan():
    monitor = WeightSpectrumMonitor(every_n_steps=2, farms=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*non-finite.*")
        _fit(monitor)
    values = monitor.history[-1][1]
    assert values and not any("farms_alpha" in name for name in values)
    # The 1-output head has one eigenvalue: no tail to fit, NaN by definition.
    undefined = monitor.undefined_metrics()
    assert "spectral/weights/net.4/alpha" in undefined
    assert all(math.isfinite(v) for name, v in values.items() if name not in undefined)


def test_the_weights_per_layer_charts_leave_the_average_out():
    monitor = WeightSpectrumMonitor(every_n_steps=2, name="w")
    charts = monitor.chart_layout()["spectral: weights (w)"]
    per_layer = charts["α per layer"]
    assert any(re.fullmatch(tag, "spectral/weights/w/net.0/alpha") for tag in per_layer)
    assert not any(re.fullmatch(tag, "spectral/weights/w/all_layers/alpha") for tag in per_layer)
    averages = charts["averages over layers: α and FARMS α"]
    assert averages == [
        "spectral/weights/w/all_layers/alpha",
        "spectral/weights/w/all_layers/farms_alpha",
    ]


def test_a_name_without_a_row_is_refused_and_presets_watch_table_rows():
    monitor = SharpnessMonitor(every_n_steps=1, name="fast")
    assert monitor.metric("lambda_max") == "spectral/hessian/fast/lambda_max"
    with pytest.raises(KeyError, match="lambda_maxx"):
        monitor.metric("lambda_maxx")
    assert SpectralEarlyStopping.sharpness().monitor == "spectral/hessian/eos_ratio"
    assert SpectralEarlyStopping.rank_collapse("enc").monitor == "spectral/repr/enc/rankme"
    assert SpectralEarlyStopping.alpha_band().monitor == "spectral/weights/all_layers/alpha"
    assert SpectralEarlyStopping.alpha_band(layer="fc").monitor == "spectral/weights/fc/alpha"
