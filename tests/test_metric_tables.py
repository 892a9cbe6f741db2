"""The monitors' metric tables: names, dashboard and NaN-by-definition rows agree with what
a measurement publishes."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from spectral_callbacks import HessianSpectrumMonitor, SharpnessMonitor
from spectral_callbacks.callbacks.metrics import MetricSpec, chart_layout, expand_names, matches
from spectral_callbacks.curvature.preconditioner import RATIO_METRICS

from .lightning_helpers import TanhRegressor, regression_data, trainer_kwargs


def test_templated_rows_expand_to_every_eigenvalue_and_layer():
    specs = [MetricSpec("eig_{i}", chart="top"), MetricSpec("layer/{layer}/trace"), MetricSpec("x")]
    names = expand_names(specs, "p/", k=3, layers=["a", "b.0"])
    assert names == ["p/eig_1", "p/eig_2", "p/eig_3", "p/layer/a/trace", "p/layer/b.0/trace", "p/x"]
    assert chart_layout(specs, "p/") == {"top": [r"p/eig_\d+"]}
    assert matches(specs, "p/", "p/eig_12") and matches(specs, "p/", "p/named/x")
    assert not matches(specs, "p/", "p/eig_x") and not matches(specs, "p/", "q/x")


def test_the_metrics_that_may_be_nan_by_definition_are_the_ratio_metrics():
    undefined = {spec.name for spec in SharpnessMonitor.METRICS if spec.may_be_undefined}
    assert undefined == set(RATIO_METRICS)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SharpnessMonitor(every_n_steps=2),
        lambda: HessianSpectrumMonitor(every_n_steps=2, k=2, density_steps=8, layer_traces=4),
        lambda: HessianSpectrumMonitor(every_n_steps=2, k=2, trace=False, density=False),
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
