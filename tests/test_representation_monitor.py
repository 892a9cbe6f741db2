"""RepresentationMonitor in real Lightning runs (CPU)."""

from __future__ import annotations

import copy
import re

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from spectral_callbacks import RepresentationMonitor
from spectral_callbacks.functional import (
    alpha_req,
    effective_rank,
    participation_ratio,
    rankme,
    stable_rank,
)

from .lightning_helpers import trainer_kwargs
from .test_callbacks import Snapshots, read_events


class Encoder(L.LightningModule):
    """An encoder with BatchNorm and dropout, a token-like layer, and a tuple-returning layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, 16)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class WithValidation(Encoder):
    def validation_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


def loaders(n_train=256, n_val=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train = torch.utils.data.TensorDataset(x[:n_train], y[:n_train])
    val = torch.utils.data.TensorDataset(x[n_train:], y[n_train:])
    return (
        torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=40),
        x,
    )


def reference_metrics(model: nn.Module, inputs: torch.Tensor) -> dict[str, dict[str, float]]:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        features = {"encoder": model.encoder(inputs), "encoder.2": model.encoder[:3](inputs)}
    out = {}
    for layer, z in features.items():
        z = z.double()
        out[layer] = {
            "rankme": rankme(z),
            "alpha_req": alpha_req(z, fit_range=(2, 10)),
            "effective_rank": effective_rank(z),
            "stable_rank": stable_rank(z),
            "participation_ratio": participation_ratio(z),
        }
    return out


def test_logs_every_layer_and_matches_a_direct_forward(tmp_path):
    train, val, x = loaders()
    monitor = RepresentationMonitor(
        layers=["encoder", "encoder.2"], every_n_steps=4, num_samples=80, fit_range=(2, 10)
    )
    snapshots = Snapshots()
    logger = TensorBoardLogger(tmp_path, name="repr", version=0)
    L.seed_everything(0, verbose=False)
    model = WithValidation()
    trainer = L.Trainer(
        max_steps=8,
        callbacks=[monitor, snapshots],
        **trainer_kwargs(logger=logger, num_sanity_val_steps=0),
    )
    trainer.fit(model, train, val)
    # The probe is the first validation batches (80 samples -> two batches of 40).
    probe_inputs = torch.cat([b[0] for b in monitor._probe])
    assert torch.equal(probe_inputs, x[256 : 256 + 80])
    events = read_events(logger.log_dir)
    for layer in ("encoder", "encoder.2"):
        for metric in (
            "rankme",
            "alpha_req",
            "effective_rank",
            "stable_rank",
            "participation_ratio",
            "vne",
        ):
            tag = f"spectral/repr/{layer}/{metric}"
            assert [e.step for e in events.Scalars(tag)] == [0, 4, 8], tag
            assert tag in trainer.callback_metrics
    for step in (0, 4, 8):
        model_at = copy.deepcopy(model)
        model_at.load_state_dict(snapshots.states[step])
        reference = reference_metrics(model_at, probe_inputs)
        logged = dict(monitor.history)[step]
        for layer, values in reference.items():
            for metric, value in values.items():
                assert logged[f"spectral/repr/{layer}/{metric}"] == pytest.approx(
                    value, rel=1e-7
                ), (step, layer, metric)
    assert "spectral/repr/encoder/log10_eigenvalues" in events.Tags()["histograms"]
    assert "spectral/repr/encoder.2/scree" in events.Tags()["images"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(
        events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    )
    charts = {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }
    assert charts["RankMe per layer"] == [r"^spectral/repr/[^/]+/rankme$"]
    (rankme_tag,) = charts["RankMe per layer"]
    logged = [tag for tag in events.Tags()["scalars"] if tag.endswith("/rankme")]
    assert len(logged) == 2 and all(re.fullmatch(rankme_tag, tag) for tag in logged)


def test_without_validation_the_probe_is_the_first_training_batches():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(128, 8, generator=g), torch.randint(0, 3, (128,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    monitor = RepresentationMonitor(
        layers=["encoder"], every_n_steps=100, num_samples=64, fit_range=(2, 8)
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(Encoder(), loader)
    assert torch.equal(torch.cat([b[0] for b in monitor._probe]), x[:64])
    # Two batches were needed, so the first measurement comes with the second batch (step 1).
    assert [step for step, _ in monitor.history] == [1]


def _fit(callbacks, eval_mode_check=False):
    train, val, _ = loaders()
    L.seed_everything(0, verbose=False)
    model = WithValidation()
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, train, val)
    return model, copy.deepcopy(trainer.optimizers[0].state_dict()), torch.get_rng_state()


@pytest.mark.parametrize("eval_mode", [True, False])
def test_training_is_bit_identical_with_and_without_the_monitor(eval_mode):
    plain = _fit([])
    monitored = _fit(
        [
            RepresentationMonitor(
                layers=["encoder", "encoder.1"],
                every_n_steps=3,
                num_samples=64,
                eval_mode=eval_mode,
            )
        ]
    )
    for (name, a), b in zip(
        plain[0].state_dict().items(), monitored[0].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for key, state in plain[1]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, monitored[1]["state"][key][field])
    assert torch.equal(plain[2], monitored[2])
    assert [m.training for m in plain[0].modules()] == [m.training for m in monitored[0].modules()]
    assert all(not m._forward_hooks for m in monitored[0].modules())


def test_unknown_layer_fails_at_setup_with_close_matches():
    train, _, _ = loaders()
    trainer = L.Trainer(
        max_steps=1, callbacks=[RepresentationMonitor(layers=["encodr"])], **trainer_kwargs()
    )
    with pytest.raises(
        ValueError, match=r"'encodr' is not a submodule.*close matches: \['encoder'"
    ):
        trainer.fit(Encoder(), train)


class Wrapper(L.LightningModule):
    """Holds a model and calls it in ``training_step``: no ``forward`` of its own (the usual
    way to train a Hugging Face model)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Encoder()
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return self.model.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.model.configure_optimizers()


