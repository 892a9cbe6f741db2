"""RepresentationMonitor in real Lightning runs (CPU)."""

from __future__ import annotations

import copy
import math
import re
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from spectral_callbacks import (
    RepresentationMonitor,
    SpectralEarlyStopping,
)
from spectral_callbacks.functional import (
    alpha_req,
    effective_rank,
    participation_ratio,
    rankme,
    stable_rank,
)
from spectral_callbacks.representation import as_embedding_matrix

from ..models import noisy_mlp, trainer_kwargs
from ..runs import Snapshots, read_events


class Encoder(L.LightningModule):
    """An encoder with BatchNorm and dropout, a token-like layer, and a tuple-returning layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = noisy_mlp(8, 24, 16, dropout=0.1, activation=nn.ReLU)
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


def _fit(callbacks, validation=True):
    train, val, _ = loaders()
    L.seed_everything(0, verbose=False)
    model = WithValidation()
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, train, val if validation else None)
    return model, copy.deepcopy(trainer.optimizers[0].state_dict()), torch.get_rng_state()


@pytest.mark.parametrize("validation", [True, False], ids=["validation probe", "training probe"])
@pytest.mark.parametrize("eval_mode", [True, False])
def test_training_is_bit_identical_with_and_without_the_monitor(eval_mode, validation):
    # The training probe takes two batches: its first is also run once at step 0 (the check
    # that the layers' outputs fit), which must leave training untouched too.
    plain = _fit([], validation)
    monitor = RepresentationMonitor(
        layers=["encoder", "encoder.1"], every_n_steps=3, num_samples=64, eval_mode=eval_mode
    )
    monitored = _fit([monitor], validation)
    assert monitor.history and monitor.history[0][0] == (0 if validation else 1)
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


class Pair(nn.Module):
    def forward(self, x):
        return x, x.mean()


class PairModel(Encoder):
    """The encoder with a layer, ``pair``, that returns a tuple."""

    def __init__(self):
        super().__init__()
        self.pair = Pair()

    def forward(self, x):
        return self.head(self.pair(self.encoder(x))[0])


def test_tuple_outputs_need_select():
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


def test_a_layer_output_that_does_not_fit_raises_before_the_first_step():
    """The training probe here needs every batch of the epoch: without the check of its first
    batch the error would come at the end of the epoch, after its training steps."""
    train, _, _ = loaders()
    monitor = RepresentationMonitor(layers=["pair"], num_samples=10_000)
    trainer = L.Trainer(max_steps=3, callbacks=[monitor], **trainer_kwargs())
    with pytest.raises(TypeError, match=r"layer 'pair' returned tuple \(Tensor\[32, 16\]"):
        trainer.fit(PairModel(), train)
    assert trainer.global_step == 0


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
        ({"num_samples": 1}, "num_samples must be an integer >= 2"),
        ({"pool": "max"}, "pool must be one of"),
        ({"fit_range": (10, 5)}, "fit_range must be"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RepresentationMonitor(**kwargs)


class ConvNet(LightningModule):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _features_of(model, layer, x):
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: captured.append(o.detach())
    )
    with torch.no_grad():
        model.eval()
        model(x)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("pool", ["flatten", "mean"])
def test_rankme_of_a_convolution_uses_channels_as_features(pool):
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 7)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.randint(0, 2, (64,))), batch_size=64
    )
    model = ConvNet()
    monitor = RepresentationMonitor(
        layers=["conv"], every_n_steps=1, num_samples=64, pool=pool, fit_range=(2, 10)
    )
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    features = _features_of(model, "conv", x).double()  # (N, C, H, W)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 16)  # every position a sample of C features
    if pool == "mean":
        rows = features.mean(dim=(2, 3))
    singular = torch.linalg.svdvals(rows)
    p = singular / singular.sum() + 1e-7
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert monitor.last_metrics["spectral/repr/conv/rankme"] == pytest.approx(expected, rel=1e-6)
    assert monitor.last_metrics["spectral/repr/conv/rankme"] > 7.0  # not the width (7)


def test_embedding_layouts_against_the_definition():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(32, 24, 4, 4, generator=g, dtype=torch.float64)  # white noise, C = 24
    rows = as_embedding_matrix(noise, layout="channels_first")
    assert rows.shape == (32 * 16, 24)
    torch.testing.assert_close(rows[1], noise[0, :, 0, 1])
    # White noise over 512 samples of 24 features: RankMe near 24, not near the width 4.
    assert rankme(rows) > 20
    tokens = torch.randn(4, 9, 6, generator=g, dtype=torch.float64)
    assert torch.equal(as_embedding_matrix(tokens), tokens.reshape(36, 6))
    conv1d = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    assert torch.equal(
        as_embedding_matrix(conv1d, layout="channels_first"), conv1d.transpose(1, 2).reshape(36, 6)
    )
    assert torch.equal(as_embedding_matrix(tokens[:, 0]), tokens[:, 0])
    with pytest.raises(ValueError, match="layout must be one of"):
        as_embedding_matrix(tokens, layout="nchw")


def test_the_layout_of_layers_is_inferred_and_an_ambiguous_one_is_warned():
    from spectral_callbacks.representation import infer_layout

    assert infer_layout(nn.Conv1d(2, 3, 1), 3) == ("channels_first", True)
    assert infer_layout(nn.TransformerEncoderLayer(8, 2), 3) == ("channels_last", True)
    assert infer_layout(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU()), 4) == ("channels_first", True)
    assert infer_layout(nn.Linear(3, 3), 4) == ("channels_first", False)

    class ChannelsLast(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(5, 5)

        def forward(self, x):
            return self.mix(x)  # (N, H, W, C): features last, no convolution

        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x = torch.randn(8, 3, 3, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    monitor = RepresentationMonitor(
        layers=["mix"], every_n_steps=1, num_samples=8, fit_range=(1, 3)
    )
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="layout='channels_last'"):
        trainer.fit(ChannelsLast(), loader)
    told = RepresentationMonitor(
        layers=["mix"], every_n_steps=1, num_samples=8, fit_range=(1, 3), layout="channels_last"
    )
    model = ChannelsLast()
    trainer = L.Trainer(max_steps=1, callbacks=[told], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*layout.*")
        trainer.fit(model, loader)
    expected = rankme(_features_of(model, "mix", x).double())
    assert told.last_metrics["spectral/repr/mix/rankme"] == pytest.approx(expected, rel=1e-6)


class Diverging(LightningModule):
    """Its hidden layer outputs inf once the step counter passes 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        hidden = self.net[1](self.net[0](x))
        if self.steps > 1:
            hidden = hidden * math.inf
        return self.net[2](hidden)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_non_finite_activations_log_nan_warn_once_and_training_goes_on():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = RepresentationMonitor(
        layers=["net.1"], every_n_steps=1, num_samples=16, fit_range=(1, 4)
    )
    trainer = L.Trainer(max_steps=4, callbacks=[monitor], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        trainer.fit(Diverging(), loader)
    assert trainer.global_step == 4
    values = [v["spectral/repr/net.1/rankme"] for _, v in monitor.history]
    assert math.isfinite(values[0]) and all(math.isnan(v) for v in values[-2:])
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1


class TokenEncoder(LightningModule):
    """A block that returns a plain (B, T, D) tensor, like transformers 5.x blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)).mean(dim=1))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_select_that_drops_the_batch_dimension_is_warned():
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(16, 5, 4, generator=g), torch.randn(16, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    stale = RepresentationMonitor(
        layers=["block"],
        every_n_steps=1,
        num_samples=16,
        select=lambda out: out[0],
        fit_range=(1, 4),
    )
    trainer = L.Trainer(max_steps=1, callbacks=[stale], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="first dimension is not the batch of 16 samples"):
        trainer.fit(TokenEncoder(), loader)
    right = RepresentationMonitor(
        layers=["block"], every_n_steps=1, num_samples=16, fit_range=(1, 4)
    )
    trainer = L.Trainer(max_steps=1, callbacks=[right], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*first dimension.*")
        trainer.fit(TokenEncoder(), loader)


class SharedBlock(L.LightningModule):
    """One block applied twice (its weights shared), after an input layer applied once;
    trained with a zero learning rate, so every measurement sees the initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.block(self.block(self.inp(x))))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_layer_that_runs_twice_per_forward_pools_both_calls_and_is_warned():
    train, _, x = loaders()
    train = torch.utils.data.DataLoader(train.dataset, batch_size=32)
    monitor = RepresentationMonitor(
        layers=["block", "inp"], every_n_steps=1, num_samples=32, fit_range=(2, 10)
    )
    model = SharedBlock()
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train)
    repeated = [str(w.message) for w in caught if "more than once" in str(w.message)]
    assert len(repeated) == 1 and "layer 'block'" in repeated[0]
    with torch.no_grad():
        once = model.inp(x[:32])
        first = model.block(once)
        pooled = torch.cat([first, model.block(first)]).double()
    logged = monitor.last_metrics
    assert logged["spectral/repr/block/rankme"] == pytest.approx(rankme(pooled), rel=1e-7)
    assert logged["spectral/repr/block/effective_rank"] == pytest.approx(
        effective_rank(pooled), rel=1e-7
    )
    assert logged["spectral/repr/inp/rankme"] == pytest.approx(rankme(once.double()), rel=1e-7)


