"""SharpnessMonitor and HessianSpectrumMonitor in real Lightning runs (CPU)."""

from __future__ import annotations

import copy
import csv
import math
import re
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from spectral_callbacks import (
    Batches,
    HessianSpectrumMonitor,
    SharpnessMonitor,
)
from spectral_callbacks.callbacks.base import (
    PRESERVED_TENSOR_BYTES,
    preserved_attributes,
    training_step_loss,
)
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.functional import (
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)
from spectral_callbacks.linalg import deflated_hutchinson

from ..models import (
    AnyBatchRegressor,
    HostRandomClassifier,
    ListDataset,
    NoisyClassifier,
    RenormalisedEmbeddingClassifier,
    TanhRegressor,
    classification_loader,
    full_batch_loader,
    mse,
    pack_batch,
    regression_data,
    trainer_kwargs,
)
from ..oracles import dense_hessian_func
from ..runs import (
    Snapshots,
    assert_identical_runs,
    custom_charts,
    fit_and_capture,
    read_events,
    small_spectrum_monitor,
    spectral_history,
)


def test_tensorboard_events_match_the_functional_api(tmp_path):
    torch.manual_seed(0)
    x, y = regression_data(n=32, dtype=torch.float64)
    model = TanhRegressor(lr=0.1).double()
    sharpness = SharpnessMonitor(every_n_steps=5, tol=1e-8)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=10,
        k=3,
        tol=1e-8,
        trace_hvps=30,
        density_probes=2,
        density_steps=12,
        figure_every_n_steps=10,
    )
    snapshots = Snapshots()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[sharpness, spectrum, snapshots], **trainer_kwargs(logger=logger)
    )
    trainer.fit(model, full_batch_loader(x, y, 20))
    events = read_events(logger.log_dir)
    scalars = events.Tags()["scalars"]
    for tag in ["lambda_max", "eos_ratio", "stability_limit", "num_hvps", "lambda_max_residual"]:
        assert f"spectral/hessian/{tag}" in scalars
    for tag in [
        "eig_1",
        "eig_2",
        "eig_3",
        "trace",
        "trace_stderr",
        "negative_mass",
        "near_zero_mass",
        "lambda_min",
        "lambda_min_residual",
        "spectrum_num_hvps",
    ]:
        assert f"spectral/hessian/{tag}" in scalars

    lambda_max = {e.step: e.value for e in events.Scalars("spectral/hessian/lambda_max")}
    assert sorted(lambda_max) == [0, 5, 10, 15, 20]
    probe_model = copy.deepcopy(model)
    for step, logged in lambda_max.items():
        probe_model.load_state_dict(snapshots.states[step])
        # The callback used the module's own training_step; the reference an explicit loss.
        reference = hessian_eigenvalues(
            probe_model, mse, (x, y), k=3, tol=1e-10, return_eigenvectors=True
        )
        assert logged == pytest.approx(float(reference.eigenvalues[0]), rel=1e-6), step
        ratio = events.Scalars("spectral/hessian/eos_ratio")[sorted(lambda_max).index(step)].value
        assert ratio == pytest.approx(float(reference.eigenvalues[0]) * 0.1 / 2, rel=1e-6)
        if step % 10 == 0:
            eigs = [
                events.Scalars(f"spectral/hessian/eig_{i}")[step // 10].value for i in (1, 2, 3)
            ]
            assert eigs == pytest.approx(reference.eigenvalues.tolist(), rel=1e-6)
            # The trace: Hutchinson deflated by the top-3 Ritz pairs, within 4 standard errors
            # of the exact trace (all n unit vectors).
            with HessianOperator(probe_model, mse, (x, y)) as op:
                trace = deflated_hutchinson(
                    op, reference.eigenvectors, reference.eigenvalues, num_hvps=30, seed=0
                )
                exact = hessian_trace(probe_model, mse, (x, y), num_hvps=op.size).estimate
            logged = events.Scalars("spectral/hessian/trace")[step // 10].value
            # The deflation's Ritz vectors are the monitor's (tol 1e-8 on the eigenvalues:
            # vectors accurate to about 1e-4), the reference's are tighter.
            assert logged == pytest.approx(trace.estimate, rel=1e-4)
            stderr = events.Scalars("spectral/hessian/trace_stderr")[step // 10].value
            assert abs(logged - exact) <= 4 * stderr
            density = hessian_density(
                probe_model, mse, (x, y), num_probes=2, steps=12, seed=0, deflate=reference
            )
            for tag in ("lambda_min", "lambda_min_residual"):
                logged = events.Scalars(f"spectral/hessian/{tag}")[step // 10].value
                assert logged == pytest.approx(getattr(density, tag), rel=1e-5, abs=1e-9), tag
    limit = events.Scalars("spectral/hessian/stability_limit")[0].value
    assert limit == pytest.approx(2 / 0.1)

    histograms = events.Tags()["histograms"]
    assert "spectral/hessian/top_k" in histograms
    assert [h.step for h in events.Histograms("spectral/hessian/top_k")] == [0, 10, 20]
    assert "spectral/hessian/density" in events.Tags()["images"]
    image = events.Images("spectral/hessian/density")[-1]
    assert image.step == 20 and image.width > 100 and image.height > 100

    charts = custom_charts(events)
    assert charts["λ_max against the stability limit"] == [
        "^spectral/hessian/lambda_max$",
        "^spectral/hessian/stability_limit$",
    ]
    assert charts["top-k eigenvalues"] == [r"^spectral/hessian/eig_\d+$"]
    # Each chart pattern matches exactly the tags it names (TensorBoard searches regexes).
    lambda_chart = charts["λ_max against the stability limit"]
    assert sorted(t for t in scalars if any(re.search(p, t) for p in lambda_chart)) == [
        "spectral/hessian/lambda_max",
        "spectral/hessian/stability_limit",
    ]


def test_edge_of_stability_full_batch_gradient_descent():
    """Cohen et al. 2021: GD sharpens until λ_max ≈ 2/lr and then hovers there."""
    torch.manual_seed(0)
    x, y = regression_data(n=64)
    torch.manual_seed(1)
    model = TanhRegressor(lr=0.3)
    monitor = SharpnessMonitor(every_n_steps=25)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, full_batch_loader(x, y, 800))
    ratios = {step: values["spectral/hessian/eos_ratio"] for step, values in monitor.history}
    assert sorted(ratios) == list(range(0, 801, 25))
    early = [ratios[s] for s in range(0, 101, 25)]
    late = [ratios[s] for s in range(400, 801, 25)]
    assert early[0] < 0.85, early  # starts below the edge
    assert max(ratios[s] for s in range(0, 401, 25)) > 0.97  # progressive sharpening reaches it
    assert all(0.75 < r < 1.25 for r in late), late  # and hovers there
    assert sum(late) / len(late) == pytest.approx(1.0, abs=0.08)
    # Warm starts keep tracking cheap: fewer products than the cold first measurement,
    # a handful each (certifying the error bound needs the neighbour resolved too).
    cold, *warm = [values["spectral/hessian/num_hvps"] for _, values in monitor.history]
    assert sum(warm) / len(warm) < cold
    assert max(warm) <= 7


def monitors():
    return [
        SharpnessMonitor(every_n_steps=2),
        small_spectrum_monitor(),
        SharpnessMonitor(every_n_steps=5, eval_mode=True, params="^net\\.4\\.", name="head"),
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"accumulate_grad_batches": 2},
        {"precision": "bf16-mixed"},
        {"model_class": HostRandomClassifier},
        {"model_class": RenormalisedEmbeddingClassifier},
    ],
    ids=[
        "plain",
        "grad-accumulation",
        "bf16-mixed",
        "numpy-and-random-masks",
        "max-norm-embedding",
    ],
)
def test_training_is_bit_identical_with_and_without_callbacks(overrides):
    without = fit_and_capture([], **overrides)
    with_monitors = fit_and_capture(monitors(), **overrides)
    assert_identical_runs(without, with_monitors)


def test_measurement_runs_in_float32_under_mixed_precision():
    monitor = SharpnessMonitor(every_n_steps=4)
    reference = []

    class Reference(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                probe = monitor._probe[0]
                loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
                reference.append(
                    hessian_eigenvalues(pl_module, loss, probe, k=1, tol=1e-4).eigenvalues[0]
                )

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=4, callbacks=[monitor, Reference()], **trainer_kwargs(precision="bf16-mixed")
    )
    trainer.fit(NoisyClassifier(), classification_loader())
    measured = dict(monitor.history)[4]["spectral/hessian/lambda_max"]
    # bf16 autocast would move λ_max by ~1e-2 relative; float32 agrees to the tolerance.
    assert measured == pytest.approx(float(reference[0]), rel=3e-3)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_logs_to_csv_without_extra_training_logs(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    L.seed_everything(0, verbose=False)
    recorder = LossRecorder()
    callbacks = [SharpnessMonitor(every_n_steps=3), recorder]
    trainer = L.Trainer(
        max_steps=6, log_every_n_steps=1, callbacks=callbacks, **trainer_kwargs(logger=logger)
    )
    trainer.fit(NoisyClassifier(), classification_loader())
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    measured = {
        int(r["step"]): float(r["spectral/hessian/lambda_max"])
        for r in rows
        if r.get("spectral/hessian/lambda_max")
    }
    assert sorted(measured) == [0, 3, 6]
    assert all(math.isfinite(v) and v > 0 for v in measured.values())
    # The probe's calls of training_step are muted: the logged train_loss values are the
    # training batches' losses, not the probe batch's.
    logged_losses = sorted(float(r["train_loss"]) for r in rows if r.get("train_loss"))
    assert logged_losses == pytest.approx(sorted(recorder.losses), rel=1e-6)


def test_runs_without_a_logger_and_feeds_early_stopping_and_checkpoints(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=2)
    stopper = EarlyStopping(
        monitor="spectral/hessian/lambda_max",
        mode="max",
        stopping_threshold=1e-6,
        check_on_train_epoch_end=True,
    )
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="spectral/hessian/lambda_max", mode="max", save_top_k=1
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=5,
        callbacks=[monitor, stopper, checkpoint],
        **trainer_kwargs(enable_checkpointing=True),
    )
    trainer.fit(NoisyClassifier(), classification_loader())
    assert trainer.current_epoch == 1  # stopped after the first epoch: the threshold was met
    assert "spectral/hessian/lambda_max" in trainer.callback_metrics
    assert float(checkpoint.best_model_score) == pytest.approx(
        monitor.last_metrics["spectral/hessian/lambda_max"], rel=1e-6
    )


def test_fast_dev_run_measures_once():
    monitor = SharpnessMonitor(every_n_steps=1)
    spectrum = HessianSpectrumMonitor(every_n_steps=1, k=2, trace=False, density=False)
    trainer = L.Trainer(
        fast_dev_run=True, callbacks=[monitor, spectrum], **trainer_kwargs(logger=None)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NoisyClassifier(), classification_loader())
    assert [step for step, _ in monitor.history] == [0]
    assert [step for step, _ in spectrum.history] == [0]
    # fast_dev_run's DummyLogger drops everything by design: no warning that it takes
    # scalars only.
    assert type(trainer.logger).__name__ == "DummyLogger"
    assert not [w for w in caught if "log_dir" in str(w.message)]


def test_sanity_check_is_skipped():
    class WithValidation(NoisyClassifier):
        def validation_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    monitor = SharpnessMonitor(every_n_steps=100)
    trainer = L.Trainer(
        max_steps=1, num_sanity_val_steps=2, callbacks=[monitor], **trainer_kwargs()
    )
    trainer.fit(WithValidation(), classification_loader(), classification_loader(shuffle=False))
    assert [step for step, _ in monitor.history] == [0]


def test_non_finite_loss_logs_nan_warns_once_and_training_goes_on():
    monitor = SharpnessMonitor(
        every_n_steps=2, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]) * float("nan")
    )
    L.seed_everything(0, verbose=False)
    model = NoisyClassifier()
    trainer = L.Trainer(max_steps=6, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, classification_loader())
    ours = [w for w in caught if "SharpnessMonitor" in str(w.message)]
    assert len(ours) == 1 and "NaN" in str(ours[0].message)
    assert [step for step, _ in monitor.history] == [0, 2, 4, 6]
    assert all(math.isnan(v["spectral/hessian/lambda_max"]) for _, v in monitor.history)
    assert math.isnan(float(trainer.callback_metrics["spectral/hessian/lambda_max"]))
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_values_undefined_for_adam_are_nan_without_a_warning():
    """Before Adam's first step there is no preconditioner (the ratio is NaN), and Adam has
    no single step size (the λ_max limit is NaN): documented, so no 'non-finite' warning."""
    monitor = SharpnessMonitor(every_n_steps=2)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=4, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NoisyClassifier(), classification_loader())
    assert not [w for w in caught if "SharpnessMonitor" in str(w.message)]
    values = dict(monitor.history)
    assert math.isnan(values[0]["spectral/hessian/eos_ratio"])
    assert values[2]["spectral/hessian/eos_ratio"] > 0
    assert all(math.isnan(v["spectral/hessian/stability_limit"]) for v in values.values())
    assert all(v["spectral/hessian/lambda_max"] > 0 for v in values.values())


