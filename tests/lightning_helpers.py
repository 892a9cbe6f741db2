"""Small LightningModules and data for the callback tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

# The workloads shared with the demo, examples and benchmarks.
from spectral_callbacks.workloads import FullBatch, TanhRegressor  # noqa: F401
from spectral_callbacks.workloads import teacher_regression as regression_data  # noqa: F401


def full_batch_loader(x, y, steps: int):
    """One epoch of ``steps`` full-batch gradient steps (the demo's dataset)."""
    return torch.utils.data.DataLoader(FullBatch(x, y, steps), batch_size=None)


class NoisyClassifier(LightningModule):
    """Dropout and BatchNorm in train mode, Adam: everything a probe could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def classification_loader(n: int = 96, batch_size: int = 16, seed: int = 0, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle
    )


def trainer_kwargs(**overrides):
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "deterministic": True,
    }
    kwargs.update(overrides)
    return kwargs


def cli_round_trip(module_class, callback_class, init_args: dict, folder):
    """A LightningCLI config naming ``callback_class`` with ``init_args`` is dumped without a
    serialisation failure and read back; returns the callback the second CLI built."""
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "logger": False,
            "callbacks": [
                {
                    "class_path": f"spectral_callbacks.{callback_class.__name__}",
                    "init_args": init_args,
                }
            ],
        }
    }
    cli = LightningCLI(module_class, run=False, args=config, save_config_callback=None)
    dumped = cli.parser.dump(cli.config)
    assert "Unable to serialize" not in dumped
    path = folder / "config.yaml"
    path.write_text(dumped)
    again = LightningCLI(
        module_class, run=False, args=["--config", str(path)], save_config_callback=None
    )
    (callback,) = [cb for cb in again.trainer.callbacks if isinstance(cb, callback_class)]
    return callback