def test_a_module_without_forward_needs_forward_fn_and_fails_before_training():
    train, _, _ = loaders()
    module = Wrapper()
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[RepresentationMonitor(layers=["model.encoder"], every_n_steps=2)],
        **trainer_kwargs(),
    )
    with pytest.raises(ValueError, match=r"Wrapper does not define: define forward.*forward_fn"):
        trainer.fit(module, train)
    assert module.steps_run == 0

    monitor = RepresentationMonitor(
        layers=["model.encoder"],
        every_n_steps=2,
        num_samples=64,
        forward_fn=lambda module, batch: module.model(batch[0]),
    )
    trainer = L.Trainer(max_steps=4, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(Wrapper(), train)
    assert len(monitor.history) >= 2
    for _, values in monitor.history:
        assert 1.0 < values["spectral/repr/model.encoder/rankme"] <= 16.0


def test_tuple_outputs_need_select():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x.mean()

    class PairModel(Encoder):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.head(self.pair(self.encoder(x))[0])

    train, _, _ = loaders()
    selected = RepresentationMonitor(
        layers=["pair"],
        select=lambda out: out[0],
        every_n_steps=100,
        num_samples=32,
        fit_range=(2, 8),
    )
    trainer = L.Trainer(max_steps=1, callbacks=[selected], **trainer_kwargs())
    trainer.fit(PairModel(), train)
    assert np.isfinite(selected.last_metrics["spectral/repr/pair/rankme"])
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[RepresentationMonitor(layers=["pair"], num_samples=32)],
        **trainer_kwargs(),
    )
    with pytest.raises(TypeError, match=r"layer 'pair' returned tuple.*select="):
        trainer.fit(PairModel(), train)


def test_small_layers_log_nan_alpha_with_one_warning():
    train, _, _ = loaders()
    monitor = RepresentationMonitor(layers=["head"], every_n_steps=1, num_samples=32)  # D = 3 < 11
    trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="α-ReQ of 'head' is NaN") as record:
        trainer.fit(Encoder(), train)
    assert len([w for w in record if "α-ReQ" in str(w.message)]) == 1
    assert all(np.isnan(values["spectral/repr/head/alpha_req"]) for _, values in monitor.history)
    assert all(0 < values["spectral/repr/head/rankme"] <= 3 for _, values in monitor.history)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": []}, "layers must be a non-empty sequence"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"pool": "max"}, "pool must be one of"),
        ({"fit_range": (10, 5)}, "fit_range must be"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RepresentationMonitor(**kwargs)