class _StepMarker(Callback):
    """Records ``trainer.global_step`` in each batch hook, before the monitors' hooks (it
    comes first in the callback list): the step a measurement in that hook is logged at."""

    def __init__(self) -> None:
        self.step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = trainer.global_step


def test_out_of_memory_in_a_measurement_logs_nan_and_training_goes_on():
    """A measurement that runs out of device memory (simulated: the loss raises torch's
    OutOfMemoryError at step 4) logs NaN with one warning; the others are unaffected and the
    training is the run without the monitor."""
    marker = _StepMarker()

    def loss_fn(model, batch):
        if marker.step == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return F.cross_entropy(model(batch[0]), batch[1])

    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=loss_fn)
    plain = fit_and_capture([])
    with pytest.warns(RuntimeWarning, match=r"out of device memory at step 4 \(CUDA out of"):
        monitored = fit_and_capture([marker, monitor])
    assert_identical_runs(plain, monitored)
    values = {step: v["spectral/hessian/lambda_max"] for step, v in monitor.history}
    assert math.isnan(values[4])
    assert len(values) >= 6 and all(v > 0 for step, v in values.items() if step != 4)


def test_explicit_probe_data_and_several_probe_batches():
    x, y = regression_data(n=40)
    explicit = SharpnessMonitor(
        every_n_steps=4, probe_data=[(x[:10], y[:10]), (x[10:40], y[10:40])], tol=1e-6
    )
    collected = SharpnessMonitor(every_n_steps=4, probe_batches=3, tol=1e-6, name="collected")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = TanhRegressor(lr=0.05)
    trainer = L.Trainer(
        max_steps=8, callbacks=[explicit, collected, Snapshots()], **trainer_kwargs()
    )
    trainer.fit(model, loader)
    assert [s for s, _ in explicit.history] == [0, 4, 8]
    # Three probe batches are complete at the third batch, after two optimizer steps.
    assert [s for s, _ in collected.history] == [2, 4, 8]
    reference = hessian_eigenvalues(model, mse, (x, y), k=1, tol=1e-8)
    assert explicit.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(reference.eigenvalues[0]), rel=1e-5
    )
    reference = hessian_eigenvalues(
        model, mse, [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:24], y[16:24])], k=1, tol=1e-8
    )
    assert collected.last_metrics["spectral/hessian/collected/lambda_max"] == pytest.approx(
        float(reference.eigenvalues[0]), rel=1e-5
    )


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    x, y = regression_data(n=48)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    first = SharpnessMonitor(every_n_steps=5)
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=10, callbacks=[first, checkpoint], **trainer_kwargs(enable_checkpointing=True)
    )
    trainer.fit(TanhRegressor(lr=0.05), loader)
    assert [s for s, _ in first.history] == [0, 5, 10]

    resumed = SharpnessMonitor(every_n_steps=5)
    logger = CSVLogger(tmp_path, name="resumed", version=0)
    trainer = L.Trainer(
        max_steps=20,
        callbacks=[resumed],
        **trainer_kwargs(logger=logger, enable_checkpointing=False),
    )
    trainer.fit(TanhRegressor(lr=0.05), loader, ckpt_path=str(tmp_path / "epoch=1-step=10.ckpt"))
    assert [s for s, _ in resumed.history] == [0, 5, 10, 15, 20]
    assert spectral_history(resumed)[2] == spectral_history(first)[2]
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        logged = [
            int(r["step"]) for r in csv.DictReader(handle) if r.get("spectral/hessian/lambda_max")
        ]
    assert logged == [15, 20]  # no duplicate of step 10


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SharpnessMonitor(every_n_steps=0), "every_n_steps must be an integer >= 1"),
        (lambda: SharpnessMonitor(probe_batches=0), "probe_batches must be an integer >= 1"),
        (lambda: SharpnessMonitor(tol=0), "tol must be a number > 0"),
        (lambda: SharpnessMonitor(hvp="fast"), "hvp must be one of"),
        (lambda: HessianSpectrumMonitor(k=0), "k must be an integer >= 1"),
        (lambda: HessianSpectrumMonitor(method="arnoldi"), "method must be one of"),
        (lambda: SharpnessMonitor(method="power"), "method must be one of"),
        (lambda: SharpnessMonitor(block_size=0), "block_size must be an integer >= 1 or None"),
        (
            lambda: HessianSpectrumMonitor(method="lanczos", block_size=4),
            "block_size=4 applies to method='block_lanczos'",
        ),
        (lambda: SharpnessMonitor(max_basis=2), r"at least k \+ 2 = 3 .*got 2"),
        (lambda: HessianSpectrumMonitor(k=10, max_basis=11), r"at least k \+ 2 = 12 .*got 11"),
        (
            lambda: SharpnessMonitor(block_size=4, max_basis=8),
            "max_basis=8 bounds the basis of method='lanczos'",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("monitor", "message"),
    [
        (
            HessianSpectrumMonitor(k=10_000),
            r"k=10000 is larger than the number of selected parameters \(195\)",
        ),
        (
            SharpnessMonitor(block_size=500),
            r"block_size=500 is larger than the number of selected parameters \(195\)",
        ),
        (SharpnessMonitor(params="^decoder"), r"selects no trainable parameter.*net\.0\.weight"),
        (SharpnessMonitor(params=["net.4.wieght"]), r"close matches: \['net.4.weight'"),
    ],
)
def test_bad_arguments_fail_at_setup(monitor, message):
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.raises(ValueError, match=message):
        trainer.fit(NoisyClassifier(), classification_loader())