class ShiftedOnTransfer(L.LightningModule):
    """A plain encoder whose ``on_after_batch_transfer`` shifts the inputs by 1."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch[0] + 1, batch[1]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]).float(), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_validation_probe_is_the_batch_a_step_would_see():
    """Under ``bf16-true`` a step gets bfloat16 inputs, after the module's transfer hooks:
    so does the probe taken from the validation loader (it got float32 inputs, unshifted,
    and the bfloat16 model raised)."""
    train, val, x = loaders()
    monitor = RepresentationMonitor(layers=["encoder"], every_n_steps=2, num_samples=40)
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[monitor],
        **trainer_kwargs(precision="bf16-true", num_sanity_val_steps=0),
    )
    trainer.fit(ShiftedOnTransfer(), train, val)
    (probe,) = monitor._probe
    assert probe[0].dtype == torch.bfloat16
    assert torch.equal(probe[0], x[256 : 256 + 40].bfloat16() + 1)
    assert [step for step, _ in monitor.history] == [0, 2]


class WithSeveralValidationLoaders(Encoder):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None


@pytest.mark.parametrize("container", [list, dict])
def test_with_several_validation_loaders_the_probe_is_the_first_ones(container):
    """Validation loaders as a list or a dict of named loaders: the probe is the first
    loader's first batches (a dict read as its keys, and the probe as strings, raised)."""
    train, val, x = loaders()
    other = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(-x, x[:, 0]), batch_size=8)
    val_loaders = [val, other] if container is list else {"held_out": val, "shifted": other}
    monitor = RepresentationMonitor(layers=["encoder"], every_n_steps=2, num_samples=40)
    trainer = L.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(WithSeveralValidationLoaders(), train, val_loaders)
    (probe,) = monitor._probe
    assert torch.equal(probe[0], x[256 : 256 + 40])
    assert [step for step, _ in monitor.history] == [0, 2]


