"""Run by tests/callbacks/test_distributed.py: a 2-process CPU DDP fit recording every rank's view.

Usage: python tests/callbacks/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import spectral_callbacks as sc
from spectral_callbacks.callbacks import SpectralMonitor
from tests.callbacks.test_schedule import FakeClock
from tests.models import TanhRegressor, regression_data, trainer_kwargs


class RankScripted(SpectralMonitor):
    """Publishes 1.0 from step 6 on process 1 only: a stop decision only one rank reaches."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=1)

    def metric_names(self):
        return ["spectral/test/rank_signal"]

    def measure(self, trainer, module, probe):
        return {
            "spectral/test/rank_signal": float(
                trainer.global_rank == 1 and trainer.global_step >= 6
            )
        }


def nan_on_rank_one(model, batch):
    loss = F.mse_loss(model(batch[0]), batch[1])
    return loss * float("nan") if dist.get_rank() == 1 else loss


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.snapshots = {}
        self.batches = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = copy.deepcopy(batch)
        self.snapshots.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def main(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    x, y = regression_data(n=64, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False
    )
    sharpness = sc.SharpnessMonitor(every_n_steps=2, tol=1e-10)
    # A basis of 8 vectors: the top-3 solves restart (thick restart) on every process alike.
    spectrum = sc.HessianSpectrumMonitor(
        every_n_steps=4, k=3, tol=1e-10, trace_hvps=30, density=False, max_basis=8
    )
    representation = sc.RepresentationMonitor(
        layers=["net.1"], every_n_steps=4, num_samples=24, fit_range=(2, 8)
    )
    poisoned = sc.SharpnessMonitor(every_n_steps=3, loss_fn=nan_on_rank_one, name="poisoned")
    differences = sc.SharpnessMonitor(
        every_n_steps=4, tol=1e-8, hvp="gradient_difference", name="differences"
    )
    weights = sc.WeightSpectrumMonitor(every_n_steps=4, drift_rank=3)
    ggn = sc.HessianSpectrumMonitor(
        every_n_steps=4,
        k=2,
        tol=1e-10,
        trace_hvps=30,
        density=False,
        curvature="ggn",
        ggn_loss="mse",
        gradient_overlap=False,
    )
    # A budget with a clock per process: process 1's is slower; decisions follow the slower.
    budget = sc.WeightSpectrumMonitor(max_overhead=0.5, name="budget")
    clock = FakeClock([budget], step_seconds=(1.0, 1.5), measurement_seconds=(0.5, 1.0))
    scripted = RankScripted()
    batch_sharpness = sc.BatchSharpnessMonitor(every_n_steps=3, window=2)
    others = [
        sharpness,
        spectrum,
        representation,
        poisoned,
        differences,
        weights,
        ggn,
        scripted,
        batch_sharpness,
    ]
    # One clock for every monitor, as in a real run (the others' measurements take none of it).
    for monitor in others:
        monitor.clock = budget.clock
    stopper = sc.SpectralEarlyStopping(
        "spectral/test/rank_signal", rule="above", threshold=0.5, patience=1
    )
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=12,
        callbacks=[clock, budget, *others, stopper, recorder],
        **trainer_kwargs(devices=2, strategy="ddp"),
    )
    torch.manual_seed(1)
    trainer.fit(TanhRegressor(lr=0.05).double(), loader)
    rank = trainer.global_rank
    record = {
        "global_step": trainer.global_step,
        "stopped_step": stopper.stopped_step,
        "stopped_reason": stopper.stopped_reason,
        "sharpness": sharpness.history,
        "spectrum": spectrum.history,
        "representation": representation.history,
        "poisoned": poisoned.history,
        "differences": differences.history,
        "weights": weights.history,
        "ggn": ggn.history,
        "budget": budget.history,
        "batch_sharpness": batch_sharpness.history,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.save(
        {
            "hessian_probe": sharpness._probe,
            "representation_probe": representation._probe,
            "snapshots": recorder.snapshots,
            "batches": recorder.batches,
        },
        out / f"rank{rank}.pt",
    )


class UnequalShards(TanhRegressor):
    """Process 0 trains on batches of 4 samples, process 1 on batches of 12."""

    def train_dataloader(self):
        x, y = regression_data(n=96, dtype=torch.float64)
        rank = self.trainer.global_rank
        size = 4 if rank == 0 else 12
        part = slice(0, 48) if rank == 0 else slice(48, 96)
        dataset = torch.utils.data.TensorDataset(x[part], y[part])
        return torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)


def unequal(out: pathlib.Path) -> None:
    """Unequal per-process batches: the probe is complete when the union holds 20 samples."""
    representation = sc.RepresentationMonitor(
        layers=["net.1"], every_n_steps=2, num_samples=20, fit_range=(2, 8)
    )
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[representation],
        **trainer_kwargs(devices=2, strategy="ddp", use_distributed_sampler=False),
    )
    torch.manual_seed(2)
    model = UnequalShards(lr=0.0).double()
    trainer.fit(model)
    rank = trainer.global_rank
    (out / f"unequal{rank}.json").write_text(json.dumps(representation.history))
    torch.save(
        {"probe": representation._probe, "state": model.state_dict()}, out / f"unequal{rank}.pt"
    )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
    unequal(pathlib.Path(sys.argv[1]))
    # Both processes past every collective before gloo's threads are torn down: without it
    # one process sometimes aborted at exit ("terminate called without an active
    # exception"), as tests/curvature/fsdp_worker.py saw.
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