def test_manual_optimization_needs_a_loss_fn():
    class Manual(NoisyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = L.Trainer(max_steps=1, callbacks=[SharpnessMonitor()], **trainer_kwargs())
    with pytest.raises(ValueError, match="manual optimization"):
        trainer.fit(Manual(), classification_loader())


class TripleTopQuadratic(L.LightningModule):
    """``L(θ) = ½ θᵀAθ - bᵀθ``: the Hessian is ``A``, whose top eigenvalue 5 is triple."""

    # 12 parameters: blocks of 2, 3 and 4 tile the space, so the solves stay Krylov solves.
    EIGENVALUES = (5.0, 5.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.1, 0.05)

    def __init__(self, adam: bool = False) -> None:
        super().__init__()
        self.adam = adam
        g = torch.Generator().manual_seed(0)
        n = len(self.EIGENVALUES)
        q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        values = torch.tensor(self.EIGENVALUES, dtype=torch.float64)
        self.register_buffer("A", (q * values) @ q.T)
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return 0.5 * self.theta @ self.A @ self.theta - self.b @ self.theta

    def configure_optimizers(self):
        if self.adam:
            return torch.optim.Adam(self.parameters(), lr=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitors_with_blocks_find_a_repeated_top_eigenvalue():
    sharpness = SharpnessMonitor(every_n_steps=3, method="block_lanczos", block_size=4, tol=1e-10)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=3, k=4, block_size=3, tol=1e-10, trace=False, density=False
    )
    trainer = L.Trainer(max_steps=6, callbacks=[sharpness, spectrum], **trainer_kwargs())
    x = torch.zeros(1, 1)
    trainer.fit(TripleTopQuadratic(), full_batch_loader(x, x, 6))
    exact = sorted(TripleTopQuadratic.EIGENVALUES, reverse=True)[:4]
    assert [step for step, _ in spectrum.history] == [0, 3, 6]
    for (_, sharp), (_, spec) in zip(sharpness.history, spectrum.history, strict=True):
        assert sharp["spectral/hessian/lambda_max"] == pytest.approx(5.0, rel=1e-9)
        assert sharp["spectral/hessian/eos_ratio"] == pytest.approx(5.0 * 0.1 / 2, rel=1e-9)
        assert sharp["spectral/hessian/num_hvps"] % 4 == 0
        eigs = [spec[f"spectral/hessian/eig_{i}"] for i in range(1, 5)]
        # Single-vector Lanczos would report the triple value once: [5, 3, 2, 1.5].
        assert eigs == pytest.approx(exact, rel=1e-9)
        assert spec["spectral/hessian/spectrum_num_hvps"] % 3 == 0


def test_preconditioned_solve_with_blocks_matches_the_dense_ratio():
    from spectral_callbacks.curvature import stability_preconditioner

    monitor = SharpnessMonitor(every_n_steps=4, method="block_lanczos", block_size=2, tol=1e-10)
    trainer = L.Trainer(max_steps=8, callbacks=[monitor], **trainer_kwargs())
    model = TripleTopQuadratic(adam=True)
    x = torch.zeros(1, 1)
    trainer.fit(model, full_batch_loader(x, x, 8))
    step, last = monitor.history[-1]
    assert step == 8
    preconditioner = stability_preconditioner(trainer.optimizers[0], [model.theta])
    scale = preconditioner.scaled_step.sqrt()
    exact = torch.linalg.eigvalsh(scale[:, None] * model.A * scale[None, :])[-1]
    # Adam's step differs per entry, so this is the block solve on D̃^½ A D̃^½, not λ_max·c.
    assert float(scale.min()) < 0.99 * float(scale.max())
    assert last["spectral/hessian/eos_ratio"] == pytest.approx(float(exact), rel=1e-8)


class DistinctQuadratic(TripleTopQuadratic):
    """The quadratic with twelve distinct eigenvalues: single-vector Lanczos finds them all."""

    EIGENVALUES = (5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.1, 0.05)


def test_monitors_with_a_bounded_basis_match_the_dense_values(monkeypatch):
    from spectral_callbacks.curvature import stability_preconditioner

    from ..models import BasisSpy

    spy = BasisSpy(monkeypatch)
    sharpness = SharpnessMonitor(every_n_steps=4, max_basis=3, tol=1e-10)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=4, k=3, max_basis=5, tol=1e-10, trace=False, density=False
    )
    trainer = L.Trainer(max_steps=8, callbacks=[sharpness, spectrum], **trainer_kwargs())
    model = DistinctQuadratic(adam=True)
    x = torch.zeros(1, 1)
    trainer.fit(model, full_batch_loader(x, x, 8))
    # both monitors' solves restarted with full bases (of steps + 1 vectors)
    assert {steps + 1 for steps in spy.restart_steps} == {3, 5}
    for (_, sharp), (_, spec) in zip(sharpness.history, spectrum.history, strict=True):
        assert sharp["spectral/hessian/lambda_max"] == pytest.approx(5.0, rel=1e-9)
        eigs = [spec[f"spectral/hessian/eig_{i}"] for i in range(1, 4)]
        assert eigs == pytest.approx([5.0, 4.0, 3.0], rel=1e-9)
    # The last optimizer-aware ratio came from a restarted solve on D̃^½ A D̃^½ (Adam).
    preconditioner = stability_preconditioner(trainer.optimizers[0], [model.theta])
    scale = preconditioner.scaled_step.sqrt()
    exact = torch.linalg.eigvalsh(scale[:, None] * model.A * scale[None, :])[-1]
    assert sharpness.history[-1][1]["spectral/hessian/eos_ratio"] == pytest.approx(
        float(exact), rel=1e-8
    )


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
    batches = [pack_batch(kind, x[:5], y[:5]), pack_batch(kind, x[5:], y[5:])]
    loader = torch.utils.data.DataLoader(ListDataset(batches), batch_size=None)
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
    reference = hessian_eigenvalues(model, mse, plain, k=2, tol=1e-10).eigenvalues
    assert monitor.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(reference[0]), rel=1e-6
    )
    assert spectrum.last_metrics["spectral/hessian/eig_2"] == pytest.approx(
        float(reference[1]), rel=1e-6
    )


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
    loader = torch.utils.data.DataLoader(ListDataset(batches), batch_size=None)
    trainer = L.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    summed = lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="sum")  # noqa: E731
    dense = dense_hessian_func(model, summed, batches, reduction="sum")
    assert monitor.last_metrics["spectral/hessian/lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6
    )
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        SharpnessMonitor(reduction="none")


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