class MaskedMean(nn.Module):
    """The mean of each sequence's kept tokens: one row per sample."""

    def forward(self, tokens, mask):
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


class PaddedTokens(L.LightningModule):
    """Token ids with an attention mask (padding at the end), a token-wise ``encoder`` and
    a ``pooled`` mean over the real tokens; lr 0 keeps the weights the probe saw."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.pooled = MaskedMean()
        self.head = nn.Linear(6, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        return self.head(self.pooled(self.encoder(self.embed(input_ids)), attention_mask))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(**batch), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def padded_token_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 11, (32,), generator=g)
    samples = [
        {
            "input_ids": torch.randint(1, 20, (10,), generator=g) * (torch.arange(10) < n),
            "attention_mask": (torch.arange(10) < n).long(),
            "labels": torch.randint(0, 2, (), generator=g),
        }
        for n in lengths
    ]
    return torch.utils.data.DataLoader(samples, batch_size=8)


@pytest.mark.parametrize("masked", [True, False], ids=["mask_fn", "no mask"])
def test_mask_fn_leaves_the_padding_out_of_the_token_rows(masked):
    """With mask_fn the encoder's rows are the real tokens only (RankMe and effective rank
    of those rows, by the functional metrics on the layer recomputed), and the per-sample
    ``pooled`` layer keeps its 16 rows; without, every position is a row."""
    mask_fn = (lambda batch: batch["attention_mask"]) if masked else None
    monitor = RepresentationMonitor(
        layers=["encoder", "pooled"], every_n_steps=2, num_samples=16, mask_fn=mask_fn
    )
    torch.manual_seed(0)
    model = PaddedTokens()
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 pooled rows for 6 dimensions and the like
        trainer.fit(model, padded_token_loader())
    logged = monitor.history[0][1]
    ids = torch.cat([b["input_ids"] for b in monitor._probe])
    mask = torch.cat([b["attention_mask"] for b in monitor._probe]).bool()
    with torch.no_grad():
        tokens = model.encoder(model.embed(ids))
        pooled = model.pooled(tokens, mask).double()
        tokens = tokens.double()
    rows = tokens[mask] if masked else tokens.reshape(-1, 6)
    assert logged["spectral/repr/encoder/rankme"] == pytest.approx(rankme(rows), rel=1e-9)
    assert logged["spectral/repr/encoder/effective_rank"] == pytest.approx(
        effective_rank(rows), rel=1e-9
    )
    assert logged["spectral/repr/pooled/rankme"] == pytest.approx(rankme(pooled), rel=1e-9)
    assert rankme(tokens[mask]) != pytest.approx(rankme(tokens.reshape(-1, 6)), rel=1e-3)


def test_bad_masks_are_named():
    with pytest.raises(ValueError, match="mask_fn does not combine with a callable pool"):
        RepresentationMonitor(mask_fn=lambda b: b[1], pool=lambda t: t.mean(1))
    with pytest.raises(TypeError, match="mask_fn"):
        RepresentationMonitor(mask_fn=lambda: None)
    cases = [
        (lambda batch: batch["attention_mask"].float(), TypeError, "bool .* tensor"),
        (lambda batch: batch["attention_mask"][:, :5], ValueError, "layer 'encoder'.*mask"),
    ]
    for mask_fn, error, message in cases:
        monitor = RepresentationMonitor(layers=["encoder"], num_samples=16, mask_fn=mask_fn)
        trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
        with pytest.raises(error, match=message):
            trainer.fit(PaddedTokens(), padded_token_loader())


class _Gate(nn.Module):
    """Passes its input, or zeros once ``closed()`` says so (a layer that dies)."""

    def __init__(self, closed) -> None:
        super().__init__()
        self.closed = closed

    def forward(self, x):
        return x * 0.0 if self.closed() else x


class Gated(Encoder):
    """The encoder's output through a gate that closes at step ``close_at``."""

    def __init__(self, close_at: int) -> None:
        super().__init__()
        self.gate = _Gate(lambda: self.trainer.global_step >= close_at)

    def forward(self, x):
        return self.head(torch.relu(self.gate(self.encoder(x))))


