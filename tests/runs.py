"""Lightning runs the callback tests share: fit and capture what must stay bit-identical,
snapshots of the model at each step, the TensorBoard events a run wrote."""

from __future__ import annotations

import copy
import math
import os
import pathlib
import random
import subprocess
import sys

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from spectral_callbacks import HessianSpectrumMonitor

from .models import NoisyClassifier, classification_loader, trainer_kwargs


def run_worker(script: pathlib.Path, *arguments: str, timeout: float, cwd=None) -> None:
    """Run a multi-process worker script (DDP, FSDP) in a fresh interpreter, without the
    distributed settings of this process's environment; fail with its stderr."""
    launcher = ("LOCAL_RANK", "MASTER_", "WORLD_SIZE", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]


class Snapshots(Callback):
    """Copies of the model's parameters after every optimizer step (and at step 0)."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def read_events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def custom_charts(events: EventAccumulator) -> dict[str, list[str]]:
    """The custom-scalars dashboard last written: chart title -> tag patterns."""
    config = events.Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    return {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }


def small_spectrum_monitor(**overrides) -> HessianSpectrumMonitor:
    """A ``HessianSpectrumMonitor`` cheap enough to run every few steps of a test run: every
    3 steps the top 2, a trace from 6 products and a density of 2 probes × 4 steps, unless
    ``overrides`` say otherwise."""
    settings = dict(every_n_steps=3, k=2, trace_hvps=6, density_probes=2, density_steps=4)
    return HessianSpectrumMonitor(**(settings | overrides))


def fit_and_capture(callbacks, loader_seed=0, model_class=NoisyClassifier, **overrides):
    L.seed_everything(0, verbose=False)  # torch, NumPy and random
    model = model_class()
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(model, classification_loader(seed=loader_seed))
    optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
    _, numpy_keys, numpy_position, *_ = np.random.get_state()
    streams = (torch.get_rng_state(), torch.as_tensor(numpy_keys), numpy_position)
    return model, optimizer_state, (*streams, random.getstate())


def assert_identical_runs(a, b):
    """Parameters, buffers, optimizer state, modes and the random streams (torch's, NumPy's
    and Python's) are the same after both runs."""
    (model_a, opt_a, (*rng_a, python_a)), (model_b, opt_b, (*rng_b, python_b)) = a, b
    for (name, pa), pb in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][field])
            ), (key, field)
    for stream_a, stream_b in zip(rng_a, rng_b, strict=True):
        assert torch.equal(torch.as_tensor(stream_a), torch.as_tensor(stream_b))
    assert python_a == python_b
    modes_a = [m.training for m in model_a.modules()]
    assert modes_a == [m.training for m in model_b.modules()]


def spectral_history(monitor) -> list[tuple[int, dict[str, float]]]:
    """A monitor's history without its timing row (the share of wall time spent measuring,
    which no two runs share): the values two runs of one model must agree on."""
    return [
        (step, {k: v for k, v in values.items() if not k.endswith("overhead")})
        for step, values in monitor.history
    ]


def assert_same_history(a, b) -> None:
    """Two monitors measured the same steps with the same values (NaN where both are)."""
    history_a, history_b = spectral_history(a), spectral_history(b)
    assert [step for step, _ in history_a] == [step for step, _ in history_b]
    for (step, values_a), (_, values_b) in zip(history_a, history_b, strict=True):
        assert values_a.keys() == values_b.keys(), step
        for name, value in values_a.items():
            other = values_b[name]
            assert value == other or (math.isnan(value) and math.isnan(other)), (step, name)