def test_history_is_bounded_and_figures_are_sparse(tmp_path, monkeypatch):
    monkeypatch.setattr(SharpnessMonitor, "history_size", 3)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    sharpness = SharpnessMonitor(every_n_steps=1)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=2, k=2, trace_hvps=4, density_probes=1, density_steps=3
    )
    logger = L.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        max_steps=20,
        max_epochs=-1,
        callbacks=[sharpness, spectrum],
        **trainer_kwargs(logger=logger),
    )
    trainer.fit(AnyBatchRegressor(), loader)
    assert [s for s, _ in sharpness.history] == [18, 19, 20]
    assert sharpness.num_measurements == 21

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    # Figures every 10 · every_n_steps = 20 steps; histograms at every measurement.
    assert [e.step for e in events.Images("spectral/hessian/density")] == [0, 20]
    assert len(events.Histograms("spectral/hessian/top_k")) == 11


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_models_are_measured_against_the_float64_truth(precision):
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = AnyBatchRegressor(width=16)
    sharpness = SharpnessMonitor(every_n_steps=1, probe_data=(x, y), tol=0.05)
    spectrum = HessianSpectrumMonitor(every_n_steps=1, k=2, tol=0.05)  # defaults otherwise
    trainer = L.Trainer(
        max_steps=1, callbacks=[sharpness, spectrum], **trainer_kwargs(precision=precision)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    truth_model = copy.deepcopy(model).double()
    truth = hessian_eigenvalues(truth_model, mse, (x.double(), y.double()), k=4, tol=1e-10)
    lam = sharpness.last_metrics["spectral/hessian/lambda_max"]
    assert lam == pytest.approx(float(truth.eigenvalues[0]), rel=2e-2)
    # An interior value converged at tol 0.05 is within 5 % of an eigenvalue (here λ_2 and
    # λ_3 are 5 % apart, and 16-bit products may meet λ_3 first).
    eig_2 = spectrum.last_metrics["spectral/hessian/eig_2"]
    assert min(abs(eig_2 - float(value)) for value in truth.eigenvalues) <= 0.05 * eig_2
    assert math.isfinite(spectrum.last_metrics["spectral/hessian/trace"])
    # A tolerance below the products' rounding is never claimed.
    half = copy.deepcopy(model)
    dtype = next(half.parameters()).dtype
    tight = hessian_eigenvalues(half, mse, (x.to(dtype), y.to(dtype)), k=1, tol=1e-5)
    assert not bool(tight.converged.any())
    assert float(tight.eigenvalues[0]) == pytest.approx(float(truth.eigenvalues[0]), rel=2e-2)
    assert abs(float(tight.eigenvalues[0] - truth.eigenvalues[0])) <= float(tight.errors[0])
    # ... nor chased: the solve stops once its bound is the products' floor and its value
    # stays within it (the whole budget of 100 products before).
    assert tight.num_hvps < 50


@pytest.mark.parametrize(("precision", "floor"), [("bf16-true", "0.039"), ("16-true", "0.0049")])
def test_a_tolerance_below_half_precision_products_is_named_with_the_one_they_allow(
    precision, floor
):
    """The warning names the products' own error (ten unit roundoffs) as the tolerance to
    ask for, not a larger ``max_iter``: the solve stopped at that floor."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    sharpness = SharpnessMonitor(every_n_steps=1, tol=1e-3)
    trainer = L.Trainer(max_steps=1, callbacks=[sharpness], **trainer_kwargs(precision=precision))
    with pytest.warns(RuntimeWarning, match=f"loosen tol to at least {floor}") as record:
        trainer.fit(AnyBatchRegressor(width=16), loader)
    message = next(str(w.message) for w in record if "tol=0.001" in str(w.message))
    assert "lambda_max cannot reach tol=0.001: products in" in message
    assert "max_iter" not in message
    assert sharpness.last_metrics["spectral/hessian/lambda_max_converged"] == 0.0


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


class MetricsInTrainingStep(NoisyClassifier):
    """State a ``training_step`` changes in place, as Lightning's docs show it: a
    torchmetrics accuracy and sample count, a list of step outputs, a dict and a tensor
    counter."""

    def __init__(self) -> None:
        super().__init__()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        self.samples = torchmetrics.SumMetric()
        self.step_outputs: list[torch.Tensor] = []
        self.seen_labels: dict[int, int] = {}
        self.steps_taken = torch.zeros((), dtype=torch.long)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy.update(logits, y)
        self.samples.update(torch.tensor(float(len(y))))
        loss = F.cross_entropy(logits, y)
        self.step_outputs.append(loss.detach())
        for label in y.tolist():
            self.seen_labels[label] = self.seen_labels.get(label, 0) + 1
        self.steps_taken += 1
        return loss


@pytest.mark.parametrize("hvp", ["auto", "gradient_difference"])
def test_state_the_training_step_changes_in_place_is_put_back(hvp):
    """Every probe call of ``training_step`` (a few per measurement, two gradients per
    product for gradient differences) used to count in the user's metrics and lists."""

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = MetricsInTrainingStep()
        trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs())
        trainer.fit(model, classification_loader())
        return model

    plain = fit([])
    monitored = fit(
        [
            SharpnessMonitor(every_n_steps=2, hvp=hvp),
            HessianSpectrumMonitor(every_n_steps=5, k=2, trace_hvps=4, density_steps=3, hvp=hvp),
        ]
    )
    assert float(monitored.samples.compute()) == float(plain.samples.compute()) == 2 * 96
    assert float(monitored.accuracy.compute()) == float(plain.accuracy.compute())
    assert len(monitored.step_outputs) == len(plain.step_outputs) == 12
    assert all(
        torch.equal(a, b) for a, b in zip(plain.step_outputs, monitored.step_outputs, strict=True)
    )
    assert monitored.seen_labels == plain.seen_labels
    assert int(monitored.steps_taken) == int(plain.steps_taken) == 12