@pytest.mark.parametrize("close_at", [0, 3])
def test_a_dead_layer_reads_as_collapse_and_trips_the_stopper(close_at):
    """Outputs all zero from the start (a peak of 0) or from step 3 on: RankMe and the
    effective rank read 0, α-ReQ is NaN by definition, nothing crashes and rank_collapse
    stops the run at the first collapsed measurement."""
    train, _, _ = loaders()
    monitor = RepresentationMonitor(layers=["gate"], every_n_steps=1, num_samples=32)
    stopper = SpectralEarlyStopping.rank_collapse("gate")
    trainer = L.Trainer(max_steps=8, callbacks=[monitor, stopper], **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # α-ReQ of the dead layer: NaN, warned once
        trainer.fit(Gated(close_at), train)
    assert stopper.stopped_step == close_at and trainer.global_step <= close_at + 1
    for step, values in monitor.history:
        dead = step >= close_at
        assert (values["spectral/repr/gate/rankme"] == 0.0) == dead
        assert (values["spectral/repr/gate/effective_rank"] == 0.0) == dead
        assert math.isnan(values["spectral/repr/gate/alpha_req"]) == dead
    assert "no dimension left" in stopper.stopped_reason


class HalvesItsInput(WithValidation):
    """Scales its input in place in ``forward`` (as ``x /= 255`` would)."""

    def forward(self, x):
        x.mul_(0.5)
        return super().forward(x)


def test_a_forward_that_edits_its_input_in_place_leaves_the_probe_as_given():
    """Each measurement runs the model on a fresh copy of the probe: the probe does not
    halve again at every measurement, and each value is that of the inputs as given."""
    train, _, x = loaders()
    probe = (x[256:296].clone(), torch.zeros(40, dtype=torch.long))
    monitor = RepresentationMonitor(
        layers=["encoder"], every_n_steps=2, probe_data=probe, fit_range=(2, 10)
    )
    snapshots = Snapshots()
    L.seed_everything(0, verbose=False)
    model = HalvesItsInput()
    trainer = L.Trainer(max_steps=4, callbacks=[monitor, snapshots], **trainer_kwargs())
    trainer.fit(model, train)
    assert torch.equal(monitor._probe[0][0], x[256:296])
    for step, logged in monitor.history:
        model_at = copy.deepcopy(model)
        model_at.load_state_dict(snapshots.states[step])
        expected = reference_metrics(model_at, 0.5 * x[256:296])["encoder"]["rankme"]
        assert logged["spectral/repr/encoder/rankme"] == pytest.approx(expected, rel=1e-7), step
    assert [step for step, _ in monitor.history] == [0, 2, 4]
