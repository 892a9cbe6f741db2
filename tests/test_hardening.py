"""Ordinary situations that once crashed or gave a confident wrong number (issue: hardening)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from spectral_callbacks import (
    Batches,
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
)
from spectral_callbacks.curvature import as_batch_list
from spectral_callbacks.functional import (
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    rankme,
)
from spectral_callbacks.representation import as_embedding_matrix

from .helpers import dense_hessian_func, make_case
from .lightning_helpers import cli_round_trip, trainer_kwargs

# -- batches of every shape ---------------------------------------------------------------------


class TokenModel(LightningModule):
    """A next-token model whose loader yields one (B, T) token tensor per batch."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))

    def training_step(self, batch, batch_idx):
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


Pair = collections.namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Example:
    x: torch.Tensor
    y: torch.Tensor


def _pack(kind: str, x: torch.Tensor, y: torch.Tensor):
    return {
        "tuple": lambda: (x, y),
        "list": lambda: [x, y],
        "dict": lambda: {"x": x, "y": y},
        "namedtuple": lambda: Pair(x, y),
        "dataclass": lambda: Example(x, y),
    }[kind]()


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if isinstance(batch, (Pair, Example)):
        return batch.x, batch.y
    return batch[0], batch[1]


class AnyBatchRegressor(LightningModule):
    """lr 0: the model measured at any step is the model at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = _unpack(batch)
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Listed(torch.utils.data.Dataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def test_a_plain_tensor_batch_is_one_batch_and_batches_says_it_is_several():
    tokens = torch.randint(0, 11, (4, 7))
    assert len(as_batch_list(tokens)) == 1
    assert len(as_batch_list([tokens])) == 1  # [x] reads as the one batch [x]
    assert len(as_batch_list(Batches([tokens]))) == 1
    assert as_batch_list(Batches([tokens]))[0] is tokens
    assert len(as_batch_list(Batches([tokens, tokens]))) == 2
    with pytest.raises(ValueError, match="holds no batch"):
        as_batch_list([])


def test_sharpness_monitor_on_a_token_tensor_loader_matches_the_functional_api():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (24, 9))
    loader = torch.utils.data.DataLoader(tokens, batch_size=8)
    model = TokenModel()
    monitor = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    trainer = L.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    assert [s for s, _ in monitor.history] == [1, 2]

    def loss(m, batch):
        logits = m(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    reference = hessian_eigenvalues(
        model, loss, Batches([tokens[:8], tokens[8:16]]), k=1, tol=1e-10
    )
    assert monitor.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(reference.eigenvalues[0]), rel=1e-6
    )


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple", "dataclass"])
def test_every_batch_type_reaches_training_step_as_it_was(kind):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    batches = [_pack(kind, x[:5], y[:5]), _pack(kind, x[5:], y[5:])]
    loader = torch.utils.data.DataLoader(_Listed(batches), batch_size=None)
    torch.manual_seed(0)
    model = AnyBatchRegressor()
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-8, probe_batches=2)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=1, k=2, tol=1e-8, probe_batches=2, trace_hvps=6, density_steps=4
    )
    trainer = L.Trainer(max_steps=2, callbacks=[monitor, spectrum], **trainer_kwargs())
    trainer.fit(model, loader)
    assert [s for s, _ in monitor.history] == [1, 2]
    plain = [(x[:5], y[:5]), (x[5:], y[5:])]
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    reference = hessian_eigenvalues(model, mse, plain, k=2, tol=1e-10).eigenvalues
    assert monitor.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(reference[0]), rel=1e-6
    )
    assert spectrum.last_metrics["spectral/hessian/eig_2"] == pytest.approx(
        float(reference[1]), rel=1e-6
    )


# -- what the loss is: mean or sum --------------------------------------------------------------


def _sum_ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.parametrize("params", [None, ["0"]], ids=["all", "subset"])
def test_summed_losses_over_unequal_batches_match_the_dense_hessian_of_the_sum(params):
    model, batches = make_case("mlp")  # batches of 7, 4 and 9 samples
    dense = dense_hessian_func(model, _sum_ce, batches, reduction="sum")
    if params is not None:
        first = sum(p.numel() for p in model[0].parameters())
        dense = dense[:first, :first]
    exact = torch.linalg.eigvalsh(dense)
    result = hessian_eigenvalues(
        model, _sum_ce, batches, k=3, tol=1e-10, reduction="sum", params=params
    )
    torch.testing.assert_close(result.eigenvalues, exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    trace = hessian_trace(model, _sum_ce, batches, num_hvps=10_000, reduction="sum", params=params)
    assert trace.estimate == pytest.approx(float(dense.trace()), rel=1e-10)
    density = hessian_density(
        model, _sum_ce, batches, num_probes=2, steps=dense.shape[0], reduction="sum", params=params
    )
    assert float(density.nodes.max()) == pytest.approx(float(exact[-1]), rel=1e-8)
    # The mean-weighted reading of the same sums is a different Hessian.
    mean_weighted = hessian_eigenvalues(model, _sum_ce, batches, k=1, tol=1e-10, params=params)
    assert abs(float(mean_weighted.eigenvalues[0]) / float(exact[-1]) - 1) > 0.3


def test_the_monitors_take_reduction_sum():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]

    class SumRegressor(AnyBatchRegressor):
        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(batch[0]), batch[1], reduction="sum")

    torch.manual_seed(0)
    model = SumRegressor()
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-9, probe_batches=2, reduction="sum")
    loader = torch.utils.data.DataLoader(_Listed(batches), batch_size=None)
    trainer = L.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    summed = lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="sum")  # noqa: E731
    dense = dense_hessian_func(model, summed, batches, reduction="sum")
    assert monitor.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6
    )
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        SharpnessMonitor(reduction="none")


# -- convergence is reported -------------------------------------------------------------------


def test_an_unconverged_value_is_flagged_and_warned_once():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-12, max_iter=2)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=1, k=3, tol=1e-12, max_iter=4, trace=False, density=False
    )
    trainer = L.Trainer(max_steps=2, callbacks=[monitor, spectrum], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="did not reach tol=1e-12 within max_iter=2") as record:
        trainer.fit(AnyBatchRegressor(), loader)
    assert monitor.last_metrics["spectral/hessian/lambda_max_converged"] == 0.0
    assert spectrum.last_metrics["spectral/hessian/eigs_converged"] < 1.0
    messages = [str(w.message) for w in record if "did not reach" in str(w.message)]
    assert len(messages) == 2  # once per monitor, not once per measurement

    converged = SharpnessMonitor(every_n_steps=1)
    trainer = L.Trainer(max_steps=1, callbacks=[converged], **trainer_kwargs())
    trainer.fit(AnyBatchRegressor(), loader)
    assert converged.last_metrics["spectral/hessian/lambda_max_converged"] == 1.0


# -- two monitors of one class ---------------------------------------------------------------


def test_two_monitors_of_one_class_need_names_and_then_log_apart():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    summed = lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="sum")  # noqa: E731
    clash = [SharpnessMonitor(every_n_steps=1), SharpnessMonitor(every_n_steps=1, loss_fn=summed)]
    trainer = L.Trainer(max_steps=1, callbacks=clash, **trainer_kwargs())
    with pytest.raises(ValueError, match="give each a different name="):
        trainer.fit(AnyBatchRegressor(), loader)

    mean = SharpnessMonitor(every_n_steps=1, tol=1e-8)
    total = SharpnessMonitor(every_n_steps=1, tol=1e-8, loss_fn=summed, reduction="sum", name="sum")
    trainer = L.Trainer(max_steps=1, callbacks=[mean, total], **trainer_kwargs())
    trainer.fit(AnyBatchRegressor(), loader)
    assert mean.state_key != total.state_key
    ratio = (
        trainer.callback_metrics["spectral/hessian/sum/lambda_max"]
        / (trainer.callback_metrics["spectral/hessian/lambda_max"])
    )
    assert float(ratio) == pytest.approx(16.0, rel=1e-5)  # the sum over 16 samples
    with pytest.raises(ValueError, match="name must be None or a non-empty string"):
        SharpnessMonitor(name="a/b")


# -- representations ---------------------------------------------------------------------------


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


def test_rankme_and_friends_refuse_what_they_cannot_measure():
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        rankme(torch.zeros(8, 3))
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        rankme(torch.zeros(0))
    with pytest.raises(ValueError, match="complex"):
        rankme(torch.randn(8, 3, dtype=torch.complex64))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        rankme(torch.full((8, 3), math.nan))


# -- checkpoints -------------------------------------------------------------------------------


def _fit_pairs(tmp_path, max_steps, monitor, ckpt_path=None, every=None):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)
    pairs = [Pair(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    loader = torch.utils.data.DataLoader(_Listed(pairs), batch_size=None)

    class Learning(AnyBatchRegressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callbacks = [monitor]
    if every is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1
            )
        )
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=callbacks,
        **trainer_kwargs(enable_checkpointing=every is not None),
    )
    trainer.fit(Learning(), loader, ckpt_path=ckpt_path)
    return trainer


def test_a_probe_of_named_tuples_survives_a_checkpoint_read_with_weights_only(tmp_path):
    whole = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "whole", 8, whole)
    first = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "ckpt", 3, first, every=3)  # an epoch boundary: 3 batches an epoch
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(path)  # torch's default: weights_only=True
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "SharpnessMonitor" in k]
    assert state["probe"] is None and len(state["probe_tensors"]) == 2
    resumed = SharpnessMonitor(every_n_steps=2, tol=1e-8, probe_batches=2)
    _fit_pairs(tmp_path / "resumed", 8, resumed, ckpt_path=str(path))
    assert isinstance(resumed._probe[0], Pair)
    assert resumed.history == whole.history


def test_checkpoints_carry_warm_start_vectors_only_when_asked_or_small():
    vector = torch.ones(10)
    monitor = SharpnessMonitor()
    monitor._start = vector
    assert torch.equal(monitor.state_dict()["warm_start"]["start"], vector)
    off = SharpnessMonitor(checkpoint_warm_start=False)
    off._start = vector
    assert "warm_start" not in off.state_dict()
    large = HessianSpectrumMonitor(k=2)
    large._start = torch.empty(3, 2**22)  # 48 MiB: kept
    assert "warm_start" in large.state_dict()
    large._start = torch.empty(3, 2**23)  # 96 MiB: over the default bound of 64 MiB
    with pytest.warns(RuntimeWarning, match="left out of checkpoints"):
        assert "warm_start" not in large.state_dict()
    with pytest.raises(TypeError, match="checkpoint_warm_start must be True or False"):
        SharpnessMonitor(checkpoint_warm_start="no")


def test_history_is_bounded_and_figures_are_sparse(tmp_path, monkeypatch):
    monkeypatch.setattr(SharpnessMonitor, "history_size", 3)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    sharpness = SharpnessMonitor(every_n_steps=1)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=2, k=2, trace_hvps=4, density_probes=1, density_steps=3
    )
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        max_steps=20,
        max_epochs=-1,
        callbacks=[sharpness, spectrum],
        **trainer_kwargs(logger=logger),
    )
    trainer.fit(AnyBatchRegressor(), loader)
    assert [s for s, _ in sharpness.history] == [18, 19, 20]
    assert sharpness.num_measurements == 21
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    # Figures every 10 · every_n_steps = 20 steps; histograms at every measurement.
    assert [e.step for e in events.Images("spectral/hessian/density")] == [0, 20]
    assert len(events.Histograms("spectral/hessian/top_k")) == 11


# -- precision and honest convergence ----------------------------------------------------------


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y.long())


@pytest.mark.parametrize("tol", [1e-8, 1e-6, 1e-4])
def test_a_float32_solve_claims_no_residual_a_float64_product_does_not_confirm(tol):
    model, batches = make_case("mlp")  # float64
    dense = dense_hessian_func(model, _ce, batches)
    single = copy.deepcopy(model).float()
    data = [(x.float(), y) for x, y in batches]
    result = hessian_eigenvalues(
        single, _ce, data, k=3, tol=tol, return_eigenvectors=True, max_iter=60
    )
    vectors = result.eigenvectors.double()
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    true = (vectors @ dense - result.eigenvalues.unsqueeze(1) * vectors).norm(dim=1)
    for flag, residual, value in zip(result.converged, true, result.eigenvalues, strict=True):
        if flag:
            # The float64 residual of the float32 vector, up to the vector's own rounding.
            assert residual <= tol * abs(value) + 1e-6 * abs(value), (tol, residual, value)
    if tol == 1e-8:
        assert not bool(result.converged.any())  # float32 cannot resolve 1e-8
    if tol == 1e-4:
        assert bool(result.converged.all())
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    # Rayleigh quotients of float32 vectors never exceed λ_max by more than float32 rounding.
    assert float(result.eigenvalues[0]) <= float(exact[0]) * (1 + 1e-6)


def test_a_repeated_eigenvalue_is_not_skipped_when_the_krylov_space_exhausts():
    from spectral_callbacks.linalg import DenseOperator, lanczos

    torch.manual_seed(0)
    spectrum = torch.cat([torch.zeros(4), torch.linspace(0.6, 20, 8)]).double()
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    a = q @ torch.diag(spectrum) @ q.T
    for seed in range(3):
        result = lanczos(DenseOperator(0.5 * (a + a.T)), k=5, which="SA", tol=1e-8, seed=seed)
        torch.testing.assert_close(result.eigenvalues, spectrum[:5], atol=1e-10, rtol=0)
        assert bool(result.converged.all())


class HalfRegressor(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_models_are_measured_against_the_float64_truth(precision):
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = HalfRegressor()
    sharpness = SharpnessMonitor(every_n_steps=1, probe_data=(x, y), tol=0.05)
    spectrum = HessianSpectrumMonitor(every_n_steps=1, k=2, tol=0.05)  # defaults otherwise
    trainer = L.Trainer(
        max_steps=1, callbacks=[sharpness, spectrum], **trainer_kwargs(precision=precision)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    truth_model = copy.deepcopy(model).double()
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    truth = hessian_eigenvalues(truth_model, mse, (x.double(), y.double()), k=2, tol=1e-10)
    lam = sharpness.last_metrics["spectral/hessian/lambda_max"]
    assert lam == pytest.approx(float(truth.eigenvalues[0]), rel=2e-2)
    assert spectrum.last_metrics["spectral/hessian/eig_2"] == pytest.approx(
        float(truth.eigenvalues[1]), rel=5e-2
    )
    assert math.isfinite(spectrum.last_metrics["spectral/hessian/trace"])
    # A tolerance below the products' rounding is never claimed.
    half = copy.deepcopy(model)
    dtype = next(half.parameters()).dtype
    tight = hessian_eigenvalues(half, mse, (x.to(dtype), y.to(dtype)), k=1, tol=1e-5)
    assert not bool(tight.converged.any())
    assert float(tight.eigenvalues[0]) == pytest.approx(float(truth.eigenvalues[0]), rel=2e-2)


# -- third-party patterns ----------------------------------------------------------------------


class StatefulRecurrent(LightningModule):
    """Keeps its hidden state between training steps, as Lightning's LSTM demo does."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(3, 5)
        self.head = nn.Linear(5, 1)
        self.hidden = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.cell(x, self.hidden)
        self.hidden = hidden.detach()
        return F.mse_loss(self.head(hidden), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_training_step_that_keeps_state_trains_as_without_the_monitors():
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)

    def fit(callbacks):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        torch.manual_seed(0)
        model = StatefulRecurrent()
        trainer = L.Trainer(max_steps=9, max_epochs=-1, callbacks=callbacks, **trainer_kwargs())
        trainer.fit(model, loader)
        return model

    plain = fit([])
    monitored = fit(
        [
            SharpnessMonitor(every_n_steps=2),
            HessianSpectrumMonitor(every_n_steps=3, k=2, trace_hvps=4, density_steps=3),
        ]
    )
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.hidden, monitored.hidden)


def test_the_pytorch_lightning_namespace_logger_gets_histograms_and_the_layout(tmp_path):
    import pytorch_lightning  # installed with lightning

    from spectral_callbacks.reporting.tensorboard import tensorboard_writers

    logger = pytorch_lightning.loggers.TensorBoardLogger(tmp_path, name="pl", version=0)
    assert tensorboard_writers([logger]) == [logger.experiment]


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


def test_a_lightning_cli_config_with_a_parameter_list_round_trips(tmp_path):
    init_args = {"every_n_steps": 3, "params": ["net.0"], "reduction": "sum"}
    monitor = cli_round_trip(AnyBatchRegressor, SharpnessMonitor, init_args, tmp_path)
    assert monitor.operator_settings.params == ["net.0"]
    assert monitor.operator_settings.reduction == "sum"