def test_preserved_attributes_puts_back_what_a_step_changed_in_place():
    module = nn.Linear(2, 2)
    module.outputs, module.table, module.tags = [torch.ones(1)], {"a": 1}, {"x"}
    module.scale = torch.ones(())
    module.large = torch.zeros(PRESERVED_TENSOR_BYTES // 4 + 1)  # beyond the copied size
    first_output = module.outputs[0]
    with preserved_attributes(module):
        module.outputs.append(torch.ones(1))
        module.table["b"] = 2
        module.tags.add("y")
        module.scale += 1  # before its use: the graph saves the changed tensor
        loss = (module.weight * module.scale).sum()
        module.large += 1
        module.added = 3
    assert len(module.outputs) == 1 and module.outputs[0] is first_output
    assert module.table == {"a": 1} and module.tags == {"x"}
    assert float(module.scale) == 1.0 and not hasattr(module, "added")
    assert float(module.large[0]) == 1.0  # not watched, as documented
    (gradient,) = torch.autograd.grad(loss, module.weight)  # the graph is intact
    assert torch.equal(gradient, torch.full((2, 2), 2.0))


def test_an_explicit_forward_mode_path_names_a_loss_that_changes_state():
    model = MetricsInTrainingStep()
    batch = next(iter(classification_loader()))
    with pytest.raises(RuntimeError, match="torchmetrics metric updated in training_step"):
        hessian_eigenvalues(model, training_step_loss, batch, k=1, hvp="forward_over_reverse")


def test_the_pytorch_lightning_namespace_logger_gets_histograms_and_the_layout(tmp_path):
    import pytorch_lightning  # installed with lightning

    from spectral_callbacks.reporting.tensorboard import tensorboard_writers

    logger = pytorch_lightning.loggers.TensorBoardLogger(tmp_path, name="pl", version=0)
    assert tensorboard_writers([logger]) == [logger.experiment]


class ScaledRegressor(TanhRegressor):
    """A float32 tanh MLP whose loss is the mean squared error times ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__(lr=0.0)
        self.scale = scale

    def training_step(self, batch, batch_idx):
        return self.scale * mse(self, batch)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_extreme_loss_scales_are_measured_as_their_float64_truth(scale):
    x, y = regression_data(n=64)
    model = ScaledRegressor(scale)
    sharpness = SharpnessMonitor(every_n_steps=1)
    spectrum = HessianSpectrumMonitor(
        every_n_steps=1, k=2, trace_hvps=2000, density_probes=2, density_steps=20
    )
    trainer = L.Trainer(
        max_steps=1, callbacks=[sharpness, spectrum], **trainer_kwargs(precision="32-true")
    )
    trainer.fit(model, full_batch_loader(x, y, 1))
    truth_model = copy.deepcopy(model).double()
    batch = (x.double(), y.double())
    truth = hessian_eigenvalues(truth_model, mse, batch, k=2, tol=1e-10)
    exact_trace = hessian_trace(truth_model, mse, batch, num_hvps=10_000).estimate
    values = sharpness.last_metrics
    assert values["spectral/hessian/lambda_max"] / scale == pytest.approx(
        float(truth.eigenvalues[0]), rel=1e-3
    )
    assert values["spectral/hessian/lambda_max_converged"] == 1.0
    top = [spectrum.last_metrics[f"spectral/hessian/eig_{i}"] / scale for i in (1, 2)]
    assert top == pytest.approx(truth.eigenvalues.tolist(), rel=1e-3)
    # trace_hvps beyond the 1,377 parameters: the trace is exact.
    assert spectrum.last_metrics["spectral/hessian/trace"] / scale == pytest.approx(
        exact_trace, rel=1e-4
    )


class _ScheduledRegressor(TanhRegressor):
    """SGD under a learning-rate scheduler stepped every step; records the rate each
    training step runs with, by step."""

    def __init__(self, scheduler: str) -> None:
        super().__init__(lr=0.1)
        self.scheduler = scheduler
        self.rates: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        self.rates[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]
        loss = super().training_step(batch, batch_idx)
        self.log("plateau_loss", self.global_step * 0.0)  # never improves: the rate halves
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        config = {"scheduler": scheduler, "interval": "step", "monitor": "plateau_loss"}
        return {"optimizer": optimizer, "lr_scheduler": config}


@pytest.mark.parametrize(("scheduler", "lag"), [("step", 0), ("plateau", 1)])
def test_the_ratio_reads_the_rate_the_optimizer_holds_when_it_measures(scheduler, lag):
    """A scheduler stepped every step has set the next step's rate when a measurement runs;
    ``ReduceLROnPlateau``, which Lightning steps after the batch's callbacks, has not: the
    ratio then reads the rate of the step just taken (docs/sharpness.md)."""
    x, y = regression_data(n=32, d=8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = _ScheduledRegressor(scheduler)
    monitor = SharpnessMonitor(every_n_steps=2)
    trainer = L.Trainer(max_steps=10, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    checked = 0
    for step, values in monitor.history:
        if step - lag not in model.rates or step == 0:
            continue
        rate = 2 * values["spectral/hessian/eos_ratio"] / values["spectral/hessian/lambda_max"]
        assert rate == pytest.approx(model.rates[step - lag], rel=1e-6), step
        checked += 1
    assert checked >= 3
    assert len(set(model.rates.values())) >= 3  # the rate did change along the run
